"""A PyTorch Lightning module whose training step is a gdw method.

A weighting method computes its gradient itself, so the module optimises
manually (``automatic_optimization = False``): every step draws the next
meta batch, calls the method's ``backward`` (which fills ``.grad``; no
``manual_backward``) and steps the optimizer::

    from gdw.integrations.lightning import WeightedModule

    module = WeightedModule(model, gdw.GDW(model, num_classes=10), meta_loader,
                            optimizer=lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9))
    lightning.Trainer(max_epochs=30).fit(module, train_loader, val_loader)

Needs ``pip install 'gdw[lightning]'``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import lightning
import torch
import torch.nn.functional as F

from .. import inputs as model_inputs
from ..engine import logits_of
from ..errors import UserError
from ..fit import cycle, inputs_and_labels
from ..methods import Method
from . import current_lr, weight_summary


class WeightedModule(lightning.LightningModule):
    """Train ``model`` with a gdw ``method`` inside ``lightning.Trainer``.

    Args:
        model: the network (any ``nn.Module``; it may take a tensor, a dict
            of keyword arguments or a tuple, and return the logits or a
            structure holding them, as for ``backward``).
        method: a :class:`gdw.Method` built on ``model`` (the same object).
        meta_loader: an iterable of meta batches (a DataLoader over the
            clean meta set), restarted whenever it runs out; ``None`` for a
            method without a meta set.
        optimizer: ``params -> torch.optim.Optimizer``; default SGD with
            lr 0.1 and momentum 0.9. Override ``configure_optimizers`` for
            more (a scheduler it returns is stepped once per epoch).
        inner_lr: α of the virtual step; default the optimizer's current
            learning rate.
        label_key: the labels' key when a batch is a dict.

    A batch (training, meta or validation) is ``(inputs, labels, ...)`` or a
    dict with the labels under ``label_key`` (:func:`gdw.fit.inputs_and_labels`).
    Logged: ``train_loss`` (the mean plain cross-entropy on the given labels,
    :attr:`gdw.Stats.loss`) and the weights' summary
    (:func:`gdw.integrations.weight_summary`, prefixed ``gdw_``) per step and
    epoch; ``val_loss`` and ``val_accuracy`` when validation data is given.
    The method's epoch schedule follows the Trainer's epochs (with
    ``max_epochs`` set).

    The gradient a step leaves is exactly ``method.backward``'s on the batch
    and its meta batch, which the optimizer then takes (tested); Lightning's
    gradient clipping and accumulation (``accumulate_grad_batches``) do not
    apply under manual optimisation, nor ``16-mixed`` precision's loss
    scaler (use ``bf16-mixed`` or full precision).
    """

    def __init__(self, model: torch.nn.Module, method: Method, meta_loader: Optional[Iterable] = None, *,
                 optimizer: Optional[Callable[[Any], torch.optim.Optimizer]] = None, inner_lr: Optional[float] = None,
                 label_key: str = "labels"):
        super().__init__()
        if not isinstance(method, Method):
            raise UserError(f"method must be a gdw method, got {type(method).__name__}")
        if method.model is not model:
            raise UserError("the method must be built on the module's model (the same object)")
        if method.needs_meta and meta_loader is None:
            raise UserError(f"{type(method).__name__} learns from a meta set: pass meta_loader")
        self.automatic_optimization = False
        self.model, self.method, self.meta_loader = model, method, meta_loader
        self.make_optimizer = optimizer or (lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9))
        self.inner_lr, self.label_key = inner_lr, label_key
        self._meta_batches = None

    def forward(self, x):
        """The model's logits on ``x`` (a tensor, a dict or a tuple)."""
        return logits_of(model_inputs.call(self.model, x), self.method.output)

    def configure_optimizers(self):
        return self.make_optimizer(self.model.parameters())

    def next_meta_batch(self):
        """``(inputs, labels)`` of the next meta batch on this module's
        device (``(None, None)`` without a meta loader)."""
        if self.meta_loader is None:
            return None, None
        if self._meta_batches is None:
            self._meta_batches = cycle(self.meta_loader)
        x, y = inputs_and_labels(next(self._meta_batches), self.label_key)
        return model_inputs.to(x, self.device), y.to(self.device)

    def on_fit_start(self) -> None:
        vnet = getattr(self.method, "vnet", None)  # a weighting network (MW-Net, GDW's MW-Net stage one)
        if isinstance(vnet, torch.nn.Module):
            vnet.to(self.device)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["gdw_method"] = self.method.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "gdw_method" in checkpoint:
            self.method.load_state_dict(checkpoint["gdw_method"])

    def on_train_epoch_start(self) -> None:
        epochs = self.trainer.max_epochs if self.trainer is not None else None
        if epochs is not None and epochs > 0:
            self.method.on_epoch_start(self.current_epoch, epochs)

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = inputs_and_labels(batch, self.label_key)
        xm, ym = self.next_meta_batch()
        lr = self.inner_lr if self.inner_lr is not None else current_lr(opt)
        opt.zero_grad()
        stats = self.method.backward(x, y, xm, ym, inner_lr=lr if self.method.needs_inner_lr else None)
        opt.step()
        size = int(y.shape[0])
        self.log("train_loss", stats.loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=size)
        self.log_dict({f"gdw_{k}": v for k, v in weight_summary(stats).items()}, on_step=True, on_epoch=True,
                      batch_size=size)
        return stats.loss

    def on_train_epoch_end(self) -> None:
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            for s in scheduler if isinstance(scheduler, list) else [scheduler]:
                s.step()

    def validation_step(self, batch, batch_idx):
        x, y = inputs_and_labels(batch, self.label_key)
        z = self(x)
        self.log_dict({"val_loss": F.cross_entropy(z.float(), y), "val_accuracy": (z.argmax(1) == y).float().mean()},
                      on_epoch=True, prog_bar=True, batch_size=int(y.shape[0]))
