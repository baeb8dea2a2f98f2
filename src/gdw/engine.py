"""The meta-gradient engine shared by every method that learns from a meta set.

Every weighted method changes only the gradient that reaches the logits. With
``z = f(x; θ)`` the logits of a training batch, a method picks a B×C matrix
``A`` of per-logit gradients; the *virtual* SGD step is

    θ' = θ − α · J_z(θ)ᵀ A,

and the meta loss is ``L_meta = CE(f(x_meta; θ'), y_meta)``. This module
returns ``L_meta`` and its gradient with respect to ``A``:

    ∂L_meta/∂A = −α · J_z(θ) u,     u = ∇_θ' L_meta.

θ' is linear in A, so no second-order back-propagation is needed: one
backward pass at θ' gives ``u`` and one forward-mode Jacobian-vector product
gives ``J_z(θ) u`` (``mode="jvp"``). ``mode="double"`` is the slow reference:
it differentiates through a ``create_graph`` backward, as the original code
did. ``mode="fd"`` replaces the Jacobian-vector product by a one-sided
finite difference of the training logits along ``u``,

    J_z(θ) u ≈ ‖u‖ · (z(θ + h·u/‖u‖) − z(θ)) / h,     h = c · ‖θ‖,

where ``z(θ)`` is the real forward's output (already there), so it costs one
forward without a graph; ``mode="fd_central"`` uses
``(z(θ + h·u/‖u‖) − z(θ − h·u/‖u‖)) / 2h`` for two such forwards and a
smaller error. ``c`` defaults to ε_mach^(1/2) / 10 of the coarsest dtype among
the parameters and the logits (3.5e-5 in float32, 1.5e-9 in float64); see
:func:`default_fd_scale`. ``head=`` restricts the virtual step to the
classifier head ``z = W h + b``, where everything is closed-form (for every
mode).

Order of the passes. With a virtual step (``A`` given) u depends on the
training batch through θ', so the real forward comes first and its graph
serves the virtual step's backward J_zᵀA (and, unless ``recompute``, the real
backward): the training batch's graph is alive while the meta batch's is, about
twice a plain step's memory. Without a virtual step (``A=None``: L2RW, GDW with
``stage_one="l2rw"``) u = ∇_θ L_meta(θ) does not depend on the training batch,
and the methods compute it *before* the real forward
(:func:`meta_gradient`: the meta forward and backward at θ through the
stateless forward, its graph freed on return) and hand it over in
``TrainForward.meta``. Then come the real forward, J_z(θ)u (the JVP, or the
finite difference that reuses the real forward's logits) and the real backward,
so the two graphs are never alive together and a step's peak memory is about
one plain step's. Called on a ``TrainForward`` without ``meta``,
:func:`meta_logit_grad` computes u itself after the real forward (the other
order); both orders give the same numbers: the meta pass runs on copies of the
buffers (whose values before or after the real forward do not change
BatchNorm's output: training mode normalises with the batch's own statistics,
evaluation mode does not update the running ones), and its random numbers
(dropout) come from a generator seeded from the random state at the start of
the step (:meth:`RngState.meta_stream`), whichever pass runs first. The global
random stream then advances by the real forward alone, as in a plain step; the
JVP and the shifted forwards replay the real forward's state (same masks).
``meta_grad="double"`` and ``head=`` keep the order real forward first (the
reference differentiates through the training graph; the head-only meta pass
runs without a graph).

Nothing here changes the model: parameters are read, never written, and every
extra forward runs on a copy of the buffers, so BatchNorm running statistics
are left as the user's own forward left them. The model is called through
``torch.func.functional_call``; no layer is rewritten. Its inputs may be a
tensor, a dict of keyword arguments or a tuple of positional ones (every
forward here calls it through :func:`gdw.inputs.call`; the batch size is the
labels' length). Its output may be the
logits or hold them (``.logits``, ``["logits"]``, first element of a
tuple/list, or an ``output=`` callable): every forward here takes them with
:func:`logits_of`, the forward-mode one inside the dual level.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn
import torch.nn.functional as F

from . import inputs as model_inputs
from .distributed import Comm
from .errors import UserError

from .forward import (HeadCapture, MetaGradient, RngState, TrainForward, check_logits_shape,  # noqa: F401
                      full, logits_of, math_attention, stateless_forward, trainable)  # (re-exported)

MODES = ("jvp", "double", "fd", "fd_central")


def meta_gradient(model: nn.Module, x_meta: "model_inputs.Inputs", y_meta: torch.Tensor, rng: RngState, *,
                  comm: Optional[Comm] = None, output: Optional[Callable[[Any], torch.Tensor]] = None,
                  num_classes: Optional[int] = None, shift: Optional[torch.Tensor] = None) -> MetaGradient:
    """u = ∇_θ L_meta(θ): the meta forward and backward at the current
    parameters, through the stateless forward (copied buffers), with the
    random numbers of :meth:`RngState.meta_stream` of ``rng`` (the state at
    the start of the step). Its graph is freed before this returns, so
    calling it before the real forward keeps the two graphs apart.
    ``num_classes``: check the meta logits' shape. ``shift`` (C,): added to
    the meta logits before the meta loss (see :func:`meta_logit_grad`)."""
    comm = comm if comm is not None else Comm()
    params = trainable(model)
    leaves = {n: p.detach().requires_grad_() for n, p in params.items()}
    with torch.enable_grad():
        with rng.meta_stream():
            meta_logits = stateless_forward(model, leaves, x_meta, output)
        if num_classes is not None:
            check_logits_shape(meta_logits, y_meta.shape[0], num_classes)
        meta_loss = _meta_ce(meta_logits, y_meta, comm, shift)
        u = torch.autograd.grad(meta_loss, list(leaves.values()), allow_unused=True)
    comm.sum_(u)
    correct = (full(meta_logits).detach().argmax(-1) == y_meta).sum()
    return MetaGradient(meta_loss.detach(), dict(zip(leaves, u)), correct)


def meta_logit_grad(
    fwd: TrainForward,
    A: Optional[torch.Tensor],
    x_meta: "model_inputs.Inputs",
    y_meta: torch.Tensor,
    lr: float,
    *,
    mode: str = "jvp",
    head: Optional[HeadCapture] = None,
    fd_scale: Optional[float] = None,
    shift: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Meta loss after a virtual step, and its gradient with respect to ``A``.

    Args:
        fwd: the real forward of the training batch (its logits keep their graph).
            With ``A=None``, ``fwd.meta`` (if set) is u at θ, computed before
            that forward by :func:`meta_gradient`, and the meta batch is not
            read again (except by ``"double"`` and ``head``).
        A: B×C per-logit gradient of the virtual step (already divided by B), or
            ``None`` for no step at all (θ' = θ, as in L2RW).
        x_meta, y_meta: a clean meta batch (``x_meta`` a tensor, a dict of
            keyword arguments or a tuple of positional ones, as ``fwd.x``).
        lr: α, the step of the virtual plain-SGD step.
        mode: ``"jvp"`` (no second-order backward), ``"double"`` (reference),
            ``"fd"`` (one-sided finite difference instead of the JVP: one
            forward without a graph) or ``"fd_central"`` (central: two).
        head: restrict the virtual step to this head (closed form; ``mode``
            then only tells ``"double"`` from the rest, the finite-difference
            modes use the same exact closed form as ``"jvp"``).
        fd_scale: c, the relative step of the finite difference (its
            parameter-space step is c·‖θ‖); default :func:`default_fd_scale`.
        shift: (C,) or None: added to the meta logits before the meta
            cross-entropy, L_meta = CE(z_meta + shift, y_meta) (GDW's
            ``meta_prior="meta"``: the model's logits moved to the meta
            set's class prior).

    Returns:
        ``(meta_loss, dA)``: the scalar meta loss (detached) and ∂L_meta/∂A,
        a float32 B×C tensor.
    """
    if mode not in MODES:
        raise UserError(f"meta_grad must be one of {MODES}, got {mode!r}")
    if head is not None:
        return _head_only(fwd, A, x_meta, y_meta, lr, mode, head, shift)
    if fd_scale is not None and not (isinstance(fd_scale, (int, float)) and 0 < fd_scale < 1):
        raise UserError(f"fd_scale must be a number in (0, 1), got {fd_scale!r}")
    if mode == "double":
        with math_attention():
            return _double(fwd, A, x_meta, y_meta, lr, shift)
    return _first_order(fwd, A, x_meta, y_meta, lr, mode, fd_scale, shift)


