"""GDW, MW-Net and L2RW against an independent create_graph reference.

The reference below is written from docs/algorithms.md without the package's
engine: it deep-copies the model, builds the virtual parameters with a
``create_graph`` backward of the weighted loss, and differentiates the meta
loss through it (L2RW: explicit per-example gradient inner products).
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import gdw
from models import C, make_batch, make_model

LR = 0.3
B, BM = 8, 6


META_SHIFT = None  # (C,) added to the meta logits by the reference's meta loss, where a test sets it


def meta_loss_at(model, params, xm, ym):
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    z = functional_call(model, {**buffers, **params}, (xm,))
    return F.cross_entropy(z if META_SHIFT is None else z + META_SHIFT, ym)


def virtual_params(model, params, surrogate):
    """θ' = θ − α ∇_θ surrogate, keeping the graph (create_graph)."""
    grads = torch.autograd.grad(surrogate, list(params.values()), create_graph=True)
    return {n: p - LR * g for (n, p), g in zip(params.items(), grads)}


def reference(name, model, vnet, x, y, xm, ym, *, head_only=False, eta=None, clip=0.2, omega_min=1e-6,
              omega_max=1e6, p_max=0.999, zero_mean=True, stage_one="mwnet", weight_norm="kept", shift=None,
              class_grad=None, max_weight=None, shrink=0.0, info=None):
    """One step of ``name`` computed independently. Returns (weights, grads, vnet').

    GDW's options (η, c, ω clamp, p_max, zero-mean) are those of the paper;
    ``shift`` (C,) is the logit adjustment τ·log π added to the logits
    inside GDW's softmax (default none); ``weight_norm`` the scaling of
    stage one's L2RW weights (``"batch"``: to mean one over the batch,
    ``"kept"``: to mean one over the examples with a positive weight);
    ``max_weight`` a cap on the scaled stage-one weights (by default the
    package's default: 1 on L2RW's stage one; ``math.inf``: none);
    ``class_grad`` what the class-level step follows (``"raw"``: the
    gradient with respect to the constrained ω; ``"constrained"``: with
    respect to the unconstrained weights that the constraint maps to ω, by
    autograd through ``constrain``; by default the package's default for
    the stage one: constrained on L2RW's, raw on MW-Net's, the paper's);
    ``info`` (a dict) receives, for GDW, the meta loss, the stage-one v and
    how many entries the clip, the ω clamp and the p clamp changed, so that a
    test can check that an option was really in effect.
    """
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
    class_grad = class_grad or ("constrained" if stage_one == "l2rw" else "raw")
    p_raw = F.softmax(z.detach() + (0 if shift is None else shift), 1)
    p = p_raw.clamp(max=p_max)
    e = p - onehot

    def constrain(om):
        """Σ_j ω_ij e_ij = 0, solved for the labelled column:
        ω_{i,y_i} = −Σ_{j≠y_i} ω_ij e_ij / e_{i,y_i}."""
        if not zero_mean:
            return om
        rest = -(om * e * (1 - onehot)).sum(1) / (e * onehot).sum(1)
        return om * (1 - onehot) + rest[:, None] * onehot

    if stage_one == "l2rw":
        # the meta-gradient of per-logit weights at zero, i.e. at θ' = θ
        omega0 = torch.zeros(B, C, dtype=torch.float64, requires_grad=True)
        L = meta_loss_at(m, {**params, **virtual_params(m, virt, (omega0 * e * z).sum() / B)}, xm, ym)
        (g,) = torch.autograd.grad(L, [omega0])
        w = (-g.sum(1)).clamp(min=0)  # L2RW's weights, then scaled to mean one
        k = B if weight_norm == "batch" else int((w > 0).sum())  # ... over the batch or over those kept
        v = k * w / w.sum() if w.sum() > 0 else w
        if weight_norm == "binary":  # ... or one for each example kept
            v = (w > 0).double()
        cap = 1.0 if max_weight is None else max_weight
        if cap != float("inf"):
            v = torch.minimum(v, torch.full_like(v, cap))
        v = (1 - shrink) * v + shrink  # a mix with plain training's weights
        omega, V = constrain(v[:, None].expand(B, C)), None
        if class_grad == "constrained":  # L_meta is linear in ω at θ' = θ: the gradient at zero serves
            free = torch.zeros(B, C, dtype=torch.float64, requires_grad=True)
            Lc = meta_loss_at(m, {**params, **virtual_params(m, virt, (constrain(free) * e * z).sum() / B)}, xm, ym)
            (g,) = torch.autograd.grad(Lc, [free])
    else:
        v = V(losses)
        free = v[:, None].expand(B, C)
        omega = constrain(free)
        surrogate = (omega * e * z).sum() / B  # ∇_θ = J_zᵀ (ω ⊙ e) / B
        L = meta_loss_at(m, {**params, **virtual_params(m, virt, surrogate)}, xm, ym)
        out = torch.autograd.grad(L, [omega if class_grad == "raw" else free] + list(V.parameters()))
        g, vgrads = out[0], out[1:]
        adam_step(V, vgrads)
    raw = eta * g / g.abs().sum()
    moved = omega.detach() - raw.clamp(-clip, clip)
    kept = moved.clamp(omega_min, omega_max)
    omega = constrain(kept)
    if info is not None:
        # the constraint overwrites the labelled column: a clamp there has no effect
        counted = (1 - onehot).bool() if zero_mean else torch.ones_like(kept, dtype=torch.bool)
        info.update(meta_loss=L.detach(), v=v.detach(), clipped=int((raw.abs() > clip).sum()),
                    unclipped=int((raw.abs() < clip).sum()), omega_raised=int(((kept > moved) & counted).sum()),
                    omega_lowered=int(((kept < moved) & counted).sum()), p_clamped=int((p_raw > p_max).sum()))
    grads = torch.autograd.grad((omega * e * z).sum() / B, list(params.values()))
    return omega, grads, V


