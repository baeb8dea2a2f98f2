"""The public API of the core methods: constraint, side effects, errors, state."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gdw
from models import C, make_batch, make_model

METHODS = ["ce", "gdw", "mwnet", "l2rw"]


def batches(kind="cnn"):
    return make_batch(kind, 8, 1) + make_batch(kind, 6, 2)


def build(name, model, **kw):
    m = gdw.make(name, model, C, **kw)
    if hasattr(m, "vnet"):
        m.vnet.double()
    return m


@pytest.mark.parametrize("head_only", [False, True])
def test_gdw_weights_satisfy_zero_mean_constraint(head_only):
    model = make_model("cnn")
    x, y, xm, ym = batches()
    with torch.no_grad():  # make some examples confident so the 0.999 clamp matters
        model.fc.bias[y[0]] = 30.0
    stats = build("gdw", model, head_only=head_only).backward(x, y, xm, ym, inner_lr=0.5)
    p = F.softmax(stats.logits, 1).clamp(max=0.999)
    e = p - F.one_hot(y, C).double()
    assert stats.weights.shape == (8, C)
    assert (stats.weights * e).sum(1).abs().max() < 1e-6
    assert not torch.allclose(stats.weights, stats.weights[:, :1].expand(-1, C))  # genuinely class-level


class Ones(nn.Module):
    def forward(self, loss):
        return torch.ones_like(loss)


def test_gdw_with_unit_weights_is_cross_entropy():
    model = make_model("cnn")
    x, y, xm, ym = batches()
    ref = copy.deepcopy(model)
    F.cross_entropy(ref(x), y).backward()
    method = build("gdw", model, eta=0.0)
    method.vnet = Ones()
    method.update_vnet = lambda *args: None
    stats = method.backward(x, y, xm, ym, inner_lr=0.1)
    torch.testing.assert_close(stats.weights, torch.ones(8, C, dtype=torch.float64))
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)


def test_ce_equals_autograd_and_accumulates():
    model = make_model("cnn")
    x, y, _, _ = batches()
    ref = copy.deepcopy(model)
    expected_loss = F.cross_entropy(ref(x), y)
    expected_loss.backward()
    F.cross_entropy(ref(x), y).backward()
    method = gdw.CE(model, C)
    s1 = method.backward(x, y)
    method.backward(x, y)
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad)
    assert s1.meta_loss is None and torch.equal(s1.weights, torch.ones(8, dtype=s1.weights.dtype))
    assert s1.loss == pytest.approx(expected_loss.item(), rel=1e-12)


@pytest.mark.parametrize(
    "name,head_only", [(n, h) for n in METHODS for h in (False, True, "low_memory") if n != "ce" or not h]
)
def test_running_stats_and_parameters_untouched(name, head_only):
    model = make_model("cnn")
    x, y, xm, ym = batches()
    ref = copy.deepcopy(model)
    ref(x)  # one plain forward of the training batch
    params_before = [p.detach().clone() for p in model.parameters()]
    kw = {"low_memory": True} if head_only == "low_memory" else {"head_only": True} if head_only else {}
    build(name, model, **kw).backward(x, y, xm, ym, inner_lr=0.5)
    for (n, a), b in zip(model.named_buffers(), ref.buffers()):
        assert torch.equal(a, b), n
    for a, b in zip(model.parameters(), params_before):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["gdw", "mwnet", "l2rw"])
def test_inner_lr_from_optimizer_or_error(name):
    x, y, xm, ym = batches()
    model = make_model("cnn")
    with pytest.raises(ValueError, match="inner_lr"):
        build(name, model).backward(x, y, xm, ym)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    torch.manual_seed(0)
    a = build(name, copy.deepcopy(model), optimizer=opt).backward(x, y, xm, ym)
    torch.manual_seed(0)
    b = build(name, copy.deepcopy(model)).backward(x, y, xm, ym, inner_lr=0.5)
    assert a.meta_loss == pytest.approx(b.meta_loss)


def bad_inputs():
    x, y, xm, ym = batches("mlp")
    yield "labels must lie in", (x, torch.full_like(y, C), xm, ym)
    yield "labels must lie in", (x, y - 5, xm, ym)
    yield "labels must be integers", (x, y.double(), xm, ym)
    yield "8 inputs but 7 labels", (x, y[:7], xm, ym)
    yield "meta batch is empty", (x, y, xm[:0], ym[:0])
    yield "needs a meta batch", (x, y, None, None)
    bad = x.clone()
    bad[0, 0] = float("nan")
    yield "NaN or infinite", (bad, y, xm, ym)
    bad = xm.clone()
    bad[1, 1] = float("inf")
    yield "NaN or infinite", (x, y, bad, ym)
    yield "meta labels must lie in", (x, y, xm, ym + C)


@pytest.mark.parametrize("message,args", list(bad_inputs()))
@pytest.mark.parametrize("name", ["gdw", "l2rw"])
def test_bad_input_raises_value_error(name, message, args):
    method = build(name, make_model("mlp"))
    with pytest.raises(ValueError, match=message):
        method.backward(*args, inner_lr=0.1)


def test_wrong_logit_width_is_named():
    model = make_model("mlp", c=C + 1)
    x, y, xm, ym = batches("mlp")
    with pytest.raises(ValueError, match=r"logits of shape \(B, 4\)"):
        build("gdw", model).backward(x, y, xm, ym, inner_lr=0.1)


def test_make_rejects_unknown_names_and_parameters():
    model = make_model("mlp")
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        gdw.make("nope", model, C)
    with pytest.raises(ValueError, match="has no parameter etta"):
        gdw.make("gdw", model, C, etta=1)
    with pytest.raises(ValueError, match="meta_grad"):
        gdw.make("gdw", model, C, meta_grad="hessian")
    with pytest.raises(ValueError, match="clip must be"):
        gdw.make("gdw", model, C, clip=-1)


def test_head_only_needs_a_head_that_produces_the_logits():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, C)

        def forward(self, x):
            return 2 * self.fc(x)

    x, y, xm, ym = batches("mlp")
    with pytest.raises(ValueError, match="head Linear"):
        gdw.make("gdw", Scaled().double(), C, head_only=True).backward(x, y, xm, ym, inner_lr=0.1)
    with pytest.raises(ValueError, match="out_features=4"):
        gdw.make("gdw", nn.Sequential(nn.Flatten()), C, head_only=True)


@pytest.mark.parametrize("name", ["gdw", "mwnet"])
def test_state_dict_round_trip(name):
    x, y, xm, ym = batches()
    a = build(name, make_model("cnn"))
    a.backward(x, y, xm, ym, inner_lr=0.5)
    state = copy.deepcopy(a.state_dict())
    b = build(name, make_model("cnn"))
    b.load_state_dict(state)
    for p, q in zip(a.vnet.parameters(), b.vnet.parameters()):
        assert torch.equal(p, q)
    # the next step is identical, Adam moments included
    ma, mb = make_model("cnn", seed=3), make_model("cnn", seed=3)
    a.model, b.model = ma, mb
    sa = a.backward(x, y, xm, ym, inner_lr=0.5)
    sb = b.backward(x, y, xm, ym, inner_lr=0.5)
    assert torch.equal(sa.weights, sb.weights)


@pytest.mark.parametrize("name,kw", [("ce", {}), ("gdw", {}), ("gdw", {"head_only": True}), ("mwnet", {}), ("l2rw", {}), ("dm", {})])
def test_bfloat16_autocast_gives_close_gradients(name, kw):
    """Mixed precision: backward under autocast (bfloat16, here on the CPU)
    gives gradients close to full precision's."""
    grads = []
    for amp in (False, True):
        model = make_model("cnn").float()
        x, y, xm, ym = (t.float() if t.is_floating_point() else t for t in batches())
        torch.manual_seed(0)
        method = gdw.make(name, model, C, **kw)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            method.backward(x, y, xm, ym, inner_lr=0.5)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.isfinite(grads[1]).all()
    cos = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)
    assert cos > 0.98, float(cos)
