"""How many labels are wrong, and which: plain arrays in, ranked rows out.

:func:`find_label_issues` takes the given labels and the predicted class
probabilities of every row (from any model: a gdw run's evidence, or the
user's own loop) and, optionally, the labels and predicted probabilities of
a clean set the model did not train on. It estimates the noise itself, the
number of rows with given label i whose true class is j, and flags that
many rows, the least trusted first.

The estimate. Let C_ij be the number of rows with given label i whose
predicted class (the most likely one) is j, and M_jk the share of clean rows
of true class j predicted as k (the model's own confusion, where the labels
are right). If the model's mistakes depend on the true class only, not on
whether the given label is wrong,

    C = N M,

with N_ij the number of rows with given label i and true class j. So
N̂ = C M⁻¹, clipped at zero and rescaled so that each row of N̂ sums to the
rows with given label i; the share of wrong labels is 1 − trace(N̂) / n.
Without a clean set M is the identity: every disagreement between the model
and a given label counts as a wrong label. That suits probabilities a model
formed without fitting the wrong labels (a weighted method's averaged
training evidence, or held-out predictions) and overestimates by about the
model's own error rate otherwise. The interval is the basic bootstrap
over resamples of both sets' rows: (2r − q97.5, 2r − q2.5), r the estimate
and q the resampled estimates' percentiles, clipped to [0, 1]. (The
resampled estimates lie above r, as a resampled M is noisier and N̂ clipped
at zero rises with M's noise; reflecting them about r undoes that shift.)
It shows the noise of sampling the rows, not the bias of the model
assumption: on the benchmark's default GDW runs it covered the true share
in 12 of 18 runs (seed 0) and 55 of 72 (seeds 1 to 4), the percentile
interval in 10 and 42 (``benchmarks/issue_score.py``).

The flagged set. Within each given class i the rows are ranked by
:func:`label_score`, ``score = log p_k − log p_i`` (p_i the probability the
model gives the given label, p_k the likeliest other class's: the log-odds
of the label's strongest rival), and the round(Σ_{j≠i} N̂_ij) highest are
flagged; the suggested label of a row is that class k. Against ``1 − p_i``
it ranks a row whose missing probability sits on one rival above a row
whose probability is spread over many (a hard example rather than a wrong
label); on two classes the two orders are the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from .errors import UserError


@dataclass
class LabelIssues:
    """What :func:`find_label_issues` found; arrays are indexed by row.

    score: (n,) :func:`label_score`, the log-odds of the likeliest other class
        against the given label; higher = more suspicious, > 0 where another
        class is more likely than the given one.
    flagged: (n,) bool, the rows estimated to be wrong.
    suggested: (n,) the most likely class other than the given label.
    order: (n,) row indices, most suspicious first (flagged rows first).
    noise_rate: estimated share of wrong labels, in [0, 1];
    noise_interval: its nominal 95% basic bootstrap interval (lo, hi), the
        noise of sampling the rows only (module docstring).
    noise_matrix: C×C estimated counts N̂_ij, given label i, true class j.
    """

    labels: np.ndarray
    score: np.ndarray
    flagged: np.ndarray
    suggested: np.ndarray
    order: np.ndarray
    noise_rate: float
    noise_interval: tuple
    noise_matrix: np.ndarray
    class_names: list = field(default_factory=list)

    def rows(self, top: Optional[int] = None, row_ids: Optional[Sequence] = None) -> list[dict]:
        """The ranked table: ``row``, ``given_label``, ``suggested_label``
        (equal to the given one on rows not flagged), ``score``, ``flagged``;
        ``row_ids`` maps positions to the user's own row numbers."""
        names = self.class_names or [str(c) for c in range(self.noise_matrix.shape[0])]
        ids = np.arange(len(self.labels)) if row_ids is None else np.asarray(row_ids)
        return [{"row": ids[i].item(), "given_label": names[int(self.labels[i])],
                 "suggested_label": names[int(self.suggested[i] if self.flagged[i] else self.labels[i])],
                 "score": round(float(self.score[i]), 6), "flagged": bool(self.flagged[i])} for i in self.order[:top]]

    def pairs(self, top: int = 5) -> list[tuple[str, str, float]]:
        """The largest off-diagonal entries of ``noise_matrix``:
        ``(given label, likely true class, estimated rows)``."""
        return top_pairs(self.noise_matrix, self.class_names, top)


def top_pairs(noise_matrix, class_names=None, top: int = 5) -> list[tuple[str, str, float]]:
    """The ``top`` largest off-diagonal entries of an estimated noise matrix (C×C, given
    label × likely true class) of at least half a row: ``(given, likely, rows)``."""
    N = np.array(noise_matrix, dtype=np.float64)
    names = list(class_names or []) or [str(c) for c in range(N.shape[0])]
    np.fill_diagonal(N, 0)
    idx = np.argsort(-N, axis=None, kind="stable")[:top]
    return [(names[i], names[j], float(N[i, j])) for i, j in zip(*np.unravel_index(idx, N.shape)) if N[i, j] >= 0.5]


TINY = 1e-7  # probabilities below this count as this in label_score (the evidence is stored as float16)