def adam_step(V, grads):
    opt = torch.optim.Adam(V.parameters(), lr=1e-3, weight_decay=1e-4)
    for p, g in zip(V.parameters(), grads):
        p.grad = g
    opt.step()


def run_method(name, model, x, y, xm, ym, **kw):
    method = gdw.make(name, model, C, **kw)
    if getattr(method, "vnet", None) is not None:
        method.vnet.double()
    vnet0 = copy.deepcopy(method.vnet) if getattr(method, "vnet", None) is not None else None
    stats = method.backward(x, y, xm, ym, inner_lr=LR)
    return method, vnet0, stats


CASES = [
    (name, kind, mode, head, False)
    for name in ("gdw", "mwnet", "l2rw")
    for kind in ("mlp", "cnn")
    for mode in ("jvp", "double")
    for head in (False, True)
] + [(name, kind, "jvp", False, True) for name in ("gdw", "mwnet", "l2rw") for kind in ("mlp", "cnn")]


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("mode,head_only,low_memory", [("jvp", False, False), ("double", False, False),
                                                       ("jvp", True, False), ("jvp", False, True)])
@pytest.mark.parametrize("eta", [3.0, None])
@pytest.mark.parametrize("weight_norm", [None, "batch"])
def test_gdw_on_l2rw_stage_one_matches_reference(kind, mode, head_only, low_memory, eta, weight_norm):
    """GDW with L2RW's instance weights as stage one, against the reference
    (the meta-gradient of per-logit weights at θ' = θ by create_graph), with
    the default scaling (mean one over the kept examples) and L2RW's own."""
    model = make_model(kind)
    x, y = make_batch(kind, B, 1)
    xm, ym = make_batch(kind, BM, 2)
    before = copy.deepcopy(model)
    kw = {"meta_grad": mode, "head_only": head_only, "low_memory": low_memory, "stage_one": "l2rw", "eta": eta,
          "max_weight": math.inf, **({"weight_norm": weight_norm} if weight_norm else {})}  # the scaling uncapped
    method, _, stats = run_method("gdw", model, x, y, xm, ym, **kw)
    assert method.vnet is None and method.state_dict() == {}  # no weighting network
    assert method.weight_norm == (weight_norm or "kept")
    info = {}
    w_ref, g_ref, _ = reference("gdw", before, None, x, y, xm, ym, head_only=head_only, eta=eta,
                                stage_one="l2rw", weight_norm=weight_norm or "kept", max_weight=math.inf, info=info)
    torch.testing.assert_close(stats.weights, w_ref.detach(), rtol=1e-10, atol=1e-10)
    v = stats.instance_weights
    mean = v.mean() if weight_norm == "batch" else v[v > 0].mean()
    torch.testing.assert_close(mean, torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(stats.instance_weights, info["v"], rtol=1e-10, atol=1e-10)
    for (n, p), g in zip(model.named_parameters(), g_ref):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-10, msg=f"gradient of {n}")
    if eta is None:
        assert info["clipped"] > 0  # at the default η the clip is in effect


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("mode,head_only", [("jvp", False), ("double", False), ("jvp", True), ("fd_central", False)])
@pytest.mark.parametrize("class_grad,other", [("constrained", "raw"), ("raw", "constrained")])
def test_gdw_class_grad_on_l2rw_matches_reference(kind, mode, head_only, class_grad, other):
    """class_grad on L2RW's stage one: with "constrained" (the default) the
    class-level step follows the gradient with respect to the weights the
    constraint leaves free (the reference differentiates through its own
    ``constrain``), with "raw" the gradient with respect to the constrained
    ω; the instance weights are L2RW's either way, and the two steps differ
    (so the option is in effect)."""
    model = make_model(kind)
    x, y = make_batch(kind, B, 1)
    xm, ym = make_batch(kind, BM, 2)
    before = copy.deepcopy(model)
    method, _, stats = run_method("gdw", model, x, y, xm, ym, meta_grad=mode, head_only=head_only, tau=0.0,
                                  class_grad=class_grad)
    assert method.class_grad == class_grad
    info = {}
    w_ref, g_ref, _ = reference("gdw", before, None, x, y, xm, ym, head_only=head_only, stage_one="l2rw",
                                class_grad=class_grad, info=info)
    tol = 1e-10 if mode != "fd_central" else 1e-5  # a finite difference: its own error, measured in test_meta_grad_fd
    torch.testing.assert_close(stats.instance_weights, info["v"], rtol=tol, atol=tol)
    torch.testing.assert_close(stats.weights, w_ref.detach(), rtol=tol, atol=tol)
    for (n, p), g in zip(model.named_parameters(), g_ref):
        torch.testing.assert_close(p.grad, g, rtol=tol, atol=tol, msg=f"gradient of {n}")
    other_w, _, _ = reference("gdw", before, None, x, y, xm, ym, head_only=head_only, stage_one="l2rw",
                              class_grad=other)
    assert float((other_w - w_ref).abs().max()) > 1e-3


