"""gdw inside other training frameworks; each module needs its optional extra.

* :mod:`gdw.integrations.hf`: ``WeightedTrainer``, a ``transformers.Trainer``
  whose training step is a gdw method's ``backward``
  (``pip install 'gdw[hf]'``);
* :mod:`gdw.integrations.lightning`: ``WeightedModule``, a
  ``LightningModule`` with manual optimisation that does the same
  (``pip install 'gdw[lightning]'``);
* :mod:`gdw.integrations.tensorboard`: ``TensorBoardLogger``, a
  :func:`gdw.fit` callback that writes every epoch's metrics as scalars
  (``pip install 'gdw[tensorboard]'``).

Nothing here is imported by ``import gdw``: import the module you use.
The helpers below need only torch.
"""

from __future__ import annotations

from typing import Optional

import torch


def weight_summary(stats) -> dict[str, torch.Tensor]:
    """0-d tensors (on the device, not read) describing one step's
    :class:`gdw.Stats`: ``weight_mean`` (of ``stats.weights``: one per
    example, or one per example and class for class-level methods such as
    GDW), ``trust_mean`` (the weight on each example's labelled class),
    ``instance_weight_mean`` (methods that have instance weights besides
    ``weights``) and ``meta_loss`` (methods with a meta set)."""
    out = {"weight_mean": stats.weights.float().mean(), "trust_mean": stats.trust.float().mean()}
    if stats.instance_weights is not None:
        out["instance_weight_mean"] = stats.instance_weights.float().mean()
    if stats.meta_loss is not None:
        out["meta_loss"] = stats.meta_loss.float()
    return out


class SummaryMeans:
    """Running means of :func:`weight_summary` between two reads (device
    tensors; reading them, in :meth:`read`, synchronises once)."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, stats) -> None:
        for k, v in weight_summary(stats).items():
            self.sums[k] = v.detach() if k not in self.sums else self.sums[k] + v.detach()
            self.counts[k] = self.counts.get(k, 0) + 1

    def read(self, prefix: str = "") -> dict[str, float]:
        """The means since the last read, as floats; then start again."""
        out = {f"{prefix}{k}": float(v) / self.counts[k] for k, v in self.sums.items()}
        self.sums, self.counts = {}, {}
        return out


def current_lr(optimizer, fallback: Optional[float] = None) -> Optional[float]:
    """The first parameter group's learning rate, or ``fallback`` where it is
    zero (the first step of a warm-up) or there is no optimizer."""
    inner = getattr(optimizer, "optimizer", optimizer)  # Lightning and accelerate wrap the optimizer
    groups = getattr(inner, "param_groups", None)
    lr = float(groups[0]["lr"]) if groups else 0.0
    return lr if lr > 0 else fallback
