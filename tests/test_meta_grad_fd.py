"""meta_grad="fd" / "fd_central": J_z(θ)u by a finite difference of the
training logits, against the JVP and against an independent create_graph
reference written here without the engine.

Tolerances come from measured errors (benchmarks/fd_error.py prints the same
quantity for more step sizes): each is about ten times the largest error
measured on the three test models with the default step, so that a change of
seed or of BLAS does not break them while a wrong formula (a factor 2 in the
central difference, a missed mask replay, the wrong base point z(θ)) does.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import gdw
from gdw.engine import RngState, TrainForward, default_fd_scale, meta_logit_grad, stateless_forward, trainable
from models import C, make_batch, make_model

LR = 0.3
B, BM = 8, 6
KINDS = ["mlp", "cnn", "mlp_dropout"]
FD_MODES = ["fd", "fd_central"]
DTYPES = [torch.float64, torch.float32]

# Relative error ‖dA_fd − dA_exact‖/‖dA_exact‖ with the default step, largest
# over the three models as measured: float64 fd 3.8e-8, fd_central 2.4e-8;
# float32 fd 9.4e-4, fd_central 5.8e-4 (the JVP itself is within 1.5e-7 of
# the reference in float32, 1.7e-16 in float64). Tolerances: about 10×.
TOL = {
    (torch.float64, "fd"): 4e-7,
    (torch.float64, "fd_central"): 3e-7,
    (torch.float32, "fd"): 1e-2,
    (torch.float32, "fd_central"): 6e-3,
}


def build(kind, dtype, mode="train"):
    model = make_model("mlp", dropout=0.3) if kind == "mlp_dropout" else make_model(kind)
    model = model.to(dtype)
    model.train(mode == "train")
    return model


def batches(kind, dtype):
    base = "cnn" if kind == "cnn" else "mlp"
    x, y = make_batch(base, B, 1)
    xm, ym = make_batch(base, BM, 2)
    return x.to(dtype), y, xm.to(dtype), ym


def real_forward(model, x, y, seed=10):
    """The real forward (graph kept) and a GDW-like A = (softmax(z) − onehot(y)) / B."""
    torch.manual_seed(seed)
    rng = RngState(x.device)
    z = model(x)
    A = (F.softmax(z.detach(), 1) - F.one_hot(y, C).to(z.dtype)) / B
    return TrainForward(model, x, z, rng), A


def engine_dA(fwd, A, xm, ym, mode, meta_seed=20, **kw):
    torch.manual_seed(meta_seed)  # the meta forward's dropout masks, the same for every mode
    return meta_logit_grad(fwd, A, xm, ym, LR, mode=mode, **kw)[1]


def reference_dA(model, z, A, xm, ym, meta_seed=20):
    """∂/∂A of CE(f(x_meta; θ − α ∇_θ⟨A, z⟩)) by a create_graph backward."""
    params = dict(model.named_parameters())
    A_var = A.clone().requires_grad_()
    grads = torch.autograd.grad(z, list(params.values()), A_var, create_graph=True, retain_graph=True)
    virtual = {n: p - LR * g for (n, p), g in zip(params.items(), grads)}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    torch.manual_seed(meta_seed)
    meta_loss = F.cross_entropy(functional_call(model, {**buffers, **virtual}, (xm,)), ym)
    return torch.autograd.grad(meta_loss, A_var)[0]


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", FD_MODES)
def test_fd_matches_jvp_and_create_graph_reference(mode, kind, dtype):
    model = build(kind, dtype)
    x, y, xm, ym = batches(kind, dtype)
    fwd, A = real_forward(model, x, y)
    ref = reference_dA(model, fwd.logits, A, xm, ym)
    jvp = engine_dA(fwd, A, xm, ym, "jvp")
    fd = engine_dA(fwd, A, xm, ym, mode)
    assert fd.dtype == jvp.dtype and fd.shape == (B, C)
    # the JVP is exact up to rounding: 1.7e-16 (float64), 1.5e-7 (float32) measured
    assert rel(jvp, ref) < (1e-14 if dtype == torch.float64 else 2e-6)
    assert rel(fd, ref) < TOL[(dtype, mode)]
    assert rel(fd, jvp) < TOL[(dtype, mode)]


@pytest.mark.parametrize("kind", KINDS)
def test_error_shrinks_with_the_order_of_the_scheme(kind):
    """Float64, steps where truncation dominates: dividing c by 10 divides the
    one-sided error by 10 and the central error by 100 (measured 10.0 and
    100.0 on all three models between c = 1e-3 and 1e-4).
    A wrong step (e.g. 2h read as h) would leave an O(1) error instead."""
    model = build(kind, torch.float64)
    x, y, xm, ym = batches(kind, torch.float64)
    fwd, A = real_forward(model, x, y)
    jvp = engine_dA(fwd, A, xm, ym, "jvp")
    for mode, ratio in (("fd", 10), ("fd_central", 100)):
        e3 = rel(engine_dA(fwd, A, xm, ym, mode, fd_scale=1e-3), jvp)
        e4 = rel(engine_dA(fwd, A, xm, ym, mode, fd_scale=1e-4), jvp)
        assert 0.7 * ratio < e3 / e4 < 1.3 * ratio, (mode, e3, e4)


def test_dropout_mask_replay_matters():
    """With dropout, the shifted forward must reuse the real forward's masks:
    with another random state the one-sided difference is off by O(1)/h
    (measured relative error 1e8), with the right one it is 3.5e-8."""
    model = build("mlp_dropout", torch.float64)
    x, y, xm, ym = batches("mlp", torch.float64)
    fwd, A = real_forward(model, x, y)
    jvp = engine_dA(fwd, A, xm, ym, "jvp")
    assert rel(engine_dA(fwd, A, xm, ym, "fd"), jvp) < TOL[(torch.float64, "fd")]
    wrong = TrainForward(model, x, fwd.logits, RngState(x.device))  # the state after the real forward
    assert rel(engine_dA(wrong, A, xm, ym, "fd"), jvp) > 1.0


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("kind", KINDS)
def test_base_point_is_the_real_forward(kind, mode):
    """z(θ) of the one-sided difference is the real forward's logits: a
    stateless forward at θ (copied buffers, no graph, the real forward's
    random state) reproduces them bit for bit, in training mode (BatchNorm on
    batch statistics, dropout) and in eval mode (running statistics)."""
    model = build(kind, torch.float64, mode)
    x, y, _, _ = batches(kind, torch.float64)
    fwd, _ = real_forward(model, x, y)
    with torch.no_grad(), fwd.rng.replay():
        again = stateless_forward(model, trainable(model), x)
    assert torch.equal(again, fwd.logits.detach())


@pytest.mark.parametrize("mode", FD_MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_model_state_bit_identical(kind, mode):
    """The shifted forwards leave parameters and buffers (BatchNorm running
    statistics, num_batches_tracked) exactly as the real forward left them."""
    model = build(kind, torch.float64)
    x, y, xm, ym = batches(kind, torch.float64)
    fwd, A = real_forward(model, x, y)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    engine_dA(fwd, A, xm, ym, mode)
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n]), n
        assert p.grad is None, n
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n


def count_forwards(model):
    calls = []
    model.register_forward_pre_hook(lambda m, inp: calls.append(1))
    return calls


@pytest.mark.parametrize("mode,extra", [("jvp", 1), ("fd", 1), ("fd_central", 2)])
@pytest.mark.parametrize("recompute", [False, True])
def test_number_of_forwards(mode, extra, recompute):
    """Besides the meta forward at θ': the JVP or one shifted forward
    (one-sided) or two (central); recomputing adds the real backward's."""
    model = build("cnn", torch.float64)
    x, y, xm, ym = batches("cnn", torch.float64)
    fwd, A = real_forward(model, x, y)
    fwd.recompute = recompute
    calls = count_forwards(model)
    engine_dA(fwd, A, xm, ym, mode)
    assert len(calls) == 1 + extra + recompute
    assert (fwd.backward_logits is not None) == recompute


