"""The paper's six noise / imbalance families on Fashion-MNIST, every method, several seeds.

    python benchmarks/paper_protocol.py                      # the whole grid, resumable
    python benchmarks/paper_protocol.py &                    # or start it twice: the processes
    python benchmarks/paper_protocol.py &                    #   share the cells out between them
    python benchmarks/paper_protocol.py --report             # tables and plots from what has finished

Each cell is an ordinary ``gdw train`` run directory under ``--out``; a cell
with a ``summary.json`` is skipped, one with only a checkpoint is resumed, so
the grid can be stopped and restarted at will. A process marks the cell it is
training with a lock on a file in ``--out/.running/`` (the operating system's,
released when its process ends), so several processes started on one grid share it out between them;
``--shard K/N`` splits it statically instead. ``--report`` (also run at the
end of a full pass) reads every finished cell and writes ``results.csv``,
``results.md``, ``accuracy.png``, ``gdw_weights.png`` and
``gdw_example.png``. The loop over the cells and the locks are ``gdw
compare``'s runner (``gdw.compare.sweep``); the report helpers that are not
specific to Fashion-MNIST are ``benchmarks/grid.py``, shared with
``benchmarks/robustness.py``.

Methods: the labels of ``METHODS``, taken from gdw's one table of variants
(``gdw.variants``), each a gdw method with its arguments and
whether it weights the output layer only. ``gdw-paper`` is the paper's
algorithm (MW-Net's weighting network as stage one, no fine-tuning),
``gdw-paper-head`` the same on the output layer only, ``gdw`` is GDW with
gdw's defaults (L2RW's instance weights as stage one, the logit-adjusted
loss, the finite-difference meta-gradient, the last 20% of epochs fine-tuned
on the meta set, the class-level step along the gradient through the
zero-mean constraint), ``gdw-raw`` the same along the paper's raw gradient
(the default before ``class_grad``); ``cb`` and ``la`` run only in the
settings with imbalance, and ``gdw-jvp`` (``gdw`` with the exact forward-mode meta-gradient) only in
the three balanced noisy settings, as a check of the finite difference. The
cell directories are named after the labels (``uniform0.4_none_gdw-paper_s0``).

Hyper-parameters are the papers' defaults throughout (nothing is tuned, on
the test set or elsewhere): SGD lr 0.1 with cosine decay, momentum 0.9,
weight decay 5e-4, batch 100, meta batch 100, 100 clean meta images per class
taken out of the training set, 30 epochs, the MLP 784-256-256-10 with
BatchNorm.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grid  # noqa: E402  (benchmarks/grid.py: what the grids share)
from grid import KEEP, SPLIT_FIELDS, data_notes, head_tail_accuracy, split_markdown  # noqa: E402,F401
from gdw.variants import pick  # noqa: E402

SETTINGS = [  # (noise, imbalance): the paper's six families
    ("uniform:0.4", "none"),
    ("uniform:0.6", "none"),
    ("flip:0.2", "none"),
    ("flip:0.4", "none"),
    ("none", "longtail:100"),
    ("uniform:0.4", "longtail:10"),
]
# label -> (gdw method, method_args, head_only), from gdw's table of variants; in the order of the tables' rows.
# "gdw" is the default these cells ran with, which always fine-tuned (gdw-ftalways); today's default skips the
# phase only where the labels look clean and balanced, which no setting here is
METHODS = pick(["ce", "finetune", "l2rw", "mwnet", "dm", "gdw-paper", "gdw-paper-head", "gdw-raw", "gdw", "gdw-uncapped",
                "gdw-jvp", "cb", "la"], {"gdw": "gdw-ftalways"})
IMBALANCE_ONLY = {"cb", "la"}  # the long-tail baselines run only in the settings with imbalance
# the exact meta-gradient (forward mode), checked against the default's finite difference on the balanced noisy settings
ONLY_IN = {"gdw-jvp": {("uniform:0.4", "none"), ("uniform:0.6", "none"), ("flip:0.4", "none")}}


def runs_in(label: str, noise: str, imbalance: str) -> bool:
    """Whether the grid has the method ``label`` in the setting (noise, imbalance)."""
    if label in IMBALANCE_ONLY and imbalance == "none":
        return False
    return label not in ONLY_IN or (noise, imbalance) in ONLY_IN[label]


def cells(seeds):
    """``(noise, imbalance, label, seed)`` of every cell, in the order they run."""
    for noise, imbalance in SETTINGS:
        for label in METHODS:
            if runs_in(label, noise, imbalance):
                for seed in seeds:
                    yield noise, imbalance, label, seed


def run_grid(args) -> None:
    from gdw.compare import cell_name

    grid.run_grid(args.out, [(cell_name(noise, imbalance, label, seed), grid.cell_config(
        args.dataset, args.meta_per_class, noise, imbalance, METHODS[label], seed, args.epochs, args.device))
        for noise, imbalance, label, seed in cells(args.seeds)], args.shard)


def method_label(summary: dict, run: Path) -> str:
    """The ``METHODS`` label of a finished run (by method, arguments and head_only)."""
    return grid.method_label(METHODS, summary, run)


def finished_rows(out: Path) -> list[dict]:
    order = {m: i for i, m in enumerate(METHODS)}
    setting_order = {s: i for i, s in enumerate(SETTINGS)}
    return grid.finished_rows(out, label=method_label, sort_key=lambda r: (
        setting_order.get((r["noise"], r["imbalance"]), 99), order.get(r["method"], 99), r["seed"]))


RELABELLED = {"gdw-paper": "gdw", "gdw-paper-head": "gdw-head"}  # label -> the label such a cell ran under


def relabelled_cells(out: Path) -> list[str]:
    """The finished ``gdw-paper`` / ``gdw-paper-head`` cells made before GDW
    had the ``stage_one`` option (their config.json has no
    ``method_params``): they ran as ``gdw`` / ``gdw-head``, whose default
    then was the paper's algorithm."""
    found = []
    for path in sorted(out.glob("*/config.json")):
        run = path.parent
        if not (run / "summary.json").exists():
            continue
        if method_label(json.loads((run / "summary.json").read_text()), run) in RELABELLED \
                and "method_params" not in json.loads(path.read_text()):
            found.append(run.name)
    return found


