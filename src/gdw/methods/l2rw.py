"""Learning to Reweight (Ren et al., ICML 2018).

Instance weights start at ε_i = 0, so the virtual model is θ itself. The
meta-gradient with respect to ε_i is

    g_i = −(α/B) ⟨∇_θ L_meta(θ), ∇_θ ℓ_i(θ)⟩ = −(α/B) Σ_j e_ij (J_z u)_ij,

and the weights are w_i = max(−g_i, 0) / Σ_k max(−g_k, 0) (all zero when
every one is zero). The real step back-propagates Σ_i w_i ℓ_i. Reported
``weights`` follow the package convention ``G = weights ⊙ e / B``, i.e. B·w_i
(mean one when not all zero).
"""

import torch

from .base import METHODS, logit_error
from .meta import MetaMethod


@METHODS.register("l2rw")
class L2RW(MetaMethod):
    """Learning to Reweight: per-batch weights from one meta-gradient, no state."""

    virtual_step = False

    def logit_grad(self, fwd, y, x_meta, y_meta, lr):
        B = fwd.B
        _, e = logit_error(fwd.logits, y, self.num_classes)
        meta_loss, dA = self.meta_step(fwd, None, x_meta, y_meta, lr)
        w = (-(dA * e).sum(1) / B).clamp(min=0)
        total = fwd.comm.sum(w.sum())
        w = torch.where(total > 0, w / total.clamp(min=torch.finfo(w.dtype).tiny), torch.zeros_like(w))
        return {"G": w[:, None] * e, "weights": w * B, "meta_loss": meta_loss}
