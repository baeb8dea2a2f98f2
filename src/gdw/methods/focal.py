"""Focal loss (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017),
a :class:`~gdw.methods.loss.LossMethod`.

    FL(z, y) = −(1 − p_y)^γ · log p_y,      γ ≥ 0 (default 2),

averaged over the batch, with p = softmax(z). γ = 0 is cross-entropy; larger
γ down-weights well-classified examples. (The paper's optional per-class α is
not included.)
"""

from __future__ import annotations

import torch

from .base import METHODS, check_positive
from .loss import LossMethod, labelled_log_prob


@METHODS.register("focal")
class Focal(LossMethod):
    """Focal loss −(1 − p_y)^γ log p_y, batch mean.

    Args (besides those of :class:`Method`):
        gamma: γ ≥ 0, the focusing parameter (default 2; 0 is cross-entropy).
    """

    def __init__(self, model, num_classes, *, gamma: float = 2.0, **kw):
        super().__init__(model, num_classes, **kw)
        self.gamma = check_positive("gamma", gamma, allow_zero=True)

    def loss(self, z, y):
        log_p = labelled_log_prob(z, y)
        # 1 − p_y via expm1 (accurate near p_y = 1); clamped at the smallest
        # normal number so that the derivative of (1 − p)^γ stays finite for γ < 1.
        one_minus_p = (-torch.expm1(log_p)).clamp(min=torch.finfo(z.dtype).tiny)
        return (-(one_minus_p ** self.gamma) * log_p).mean()