def provenance(args, out: Path) -> str:
    command = (f"python benchmarks/paper_protocol.py --dataset {args.dataset} --epochs {args.epochs} "
               f"--meta-per-class {args.meta_per_class} --seeds {','.join(map(str, args.seeds))}")
    text = grid.provenance(out, command)
    old = relabelled_cells(out)
    if old:
        text += (
            f"\nThe {len(old)} `gdw-paper` and `gdw-paper-head` cells ran as `gdw` and `gdw-head` (directories "
            "`*_gdw_s*` and `*_gdw-head_s*`) before GDW had the `stage_one` option, when the paper's algorithm "
            "(MW-Net's weighting network as stage one, no fine-tuning) was `gdw`'s default. When they were "
            "relabelled, their directories were renamed and the `method_args` in their config.json and "
            "summary.json were rewritten from `{}` to the equivalent `{\"stage_one\": \"mwnet\"}` (the code path "
            "is the same); nothing else in those files was changed, and the original files are in git history. "
            "Their config.json has no `method_params`, which runs of that version did not record.\n")
    return text


def report(args) -> None:
    from gdw.report import read_results_csv, results_markdown, write_results_csv

    rows = finished_rows(args.out)
    if not rows:
        print("no finished cells yet")
        return
    write_results_csv(rows, args.out / "results.csv", extra_fields=SPLIT_FIELDS)
    rows = read_results_csv(args.out / "results.csv")  # the tables are computed from the CSV alone
    total = len(list(cells(args.seeds)))
    header = (
        f"{args.dataset}, MLP (two hidden layers of 256 with BatchNorm), {args.epochs} epochs, batch 100, SGD 0.1 "
        f"cosine, momentum 0.9, weight decay 5e-4, {args.meta_per_class} clean meta images per class; "
        f"{len(rows)} of {total} runs finished.\n\n"
    )
    best = results_markdown(rows, metric="best").replace(
        "best per setting in bold.",
        "best per setting in bold. The epoch is chosen on the test set, so this number is optimistic; "
        "results.csv has each run's best epoch.")
    text = (header + results_markdown(rows) + "\n" + data_notes(rows, args.out)
            + "\nThe best epoch (the other number the papers report):\n\n" + best
            + "\n" + provenance(args, args.out))
    split = split_markdown(rows)
    if split:
        text = text.replace("\nThe best epoch", "\nUnder imbalance, test accuracy (%, last 5 epochs, mean over seeds) of "
                            "the half of the classes with the most training examples / the half with the fewest:\n\n"
                            + split + "\nThe best epoch", 1)
    (args.out / "results.md").write_text(text)
    plot_accuracy(rows, args.out / "accuracy.png", title="Fashion-MNIST: test accuracy (mean of the last 5 epochs)")
    plot_gdw_weights(args.out)
    print(text)


