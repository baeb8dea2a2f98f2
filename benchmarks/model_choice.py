"""Which model ``gdw predict`` should use: the final one, best.pt, or best.pt only when it clearly wins.

    python benchmarks/model_choice.py                       # over the design study's runs (13 and 50 per class)
    python benchmarks/model_choice.py --out DIR             # any grid whose runs had a validation split
    OMP_NUM_THREADS=1 python benchmarks/model_choice.py --train --out benchmarks/results/model-choice
        # digits, the suite's seven settings, ce and gdw, seeds 0-3, 5 and 10 validation examples per class

For every finished run with a validation split under ``--out``, from its
``metrics.jsonl``: the test accuracy of the final model (the last epoch),
of the epoch with the best validation accuracy (``best.pt``, the first of
equals), and of ``gdw predict``'s choice (``gdw.predict.best_or_final``:
best.pt only when its validation accuracy beats the final model's by more
than twice the standard error of an accuracy on the validation split). Prints the mean of
each over the runs, and how often the rule took best.pt, per validation
size (examples per class); ``results.csv`` under ``--out`` has one row per
run.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from gdw.predict import best_or_final


def choices(run: Path) -> dict | None:
    """``{"final", "best", "rule"}`` test accuracies of one run, plus
    ``val_per_class`` and ``took_best``; None without a validation split."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    config = json.loads((run / "config.json").read_text())
    vals = [r.get("val_accuracy") for r in rows]
    n = int((config.get("data") or {}).get("n_val") or 0)
    if not rows or vals[-1] is None or n == 0:
        return None
    choice, k, _ = best_or_final(vals, n)
    took = choice == "best"
    final, best = rows[-1]["test_accuracy"], rows[k]["test_accuracy"]
    return {"run_dir": str(run), "final": final, "best": best, "rule": best if took else final, "took_best": took,
            "val_per_class": config.get("val_per_class")}


def train(out: Path) -> None:
    """The small validation splits the design study lacks: digits, every
    setting of the suite, ce and gdw, seeds 0-3, 5 and 10 per class."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import grid
    import robustness as rb

    dataset, meta = rb.prepare_regime("digits", rb.DEFAULT_DATA, out)
    todo = [(f"val{size}/{rb.run_dir_name('digits', noise, imbalance, label, seed).split('/', 1)[1]}",
             rb.cell_config(dataset, meta, noise, imbalance, rb.METHODS[label], seed, rb.EPOCHS, None,
                            val_per_class=size))
            for size in (5, 10) for seed in range(4) for noise, imbalance in rb.SETTINGS for label in ("ce", "gdw")]
    grid.run_grid(out, todo, keep_going=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "design")
    p.add_argument("--train", action="store_true", help="train the digits runs with 5 and 10 per class first")
    args = p.parse_args(argv)
    if args.train:
        train(args.out)
    groups = defaultdict(list)
    for summary in sorted(args.out.glob("**/summary.json")):
        got = choices(summary.parent)
        if got is not None:
            groups[got["val_per_class"]].append(got)
    if not groups:
        print(f"no finished run with a validation split under {args.out}")
        return 1
    with open(args.out / "results.csv", "w", newline="") as f:  # one row per run: the summary kept in git
        w = csv.DictWriter(f, fieldnames=["run_dir", "val_per_class", "final", "best", "rule", "took_best"])
        w.writeheader()
        for runs in groups.values():
            w.writerows({**r, "run_dir": str(Path(r["run_dir"]).relative_to(args.out))} for r in runs)
    print("| validation examples per class | runs | final model | best.pt | rule | rule took best.pt |")
    print("|---|---:|---:|---:|---:|---:|")
    for size, runs in sorted(groups.items()):
        mean = {k: 100 * float(np.mean([r[k] for r in runs])) for k in ("final", "best", "rule")}
        print(f"| {size} | {len(runs)} | {mean['final']:.2f} | {mean['best']:.2f} | {mean['rule']:.2f} | "
              f"{sum(r['took_best'] for r in runs)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