def label_score(pred_probs, labels) -> np.ndarray:
    """How much more the model believes each row's likeliest other class than
    its given label: ``log p_k − log p_y`` with k = argmax_{j≠y} p_j,
    probabilities below :data:`TINY` taken as TINY. (n, C) probabilities
    (need not sum to one: the score is a ratio) and (n,) labels → (n,)
    float64; higher = more suspicious, > 0 where another class is more
    likely than the given one. Needs C ≥ 2."""
    p = np.maximum(np.asarray(pred_probs, dtype=np.float64), TINY)
    labels = np.asarray(labels)
    rows = np.arange(len(labels))
    other = p.copy()
    other[rows, labels] = -np.inf
    return np.log(other.max(1)) - np.log(p[rows, labels])


def most_likely_other(probs, labels) -> np.ndarray:
    """The most likely class other than the given label of every row: (n, C) probabilities → (n,)."""
    other = np.array(probs, dtype=np.float64)
    other[np.arange(len(labels)), labels] = -np.inf
    return other.argmax(1)


def flag_per_class(labels: np.ndarray, score: np.ndarray, counts) -> np.ndarray:
    """Mask of the ``round(counts[c])`` highest-scoring rows of every given label c."""
    flagged = np.zeros(len(labels), bool)
    for c, k in enumerate(counts):
        rows = np.flatnonzero(labels == c)
        flagged[rows[np.argsort(-score[rows], kind="stable")[:int(round(k))]]] = True
    return flagged


def _check(labels, probs, what: str) -> tuple[np.ndarray, np.ndarray]:
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or labels.ndim != 1 or len(labels) != len(probs):
        raise UserError(f"{what}: labels must be (n,) and probabilities (n, C) with the same n, "
                        f"got {labels.shape} and {probs.shape}")
    if len(labels) == 0:
        raise UserError(f"{what}: no rows")
    if probs.shape[1] < 2:
        raise UserError(f"{what}: probabilities need at least two classes (columns), got {probs.shape[1]}")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= probs.shape[1]:
        raise UserError(f"{what}: labels must be whole numbers in [0, {probs.shape[1]})")
    if not np.isfinite(probs).all() or (probs < 0).any():
        raise UserError(f"{what}: probabilities must be finite and non-negative")
    return labels.astype(np.int64), probs


def _check_all(labels, pred_probs, clean_labels, clean_pred_probs, class_names):
    """``(labels, probs, clean)`` checked; ``clean`` = (labels, probs) of the clean set or None."""
    labels, probs = _check(labels, pred_probs, "find_label_issues")
    C = probs.shape[1]
    if class_names is not None and len(class_names) != C:
        raise UserError(f"find_label_issues: {len(class_names)} class names for {C} classes")
    if (clean_labels is None) != (clean_pred_probs is None):
        raise UserError("find_label_issues: give both clean_labels and clean_pred_probs, or neither")
    clean = None
    if clean_labels is not None:
        clean = _check(clean_labels, clean_pred_probs, "find_label_issues (clean set)")
        if clean[1].shape[1] != C:
            raise UserError(f"find_label_issues: the clean set has {clean[1].shape[1]} classes, the rows {C}")
    return labels, probs, clean


def noise_matrix(labels, pred, num_classes, clean_labels=None, clean_pred=None) -> np.ndarray:
    """N̂ (C×C): rows with given label i and estimated true class j (module
    docstring); ``pred`` / ``clean_pred`` are predicted classes (n,)."""
    C = num_classes
    counts = np.zeros((C, C))
    np.add.at(counts, (labels, pred), 1)
    if clean_labels is None:
        N = counts
    else:
        M = np.zeros((C, C))
        np.add.at(M, (clean_labels, clean_pred), 1)
        seen = M.sum(1) > 0
        M[~seen] = np.eye(C)[~seen]  # a class without clean rows: taken as always right
        M = M / M.sum(1, keepdims=True)
        N = np.clip(counts @ np.linalg.pinv(M), 0, None)
    given = counts.sum(1, keepdims=True)
    total = N.sum(1, keepdims=True)
    return np.where(total > 0, N / np.where(total > 0, total, 1) * given, np.diag(given[:, 0]))


CAVEAT_MARGIN = 0.05  # held-out disagreement this far above what the clean set and the estimate explain: the caveat


