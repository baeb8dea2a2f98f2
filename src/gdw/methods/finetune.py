"""Train with cross-entropy, then fine-tune on the meta set.

The baseline a meta-set method must beat to be worth its cost: it uses the
same clean meta set, but only to continue plain cross-entropy training. For
the last ⌈fraction · epochs⌉ epochs (at least one; set by ``on_epoch_start``)
``backward`` forwards the META batch instead of the training batch and
back-propagates its mean cross-entropy; before that, and before
``on_epoch_start`` is ever called, it is exactly :class:`~gdw.methods.ce.CE`
on the training batch.

In the fine-tuning phase the returned :class:`Stats` describe the batch that
was trained on, the meta batch: ``loss`` and ``meta_loss`` are its mean
cross-entropy, ``weights`` = ones(B_meta), ``logits`` its logits. The
training batch is checked but not forwarded (so BatchNorm statistics see the
meta batch only).
"""

from __future__ import annotations

import math

import torch

from ..errors import UserError
from .base import METHODS, Method, _check_inputs, _check_labels, check_int, check_positive, logit_error


@METHODS.register("finetune")
class Finetune(Method):
    """Cross-entropy on the training batch, then on the meta batch for the last epochs.

    Args (besides those of :class:`Method`):
        fraction: in (0, 1), the share of epochs spent fine-tuning on the meta
            set (default 0.2; rounded up to whole epochs).

    Needs a meta batch in every ``backward`` call (as all meta methods), but
    no inner learning rate: there is no virtual step.
    """

    needs_meta = True

    def __init__(self, model, num_classes, *, fraction: float = 0.2, **kw):
        super().__init__(model, num_classes, **kw)
        self.fraction = check_positive("fraction", fraction)
        if self.fraction >= 1:
            raise UserError(f"fraction must lie in (0, 1), got {fraction!r}")
        self.finetuning = False

    def on_epoch_start(self, epoch, epochs):
        epoch, epochs = check_int("epoch", epoch, minimum=0), check_int("epochs", epochs)
        # the 1e-9 keeps e.g. 0.1 · 30 = 3.0000000000000004 at 3 epochs
        last = max(1, math.ceil(self.fraction * epochs - 1e-9))
        self.finetuning = epoch >= epochs - last

    def state_dict(self) -> dict:
        return {"finetuning": self.finetuning}

    def load_state_dict(self, state: dict) -> None:
        self.finetuning = bool(state.get("finetuning", False))

    def inner_lr(self, inner_lr):
        return None  # no virtual step, so no learning rate needed

    def logit_grad(self, fwd, y, x_meta, y_meta, lr):
        _, e = logit_error(fwd.logits, y, self.num_classes)
        return {"G": e / fwd.B, "weights": torch.ones(y.shape[0], device=e.device)}

    def backward(self, x, y, x_meta=None, y_meta=None, *, inner_lr=None):
        if not self.finetuning:
            return super().backward(x, y, x_meta, y_meta, inner_lr=inner_lr)
        _check_inputs(x, "training")
        _check_labels(y, x.shape[0], self.num_classes, "training")
        if x_meta is None or y_meta is None:
            raise UserError(f"{type(self).__name__} needs a meta batch: pass x_meta and y_meta")
        _check_inputs(x_meta, "meta")
        y_meta = _check_labels(y_meta, x_meta.shape[0], self.num_classes, "meta")
        stats = super().backward(x_meta, y_meta, x_meta, y_meta)
        stats.meta_loss = stats.loss
        stats.trained_on = "meta"
        return stats
