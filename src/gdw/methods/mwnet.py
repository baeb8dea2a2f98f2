"""Meta-Weight-Net (Shu et al., NeurIPS 2019).

A weighting network V (1 → 100 → 1, ReLU, sigmoid) maps each example's
detached loss ℓ_i to a weight v_i. Per step:

1. v_i = V(ℓ_i); virtual step θ' = θ − α · J_zᵀ (v ⊙ e) / B.
2. L_meta = CE(f(x_meta; θ'), y_meta); its gradient reaches V through v:
   ∂L_meta/∂v_i = Σ_j g_ij with g_ij = −(α/B) e_ij (J_z u)_ij.
3. V takes one Adam step (lr 1e-3, weight decay 1e-4).
4. Real step with the updated V: G_i = V(ℓ_i) · e_i / B (not normalised).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..engine import full
from .base import METHODS, MetaMethod, check_int, check_positive, logit_error


class WeightNet(nn.Module):
    """V: loss → weight in (0, 1). Input and output shape (B,)."""

    def __init__(self, hidden: int = 100):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, 1), nn.Sigmoid())

    def forward(self, loss: torch.Tensor) -> torch.Tensor:
        return self.net(loss.unsqueeze(1).to(self.net[0].weight.dtype)).squeeze(1)


class WeightNetMethod(MetaMethod):
    """A meta method that owns a weighting network V and its Adam optimizer."""

    def __init__(self, model, num_classes, *, hidden: int = 100, meta_lr: float = 1e-3,
                 meta_weight_decay: float = 1e-4, **kw):
        super().__init__(model, num_classes, **kw)
        self.vnet = WeightNet(check_int("hidden", hidden)).to(self.device)
        self.vopt = torch.optim.Adam(
            self.vnet.parameters(),
            lr=check_positive("meta_lr", meta_lr),
            weight_decay=check_positive("meta_weight_decay", meta_weight_decay, allow_zero=True),
        )

    def update_vnet(self, out: torch.Tensor, grad: torch.Tensor, comm) -> None:
        """One Adam step on V given ∂L_meta/∂out for an output ``out`` of V
        (V's gradient summed over ranks, so every rank takes the same step)."""
        self.vopt.zero_grad(set_to_none=True)
        out.backward(grad)
        comm.sum_([p.grad for p in self.vnet.parameters()])
        self.vopt.step()

    def state_dict(self) -> dict:
        return {"vnet": self.vnet.state_dict(), "vopt": self.vopt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.vnet.load_state_dict(state["vnet"])
        self.vopt.load_state_dict(state["vopt"])


@METHODS.register("mwnet")
class MWNet(WeightNetMethod):
    """Meta-Weight-Net: instance weights from a learned loss → weight map."""

    def logit_grad(self, fwd, y, x_meta, y_meta, lr):
        B = fwd.B
        _, e = logit_error(fwd.logits, y, self.num_classes)
        losses = F.cross_entropy(full(fwd.logits.detach()), y, reduction="none")
        v = self.vnet(losses)
        meta_loss, dA = self.meta_step(fwd, v.detach()[:, None] * e / B, x_meta, y_meta, lr)
        self.update_vnet(v, (dA * e).sum(1) / B, fwd.comm)
        with torch.no_grad():
            w = self.vnet(losses)
        return {"G": w[:, None] * e / B, "weights": w, "meta_loss": meta_loss}