def _first_order(fwd, A, x_meta, y_meta, lr, mode="jvp", fd_scale=None, shift=None):
    """``jvp`` and the finite-difference modes: u by one backward at θ' (at θ
    without a virtual step, usually done before the real forward), then
    J_z(θ) u by forward-mode AD or by a finite difference."""
    params = trainable(fwd.model)
    names, ps = list(params), list(params.values())
    if A is None:  # θ' = θ: u does not depend on the training batch, usually computed before its forward
        meta = fwd.meta
        if meta is None:
            meta = meta_gradient(fwd.model, x_meta, y_meta, fwd.rng, comm=fwd.comm, output=fwd.output,
                                 shift=shift)
        meta_loss, u = meta.loss, [meta.u[n] for n in names]
    else:
        grads = torch.autograd.grad(
            fwd.logits, ps, A.to(fwd.logits.dtype), retain_graph=not fwd.recompute, allow_unused=True
        )
        fwd.comm.sum_(grads)
        virtual = [(p.detach() if g is None else p.detach() - lr * g).requires_grad_() for p, g in zip(ps, grads)]
        meta_logits = stateless_forward(fwd.model, dict(zip(names, virtual)), x_meta, fwd.output)
        meta_loss = _meta_ce(meta_logits, y_meta, fwd.comm, shift)
        u = torch.autograd.grad(meta_loss, virtual, allow_unused=True)
        fwd.comm.sum_(u)
    tangent = (_jvp_tangent(fwd, names, ps, u) if mode == "jvp"
               else _fd_tangent(fwd, names, ps, u, mode == "fd_central", fd_scale))
    if fwd.recompute:  # the graph for the real backward, from the same random state
        with fwd.rng.replay(), torch.enable_grad():
            fwd.backward_logits = stateless_forward(fwd.model, params, fwd.x, fwd.output)
    return fwd.comm.sum(meta_loss.detach()), -lr * full(tangent)