def test_zero_mean_grad_is_the_gradient_through_the_constraint():
    """zero_mean_grad(g) = ∂⟨g, Z(ω)⟩/∂ω by autograd through an independent
    Z (ω_{i,y_i} = −Σ_{j≠y_i} ω_ij e_ij / e_{i,y_i}); it vanishes on the
    labelled column and does not see a shift of a row of g by a multiple of
    e_i (the part of the meta-gradient the constraint removes)."""
    from gdw.methods.gdw import zero_mean_grad

    gen = torch.Generator().manual_seed(0)
    Bn, Cn = 7, 5
    y = torch.randint(0, Cn, (Bn,), generator=gen)
    p = F.softmax(3 * torch.randn(Bn, Cn, generator=gen, dtype=torch.float64), 1).clamp(max=0.9)
    g = torch.randn(Bn, Cn, generator=gen, dtype=torch.float64)
    onehot = F.one_hot(y, Cn).double()
    e = p - onehot
    omega = torch.rand(Bn, Cn, generator=gen, dtype=torch.float64, requires_grad=True)
    label = -(omega * e * (1 - onehot)).sum(1) / (e * onehot).sum(1)
    constrained = omega * (1 - onehot) + label[:, None] * onehot
    (expected,) = torch.autograd.grad((g * constrained).sum(), [omega])
    got = zero_mean_grad(g, p, y)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert float((got * onehot).abs().max()) == 0.0
    k = torch.randn(Bn, 1, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(zero_mean_grad(g + k * e, p, y), got, rtol=1e-12, atol=1e-12)
    assert float((g - expected).abs().max()) > 1e-2  # and it is not g itself


def test_gdw_class_grad_defaults_and_errors():
    """The default follows the constrained gradient, the paper mode keeps
    the raw one; a run recorded before the
    parameter existed counts as raw; an unknown value is a one-line error."""
    from gdw.methods import recorded_params

    assert gdw.make("gdw", make_model("mlp"), C).class_grad == "constrained"
    assert gdw.make("gdw", make_model("mlp"), C, stage_one="mwnet").class_grad == "raw"
    assert recorded_params("gdw", {"stage_one": "l2rw"})["class_grad"] == "raw"
    with pytest.raises(gdw.UserError, match="class_grad must be one of raw, constrained"):
        gdw.make("gdw", make_model("mlp"), C, class_grad="projected")


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("mode", ["jvp", "double"])
def test_gdw_weights_scaled_over_the_kept_examples_matches_reference(kind, mode):
    """weight_norm="kept": L2RW's weights scaled to mean one over the examples
    whose weight is positive, against the reference; the batch must have
    examples at zero for the two scalings to differ (checked)."""
    model = make_model(kind)
    x, y = make_batch(kind, B, 1)
    xm, ym = make_batch(kind, BM, 2)
    before = copy.deepcopy(model)
    method, _, stats = run_method("gdw", model, x, y, xm, ym, meta_grad=mode, weight_norm="kept", tau=0.0,
                                  max_weight=math.inf)
    info = {}
    w_ref, g_ref, _ = reference("gdw", before, None, x, y, xm, ym, stage_one="l2rw", weight_norm="kept",
                                max_weight=math.inf, info=info)
    v = stats.instance_weights
    kept = v > 0
    assert 0 < int(kept.sum()) < B  # some examples are dropped, so "kept" is not "batch"
    torch.testing.assert_close(v[kept].mean(), torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(v, info["v"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(stats.weights, w_ref.detach(), rtol=1e-10, atol=1e-10)
    for (n, p), g in zip(model.named_parameters(), g_ref):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-10, msg=f"gradient of {n}")
    _, g_batch, _ = reference("gdw", before, None, x, y, xm, ym, stage_one="l2rw", weight_norm="batch",
                              max_weight=math.inf)
    assert max(float((a - b).abs().max()) for a, b in zip(g_ref, g_batch)) > 1e-6


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("mode", ["jvp", "double"])
def test_gdw_binary_weights_match_reference(kind, mode):
    """weight_norm="binary": one for each example L2RW keeps, zero for the
    rest, against the reference; the batch keeps some and drops some
    (checked)."""
    model = make_model(kind)
    x, y = make_batch(kind, B, 1)
    xm, ym = make_batch(kind, BM, 2)
    before = copy.deepcopy(model)
    method, _, stats = run_method("gdw", model, x, y, xm, ym, meta_grad=mode, weight_norm="binary", tau=0.0)
    info = {}
    w_ref, g_ref, _ = reference("gdw", before, None, x, y, xm, ym, stage_one="l2rw", weight_norm="binary", info=info)
    v = stats.instance_weights
    assert set(v.tolist()) == {0.0, 1.0}
    torch.testing.assert_close(v, info["v"], rtol=0, atol=0)
    torch.testing.assert_close(stats.weights, w_ref.detach(), rtol=1e-10, atol=1e-10)
    for (n, p), g in zip(model.named_parameters(), g_ref):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-10, msg=f"gradient of {n}")


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_gdw_shrunk_weights_match_reference(kind):
    """shrink=λ: the stage-one weights become (1 − λ)·v + λ, against the
    reference; with λ = 1 every example has weight one."""
    model = make_model(kind)
    x, y = make_batch(kind, B, 1)
    xm, ym = make_batch(kind, BM, 2)
    before = copy.deepcopy(model)
    for lam in (0.3, 1.0):
        m = copy.deepcopy(before)
        method, _, stats = run_method("gdw", m, x, y, xm, ym, meta_grad="jvp", shrink=lam, tau=0.0)
        info = {}
        w_ref, g_ref, _ = reference("gdw", before, None, x, y, xm, ym, stage_one="l2rw", shrink=lam, info=info)
        torch.testing.assert_close(stats.instance_weights, info["v"], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(stats.weights, w_ref.detach(), rtol=1e-10, atol=1e-10)
        for (n, p), g in zip(m.named_parameters(), g_ref):
            torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-10, msg=f"gradient of {n}")
    assert bool((stats.instance_weights == 1).all())
    with pytest.raises(gdw.UserError, match="shrink"):
        gdw.make("gdw", make_model("mlp"), C, shrink=1.5)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("mode", ["jvp", "double"])
def test_gdw_capped_weights_match_reference(kind, mode):
    """max_weight=1: the scaled stage-one weights are capped at one, against
    the reference; the batch must have a weight above one before the cap for
    the cap to act (checked), and none is above one after it."""
    model = make_model(kind)
    x, y = make_batch(kind, B, 1)
    xm, ym = make_batch(kind, BM, 2)
    before = copy.deepcopy(model)
    method, _, stats = run_method("gdw", model, x, y, xm, ym, meta_grad=mode, max_weight=1.0, tau=0.0)
    info, uncapped = {}, {}
    w_ref, g_ref, _ = reference("gdw", before, None, x, y, xm, ym, stage_one="l2rw", max_weight=1.0, info=info)
    reference("gdw", before, None, x, y, xm, ym, stage_one="l2rw", max_weight=math.inf, info=uncapped)
    assert float(uncapped["v"].max()) > 1.0  # the cap has something to cut
    assert float(stats.instance_weights.max()) <= 1.0
    torch.testing.assert_close(stats.instance_weights, info["v"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(stats.weights, w_ref.detach(), rtol=1e-10, atol=1e-10)
    for (n, p), g in zip(model.named_parameters(), g_ref):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-10, msg=f"gradient of {n}")
    with pytest.raises(gdw.UserError, match="max_weight"):
        gdw.make("gdw", make_model("mlp"), C, max_weight=0)


@pytest.mark.parametrize("kind,counts,meta,capped", [
    ("cnn", [10, 12, 9, 11], None, False),  # BatchNorm, classes about equally frequent: no cap
    ("cnn", [40, 12, 10, 11], None, True),  # a class 4 times as frequent as another: the cap
    ("cnn", None, None, True),  # class counts unknown: the cap
    ("mlp", [10, 12, 9, 11], None, True),  # no normalisation layer: the cap
    ("cnn", [10, 12, 9, 11], {"meta_counts": [6, 4, 4, 4]}, False),  # the meta set's shares play no part ...
    ("cnn", [10, 12, 9, 11], {"meta_counts": [6, 4, 4, 4], "cap_meta_ratio": 1.5}, True),  # ... unless asked: 1.5
    ("cnn", [10, 12, 9, 11], {"meta_counts": [5, 4, 4, 4], "cap_meta_ratio": 1.5}, False),  # 1.25 < 1.5
])
def test_gdw_auto_cap_is_the_reference_with_or_without_the_cap(kind, counts, meta, capped):
    """max_weight="auto" gives, step for step, the reference's weights and
    gradients with the cap of 1 or without any cap, as the model, the class
    counts and (with cap_meta_ratio) the meta set's counts decide (tau=0, so
    the counts only decide the cap)."""
    model = make_model(kind)
    x, y = make_batch(kind, B, 1)
    xm, ym = make_batch(kind, BM, 2)
    before = copy.deepcopy(model)
    method, _, stats = run_method("gdw", model, x, y, xm, ym, meta_grad="jvp", max_weight="auto", tau=0.0,
                                  class_counts=counts, **(meta or {}))
    cap = 1.0 if capped else math.inf
    assert method.decided_params == {"max_weight": 1.0 if capped else "inf"}
    why = ("no cap" if not capped else "no BatchNorm" if kind == "mlp" else "no class counts" if counts is None
           else "shares are uneven")
    assert why in method.cap_note
    info = {}
    w_ref, g_ref, _ = reference("gdw", before, None, x, y, xm, ym, stage_one="l2rw", max_weight=cap, info=info)
    torch.testing.assert_close(stats.instance_weights, info["v"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(stats.weights, w_ref.detach(), rtol=1e-10, atol=1e-10)
    for (n, p), g in zip(model.named_parameters(), g_ref):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-10, msg=f"gradient of {n}")
    if not capped:  # the batch has a weight the cap would have cut
        assert float(info["v"].max()) > 1.0
    with pytest.raises(gdw.UserError, match="max_weight"):
        gdw.make("gdw", make_model(kind), C, max_weight="sometimes")
    with pytest.raises(gdw.UserError, match="cap_meta_ratio"):
        gdw.make("gdw", make_model(kind), C, max_weight="auto", cap_meta_ratio=-1)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_gdw_logit_adjustment_matches_reference(kind, tau):
    """The default GDW with imbalanced class counts: e = softmax(z + τ log π)
    − onehot(y) throughout (stage one, class-level step, real gradient),
    against the reference given the shift τ log π computed here by hand."""
    counts = [40, 1, 7, 0, 12][:C] + [3] * max(0, C - 5)
    model = make_model(kind)
    x, y = make_batch(kind, B, 1)
    xm, ym = make_batch(kind, BM, 2)
    before = copy.deepcopy(model)
    method, _, stats = run_method("gdw", model, x, y, xm, ym, class_counts=counts, tau=tau, meta_grad="jvp")
    n = torch.tensor([max(c, 1) for c in counts], dtype=torch.float64)  # an empty class counts as one example
    shift = tau * torch.log(n / n.sum())
    info = {}
    w_ref, g_ref, _ = reference("gdw", before, None, x, y, xm, ym, stage_one="l2rw", shift=shift, info=info)
    torch.testing.assert_close(stats.weights, w_ref.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(stats.instance_weights, info["v"], rtol=1e-10, atol=1e-10)
    for (name, p), g in zip(model.named_parameters(), g_ref):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-10, msg=f"gradient of {name}")
    # and the shift made a difference: without it the reference's gradient is another one
    _, g_plain, _ = reference("gdw", before, None, x, y, xm, ym, stage_one="l2rw")
    assert max(float((a - b).abs().max()) for a, b in zip(g_ref, g_plain)) > 1e-4


@pytest.mark.parametrize("kind,mode,head_only", [("mlp", "jvp", False), ("cnn", "double", False),
                                                ("mlp", "fd", False), ("mlp", "jvp", True)])
def test_gdw_meta_loss_under_the_meta_sets_prior_matches_reference(kind, mode, head_only, monkeypatch):
    """meta_prior="meta" with an imbalanced meta set: the meta loss is
    CE(z_meta + log π_meta, y_meta) (π_meta from meta_counts, by hand here),
    against the reference whose meta loss adds that shift; with a balanced
    meta set, or meta_prior="model", it is the plain meta loss."""
    counts = [40, 1, 7, 0, 12][:C] + [3] * max(0, C - 5)
    meta_counts = [6, 1, 2, 3, 1][:C] + [2] * max(0, C - 5)
    model = make_model(kind)
    x, y = make_batch(kind, B, 1)
    xm, ym = make_batch(kind, BM, 2)
    before = copy.deepcopy(model)
    args = dict(class_counts=counts, meta_grad=mode, head_only=head_only)
    method, _, stats = run_method("gdw", model, x, y, xm, ym, meta_prior="meta", meta_counts=meta_counts, **args)
    n = torch.tensor([max(c, 1) for c in counts], dtype=torch.float64)
    nm = torch.tensor(meta_counts, dtype=torch.float64)
    monkeypatch.setitem(globals(), "META_SHIFT", torch.log(nm / nm.sum()))
    info = {}
    w_ref, g_ref, _ = reference("gdw", before, None, x, y, xm, ym, stage_one="l2rw", shift=torch.log(n / n.sum()),
                                head_only=head_only, info=info)
    if mode != "fd":  # the finite difference approximates J u (its own test bounds the error): the loss only
        torch.testing.assert_close(stats.weights, w_ref.detach(), rtol=1e-10, atol=1e-10)
        for (name, p), g in zip(model.named_parameters(), g_ref):
            torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-10, msg=f"gradient of {name}")
    torch.testing.assert_close(torch.as_tensor(float(stats.meta_loss), dtype=torch.float64),
                               info["meta_loss"].detach().to(torch.float64), rtol=1e-6, atol=1e-8)
    # the shift made a difference, and it is none with a balanced meta set or meta_prior="model"
    monkeypatch.setitem(globals(), "META_SHIFT", None)
    _, g_plain, _ = reference("gdw", before, None, x, y, xm, ym, stage_one="l2rw", shift=torch.log(n / n.sum()),
                              head_only=head_only)
    assert max(float((a - b).abs().max()) for a, b in zip(g_ref, g_plain)) > 1e-6
    assert gdw.make("gdw", make_model(kind), C, class_counts=counts, meta_prior="meta",
                    meta_counts=[4] * C).meta_shift is None
    assert gdw.make("gdw", make_model(kind), C, class_counts=counts, meta_prior="model",
                    meta_counts=meta_counts).meta_shift is None
    default = gdw.make("gdw", make_model(kind), C, class_counts=counts, meta_counts=meta_counts)  # "meta" since Q13
    torch.testing.assert_close(default.meta_shift, torch.log(nm / nm.sum()) - torch.log(nm / nm.sum()).mean())
    assert gdw.make("gdw", make_model(kind), C, stage_one="mwnet", class_counts=counts,
                    meta_counts=meta_counts).meta_shift is None  # the paper: no adjustment, no shift
    assert gdw.make("gdw", make_model(kind), C, meta_prior="meta", meta_counts=meta_counts).meta_shift is None
    with pytest.raises(gdw.UserError, match="meta_prior"):
        gdw.make("gdw", make_model(kind), C, meta_prior="test")


@pytest.mark.parametrize("counts,kw", [
    ([5] * C, {}),  # balanced labels: log π is the same for every class, softmax does not see it
    (None, {}),  # no counts given: nothing to adjust by
    ([40, 1, 7, 0, 12][:C] + [3] * max(0, C - 5), {"tau": 0.0}),
])
def test_gdw_logit_adjustment_is_a_no_op(counts, kw):
    """Balanced counts, no counts and τ = 0 give the unadjusted GDW, whose
    own reference test is above."""
    grads = []
    for extra in ({"class_counts": counts, **kw}, {"tau": 0.0}):
        model = make_model("mlp")
        x, y = make_batch("mlp", B, 1)
        xm, ym = make_batch("mlp", BM, 2)
        run_method("gdw", model, x, y, xm, ym, **extra)
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_gdw_paper_mode_takes_no_adjustment_by_default():
    """stage_one="mwnet" is the paper's algorithm: τ defaults to 0 even when
    the training loop passes class counts."""
    method = gdw.make("gdw", make_model("mlp"), C, stage_one="mwnet", class_counts=[40, 1, 7, 2, 12][:C] + [3] * (C - 5))
    assert method.tau == 0 and method.log_prior is None
    default = gdw.make("gdw", make_model("mlp"), C, class_counts=[40, 1, 7, 2, 12][:C] + [3] * (C - 5))
    assert default.tau == 1 and default.log_prior is not None


@pytest.mark.parametrize("name,kind,mode,head_only,low_memory", CASES)
def test_matches_create_graph_reference(name, kind, mode, head_only, low_memory):
    model = make_model(kind)
    x, y = make_batch(kind, B, 1)
    xm, ym = make_batch(kind, BM, 2)
    kw = {"meta_grad": mode, "head_only": head_only, "low_memory": low_memory}
    if name == "gdw":
        kw["eta"] = 3.0  # small enough that most entries are not clipped
        kw["stage_one"] = "mwnet"  # the paper's algorithm (the default's stage one has its own test)
    before = copy.deepcopy(model)
    method, vnet0, stats = run_method(name, model, x, y, xm, ym, **kw)
    w_ref, g_ref, V_ref = reference(name, before, vnet0, x, y, xm, ym, head_only=head_only, eta=kw.get("eta"))

    torch.testing.assert_close(stats.weights, w_ref.detach(), rtol=1e-10, atol=1e-10)
    for (n, p), g in zip(model.named_parameters(), g_ref):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-10, msg=f"gradient of {n}")
    if V_ref is not None:  # the weighting network took the same Adam step
        for a, b in zip(method.vnet.parameters(), V_ref.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
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
        if getattr(method, "vnet", None) is not None:
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
        torch.testing.assert_close(results[0][0], other[0], rtol=1e-10, atol=1e-10)
        for a, b in zip(results[0][1], other[1]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


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

    # Fourth-order central difference: its truncation error is O(h⁴). The
    # second-order one, (L(A+hD) − L(A−hD))/2h, cannot reach 1e-10 here: its
    # O(h²) error is ~5e-9 relative at h = 1e-5 on the CNN, and a smaller h
    # trades it for rounding error ~1e-16/h. h must also stay small enough
    # not to move a ReLU pre-activation across zero (h = 1e-3 does, on the CNN).
    gen = torch.Generator().manual_seed(4)
    h = 1e-4
    for _ in range(3):
        D = torch.randn(B, C, dtype=torch.float64, generator=gen)
        fd = (8 * (L(A + h * D) - L(A - h * D)) - (L(A + 2 * h * D) - L(A - 2 * h * D))) / (12 * h)
        torch.testing.assert_close((dA * D).sum(), fd, rtol=1e-10, atol=1e-10)


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
            torch.testing.assert_close(dA[i, j], expected, rtol=1e-10, atol=1e-12)


# GDW's options against the reference, each in a case where it really acts.
# Every setting names the counters of ``reference(info=...)`` that must be
# positive, so that a test cannot pass because the option never mattered.
OMEGA_WINDOW = {"mlp": (0.4, 0.55), "cnn": (0.65, 0.85)}  # around each model's stage-one v (≈ 0.47, ≈ 0.75)
GDW_SETTINGS = [
    # (id, constructor options, bias added to the logit of class y[0], counters that must be > 0)
    ("default-eta", {}, 0.0, ("clipped", "unclipped")),  # η = 10·C = 40: c = 0.2 clips most entries
    ("omega-clamp", {"omega_min": "window", "omega_max": "window"}, 0.0, ("clipped", "omega_raised", "omega_lowered")),
    ("p-max", {"p_max": 0.6}, 4.0, ("p_clamped",)),
    ("confident-defaults", {}, 30.0, ("p_clamped",)),  # the default p_max = 0.999 acts
    ("confident-no-zero-mean", {"zero_mean": False}, 30.0, ("p_clamped",)),
    ("no-zero-mean", {"zero_mean": False}, 0.0, ("clipped",)),
    ("class-grad-constrained", {"class_grad": "constrained"}, 0.0, ("clipped", "unclipped")),
    ("class-grad-constrained-confident", {"class_grad": "constrained"}, 30.0, ("p_clamped",)),
    ("class-grad-constrained-no-zero-mean", {"class_grad": "constrained", "zero_mean": False}, 0.0, ("clipped",)),
    ("all-options", {"eta": 7.0, "clip": 0.1, "omega_min": "window", "omega_max": "window", "p_max": 0.7,
                     "zero_mean": False}, 4.0, ("clipped", "unclipped", "p_clamped")),
]


@pytest.mark.parametrize("setting", GDW_SETTINGS, ids=[s[0] for s in GDW_SETTINGS])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("mode,head_only", [("jvp", False), ("double", False), ("jvp", True), ("double", True)])
def test_gdw_options_match_reference(setting, kind, mode, head_only):
    _, options, confidence, active = setting
    options = {k: OMEGA_WINDOW[kind][k == "omega_max"] if v == "window" else v for k, v in options.items()}
    model = make_model(kind)
    x, y = make_batch(kind, B, 1)
    xm, ym = make_batch(kind, BM, 2)
    if confidence:
        with torch.no_grad():
            model.fc.bias[y[0]] += confidence
    before = copy.deepcopy(model)
    method, vnet0, stats = run_method("gdw", model, x, y, xm, ym, meta_grad=mode, head_only=head_only,
                                      stage_one="mwnet", **options)
    info = {}
    w_ref, g_ref, V_ref = reference("gdw", before, vnet0, x, y, xm, ym, head_only=head_only, info=info, **options)
    for key in active:
        assert info[key] > 0, f"{key} not in effect: {info}"
    if "eta" not in options:
        assert method.eta == 10.0 * C

    torch.testing.assert_close(stats.weights, w_ref.detach(), rtol=1e-10, atol=1e-10)
    for (n, p), g in zip(model.named_parameters(), g_ref):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-10, msg=f"gradient of {n}")
    for a, b in zip(method.vnet.parameters(), V_ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(stats.trust, w_ref.detach().gather(1, y[:, None]).squeeze(1), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(stats.instance_weights, info["v"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(stats.meta_loss, info["meta_loss"].float())  # Stats.meta_loss is float32

    # the zero-mean constraint holds exactly when it is on, and clearly not when it is off
    p = F.softmax(before(x), 1).detach().clamp(max=options.get("p_max", 0.999))
    terms = stats.weights * (p - F.one_hot(y, C).double())
    rows = terms.sum(1).abs() / terms.abs().sum(1)  # |Σ_j ω_ij e_ij| relative to Σ_j |ω_ij e_ij|
    if options.get("zero_mean", True):
        assert rows.max() < 1e-12
    else:
        assert rows.max() > 1e-2


# Without a virtual step (L2RW, GDW's default stage one) the meta-gradient at θ
# is computed before the real forward, so that the meta batch's graph is gone
# before the training batch's is built. The other order is what the engine does
# when no precomputed u is handed over; both must give the same step.
ORDER_CASES = [("gdw", {}), ("l2rw", {}), ("gdw", {"meta_grad": "fd"}), ("l2rw", {"meta_grad": "fd_central"}),
               ("gdw", {"eta": 3.0, "meta_grad": "fd"})]


def steps_in_order(name, kw, kind, meta_first, monkeypatch, steps=3):
    """``steps`` SGD steps from a fixed state; returns what must not depend on the order."""
    model = make_model(kind, dropout=0.3) if kind == "mlp" else make_model(kind)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    method = gdw.make(name, model, C, optimizer=opt, **kw)
    if not meta_first:  # the old order: u after the real forward, by the engine itself
        monkeypatch.setattr(method, "meta_before_forward", lambda x, xm, ym: None)
    sizes = []
    model.register_forward_pre_hook(lambda m, inp: sizes.append(inp[0].shape[0]))
    torch.manual_seed(7)
    out = []
    for step in range(steps):
        x, y = make_batch(kind, B, 10 + step)
        xm, ym = make_batch(kind, BM, 20 + step)
        opt.zero_grad()
        stats = method.backward(x, y, xm, ym)
        out.append((stats.weights, stats.meta_loss, stats.logits, [p.grad.clone() for p in model.parameters()]))
        opt.step()
    state = ([p.detach().clone() for p in model.parameters()], [b.clone() for b in model.buffers()])
    return out, state, torch.get_rng_state(), sizes


@pytest.mark.parametrize("kind", ["mlp", "cnn"])  # the MLP has dropout, the CNN BatchNorm
@pytest.mark.parametrize("name,kw", ORDER_CASES, ids=[f"{n}-{'-'.join(map(str, k.values())) or 'default'}"
                                                      for n, k in ORDER_CASES])
def test_meta_gradient_first_equals_the_other_order(name, kw, kind, monkeypatch):
    new, new_state, new_rng, new_sizes = steps_in_order(name, kw, kind, True, monkeypatch)
    with monkeypatch.context() as m:
        old, old_state, old_rng, old_sizes = steps_in_order(name, kw, kind, False, m)
    # the meta batch (BM examples) goes first only in the new order
    extra = 2 if kw.get("meta_grad") == "fd_central" else 1
    assert new_sizes[: 2 + extra] == [BM, B] + [B] * extra
    assert old_sizes[: 2 + extra] == [B, BM] + [B] * extra
    for (wa, la, za, ga), (wb, lb, zb, gb) in zip(new, old):
        torch.testing.assert_close(wa, wb, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(la, lb, rtol=0, atol=0)
        torch.testing.assert_close(za, zb, rtol=0, atol=0)
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    for a, b in zip(new_state[0] + new_state[1], old_state[0] + old_state[1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert torch.equal(new_rng, old_rng)


@pytest.mark.parametrize("name", ["gdw", "l2rw"])
def test_no_virtual_step_keeps_the_plain_forward_and_random_stream(name):
    """The real forward sees the random state the step started with (the
    dropout masks of a plain step), and the meta pass does not advance the
    global stream: after ``backward`` it is where one plain forward leaves it."""
    model = make_model("mlp", dropout=0.3)
    plain = copy.deepcopy(model)
    x, y = make_batch("mlp", B, 1)
    xm, ym = make_batch("mlp", BM, 2)
    torch.manual_seed(3)
    expected = plain(x)
    after_plain = torch.get_rng_state()
    method = gdw.make(name, model, C)
    torch.manual_seed(3)
    stats = method.backward(x, y, xm, ym, inner_lr=LR)
    assert torch.equal(stats.logits, expected.detach())
    assert torch.equal(torch.get_rng_state(), after_plain)


def test_meta_gradient_leaves_buffers_and_parameters():
    """The meta pass at θ runs on copies of the buffers: BatchNorm running
    statistics, parameters and .grad are untouched, and u is ∇_θ L_meta(θ)."""
    from gdw.engine import RngState, meta_gradient

    model = make_model("cnn")
    with torch.no_grad():  # running statistics that a forward would visibly change
        model.bn.running_mean.fill_(0.5)
        model.bn.running_var.fill_(2.0)
    xm, ym = make_batch("cnn", BM, 2)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    meta = meta_gradient(model, xm, ym, RngState(xm.device))
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n]) and p.grad is None, n
    expected = torch.autograd.grad(meta_loss_at(model, dict(model.named_parameters()), xm, ym),
                                   list(model.parameters()))
    for (n, _), g in zip(model.named_parameters(), expected):
        torch.testing.assert_close(meta.u[n], g, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(meta.loss, meta_loss_at(model, dict(model.named_parameters()), xm, ym).detach())
