"""A held-out check of GDW's stage-one weights on its own meta batch.

Weights learned on a meta set help only as far as they carry over to clean
data they were not learned on. Each step the meta batch is split in halves
a and b. Each half gives every training example an alignment (how much a
plain step on it lowers that half's meta loss: h_i = −Σ_j ∂L/∂A_ij e_ij),
and from it instance weights v as the method scales them. The check is

    r = ½ [corr(v^a, h^b) + corr(v^b, h^a)],

the correlation between the weights one half asks for and how useful the
examples are to the other half. r > 0: the weighting carries over. r ≤ 0:
it fits the meta batch's own quirks (a small meta set, or one whose labels
are no cleaner than the training labels), and plain training is at least as
good. Its running mean ρ (exponential, about the last 100 steps) sets how far
the weights are pulled toward plain training's ones:

    λ = clamp(1 − ρ / ρ₀, 0, 1),    v ← (1 − λ) v + λ.

It is computed every ``every``-th step (4), and costs then one backward on
half the meta batch and one product with the training logits' Jacobian: the
other half's alignment follows from the whole batch's, which the method
computes anyway, by linearity (u = (|a| u_a + |b| u_b) / |a ∪ b|). The
fine-tuning phase on the meta set is also held to it: when the phase would
start, it does only if ρ has reached ρ₀ (the meta set's weighting carries
over fully); otherwise training goes on as before to the end.
"""

from __future__ import annotations

import torch


def correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of two vectors (0 when either is constant), a 0-d tensor."""
    a, b = a - a.mean(), b - b.mean()
    norm = a.norm() * b.norm()
    return torch.where(norm > 0, (a * b).sum() / norm.clamp(min=torch.finfo(a.dtype).tiny), torch.zeros_like(norm))


class MetaGuard:
    """Running state of the check; one per method instance.

    Args:
        threshold: ρ₀ > 0, the mean correlation at which the weights are
            trusted fully.
        every: check every this many steps (λ holds in between).
        momentum: of the running mean ρ, per check (0.96 every 4 steps: about
            the last 100 steps).
    """

    def __init__(self, threshold: float, every: int = 4, momentum: float = 0.96):
        self.threshold, self.every, self.momentum = float(threshold), int(every), float(momentum)
        self.rho = None  # running mean of r, a 0-d tensor on the device (no sync per step)
        self.steps = 0
        self.finetune = None  # whether the fine-tuning phase runs, decided when it would start

    def due(self) -> bool:
        """Count a step; whether it is one to check."""
        self.steps += 1
        return (self.steps - 1) % self.every == 0

    def update(self, dA, e, dA_half, m, h, weights) -> torch.Tensor:
        """Add one step's check; return λ (a 0-d tensor).

        Args:
            dA: B×C ∂L_meta/∂A of the whole meta batch (m examples);
            e: B×C logit error p − onehot(y);
            dA_half: the same for its first h examples;
            weights: the method's scaling, alignments (B,) → instance weights (B,).
        """
        dA_other = (m * dA - h * dA_half) / (m - h)
        ha, hb = -(dA_half * e).sum(1), -(dA_other * e).sum(1)
        r = 0.5 * (correlation(weights(ha), hb) + correlation(weights(hb), ha))
        r = r.detach()
        self.rho = r if self.rho is None else self.momentum * self.rho + (1 - self.momentum) * r
        return self.shrink()

    def shrink(self) -> torch.Tensor:
        """λ = clamp(1 − ρ/ρ₀, 0, 1) (1 before the first step)."""
        if self.rho is None:
            return torch.ones(())
        return (1 - self.rho / self.threshold).clamp(0, 1)

    def trusts_meta_set(self) -> bool:
        """Whether ρ has reached ρ₀ (False before any step; syncs)."""
        return self.rho is not None and float(self.rho) >= self.threshold

    def state_dict(self) -> dict:
        return {"rho": None if self.rho is None else float(self.rho), "finetune": self.finetune, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.rho = None if state.get("rho") is None else torch.tensor(float(state["rho"]))
        self.finetune = state.get("finetune")
        self.steps = int(state.get("steps", 0))