def _jvp_tangent(fwd, names, ps, u):
    """J_z(θ) u: one forward-mode pass at θ on the training batch, with the
    random state of the real forward (same dropout masks).

    ``scaled_dot_product_attention`` runs on its math backend here: its fused
    kernels (flash, memory-efficient; what Hugging Face models use by
    default) have no forward-mode derivative, the math one is composed of
    ops that do. Its value is the same up to rounding; with attention
    dropout in training mode, though, its dropout masks are drawn otherwise
    than a fused kernel's, so the JVP is then taken of a forward with other
    attention masks (the finite-difference modes replay the real forward's
    kernel and masks; or build the model with eager attention)."""
    with fwAD.dual_level(), fwd.rng.replay(), math_attention():
        duals = {n: p.detach() if t is None else fwAD.make_dual(p.detach(), t) for n, p, t in zip(names, ps, u)}
        # the logits are taken from the output inside the dual level, before unpacking
        tangent = fwAD.unpack_dual(stateless_forward(fwd.model, duals, fwd.x, fwd.output)).tangent
    return tangent if tangent is not None else torch.zeros_like(fwd.logits)  # None: no parameter reaches the logits


def default_fd_scale(dtypes) -> float:
    """c of the finite difference, ε_mach^(1/2) / 10 for the coarsest of
    ``dtypes``: 3.5e-5 in float32, 1.5e-9 in float64, for both schemes.

    On a smooth model the error is truncation (∝ c one-sided, ∝ c² central)
    plus rounding (∝ ε_mach / c), smallest near c = ε_mach^(1/2) one-sided
    and ε_mach^(1/3) central. On a ReLU network a third term dominates: the
    units whose pre-activation crosses zero within the step, an error that
    grows with c for both schemes (about ∝ c^(1/2) on resnet32, measured by
    benchmarks/fd_error.py). A tenth of ε_mach^(1/2) keeps that term small
    while rounding stays below it: relative error 2e-3 to 4e-3 (one-sided)
    and 1e-3 to 3e-3 (central) on resnet32 in float32 (batch 100 and 32),
    7e-4 and 4e-4 on the small test models, against 1e-2 to 2e-2 at
    c = 1e-3. Pass ``fd_scale=`` for a smooth model,
    where the central scheme reaches about 1e-5 at c = 1e-3 in float32.
    """
    eps = max(torch.finfo(d).eps for d in dtypes)
    return eps ** 0.5 / 10


def _fd_tangent(fwd, names, ps, u, central: bool, scale: Optional[float]):
    """J_z(θ) u by a finite difference of the training logits along u.

    The step in parameter space is h = c·‖θ‖ (all trainable parameters; c if
    θ = 0) in the direction u/‖u‖; u is already summed over ranks and θ is the same on every
    rank, so every rank takes the same step. Each shifted forward runs
    without a graph, on copies of the buffers (BatchNorm in the model's own
    mode, batch statistics in training mode, as in the real forward) and
    with the real forward's random state, so that ``z(θ)`` below can be the
    real forward's logits: only the parameters differ.
    """
    pairs = [(n, p.detach(), t) for n, p, t in zip(names, ps, u)]
    moving = [t for _, _, t in pairs if t is not None]
    u_norm = float(torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(t, dtype=torch.float64) for t in moving]))) if moving else 0.0
    if u_norm == 0.0:  # no parameter moves, or u = 0: J_z u = 0
        return torch.zeros_like(full(fwd.logits.detach()))
    theta_norm = float(torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(p, dtype=torch.float64) for _, p, _ in pairs])))
    if scale is None:
        scale = default_fd_scale([fwd.logits.dtype] + [p.dtype for _, p, _ in pairs])
    h = scale * (theta_norm if theta_norm > 0 else 1.0)

    def logits_at(sign):
        shifted = {n: p if t is None else torch.add(p, t, alpha=sign * h / u_norm) for n, p, t in pairs}
        with torch.no_grad(), fwd.rng.replay():
            return full(stateless_forward(fwd.model, shifted, fwd.x, fwd.output))

    if central:
        return (logits_at(1.0) - logits_at(-1.0)) * (u_norm / (2 * h))
    return (logits_at(1.0) - full(fwd.logits.detach())) * (u_norm / h)


