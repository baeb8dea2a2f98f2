"""Which class prior a run's predictions aim at, and the shift that gets them there.

A class-balanced meta set makes every meta method minimise *balanced*
error, and the logit adjustment (``la``, GDW's ``tau``) does the same by
construction; plain training aims at the training labels' class shares.
Where the data a user predicts on keeps the training prior, a model aimed at
balanced error gives up plain accuracy to the rare classes. The target prior
π_t is the one answer every method follows:

* ``"train"``: the training labels' class shares (before any noise that
  ``--noise`` injects, when it injects some);
* ``"balanced"``: every class alike;
* ``"auto"`` (the default): ``"balanced"`` when ``--imbalance`` makes the
  training set long-tailed (the benchmark protocol, whose test split stays
  balanced) or when the training classes are about equally frequent (the
  largest at most ``BALANCED_RATIO`` times the smallest: then the two
  targets nearly coincide and ``"balanced"`` is not distorted by label
  noise); else ``"train"``.

A meta (and validation) set that gdw draws from the training data follows
the target: as many examples of every class for ``"balanced"``, the training
labels' shares for ``"train"`` (:func:`gdw.data.prepare`), so the meta loss
aims where the predictions do. A post-hoc shift alone does not get there: a
model fitted to a balanced meta set of 100 reviews predicted the majority
class for 50% of the test reviews with or without the shift (66% are).
A method aims at the prior :attr:`gdw.Method.fits_prior` names (the training
labels', the meta set's, or balanced). Its predictions are made on
z + log π_t − log π_fit (post-hoc logit adjustment, Menon et al. 2021):
:func:`prediction_shift`. Plain training (``fits_prior == "train"``) is never
shifted: it predicts with the prior it was trained on.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from .errors import UserError

TARGET_PRIORS = ("auto", "train", "balanced")
BALANCED_RATIO = 1.5  # "auto": classes whose counts differ by at most this factor count as balanced


def shares(counts: Sequence[float]) -> np.ndarray:
    """Class shares from counts (C,), an empty class counted as one example."""
    c = np.maximum(np.asarray(counts, dtype=np.float64), 1.0)
    return c / c.sum()


def resolve_target_prior(target: str, train_counts: Sequence[int], imbalance: str = "none") -> str:
    """``"train"`` or ``"balanced"`` for the setting ``target`` (see the module).

    Args:
        target: ``"auto"``, ``"train"`` or ``"balanced"``.
        train_counts: (C,) training examples per class (by their labels
            before injected noise).
        imbalance: the ``--imbalance`` spec; anything but ``"none"`` makes
            ``"auto"`` balanced.
    Raises:
        UserError: an unknown ``target``.
    """
    if target not in TARGET_PRIORS:
        raise UserError(f"--target-prior must be one of {', '.join(TARGET_PRIORS)}, got {target!r}")
    if target != "auto":
        return target
    c = np.maximum(np.asarray(train_counts, dtype=np.float64), 1.0)
    if imbalance not in ("none", "") or c.max() <= BALANCED_RATIO * c.min():
        return "balanced"
    return "train"


def prediction_shift(fits_prior: str, target: str, train_counts: Sequence[int],
                     meta_counts: Optional[Sequence[int]]) -> Optional[torch.Tensor]:
    """log π_target − log π_fit (C,), float32, added to the logits before the
    softmax of every prediction; None when there is nothing to shift (plain
    training, or the two priors are the same).

    Args:
        fits_prior: the method's ``fits_prior``: ``"train"``, ``"meta"`` or
            ``"balanced"``.
        target: ``"train"`` or ``"balanced"`` (resolved).
        train_counts: (C,) training examples per class.
        meta_counts: (C,) meta examples per class (needed for ``"meta"``).
    """
    if fits_prior == "train":
        return None
    C = len(train_counts)
    uniform = np.full(C, 1.0 / C)
    fit = {"meta": None if meta_counts is None else shares(meta_counts), "balanced": uniform}[fits_prior]
    if fit is None:
        return None
    aim = shares(train_counts) if target == "train" else uniform
    shift = np.log(aim) - np.log(fit)
    shift -= shift.mean()  # a common constant does not change the softmax
    if np.abs(shift).max() < 1e-9:
        return None
    return torch.tensor(shift, dtype=torch.float32)


def describe(target: str, counts: Sequence[int], classes: Sequence[str], how: str, drawn: bool = False) -> str:
    """One line for the start of a run: the target prior and what it means
    (``drawn``: the meta set drawn from the training data follows the shares)."""
    s = shares(counts)
    top = ", ".join(f"{c} {100 * p:.0f}%" for c, p in list(zip(classes, s))[:6]) + (", ..." if len(s) > 6 else "")
    if target == "train":
        return (f"target prior: train ({how}; the training labels' shares: {top}): predictions aim at plain "
                "accuracy on data with these shares" + (", and the meta set drawn from your data has them" if drawn
                                                         else "") + "; --target-prior balanced aims at balanced accuracy")
    return (f"target prior: balanced ({how}): predictions aim at balanced accuracy (every class alike); "
            "--target-prior train aims at the training labels' shares")