def test_zero_meta_gradient_gives_zero_without_a_forward():
    """u = 0 (or no parameter that moves): J_z u = 0, no shifted forward."""
    from gdw.engine import _fd_tangent

    model = build("cnn", torch.float64)
    x, y, _, _ = batches("cnn", torch.float64)
    fwd, _ = real_forward(model, x, y)
    params = trainable(model)
    calls = count_forwards(model)
    for u in ([torch.zeros_like(p) for p in params.values()], [None] * len(params)):
        for central in (False, True):
            out = _fd_tangent(fwd, list(params), list(params.values()), u, central, None)
            assert torch.equal(out, torch.zeros(B, C, dtype=torch.float64))
    assert calls == []


def test_default_scale_by_dtype():
    assert default_fd_scale([torch.float32]) == pytest.approx(torch.finfo(torch.float32).eps ** 0.5 / 10)
    assert default_fd_scale([torch.float64]) == pytest.approx(torch.finfo(torch.float64).eps ** 0.5 / 10)
    assert default_fd_scale([torch.float64, torch.bfloat16]) == default_fd_scale([torch.bfloat16])


def run_method(name, kind, dtype, meta_grad, low_memory=False, steps=2):
    """``steps`` optimizer steps; returns the last step's .grad and weights, the buffers."""
    model = build(kind, dtype)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    kw = {"eta": 3.0} if name == "gdw" else {}
    torch.manual_seed(5)
    method = gdw.make(name, model, C, meta_grad=meta_grad, optimizer=opt, low_memory=low_memory, **kw)
    if getattr(method, "vnet", None) is not None:
        method.vnet.to(dtype)
    torch.manual_seed(7)
    for step in range(steps):
        x, y, xm, ym = batches(kind, dtype)
        opt.zero_grad()
        stats = method.backward(x, y, xm, ym)
        grads = [p.grad.clone() for p in model.parameters()]
        if step < steps - 1:
            opt.step()
    return grads, stats.weights, {n: b.clone() for n, b in model.named_buffers()}


