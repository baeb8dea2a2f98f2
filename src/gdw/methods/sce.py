"""Symmetric cross-entropy (Wang et al., "Symmetric Cross Entropy for Robust
Learning with Noisy Labels", ICCV 2019).

    SL(z, y) = α · CE + β · RCE,    RCE = −Σ_k p_k · log q_k,

averaged over the batch, with p = softmax(z) and q = onehot(y) clamped to
[1e-4, 1], so log q_y = 0 and log q_k = log 1e-4 = −4 ln 10 ≈ −9.21 for
k ≠ y: RCE = 4 ln 10 · (1 − p_y). (The paper writes log 0 := A = −4; the
authors' code takes it from this clamp, and so do we. Their code also clamps
p to [1e-7, 1], which only zeroes the gradient of classes with p < 1e-7; we do
not.) Defaults α = 0.1, β = 1.0, the paper's CIFAR-10 setting (CIFAR-100:
α = 6, β = 0.1). α = 1, β = 0 is cross-entropy. The gradient is
(α + 4 ln 10 · β · p_y) · e_i, i.e. that is ``Stats.weights``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import UserError
from .base import METHODS, check_positive
from .loss import LossMethod

Q_MIN = 1e-4  # clamp of the one-hot label distribution in RCE


@METHODS.register("sce")
class SCE(LossMethod):
    """Symmetric cross-entropy α·CE + β·RCE, batch mean.

    Args (besides those of :class:`Method`):
        alpha: α ≥ 0, weight of cross-entropy (default 0.1).
        beta: β ≥ 0, weight of reverse cross-entropy (default 1.0).
        Not both zero.
    """

    def __init__(self, model, num_classes, *, alpha: float = 0.1, beta: float = 1.0, **kw):
        super().__init__(model, num_classes, **kw)
        self.alpha = check_positive("alpha", alpha, allow_zero=True)
        self.beta = check_positive("beta", beta, allow_zero=True)
        if self.alpha == 0 and self.beta == 0:
            raise UserError("alpha and beta must not both be 0 (the loss would be zero)")

    def loss(self, z, y):
        ce = F.cross_entropy(z, y)
        p = F.softmax(z, 1)
        q = F.one_hot(y, z.shape[1]).to(z.dtype).clamp(Q_MIN, 1.0)
        rce = -(p * torch.log(q)).sum(1).mean()
        return self.alpha * ce + self.beta * rce
