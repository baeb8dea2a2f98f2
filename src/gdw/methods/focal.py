"""Focal loss (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017),
and :class:`LossMethod`, the shared base of the robust/imbalance losses.

    FL(z, y) = −(1 − p_y)^γ · log p_y,      γ ≥ 0 (default 2),

averaged over the batch, with p = softmax(z). γ = 0 is cross-entropy; larger
γ down-weights well-classified examples. (The paper's optional per-class α is
not included.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..engine import full
from .base import METHODS, Method, check_positive, logit_error


class LossMethod(Method):
    """A method defined by a loss of the logits: ``G = ∂ loss / ∂z``.

    A subclass implements ``loss(z, y)``, the batch-mean loss as a
    differentiable function of the logits ``z`` (B×C, float32 or float64)
    written as in its paper; ``logit_grad`` takes autograd's gradient of it
    with respect to a detached copy of the logits (cheap: B×C).

    ``Stats.weights`` (shape (B,)) is the projection coefficient
    B · ⟨G_i, e_i⟩ / ‖e_i‖² of each example's logit gradient on
    e_i = p_i − onehot(y_i). For a loss that depends on the logits only
    through p_y (focal, GCE, SCE, CB) G_i is parallel to e_i and
    G = weights ⊙ e / B holds exactly; for LDAM it is a projection. An example
    with e_i = 0 (p_y rounds to one) reports 0.
    """

    def loss(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def normaliser_weights(self, y: torch.Tensor):
        """Per-example weights whose batch sum ``loss`` divides by (None: the
        plain batch mean). Lets a batch split over ranks be normalised by the
        whole batch's sum, exactly as one process would."""
        return None

    def logit_grad(self, fwd, y, x_meta, y_meta, lr):
        z = full(fwd.logits.detach()).requires_grad_(True)
        with torch.enable_grad():
            (G,) = torch.autograd.grad(self.loss(z, y), z)
        if fwd.comm.active:  # rescale this rank's mean to the mean over all ranks
            w = self.normaliser_weights(y)
            n = float(y.shape[0])
            local = torch.full((), n, device=G.device, dtype=G.dtype) if w is None else w.sum().to(G.dtype)
            G = G * (local / fwd.comm.sum(local))
        _, e = logit_error(fwd.logits, y, self.num_classes)
        e = e.to(G.dtype)
        norm2 = (e * e).sum(1).clamp(min=torch.finfo(e.dtype).tiny)
        return {"G": G, "weights": fwd.B * (G * e).sum(1) / norm2}  # B: the whole batch, over all ranks


def labelled_log_prob(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log p_y, shape (B,)."""
    return F.log_softmax(z, 1).gather(1, y[:, None]).squeeze(1)


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