# .grad of the second step (all parameters flattened) and the weights, fd
# against jvp, relative; largest measured over the cases below: float64
# 1.2e-7, float32 2.2e-3 (both L2RW's weights on the CNN, one-sided; GDW
# 1.5e-4, MW-Net 2e-5 in float32, central about half). Tolerances: about 10×.
GRAD_TOL = {torch.float64: 1.5e-6, torch.float32: 2e-2}


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("low_memory", [False, True])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["gdw", "mwnet", "l2rw"])
def test_methods_fd_close_to_jvp(name, kind, low_memory, dtype):
    g_jvp, w_jvp, buf_jvp = run_method(name, kind, dtype, "jvp", low_memory)
    for mode in FD_MODES:
        g_fd, w_fd, buf_fd = run_method(name, kind, dtype, mode, low_memory)
        flat_fd, flat_jvp = torch.cat([g.flatten() for g in g_fd]), torch.cat([g.flatten() for g in g_jvp])
        assert rel(flat_fd, flat_jvp) < GRAD_TOL[dtype], mode
        assert rel(w_fd, w_jvp) < GRAD_TOL[dtype], mode
        # one real forward per step in both: the same running statistics
        for n in buf_jvp:
            torch.testing.assert_close(buf_fd[n], buf_jvp[n], rtol=GRAD_TOL[dtype], atol=GRAD_TOL[dtype])


@pytest.mark.parametrize("mode", FD_MODES)
def test_backward_leaves_buffers_as_one_plain_forward(mode):
    """Through the method: after backward, BatchNorm buffers are bit-identical
    to those of one plain forward of the batch, and parameters are unchanged."""
    model = build("cnn", torch.float64)
    plain = copy.deepcopy(model)
    x, y, xm, ym = batches("cnn", torch.float64)
    params = [p.detach().clone() for p in model.parameters()]
    plain(x)
    gdw.make("gdw", model, C, meta_grad=mode).backward(x, y, xm, ym, inner_lr=LR)
    for (n, a), b in zip(model.named_buffers(), plain.buffers()):
        assert torch.equal(a, b), n
    for a, b in zip(model.parameters(), params):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["gdw", "mwnet", "l2rw"])