def estimate_caveat(noise_rate: float, clean_labels, clean_pred_probs, held_labels, held_pred_probs,
                    margin: float = CAVEAT_MARGIN) -> Optional[str]:
    """A sentence saying why an estimate is not to be trusted, or None.

    The estimate counts the disagreements of in-sample evidence with the
    given labels, less the model's own mistakes as a clean set shows them.
    Two ways it fails show on rows the model never trained on:

    * With a clean set the model fitted more closely than it fits the clean
      training rows (a small set of hard data, memorised), it subtracts too
      little: on the fine-food reviews a GDW run got 99 of 100 meta reviews
      right, 70% of the test reviews, and estimated 19% wrong labels where
      5% were (``benchmarks/noise_estimate.py``).
    * Without one (plain training, or any method whose run has no meta
      set), a model that fitted the training labels makes wrong labels look
      right: CE on digits counted 1–2% where 18–40% were wrong.

    If the clean set's error e (0 without one) stood for the model's, it
    would disagree with about e + ``noise_rate`` of the held-out rows'
    labels where they are as noisy as the training rows', or e where they
    are clean.

    Args:
        noise_rate: the estimate (a share in [0, 1]).
        clean_labels, clean_pred_probs: (m,), (m, C): the clean set that
            corrected it, or None (no correction: M = I).
        held_labels, held_pred_probs: (h,), (h, C): rows the model never
            trained on, labels clean or as noisy as the training labels.
        margin: how far (a share) the held-out disagreement must exceed
            e + ``noise_rate``.
    Returns:
        None without held-out rows, or where they disagree with at most
        e + ``noise_rate`` + ``margin`` of their labels; else the reason,
        with the numbers (``gdw train`` adds what to do).
    """
    if held_labels is None or len(held_labels) == 0:
        return None
    clean = clean_labels is not None and len(clean_labels) > 0
    err = float((np.asarray(clean_pred_probs).argmax(1) != np.asarray(clean_labels)).mean()) if clean else 0.0
    disagree = float((np.asarray(held_pred_probs).argmax(1) != np.asarray(held_labels)).mean())
    if disagree <= err + noise_rate + margin:
        return None
    held = f"disagrees with {100 * disagree:.0f}% of the labels of {len(held_labels)} rows it never trained on"
    if not clean:
        return (f"no clean set corrected it, and the model {held}, more than the {100 * noise_rate:.1f}% estimate "
                "explains: it fitted the training labels more closely than it fits new rows, so wrong labels it "
                "fitted count as right and its own mistakes as wrong labels")
    return (f"the model errs on {100 * err:.0f}% of the {len(clean_labels)} clean examples that corrected it but "
            f"{held}, more than that and the {100 * noise_rate:.1f}% estimate explain: it fitted the clean set more "
            "closely than the training rows, so the estimate mixes its own mistakes with wrong labels (too high "
            "where hard examples count as wrong, too low where it fitted wrong labels)")


def find_label_issues(labels, pred_probs, *, clean_labels=None, clean_pred_probs=None,
                      num_issues: Optional[int] = None, class_names: Optional[Sequence[str]] = None,
                      bootstrap: int = 200, seed: int = 0) -> LabelIssues:
    """Estimate how many labels are wrong and flag that many rows.

    Args:
        labels: (n,) given labels, whole numbers in [0, C).
        pred_probs: (n, C) predicted probabilities of each row (each row sums
            to one; from a model that did not fit the wrong labels: held-out
            predictions, or a weighted method's averaged training evidence).
        clean_labels, clean_pred_probs: (m,) and (m, C), a set whose labels
            are right, predicted by a model that did not train on it; it
            corrects the estimate for the model's own mistakes. Optional.
        num_issues: flag exactly this many rows (the most suspicious overall)
            instead of the estimate.
        class_names: C names for :meth:`LabelIssues.rows`.
        bootstrap: resamples for the interval (0: none, the interval is the
            estimate itself).
    Returns:
        :class:`LabelIssues`.
    Raises:
        UserError: shapes or values that do not fit together.
    """
    labels, probs, clean = _check_all(labels, pred_probs, clean_labels, clean_pred_probs, class_names)
    n, C = probs.shape
    pred = probs.argmax(1)
    clean_pred = clean[1].argmax(1) if clean else None

    def estimate(rows, crows):
        N = noise_matrix(labels[rows], pred[rows], C, *((clean[0][crows], clean_pred[crows]) if clean else ()))
        return N, 1 - np.trace(N) / max(N.sum(), 1)

    N, rate = estimate(np.arange(n), np.arange(len(clean[0])) if clean else None)
    rng = np.random.default_rng(seed)
    rates = [estimate(rng.integers(0, n, n), rng.integers(0, len(clean[0]), len(clean[0])) if clean else None)[1]
             for _ in range(bootstrap)]
    if rates:  # the basic bootstrap: the resamples reflected about the estimate (module docstring)
        q_lo, q_hi = np.percentile(rates, [2.5, 97.5])
        interval = (float(np.clip(2 * rate - q_hi, 0, 1)), float(np.clip(2 * rate - q_lo, 0, 1)))
    else:
        interval = (float(rate), float(rate))

    score = label_score(probs, labels)
    suggested = most_likely_other(probs, labels)
    flagged = np.zeros(n, bool)
    if num_issues is not None:
        if not (isinstance(num_issues, (int, np.integer)) and 0 <= num_issues <= n):
            raise UserError(f"num_issues must be a whole number in [0, {n}], got {num_issues!r}")
        flagged[np.argsort(-score, kind="stable")[:num_issues]] = True
    else:
        flagged = flag_per_class(labels, score, N.sum(1) - np.diag(N))
    order = np.lexsort((-score, ~flagged))  # flagged first, then by score
    return LabelIssues(labels, score, flagged, suggested, order, float(rate), interval, N,
                       list(class_names) if class_names is not None else [])
