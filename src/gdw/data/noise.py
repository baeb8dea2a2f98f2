"""Label-noise and class-imbalance protocols (pure numpy, seeded).

Noise specs (strings, see :func:`parse_noise`)::

    none            labels unchanged
    uniform:R       label redrawn from R/C * 1 + (1-R) * onehot (may keep the true class,
                    so only R*(C-1)/C of the labels change: uniform:0.4, C=10 -> 36 %)
    symmetric:R     with probability R move to one of the other C-1 classes, uniformly
    flip:R          class c keeps its label w.p. 1-R, else moves to ONE other class t(c),
                    t(c) drawn uniformly from the other classes, once per class
    pair:R          class c -> (c+1) mod C w.p. R
    matrix:PATH     a C x C row-stochastic matrix in a .npy or .csv file
    cifar10n:KEY    real human labels of CIFAR-10N (KEY: worse, aggre, random1..3, clean
    cifar100n:KEY   or the full key, e.g. worse_label); optional third part: the label file

How labels are drawn: every synthetic model is a requested transition matrix ``T``
(``T[i, j]`` = P(noisy j | true i)). The examples of true class ``i`` are shared out among
the noisy classes in exactly the proportions ``T[i]`` (largest-remainder rounding), and
which example gets which label is a uniformly random permutation. Each example's noisy
label is therefore marginally distributed as ``T[i]``, while the realised transition
matrix equals ``T`` up to rounding (within ``1 / n_i`` per entry) instead of up to
sampling error -- runs with the same spec see the same amount of noise.

Imbalance specs (see :func:`parse_imbalance`)::

    none            all examples kept
    longtail:RHO    class c keeps round(n_max * RHO**(-c / (C-1))) examples
    step:RHO        the last C//2 classes keep round(n_max / RHO), the others n_max

``RHO = n_max / n_min >= 1``. ``n_max`` is the size of the smallest class available
(after the meta set is taken out), so every class can meet its target exactly and the
realised ratio is RHO up to rounding. ``round`` rounds halves up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError, one_line

SYNTHETIC = ("uniform", "symmetric", "flip", "pair")
NOISE_KINDS = ("none",) + SYNTHETIC + ("matrix", "cifar10n", "cifar100n")
IMBALANCE_KINDS = ("none", "longtail", "step")


@dataclass(frozen=True, eq=False)
class NoiseSpec:
    """A parsed noise spec. ``text`` is the spec as given; ``matrix`` only for ``matrix:``;
    ``key``/``path`` only for ``cifar10n``/``cifar100n`` (``path`` None = look it up)."""

    kind: str
    rate: float = 0.0
    matrix: np.ndarray | None = None
    key: str | None = None
    path: str | None = None
    text: str = "none"


@dataclass(frozen=True)
class ImbalanceSpec:
    """A parsed imbalance spec: ``kind`` in none/longtail/step and ratio ``rho >= 1``."""

    kind: str
    rho: float = 1.0
    text: str = "none"


def _number(text: str, what: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"{what} must be a number, got {text!r} in spec {spec!r}") from None
    if not math.isfinite(value):
        raise UserError(f"{what} must be finite, got {text!r} in spec {spec!r}")
    return value


def load_matrix(path: str | Path, num_classes: int | None = None) -> np.ndarray:
    """Read a transition matrix from ``.npy`` or ``.csv``/``.txt`` (comma-separated) and check
    it is square (C x C when ``num_classes`` is given), finite, non-negative with rows summing
    to 1 within 1e-6.

    Returns a float64 (C, C) array. Raises UserError naming the file otherwise.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"noise matrix file not found: {path}")
    try:
        npy = path.suffix.lower() == ".npy"
        m = np.load(path, allow_pickle=False) if npy else np.loadtxt(path, delimiter=",", ndmin=2)
        m = np.asarray(m, dtype=np.float64)
    except (ValueError, OSError) as e:
        raise UserError(f"cannot read noise matrix {path}: {one_line(e)}") from None
    check_stochastic(m, str(path), num_classes)
    return m


