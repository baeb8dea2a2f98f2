"""Finding mislabelled examples: one GDW / MW-Net run against cleanlab with
K-fold cross-validated probabilities, on Fashion-MNIST with injected noise.

Run from the repository root (cleanlab is in the ``bench`` extra)::

    python benchmarks/label_issues.py                 # 30 epochs, full data: hours on 2 CPU cores
    python benchmarks/label_issues.py --quick         # 3 epochs on 3000 examples: a smoke test
    python benchmarks/label_issues.py --epochs 30 --noise flip:0.4 --methods gdw --out bench.md

For every noise setting (default ``uniform:0.4`` and ``flip:0.4``, seed 0):

* ``gdw`` / ``mwnet``: one ``gdw.train.train`` run (MLP, the package's default
  optimiser: SGD 0.1, momentum 0.9, weight decay 5e-4, cosine decay, batch
  100, 100 clean meta examples per class); its ``label_issues.csv`` is the
  ranking. Time: the run's training-loop seconds (``summary.json``).
* ``cleanlab``: the same MLP and optimiser trained with plain cross-entropy
  on K-1 folds of the same noisy training set (the meta examples are not in
  it), predicting the held-out fold, K = 5 (stratified by the noisy label).
  The ranking is ``cleanlab.rank.get_label_quality_scores`` (self-confidence,
  lower = worse); the flagged set is ``cleanlab.filter.find_label_issues``
  (defaults). Time: the K trainings plus cleanlab's own seconds.

Reported: AUROC of the ranking against the true noise mask, precision and
recall of its top k with k = the true number of mislabelled examples (equal
to each other by construction), precision / recall of the flagged set and
its size, and training time. The Markdown table goes to stdout (and
``--out``), with the command and the date.

How the label-issue score of ``gdw train`` was chosen (scikit-learn digits,
MLP, 30 epochs, noise 40%, 1338 training examples, 10 meta per class)::

    gdw train --dataset digits --meta-per-class 10 --noise {uniform,flip}:0.4 \
              --method {gdw,l2rw,dm,mwnet,ce} --epochs 30 --seed {0,1}
    # with the recorder keeping every epoch's per-example means, so that
    # windows (last 1/5/10/15/all epochs) and the scores of gdw.detect.SCORES
    # could be compared afterwards; chosen on seed 0, checked on seed 1

AUROC, seed 0 (selection) / seed 1 (held out), mean of uniform:0.4 and flip:0.4:

    method  window    1−p̄ (chosen)   −weight        rank-avg of both
    gdw     all 30    0.991 / 0.991   0.958 / 0.939  0.991 / 0.992
    gdw     last 5    0.960 / 0.964   0.885 / 0.876  0.951 / 0.962
    l2rw    all 30    0.999 / 0.999   0.880 / 0.907  0.980 / 0.986
    l2rw    last 5    0.998 / 0.998   0.950 / 0.962  0.988 / 0.990
    dm      all 30    0.965 / 0.947   0.389 / 0.378  0.787 / 0.748
    mwnet   all 30    0.855 / 0.843   0.791 / 0.281  0.831 / 0.560
    mwnet   last 5    0.744 / 0.704   0.741 / 0.690  0.743 / 0.699
    ce      all 30    0.843 / 0.846   –              –
    ce      last 5    0.687 / 0.703   –              –
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from types import SimpleNamespace

import torch

from gdw import make
from gdw.compare import run_cell
from gdw.data import prepare
from gdw.data.split import Split
from gdw.detect import auroc, evaluate, load_issues, precision_recall_at
from gdw.models import create_model
from gdw.fit import fit, predict_proba
from gdw.train import TrainConfig

DATASET = "fashion-mnist"


def quick_dataset(n_train: int, n_test: int, folder: Path) -> str:
    """A stratified subset of Fashion-MNIST as an npz dataset (for --quick)."""
    data = prepare(DATASET, noise="none", meta_per_class=0, seed=0)
    rng = np.random.default_rng(0)

    def pick(split, n):
        labels = split.labels.numpy()
        keep = np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), n // len(data.classes), replace=False)
                                       for c in range(len(data.classes))]))
        x = split.store.x[torch.as_tensor(split.index.numpy()[keep])].numpy()
        return x, labels[keep]

    x_train, y_train = pick(data.train, n_train)
    x_test, y_test = pick(data.test, n_test)
    path = folder / "fashion-mnist-subset.npz"
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, classes=np.array(data.classes))
    return f"npz:{path}"


def train_ce(split: Split, input_shape, C: int, epochs: int, seed: int, batch_size: int = 100) -> torch.nn.Module:
    """The MLP trained with plain CE and the optimiser settings of ``gdw train``, through ``gdw.fit``."""
    torch.manual_seed(seed)
    model = create_model("mlp", input_shape, C)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    fit(model, make("ce", model, C), SimpleNamespace(train=split, meta=None), opt, epochs=epochs, lr=0.1,
        batch_size=batch_size, seed=seed)
    return model


def predict(model, split: Split) -> np.ndarray:
    return predict_proba(model, split, 1000).cpu().numpy()


def cleanlab_row(dataset, noise, seed, epochs, folds) -> dict:
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores
    from sklearn.model_selection import StratifiedKFold

    data = prepare(dataset, noise=noise, seed=seed)  # same split, labels and meta removal as the gdw runs
    tr = data.train
    labels = tr.labels.numpy()
    noisy = labels != tr.true_labels.numpy()
    probs = np.zeros((len(tr), data.num_classes), dtype=np.float32)
    t0 = time.perf_counter()
    for fold, (fit, held) in enumerate(StratifiedKFold(folds, shuffle=True, random_state=seed).split(labels, labels)):
        part = lambda pos: Split("fold", tr.store, tr.index.numpy()[pos], labels[pos], None, tr.view)  # noqa: E731
        model = train_ce(part(fit), data.input_shape, data.num_classes, epochs, seed + fold)
        probs[held] = predict(model, part(held))
        print(f"  cleanlab fold {fold + 1}/{folds} done", file=sys.stderr, flush=True)
    quality = get_label_quality_scores(labels, probs)  # self-confidence: low = likely wrong
    mask = find_label_issues(labels, probs)
    seconds = time.perf_counter() - t0
    score = 1.0 - quality
    order = np.argsort(-score, kind="stable")
    k = int(noisy.sum())
    p_k, r_k = precision_recall_at(order, noisy, k)
    n_flag = int(mask.sum())
    return {"method": f"cleanlab ({folds}-fold CE)", "auroc": auroc(score, noisy), "precision_at_k": p_k, "recall_at_k": r_k,
            "num_flagged": n_flag, "precision_flagged": float(noisy[mask].mean()) if n_flag else float("nan"),
            "recall_flagged": float(mask[noisy].mean()), "n_noisy": k, "n": len(labels), "seconds": seconds,
            "trainings": folds}


def gdw_row(dataset, noise, seed, epochs, method, out: Path) -> dict:
    run = out / f"{noise.replace(':', '')}-{method}-s{seed}"
    cfg = TrainConfig(dataset=dataset, noise=noise, method=method, model="mlp", epochs=epochs, seed=seed,
                      out=str(run), progress=False)
    summary, _ = run_cell(cfg, log=lambda line: print("  " + line, file=sys.stderr, flush=True))
    m = evaluate(load_issues(run))
    return {"method": f"{method} (1 run)", **m, "seconds": summary["train_seconds"], "trainings": 1,
            "test_accuracy": summary["final_test_accuracy"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=30, help="epochs of every training (default 30, as in the paper)")
    ap.add_argument("--quick", action="store_true", help="3 epochs on a 3000-example subset (smoke test)")
    ap.add_argument("--noise", default="uniform:0.4,flip:0.4", help="comma-separated noise specs")
    ap.add_argument("--methods", default="gdw,mwnet", help="gdw methods to run once each (comma-separated)")
    ap.add_argument("--folds", type=int, default=5, help="K of cleanlab's cross-validation (default 5)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", help="where the gdw run directories go (default: a temporary folder)")
    ap.add_argument("--out", help="also write the Markdown table here")
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    tmp = tempfile.TemporaryDirectory(prefix="gdw-label-issues-")
    runs = Path(args.runs) if args.runs else Path(tmp.name)
    epochs = 3 if args.quick and args.epochs == 30 else args.epochs
    dataset = quick_dataset(3000, 1000, Path(tmp.name)) if args.quick else DATASET
    rows = []
    for noise in [s.strip() for s in args.noise.split(",") if s.strip()]:
        for method in [s.strip() for s in args.methods.split(",") if s.strip()]:
            print(f"{noise}: {method}", file=sys.stderr, flush=True)
            rows.append({"noise": noise, **gdw_row(dataset, noise, args.seed, epochs, method, runs)})
        print(f"{noise}: cleanlab", file=sys.stderr, flush=True)
        rows.append({"noise": noise, **cleanlab_row(dataset, noise, args.seed, epochs, args.folds)})
    n = rows[0]["n"] if rows else 0
    lines = [
        f"Label-issue detection on {'a 3000-example subset of ' if args.quick else ''}Fashion-MNIST "
        f"({n} noisy training examples), MLP, {epochs} epochs per training, seed {args.seed}",
        "",
        f"`{' '.join(shlex.quote(a) for a in ['python', 'benchmarks/label_issues.py', *(sys.argv[1:] if argv is None else argv)])}`"
        f" — {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "",
        "| noise | method | trainings | AUROC | precision@k | recall@k | k (true mislabelled) | flagged | flagged precision | flagged recall | training time (s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['noise']} | {r['method']} | {r['trainings']} | {r['auroc']:.4f} | {r['precision_at_k']:.4f} | "
                     f"{r['recall_at_k']:.4f} | {r['n_noisy']} | {r['num_flagged']} | {r['precision_flagged']:.4f} | "
                     f"{r['recall_flagged']:.4f} | {r['seconds']:.1f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
