"""The shared base of the robust and imbalance losses (focal, GCE, SCE, CB, LA,
LDAM): a method defined by a loss of the logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Method
from ..engine import full
from .checks import logit_error


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
