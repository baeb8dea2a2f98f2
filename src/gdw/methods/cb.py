"""Class-balanced loss (Cui et al., "Class-Balanced Loss Based on Effective
Number of Samples", CVPR 2019), with softmax cross-entropy.

The effective number of samples of class c is (1 − β^{n_c}) / (1 − β); the
class weight is its inverse,

    w_c = (1 − β) / (1 − β^{n_c}),   β ∈ [0, 1) (default 0.9999),

normalised so that Σ_c w_c = C, and the loss is

    CB(z, y) = (1/B) Σ_i w_{y_i} · CE(z_i, y_i).

β = 0 gives w_c = 1 (plain cross-entropy); β → 1 approaches inverse class
frequency. The gradient is w_{y_i} · e_i / B, so ``Stats.weights`` =
w_{y_i}. Note the plain batch mean: ``F.cross_entropy(weight=w)`` would divide
by Σ_i w_{y_i} instead.

The counts n_c come from the training labels (``class_counts=``; the
training loop passes them). A class with no training example is given
n_c = 1, i.e. the largest weight, as the rarest class possible: its weight
only enters the normalisation (and any example that does carry that label).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import UserError
from .base import METHODS, check_positive
from .loss import LossMethod
from .checks import check_class_counts


def class_balanced_weights(counts: torch.Tensor, beta: float) -> torch.Tensor:
    """w_c = (1 − β)/(1 − β^{n_c}) with n_c ≥ 1 enforced, scaled to Σ_c w_c = C (float64)."""
    n = counts.to(torch.float64).clamp(min=1)
    if beta == 0:
        w = torch.ones_like(n)
    else:
        # 1 − β^n = −expm1(n log β): accurate for β close to 1.
        w = -math.expm1(math.log(beta)) / -torch.expm1(n * math.log(beta))
    return w * (len(w) / w.sum())


@METHODS.register("cb")
class CB(LossMethod):
    """Class-balanced cross-entropy (1/B) Σ_i w_{y_i} CE_i, w_c ∝ 1/effective number.

    Args (besides those of :class:`Method`):
        class_counts: training examples per class, C whole numbers ≥ 0
            (required; the training loop fills it from the training labels).
        beta: β in [0, 1) (default 0.9999; 0 is cross-entropy).
    """

    needs_class_counts = True

    @property
    def fits_prior(self) -> str:  # class-balanced weights aim at balanced error
        return "balanced" if self.beta > 0 else super().fits_prior

    def __init__(self, model, num_classes, *, class_counts=None, beta: float = 0.9999, **kw):
        super().__init__(model, num_classes, **kw)
        self.beta = check_positive("beta", beta, allow_zero=True)
        if self.beta >= 1:
            raise UserError(f"beta must lie in [0, 1), got {beta!r}")
        self.class_counts = check_class_counts(class_counts, self.num_classes)
        self.class_weights = class_balanced_weights(self.class_counts, self.beta)

    def loss(self, z, y):
        w = self.class_weights.to(z.device, z.dtype)[y]
        return (w * F.cross_entropy(z, y, reduction="none")).mean()
