"""Where GDW's gap to CE on the fine-food reviews comes from: one change at a time.

    OMP_NUM_THREADS=1 python benchmarks/reviews_probe.py &   # once per core: the processes share the cells
    OMP_NUM_THREADS=1 python benchmarks/reviews_probe.py &
    python benchmarks/reviews_probe.py --report               # results.csv and results.md from what finished

On the reviews (real labels, 65% / 35%) the suite has GDW's default below CE
without added noise and at 10% uniform noise. This probe changes one thing
at a time, to see which of GDW's parts the gap comes from. It decides
nothing: no default changes on it (a change is decided by a question of
``design_study.py``, on validation accuracy, with its rule written first).

Two parts, both on the suite's reviews regime (``robustness.py``):

- **Probe** (``PROBES``): the design study's protocol (40 epochs, a meta set of
  50 per class in the training labels' shares, a validation split of 50 per
  class taken out of the training data) on seeds 40 to 45, which no question
  or grid uses, under no added noise, uniform 10% and 20%, and flip 40% (the
  heavy setting, to see what a change gives up). Candidates: ``ce``,
  ``gdw`` (the default), and the default with one change: no cap on the
  instance weights (``max_weight=inf``), one for every kept example
  (``weight_norm=binary``), no logit adjustment (``tau=0``), no fine-tuning
  phase (``finetune_fraction=0``), weights mixed with plain training's
  (``shrink=0.3``), the held-out check on the meta batch (``guard=0.05``);
  and ``ce`` and ``gdw`` with a meta set of 150 per class (``-meta150``: 300
  of the 4,000 training reviews instead of 100; CE loses them from training
  as GDW does).
- **As a user** (``USER``): ``gdw train`` with its own defaults,
  ``--model mlp --epochs 20`` (the meta set gdw draws by default: 100 per
  class, at most a tenth of the rarest class, no validation split), seeds 0
  to 5, CE against GDW (and ``gdw-auto``, the default before design
  question 18, without ``plain_below``, and ``gdw-cap1``, the default with the
  cap of 1 everywhere, before design question 14), under no added noise and uniform
  10% and 20%, on
  the reviews and on the design study's two regimes with a natural class
  prior written in (``prior-tabular``, ``prior-fashion-mnist-5k``: 2.5 : 1
  from the first class to the last, in training and test alike).

Reported: test accuracy and balanced accuracy (%, mean of the last 5 epochs,
mean ± standard error over the six seeds) and, for the probe, validation
accuracy (its split holds 100 reviews, so it is noisy).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from gdw.io import atomic_path, atomic_write
from gdw.variants import CAPPED as DEFAULT  # gdw's default when the probe ran (the cap of 1, before design question 14)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import design_study as ds  # noqa: E402
import grid  # noqa: E402
import robustness as rb  # noqa: E402

REGIME = "reviews"
# label -> ((gdw method, method_args, head_only), other TrainConfig settings)
PROBES = {
    "ce": (("ce", {}, False), {}),
    "gdw": (("gdw", dict(DEFAULT), False), {}),
    "gdw max_weight=inf": (("gdw", {**DEFAULT, "max_weight": math.inf}, False), {}),
    "gdw weight_norm=binary": (("gdw", {**DEFAULT, "weight_norm": "binary"}, False), {}),
    "gdw tau=0": (("gdw", {**DEFAULT, "tau": 0.0}, False), {}),
    "gdw finetune_fraction=0": (("gdw", {**DEFAULT, "finetune_fraction": 0.0}, False), {}),
    "gdw shrink=0.3": (("gdw", {**DEFAULT, "shrink": 0.3}, False), {}),
    "gdw guard=0.05": (("gdw", {**DEFAULT, "guard": 0.05}, False), {}),
    "ce-meta150": (("ce", {}, False), {"meta_per_class": 150}),
    "gdw-meta150": (("gdw", dict(DEFAULT), False), {"meta_per_class": 150}),
}
PROBE_SETTINGS = [("none", "none"), ("uniform:0.1", "none"), ("uniform:0.2", "none"), ("flip:0.4", "none")]
PROBE_SEEDS = [40, 41, 42, 43, 44, 45]
# the method by its name, at its defaults; gdw-cap1: the default before design question 14 (its runs were made as gdw)
# gdw-auto: the default from question 14 to question 18 (its runs were made as gdw too)
USER = {"ce": ("ce", {}, False), "gdw": ("gdw", {}, False), "gdw-auto": ("gdw", {"plain_below": 0.0}, False),
        "gdw-cap1": ("gdw", {"max_weight": 1.0, "plain_below": 0.0}, False)}
USER_SETTINGS = [("none", "none"), ("uniform:0.1", "none"), ("uniform:0.2", "none")]
USER_SEEDS = [0, 1, 2, 3, 4, 5]
USER_EPOCHS = 20
USER_REGIMES = [REGIME, *ds.PRIOR_REGIMES]
DEFAULT_OUT = Path(__file__).parent / "results" / "reviews-probe"


def slug(label: str) -> str:
    return label.replace(" ", "_").replace("=", "")


def cells(datas: dict) -> list[tuple[str, object]]:
    """``(run directory, TrainConfig)`` of every cell: the probe's, then the
    user's; ``datas``: regime -> ``(dataset, meta_per_class)``."""
    dataset, meta = datas[REGIME]
    todo = []
    for seed in PROBE_SEEDS:
        for noise, imbalance in PROBE_SETTINGS:
            for label, (method, extra) in PROBES.items():
                cfg = grid.cell_config(dataset, meta, noise, imbalance, method, seed, rb.EPOCHS, None,
                                       val_per_class=meta)
                todo.append((f"probe/{noise.replace(':', '')}_{slug(label)}_s{seed}", replace(cfg, **extra)))
    for regime in USER_REGIMES:
        for seed in USER_SEEDS:
            for noise, imbalance in USER_SETTINGS:
                for label, method in USER.items():
                    cfg = grid.cell_config(*datas[regime], noise, imbalance, method, seed, USER_EPOCHS, None)
                    cfg = replace(cfg, meta_per_class=None)  # gdw's own draw
                    todo.append((f"user/{regime}/{noise.replace(':', '')}_{label}_s{seed}", cfg))
    return todo


