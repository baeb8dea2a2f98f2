"""Generalized cross-entropy (Zhang & Sabuncu, "Generalized Cross Entropy
Loss for Training Deep Neural Networks with Noisy Labels", NeurIPS 2018).

    L_q(z, y) = (1 − p_y^q) / q,      q ∈ (0, 1] (default 0.7),

averaged over the batch. q → 0 is cross-entropy (−log p_y); q = 1 is the
mean absolute error 1 − p_y (up to a factor 2). The gradient is
p_y^q · e_i, i.e. ``Stats.weights`` = p_y^q. (The paper's truncated variant
is not included.)
"""

from __future__ import annotations

import torch

from ..errors import UserError
from .base import METHODS, check_positive
from .loss import LossMethod, labelled_log_prob


@METHODS.register("gce")
class GCE(LossMethod):
    """Generalized cross-entropy (1 − p_y^q)/q, batch mean.

    Args (besides those of :class:`Method`):
        q: in (0, 1] (default 0.7, the paper's); small q approaches
            cross-entropy, q = 1 is MAE.
    """

    def __init__(self, model, num_classes, *, q: float = 0.7, **kw):
        super().__init__(model, num_classes, **kw)
        self.q = check_positive("q", q)
        if self.q > 1:
            raise UserError(f"q must lie in (0, 1], got {q!r}")

    def loss(self, z, y):
        # (1 − p^q)/q = −expm1(q · log p)/q: no cancellation for small q.
        return (-torch.expm1(self.q * labelled_log_prob(z, y)) / self.q).mean()
