"""GDW, MW-Net and L2RW against an independent create_graph reference.

The reference below is written from ALGORITHMS.md without the package's
engine: it deep-copies the model, builds the virtual parameters with a
``create_graph`` backward of the weighted loss, and differentiates the meta
loss through it (L2RW: explicit per-example gradient inner products).
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import gdw
from models import C, make_batch, make_model

LR = 0.3
B, BM = 8, 6


def meta_loss_at(model, params, xm, ym):
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    return F.cross_entropy(functional_call(model, {**buffers, **params}, (xm,)), ym)


def virtual_params(model, params, surrogate):
    """θ' = θ − α ∇_θ surrogate, keeping the graph (create_graph)."""
    grads = torch.autograd.grad(surrogate, list(params.values()), create_graph=True)
    return {n: p - LR * g for (n, p), g in zip(params.items(), grads)}


def reference(name, model, vnet, x, y, xm, ym, *, head_only=False, eta=None):
    """One step of ``name`` computed independently. Returns (weights, grads, vnet')."""
    m = copy.deepcopy(model)
    V = copy.deepcopy(vnet) if vnet is not None else None
    params = dict(m.named_parameters())
    virt = {k: v for k, v in params.items() if not head_only or k.startswith("fc.")}
    z = m(x)
    onehot = F.one_hot(y, C).double()
    losses = F.cross_entropy(z, y, reduction="none").detach()

    if name == "l2rw":
        gm = torch.autograd.grad(meta_loss_at(m, params, xm, ym), list(virt.values()))
        g = torch.empty(B, dtype=torch.float64)
        for i in range(B):
            gi = torch.autograd.grad(F.cross_entropy(z[i : i + 1], y[i : i + 1]), list(virt.values()), retain_graph=True)
            g[i] = -(LR / B) * sum((a * b).sum() for a, b in zip(gm, gi))
        w = g.neg().clamp(min=0)
        w = w / w.sum() if w.sum() > 0 else w
        grads = torch.autograd.grad((w * F.cross_entropy(z, y, reduction="none")).sum(), list(params.values()))
        return w * B, grads, None

    if name == "mwnet":
        v = V(losses)
        surrogate = (v * F.cross_entropy(z, y, reduction="none")).sum() / B
        L = meta_loss_at(m, {**params, **virtual_params(m, virt, surrogate)}, xm, ym)
        vgrads = torch.autograd.grad(L, list(V.parameters()))
        adam_step(V, vgrads)
        w = V(losses).detach()
        grads = torch.autograd.grad((w * F.cross_entropy(z, y, reduction="none")).sum() / B, list(params.values()))
        return w, grads, V

    # gdw
    eta = 10.0 * C if eta is None else eta
    p = F.softmax(z.detach(), 1).clamp(max=0.999)
    e = p - onehot

    def constrain(om):
        rest = (om * p * (1 - onehot)).sum(1) / (1 - (p * onehot).sum(1))
        return om * (1 - onehot) + rest[:, None] * onehot

    omega = constrain(V(losses)[:, None].expand(B, C))
    surrogate = (omega * e * z).sum() / B  # ∇_θ = J_zᵀ (ω ⊙ e) / B
    L = meta_loss_at(m, {**params, **virtual_params(m, virt, surrogate)}, xm, ym)
    out = torch.autograd.grad(L, [omega] + list(V.parameters()))
    g, vgrads = out[0], out[1:]
    adam_step(V, vgrads)
    step = (eta * g / g.abs().sum()).clamp(-0.2, 0.2)
    omega = constrain((omega.detach() - step).clamp(1e-6, 1e6))
    grads = torch.autograd.grad((omega * e * z).sum() / B, list(params.values()))
    return omega, grads, V


def adam_step(V, grads):
    opt = torch.optim.Adam(V.parameters(), lr=1e-3, weight_decay=1e-4)
    for p, g in zip(V.parameters(), grads):
        p.grad = g
    opt.step()


def run_method(name, model, x, y, xm, ym, **kw):
    method = gdw.make(name, model, C, **kw)
    if hasattr(method, "vnet"):
        method.vnet.double()
    vnet0 = copy.deepcopy(method.vnet) if hasattr(method, "vnet") else None
    stats = method.backward(x, y, xm, ym, inner_lr=LR)
    return method, vnet0, stats


CASES = [
    (name, kind, mode, head, False)
    for name in ("gdw", "mwnet", "l2rw")
    for kind in ("mlp", "cnn")
    for mode in ("jvp", "double")
    for head in (False, True)
] + [(name, kind, "jvp", False, True) for name in ("gdw", "mwnet", "l2rw") for kind in ("mlp", "cnn")]


