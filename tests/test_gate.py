"""GDW's noise gate (gate.py) against hand-worked numbers, a simulation with
known noise, counts made with numpy, and the weights of the ungated method."""

import copy

import numpy as np
import pytest
import torch

import gdw
from gdw.distributed import Comm
from gdw.methods.gate import NoiseGate, excess_noise
from models import C, make_batch, make_model

LR = 0.3


def test_excess_noise_inverts_the_uniform_noise_model_by_hand():
    """C = 4, meta accuracy 0.8, training labels wrong with r = 0.3 (uniform
    over the other 3): a_t = 0.8·0.7 + 0.2·0.3/3 = 0.58, and r̂ gives 0.3 back."""
    a_t = 0.8 * 0.7 + 0.2 * 0.3 / 3
    assert a_t == pytest.approx(0.58)
    shares = [0.25] * 4
    r = excess_noise([a_t * 100] * 4, [100] * 4, 80.0, 100.0, shares)
    assert r == pytest.approx(0.3, abs=1e-12)
    # no excess: the same accuracy on both sets
    assert excess_noise([80] * 4, [100] * 4, 80.0, 100.0, shares) == pytest.approx(0.0, abs=1e-12)


def test_excess_noise_is_none_at_chance_and_without_counts():
    assert excess_noise([25] * 4, [100] * 4, 25.0, 100.0, [0.25] * 4) is None  # a_m = 1/C
    assert excess_noise([0] * 4, [0] * 4, 80.0, 100.0, [0.25] * 4) is None
    assert excess_noise([80] * 4, [100] * 4, 0.0, 0.0, [0.25] * 4) is None


def test_excess_noise_ignores_a_class_prior_that_differs_between_the_sets():
    """A long tail in training with the same accuracy per class as on the
    balanced meta set is no noise, although its plain accuracy differs."""
    count = np.array([1000, 300, 100, 10])
    acc = np.array([0.9, 0.8, 0.7, 0.6])  # per class, on both sets
    r = excess_noise(acc * count, count, float(acc.mean() * 400), 400.0, [0.25] * 4)
    assert r == pytest.approx(0.0, abs=1e-12)
    assert (acc * count).sum() / count.sum() > acc.mean() + 0.05  # the pooled shares differ


def test_excess_noise_recovers_simulated_uniform_noise():
    rng = np.random.default_rng(0)
    k, n, m, r, a = 5, 200_000, 20_000, 0.2, 0.7
    true = rng.integers(0, k, n)
    noisy = np.where(rng.random(n) < r, (true + rng.integers(1, k, n)) % k, true)
    pred = np.where(rng.random(n) < a, true, (true + rng.integers(1, k, n)) % k)
    meta_true = rng.integers(0, k, m)
    meta_pred = np.where(rng.random(m) < a, meta_true, (meta_true + rng.integers(1, k, m)) % k)
    correct = np.bincount(noisy, weights=(pred == noisy), minlength=k)
    estimate = excess_noise(correct, np.bincount(noisy, minlength=k), float((meta_pred == meta_true).sum()),
                            float(m), np.bincount(meta_true, minlength=k) / m)
    assert estimate == pytest.approx(r, abs=0.02)


def test_gate_counts_match_numpy_and_decide_sets_lambda():
    gate = NoiseGate(0.2, C)
    rng = np.random.default_rng(1)
    total = np.zeros(C)
    seen = np.zeros(C)
    meta_hits = meta_n = 0
    meta_counts = np.zeros(C)
    for _ in range(3):
        z, y = rng.normal(size=(10, C)), rng.integers(0, C, 10)
        ym, hits = rng.integers(0, C, 6), int(rng.integers(4, 7))  # above chance
        gate.add(torch.tensor(z), torch.tensor(y), torch.tensor(hits), torch.tensor(ym))
        np.add.at(total, y, z.argmax(1) == y)
        seen += np.bincount(y, minlength=C)
        meta_hits, meta_n = meta_hits + hits, meta_n + 6
        meta_counts += np.bincount(ym, minlength=C)
    gate.decide(Comm())
    expected = excess_noise(total, seen, float(meta_hits), float(meta_n), meta_counts / meta_n)
    assert expected is not None
    assert gate.rate == pytest.approx(expected, abs=1e-12)
    assert gate.lam == pytest.approx(min(max(1 - expected / 0.2, 0.0), 1.0), abs=1e-12)
    assert gate.decided
    counts = gate.counts.clone()
    gate.add(torch.zeros(2, C), torch.zeros(2, dtype=torch.long), torch.tensor(1), torch.zeros(2, dtype=torch.long))
    assert torch.equal(gate.counts, counts)  # nothing is counted after the first epoch


def test_gate_round_trips_and_is_off_by_default_and_not_with_the_paper_mode():
    gate = NoiseGate(0.2, C)
    gate.add(torch.eye(C), torch.arange(C), torch.tensor(3), torch.arange(C))
    other = NoiseGate(0.2, C)
    other.load_state_dict(gate.state_dict())
    assert torch.equal(other.counts, gate.counts) and not other.decided
    assert gdw.make("gdw", make_model("mlp"), C).gate is None
    with pytest.raises(gdw.UserError, match="gate"):
        gdw.make("gdw", make_model("mlp"), C, stage_one="mwnet", gate=0.2)
    with pytest.raises(gdw.UserError, match="gate"):
        gdw.make("gdw", make_model("mlp"), C, gate=-1)


