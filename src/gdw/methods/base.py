"""What every method shares: input checks, the real forward, and ``backward``.

A method is a drop-in replacement for ``loss.backward()``::

    w = gdw.GDW(model, num_classes=10)
    optimizer.zero_grad()
    stats = w.backward(x, y, x_meta, y_meta, inner_lr=lr)
    optimizer.step()

``backward`` runs the model once on the training batch (the only forward that
touches BatchNorm running statistics), lets the method choose the B×C logit
gradient ``G``, and back-propagates it: the model's ``.grad`` receive
``J_z(θ)ᵀ G``, accumulated as autograd does. The optimizer, scheduler,
gradient clipping and mixed precision stay the user's.

Convention for ``Stats.weights``: ``G = weights ⊙ e / B`` with
``e = softmax(z) − onehot(y)``, so plain cross-entropy has weights of one;
instance methods report one weight per example (shape (B,)), class-level
methods one per logit (shape (B, C)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..engine import HeadCapture, RngState, TrainForward, full, meta_logit_grad
from ..errors import UserError
from ..registry import Registry

METHODS: Registry = Registry("method")


@dataclass
class Stats:
    """What one ``backward`` call reports.

    Attributes:
        loss: plain mean cross-entropy of the training batch (float).
        meta_loss: cross-entropy on the meta batch after the virtual step
            (float), or ``None`` for methods without a meta set.
        weights: detached weights actually applied, ``G = weights ⊙ e / B``:
            shape (B, C) for class-level methods, (B,) otherwise.
        logits: detached training logits, shape (B, C).
        instance_weights: the method's instance-level weights where it has
            them besides ``weights`` (GDW: stage-one v; DM: the normalised
            emphasis), shape (B,).
        trust: how much the method trusts each example's given label, shape
            (B,): the weight on the labelled class's gradient flow (GDW:
            ω'_{i,y_i}; instance methods: their weight; DM: B times the
            normalised emphasis). Used to rank suspicious labels.
        trained_on: ``"train"``, or ``"meta"`` when the step used the meta
            batch instead (``finetune``'s last epochs).
    """

    loss: float
    meta_loss: Optional[float]
    weights: torch.Tensor
    logits: torch.Tensor
    instance_weights: Optional[torch.Tensor] = None
    trust: Optional[torch.Tensor] = None
    trained_on: str = "train"


def check_positive(name: str, value: float, *, allow_zero: bool = False) -> float:
    """Return ``float(value)`` or raise UserError naming ``name``."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise UserError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return v


def check_int(name: str, value, minimum: int = 1) -> int:
    """Return ``int(value)`` if it is a whole number ≥ ``minimum``, else raise UserError."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a whole number, got {value!r}") from None
    if not v.is_integer() or v < minimum:
        raise UserError(f"{name} must be a whole number >= {minimum}, got {value!r}")
    return int(v)


def _check_labels(y: torch.Tensor, n: int, num_classes: int, what: str) -> torch.Tensor:
    if not isinstance(y, torch.Tensor):
        y = torch.as_tensor(y)
    if y.dtype.is_floating_point or y.dtype == torch.bool or y.is_complex():
        raise UserError(f"{what} labels must be integers, got dtype {y.dtype}")
    if y.ndim != 1:
        raise UserError(f"{what} labels must be a 1-D tensor, got shape {tuple(y.shape)}")
    if y.shape[0] != n:
        raise UserError(f"{what}: {n} inputs but {y.shape[0]} labels")
    if n and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise UserError(
            f"{what} labels must lie in [0, {num_classes}), got values from {int(y.min())} to {int(y.max())}"
        )
    return y.long()


def _check_inputs(x: torch.Tensor, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise UserError(f"{what} inputs must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim == 0 or x.shape[0] == 0:
        raise UserError(f"{what} batch is empty")
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise UserError(f"{what} inputs contain NaN or infinite values")


class Method:
    """Base class of all methods; a subclass implements ``logit_grad``.

    Args:
        model: any ``nn.Module`` whose output is the logits, shape (B, C).
        num_classes: C.
        optimizer: optional; its current learning rate is the default
            ``inner_lr`` of meta methods.
    """

    needs_meta = False  # True: backward needs x_meta, y_meta (and an inner lr)
    needs_class_counts = False  # True: the constructor takes class_counts= (training-label counts)

    def __init__(self, model: nn.Module, num_classes: int, *, optimizer: Optional[torch.optim.Optimizer] = None):
        if not isinstance(model, nn.Module):
            raise UserError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if int(num_classes) < 2:
            raise UserError(f"num_classes must be at least 2, got {num_classes!r}")
        self.model = model
        self.num_classes = int(num_classes)
        self.optimizer = optimizer

    # -- what subclasses implement -------------------------------------------------
    def logit_grad(self, fwd: TrainForward, y: torch.Tensor, x_meta, y_meta, lr) -> dict[str, Any]:
        """Return at least ``G`` (B×C, float32, the gradient to back-propagate
        from the logits) and ``weights``; may add ``meta_loss`` and
        ``instance_weights``."""
        raise NotImplementedError

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        """Called by the training loop before epoch ``epoch`` (0-based) of
        ``epochs``; methods with a schedule (deferred re-weighting,
        fine-tuning) override it. Calling it is optional in a user's loop."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # -- the shared path -----------------------------------------------------------
    @property
    def device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def inner_lr(self, inner_lr: Optional[float]) -> float:
        """The virtual step α: the argument, else the optimizer's current lr."""
        if inner_lr is None and self.optimizer is not None:
            inner_lr = self.optimizer.param_groups[0]["lr"]
        if inner_lr is None:
            raise UserError(
                f"{type(self).__name__} needs the learning rate of the virtual step: "
                "pass inner_lr= to backward() or optimizer= at construction"
            )
        return check_positive("inner_lr", inner_lr)

    def forward(self, x: torch.Tensor) -> TrainForward:
        """The real forward of the training batch (updates BatchNorm stats once)."""
        rng = RngState(x.device)
        with torch.set_grad_enabled(self.forward_needs_graph()):
            return TrainForward(self.model, x, self.model(x), rng)

    def forward_needs_graph(self) -> bool:
        """Whether the real forward must record an autograd graph."""
        return True

    def backward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        x_meta: Optional[torch.Tensor] = None,
        y_meta: Optional[torch.Tensor] = None,
        *,
        inner_lr: Optional[float] = None,
    ) -> Stats:
        """Put the method's weighted gradient into the model's ``.grad``.

        Args:
            x: training inputs, shape (B, ...), on the model's device.
            y: (possibly noisy) integer labels in [0, C), shape (B,).
            x_meta, y_meta: a clean meta batch (required by meta methods,
                ignored by the others).
            inner_lr: α of the virtual step (meta methods); defaults to the
                optimizer's current learning rate.

        Returns:
            :class:`Stats`.

        Raises:
            UserError (a ValueError): labels outside [0, C) or not integers,
            logits whose last dimension is not C, x/y length mismatch, an
            empty or missing meta batch, non-finite inputs, a meta method
            without an inner learning rate.
        """
        _check_inputs(x, "training")
        y = _check_labels(y, x.shape[0], self.num_classes, "training")
        lr = None
        if self.needs_meta:
            if x_meta is None or y_meta is None:
                raise UserError(f"{type(self).__name__} needs a meta batch: pass x_meta and y_meta")
            _check_inputs(x_meta, "meta")
            y_meta = _check_labels(y_meta, x_meta.shape[0], self.num_classes, "meta")
            lr = self.inner_lr(inner_lr)
        fwd = self.forward(x)
        z = fwd.logits
        fwd.backward_logits = z
        if z.ndim != 2 or z.shape != (x.shape[0], self.num_classes):
            raise UserError(
                f"the model must return logits of shape (B, {self.num_classes}) = ({x.shape[0]}, {self.num_classes}), "
                f"got {tuple(z.shape)}"
            )
        fwd.B = fwd.comm.count(y.shape[0], z.device)
        out = self.logit_grad(fwd, y, x_meta, y_meta, lr)
        G = out["G"].to(z.dtype)
        if fwd.comm.active:  # sum the parameter gradient over ranks, then accumulate
            params = [p for p in self.model.parameters() if p.requires_grad]
            grads = [g if g is not None else torch.zeros_like(p)
                     for p, g in zip(params, torch.autograd.grad(fwd.backward_logits, params, G, allow_unused=True))]
            fwd.comm.sum_(grads)
            for p, g in zip(params, grads):
                p.grad = g if p.grad is None else p.grad + g
        else:
            fwd.backward_logits.backward(G)
        meta_loss = out.get("meta_loss")
        weights = out["weights"].detach()
        trust = out.get("trust")
        if trust is None:
            trust = weights.gather(1, y[:, None]).squeeze(1) if weights.ndim == 2 else weights
        return Stats(
            loss=float(fwd.comm.sum(F.cross_entropy(full(z.detach()), y, reduction="sum")) / fwd.B),
            meta_loss=None if meta_loss is None else float(meta_loss),
            weights=weights,
            logits=z.detach(),
            instance_weights=out.get("instance_weights"),
            trust=trust.detach(),
        )