@pytest.mark.parametrize("name,kind,mode,head_only,low_memory", CASES)
def test_matches_create_graph_reference(name, kind, mode, head_only, low_memory):
    model = make_model(kind)
    x, y = make_batch(kind, B, 1)
    xm, ym = make_batch(kind, BM, 2)
    kw = {"meta_grad": mode, "head_only": head_only, "low_memory": low_memory}
    if name == "gdw":
        kw["eta"] = 3.0  # small enough that most entries are not clipped
    before = copy.deepcopy(model)
    method, vnet0, stats = run_method(name, model, x, y, xm, ym, **kw)
    w_ref, g_ref, V_ref = reference(name, before, vnet0, x, y, xm, ym, head_only=head_only, eta=kw.get("eta"))

    torch.testing.assert_close(stats.weights, w_ref.detach(), rtol=1e-5, atol=1e-9)
    for (n, p), g in zip(model.named_parameters(), g_ref):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-9, msg=f"gradient of {n}")
    if V_ref is not None:  # the weighting network took the same Adam step
        for a, b in zip(method.vnet.parameters(), V_ref.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)
    assert stats.meta_loss is not None and stats.meta_loss > 0


@pytest.mark.parametrize("name", ["gdw", "mwnet", "l2rw"])
def test_modes_agree_over_several_steps_with_dropout(name):
    """jvp replays the real forward's dropout masks, so it matches double
    (with or without recomputing the forward)."""
    results = []
    for mode, low in (("jvp", False), ("double", False), ("jvp", True)):
        model = make_model("mlp", dropout=0.3)
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
        method = gdw.make(name, model, C, meta_grad=mode, optimizer=opt, low_memory=low)
        if hasattr(method, "vnet"):
            torch.manual_seed(5)
            method.vnet = gdw.WeightNet().double()
            method.vopt = torch.optim.Adam(method.vnet.parameters(), lr=1e-3, weight_decay=1e-4)
        torch.manual_seed(7)
        for step in range(3):
            x, y = make_batch("mlp", B, 10 + step)
            xm, ym = make_batch("mlp", BM, 20 + step)
            opt.zero_grad()
            stats = method.backward(x, y, xm, ym)
            opt.step()
        results.append((stats.weights, [p.detach().clone() for p in model.parameters()]))
    for other in results[1:]:
        torch.testing.assert_close(results[0][0], other[0], rtol=1e-5, atol=1e-9)
        for a, b in zip(results[0][1], other[1]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("mode", ["jvp", "double"])
@pytest.mark.parametrize("head_only", [False, True])
def test_engine_gradient_matches_finite_difference(kind, mode, head_only):
    """∂L_meta/∂A from the engine equals a central finite difference of
    A ↦ CE(f(x_meta; θ − α J_zᵀA), y_meta), computed without the engine."""
    from gdw.engine import HeadCapture, RngState, TrainForward, meta_logit_grad

    model = make_model(kind)
    x, y = make_batch(kind, B, 1)
    xm, ym = make_batch(kind, BM, 2)
    head = HeadCapture(model, C) if head_only else None
    z = model(x)
    fwd = TrainForward(model, x, z, RngState(x.device), head.check(z) if head else None)
    A = torch.randn(B, C, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) / B
    _, dA = meta_logit_grad(fwd, A, xm, ym, LR, mode=mode, head=head)

    params = {n: p for n, p in model.named_parameters() if not head_only or n.startswith("fc.")}

    def L(Ai):
        grads = torch.autograd.grad(z, list(params.values()), Ai, retain_graph=True)
        virt = {n: p.detach() - LR * g for (n, p), g in zip(params.items(), grads)}
        with torch.no_grad():
            return meta_loss_at(model, virt, xm, ym)

    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        D = torch.randn(B, C, dtype=torch.float64, generator=gen)
        eps = 1e-5
        fd = (L(A + eps * D) - L(A - eps * D)) / (2 * eps)
        torch.testing.assert_close((dA * D).sum(), fd, rtol=1e-6, atol=1e-10)


def test_no_virtual_step_is_gradient_at_theta():
    """A=None (L2RW) gives −α J_z ∇_θ L_meta(θ): compare with autograd."""
    from gdw.engine import RngState, TrainForward, meta_logit_grad

    model = make_model("cnn")
    x, y = make_batch("cnn", B, 1)
    xm, ym = make_batch("cnn", BM, 2)
    z = model(x)
    _, dA = meta_logit_grad(TrainForward(model, x, z, RngState(x.device)), None, xm, ym, LR)
    params = dict(model.named_parameters())
    u = torch.autograd.grad(meta_loss_at(model, params, xm, ym), list(params.values()))
    for i in range(B):  # row i of J_z u is ⟨∂z_i/∂θ, u⟩, column by column
        for j in range(C):
            row = torch.autograd.grad(z[i, j], list(params.values()), retain_graph=True)
            expected = -LR * sum((a * b).sum() for a, b in zip(row, u))
            torch.testing.assert_close(dA[i, j], expected, rtol=1e-6, atol=1e-12)
