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
    if getattr(m, "vnet", None) is not None:
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
    assert (stats.weights * e).sum(1).abs().max() < 1e-12
    assert not torch.allclose(stats.weights, stats.weights[:, :1].expand(-1, C))  # genuinely class-level


class Ones(nn.Module):
    def forward(self, loss):
        return torch.ones_like(loss)


def test_gdw_with_unit_weights_is_cross_entropy():
    model = make_model("cnn")
    x, y, xm, ym = batches()
    ref = copy.deepcopy(model)
    F.cross_entropy(ref(x), y).backward()
    method = build("gdw", model, eta=0.0, stage_one="mwnet")
    method.vnet = Ones()
    method.update_vnet = lambda *args: None
    stats = method.backward(x, y, xm, ym, inner_lr=0.1)
    torch.testing.assert_close(stats.weights, torch.ones(8, C, dtype=torch.float64), rtol=1e-10, atol=1e-10)
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
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-10)
    assert s1.meta_loss is None and torch.equal(s1.weights, torch.ones(8, dtype=torch.float64))
    # Stats.loss: a 0-d float32 tensor, detached, not a Python float
    assert isinstance(s1.loss, torch.Tensor) and s1.loss.shape == () and s1.loss.dtype == torch.float32
    assert not s1.loss.requires_grad
    torch.testing.assert_close(s1.loss, expected_loss.detach().float(), rtol=1e-7, atol=0)


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
    torch.testing.assert_close(a.meta_loss, b.meta_loss, rtol=0, atol=0)


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
    with pytest.raises(ValueError, match="stage_one must be one of mwnet, l2rw, got 'dm'"):
        gdw.make("gdw", model, C, stage_one="dm")
    with pytest.raises(ValueError, match="weight_norm must be one of batch, kept, binary, got 'mean'"):
        gdw.make("gdw", model, C, weight_norm="mean")


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


@pytest.mark.parametrize("name,kw", [("gdw", {"stage_one": "mwnet"}), ("mwnet", {})])
def test_state_dict_round_trip(name, kw):
    x, y, xm, ym = batches()
    a = build(name, make_model("cnn"), **kw)
    a.backward(x, y, xm, ym, inner_lr=0.5)
    state = copy.deepcopy(a.state_dict())
    b = build(name, make_model("cnn"), **kw)
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
    # the direction is not enough: a gradient scaled by 2 (or divided by B
    # twice) has cosine 1. Its norm must match full precision's too (measured:
    # within 0.3% for most methods, 2.7% for MW-Net, whose weighting network
    # also runs in bfloat16), and so must the vector itself (2.4–4.2%).
    norm_error = abs(float(grads[1].norm()) / float(grads[0].norm()) - 1)
    assert norm_error < 0.05, norm_error
    rel_error = float((grads[1] - grads[0]).norm() / grads[0].norm())
    assert rel_error < 0.1, rel_error


# -- Stats: a typed record of device tensors ------------------------------------
COUNTS = [3, 2, 2, 1]
ALL_METHODS = [
    ("ce", {}), ("gdw", {}), ("gdw", {"head_only": True}), ("gdw", {"meta_grad": "double"}),
    ("gdw", {"low_memory": True}), ("mwnet", {}), ("mwnet", {"head_only": True}), ("l2rw", {}),
    ("l2rw", {"low_memory": True}), ("dm", {}), ("focal", {}), ("gce", {}), ("sce", {}),
    ("cb", {"class_counts": COUNTS}), ("ldam", {"class_counts": COUNTS}),
    ("ldam", {"class_counts": COUNTS, "drw": True, "drw_epoch": 0}), ("finetune", {}),
]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items() if k != 'class_counts')}" for n, kw in ALL_METHODS]


def scalar_f32(t, device):
    return isinstance(t, torch.Tensor) and t.shape == () and t.dtype == torch.float32 and t.device == device \
        and not t.requires_grad


@pytest.mark.parametrize("name,kw", ALL_METHODS, ids=IDS)
def test_stats_fields_have_one_type_each(name, kw):
    model = make_model("cnn")
    x, y, xm, ym = batches()
    method = build(name, model, **kw)
    method.on_epoch_start(0, 2)
    stats = method.backward(x, y, xm, ym, inner_lr=0.5)
    dev = x.device
    assert scalar_f32(stats.loss, dev)
    with torch.no_grad():
        torch.testing.assert_close(stats.loss, F.cross_entropy(stats.logits, y).float())  # plain CE, whatever the method
    if name in ("gdw", "mwnet", "l2rw"):
        assert scalar_f32(stats.meta_loss, dev) and bool(stats.meta_loss > 0)
    else:
        assert stats.meta_loss is None
    assert stats.weights.shape == ((8, C) if name == "gdw" else (8,)) and not stats.weights.requires_grad
    assert stats.logits.shape == (8, C) and stats.logits.dtype == torch.float64 and not stats.logits.requires_grad
    assert stats.trust.shape == (8,) and not stats.trust.requires_grad
    if name in ("gdw", "dm"):
        assert stats.instance_weights.shape == (8,) and not stats.instance_weights.requires_grad
    else:
        assert stats.instance_weights is None
    assert stats.trained_on == "train"
    for t in (stats.weights, stats.trust):
        assert t.dtype == torch.float64 and t.device == dev  # float64 logits and weighting network


