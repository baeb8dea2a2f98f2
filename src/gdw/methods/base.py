"""What every method shares: input checks, the real forward, and ``backward``.

A method is a drop-in replacement for ``loss.backward()``::

    w = gdw.GDW(model, num_classes=10)
    optimizer.zero_grad()
    stats = w.backward(x, y, x_meta, y_meta, inner_lr=lr)
    optimizer.step()

``backward`` runs the model once on the training batch (the only forward that
touches BatchNorm running statistics), lets the method choose the B×C logit
gradient ``G``, and back-propagates it (a meta method without a virtual step
first computes its meta-gradient at θ, which does not depend on the training
batch, so that the meta batch's graph is gone before the training batch's is
built; see :mod:`gdw.engine`): the model's ``.grad`` receive
``J_z(θ)ᵀ G``, accumulated as autograd does. The optimizer, scheduler,
gradient clipping and mixed precision stay the user's.

Convention for ``Stats.weights``: ``G = weights ⊙ e / B`` with
``e = softmax(z) − onehot(y)``, so plain cross-entropy has weights of one;
instance methods report one weight per example (shape (B,)), class-level
methods one per logit (shape (B, C)). :class:`Stats` lists the methods for
which this holds only approximately.

The model's output may be the logits tensor or a structure holding it; see
:func:`gdw.engine.logits_of` for the rule and ``output=`` to override it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import inputs as model_inputs
from ..distributed import Comm
from ..engine import (MetaGradient, RngState, TrainForward, check_logits_shape, full, logits_of)
from ..errors import UserError
from ..registry import Registry
from .checks import (_check_labels, check_bool, check_class_counts, check_int, check_positive,  # noqa: F401
                     logit_error)

METHODS: Registry = Registry("method")


@dataclass
class Stats:
    """What one ``backward`` call reports: detached tensors on the model's
    device, never copied to the host (reading one, e.g. ``float(stats.loss)``,
    is the caller's choice and synchronises with an accelerator).

    Below, B is the number of examples in this call's batch (this rank's
    share when the batch is split over ranks; the whole batch in the
    ``/ B`` of the convention) and C the number of classes.

    Attributes:
        loss: 0-d float32 tensor: the mean plain (unweighted) cross-entropy
            of the batch trained on, over all ranks, whatever the method
            optimises. Computed from the logits in at least float32, then
            stored as float32.
        meta_loss: 0-d float32 tensor, or ``None`` for methods without a
            meta set: the mean cross-entropy of the meta batch at the
            virtual parameters θ' (at θ itself for L2RW and GDW with
            ``stage_one="l2rw"``; in a fine-tuning phase, the ``loss``).
        weights: the weights actually applied, shape (B, C) for class-level
            methods (GDW), (B,) for all others. Convention: the gradient
            back-propagated from the logits is
            ``G = weights ⊙ (softmax(z) − onehot(y)) / B`` (row-broadcast
            for (B,)), so plain cross-entropy has weights of one. It holds
            exactly (up to rounding) for CE, CB, DM, Finetune, L2RW and
            MW-Net, and for focal, GCE and SCE, whose losses depend on the
            logits only through p_y, so that each G_i is parallel to
            e_i = p_i − onehot(y_i) and the reported projection coefficient
            B·⟨G_i, e_i⟩/‖e_i‖² is the exact factor. It does not hold
            exactly for:

            * LDAM (and the logit-adjusted loss ``la``): the margin and the
              scale s (the shift τ·log π) change the softmax, so G_i is not
              parallel to e_i; ``weights`` is the projection coefficient and
              the component of G_i orthogonal to e_i is not described.
            * GDW: e is computed from p clamped at ``p_max``
              (``G = ω' ⊙ (min(p, p_max) − onehot(y)) / B``); in rows where
              some p_ij > p_max this differs from the softmax convention;
              with the logit adjustment (τ > 0 and class counts, the
              default of ``gdw train``) p is the softmax of z + τ log π,
              and ``weights`` are the ω' of that e, not a projection.
            * every method under autocast: G is rounded to the logits'
              dtype (e.g. bfloat16) before it is back-propagated.

            A projection reports 0 for a row whose e_i is exactly zero.
            Dtype: float32, or float64 when the logits are float64; MW-Net's
            weights come from the weighting network, in its dtype.
        logits: the training logits, shape (B, C), in the model's output
            dtype (e.g. bfloat16 under autocast).
        instance_weights: shape (B,), or ``None``: a method's instance-level
            weights where it has them besides ``weights`` (GDW: the
            stage-one v_i: V(ℓ_i) before V's update, or L2RW's weights
            scaled to mean one with ``stage_one="l2rw"``; DM: the normalised
            emphasis w̄_i, which sums to one over the batch).
        trust: shape (B,), always set: how much the method trusts each
            example's given label, the weight on the labelled class's
            gradient flow (GDW: ω'_{i,y_i}; DM: B·w̄_i; every other method:
            its ``weights``). Used to rank suspicious labels.
        trained_on: ``"train"``, or ``"meta"`` when the step trained on the
            meta batch instead (the fine-tuning phase of ``finetune`` or of
            any method's ``finetune_fraction``); then every field above
            describes the meta batch.
    """

    loss: torch.Tensor
    meta_loss: Optional[torch.Tensor]
    weights: torch.Tensor
    logits: torch.Tensor
    trust: torch.Tensor
    instance_weights: Optional[torch.Tensor] = None
    trained_on: str = "train"


class Method:
    """Base class of all methods; a subclass implements ``logit_grad``.

    Args:
        model: any ``nn.Module`` whose output holds the logits, shape (B, C):
            the logits tensor itself, or an object with ``.logits``, a dict
            with ``"logits"``, or a tuple/list whose first element they are
            (tried in that order; see :func:`gdw.engine.logits_of`).
        num_classes: C.
        optimizer: None or a ``torch.optim.Optimizer``; its current learning
            rate is the default ``inner_lr`` of meta methods.
        output: optional callable taking the model's output and returning the
            logits tensor, e.g. ``output=lambda out: out[1]``; it takes
            precedence over the rule above, for every forward the method
            runs (the real one and those of the virtual step).
        comm: the ranks a batch is split over (:class:`gdw.distributed.Comm`);
            default: the default process group when one is initialised
            (torchrun), else one process.
        finetune_fraction: in [0, 1): for the last ⌈fraction · epochs⌉ epochs
            (at least one when > 0, but never the first epoch; set by
            ``on_epoch_start``) every
            ``backward`` trains with plain cross-entropy on the META batch
            instead (the method then needs meta batches). Default 0: the
            method as published. Any method can take it: a clean set is
            worth learning from directly.

    Bool hyper-parameters of every method (``head_only``, ``low_memory``,
    GDW's ``zero_mean``, LDAM's ``drw``) accept True/False, 1/0 and the
    strings true/false, yes/no, 1/0 in any case (:func:`check_bool`).
    """

    needs_meta = False  # True: backward needs x_meta, y_meta
    needs_inner_lr = False  # True: backward needs the learning rate of a virtual step
    needs_class_counts = False  # True: the constructor takes class_counts= (training-label counts)
    # parameters added after runs were recorded without them -> the value those runs used, so that
    # an older run whose behaviour the new parameter leaves unchanged is still recognised as equal
    ADDED_PARAMS: dict = {}

    def __init__(self, model: nn.Module, num_classes: int, *, optimizer: Optional[torch.optim.Optimizer] = None,
                 output: Optional[Callable[[Any], torch.Tensor]] = None, comm: Optional[Comm] = None,
                 finetune_fraction: float = 0.0):
        if not isinstance(model, nn.Module):
            raise UserError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if int(num_classes) < 2:
            raise UserError(f"num_classes must be at least 2, got {num_classes!r}")
        if output is not None and not callable(output):
            raise UserError(f"output must be None or a callable returning the logits, got {type(output).__name__}")
        self.model = model
        self.num_classes = int(num_classes)
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise UserError(f"optimizer must be None or a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.output = output
        if comm is not None and not isinstance(comm, Comm):
            raise UserError(f"comm must be None or a gdw.distributed.Comm, got {type(comm).__name__}")
        self.comm = comm  # None: the default process group when one is initialised (Comm())
        self.finetune_fraction = check_positive("finetune_fraction", finetune_fraction, allow_zero=True)
        if self.finetune_fraction >= 1:
            raise UserError(f"finetune_fraction must lie in [0, 1), got {finetune_fraction!r}")
        if self.finetune_fraction > 0:
            self.needs_meta = True  # the last epochs train on the meta batches
        self.finetuning = False
        self._values_checked = False  # set after the first backward: value checks on accelerators stop

    @property
    def fits_prior(self) -> str:
        """The class prior this method's training aims its predictions at:
        ``"train"`` (the training labels' shares: plain training),
        ``"meta"`` (the meta set's: methods that learn from a meta set, by
        weights or by fine-tuning on it) or ``"balanced"`` (every class
        alike: logit adjustment, class-balanced losses). ``gdw train``
        shifts the predictions of a method that does not aim at the run's
        target prior (:mod:`gdw.prior`)."""
        return "meta" if self.needs_meta else "train"

    # -- what subclasses implement -------------------------------------------------
    @classmethod
    def resolve_params(cls, params: dict) -> dict:
        """``params`` with the defaults that depend on other parameters
        filled in (a ``None`` default resolved), as the constructor resolves
        them; so that config.json records the values a run really used."""
        return params

    def logit_grad(self, fwd: TrainForward, y: torch.Tensor, x_meta, y_meta, lr) -> dict[str, Any]:
        """Return at least ``G`` (B×C, float32, the gradient to back-propagate
        from the logits) and ``weights``; may add ``meta_loss`` and
        ``instance_weights``."""
        raise NotImplementedError

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        """Called by the training loop before epoch ``epoch`` (0-based) of
        ``epochs``. It starts the fine-tuning phase (``finetune_fraction``);
        methods with a schedule of their own (deferred re-weighting) extend
        it. A user's loop must call it for those to take effect."""
        epoch, epochs = check_int("epoch", epoch, minimum=0), check_int("epochs", epochs)
        if self.finetune_fraction > 0:
            # the 1e-9 keeps e.g. 0.1 · 30 = 3.0000000000000004 at 3 epochs
            # at least one epoch, but never all of them: the first epoch always trains on the training set
            last = min(max(1, math.ceil(self.finetune_fraction * epochs - 1e-9)), epochs - 1)
            self.finetuning = epoch >= epochs - last
        else:
            self.finetuning = False

    def epoch_record(self) -> dict:
        """Numbers of the method's own for the epoch's row of ``metrics.jsonl``
        (called once per epoch by the training loop; none by default)."""
        return {}

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

    def forward(self, x) -> TrainForward:
        """The real forward of the training batch (updates BatchNorm stats once)."""
        rng = RngState(model_inputs.device_of(x, self.device))
        with torch.enable_grad():
            return TrainForward(self.model, x, logits_of(model_inputs.call(self.model, x), self.output), rng,
                                output=self.output, comm=self.comm if self.comm is not None else Comm())

    def meta_before_forward(self, x, x_meta, y_meta) -> Optional[MetaGradient]:
        """What the method computes from the meta batch before the real
        forward of ``x`` (``None``: nothing; see :class:`MetaMethod`)."""
        return None

    def backward(
        self,
        x,
        y: torch.Tensor,
        x_meta=None,
        y_meta: Optional[torch.Tensor] = None,
        *,
        inner_lr: Optional[float] = None,
    ) -> Stats:
        """Put the method's weighted gradient into the model's ``.grad``.

        Args:
            x: training inputs on the model's device: a tensor of shape
                (B, ...) (the model is called as ``model(x)``), a dict of
                tensors (keyword arguments: ``model(**x)``, e.g.
                ``input_ids`` and ``attention_mask``) or a tuple/list
                (positional arguments: ``model(*x)``); every tensor in a
                dict or tuple with a dimension holds one row per example
                (see :mod:`gdw.inputs`).
            y: (possibly noisy) integer labels in [0, C), shape (B,): the
                batch size is read from them.
            x_meta, y_meta: a clean meta batch, in any of the same forms
                (required by meta methods, ignored by the others).
            inner_lr: α of the virtual step (meta methods); defaults to the
                optimizer's current learning rate.

        Returns:
            :class:`Stats` (tensors on the model's device; nothing is copied
            to the host).

        Raises:
            UserError (a ValueError): labels outside [0, C) or not integers,
            logits whose last dimension is not C, a model output that holds
            no logits, x/y length mismatch, an empty or missing meta batch,
            non-finite inputs, a meta method without an inner learning rate.

        The checks of types, shapes and dtypes run on every call. The checks
        that read values (labels in [0, C), finite inputs) run on every call
        for tensors on the CPU, where they cost no synchronisation, but for
        tensors on an accelerator (CUDA, MPS, ...) only in the first call of
        ``backward`` of this method object, so that later steps never wait
        for the device. Out-of-range labels on an accelerator later on are
        then caught, if at all, by the device's own checks in cross-entropy.
        """
        y, y_meta = self.check_batch(x, y, x_meta, y_meta)
        if self.finetuning:
            return self._finetune_step(x_meta, y_meta)
        lr = self.inner_lr(inner_lr) if self.needs_inner_lr else None
        meta = self.meta_before_forward(x, x_meta, y_meta)
        fwd = self.forward(x)
        fwd.meta = meta
        z = fwd.logits
        fwd.backward_logits = z
        check_logits_shape(z, y.shape[0], self.num_classes)
        fwd.B = fwd.comm.count(y.shape[0], z.device)
        out = self.logit_grad(fwd, y, x_meta, y_meta, lr)
        self._backprop(fwd, out["G"].to(z.dtype))
        return self._stats(fwd, z, y, out)

    @staticmethod
    def _stats(fwd: TrainForward, z: torch.Tensor, y: torch.Tensor, out: dict) -> Stats:
        """The step's :class:`Stats` from the real forward's logits ``z`` and ``logit_grad``'s
        output (0-d device tensors: no host sync)."""
        meta_loss, instance_weights = out.get("meta_loss"), out.get("instance_weights")
        weights = out["weights"].detach()
        trust = out.get("trust")
        if trust is None:
            trust = weights.gather(1, y[:, None]).squeeze(1) if weights.ndim == 2 else weights
        with torch.no_grad():
            loss = fwd.comm.sum(F.cross_entropy(full(z.detach()), y, reduction="sum")) / fwd.B
        return Stats(loss=loss.float(), meta_loss=None if meta_loss is None else meta_loss.detach().float(),
                     weights=weights, logits=z.detach(), trust=trust.detach(),
                     instance_weights=None if instance_weights is None else instance_weights.detach())

    def _backprop(self, fwd: TrainForward, G: torch.Tensor) -> None:
        """Accumulate J_zᵀ G into the parameters' ``.grad`` (summed over ranks)."""
        if fwd.comm.active:  # sum the parameter gradient over ranks, then accumulate
            params = [p for p in self.model.parameters() if p.requires_grad]
            grads = [g if g is not None else torch.zeros_like(p)
                     for p, g in zip(params, torch.autograd.grad(fwd.backward_logits, params, G, allow_unused=True))]
            fwd.comm.sum_(grads)
            for p, g in zip(params, grads):
                p.grad = g if p.grad is None else p.grad + g
        else:
            fwd.backward_logits.backward(G)

    def _finetune_step(self, x_meta, y_meta: torch.Tensor) -> Stats:
        """The fine-tuning phase: plain cross-entropy on the meta batch (the
        training batch is checked but not forwarded, so BatchNorm statistics
        see the meta batch only). The Stats describe the meta batch:
        ``loss`` = ``meta_loss`` = its mean cross-entropy, ``weights`` = ones,
        ``trained_on="meta"``."""
        comm = self.comm if self.comm is not None else Comm()
        with torch.enable_grad():
            z = logits_of(model_inputs.call(self.model, x_meta), self.output)
        fwd = TrainForward(self.model, x_meta, z, None, output=self.output, comm=comm, backward_logits=z)
        fwd.B = comm.count(y_meta.shape[0], z.device)
        _, e = logit_error(z, y_meta, self.num_classes)
        self._backprop(fwd, (e / fwd.B).to(z.dtype))
        stats = self._stats(fwd, z, y_meta, {"weights": torch.ones(y_meta.shape[0], device=z.device, dtype=e.dtype)})
        return replace(stats, meta_loss=stats.loss, trained_on="meta")

    def _check_dtype(self, x, what: str) -> None:
        """Floating inputs must have the model's dtype (torch would raise a bare
        RuntimeError). A plain tensor only: a dict's or tuple's tensors (a float
        attention mask, say) are the model's to convert."""
        p = next((q for q in self.model.parameters() if q.is_floating_point()), None)
        if torch.is_tensor(x) and x.is_floating_point() and p is not None and x.dtype != p.dtype:
            raise UserError(f"the {what} inputs are {str(x.dtype).replace('torch.', '')} but the model's parameters "
                            f"are {str(p.dtype).replace('torch.', '')}: pass x.to({p.dtype}) (e.g. "
                            f"torch.as_tensor(array, dtype={p.dtype})), or convert the model")

    def check_batch(self, x, y, x_meta=None, y_meta=None):
        """Check a training batch (and, for a method with ``needs_meta``, the
        meta batch) as ``backward`` does; return the labels as int64,
        ``(y, y_meta)``. Value checks on an accelerator run only until the
        first call has passed them (see ``backward``)."""
        values = not self._values_checked
        n = model_inputs.check(x, "training", values=values)
        self._check_dtype(x, "training")
        y = _check_labels(y, n, self.num_classes, "training", values=values)
        if self.needs_meta:
            if x_meta is None or y_meta is None:
                raise UserError(f"{type(self).__name__} needs a meta batch: pass x_meta and y_meta")
            n_meta = model_inputs.check(x_meta, "meta", values=values)
            self._check_dtype(x_meta, "meta")
            y_meta = _check_labels(y_meta, n_meta, self.num_classes, "meta", values=values)
        self._values_checked = True
        return y, y_meta