def plot_accuracy(rows: list[dict], path: Path, title: str) -> None:
    """One panel per setting with a bar for each method the grid runs there
    (in ``METHODS`` order, each method in the same colour in every panel):
    height = mean over seeds of the last-5-epoch test accuracy, error bar =
    std over seeds, the value above it; "missing" where the cell has not
    finished. Each panel has its own y-range, so small differences stay
    visible."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gdw.report import aggregate, bar_panel, setting_label

    _, _, found = aggregate(rows)
    ncols = 3
    nrows = -(-len(SETTINGS) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(16.5, 4.3 * nrows + 0.8), squeeze=False, layout="constrained")
    for ax, (noise, imbalance) in zip(axes.flat, SETTINGS):
        s = setting_label(noise, imbalance)
        methods = [m for m in METHODS if runs_in(m, noise, imbalance)]
        means = np.array([100 * found[(s, m)]["final_mean"] if (s, m) in found else np.nan for m in methods])
        stds = np.array([100 * found[(s, m)]["final_std"] if (s, m) in found else 0.0 for m in methods])
        x = bar_panel(ax, means, stds, [grid.COLORS.get(m, "#cccccc") for m in methods], margin=(3, 1.5),
                      value_size=7.5, missing=[True] * len(methods), edgecolor="black", linewidth=0.4)
        ax.set_xticks(x, methods, rotation=40, ha="right", fontsize=8.5)
        ax.set_xlim(-0.6, len(methods) - 0.4)
        ax.set_title(s, fontsize=10)
        ax.tick_params(axis="y", labelsize=8)
    for ax in axes.flat[len(SETTINGS):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("test accuracy (%),\nlast-5-epoch mean")
    fig.suptitle(f"{title}\nmean over seeds; error bars: std over seeds. gdw-paper: the paper's algorithm; "
                 "gdw: gdw's defaults (L2RW's weights as stage one, fine-tuning on the meta set)", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


WEIGHTS_RUN = "uniform0.4_none_gdw-paper_s0"  # the cell whose arrays are committed, for plot_gdw_weights


def plot_gdw_weights(out: Path) -> None:
    """Weights of clean vs mislabelled examples under GDW as in the paper
    (the cell ``WEIGHTS_RUN``), and one noisy example's class-level weights
    next to its instance-level weight."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = out / WEIGHTS_RUN
    needed = ["example_weights.npy", "class_weights.npy", "instance_weights.npy", "split.npz", "config.json"]
    if not all((run / f).exists() for f in needed):
        return
    trust = np.load(run / "example_weights.npy")
    class_w = np.load(run / "class_weights.npy").astype(np.float32)
    inst = np.load(run / "instance_weights.npy")
    split = np.load(run / "split.npz")
    given, true = split["train_labels"], split["train_true_labels"]
    classes = json.loads((run / "config.json").read_text())["classes"]
    noisy = given != true

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    bins = np.linspace(0, max(1.0, float(np.percentile(trust, 99.5))), 50)
    ax.hist(trust[~noisy], bins=bins, alpha=0.6, density=True, label=f"clean labels ({(~noisy).sum()})")
    ax.hist(trust[noisy], bins=bins, alpha=0.6, density=True, label=f"mislabelled ({noisy.sum()})")
    ax.set(xlabel="GDW weight on the labelled class (mean over the last epoch)", ylabel="density",
           title="gdw-paper (GDW as in the paper): Fashion-MNIST, uniform 40% noise, seed 0")
    ax.title.set_fontsize(10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "gdw_weights.png", dpi=110)
    plt.close(fig)

    # the mislabelled example whose true class GDW raised most above its labelled class
    idx = np.flatnonzero(noisy)
    lift = class_w[idx, true[idx]] - class_w[idx, given[idx]]
    i = idx[int(np.argmax(lift))]
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    colors = ["tab:red" if c == given[i] else "tab:green" if c == true[i] else "tab:gray" for c in range(len(classes))]
    ax.bar(range(len(classes)), class_w[i], color=colors)
    ax.axhline(inst[i], color="black", ls="--", label=f"instance-level weight v = {inst[i]:.2f}")
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    ax.set(ylabel="class-level weight ω (last epoch)",
           title=f"training example {int(split['train_index'][i])}: labelled '{classes[given[i]]}' (red), "
                 f"truly '{classes[true[i]]}' (green)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "gdw_example.png", dpi=110)
    plt.close(fig)


def prune(out: Path) -> None:
    """Delete from finished cells what is not committed (checkpoints, arrays),
    keeping the cell of the weight plots (``WEIGHTS_RUN``) whole."""
    grid.prune(out, spare=[WEIGHTS_RUN])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fashion_mnist")
    p.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[0, 1])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--dataset", default="fashion-mnist", help="(for a quick check: digits)")
    p.add_argument("--meta-per-class", type=int, default=100)
    p.add_argument("--shard", type=lambda s: tuple(int(v) for v in s.split("/")), default=(0, 1), help="K/N: run every N-th cell from K")
    p.add_argument("--device", default=None)
    p.add_argument("--report", action="store_true", help="only tabulate and plot what has finished")
    p.add_argument("--prune", action="store_true", help="delete checkpoints and arrays of finished cells")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report and not args.prune:
        run_grid(args)
    report(args)
    if args.prune:
        prune(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
