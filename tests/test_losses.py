"""Robust and imbalance losses (focal, cb, ldam, gce, sce) and the fine-tuning baseline.

Each loss method must put into ``.grad`` exactly autograd's gradient of its
published formula, written out again here, and reduce to cross-entropy at its
documented limit.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import gdw
from models import C, Logits, make_batch, make_model

COUNTS = [50, 20, 5, 1]  # per-class training counts for cb / ldam


def probs(z, y):
    p = F.softmax(z, 1)
    return p, p.gather(1, y[:, None]).squeeze(1)


# -- the published formulas, written out independently --------------------------
def focal_ref(z, y, gamma=2.0):
    _, pt = probs(z, y)
    return (-((1 - pt) ** gamma) * torch.log(pt)).mean()


def cb_weights_ref(counts, beta):
    n = torch.tensor(counts, dtype=torch.float64)
    w = (1 - beta) / (1 - beta**n)
    return w / w.sum() * len(counts)


def cb_ref(z, y, beta=0.9999, counts=COUNTS):
    ce = -torch.log(probs(z, y)[1])
    return (cb_weights_ref(counts, beta)[y] * ce).mean()


def ldam_ref(z, y, max_margin=0.5, s=30.0, counts=COUNTS, drw=False):
    m = torch.tensor(counts, dtype=torch.float64) ** -0.25
    m = m * max_margin / m.max()
    zm = s * (z - m[y][:, None] * F.one_hot(y, C))
    ce = -torch.log(probs(zm, y)[1])
    if not drw:
        return ce.mean()
    w = cb_weights_ref(counts, 0.9999)[y]
    return (w * ce).sum() / w.sum()


def gce_ref(z, y, q=0.7):
    return ((1 - probs(z, y)[1] ** q) / q).mean()


def sce_ref(z, y, alpha=0.1, beta=1.0):
    p, pt = probs(z, y)
    ce = -torch.log(pt)
    label = F.one_hot(y, C).double().clamp(1e-4, 1.0)
    rce = -(p * torch.log(label)).sum(1)
    return (alpha * ce + beta * rce).mean()


def la_ref(z, y, tau=1.0, counts=COUNTS):
    prior = torch.tensor(counts, dtype=torch.float64) / sum(counts)
    return -torch.log(probs(z + tau * torch.log(prior), y)[1]).mean()


def ce_ref(z, y):
    return -torch.log(probs(z, y)[1]).mean()


CASES = [
    ("focal", {}, focal_ref),
    ("focal", {"gamma": 0.5}, lambda z, y: focal_ref(z, y, 0.5)),
    ("cb", {"class_counts": COUNTS}, cb_ref),
    ("cb", {"class_counts": COUNTS, "beta": 0.99}, lambda z, y: cb_ref(z, y, 0.99)),
    ("ldam", {"class_counts": COUNTS}, ldam_ref),
    ("ldam", {"class_counts": COUNTS, "max_margin": 1.0, "s": 2.0}, lambda z, y: ldam_ref(z, y, 1.0, 2.0)),
    ("gce", {}, gce_ref),
    ("gce", {"q": 1.0}, lambda z, y: gce_ref(z, y, 1.0)),
    ("sce", {}, sce_ref),
    ("sce", {"alpha": 6.0, "beta": 0.1}, lambda z, y: sce_ref(z, y, 6.0, 0.1)),
    ("la", {"class_counts": COUNTS}, la_ref),
    ("la", {"class_counts": COUNTS, "tau": 2.5}, lambda z, y: la_ref(z, y, 2.5)),
]

CE_LIMITS = [
    ("focal", {"gamma": 0}, 1e-10),
    ("cb", {"class_counts": COUNTS, "beta": 0}, 1e-10),
    ("sce", {"alpha": 1, "beta": 0}, 1e-10),
    ("ldam", {"class_counts": COUNTS, "max_margin": 0, "s": 1}, 1e-10),
    ("gce", {"q": 1e-6}, 1e-5),
    ("la", {"class_counts": COUNTS, "tau": 0}, 1e-10),
    ("la", {"class_counts": [7, 7, 7, 7]}, 1e-10),  # a uniform prior shifts every logit equally
]


def batch(n=8):
    x, y = make_batch("mlp", n, 1)
    y[:4] = torch.arange(4)  # every class present
    return x, y


def grads_of(model):
    return [p.grad for p in model.parameters()]


def method_and_reference(name, kw, ref_loss):
    """One backward of the method on an MLP, and autograd of ``ref_loss`` on a copy."""
    model = make_model("mlp")
    ref = copy.deepcopy(model)
    x, y = batch()
    ref_loss(ref(x), y).backward()
    stats = gdw.make(name, model, C, **kw).backward(x, y)
    return model, ref, stats, x, y


def assert_same_grads(model, ref, rtol):
    for a, b in zip(grads_of(model), grads_of(ref)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * 1e-3)


@pytest.mark.parametrize("name,kw,ref_loss", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_gradient_equals_autograd_of_the_published_formula(name, kw, ref_loss):
    model, ref, stats, x, y = method_and_reference(name, kw, ref_loss)
    assert_same_grads(model, ref, 1e-10)
    with torch.no_grad():
        # Stats.loss stays plain CE, as a 0-d float32 tensor
        assert stats.loss.shape == () and stats.loss.dtype == torch.float32
        torch.testing.assert_close(stats.loss, F.cross_entropy(ref(x), y).float(), rtol=1e-7, atol=0)
    assert stats.weights.shape == (8,) and stats.meta_loss is None


@pytest.mark.parametrize("name,kw,rtol", CE_LIMITS, ids=[c[0] for c in CE_LIMITS])
def test_reduces_to_cross_entropy_at_its_limit(name, kw, rtol):
    model, ref, stats, _, _ = method_and_reference(name, kw, ce_ref)
    assert_same_grads(model, ref, rtol)
    torch.testing.assert_close(stats.weights, torch.ones(8, dtype=stats.weights.dtype), rtol=rtol, atol=rtol)


@pytest.mark.parametrize("name,kw,ref_loss", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_weights_are_the_projection_on_e(name, kw, ref_loss):
    g = torch.Generator().manual_seed(3)
    z, y = 2 * torch.randn(8, C, generator=g, dtype=torch.float64), torch.randint(0, C, (8,), generator=g)
    model = Logits(8, C)
    stats = gdw.make(name, model, C, **kw).backward(z, y)
    G = model.b.grad
    e = F.softmax(z, 1) - F.one_hot(y, C).double()
    torch.testing.assert_close(stats.weights, 8 * (G * e).sum(1) / (e * e).sum(1), rtol=1e-10, atol=1e-12)
    if name not in ("ldam", "la"):  # these depend on z only through p_y: G is parallel to e
        torch.testing.assert_close(G, stats.weights[:, None] * e / 8, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,kw,ref_loss", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_confident_examples_stay_finite(name, kw, ref_loss, dtype):
    z = torch.tensor([[1e4, 0, 0, 0], [0, 500, 0, -500], [-300, 0, 300, 0], [0.1, 0.2, 0.3, 0.4]], dtype=dtype)
    y = torch.tensor([0, 1, 0, 3])  # p_y rounds to 1, to 1, to 0, ordinary
    model = Logits(4, C, dtype=dtype)
    stats = gdw.make(name, model, C, **kw).backward(z, y)
    assert bool(torch.isfinite(model.b.grad).all()) and bool(torch.isfinite(stats.weights).all())


def test_ldam_deferred_reweighting_schedule():
    x, y = batch()
    kw = {"class_counts": COUNTS, "s": 2.0, "drw": True}
    for epoch, drw in [(None, False), (0, False), (79, False), (80, True), (99, True)]:
        model = make_model("mlp")
        ref = copy.deepcopy(model)
        method = gdw.make("ldam", model, C, **kw)
        if epoch is not None:
            method.on_epoch_start(epoch, 100)
        method.backward(x, y)
        ldam_ref(ref(x), y, s=2.0, drw=drw).backward()
        assert_same_grads(model, ref, 1e-10)
    method = gdw.make("ldam", make_model("mlp"), C, **kw, drw_epoch=3)
    method.on_epoch_start(2, 100)
    assert not method.reweight
    method.on_epoch_start(3, 100)
    assert method.reweight
    clone = gdw.make("ldam", make_model("mlp"), C, **kw)
    clone.load_state_dict(method.state_dict())
    assert clone.reweight
    plain = gdw.make("ldam", make_model("mlp"), C, class_counts=COUNTS)  # drw off: never re-weights
    plain.on_epoch_start(99, 100)
    assert not plain.reweight


def test_class_with_no_examples_counts_as_one():
    m = gdw.make("cb", make_model("mlp"), C, class_counts=[10, 0, 3, 1])
    torch.testing.assert_close(m.class_weights, cb_weights_ref([10, 1, 3, 1], 0.9999))
    assert float(m.class_weights.sum()) == pytest.approx(C)
    ldam = gdw.make("ldam", make_model("mlp"), C, class_counts=[10, 0, 3, 1])
    assert float(ldam.margins.max()) == pytest.approx(0.5) and int(ldam.margins.argmax()) in (1, 3)
    assert bool(torch.isfinite(ldam.drw_weights).all())


# -- fine-tuning on the meta set --------------------------------------------------
def meta_batches():
    x, y = make_batch("cnn", 8, 1)
    xm, ym = make_batch("cnn", 6, 2)
    return x, y, xm, ym


def test_finetune_is_cross_entropy_then_cross_entropy_on_the_meta_batch():
    x, y, xm, ym = meta_batches()
    method = gdw.make("finetune", make_model("cnn"), C)
    assert method.needs_meta
    for epoch in (None, 0, 7, 8, 9):
        model = make_model("cnn")
        ref = copy.deepcopy(model)
        method.model = model
        if epoch is not None:
            method.on_epoch_start(epoch, 10)
        stats = method.backward(x, y, xm, ym)  # no inner_lr needed
        tuning = epoch is not None and epoch >= 8  # last ⌈0.2 · 10⌉ = 2 epochs
        xb, yb = (xm, ym) if tuning else (x, y)
        loss = F.cross_entropy(ref(xb), yb)
        loss.backward()
        assert_same_grads(model, ref, 1e-12)
        for (n, a), b in zip(model.named_buffers(), ref.buffers()):  # BatchNorm saw only the batch trained on
            assert torch.equal(a, b), n
        torch.testing.assert_close(stats.loss, loss.detach().float(), rtol=1e-7, atol=0)
        assert stats.weights.shape == (len(yb),) and bool((stats.weights == 1).all())
        if tuning:
            torch.testing.assert_close(stats.meta_loss, loss.detach().float(), rtol=1e-7, atol=0)
        else:
            assert stats.meta_loss is None


def test_finetune_schedule_and_errors():
    m = gdw.make("finetune", make_model("mlp"), C, fraction=0.07)
    starts = []
    for epoch in range(100):
        m.on_epoch_start(epoch, 100)
        starts.append(m.finetuning)
    assert 0.07 * 100 > 7  # in floating point
    assert starts.index(True) == 93 and all(starts[93:])  # still ⌈0.07 · 100⌉ = 7 epochs
    m = gdw.make("finetune", make_model("mlp"), C, fraction=0.01)
    m.on_epoch_start(8, 10)
    assert not m.finetuning
    m.on_epoch_start(9, 10)
    assert m.finetuning
    x, y = make_batch("mlp", 8, 1)
    with pytest.raises(ValueError, match="needs a meta batch"):
        m.backward(x, y)
    with pytest.raises(ValueError, match="training labels must lie in"):
        xm, ym = make_batch("mlp", 6, 2)
        m.backward(x, y + C, xm, ym)
    state = m.state_dict()
    fresh = gdw.make("finetune", make_model("mlp"), C)
    fresh.load_state_dict(state)
    assert fresh.finetuning


# -- invalid hyper-parameters ------------------------------------------------------
BAD = [
    ("focal", {"gamma": -1}, "gamma"),
    ("focal", {"gamma": "two"}, "gamma"),
    ("focal", {"gamma": float("nan")}, "gamma"),
    ("gce", {"q": 0}, "q must"),
    ("gce", {"q": 1.5}, "q must"),
    ("gce", {"q": -0.3}, "q must"),
    ("gce", {"q": None}, "q must"),
    ("sce", {"alpha": -1}, "alpha"),
    ("sce", {"beta": "x"}, "beta"),
    ("sce", {"alpha": 0, "beta": 0}, "alpha and beta"),
    ("cb", {"class_counts": COUNTS, "beta": 1.0}, "beta"),
    ("cb", {"class_counts": COUNTS, "beta": -0.1}, "beta"),
    ("cb", {"class_counts": COUNTS, "beta": "high"}, "beta"),
    ("cb", {}, "class_counts"),
    ("cb", {"class_counts": [1, 2, 3]}, "class_counts"),
    ("cb", {"class_counts": [1, -2, 3, 4]}, "class_counts"),
    ("cb", {"class_counts": [1, 2.5, 3, 4]}, "class_counts"),
    ("cb", {"class_counts": "many"}, "class_counts"),
    ("cb", {"class_counts": [[1, 2], [3, 4]]}, "class_counts"),
    ("ldam", {"class_counts": [1, 2, 3, 4, 5]}, "class_counts"),
    ("ldam", {"class_counts": COUNTS, "s": 0}, "s must"),
    ("ldam", {"class_counts": COUNTS, "max_margin": -0.5}, "max_margin"),
    ("ldam", {"class_counts": COUNTS, "drw_epoch": 1.5}, "drw_epoch"),
    ("ldam", {"class_counts": COUNTS, "drw_epoch": -1}, "drw_epoch"),
    ("ldam", {"class_counts": COUNTS, "drw": "maybe"}, "drw must"),  # "False" is accepted (check_bool)
    ("ldam", {"class_counts": COUNTS, "drw": 2}, "drw must"),
    ("finetune", {"fraction": 0}, "fraction"),
    ("finetune", {"fraction": 1}, "fraction"),
    ("finetune", {"fraction": 1.5}, "fraction"),
    ("finetune", {"fraction": "half"}, "fraction"),
    ("focal", {"gama": 1}, "has no parameter gama"),
    ("la", {"class_counts": COUNTS, "tau": -1}, "tau"),
    ("la", {}, "class_counts"),
]


@pytest.mark.parametrize("name,kw,message", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_invalid_hyper_parameters_are_named(name, kw, message):
    with pytest.raises(ValueError, match=message):
        gdw.make(name, make_model("mlp"), C, **kw)


def test_counts_accept_tensors_and_tuples():
    for counts in (torch.tensor(COUNTS), tuple(COUNTS), [float(c) for c in COUNTS]):
        m = gdw.make("cb", make_model("mlp"), C, class_counts=counts)
        torch.testing.assert_close(m.class_weights, cb_weights_ref(COUNTS, 0.9999))
    assert math.isclose(float(gdw.make("cb", make_model("mlp"), C, class_counts=COUNTS).class_weights.sum()), C)


@pytest.mark.parametrize("name,kw", [("gdw", {}), ("gdw", {"stage_one": "l2rw"}), ("dm", {}), ("ce", {})])
def test_any_method_can_finish_by_fine_tuning_on_the_meta_set(name, kw):
    """finetune_fraction: before the last epochs the method is unchanged; in
    them the gradient is autograd's of plain CE on the meta batch."""
    x, y = make_batch("mlp", 8, 1)
    xm, ym = make_batch("mlp", 6, 2)
    plain, tuned = make_model("mlp"), make_model("mlp")
    a = gdw.make(name, plain, C, **kw)
    b = gdw.make(name, tuned, C, finetune_fraction=0.25, **kw)
    for m in (a, b):
        if getattr(m, "vnet", None) is not None:
            torch.manual_seed(0)
            m.vnet = gdw.WeightNet().double()
            m.vopt = torch.optim.Adam(m.vnet.parameters(), lr=1e-3)
    assert b.needs_meta
    b.on_epoch_start(5, 8)  # epochs 6–8 fine-tune (⌈0.25 · 8⌉ = 2: 6, 7)
    assert not b.finetuning
    a.backward(x, y, xm, ym, inner_lr=0.1)
    b.backward(x, y, xm, ym, inner_lr=0.1)
    assert_same_grads(tuned, plain, 1e-12)
    tuned.zero_grad()
    b.on_epoch_start(6, 8)
    stats = b.backward(x, y, xm, ym, inner_lr=0.1)
    ref = copy.deepcopy(tuned)
    ref.zero_grad()
    F.cross_entropy(ref(xm), ym).backward()
    assert_same_grads(tuned, ref, 1e-12)
    assert stats.trained_on == "meta" and stats.logits.shape == (6, C)
    torch.testing.assert_close(stats.loss, F.cross_entropy(ref(xm), ym).detach().float())
    with pytest.raises(ValueError, match="needs a meta batch"):
        b.backward(x, y)
    with pytest.raises(ValueError, match="finetune_fraction"):
        gdw.make(name, make_model("mlp"), C, finetune_fraction=1.0, **kw)