def test_finetune_stats_describe_the_meta_batch():
    model = make_model("cnn")
    x, y, xm, ym = batches()
    method = build("finetune", model)
    method.on_epoch_start(9, 10)
    stats = method.backward(x, y, xm, ym)
    assert stats.trained_on == "meta" and stats.logits.shape == (6, C) and stats.trust.shape == (6,)
    assert scalar_f32(stats.loss, x.device) and torch.equal(stats.meta_loss, stats.loss)


@pytest.mark.parametrize("name,kw", ALL_METHODS, ids=IDS)
def test_no_host_synchronisation_per_step(name, kw):
    """After the first call, ``backward`` never reads a value of a device
    tensor. Tensors on the ``meta`` device have no values at all, so any
    float()/int()/bool()/.item()/.tolist() of one raises; the whole step runs
    on it here (as on an accelerator after the first call)."""
    model = make_model("cnn").to("meta")
    x, y, xm, ym = (t.to("meta") for t in batches())
    method = build(name, model, **kw)
    if getattr(method, "vnet", None) is not None:
        method.vnet.to("meta")
    method.on_epoch_start(9, 10)  # finetune on the meta batch, LDAM re-weighted
    with pytest.raises((RuntimeError, NotImplementedError)):  # the first call does read values (its checks)
        method.backward(x, y, xm, ym, inner_lr=0.5)
    method._values_checked = True  # as after a first call that passed the checks
    for _ in range(2):
        stats = method.backward(x, y, xm, ym, inner_lr=0.5)
    assert scalar_f32(stats.loss, torch.device("meta"))


def test_value_checks_run_on_every_call_on_the_cpu():
    method = build("gdw", make_model("mlp"))
    x, y, xm, ym = batches("mlp")
    method.backward(x, y, xm, ym, inner_lr=0.1)
    with pytest.raises(ValueError, match="labels must lie in"):
        method.backward(x, y + C, xm, ym, inner_lr=0.1)
    bad = xm.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        method.backward(x, y, bad, ym, inner_lr=0.1)


# -- weights convention: where it holds exactly, and where it does not ---------
def logits_batch(seed, scale=1.5):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(8, C, dtype=torch.float64, generator=g), torch.randint(0, C, (8,), generator=g)


EXACT = [("ce", {}), ("cb", {"class_counts": COUNTS}), ("dm", {}), ("focal", {}), ("gce", {}), ("sce", {}),
         ("l2rw", {}), ("mwnet", {}), ("finetune", {}), ("gdw", {})]


@pytest.mark.parametrize("name,kw", EXACT, ids=[n for n, _ in EXACT])
def test_weights_convention_holds_exactly(name, kw):
    """The logit gradient (``b.grad`` of the Logits model) is weights ⊙ (softmax(z) − onehot(y)) / B."""
    from models import Logits

    z, y = logits_batch(1)
    zm, ym = logits_batch(2)
    model = Logits(8, C)
    stats = build(name, model, **kw).backward(z, y, zm, ym, inner_lr=0.5)
    assert bool((F.softmax(z, 1) < 0.999).all())  # GDW's p clamp does not act here
    w = stats.weights if stats.weights.ndim == 2 else stats.weights[:, None]
    e = F.softmax(z, 1) - F.one_hot(y, C).double()
    torch.testing.assert_close(model.b.grad, w * e / 8, rtol=1e-10, atol=1e-14)


def test_weights_convention_for_gdw_uses_the_clamped_p():
    from models import Logits

    z, y = logits_batch(1)
    z[0, y[0]] += 20  # p_{0,y_0} ≈ 1 > p_max
    zm, ym = logits_batch(2)
    model = Logits(8, C)
    stats = build("gdw", model).backward(z, y, zm, ym, inner_lr=0.5)
    onehot = F.one_hot(y, C).double()
    e_clamped = F.softmax(z, 1).clamp(max=0.999) - onehot
    torch.testing.assert_close(model.b.grad, stats.weights * e_clamped / 8, rtol=1e-10, atol=1e-14)
    e_softmax = F.softmax(z, 1) - onehot
    assert not torch.allclose(model.b.grad[0], (stats.weights * e_softmax / 8)[0], rtol=1e-3, atol=0)


def test_weights_of_ldam_are_a_projection():
    from models import Logits

    z, y = logits_batch(1, scale=1.0)
    model = Logits(8, C)
    stats = build("ldam", model, class_counts=COUNTS, s=2.0).backward(z, y)
    e = F.softmax(z, 1) - F.one_hot(y, C).double()
    G = model.b.grad
    residual = G - stats.weights[:, None] * e / 8
    torch.testing.assert_close((residual * e).sum(1), torch.zeros(8, dtype=torch.float64), rtol=0, atol=1e-14)
    assert float(residual.abs().max()) > 1e-3  # genuinely not parallel: the convention does not hold exactly


