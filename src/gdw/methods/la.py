"""Logit-adjusted loss (Menon et al., "Long-tail learning via logit
adjustment", ICLR 2021).

With π_c the share of class c among the training labels, training uses
plain cross-entropy on shifted logits,

    LA(z, y) = CE(z + τ · log π, y),      τ ≥ 0 (default 1),

and prediction uses the unshifted logits z (the model is not changed; the
shift exists only inside the loss). Rare classes get their logits lowered
during training, so the model must raise them more to fit: at test time,
without the shift, the decision boundary moves towards the frequent
classes' side. τ = 0 is cross-entropy.

The logit gradient is G_i = softmax(z_i + τ log π) − onehot(y_i), which is not
parallel to e_i = softmax(z_i) − onehot(y_i): ``Stats.weights`` is the
projection of :class:`~gdw.methods.loss.LossMethod`.

The counts come from the training labels (``class_counts=``; the training
loop passes them). A class with no training example is given one example,
so that log π stays finite.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import METHODS, check_positive
from .loss import LossMethod
from .cb import check_class_counts


def log_prior(class_counts, num_classes: int) -> torch.Tensor:
    """log π: the log share of each class among the training labels, float64
    (C,), a class with no example counted as one. UserError for bad counts."""
    counts = check_class_counts(class_counts, num_classes).clamp(min=1)
    return (counts / counts.sum()).log()


@METHODS.register("la")
class LogitAdjusted(LossMethod):
    """Cross-entropy on z + τ log π (training only), batch mean.

    Args (besides those of :class:`Method`):
        class_counts: training examples per class, C whole numbers ≥ 0
            (required; the training loop fills it from the training labels).
        tau: τ ≥ 0, the strength of the adjustment (default 1).
    """

    needs_class_counts = True

    @property
    def fits_prior(self) -> str:  # the adjusted loss aims at balanced error
        return "balanced" if self.tau > 0 else super().fits_prior

    def __init__(self, model, num_classes, *, class_counts=None, tau: float = 1.0, **kw):
        super().__init__(model, num_classes, **kw)
        self.tau = check_positive("tau", tau, allow_zero=True)
        self.log_prior = log_prior(class_counts, self.num_classes)

    def loss(self, z, y):
        return F.cross_entropy(z + self.tau * self.log_prior.to(z.device, z.dtype), y)
