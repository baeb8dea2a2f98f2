"""Which labels are wrong? Label issues as a by-product of one training run.

During ``gdw train`` a :class:`gdw.recorder.LabelIssueRecorder` averages, for
every training example over the run, the model's probabilities from the
forward passes that trained on it (no extra pass) and what the method did
with it (``Stats.trust``; for class-level methods such as GDW the weight of
every class). At the end it writes ``label_issues.csv`` (:func:`issues_table`:
one row per example, most suspicious first, in the user's terms) and
``label_evidence.npz`` (the averaged evidence in training-position order, so
that another ranking, e.g. the candidates of ``benchmarks/label_issues.py``,
can be computed without training again).

The score, for every method: ``score = log p̄_k − log p̄_y``
(:func:`gdw.issues.label_score`), where ``p̄`` are the model's probabilities
for the example averaged over all steps of the run (in-sample, in the spirit
of "area under the margin"), ``y`` its *given* label and ``k`` its likeliest
other class: the log-odds of the label's strongest rival. What makes it a
good detector is the method: a weighted method (GDW, L2RW, DM) keeps
down-weighting mislabelled examples, so the model never fits them and
``p̄_y`` of a wrong label stays low, whereas plain cross-entropy memorises
them. For CE and the robust losses the same score is the model's own
confidence, and it is much weaker.

Why this score: on scikit-learn digits (40% uniform and 40% flip noise, MLP,
30 epochs) the candidates (``SCORES`` in ``benchmarks/label_issues.py``)
were compared by AUROC, chosen on seed 0 and checked on seed 1 (numbers in
``benchmarks/label_issues.py``). Averaging over the whole run beat the last
1, 5, 10 or 15 epochs for every method (late epochs, with the learning rate
decayed, fit more of the wrong labels). The mean confidence ``1 − p̄_y`` was
the best single rule over all methods; the mean labelled-class weight
(``weight``) ranked worse for every method (GDW 0.94 against 0.99 held out;
DM's emphasis peaks at mid confidence, so its weight even ranks backwards),
and a rank average of the two (``combined``) did not beat confidence. The
log-odds then replaced ``1 − p̄_y`` by the rule of
``benchmarks/issue_score.py`` (default GDW runs on digits, tabular and
Fashion-MNIST-5k at 10–40% noise, 36 runs, seeds 3 and 4): the mean of
flagged precision and recall's smaller one rose from 0.847 to 0.857 (the
tabular cells by 1–4 points), no run's AUROC fell by more than 0.001.
For the methods that fit wrong labels it can rank a little worse (digits,
40% flips: CE and MW-Net 0.70 against 0.72, DM 0.91 against 0.92;
``issue_score.py --other-methods``). The weights are still recorded in
``label_evidence.npz``.

The suggested label is the most likely class other than the given one
(mean probability). For GDW this recovered the true label of 97% of the
mislabelled examples at the top of the ranking, against 88% for the other
class whose weight GDW lowered most and 6% for the one it raised most: GDW
protects the likely true class by *weakening* the push-down on its logit.

How many are flagged: as many as the run estimates to be wrong
(:func:`gdw.find_label_issues`; docs/algorithms.md, section 5c); ``gdw detect
--num-issues N`` overrides it. ``gdw detect`` reads the files
(:func:`load_issues`), prints the top of the ranking and, when the true labels
are known, its precision, recall and AUROC (:func:`evaluate`);
:func:`to_cleanlab` gives the form ``cleanlab.filter.find_label_issues`` returns.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import UserError
from .io import atomic_path
from .issues import top_pairs

WINDOW = None  # epochs averaged: None = every epoch of the run; k = the last min(k, epochs)
CSV_NAME = "label_issues.csv"
TEXT_WIDTH = 80  # characters of a text shown in gdw detect's table
EVIDENCE_NAME = "label_evidence.npz"
CSV_FIELDS = ["index", "given_label", "suggested_label", "score", "is_label_issue"]  # "path" after index for folders,
# "split" (train / test) when a test split of the user's own labels is scored too, "text" last for text runs


# ----------------------------------------------------------------------------- scoring

SCORE_NAME = "log_odds"  # the one score (module docstring); runs made before it say "confidence" (1 − p̄)


def score_name(method: str) -> str:
    """The score a run of ``method`` ranks by (the same for every method)."""
    return SCORE_NAME


# ----------------------------------------------------------------------------- files

def issues_table(given, suggested, score, classes, rows, paths=None, texts=None) -> list[dict]:
    """The label-issue table in the user's terms, most suspicious first (ties:
    training order): ``index`` (the user's row, see :func:`source_of`),
    ``path`` (image folders only), ``given_label`` and ``suggested_label``
    (the user's label values), ``score`` (higher = more suspicious; compare
    within one run only), ``is_label_issue`` (the examples the run flags;
    their suggested label differs from the given one) and ``text`` (text runs only)."""
    order = np.argsort(-np.asarray(score), kind="stable")
    table = []
    for i in order:
        row = {"index": int(rows[i]), **({"path": paths[i]} if paths is not None else {}),
               "given_label": str(classes[int(given[i])]), "suggested_label": str(classes[int(suggested[i])]),
               "score": float(score[i]), "is_label_issue": bool(suggested[i] != given[i])}
        table.append(row if texts is None else {**row, "text": texts[i]})
    return table


def write_csv(path, table: list[dict]) -> Path:
    """Write :func:`issues_table`'s rows as CSV, atomically."""
    path = Path(path)
    fields = [f for f in ("index", "path", "given_label", "suggested_label", "score", "is_label_issue", "split", "text")
              if not table or f in table[0]]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for row in table:
            w.writerow({**row, "score": f"{row['score']:.6g}", "is_label_issue": str(row["is_label_issue"]).lower()})
    return path


def read_label_issues(run_dir) -> list[dict]:
    """The rows of a run's ``label_issues.csv`` (:func:`issues_table`), for a
    notebook: ``pandas.DataFrame(gdw.read_label_issues("runs/r"))``.
    UserError when the run or its label issues are missing."""
    issues = load_issues(run_dir)
    return issues_table(issues.given, issues.suggested, issues.score, issues.classes, issues.rows, issues.paths,
                        issues.texts)


@dataclass
class Issues:
    """A run's label issues, in training-position order (as ``split.npz``).

    Attributes:
        index: (N,) position in the original training array (split.npz).
        rows: (N,) the user's row of each example (:func:`source_of`).
        paths: the image paths relative to the user's folder, or None.
        given, suggested: (N,) labels.
        score: (N,) higher = more suspicious.
        true: (N,) true labels (-1 unknown) or None when none are known.
        classes: class names.
        method: the run's method.
        run_dir: where it came from.
        score_name: which score ranked it (:data:`SCORE_NAME`; "confidence" in older runs).
    """

    index: np.ndarray
    given: np.ndarray
    suggested: np.ndarray
    score: np.ndarray
    true: Optional[np.ndarray]
    classes: list
    method: str
    run_dir: Path
    score_name: str = "?"
    rows: Optional[np.ndarray] = None
    paths: Optional[list] = None
    noise_rate: Optional[float] = None  # the run's estimate of the share of wrong labels, and its interval
    noise_interval: Optional[tuple] = None
    noise_matrix: Optional[np.ndarray] = None  # C×C estimated rows, given label × likely true class
    noise_caveat: Optional[str] = None  # why the estimate is rough (gdw.issues.estimate_caveat), or None
    test: Optional[dict] = None  # a test split drawn from the user's data: source_rows, given, suggested, score, paths
    texts: Optional[list] = None  # a text run: each example's text (from label_issues.csv)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def order(self) -> np.ndarray:
        """Positions from most to least suspicious."""
        return np.argsort(-self.score, kind="stable")

    @property
    def num_flagged(self) -> int:
        """The run's estimate of the number of issues: suggested ≠ given."""
        return int((self.suggested != self.given).sum())

    @property
    def noisy_mask(self) -> Optional[np.ndarray]:
        """True where the given label is known to be wrong (None if unknown)."""
        if self.true is None:
            return None
        return self.given != self.true

    def class_name(self, c: int) -> str:
        """The class's name (the user's label value), e.g. ``"Dress"`` or ``"30"``."""
        return str(self.classes[c]) if 0 <= c < len(self.classes) else str(c)


def load_issues(run_dir) -> Issues:
    """Read a run's ``label_evidence.npz``, ``split.npz`` and ``config.json``.

    Raises UserError when the directory, the run or its label issues are missing.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"run directory {run} does not exist")
    if not (run / "config.json").is_file() or not (run / "split.npz").is_file():
        raise UserError(f"{run} is not a gdw run directory (no config.json / split.npz)")
    path = run / EVIDENCE_NAME
    if not path.is_file():
        done = (run / "summary.json").is_file()
        raise UserError(f"{run} has no {EVIDENCE_NAME}: "
                        + ("it was trained by a gdw version without label-issue detection; train it again"
                           if done else f"the run has not finished (finish it with gdw train --out {run} --resume)"))
    from .data import load_split

    split = load_split(run / "split.npz")
    try:
        config = json.loads((run / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {run / 'config.json'}: {e}") from None
    try:
        with np.load(path, allow_pickle=False) as z:
            ev = {k: z[k] for k in ("given", "suggested", "score", "source_rows", "source_paths", "score_name")}
            noise = {k: z[k] for k in ("noise_rate", "noise_interval", "noise_matrix", "noise_caveat") if k in z.files}
            test = {k[5:]: z[k] for k in ("test_source_rows", "test_given", "test_suggested", "test_score",
                                          "test_source_paths") if k in z.files}
    except (OSError, KeyError, ValueError) as e:
        raise UserError(f"{path} is not a label-evidence file of this gdw ({type(e).__name__}: {e}); "
                        "train the run again") from None
    train_index = np.asarray(split["train_index"], dtype=np.int64)
    if len(ev["given"]) != len(train_index):
        raise UserError(f"{path} has {len(ev['given'])} examples but the run has {len(train_index)}")
    true = np.asarray(split["train_true_labels"], dtype=np.int64)
    true = true if (true >= 0).any() else None
    paths = [str(p) for p in ev["source_paths"]] if len(ev["source_paths"]) else None
    return Issues(index=train_index, given=ev["given"].astype(np.int64), suggested=ev["suggested"].astype(np.int64),
                  score=ev["score"].astype(np.float64), true=true, classes=list(config.get("classes") or []),
                  method=str(config.get("method", "?")), run_dir=run, score_name=str(ev["score_name"]),
                  rows=ev["source_rows"].astype(np.int64), paths=paths,
                  noise_rate=float(noise["noise_rate"]) if "noise_rate" in noise else None,
                  noise_interval=tuple(map(float, noise["noise_interval"])) if "noise_interval" in noise else None,
                  noise_matrix=noise.get("noise_matrix"), noise_caveat=str(noise.get("noise_caveat", "")) or None,
                  test=test if "score" in test else None,
                  texts=_texts(run / CSV_NAME, ev["source_rows"]))


def _texts(path: Path, rows) -> Optional[list]:
    """The ``text`` of each training row in ``label_issues.csv``, or None (not a text run)."""
    if not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8") as f:
        by_row = {int(r["index"]): r["text"] for r in csv.DictReader(f)
                  if r.get("split", "train") == "train" and "text" in r}
    return [by_row.get(int(i), "") for i in rows] if by_row else None


# ----------------------------------------------------------------------------- metrics and cleanlab

def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` for the boolean ``positive``
    (NaN when either class is absent)."""
    from sklearn.metrics import roc_auc_score

    positive = np.asarray(positive, dtype=bool)
    if positive.all() or not positive.any():
        return float("nan")
    return float(roc_auc_score(positive, np.asarray(score, dtype=np.float64)))


def precision_recall_at(order: np.ndarray, positive: np.ndarray, k: int) -> tuple[float, float]:
    """Precision and recall of the first ``k`` positions of ``order``."""
    k = int(min(max(k, 0), len(order)))
    hits = int(np.asarray(positive)[order[:k]].sum())
    total = int(np.asarray(positive).sum())
    return (hits / k if k else float("nan"), hits / total if total else float("nan"))


def evaluate(issues: Issues, num_issues: Optional[int] = None) -> Optional[dict]:
    """Metrics of the ranking against the true noise mask (None if unknown).

    Only examples whose true label is known count. ``suggestion_accuracy``:
    the share of the flagged mislabelled examples whose suggested label is
    the true one.
    """
    if issues.true is None:
        return None
    known = issues.true >= 0
    noisy = (issues.given != issues.true)[known]
    score = issues.score[known]
    order = np.argsort(-score, kind="stable")
    k = int(noisy.sum())
    p_k, r_k = precision_recall_at(order, noisy, k)
    if num_issues is None:  # the run's own flagged set
        flagged = (issues.suggested != issues.given)[known]
        n_flag = int(flagged.sum())
        p_f = float(noisy[flagged].mean()) if n_flag else float("nan")
        r_f = float(flagged[noisy].mean()) if k else float("nan")
    else:
        n_flag = int(num_issues)
        p_f, r_f = precision_recall_at(order, noisy, n_flag)
    hit = noisy & (issues.suggested[known] != issues.given[known])  # mislabelled and flagged
    recovered = float((issues.suggested[known][hit] == issues.true[known][hit]).mean()) if hit.any() else float("nan")
    return {"n": int(known.sum()), "n_noisy": k, "auroc": auroc(score, noisy), "precision_at_k": p_k,
            "recall_at_k": r_k, "num_flagged": n_flag, "precision_flagged": p_f, "recall_flagged": r_f,
            "suggestion_accuracy": recovered}


def to_cleanlab(issues: Issues, num_issues: Optional[int] = None, ranked: bool = False) -> np.ndarray:
    """The output of ``cleanlab.filter.find_label_issues`` for this run.

    Positions refer to the training examples in ``split.npz`` order (the
    ``labels`` array one would give cleanlab: ``split['train_labels']``).
    ``ranked=False``: boolean mask of shape (N,), True for the ``num_issues``
    most suspicious examples (``return_indices_ranked_by=None``).
    ``ranked=True``: int64 positions of those examples, most severe first
    (as with ``return_indices_ranked_by="self_confidence"``).
    ``num_issues`` defaults to the run's flagged set (:attr:`Issues.num_flagged` examples).
    """
    if num_issues is None:  # the run's flagged set, most suspicious first
        flagged = issues.suggested != issues.given
        top = issues.order[flagged[issues.order]].astype(np.int64)
    else:
        if int(num_issues) < 0:
            raise UserError(f"--num-issues must be >= 0, got {num_issues}")
        top = issues.order[: min(int(num_issues), len(issues))].astype(np.int64)
    if ranked:
        return top
    mask = np.zeros(len(issues), dtype=bool)
    mask[top] = True
    return mask


def describe_pairs(issues: Issues, top: int = 3) -> str:
    """``"; most often: given 'A', likely 'B' (120 rows), ..."`` from the
    estimated noise matrix ("" without one)."""
    if issues.noise_matrix is None:
        return ""
    names = [issues.class_name(c) for c in range(len(issues.noise_matrix))]
    parts = [f"given {g!r}, likely {t!r} ({n:.0f} rows)" for g, t, n in top_pairs(issues.noise_matrix, names, top)]
    return "; most often: " + ", ".join(parts) if parts else ""


def format_table(issues: Issues, top: int = 20) -> str:
    """The ``top`` most suspicious examples as an aligned text table."""
    order = issues.order[: max(0, int(top))]
    known = issues.true is not None
    where = issues.rows if issues.rows is not None else issues.index
    head = ["rank", "index"] + (["path"] if issues.paths is not None else []) + ["given", "suggested", "score"] \
        + (["true"] if known else []) + (["text"] if issues.texts is not None else [])
    rows = []
    for r, i in enumerate(order, 1):
        g, s = int(issues.given[i]), int(issues.suggested[i])
        row = [str(r), str(int(where[i]))] + ([issues.paths[i]] if issues.paths is not None else []) + [
            issues.class_name(g), "-" if s == g else issues.class_name(s), f"{issues.score[i]:.4g}"]
        if known:
            t = int(issues.true[i])
            row.append("?" if t < 0 else ("= given" if t == g else issues.class_name(t)))
        if issues.texts is not None:  # one line, at most TEXT_WIDTH characters
            text = " ".join(issues.texts[i].split())
            row.append(text if len(text) <= TEXT_WIDTH else text[:TEXT_WIDTH - 1] + "…")
        rows.append(row)
    widths = [max(len(h), *(len(r[j]) for r in rows)) if rows else len(h) for j, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip(), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)
