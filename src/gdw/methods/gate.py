"""How much noisier the training labels are than the meta set's, from the first epoch.

Weighting by a meta set helps as far as its labels are cleaner than the
training labels; a meta set drawn from the same labels (a user without a
checked set) only lets the weights fit its own quirks. In the first pass
over the training set every example is predicted before the model has
trained on it, so the share a_t of training examples whose prediction
matches the given label is an out-of-sample number, as is a_m, the same
share on the meta batches of the same steps (the model never trains on the
meta set directly before fine-tuning). Both are summed over the first
epoch's steps and, for a_t, taken per given class and averaged with the
meta set's class shares, so that a class prior that differs between the two
sets is not read as noise. If the training labels are right with
probability 1 − r and otherwise uniformly one of the other C − 1 classes,
and the meta labels are right,

    a_t = a_m (1 − r) + (1 − a_m) r / (C − 1),   so
    r̂ = (a_m − a_t) (C − 1) / (C a_m − 1),

the excess label noise of the training set over the meta set. From the
second epoch on the stage-one weights are mixed with plain training's,

    λ = clamp(1 − r̂ / r₀, 0, 1),    v ← (1 − λ) v + λ,

full weighting from an excess of r₀ (``gate``) on, plain
training where the training labels look no noisier than the meta set's;
and the fine-tuning phase on the meta set runs only if λ < ½, where the
meta set is clearly the cleaner of the two (on clean data, fine-tuning on
the small meta set cost accuracy: trying the gate on seed 0 of three suite
cells, tabular and Fashion-MNIST-10k without noise and the reviews).
With ``gate_form="step"`` the mix is all or nothing: where r̂ < r₀ the
rest of the run is plain training on the (logit-adjusted) loss, with no
meta-gradient, no class-level step and no fine-tuning, at a plain step's
cost; else the weighting goes on as without the gate. Under class
imbalance (one training class at least 3 times as frequent as another) the
step form always keeps the weighting: towards a class-balanced meta set it
corrects the prior beyond what the logit adjustment does (question 6: with
the weighting mixed away the long-tail cells lost 1 to 4 points of
validation accuracy). On the design study's cells a partial mix let the network learn the
mislabelled examples it still weighted (question 6). The first
epoch is weighted as without the gate. With a_m at or below 1/C (a model
still at chance after one epoch) nothing is decided: λ stays 0.

It costs one comparison of the logits per step; the decision needs the
training loop to call ``on_epoch_start`` (``fit`` and the integrations do):
without it the first epoch never ends and the weighting stays as it is.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

GATE_FORMS = ("linear", "step")
STEP_MAX_IMBALANCE = 3.0  # the step form keeps the weighting where one training class outnumbers another 3 to 1


def excess_noise(train_correct, train_count, meta_correct: float, meta_count: float,
                 meta_shares) -> Optional[float]:
    """r̂ from the first epoch's counts; ``None`` when the meta accuracy is at or below chance.

    Args:
        train_correct, train_count: per given class (C,), training examples
            predicted as their given label, and seen;
        meta_correct, meta_count: the same summed over the meta batches;
        meta_shares: (C,) the meta set's class shares (weights of a_t's classes).
    """
    train_correct, train_count = (torch.as_tensor(t, dtype=torch.float64) for t in (train_correct, train_count))
    shares = torch.as_tensor(meta_shares, dtype=torch.float64)
    C = shares.numel()
    seen = train_count > 0
    if meta_count <= 0 or not seen.any():
        return None
    shares = torch.where(seen, shares, torch.zeros_like(shares))
    a_t = float((shares * train_correct / train_count.clamp(min=1)).sum() / shares.sum().clamp(min=1e-12))
    a_m = meta_correct / meta_count
    if C * a_m - 1 <= 1e-6:
        return None
    return (a_m - a_t) * (C - 1) / (C * a_m - 1)


class NoiseGate:
    """The first epoch's counts and, after it, λ (one per method instance).

    Args:
        full_at: r₀ > 0, the excess noise from which the weighting is full.
        num_classes: C.
        form: ``"linear"`` (λ = clamp(1 − r̂/r₀, 0, 1)) or ``"step"``
            (λ = 1 below r₀, else 0).
    """

    def __init__(self, full_at: float, num_classes: int, form: str = "linear"):
        if form not in GATE_FORMS:
            raise ValueError(f"form must be one of {GATE_FORMS}, got {form!r}")
        self.full_at, self.C, self.form = float(full_at), int(num_classes), form
        # a device tensor: train correct (C), train seen (C), meta correct, meta seen, meta per class (C)
        self.counts = None
        self.rate = None  # r̂, once decided
        self.lam = 0.0
        self.decided = False
        self.imbalance = None  # largest over smallest training class count in the first epoch

    def add(self, z: torch.Tensor, y: torch.Tensor, meta_correct: torch.Tensor, y_meta: torch.Tensor) -> None:
        """Count one first-epoch step (this rank's batch; no host sync)."""
        if self.decided:
            return
        C = self.C
        hit = (z.argmax(1) == y).to(torch.float64)
        step = torch.cat([torch.zeros(C, dtype=torch.float64, device=y.device).index_add_(0, y, hit),
                          torch.bincount(y, minlength=C).to(torch.float64),
                          meta_correct.reshape(1).to(torch.float64),
                          torch.tensor([float(y_meta.shape[0])], dtype=torch.float64, device=y.device),
                          torch.bincount(y_meta, minlength=C).to(torch.float64).to(y.device)])
        self.counts = step if self.counts is None else self.counts + step

    def decide(self, comm) -> None:
        """End of the first epoch: r̂ and λ from the counts over all ranks (one sync)."""
        if self.decided or self.counts is None:
            return
        C = self.C
        c = comm.sum(self.counts.clone()).cpu()
        rate = excess_noise(c[:C], c[C:2 * C], float(c[2 * C]), float(c[2 * C + 1]), c[2 * C + 2:])
        self.decided = True
        if rate is not None:
            self.rate = rate
            seen = c[C:2 * C]
            self.imbalance = float(seen.max() / seen.min()) if bool((seen > 0).all()) else math.inf
            if self.form == "step":  # off only where the class prior alone does not call for weighting
                self.lam = 1.0 if rate < self.full_at and self.imbalance < STEP_MAX_IMBALANCE else 0.0
            else:
                self.lam = min(max(1.0 - rate / self.full_at, 0.0), 1.0)

    @property
    def off(self) -> bool:
        """Decided, step form, λ = 1: the method trains as plain training (no meta-gradient)."""
        return self.decided and self.form == "step" and self.lam >= 1

    def state_dict(self) -> dict:
        return {"counts": None if self.counts is None else self.counts.cpu().tolist(), "rate": self.rate,
                "lam": self.lam, "decided": self.decided, "imbalance": self.imbalance}

    def load_state_dict(self, state: dict, device=None) -> None:
        counts = state.get("counts")
        self.counts = None if counts is None else torch.tensor(counts, dtype=torch.float64, device=device)
        self.rate, self.lam, self.decided = state.get("rate"), float(state.get("lam", 0.0)), bool(state.get("decided"))
        self.imbalance = state.get("imbalance")
