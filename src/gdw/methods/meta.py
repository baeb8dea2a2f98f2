"""The shared bases of the methods that learn their weights on a meta set:
:class:`MetaMethod` (a meta batch, a virtual step or none, the meta-gradient
through :mod:`gdw.engine`) and :class:`WeightNetMethod` (one that also owns a
weighting network V and its optimizer: MW-Net, and GDW's paper mode)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .. import inputs as model_inputs
from ..distributed import Comm
from ..engine import HeadCapture, MetaGradient, RngState, math_attention, meta_gradient, meta_logit_grad
from ..errors import UserError
from .base import Method
from .checks import check_bool, check_int, check_positive


class MetaMethod(Method):
    """A method that learns its weights from a meta set through a virtual step.

    Args (besides those of :class:`Method`):
        meta_grad: ``"jvp"`` (default; no second-order backward),
            ``"double"`` (create_graph reference, slower), ``"fd"`` (J_z u
            by a one-sided finite difference of the training logits: one
            forward without a graph instead of the JVP; relative error of
            ∂L_meta/∂A 2e-3 to 4e-3 on resnet32 in float32) or
            ``"fd_central"`` (central difference, two such forwards, 1e-3
            to 3e-3 there). See ``gdw.engine`` and benchmarks/fd_error.py.
            ``"jvp"``'s forward-mode pass, and with ``"double"`` every
            forward of the step, run ``scaled_dot_product_attention`` on its
            math backend (the fused kernels have no forward-mode derivative
            nor a derivative of their backward).
        fd_scale: c, the relative step of the finite-difference modes (the
            parameters move by c·‖θ‖); default ε_mach^(1/2)/10 of the
            model's dtype (3.5e-5 in float32). Ignored by the other modes.
        head_only: only the classifier head takes the virtual step (closed
            form, no extra pass through the backbone; exact for every
            ``meta_grad``, the finite-difference modes use the same closed
            form as ``"jvp"``).
        head: the head ``nn.Linear``; found automatically when omitted.
        low_memory: (with a virtual step; not ``double``, not head-only) do
            not keep the training batch's graph through the meta step;
            recompute the forward for the real backward instead. Peak memory
            of about one graph instead of two, for one more forward pass.
            Without a virtual step (L2RW, GDW's default ``stage_one="l2rw"``)
            it has no effect: u = ∇_θ L_meta(θ) is computed before the real
            forward (see :meth:`meta_before_forward`), so the two graphs are
            never alive together anyway.
    """

    needs_meta = True
    needs_inner_lr = True

    virtual_step = True  # False for L2RW, whose virtual model is θ itself
    meta_shift = None  # (C,) added to the meta logits before the meta loss (GDW's meta_prior="meta")

    def __init__(self, model, num_classes, *, meta_grad: str = "jvp", head_only: bool = False,
                 head=None, low_memory: bool = False, fd_scale: Optional[float] = None, **kw):
        super().__init__(model, num_classes, **kw)
        low_memory = check_bool("low_memory", low_memory)
        head_only = check_bool("head_only", head_only)
        if meta_grad not in ("jvp", "double", "fd", "fd_central"):
            raise UserError(f"meta_grad must be 'jvp', 'double', 'fd' or 'fd_central', got {meta_grad!r}")
        self.meta_grad = meta_grad
        self.fd_scale = None if fd_scale is None else check_positive("fd_scale", fd_scale)
        if self.fd_scale is not None and self.fd_scale >= 1:
            raise UserError(f"fd_scale must be below 1, got {fd_scale!r}")
        self.head_only = head_only or head is not None
        self.head = HeadCapture(model, self.num_classes, head) if self.head_only else None
        self.low_memory = low_memory

    @property
    def recompute(self) -> bool:
        """Free the training graph after the virtual step and re-run the
        forward for the real backward (``low_memory``, with a virtual step)."""
        return self.low_memory and self.virtual_step and self.meta_grad != "double" and self.head is None

    def meta_before_forward(self, x, x_meta, y_meta) -> Optional[MetaGradient]:
        """Without a virtual step, u = ∇_θ L_meta(θ) does not depend on the
        training batch: the meta forward and backward at θ run here, before
        the real forward, and their graph is freed before the training
        batch's is built (``"double"`` differentiates through the training
        graph and head-only needs no meta graph: both compute it later). The
        random state is read before the real forward reads it, and the meta
        pass leaves it as it was (:meth:`gdw.engine.RngState.meta_stream`)."""
        if self.virtual_step or self.head is not None or self.meta_grad == "double":
            return None
        return meta_gradient(self.model, x_meta, y_meta, RngState(model_inputs.device_of(x, self.device)),
                             comm=self.comm if self.comm is not None else Comm(), output=self.output,
                             num_classes=self.num_classes, shift=self.meta_shift)

    def forward(self, x):
        if self.meta_grad == "double" and self.head is None:
            # the reference differentiates through the backward of the real forward: the fused attention
            # kernels have no derivative of their backward, the math one has (see gdw.engine._jvp_tangent)
            with math_attention():
                fwd = super().forward(x)
        else:
            fwd = super().forward(x)
        if self.head is not None:
            fwd.head_input = self.head.check(fwd.logits)
        fwd.recompute = self.recompute
        return fwd

    def meta_step(self, fwd, A, x_meta, y_meta, lr):
        """``(meta_loss, ∂L_meta/∂A)`` for the virtual step ``θ − lr·J_zᵀA``."""
        return meta_logit_grad(fwd, A, x_meta, y_meta, lr, mode=self.meta_grad, head=self.head,
                               fd_scale=self.fd_scale, shift=self.meta_shift)


class WeightNet(nn.Module):
    """V: loss → weight in (0, 1). Input and output shape (B,)."""

    def __init__(self, hidden: int = 100):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, 1), nn.Sigmoid())

    def forward(self, loss: torch.Tensor) -> torch.Tensor:
        return self.net(loss.unsqueeze(1).to(self.net[0].weight.dtype)).squeeze(1)


class WeightNetMethod(MetaMethod):
    """A meta method that owns a weighting network V and its Adam optimizer.

    ``vnet`` and ``vopt`` are ``None`` when ``has_weight_net`` is false (a
    subclass sets it on the instance before this ``__init__`` runs, as GDW
    does on L2RW's stage one); V's settings are checked either way."""

    has_weight_net = True

    def __init__(self, model, num_classes, *, hidden: int = 100, meta_lr: float = 1e-3,
                 meta_weight_decay: float = 1e-4, **kw):
        super().__init__(model, num_classes, **kw)
        hidden, meta_lr = check_int("hidden", hidden), check_positive("meta_lr", meta_lr)
        meta_weight_decay = check_positive("meta_weight_decay", meta_weight_decay, allow_zero=True)
        self.vnet = self.vopt = None
        if self.has_weight_net:
            self.vnet = WeightNet(hidden).to(self.device)
            self.vopt = torch.optim.Adam(self.vnet.parameters(), lr=meta_lr, weight_decay=meta_weight_decay)

    def update_vnet(self, out: torch.Tensor, grad: torch.Tensor, comm) -> None:
        """One Adam step on V given ∂L_meta/∂out for an output ``out`` of V
        (V's gradient summed over ranks, so every rank takes the same step)."""
        self.vopt.zero_grad(set_to_none=True)
        out.backward(grad)
        comm.sum_([p.grad for p in self.vnet.parameters()])
        self.vopt.step()

    def state_dict(self) -> dict:
        return {} if self.vnet is None else {"vnet": self.vnet.state_dict(), "vopt": self.vopt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.vnet is not None:
            self.vnet.load_state_dict(state["vnet"])
            self.vopt.load_state_dict(state["vopt"])
