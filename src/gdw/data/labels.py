"""Label values -> class names -> class ids.

A class is named by the text of its label value: ``30`` -> ``"30"``, ``"cat"`` -> ``"cat"``.
Classes are numbered in increasing numeric order when every label value is an integer
(``10, 20, 30`` -> ``["10", "20", "30"]``), else in sorted string order. Labels of another
file (a hand-checked meta set, new data) are matched to these names: exactly, or as the
same integer (``"030"``, ``30.0`` -> ``"30"``).
"""

from __future__ import annotations

import numpy as np

from ..errors import UserError


def label_names(values, what: str) -> np.ndarray:
    """The names (a 1-D str array) of label values: strings stripped, integers (and
    integral floats) as decimal text. UserError for other types or shapes."""
    a = np.asarray(values)
    if a.ndim != 1:
        raise UserError(f"{what} must be a 1-D array, got shape {a.shape}")
    if a.dtype.kind == "S":
        try:
            a = np.char.decode(a, "utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{what}: labels are bytes that are not UTF-8 text") from None
    if a.dtype.kind == "U":
        return np.char.strip(a)
    if a.dtype.kind == "f":
        bad = ~np.isfinite(a) | (a != np.round(a))
        if bad.any():
            raise UserError(f"{what} must be integers or strings, got {a[bad][0]!r}")
    elif a.dtype.kind not in "iub":
        raise UserError(f"{what} must be integers or strings, got dtype {a.dtype}")
    return a.astype(np.int64).astype(str)


def classes_from(names: np.ndarray) -> list[str]:
    """Class names of the distinct label names: numeric order when all are integers
    (``"007"`` and ``"7"`` are then the same class ``"7"``), else sorted strings."""
    uniq = np.unique(np.asarray(names, dtype=str))
    try:
        ints = uniq.astype(np.int64)
    except (ValueError, OverflowError):
        return [str(u) for u in uniq]
    return [str(v) for v in np.unique(ints)]


def ids_by_name(names, classes, what: str, *, empty_unknown: bool = False) -> np.ndarray:
    """Class ids (int64) of label names (see :func:`label_names`) by matching them to
    ``classes``: exactly, else as the same integer. ``empty_unknown``: an empty name
    becomes -1 instead of an error. UserError naming the first unknown label."""
    names = np.asarray(names, dtype=str)
    lookup = {str(c): i for i, c in enumerate(classes)}
    uniq, inverse = np.unique(names, return_inverse=True)
    ids = np.empty(len(uniq), dtype=np.int64)
    for k, u in enumerate(uniq):
        u = str(u)
        i = lookup.get(u)
        if i is None and u == "" and empty_unknown:
            i = -1
        if i is None:
            i = lookup.get(_as_int_text(u))
        if i is None:
            more = f", ... ({len(classes)} in all)" if len(classes) > 10 else ""
            raise UserError(f"label {u!r} in {what} is not a class of the training data "
                            f"(classes: {', '.join(map(str, list(classes)[:10]))}{more})")
        ids[k] = i
    return ids[inverse.reshape(-1)]


def _as_int_text(u: str):
    """``"030"`` / ``"30.0"`` -> ``"30"``; None if the text is not an integer."""
    try:
        return str(int(u))
    except ValueError:
        pass
    try:
        f = float(u)
    except ValueError:
        return None
    return str(int(f)) if np.isfinite(f) and f == int(f) else None


def class_counts_check(labels: np.ndarray, classes, need: int, what: str, explain: str) -> None:
    """UserError naming the first class with fewer than ``need`` examples in ``labels``;
    ``explain`` is the rest of the message."""
    counts = np.bincount(labels[labels >= 0], minlength=len(classes))
    short = np.flatnonzero(counts < need)
    if short.size:
        c = int(short[0])
        raise UserError(f"class {c} ({classes[c]!r}) has {counts[c]} examples in {what}, but {explain}")
