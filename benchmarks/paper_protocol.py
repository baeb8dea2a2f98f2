"""The paper's six noise / imbalance families on Fashion-MNIST, every method, several seeds.

    python benchmarks/paper_protocol.py                      # the whole grid, resumable
    python benchmarks/paper_protocol.py &                    # or start it twice: the processes
    python benchmarks/paper_protocol.py &                    #   share the cells out between them
    python benchmarks/paper_protocol.py --report             # tables and plots from what has finished

Each cell is an ordinary ``gdw train`` run directory under ``--out``; a cell
with a ``summary.json`` is skipped, one with only a checkpoint is resumed, so
the grid can be stopped and restarted at will. A process marks the cell it is
training with a lock file in ``--out/.running/`` (taken over once its process
is gone), so several processes started on one grid share it out between them;
``--shard K/N`` splits it statically instead. ``--report`` (also run at the
end of a full pass) reads every finished cell and writes ``results.csv``,
``results.md``, ``accuracy.png``, ``gdw_weights.png`` and
``gdw_example.png``. The locks, the loop over the cells and the report
helpers that are not specific to Fashion-MNIST are ``benchmarks/grid.py``,
shared with ``benchmarks/robustness.py``.

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
import grid  # noqa: E402  (benchmarks/grid.py: the grid runner shared with robustness.py)
from grid import KEEP, SPLIT_FIELDS, data_notes, head_tail_accuracy, split_markdown  # noqa: E402,F401

SETTINGS = [  # (noise, imbalance): the paper's six families
    ("uniform:0.4", "none"),
    ("uniform:0.6", "none"),
    ("flip:0.2", "none"),
    ("flip:0.4", "none"),
    ("none", "longtail:100"),
    ("uniform:0.4", "longtail:10"),
]
METHODS = ["ce", "finetune", "l2rw", "mwnet", "dm", "gdw", "gdw-head"]
LONGTAIL_EXTRA = ["cb"]  # the class-balanced loss, for the settings with imbalance


def cells(seeds):
    for noise, imbalance in SETTINGS:
        methods = METHODS + (LONGTAIL_EXTRA if imbalance != "none" else [])
        for method in methods:
            for seed in seeds:
                yield noise, imbalance, method, seed


def run_grid(args) -> None:
    from gdw.compare import cell_name, method_variant
    from gdw.train import TrainConfig

    todo = []
    for noise, imbalance, label, seed in cells(args.seeds):
        name, head = method_variant(label)
        todo.append((cell_name(noise, imbalance, label, seed), TrainConfig(
            dataset=args.dataset, noise=noise, imbalance=imbalance, method=name, head_only=head, seed=seed,
            model="mlp", epochs=args.epochs, batch_size=100, meta_batch_size=100, lr=0.1,
            meta_per_class=args.meta_per_class, progress=False, device=args.device,
        )))
    grid.run_grid(args.out, todo, args.shard)


def finished_rows(out: Path) -> list[dict]:
    order = {m: i for i, m in enumerate(METHODS + LONGTAIL_EXTRA)}
    setting_order = {s: i for i, s in enumerate(SETTINGS)}
    return grid.finished_rows(out, sort_key=lambda r: (
        setting_order.get((r["noise"], r["imbalance"]), 99), order.get(r["method"], 99), r["seed"]))


def provenance(args, out: Path) -> str:
    command = (f"python benchmarks/paper_protocol.py --dataset {args.dataset} --epochs {args.epochs} "
               f"--meta-per-class {args.meta_per_class} --seeds {','.join(map(str, args.seeds))}")
    return grid.provenance(out, command)


def report(args) -> None:
    from gdw.report import plot_compare, read_results_csv, results_markdown, write_results_csv

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
    plot_compare(rows, args.out / "accuracy.png", title="Fashion-MNIST: test accuracy (mean of the last 5 epochs)")
    plot_gdw_weights(args.out)
    print(text)


def plot_gdw_weights(out: Path) -> None:
    """Weights of clean vs mislabelled examples under GDW, and one noisy
    example's class-level weights next to its instance-level weight."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = out / "uniform0.4_none_gdw_s0"
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
           title="GDW, Fashion-MNIST, uniform 40% noise, seed 0")
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
    keeping the seed-0 uniform:0.4 GDW cell whole for the weight plots."""
    grid.prune(out, spare=["uniform0.4_none_gdw_s0"])


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
