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
import torch.nn.functional as F

from ..engine import full
from .base import METHODS, logit_error
from .meta import WeightNet, WeightNetMethod  # noqa: F401 - WeightNet re-exported


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