class MetaMethod(Method):
    """A method that learns its weights from a meta set through a virtual step.

    Args (besides those of :class:`Method`):
        meta_grad: ``"jvp"`` (default; no second-order backward) or
            ``"double"`` (create_graph reference, slower).
        head_only: only the classifier head takes the virtual step (closed
            form, no extra pass through the backbone).
        head: the head ``nn.Linear``; found automatically when omitted.
        low_memory: (``jvp``, not head-only) do not keep the training batch's
            graph through the meta step; recompute the forward for the real
            backward instead. Peak memory of about one graph instead of two,
            for one more forward pass.
    """

    needs_meta = True

    virtual_step = True  # False for L2RW, whose virtual model is θ itself

    def __init__(self, model, num_classes, *, optimizer=None, meta_grad: str = "jvp", head_only: bool = False,
                 head=None, low_memory: bool = False):
        super().__init__(model, num_classes, optimizer=optimizer)
        if low_memory not in (True, False):
            raise UserError(f"low_memory must be True or False, got {low_memory!r}")
        if meta_grad not in ("jvp", "double"):
            raise UserError(f"meta_grad must be 'jvp' or 'double', got {meta_grad!r}")
        self.meta_grad = meta_grad
        self.head_only = bool(head_only) or head is not None
        self.head = HeadCapture(model, self.num_classes, head) if self.head_only else None
        self.recompute = bool(low_memory) and meta_grad == "jvp" and self.head is None

    def forward_needs_graph(self) -> bool:
        # recomputing: the first graph only serves the virtual step's backward
        return not self.recompute or self.virtual_step

    def forward(self, x):
        fwd = super().forward(x)
        if self.head is not None:
            fwd.head_input = self.head.check(fwd.logits)
        fwd.recompute = self.recompute
        return fwd

    def meta_step(self, fwd, A, x_meta, y_meta, lr):
        """``(meta_loss, ∂L_meta/∂A)`` for the virtual step ``θ − lr·J_zᵀA``."""
        return meta_logit_grad(fwd, A, x_meta, y_meta, lr, mode=self.meta_grad, head=self.head)


def logit_error(z: torch.Tensor, y: torch.Tensor, num_classes: int, p_max: Optional[float] = None):
    """``(p, e)``: softmax of the detached logits (clamped at ``p_max`` if
    given) and ``e = p − onehot(y)``, both float32 B×C."""
    p = F.softmax(full(z.detach()), 1)
    if p_max is not None:
        p = p.clamp(max=p_max)
    return p, p - F.one_hot(y, num_classes).to(p.dtype)