def run(args) -> list:
    datas = {r: ds.prepare(r, args.data, args.out) for r in dict.fromkeys([REGIME, *USER_REGIMES])}
    return grid.run_grid(args.out, cells(datas), args.shard, keep_going=True, verify=True)


def _label(run_dir: str, part: str) -> str:
    name = run_dir.split("/")[-1].rsplit("_s", 1)[0].split("_", 1)[1]
    table = PROBES if part == "probe" else USER
    return next(k for k in table if slug(k) == name)


def table(rows: list[dict], part: str, settings, labels, keys) -> str:
    """Markdown: one row per label, one column per setting and key, the
    mean ± standard error over seeds (%) of the runs under ``part/``."""
    from gdw.report import setting_label

    got = {}
    for r in rows:
        if r["run_dir"].startswith(part + "/"):
            got.setdefault(((r["noise"], r["imbalance"]), r["method"]), []).append(r)
    heads = {"final_test_accuracy": "test", "final_test_balanced_accuracy": "balanced",
             "final_val_accuracy": "validation"}
    lines = ["| candidate | " + " | ".join(f"{setting_label(*s).replace('none + ', '')} · {heads[k]}"
                                          for s in settings for k in keys) + " |",
             "|---|" + "---:|" * (len(settings) * len(keys))]
    for label in labels:
        cells_ = []
        for s in settings:
            for k in keys:
                v = [100 * float(r[k]) for r in got.get((s, label), []) if r.get(k) not in (None, "")]
                cells_.append(f"{np.mean(v):.2f} ± {np.std(v, ddof=1) / np.sqrt(len(v)):.2f}" if len(v) > 1
                              else (f"{v[0]:.2f}" if v else "–"))
        lines.append(f"| {label} | " + " | ".join(cells_) + " |")
    return "\n".join(lines) + "\n"


def report(args) -> str:
    from gdw.report import write_results_csv

    rows = []
    for part in ("probe", "user"):
        rows += [{**r, "method": _label(r["run_dir"], part)}
                 for r in grid.finished_rows(args.out, pattern=f"{part}/{'*/' * (part == 'user')}*/summary.json")]
    if not rows:
        print("no finished cells yet")
        return ""
    with atomic_path(args.out / "results.csv") as tmp:
        write_results_csv(rows, tmp, extra_fields=["final_val_accuracy"])
    n_probe = len(PROBE_SEEDS) * len(PROBE_SETTINGS) * len(PROBES)
    n_user = len(USER_SEEDS) * len(USER_SETTINGS) * len(USER) * len(USER_REGIMES)
    done = {p: sum(r["run_dir"].startswith(p + "/") for r in rows) for p in ("probe", "user")}
    md = "\n".join([
        "# The fine-food reviews: where GDW's gap to CE comes from\n",
        "One change at a time; a look, not a decision (see the docstring of `benchmarks/reviews_probe.py`). "
        "Mean ± standard error over seeds of the last-5-epoch accuracy (%).\n",
        f"## Probe: the design study's protocol, seeds {PROBE_SEEDS[0]} to {PROBE_SEEDS[-1]} "
        f"({done['probe']} of {n_probe} runs)\n",
        table(rows, "probe", PROBE_SETTINGS, list(PROBES), ["final_test_accuracy", "final_test_balanced_accuracy"]),
        "Validation accuracy (100 reviews, drawn in the training labels' shares):\n",
        table(rows, "probe", PROBE_SETTINGS, list(PROBES), ["final_val_accuracy"]),
        f"## As a user runs it: `gdw train` at its defaults, `--model mlp --epochs {USER_EPOCHS}`, seeds "
        f"{USER_SEEDS[0]} to {USER_SEEDS[-1]} ({done['user']} of {n_user} runs)\n",
        *[f"### {regime}\n\n" + table(rows, f"user/{regime}", USER_SETTINGS, list(USER),
                                       ["final_test_accuracy", "final_test_balanced_accuracy"])
          for regime in USER_REGIMES],
        "## Provenance\n",
        grid.provenance(args.out, "python benchmarks/reviews_probe.py", pattern="**/config.json",
                        note=" (in any number of processes at once; `--report` writes this file)"),
    ])
    atomic_write(args.out / "results.md", md)
    return md


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the probe's directory (default: %(default)s)")
    p.add_argument("--data", type=Path, default=rb.DEFAULT_DATA, help="where the regimes' npz files are")
    p.add_argument("--shard", type=lambda s: tuple(int(v) for v in s.split("/")), default=(0, 1))
    p.add_argument("--report", action="store_true", help="only tabulate what has finished")
    p.add_argument("--prune", action="store_true", help="delete all but summary, metrics and config of finished cells")
    args = p.parse_args(argv)
    return grid.run_and_report(args, run, report)


if __name__ == "__main__":
    sys.exit(main())