def check_stochastic(m: np.ndarray, where: str, num_classes: int | None = None) -> None:
    """Raise UserError unless ``m`` is a (C, C) row-stochastic matrix (C = num_classes if given)."""
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise UserError(f"noise matrix {where} must be square, got shape {m.shape}")
    if num_classes is not None and m.shape[0] != num_classes:
        raise UserError(f"noise matrix {where} is {m.shape[0]}x{m.shape[1]} but the dataset has {num_classes} classes")
    if not np.isfinite(m).all() or (m < 0).any():
        raise UserError(f"noise matrix {where} has negative or non-finite entries")
    sums = m.sum(axis=1)
    bad = np.flatnonzero(np.abs(sums - 1) > 1e-6)
    if bad.size:
        raise UserError(f"noise matrix {where} is not row-stochastic: row {bad[0]} sums to "
                        f"{sums[bad[0]]:.6g} (rows must sum to 1 within 1e-6)")


def _split_spec(spec, what: str, example: str) -> tuple[str, str, str]:
    """``"Kind:arg"`` → (stripped text, lower-case kind, arg); None means "none".
    UserError for a non-string or for "none" with an argument."""
    if spec is None:
        spec = "none"
    if not isinstance(spec, str):
        raise UserError(f"{what} spec must be a string such as '{example}', got {spec!r}")
    text = spec.strip()
    kind, _, arg = text.partition(":")
    kind = kind.lower()
    if kind == "none" and arg:
        raise UserError(f"{what} spec 'none' takes no argument, got {spec!r}")
    return text, kind, arg


def parse_noise(spec: str | NoiseSpec, num_classes: int | None = None) -> NoiseSpec:
    """Validate a noise spec string (see module doc) and return a :class:`NoiseSpec`.

    ``matrix:PATH`` files are read and checked here; their size is checked against
    ``num_classes`` when given. Raises UserError for an unknown kind, a rate that is not a
    number or outside [0, 1], a missing/non-stochastic/wrong-size matrix, or a missing key.
    """
    if isinstance(spec, NoiseSpec):
        if num_classes is not None and spec.matrix is not None:
            check_stochastic(spec.matrix, spec.text, num_classes)
        return spec
    text, kind, arg = _split_spec(spec, "noise", "uniform:0.4")
    if kind == "none":
        return NoiseSpec("none", text="none")
    if kind in SYNTHETIC:
        if not arg:
            raise UserError(f"noise spec {spec!r} needs a rate, e.g. '{kind}:0.4'")
        rate = _number(arg, "noise rate", spec)
        if not 0.0 <= rate <= 1.0:
            raise UserError(f"noise rate must be in [0, 1], got {rate:g} in spec {spec!r}")
        return NoiseSpec(kind, rate=rate, text=text)
    if kind == "matrix":
        if not arg:
            raise UserError(f"noise spec {spec!r} needs a file, e.g. 'matrix:T.npy'")
        return NoiseSpec("matrix", matrix=load_matrix(arg, num_classes), path=arg, text=text)
    if kind in ("cifar10n", "cifar100n"):
        key, _, path = arg.partition(":")
        if not key:
            example = "worse" if kind == "cifar10n" else "noisy"
            raise UserError(f"noise spec {spec!r} needs a label key, e.g. '{kind}:{example}'")
        return NoiseSpec(kind, key=key, path=path or None, text=text)
    raise UserError(f"unknown noise kind {kind!r} in spec {spec!r}; choose from {', '.join(NOISE_KINDS)}")


