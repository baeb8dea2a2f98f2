"""Fully out-of-sample label issues by cross-fitting (``gdw detect --folds N``).

N runs, each with one fold of the training rows left out (``holdout="K/N"``,
the folds dealt by given label with the run's seed), so every training row is
predicted by a model that never trained on it. The rows' probabilities, and
the clean validation split's from every fold's model (it is never trained
on, so it shows the models' own mistakes where labels are right), go to
:func:`gdw.find_label_issues`. Cost: N trainings on (N−1)/N of the rows.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from .detect import CSV_NAME, EVIDENCE_NAME, auroc, issues_table, write_csv
from .errors import UserError
from .issues import find_label_issues
from .train import TrainConfig, default_out, train


def cross_fit(cfg: TrainConfig, folds: int, log=print) -> dict:
    """Train ``folds`` runs under ``cfg.out`` (``fold0`` ...), write
    ``label_issues.csv`` there (the columns of a run's), and return what :func:`gdw.find_label_issues`
    found with the rows' ids: ``{"issues", "rows", "true", "clean", "csv"}``
    (``true``: the true labels where known, else -1; ``clean``: whether a
    validation split corrected the estimate)."""
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise UserError(f"--folds must be a whole number >= 2, got {folds!r}")
    if cfg.holdout is not None:
        raise UserError("--folds sets --holdout itself; give one or the other")
    root = Path(cfg.out)
    parts = []
    for k in range(folds):
        run = root / f"fold{k}"
        log(f"gdw detect: fold {k + 1} of {folds} → {run}")
        train(dataclasses.replace(cfg, out=str(run), holdout=f"{k}/{folds}"), log=lambda *a, **kw: None)
        with np.load(run / EVIDENCE_NAME) as z:
            parts.append({key: z[key] for key in z.files if key.startswith(("holdout_", "val_"))})
    cat = {key: np.concatenate([p[key] for p in parts]) for key in parts[0] if all(key in p for p in parts)}
    rows, labels, probs = cat["holdout_source_rows"], cat["holdout_given"], cat["holdout_prob"].astype(np.float64)
    clean = ({"clean_labels": cat["val_given"], "clean_pred_probs": cat["val_prob"].astype(np.float64)}
             if "val_prob" in cat else {})  # the clean validation split, as each fold's model sees it
    classes = [str(c) for c in json.loads((root / "fold0" / "config.json").read_text())["classes"]]
    found = find_label_issues(labels, probs, class_names=classes, **clean)
    suggested = np.where(found.flagged, found.suggested, labels)  # as in a run's label_issues.csv
    write_csv(root / CSV_NAME, issues_table(labels, suggested, found.score, classes, rows))
    return {"issues": found, "rows": rows, "true": cat["holdout_true"], "clean": bool(clean), "csv": root / CSV_NAME}


def detect_folds(cfg: TrainConfig, folds: int) -> int:
    """``gdw detect --folds N``: :func:`cross_fit` under ``cfg.out`` (default a fresh
    folder under ``runs/``), then the estimate, the flagged count and, where the true
    labels are known (injected noise), how well the flagged set finds them."""
    cfg.out = cfg.out or str(default_out(cfg))
    got = cross_fit(cfg.validate(), folds)
    found, known = got["issues"], got["true"] >= 0
    lo, hi = found.noise_interval
    how = "corrected by the validation split" if got["clean"] else "no --val-per-class: every disagreement counts"
    print(f"estimated wrong labels: {100 * found.noise_rate:.1f}% of {len(found.labels)} training rows "
          f"(bootstrap interval {100 * lo:.1f}–{100 * hi:.1f}%; {how})")
    print(f"flagged {int(found.flagged.sum())}; every row scored out of sample by {folds} runs → {got['csv']}")
    if known.all():
        wrong, f = found.labels != got["true"], found.flagged
        print(f"against the true labels ({int(wrong.sum())} wrong): AUROC {auroc(found.score, wrong):.4f}, flagged "
              f"precision {wrong[f].mean() if f.any() else float('nan'):.4f}, recall {f[wrong].mean():.4f}")
    return 0
