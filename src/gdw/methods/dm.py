"""Derivative Manipulation (Wang et al., arXiv 1905.11233, "Derivative
Manipulation for General Example Weighting").

No meta set. For softmax cross-entropy the logit gradient of example i is
e_i = p_i − onehot(y_i), whose L1 norm is 2(1 − p_i) with p_i the probability
of the labelled class. DM keeps the direction of e_i and replaces its
magnitude by the emphasis density

    w_i = exp(β · p_i^λ · (1 − p_i)),     λ ≥ 0, β real,

normalised over the batch:

    G_i = (w_i / Σ_k w_k) · e_i / (2(1 − p_i) + 1e-6),

so ‖G_i‖₁ = w_i / Σ_k w_k (up to the 1e-6 guard, which only matters when
p_i is within about 1e-6 of one). For β > 0 the emphasis peaks at
p = λ / (λ + 1): λ = 0 emphasises the hardest examples, larger λ easier
ones; β sets how sharply. β = 0 gives every example the same L1 norm 1/B.
Defaults λ = 0.5, β = 8 (the paper's general setting; λ = 1, β = 2 on
Clothing1M).

Numerics: 1 − p_i is computed as Σ_{j≠y_i} p_ij (accurate when p_i is close
to one), and the normalised weights are a softmax over the batch of
β · p_i^λ · (1 − p_i), i.e. the batch maximum is subtracted in the exponent
before ``exp``; the normalisation makes this exact, and large |β| cannot
overflow.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import UserError
from .base import METHODS, Method, check_positive, logit_error


def check_real(name: str, value) -> float:
    """Return ``float(value)`` if it is a finite number (any sign), else raise UserError."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise UserError(f"{name} must be finite, got {value!r}")
    return v


@METHODS.register("dm")
class DM(Method):
    """Derivative Manipulation: each example's logit gradient gets L1 norm w_i / Σ_k w_k.

    Args (besides those of :class:`Method`):
        lam: λ ≥ 0, sets where the emphasis peaks, p = λ/(λ+1) (default 0.5).
        beta: β, any finite number, sets how strongly (default 8; 0 gives
            equal emphasis, β < 0 de-emphasises the examples around the mode).

    ``backward`` ignores a meta batch if one is passed. ``Stats.weights`` is
    B · w̄_i / (2(1 − p_i) + 1e-6) (so G = weights ⊙ e / B, the package
    convention); ``Stats.instance_weights`` is the normalised emphasis
    w̄_i = w_i / Σ_k w_k (sums to one over the batch), and ``Stats.trust`` is
    B · w̄_i (mean one over the batch).
    """

    def __init__(self, model, num_classes, *, lam: float = 0.5, beta: float = 8.0, **kw):
        super().__init__(model, num_classes, **kw)
        self.lam = check_positive("lam", lam, allow_zero=True)
        self.beta = check_real("beta", beta)

    def logit_grad(self, fwd, y, x_meta, y_meta, lr):
        B = fwd.B
        p, e = logit_error(fwd.logits, y, self.num_classes)
        onehot = F.one_hot(y, self.num_classes).to(p.dtype)
        p_y = (p * onehot).sum(1)
        one_minus_p = (p * (1 - onehot)).sum(1)  # 1 − p_y without cancellation
        a = self.beta * p_y.pow(self.lam) * one_minus_p  # β · p^λ · (1 − p), the log of the emphasis density
        w = torch.exp(a - fwd.comm.max(a.max()))  # a softmax over the whole batch, all ranks
        w_bar = w / fwd.comm.sum(w.sum())
        scale = w_bar / (2 * one_minus_p + 1e-6)
        return {"G": scale[:, None] * e, "weights": B * scale, "instance_weights": w_bar, "trust": B * w_bar}