def parse_imbalance(spec: str | ImbalanceSpec | None) -> ImbalanceSpec:
    """Validate an imbalance spec (``none``, ``longtail:RHO``, ``step:RHO``; RHO >= 1).

    Raises UserError for an unknown kind, a ratio that is not a number, or RHO < 1.
    """
    if isinstance(spec, ImbalanceSpec):
        return spec
    text, kind, arg = _split_spec(spec, "imbalance", "longtail:100")
    if kind == "none":
        return ImbalanceSpec("none", text="none")
    if kind not in IMBALANCE_KINDS:
        raise UserError(f"unknown imbalance kind {kind!r} in spec {spec!r}; choose from {', '.join(IMBALANCE_KINDS)}")
    if not arg:
        raise UserError(f"imbalance spec {spec!r} needs a ratio, e.g. '{kind}:100'")
    rho = _number(arg, "imbalance ratio", spec)
    if rho < 1:
        raise UserError(f"imbalance ratio must be >= 1 (n_max / n_min), got {rho:g} in {spec!r}")
    return ImbalanceSpec(kind, rho=rho, text=text)


def transition_matrix(spec: str | NoiseSpec, num_classes: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """The requested (C, C) float64 transition matrix ``T[true, noisy]`` of a synthetic spec.

    ``flip`` draws its per-class targets from ``rng`` (required for flip). ``cifar10n`` /
    ``cifar100n`` have no requested matrix: UserError.
    """
    s = parse_noise(spec, num_classes)
    C = int(num_classes)
    eye = np.eye(C)
    if s.kind in ("symmetric", "flip", "pair") and s.rate > 0 and C < 2:
        raise UserError(f"noise {s.text!r} needs at least 2 classes")
    if s.kind == "none":
        return eye
    if s.kind == "uniform":
        return s.rate / C + (1 - s.rate) * eye
    if s.kind == "symmetric":
        return (1 - s.rate) * eye + s.rate / max(C - 1, 1) * (1 - eye)
    if s.kind in ("pair", "flip"):  # class c moves to c + 1, or (flip) to c + a shift drawn per class
        if s.kind == "flip" and rng is None:
            raise UserError("flip noise needs a random generator (rng)")
        shift = 1 if s.kind == "pair" else rng.integers(1, C, size=C)
        T = (1 - s.rate) * eye
        T[np.arange(C), (np.arange(C) + shift) % C] += s.rate
        return T
    if s.kind == "matrix":
        return s.matrix.copy()
    raise UserError(f"noise {s.text!r} uses a label file, not a transition matrix; use prepare()")


def allocate(n: int, p: np.ndarray) -> np.ndarray:
    """Split ``n`` items into counts proportional to probabilities ``p`` (largest remainder).

    Returns int64 counts summing to ``n``; zero-probability entries always get 0.
    """
    p = np.asarray(p, dtype=np.float64)
    p = p / p.sum()
    raw = n * p
    counts = np.floor(raw).astype(np.int64)
    short = n - int(counts.sum())
    if short > 0:
        counts[np.argsort(-(raw - counts), kind="stable")[:short]] += 1
    return counts


def check_labels(labels, num_classes: int, what: str = "labels") -> np.ndarray:
    """Return ``labels`` as a 1-D int64 array, or raise UserError if they are not integers
    (integral floats are accepted) or not in [0, num_classes)."""
    y = np.asarray(labels)
    if y.ndim != 1:
        raise UserError(f"{what} must be a 1-D array, got shape {y.shape}")
    if y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
        y = y.astype(np.int64)
    if y.dtype.kind not in "iu":
        raise UserError(f"{what} must be integers, got dtype {y.dtype}"
                        + (f" (e.g. {y.reshape(-1)[0].item()!r})" if y.size else ""))
    y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        bad = y[(y < 0) | (y >= num_classes)][0]
        raise UserError(f"{what} out of range: found {bad}, expected 0..{num_classes - 1}")
    return y


def apply_noise(labels: np.ndarray, num_classes: int, spec: str | NoiseSpec,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Corrupt clean integer labels with a synthetic noise model.

    Args:
        labels: (N,) true labels in [0, num_classes).
        num_classes: C.
        spec: a synthetic spec (none, uniform, symmetric, flip, pair, matrix).
        rng: numpy Generator; all randomness (flip targets, assignment) comes from it.

    Returns:
        ``(noisy, T)``: (N,) int64 noisy labels and the requested (C, C) float64 transition
        matrix. See the module doc for how labels are shared out (exact proportions).

    Raises UserError for bad labels or specs (including cifar10n/cifar100n, which need
    the label file and go through :func:`gdw.data.prepare`).
    """
    y = check_labels(labels, num_classes)
    T = transition_matrix(spec, num_classes, rng)
    noisy = y.copy()
    order = np.argsort(y, kind="stable")
    starts = np.searchsorted(y[order], np.arange(num_classes + 1))
    for c in range(num_classes):
        members = order[starts[c]:starts[c + 1]]
        if members.size:
            new = np.repeat(np.arange(num_classes), allocate(members.size, T[c]))
            noisy[rng.permutation(members)] = new
    return noisy, T


def realised_transition(true: np.ndarray, noisy: np.ndarray, num_classes: int) -> np.ndarray:
    """Row-normalised (C, C) counts of true -> noisy over examples with a known (>= 0) true
    label; a class with no examples gets an all-zero row."""
    true = np.asarray(true, dtype=np.int64)
    noisy = np.asarray(noisy, dtype=np.int64)
    known = true >= 0
    counts = np.bincount(true[known] * num_classes + noisy[known],
                         minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    rows = counts.sum(axis=1, keepdims=True)
    return counts / np.maximum(rows, 1)


def realised_noise_rate(true: np.ndarray, noisy: np.ndarray) -> float:
    """Fraction of examples with a known true label whose noisy label differs (0 if none)."""
    true = np.asarray(true)
    known = true >= 0
    return float(np.mean(true[known] != np.asarray(noisy)[known])) if known.any() else 0.0


def _round_half_up(x: np.ndarray) -> np.ndarray:
    return np.floor(np.asarray(x, dtype=np.float64) + 0.5).astype(np.int64)


def longtail_counts(n_max: int, num_classes: int, rho: float) -> np.ndarray:
    """Per-class counts ``round(n_max * rho ** (-c / (C - 1)))`` for c = 0..C-1 (int64).

    Class 0 keeps ``n_max`` and class C-1 keeps ``round(n_max / rho)``. rho >= 1.
    """
    if rho < 1:
        raise UserError(f"imbalance ratio must be >= 1, got {rho:g}")
    c = np.arange(num_classes)
    exponent = -c / (num_classes - 1) if num_classes > 1 else np.zeros(1)
    return _round_half_up(n_max * float(rho) ** exponent)


def step_counts(n_max: int, num_classes: int, rho: float) -> np.ndarray:
    """Per-class counts: ``n_max`` for the first C - C//2 classes, ``round(n_max / rho)`` for
    the last C//2 classes (int64)."""
    if rho < 1:
        raise UserError(f"imbalance ratio must be >= 1, got {rho:g}")
    counts = np.full(num_classes, int(n_max), dtype=np.int64)
    counts[num_classes - num_classes // 2:] = _round_half_up(n_max / float(rho))
    return counts


def apply_imbalance(labels: np.ndarray, num_classes: int, spec: str | ImbalanceSpec,
                    rng: np.random.Generator) -> np.ndarray:
    """Choose which examples to keep so that the classes of ``labels`` (true labels, (N,))
    follow the imbalance spec. Returns sorted int64 positions into ``labels``.

    ``n_max`` = the smallest non-empty class size present; which examples of a class are
    kept is a uniform random subset drawn from ``rng``. Every example has to have a known
    (>= 0) label: UserError otherwise.
    """
    s = parse_imbalance(spec)
    y = np.asarray(labels, dtype=np.int64)
    if s.kind == "none":
        return np.arange(y.size)
    if (y < 0).any():
        raise UserError(f"imbalance {s.text!r} needs the true label of every training example, "
                        f"but {int((y < 0).sum())} are unknown")
    available = np.bincount(y, minlength=num_classes)
    n_max = int(available[available > 0].min()) if available.any() else 0
    make = longtail_counts if s.kind == "longtail" else step_counts
    target = np.minimum(make(n_max, num_classes, s.rho), available)
    keep = [rng.choice(np.flatnonzero(y == c), size=target[c], replace=False) for c in range(num_classes)]
    return np.sort(np.concatenate(keep)).astype(np.int64)
