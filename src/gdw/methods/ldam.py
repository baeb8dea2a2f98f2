"""Label-distribution-aware margin loss with optional deferred re-weighting
(Cao et al., "Learning Imbalanced Datasets with Label-Distribution-Aware
Margin Loss", NeurIPS 2019).

Class margins Δ_c ∝ n_c^{−1/4}, scaled so that the largest is
``max_margin``; the labelled logit is reduced by its margin and all logits
are multiplied by the scale s:

    LDAM(z, y) = CE(s · (z − Δ_y · onehot(y)), y),

averaged over the batch. Defaults max_margin = 0.5, s = 30 (the paper's
CIFAR setting). Zero margin and s = 1 is cross-entropy. The paper uses
s = 30 with a cosine (normalised) classifier whose logits lie in [−1, 1];
with a plain ``nn.Linear`` head s = 30 multiplies the logit gradient by up to
30, so consider s = 1 (or a lower learning rate) there.

Deferred re-weighting (``drw=True``): from epoch ``drw_epoch`` on (default
⌊0.8 · epochs⌋, i.e. 160 of 200, set by ``on_epoch_start``) the per-example
losses are weighted by the class-balanced weights w_c of Cui et al. with
β = 0.9999 (see :mod:`gdw.methods.cb`), normalised within the batch as in
the paper's Algorithm 1 and its code:
Σ_i w_{y_i} LDAM_i / Σ_i w_{y_i}. Before ``on_epoch_start`` is first called
no re-weighting is applied.

A class with no training example is given n_c = 1 (the largest margin and
weight). ``Stats.weights`` is the projection coefficient
B · ⟨G_i, e_i⟩ / ‖e_i‖² (the LDAM gradient is not parallel to e_i).
"""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F

from .base import METHODS, check_bool, check_int, check_positive
from .loss import LossMethod
from .cb import check_class_counts, class_balanced_weights

DRW_BETA = 0.9999


@METHODS.register("ldam")
class LDAM(LossMethod):
    """LDAM loss CE(s·(z − Δ_y onehot(y)), y), Δ_c ∝ n_c^{−1/4}, optional DRW.

    Args (besides those of :class:`Method`):
        class_counts: training examples per class, C whole numbers ≥ 0
            (required; the training loop fills it from the training labels).
        max_margin: the largest margin, ≥ 0 (default 0.5).
        s: logit scale > 0 (default 30).
        drw: deferred re-weighting (default False).
        drw_epoch: first re-weighted epoch (0-based), a whole number ≥ 0;
            default ⌊0.8 · epochs⌋.
    """

    needs_class_counts = True

    @property
    def fits_prior(self) -> str:  # deferred re-weighting aims at balanced error
        return "balanced" if self.drw else super().fits_prior

    def __init__(self, model, num_classes, *, class_counts=None, max_margin: float = 0.5, s: float = 30.0,
                 drw: bool = False, drw_epoch: Optional[int] = None, **kw):
        super().__init__(model, num_classes, **kw)
        self.class_counts = check_class_counts(class_counts, self.num_classes)
        self.max_margin = check_positive("max_margin", max_margin, allow_zero=True)
        self.s = check_positive("s", s)
        self.drw = check_bool("drw", drw)
        self.drw_epoch = None if drw_epoch is None else check_int("drw_epoch", drw_epoch, minimum=0)
        m = self.class_counts.clamp(min=1) ** -0.25
        self.margins = m * (self.max_margin / m.max())
        self.drw_weights = class_balanced_weights(self.class_counts, DRW_BETA)
        self.reweight = False

    def on_epoch_start(self, epoch, epochs):
        super().on_epoch_start(epoch, epochs)
        start = self.drw_epoch if self.drw_epoch is not None else 4 * int(epochs) // 5
        self.reweight = self.drw and int(epoch) >= start

    def state_dict(self) -> dict:
        return {"reweight": self.reweight}

    def load_state_dict(self, state: dict) -> None:
        self.reweight = bool(state.get("reweight", False))

    def normaliser_weights(self, y):
        return self.drw_weights.to(y.device)[y] if self.reweight else None

    def loss(self, z, y):
        onehot = F.one_hot(y, z.shape[1]).to(z.dtype)
        margin = self.margins.to(z.device, z.dtype)[y]
        losses = F.cross_entropy(self.s * (z - margin[:, None] * onehot), y, reduction="none")
        if not self.reweight:
            return losses.mean()
        w = self.drw_weights.to(z.device, z.dtype)[y]
        return (w * losses).sum() / w.sum()
