"""Derivative Manipulation: the emphasis density and the L1 norm of each logit gradient."""

import pytest
import torch
import torch.nn.functional as F

import gdw
from models import C, Logits, make_batch, make_model


def logit_gradient(z, y, **kw):
    model = Logits(*z.shape, dtype=z.dtype)
    stats = gdw.make("dm", model, z.shape[1], **kw).backward(z, y)
    return model.b.grad, stats


def emphasis(p, lam, beta):
    """The paper's density, written out: exp(β p^λ (1 − p))."""
    return torch.exp(beta * p**lam * (1 - p))


def random_logits(n=16, seed=0, scale=1.5):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, C, generator=g, dtype=torch.float64), torch.randint(0, C, (n,), generator=g)


@pytest.mark.parametrize("lam,beta", [(0.5, 8.0), (0.0, 2.0), (1.0, 2.0), (2.0, -3.0), (0.5, 0.0)])
def test_l1_norm_of_each_logit_gradient_is_its_normalised_emphasis(lam, beta):
    z, y = random_logits()
    G, stats = logit_gradient(z, y, lam=lam, beta=beta)
    p = F.softmax(z, 1)
    p_y = p.gather(1, y[:, None]).squeeze(1)
    w = emphasis(p_y, lam, beta)
    w_bar = w / w.sum()
    l1 = G.abs().sum(1)
    torch.testing.assert_close(l1, w_bar, rtol=0, atol=1e-6)
    # exactly, with the 1e-6 guard of the denominator
    torch.testing.assert_close(l1, w_bar * 2 * (1 - p_y) / (2 * (1 - p_y) + 1e-6), rtol=1e-10, atol=1e-14)
    # the direction is cross-entropy's, and the reported weights follow G = weights ⊙ e / B
    e = p - F.one_hot(y, C).double()
    torch.testing.assert_close(G, (w_bar / (2 * (1 - p_y) + 1e-6))[:, None] * e, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(G, stats.weights[:, None] * e / len(y), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(stats.instance_weights, w_bar, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("lam", [0.25, 0.5, 1.0, 2.0, 4.0])
def test_emphasis_peaks_at_lambda_over_lambda_plus_one(lam):
    # two classes, labelled class 0 with probability p on a fine grid
    p = torch.linspace(1e-4, 1 - 1e-4, 20001, dtype=torch.float64)
    z = torch.stack([p.log(), (1 - p).log()], 1)
    G, stats = logit_gradient(z, torch.zeros(len(p), dtype=torch.long), lam=lam, beta=8.0)
    step = float(p[1] - p[0])
    for curve in (stats.instance_weights, G.abs().sum(1)):
        assert abs(float(p[curve.argmax()]) - lam / (lam + 1)) <= 1.5 * step


def test_lambda_zero_emphasises_the_hardest():
    p = torch.linspace(1e-3, 1 - 1e-3, 999, dtype=torch.float64)
    z = torch.stack([p.log(), (1 - p).log()], 1)
    _, stats = logit_gradient(z, torch.zeros(len(p), dtype=torch.long), lam=0.0, beta=8.0)
    assert int(stats.instance_weights.argmax()) == 0
    assert bool((stats.instance_weights.diff() < 0).all())


def test_beta_zero_gives_equal_emphasis():
    z, y = random_logits()
    G, stats = logit_gradient(z, y, lam=0.5, beta=0.0)
    torch.testing.assert_close(stats.instance_weights, torch.full((16,), 1 / 16, dtype=torch.float64))
    torch.testing.assert_close(G.abs().sum(1), torch.full((16,), 1 / 16, dtype=torch.float64), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("beta", [8.0, 1e4, -1e4])
def test_confident_examples_and_huge_beta_stay_finite(dtype, beta):
    z = torch.tensor([[1e4, 0, 0, 0], [0, 500, 0, -500], [50, 0, 0, 0], [0.1, 0.2, 0.3, 0.4]], dtype=dtype)
    y = torch.tensor([0, 1, 0, 2])  # the first three have p_y == 1 in floating point (or nearly)
    G, stats = logit_gradient(z, y, lam=0.5, beta=beta)
    assert bool(torch.isfinite(G).all()) and bool(torch.isfinite(stats.weights).all())
    assert float(stats.instance_weights.sum()) == pytest.approx(1.0, abs=1e-6)
    assert float(G[0].abs().sum()) <= 1e-6  # p_y = 1: nothing to learn, no NaN
    assert stats.loss.shape == () and stats.loss.dtype == torch.float32 and bool(torch.isfinite(stats.loss))


def test_meta_batch_is_ignored_and_model_gradient_matches_logit_gradient():
    model = make_model("mlp")
    x, y = make_batch("mlp", 8, 1)
    xm, ym = make_batch("mlp", 6, 2)
    a = gdw.make("dm", model, C)
    assert not a.needs_meta
    a.backward(x, y)
    g1 = [q.grad.clone() for q in model.parameters()]
    model.zero_grad()
    a.backward(x, y, xm, ym)
    for q, g in zip(model.parameters(), g1):
        torch.testing.assert_close(q.grad, g)
    # same as back-propagating the logit gradient by hand
    model.zero_grad()
    z = model(x)
    with torch.no_grad():
        p = F.softmax(z, 1)
        p_y = p.gather(1, y[:, None]).squeeze(1)
        w = emphasis(p_y, 0.5, 8.0)
        G = (w / w.sum() / (2 * (1 - p_y) + 1e-6))[:, None] * (p - F.one_hot(y, C).double())
    z.backward(G)
    for q, g in zip(model.parameters(), g1):
        torch.testing.assert_close(q.grad, g, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize(
    "kw,name",
    [({"lam": -0.1}, "lam"), ({"lam": "x"}, "lam"), ({"lam": None}, "lam"), ({"lam": float("nan")}, "lam"),
     ({"beta": float("inf")}, "beta"), ({"beta": float("nan")}, "beta"), ({"beta": "big"}, "beta"),
     ({"beta": [1.0]}, "beta")],
)
def test_invalid_hyper_parameters_are_named(kw, name):
    with pytest.raises(ValueError, match=name):
        gdw.make("dm", make_model("mlp"), C, **kw)
