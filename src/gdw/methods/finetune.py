"""Train with cross-entropy, then fine-tune on the meta set.

The baseline a meta-set method must beat to be worth its cost: it uses the
same clean meta set, but only to continue plain cross-entropy training. For
the last ⌈fraction · epochs⌉ epochs (at least one, never the first; set by
``on_epoch_start``) ``backward`` forwards the META batch instead of the
training batch and back-propagates its mean cross-entropy; before that, and
before ``on_epoch_start`` is ever called, it is exactly
:class:`~gdw.methods.ce.CE` on the training batch. An epoch of fine-tuning is
one pass over the meta set (``gdw.fit`` and ``gdw.batches`` do that).

In the fine-tuning phase the returned :class:`Stats` describe the batch that
was trained on, the meta batch: ``loss`` and ``meta_loss`` are its mean
cross-entropy, ``weights`` = ones(B_meta), ``logits`` its logits. The
training batch is checked but not forwarded (so BatchNorm statistics see the
meta batch only).
"""

from __future__ import annotations

from ..errors import UserError
from .base import METHODS, check_positive
from .ce import CE


@METHODS.register("finetune")
class Finetune(CE):
    """Cross-entropy on the training batch, then on the meta batch for the last epochs.

    Args (besides those of :class:`Method`):
        fraction: in (0, 1), the share of epochs spent fine-tuning on the meta
            set (default 0.2; rounded up to whole epochs). It is
            ``CE(finetune_fraction=fraction)``.

    Needs a meta batch in every ``backward`` call (as all meta methods), but
    no inner learning rate: there is no virtual step.
    """

    def __init__(self, model, num_classes, *, fraction: float = 0.2, **kw):
        fraction = check_positive("fraction", fraction)
        if fraction >= 1:
            raise UserError(f"fraction must lie in (0, 1), got {fraction!r}")
        super().__init__(model, num_classes, finetune_fraction=fraction, **kw)
        self.fraction = fraction

    def state_dict(self) -> dict:
        return {"finetuning": self.finetuning}

    def load_state_dict(self, state: dict) -> None:
        self.finetuning = bool(state.get("finetuning", False))
