"""No clean set: the meta set drawn from labels that are as noisy as the training labels.

    OMP_NUM_THREADS=1 python benchmarks/no_clean_set.py &   # once per core: the processes share the cells
    OMP_NUM_THREADS=1 python benchmarks/no_clean_set.py &
    python benchmarks/no_clean_set.py --report               # results.csv and results.md from what finished

The robustness suite draws its meta set by the true labels (the noise is
injected after the draw), so it shows the methods with a clean set. Most
users have none: their labels are already noisy and ``gdw train`` draws the
meta set from them (it warns that the set may hold label errors). This
grid writes each regime's training labels with the noise already in them
(``gdw.data.apply_noise`` on the true labels, one fixed draw per regime and
noise; the file has no true labels), so the meta set gdw draws (50 per
class, 13 on digits) is exactly as noisy as the training set. Regimes
``digits``, ``tabular`` and ``fashion-mnist-5k`` of the suite, noise
``uniform:0.2``, ``uniform:0.4``, ``flip:0.2`` and ``flip:0.4``, methods
``ce``, ``dm`` (no meta set) and ``gdw`` (its defaults), seeds 0 and 1, the
suite's hyper-parameters (40 epochs). Test accuracy (%, the test labels are
the clean ones), mean of the last 5 epochs, mean ± std over seeds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grid  # noqa: E402
import robustness as rb  # noqa: E402

REGIMES = ["digits", "tabular", "fashion-mnist-5k"]
NOISES = ["uniform:0.2", "uniform:0.4", "flip:0.2", "flip:0.4"]
METHODS = ["ce", "dm", "gdw"]
SEEDS = [0, 1]
DEFAULT_OUT = Path(__file__).parent / "results" / "no-clean-set"


def noisy_file(regime: str, noise: str, data_dir: Path, out: Path) -> tuple[Path, int, float]:
    """``(npz path, meta_per_class, realised noise rate)``: the regime's data
    with ``noise`` written into its training labels (no true labels kept),
    made once under ``data_dir/no-clean-set``."""
    from gdw.data.noise import apply_noise
    from gdw.data.sources import load_source

    dataset, meta = rb.prepare_regime(regime, data_dir, out)
    src = load_source(dataset)
    x, y = src.x_train.x.numpy(), np.asarray(src.y_train)
    noisy, _ = apply_noise(y, len(src.classes), noise, np.random.default_rng([REGIMES.index(regime), 7]))
    path = data_dir.expanduser().resolve() / "no-clean-set" / f"{regime}_{noise.replace(':', '')}.npz"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        rb._write_npz(path, {"x_train": x, "y_train": noisy, "x_test": src.x_test.x.numpy(),
                             "y_test": np.asarray(src.y_test), "classes": np.asarray(src.classes)})
    return path, meta, float(np.mean(noisy != y))


def run(args) -> list:
    todo = []
    for regime in REGIMES:
        for noise in NOISES:
            path, meta, _ = noisy_file(regime, noise, args.data, args.out)
            for seed in SEEDS:
                for method in METHODS:
                    cfg = grid.cell_config(f"npz:{path}", meta, "none", "none", rb.METHODS[method], seed, args.epochs,
                                           args.device)
                    todo.append((f"{regime}/{noise.replace(':', '')}_{method}_s{seed}", cfg))
    return grid.run_grid(args.out, todo, args.shard, keep_going=True)


def report(args) -> str:
    from gdw.report import write_results_csv

    rows = grid.finished_rows(args.out, pattern="*/*/summary.json")
    if not rows:
        print("no finished cells yet")
        return ""
    write_results_csv(rows, args.out / "results.csv")
    acc = {}
    for r in rows:
        regime, cell = r["run_dir"].split("/")
        acc.setdefault((regime, cell.split("_")[0], r["method"]), []).append(100 * float(r["final_test_accuracy"]))
    lines = ["| regime · noise in the given labels | realised % | " + " | ".join(METHODS) + " | gdw − ce |",
             "|---|---:|" + "---:|" * (len(METHODS) + 1)]
    for regime in REGIMES:
        for noise in NOISES:
            got = [acc.get((regime, noise.replace(":", ""), m), []) for m in METHODS]
            rate = noisy_file(regime, noise, args.data, args.out)[2]
            cells = [f"{np.mean(g):.2f} ± {np.std(g):.2f}" if g else "–" for g in got]
            diff = f"{np.mean(got[2]) - np.mean(got[0]):+.2f}" if got[0] and got[2] else "–"
            lines.append(f"| {regime} · {noise} | {100 * rate:.1f} | " + " | ".join(cells) + f" | {diff} |")
    md = "\n".join([
        "# No clean set: the meta set drawn from the noisy labels\n",
        __doc__.split("\n\n", 2)[1].replace("\n", " ") + "\n",
        "Test accuracy (%), mean of the last 5 epochs, mean ± std over seeds 0 and 1:\n",
        "\n".join(lines) + "\n",
        "## Provenance\n",
        grid.provenance(args.out, "python benchmarks/no_clean_set.py", pattern="*/*/config.json"),
    ])
    (args.out / "results.md").write_text(md)
    return md


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--data", type=Path, default=rb.DEFAULT_DATA, help="where the regimes' npz files are kept")
    p.add_argument("--shard", type=lambda s: tuple(int(v) for v in s.split("/")), default=(0, 1))
    p.add_argument("--epochs", type=int, default=rb.EPOCHS)
    p.add_argument("--device", default=None)
    p.add_argument("--report", action="store_true", help="only write results.csv and results.md")
    p.add_argument("--prune", action="store_true", help="report, then drop checkpoints and arrays of finished cells")
    return grid.run_and_report(p.parse_args(argv), run, report)


if __name__ == "__main__":
    sys.exit(main())