# -- constructor checks: optimizer and bool hyper-parameters ---------------------
@pytest.mark.parametrize("bad", ["sgd", 0.1, torch.nn.Linear(2, 2), [1]])
def test_optimizer_must_be_an_optimizer(bad):
    with pytest.raises(gdw.UserError, match=f"optimizer must be None or a torch.optim.Optimizer, got {type(bad).__name__}"):
        gdw.make("gdw", make_model("mlp"), C, optimizer=bad)
    gdw.make("ce", make_model("mlp"), C, optimizer=None)


@pytest.mark.parametrize("value,expected", [
    (True, True), (False, False), (1, True), (0, False), ("true", True), ("FALSE", False), ("Yes", True),
    ("no", False), ("1", True), ("0", False), (" True ", True),
])
def test_check_bool_accepts(value, expected):
    from gdw.methods.base import check_bool

    assert check_bool("flag", value) is expected


@pytest.mark.parametrize("value", ["maybe", "nope", "", "on", 2, -1, 0.5, 1.0, None, [True]])
def test_check_bool_rejects(value):
    from gdw.methods.base import check_bool

    with pytest.raises(gdw.UserError, match="flag must be True or False"):
        check_bool("flag", value)


def bool_parameters():
    """Every keyword-only parameter with a bool default, of every registered method."""
    import inspect

    for name in gdw.METHODS.names():
        for klass in gdw.METHODS.get(name).__mro__:
            for param, spec in inspect.signature(klass.__init__).parameters.items() if "__init__" in vars(klass) else ():
                if spec.kind == spec.KEYWORD_ONLY and isinstance(spec.default, bool):
                    yield name, param


BOOL_PARAMETERS = sorted(set(bool_parameters()))


def test_the_bool_parameters_are_the_known_ones():
    params = {p for _, p in BOOL_PARAMETERS}
    assert {"head_only", "low_memory", "zero_mean", "drw"} <= params, params


@pytest.mark.parametrize("name,param", BOOL_PARAMETERS)
def test_every_bool_parameter_is_checked(name, param):
    kw = {"class_counts": COUNTS} if gdw.METHODS.get(name).needs_class_counts else {}
    for bad in ("maybe", "nope", 2, None):
        with pytest.raises(gdw.UserError, match=f"{param} must be True or False"):
            gdw.make(name, make_model("mlp"), C, **kw, **{param: bad})
    for good, expected in (("yes", True), ("No", False), (1, True), (0, False), (True, True)):
        method = gdw.make(name, make_model("mlp"), C, **kw, **{param: good})
        assert getattr(method, param) is expected, (param, good)


@pytest.mark.parametrize("name,kw,recompute", [
    ("mwnet", {}, True), ("gdw", {"stage_one": "mwnet"}, True), ("gdw", {"stage_one": "mwnet", "meta_grad": "double"}, False),
    ("gdw", {"stage_one": "mwnet", "head_only": True}, False), ("gdw", {}, False), ("l2rw", {}, False),
])
def test_low_memory_recomputes_only_with_a_virtual_step(name, kw, recompute):
    """Without a virtual step the meta-gradient is computed before the real
    forward, so the two graphs never coexist and low_memory has nothing to save."""
    method = gdw.make(name, make_model("mlp"), C, low_memory=True, **kw)
    assert method.low_memory is True and method.recompute is recompute


def test_gdw_defaults_and_the_paper_one_setting_away():
    default = gdw.make("gdw", make_model("mlp"), C)
    assert (default.stage_one, default.finetune_fraction, default.needs_meta) == ("l2rw", 0.2, True)
    assert default.vnet is None and not default.virtual_step
    paper = gdw.make("gdw", make_model("mlp"), C, stage_one="mwnet")
    assert (paper.stage_one, paper.finetune_fraction, paper.virtual_step) == ("mwnet", 0.0, True)
    for epoch in range(10):
        paper.on_epoch_start(epoch, 10)
        assert not paper.finetuning  # the paper never trains on the meta set
    assert gdw.make("gdw", make_model("mlp"), C, stage_one="mwnet", finetune_fraction=0.1).finetune_fraction == 0.1


@pytest.mark.parametrize("where", ["training", "meta"])
def test_float64_inputs_to_a_float32_model_are_one_clear_error(where):
    """numpy arrays are float64 by default; torch alone would raise a bare
    RuntimeError about mat1 and mat2 dtypes."""
    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    xd = x.double()
    method = gdw.make("l2rw", model, 2)
    with pytest.raises(gdw.UserError, match=f"the {where} inputs are float64 but the model's parameters are float32"):
        method.backward(xd if where == "training" else x, y, xd if where == "meta" else x, y, inner_lr=0.1)
    method.backward(x, y, x, y, inner_lr=0.1)  # float32 as the model: fine
    assert model.weight.grad is not None