def test_gated_weights_are_the_ungated_ones_in_the_first_epoch_then_mixed():
    """Epoch 0: the same step as without the gate (and the counts are those of
    the batch: its argmax against y, the meta batch's own). After the
    decision: instance weights (1 − λ) v + λ, v those of the ungated method."""
    x, y = make_batch("mlp", 12, 1)
    xm, ym = make_batch("mlp", 6, 2)
    model = make_model("mlp")
    plain = gdw.make("gdw", copy.deepcopy(model), C, tau=0.0, meta_grad="jvp")
    gated = gdw.make("gdw", copy.deepcopy(model), C, tau=0.0, meta_grad="jvp", gate=0.2)
    gated.on_epoch_start(0, 10)
    s0, s1 = plain.backward(x, y, xm, ym, inner_lr=LR), gated.backward(x, y, xm, ym, inner_lr=LR)
    torch.testing.assert_close(s1.instance_weights, s0.instance_weights, rtol=0, atol=0)
    with torch.no_grad():
        hits = (model(x).argmax(1) == y).double()
        meta_hits = float((model(xm).argmax(1) == ym).sum())
    counts = gated.gate.counts
    torch.testing.assert_close(counts[:C], torch.zeros(C, dtype=torch.float64).index_add_(0, y, hits))
    assert float(counts[2 * C]) == meta_hits and float(counts[2 * C + 1]) == 6
    for lam in (0.0, 0.3, 1.0):
        plain_m = gdw.make("gdw", copy.deepcopy(model), C, tau=0.0, meta_grad="jvp")
        gated_m = gdw.make("gdw", copy.deepcopy(model), C, tau=0.0, meta_grad="jvp", gate=0.2)
        gated_m.gate.decided, gated_m.gate.lam = True, lam
        v = plain_m.backward(x, y, xm, ym, inner_lr=LR).instance_weights
        mixed = gated_m.backward(x, y, xm, ym, inner_lr=LR).instance_weights
        torch.testing.assert_close(mixed, (1 - lam) * v + lam, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("lam, finetunes", [(0.0, True), (0.49, True), (0.5, False), (1.0, False)])
def test_gate_lets_the_fine_tuning_phase_run_only_below_one_half(lam, finetunes):
    method = gdw.make("gdw", make_model("mlp"), C, gate=0.2)
    method.gate.add(torch.eye(C), torch.arange(C), torch.tensor(3), torch.arange(C))
    method.gate.decide = lambda comm: setattr(method.gate, "decided", True)  # λ set by hand below
    method.gate.lam = lam
    method.on_epoch_start(8, 10)  # the last 20% of 10 epochs: 8 and 9
    assert method.finetuning is finetunes


def test_gate_decides_at_the_start_of_the_second_epoch():
    method = gdw.make("gdw", make_model("mlp"), C, gate=0.2)
    method.on_epoch_start(0, 10)
    method.gate.add(torch.eye(C) * 5, torch.arange(C), torch.tensor(2), torch.arange(C))  # a_t = 1, a_m = 0.5
    assert not method.gate.decided
    method.on_epoch_start(1, 10)
    assert method.gate.decided and method.gate.rate < 0 and method.gate.lam == 1.0
    assert method.epoch_record() == {"gate_noise": method.gate.rate, "gate_shrink": 1.0}


def test_step_form_is_all_or_nothing():
    for rate, lam in ((0.049, 1.0), (0.05, 0.0), (0.3, 0.0), (-0.1, 1.0)):
        gate = NoiseGate(0.05, 2, form="step")
        # a_m = 0.9; a_t chosen so that r̂ = rate: a_t = a_m − rate (C a_m − 1)/(C − 1)
        a_t = 0.9 - rate * (2 * 0.9 - 1)
        gate.counts = torch.tensor([a_t * 500, a_t * 500, 500, 500, 90, 100, 50, 50], dtype=torch.float64)
        gate.decide(Comm())
        assert gate.rate == pytest.approx(rate, abs=1e-9) and gate.lam == lam
        assert gate.off is (lam == 1.0)
    # below r₀, but one class 3 times the other: the weighting stays
    gate = NoiseGate(0.05, 2, form="step")
    gate.counts = torch.tensor([675, 225, 750, 250, 90, 100, 50, 50], dtype=torch.float64)  # a_t = a_m = 0.9
    gate.decide(Comm())
    assert gate.rate == pytest.approx(0.0, abs=1e-12) and gate.imbalance == 3.0 and gate.lam == 0.0
    with pytest.raises(gdw.UserError, match="gate_form"):
        gdw.make("gdw", make_model("mlp"), C, gate=0.05, gate_form="bogus")


def test_a_gated_off_step_is_plain_training_on_the_adjusted_loss():
    """After the step gate turns the weighting off: no meta-gradient, and the
    parameters' gradient is autograd's of the logit-adjusted cross-entropy."""
    x, y = make_batch("mlp", 12, 1)
    xm, ym = make_batch("mlp", 6, 2)
    counts = [5, 3, 2, 2]
    model = make_model("mlp")
    method = gdw.make("gdw", copy.deepcopy(model), C, gate=0.05, gate_form="step", class_counts=counts)
    method.gate.decided, method.gate.lam = True, 1.0
    assert method.meta_before_forward(x, xm, ym) is None
    stats = method.backward(x, y, xm, ym, inner_lr=LR)
    assert stats.meta_loss is None and torch.equal(stats.instance_weights, torch.ones(12, dtype=stats.logits.dtype))
    log_pi = torch.log(torch.tensor(counts, dtype=torch.float64) / sum(counts))
    ref = copy.deepcopy(model)
    torch.nn.functional.cross_entropy(ref(x) + log_pi, y).backward()
    for p, q in zip(method.model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12)
    method.on_epoch_start(8, 10)
    assert not method.finetuning