@pytest.mark.parametrize("mode", FD_MODES)
def test_head_only_uses_the_exact_closed_form(name, mode):
    """head_only: the virtual step of the head is closed form and exact, so
    the finite-difference modes give exactly what jvp gives (no difference
    quotient is taken)."""
    out = {}
    for m in ("jvp", mode):
        model = build("cnn", torch.float64)
        x, y, xm, ym = batches("cnn", torch.float64)
        torch.manual_seed(5)
        method = gdw.make(name, model, C, meta_grad=m, head_only=True)
        if getattr(method, "vnet", None) is not None:
            method.vnet.double()
        calls = count_forwards(model)
        stats = method.backward(x, y, xm, ym, inner_lr=LR)
        out[m] = ([p.grad for p in model.parameters()], stats.weights, len(calls))
    for a, b in zip(out["jvp"][0], out[mode][0]):
        assert torch.equal(a, b)
    assert torch.equal(out["jvp"][1], out[mode][1])
    assert out["jvp"][2] == out[mode][2] == 2  # the real forward and the meta features


def test_invalid_options():
    model = build("mlp", torch.float64)
    with pytest.raises(ValueError, match="meta_grad"):
        gdw.make("gdw", model, C, meta_grad="fd2")
    for bad in (0, -1e-3, 1.0, float("nan"), "small"):
        with pytest.raises(ValueError, match="fd_scale"):
            gdw.make("gdw", model, C, meta_grad="fd", fd_scale=bad)
    x, y, xm, ym = batches("mlp", torch.float64)
    fwd, A = real_forward(model, x, y)
    with pytest.raises(ValueError, match="fd_scale"):
        meta_logit_grad(fwd, A, xm, ym, LR, mode="fd", fd_scale=0.0)
    with pytest.raises(ValueError, match="meta_grad"):
        meta_logit_grad(fwd, A, xm, ym, LR, mode="finite")


def test_fd_scale_reaches_the_engine():
    """A method's fd_scale= is the engine's c: a large step gives the large
    truncation error benchmarks/fd_error.py shows (1.4e-3 at c = 1e-2 on the MLP)."""
    results = {}
    for scale in (None, 1e-2):
        model = build("mlp", torch.float64)
        x, y, xm, ym = batches("mlp", torch.float64)
        method = gdw.make("l2rw", model, C, meta_grad="fd", fd_scale=scale)
        results[scale] = method.backward(x, y, xm, ym, inner_lr=LR).weights
    model = build("mlp", torch.float64)
    exact = gdw.make("l2rw", model, C).backward(x, y, xm, ym, inner_lr=LR).weights
    assert rel(results[None], exact) < 1e-6
    assert rel(results[1e-2], exact) > 1e-4


def test_gdw_default_meta_gradient_is_fd_and_the_paper_mode_exact():
    """GDW's defaults follow stage_one: the finite difference with its own
    stage one (whose agreement with jvp is test_methods_fd_close_to_jvp),
    the exact JVP in the paper's mode; either can be asked for, and
    config.json records the resolved value."""
    from gdw.methods import resolved_params

    assert gdw.make("gdw", make_model("mlp"), C).meta_grad == "fd"
    assert gdw.make("gdw", make_model("mlp"), C, stage_one="mwnet").meta_grad == "jvp"
    assert gdw.make("gdw", make_model("mlp"), C, meta_grad="jvp").meta_grad == "jvp"
    assert gdw.make("gdw", make_model("mlp"), C, stage_one="mwnet", meta_grad="fd").meta_grad == "fd"
    assert resolved_params("gdw", {})["meta_grad"] == "fd"
    assert resolved_params("gdw", {"stage_one": "mwnet"})["meta_grad"] == "jvp"
    assert gdw.make("l2rw", make_model("mlp"), C).meta_grad == "jvp"  # L2RW itself stays exact
