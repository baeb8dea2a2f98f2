"""GDW's held-out check (guard.py) against an independent computation:
per-example alignments from torch.func.jvp, correlations from numpy."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, jvp

import gdw
from gdw.methods.guard import MetaGuard, correlation
from models import C, make_batch, make_model

LR = 0.3
B, BM = 12, 6


def alignment(model, x, y, xm, ym):
    """h_i = α Σ_j (J_z u)_ij e_ij with u = ∇L_meta(θ): how much a plain
    step on example i lowers the meta loss (to first order, per unit weight)."""
    names = [n for n, _ in model.named_parameters()]
    ps = tuple(p.detach() for _, p in model.named_parameters())
    u = torch.autograd.grad(F.cross_entropy(model(xm), ym), list(model.parameters()))
    _, jz = jvp(lambda *q: functional_call(model, dict(zip(names, q)), (x,)), ps, tuple(u))
    with torch.no_grad():
        e = F.softmax(model(x), 1).clamp(max=0.999) - F.one_hot(y, C).double()
    return LR * (jz * e).sum(1)


def kept_capped(h):
    """gdw's default stage-one scaling: mean one over the kept examples, capped at one."""
    w = h.clamp(min=0)
    return ((w > 0).sum() * w / w.sum()).clamp(max=1.0)


def np_corr(a, b):
    return float(np.corrcoef(a.detach().numpy(), b.detach().numpy())[0, 1])


def test_correlation_matches_numpy_and_is_zero_for_a_constant():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(20, generator=g, dtype=torch.float64), torch.randn(20, generator=g, dtype=torch.float64)
    assert float(correlation(a, b)) == pytest.approx(np_corr(a, b), abs=1e-12)
    assert float(correlation(a, 2 * a + 1)) == pytest.approx(1.0, abs=1e-12)
    assert float(correlation(torch.ones(5, dtype=torch.float64), a[:5])) == 0.0


@pytest.mark.parametrize("meta_grad", ["jvp", "fd"])
def test_guard_check_and_shrunk_weights_match_reference(meta_grad):
    """One step: ρ is r of the two meta halves, and the instance weights are
    (1 − λ)·v + λ with λ = clamp(1 − r/ρ₀, 0, 1), v from the whole meta batch."""
    model = make_model("mlp")
    x, y = make_batch("mlp", B, 1)
    xm, ym = make_batch("mlp", BM, 2)
    before = copy.deepcopy(model)
    threshold = 0.9  # high, so that λ lies strictly inside (0, 1) for this batch (checked below)
    method = gdw.make("gdw", model, C, meta_grad=meta_grad, tau=0.0, guard=threshold)
    stats = method.backward(x, y, xm, ym, inner_lr=LR)
    h = BM // 2
    ha, hb = alignment(before, x, y, xm[:h], ym[:h]), alignment(before, x, y, xm[h:], ym[h:])
    r = 0.5 * (np_corr(kept_capped(ha), hb) + np_corr(kept_capped(hb), ha))
    tol = 1e-9 if meta_grad == "jvp" else 1e-3  # fd: a finite difference of float64 logits
    assert float(method.guard.rho) == pytest.approx(r, abs=tol)
    lam = min(1.0, max(0.0, 1 - r / threshold))
    assert 0 < lam < 1
    expected = (1 - lam) * kept_capped(alignment(before, x, y, xm, ym)) + lam
    torch.testing.assert_close(stats.instance_weights, expected, rtol=tol, atol=tol)


def test_guard_is_off_by_default_and_not_with_the_paper_mode():
    assert gdw.make("gdw", make_model("mlp"), C).guard is None
    with pytest.raises(gdw.UserError, match="guard"):
        gdw.make("gdw", make_model("mlp"), C, stage_one="mwnet", guard=0.05)
    with pytest.raises(gdw.UserError, match="guard"):
        gdw.make("gdw", make_model("mlp"), C, guard=-1)


def hand_update(guard, r_target):
    """Feed the guard a step whose r is ±1 by construction: the two halves'
    alignments equal (r = +1 for these weights) or opposite (r = −1)."""
    ha = torch.tensor([3.0, 1.0, -1.0, 2.0], dtype=torch.float64)
    hb = ha if r_target > 0 else -ha
    e = torch.tensor([[-1.0, 0.0]] * 4, dtype=torch.float64)  # −Σ_j dA_ij e_ij = dA_i0
    dA_half = torch.stack([ha, torch.zeros(4, dtype=torch.float64)], 1)
    dA_other = torch.stack([hb, torch.zeros(4, dtype=torch.float64)], 1)
    m, h = 6, 3  # the whole batch's dA is the size-weighted mean of the halves'
    dA = (h * dA_half + (m - h) * dA_other) / m
    return guard.update(dA, e, dA_half, m, h, lambda a: a.clamp(min=0))


def test_guard_pulls_toward_plain_training_when_the_halves_disagree():
    agree, disagree = MetaGuard(0.05), MetaGuard(0.05)
    r_agree = float(correlation(torch.tensor([3.0, 1.0, 0.0, 2.0]), torch.tensor([3.0, 1.0, -1.0, 2.0])))
    assert float(hand_update(agree, +1)) == 0.0 and float(agree.rho) == pytest.approx(r_agree, abs=1e-6)
    assert float(hand_update(disagree, -1)) == 1.0 and float(disagree.rho) < 0
    assert agree.trusts_meta_set() and not disagree.trusts_meta_set()
    # the running mean: ρ ← 0.96 ρ + 0.04 r
    rho = float(disagree.rho)
    hand_update(disagree, +1)
    assert float(disagree.rho) == pytest.approx(0.96 * rho + 0.04 * r_agree, abs=1e-9)


def test_guard_checks_every_fourth_step_and_round_trips():
    guard = MetaGuard(0.05)
    assert [guard.due() for _ in range(9)] == [True, False, False, False, True, False, False, False, True]
    hand_update(guard, -1)
    guard.finetune = False
    other = MetaGuard(0.05)
    other.load_state_dict(guard.state_dict())
    assert float(other.rho) == pytest.approx(float(guard.rho)) and other.finetune is False and other.steps == 9
    assert [other.due() for _ in range(4)] == [False, False, False, True]


def test_guard_decides_the_fine_tuning_phase_once():
    """The phase (last 20% of 10 epochs: 8 and 9) starts only if ρ ≥ ρ₀ when
    it would start, and that decision holds for the rest of the run."""
    method = gdw.make("gdw", make_model("mlp"), C, guard=0.05)
    hand_update(method.guard, -1)
    method.on_epoch_start(7, 10)
    assert not method.finetuning and method.guard.finetune is None
    method.on_epoch_start(8, 10)
    assert not method.finetuning and method.guard.finetune is False
    for _ in range(200):
        hand_update(method.guard, +1)
    assert method.guard.trusts_meta_set()
    method.on_epoch_start(9, 10)
    assert not method.finetuning  # decided at epoch 8
    trusted = gdw.make("gdw", make_model("mlp"), C, guard=0.05)
    hand_update(trusted.guard, +1)
    trusted.on_epoch_start(8, 10)
    assert trusted.finetuning and trusted.guard.finetune is True
    unguarded = gdw.make("gdw", make_model("mlp"), C)
    unguarded.on_epoch_start(8, 10)
    assert unguarded.finetuning
