"""A Hugging Face ``transformers.Trainer`` whose training step is a gdw method.

``compute_loss`` returns one scalar, through which no weighting method can
be expressed; :class:`WeightedTrainer` overrides ``training_step`` instead::

    from gdw.integrations.hf import WeightedTrainer

    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    trainer = WeightedTrainer(model=model, args=TrainingArguments("out", ...),
                              train_dataset=noisy, meta_dataset=clean, data_collator=collator,
                              method="gdw")     # or a method built on the model: gdw.GDW(model, 2)
    trainer.train()

Every step draws the next batch of the meta dataset (a DataLoader of it,
built with the Trainer's collator and reshuffled on every pass) and calls the
method's ``backward`` on the training batch and that meta batch, which leaves
the method's gradient in the parameters' ``.grad``; the Trainer then clips,
steps the optimizer and the scheduler as usual. The weights' summary
(:func:`gdw.integrations.weight_summary`, averaged over the steps since the
last log, prefixed ``gdw_``) goes into the Trainer's logs beside ``loss``,
which is the mean plain cross-entropy on the given labels
(:attr:`gdw.Stats.loss`), whatever the method optimises.

Needs ``pip install 'gdw[hf]'`` (transformers and accelerate).
"""

from __future__ import annotations

import sys
from typing import Any, Optional

import torch
import transformers

from ..errors import UserError
from ..fit import cycle, inputs_and_labels
from ..methods import Method, make
from . import SummaryMeans, current_lr


class WeightedTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` that trains with a gdw method.

    Args (besides the Trainer's own, which must include ``model``):
        method: a :class:`gdw.Method` built on ``model`` (the same object),
            or a method's name (``"gdw"``, ``"mwnet"``, ``"l2rw"``, ...):
            then built here with ``num_classes`` = ``model.config.num_labels``
            and ``method_kwargs``.
        meta_dataset: the clean meta set, a dataset of the same kind as
            ``train_dataset`` (rows the collator turns into a dict with the
            labels); needed by the methods that learn from a meta set.
        meta_batch_size: the meta batches' size; default the training
            batch size per device.
        inner_lr: α of the virtual step of meta methods; default the
            optimizer's current learning rate (``args.learning_rate`` while
            that is zero, in the first step of a warm-up). The virtual step
            is plain SGD whatever the optimizer is.
        method_kwargs: keyword arguments of the method, when ``method`` is a name.

    The labels are taken out of each batch under the Trainer's label name
    (``args.label_names``, default ``"labels"``); the other keys are the
    model's keyword arguments. Its output may be a ``ModelOutput`` with
    ``.logits``. The method's epoch schedule (a fine-tuning phase such as
    GDW's ``finetune_fraction``) follows the Trainer's epochs.

    Correctness: with ``gradient_accumulation_steps=1`` (the default) the
    ``.grad`` a step leaves is exactly ``method.backward``'s on that batch
    and meta batch (tested). With more, each micro-batch is weighted on its
    own (its own meta batch, a weighting network's own update) and its
    gradient is divided by the number of micro-batches, so the step averages
    them as the Trainer does for a plain loss. The returned loss is the
    batch's mean plain cross-entropy, detached, divided likewise (the
    Trainer sums the micro-batches' returns for its log).

    Not supported: ``fp16`` (its loss scaler expects a scaled loss; use
    ``bf16``), DeepSpeed and FSDP (they own the backward), ``model_init``.
    The model is called unwrapped, so ``DataParallel`` does not split the
    batch; under ``torchrun`` the method sums over the ranks itself
    (:mod:`gdw.distributed`), which this class has been tested without.
    """

    def __init__(self, *args, method, meta_dataset=None, meta_batch_size: Optional[int] = None,
                 inner_lr: Optional[float] = None, method_kwargs: Optional[dict] = None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.model is None:
            raise UserError("WeightedTrainer needs model= (model_init is not supported)")
        if self.args.fp16:
            raise UserError("WeightedTrainer does not support fp16 (its loss scaler expects a scaled loss): "
                            "use bf16=True or full precision")
        if getattr(self, "is_deepspeed_enabled", False) or getattr(self, "is_fsdp_enabled", False):
            raise UserError("WeightedTrainer does not support DeepSpeed or FSDP: they run the backward themselves")
        if isinstance(method, str):
            num_labels = getattr(getattr(self.model, "config", None), "num_labels", None)
            if num_labels is None:
                raise UserError(f"method={method!r} needs model.config.num_labels; pass a method built on the model")
            method = make(method, self.model, num_labels, **(method_kwargs or {}))
        if not isinstance(method, Method):
            raise UserError(f"method must be a gdw method or its name, got {type(method).__name__}")
        if method.model is not self.model:
            raise UserError("the method must be built on the Trainer's model (the same object)")
        if method.needs_meta and meta_dataset is None:
            raise UserError(f"{type(method).__name__} learns from a meta set: pass meta_dataset=")
        self.method, self.meta_dataset = method, meta_dataset
        self.meta_batch_size = meta_batch_size
        self.inner_lr = inner_lr
        names = self.label_names or ["labels"]
        if len(names) != 1:
            raise UserError(f"WeightedTrainer needs one label name, got {names}")
        self.label_key = names[0]
        self._meta_batches = None
        self._summary = SummaryMeans()
        self.add_callback(_EpochSchedule(method))

    # -- meta batches ----------------------------------------------------------------
    def get_meta_dataloader(self) -> torch.utils.data.DataLoader:
        """A DataLoader of the meta dataset: the Trainer's collator (the
        columns the model does not take removed, as for the training set),
        shuffled with a generator seeded from ``args.seed``."""
        dataset, collator = self.meta_dataset, self.data_collator
        datasets = sys.modules.get("datasets")  # a datasets.Dataset means the package is loaded
        if datasets is not None and isinstance(dataset, datasets.Dataset):
            dataset = self._remove_unused_columns(dataset, description="meta")
        else:
            collator = self._get_collator_with_removed_columns(collator, description="meta")
        generator = torch.Generator().manual_seed(int(self.args.seed))
        return torch.utils.data.DataLoader(dataset, batch_size=self.meta_batch_size or self._train_batch_size,
                                           shuffle=True, collate_fn=collator, generator=generator,
                                           num_workers=self.args.dataloader_num_workers)

    def next_meta_batch(self) -> tuple[Any, Optional[torch.Tensor]]:
        """``(inputs, labels)`` of the next meta batch on the device
        (``(None, None)`` without a meta dataset)."""
        if self.meta_dataset is None:
            return None, None
        if self._meta_batches is None:
            self._meta_batches = cycle(self.get_meta_dataloader())
        return inputs_and_labels(self._prepare_inputs(next(self._meta_batches)), self.label_key)

    # -- the step ----------------------------------------------------------------------
    def training_step(self, model: torch.nn.Module, inputs: dict, num_items_in_batch=None, *args,
                      **kwargs) -> torch.Tensor:
        """The method's ``backward`` on ``inputs`` and the next meta batch;
        returns the batch's mean plain cross-entropy (detached; divided by
        the number of micro-batches in gradient accumulation)."""
        self.method.model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        x, y = inputs_and_labels(self._prepare_inputs(inputs), self.label_key)
        xm, ym = self.next_meta_batch()
        steps = int(getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps))
        params = [p for p in self.method.model.parameters() if p.requires_grad]
        earlier = None
        if steps > 1:  # this micro-batch's gradient alone, to divide it before adding
            earlier = [p.grad for p in params]
            for p in params:
                p.grad = None
        lr = self.inner_lr if self.inner_lr is not None else current_lr(self.optimizer, self.args.learning_rate)
        with self.compute_loss_context_manager():
            stats = self.method.backward(x, y, xm, ym, inner_lr=lr if self.method.needs_inner_lr else None)
        if earlier is not None:
            with torch.no_grad():
                for p, g in zip(params, earlier):
                    if p.grad is not None:
                        p.grad.div_(steps)
                        if g is not None:
                            p.grad.add_(g)
                    else:
                        p.grad = g
        self._summary.add(stats)
        return (stats.loss / steps).detach()

    def log(self, logs: dict, *args, **kwargs) -> None:
        """The Trainer's log, with the weights' summary since the last
        training log added (``gdw_weight_mean``, ``gdw_trust_mean``, ...)."""
        if "loss" in logs and self._summary.sums:
            logs = {**logs, **self._summary.read("gdw_")}
        return super().log(logs, *args, **kwargs)


class _EpochSchedule(transformers.TrainerCallback):
    """Tells the method each epoch's start, for its schedule (fine-tuning phase)."""

    def __init__(self, method: Method):
        self.method = method

    def on_epoch_begin(self, args, state, control, **kwargs):
        epoch = int(round(state.epoch or 0))
        epochs = max(int(getattr(state, "num_train_epochs", 0) or 0), epoch + 1)
        self.method.on_epoch_start(epoch, epochs)


__all__ = ["WeightedTrainer"]