def _meta_ce(meta_logits, y_meta, comm: Comm, shift=None):
    """This rank's share of the mean meta cross-entropy over all ranks, on
    the logits plus ``shift`` (C,) where given."""
    total = comm.count(y_meta.shape[0], meta_logits.device)
    return F.cross_entropy(_shifted(full(meta_logits), shift), y_meta, reduction="sum") / total


def _shifted(logits, shift):
    return logits if shift is None else logits + shift.to(logits.device, logits.dtype)


def _meta_random_state(fwd, A):
    """Where the meta forward draws its random numbers: without a virtual step
    (``A=None``) from :meth:`RngState.meta_stream`, as :func:`meta_gradient`
    does (the same masks in either order of the passes); with one, from the
    global stream after the real forward."""
    return fwd.rng.meta_stream() if A is None and fwd.rng is not None else contextlib.nullcontext()


def _double(fwd, A, x_meta, y_meta, lr, shift=None):
    params = trainable(fwd.model)
    names, ps = list(params), list(params.values())
    A_var = (torch.zeros_like(full(fwd.logits)) if A is None else full(A.detach())).requires_grad_()
    grads = torch.autograd.grad(
        fwd.logits, ps, A_var.to(fwd.logits.dtype), create_graph=True, retain_graph=True, allow_unused=True
    )
    virtual = {n: p.detach() if g is None else p.detach() - lr * fwd.comm.sum_autograd(g)
               for n, p, g in zip(names, ps, grads)}
    with _meta_random_state(fwd, A):
        meta_logits = stateless_forward(fwd.model, virtual, x_meta, fwd.output)
    meta_loss = _meta_ce(meta_logits, y_meta, fwd.comm, shift)
    (dA,) = torch.autograd.grad(meta_loss, A_var, retain_graph=True)
    return fwd.comm.sum(meta_loss.detach()), dA


def _head_only(fwd, A, x_meta, y_meta, lr, mode, head: HeadCapture, shift=None):
    comm = fwd.comm
    h = full(fwd.head_input)
    W, b = head.module.weight, head.module.bias
    with torch.no_grad(), _meta_random_state(fwd, A):  # meta features at θ; the backbone does not move
        stateless_forward(fwd.model, trainable(fwd.model), x_meta, fwd.output)
    hm = full(head.input.detach())
    Bm = comm.count(hm.shape[0], hm.device)
    A_var = h.new_zeros(h.shape[0], W.shape[0]) if A is None else full(A.detach())
    if mode == "double":
        A_var.requires_grad_()
        Wv = full(W.detach()) - lr * comm.sum_autograd(A_var.t() @ h)
        bv = None if b is None else full(b.detach()) - lr * comm.sum_autograd(A_var.sum(0))
        meta_loss = F.cross_entropy(_shifted(F.linear(hm, Wv, bv), shift), y_meta, reduction="sum") / Bm
        (dA,) = torch.autograd.grad(meta_loss, A_var)
        return comm.sum(meta_loss.detach()), dA
    with torch.no_grad():
        Wv = full(W) - lr * comm.sum(A_var.t() @ h)
        bv = None if b is None else full(b) - lr * comm.sum(A_var.sum(0))
        meta_logits = _shifted(F.linear(hm, Wv, bv), shift)
        meta_loss = comm.sum(F.cross_entropy(meta_logits, y_meta, reduction="sum") / Bm)
        em = (meta_logits.softmax(1) - F.one_hot(y_meta, W.shape[0]).to(hm.dtype)) / Bm
        Ju = h @ comm.sum(em.t() @ hm).t()  # (J u)_i = u_W h_i + u_b
        if b is not None:
            Ju = Ju + comm.sum(em.sum(0))
    return meta_loss, -lr * Ju
