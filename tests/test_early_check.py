"""GDW's plain_below and cap_below: ``gdw.fit``'s FinetuneCheck turns the
weighting off, or caps its instance weights at 1, a quarter of the way into
a run whose labels look clean (design questions 16 and 17)."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gdw
from gdw.cli import main
from gdw.errors import UserError
from gdw.issues import find_label_issues
from gdw.recorder import FinetuneCheck

QUICK = ["--dataset", "digits", "--meta-per-class", "10", "--epochs", "8", "--no-progress", "--threads", "1"]


def rows_of(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights_of(out):
    return torch.load(out / "checkpoint.pt", weights_only=False)["model"]


def test_a_plain_step_is_the_logit_adjusted_loss_gradient(monkeypatch):
    """With ``plain`` set, a step puts ∇ mean CE(z + log π, y) into .grad (by
    autograd on a copy) and computes nothing on the meta batch."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    ref = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    ref.load_state_dict(model.state_dict())
    counts = [30, 10, 5]
    method = gdw.GDW(model, 3, class_counts=counts, plain_below=0.1)
    method.plain = True
    x, y = torch.randn(12, 5), torch.randint(0, 3, (12,))
    meta = torch.randn(4, 5)
    monkeypatch.setattr("gdw.methods.meta.meta_gradient", lambda *a, **k: pytest.fail("meta-gradient computed"))
    monkeypatch.setattr(method, "meta_step", lambda *a, **k: pytest.fail("meta step taken"))
    stats = method.backward(x, y, meta, torch.zeros(4, dtype=torch.long), inner_lr=0.1)
    prior = torch.tensor(counts, dtype=torch.float64) / sum(counts)
    loss = F.cross_entropy(ref(x) + prior.log().float(), y)
    loss.backward()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
    assert stats.meta_loss is None


def test_options_are_checked():
    model = torch.nn.Linear(4, 3)
    assert gdw.GDW(model, 3).plain_below == 0.08  # the default (design question 18)
    assert gdw.GDW(model, 3, stage_one="mwnet").plain_below == 0.0  # the paper does as it says
    with pytest.raises(UserError, match="plain_below"):
        gdw.GDW(model, 3, plain_below=1.0)
    with pytest.raises(UserError, match="plain_below needs stage_one='l2rw'"):
        gdw.GDW(model, 3, stage_one="mwnet", plain_below=0.1)
    assert gdw.GDW(model, 3).cap_below == 0.0
    with pytest.raises(UserError, match="cap_below needs stage_one='l2rw'"):
        gdw.GDW(model, 3, stage_one="mwnet", cap_below=0.1)


@pytest.mark.parametrize("epochs, at", [(40, 10), (8, 2), (2, 1), (1, 1), (30, 8)])
def test_the_check_comes_a_quarter_of_the_way_in(epochs, at):
    assert FinetuneCheck.check_epoch(epochs) == at


def test_clean_labels_turn_the_weighting_off_and_noisy_ones_keep_it(tmp_path, capsys):
    """Digits, 8 epochs, the check at the start of epoch 3 (0-based 2):
    without noise the estimate is below 50% and from then on the rows have no
    meta loss and no fine-tuning; under 40% flips and a bound of 1e-6 the run
    is the run without the check, weight for weight."""
    clean = tmp_path / "clean"
    assert main(["train", *QUICK, "--method-args", "plain_below=0.5", "--out", str(clean)]) == 0
    out = capsys.readouterr().out
    rows = rows_of(clean)
    decided = [r for r in rows if "early_decision" in r]
    assert [r["epoch"] for r in decided] == [3] and decided[0]["early_decision"] == "plain"
    assert decided[0]["early_noise_estimate"] < 0.5
    assert "plain training from here" in [x for x in out.splitlines() if x.startswith("epoch   3/8")][0]
    assert all(r.get("meta_loss") is not None for r in rows[:2])
    assert all(r.get("meta_loss") is None and not r["finetuning"] for r in rows[2:])
    assert torch.load(clean / "checkpoint.pt", weights_only=False)["callbacks"]["finetune_check"]["early"] == "plain"

    checked, plain = tmp_path / "checked", tmp_path / "plain"
    noisy = ["--noise", "flip:0.4"]
    assert main(["train", *QUICK, *noisy, "--method-args", "plain_below=1e-6", "--out", str(checked)]) == 0
    assert main(["train", *QUICK, *noisy, "--method-args", "plain_below=0", "--out", str(plain)]) == 0
    assert [r["early_decision"] for r in rows_of(checked) if "early_decision" in r] == ["on"]
    a, b = weights_of(checked), weights_of(plain)
    assert all(torch.equal(a[k], b[k]) for k in a)


def interrupted_and_resumed(flags, after_epoch, tmp_path, monkeypatch, before_resume=lambda cut: None):
    """``(cut, full)``: the run of ``flags`` stopped by Ctrl-C after 0-based
    epoch ``after_epoch`` and resumed, and the same run uninterrupted;
    ``before_resume(cut)`` looks at the stopped run first."""
    from gdw.callbacks import MetricsWriter

    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main([*flags, "--out", str(full)]) == 0
    real = MetricsWriter.on_epoch_end

    def interrupt(self, state):
        real(self, state)
        if state.epoch == after_epoch:
            raise KeyboardInterrupt

    monkeypatch.setattr(MetricsWriter, "on_epoch_end", interrupt)
    assert main([*flags, "--out", str(cut)]) != 0
    monkeypatch.setattr(MetricsWriter, "on_epoch_end", real)
    before_resume(cut)
    assert main(["train", "--out", str(cut), "--resume", "--no-progress", "--threads", "1"]) == 0
    return cut, full


def test_an_interrupted_run_resumes_plain(tmp_path, monkeypatch):
    """Ctrl-C after epoch 5, past the switch: the resumed run trains plainly
    to the end and ends with the uninterrupted run's weights."""
    cut, full = interrupted_and_resumed(["train", *QUICK, "--method-args", "plain_below=0.5"], 4, tmp_path, monkeypatch)
    assert all(r.get("meta_loss") is None for r in rows_of(cut)[2:])
    a, b = weights_of(cut), weights_of(full)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the switch, kept for the count's caveat, came back from the checkpoint
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (cut, full))
    assert sa.get("estimated_noise_caveat") == sb.get("estimated_noise_caveat")
    assert (cut / "label_issues.csv").read_text() == (full / "label_issues.csv").read_text()


def test_a_plain_switch_says_its_count_is_probably_low(tmp_path, capsys):
    """Digits with 5% of the labels flipped, the check at the start of epoch 3
    (0-based 2) switching to plain training: plain training fits the wrong
    labels, the end-of-run count falls below the check's estimate, and the
    run says so with both numbers (summary.json, the end of gdw train, gdw
    detect)."""
    out = tmp_path / "run"
    assert main(["train", *QUICK, "--noise", "flip:0.05", "--method-args", "plain_below=0.5", "--out", str(out)]) == 0
    decided = [r for r in rows_of(out) if "early_decision" in r][0]
    assert decided["early_decision"] == "plain" and decided["epoch"] == 3
    summary = json.loads((out / "summary.json").read_text())
    check, end = decided["early_noise_estimate"], summary["estimated_noise_rate"]
    assert end < check
    caveat = summary["estimated_noise_caveat"]
    assert (f"trained plainly from epoch 3 on, where the check estimated {100 * check:.1f}% wrong labels" in caveat
            and f"this count ({100 * end:.1f}%) is probably low. gdw detect RUN --num-issues N" in caveat)
    assert "is rough: " + caveat in capsys.readouterr().out
    assert main(["detect", str(out), "--top", "0"]) == 0
    assert "caution: " + caveat in capsys.readouterr().out


def test_a_restart_is_plain_training_from_the_initial_weights(tmp_path, monkeypatch, capsys):
    """With ``plain_restart`` and ``plain_epochs=left`` the switch at epoch 3
    of 8 puts the model back to its first weights with no momentum: the run
    ends with the weights of a CE run (τ = 0, so the plain step is CE's)
    that starts at that epoch, from the same initial weights, on the same
    batches and learning rates."""
    import gdw.train

    restarted, ce = tmp_path / "restarted", tmp_path / "ce"
    args = "plain_below=0.5,plain_restart=true,tau=0,plain_epochs=left"
    assert main(["train", *QUICK, "--method-args", args, "--out", str(restarted)]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("epoch   3/8")][0]
    assert "plain training from here, restarted from the initial weights" in line
    decided = [r for r in rows_of(restarted) if "early_decision" in r]
    assert decided[0]["early_decision"] == "plain" and decided[0]["early_restart"] is True
    summary = json.loads((restarted / "summary.json").read_text())
    assert summary["early_restart"] is True and summary["early_decision_epoch"] == 3
    assert 0 <= summary["early_disagreement"] < 1  # raw_factor=2 by default: the condition was checked
    # the weights are no longer needed once decided: the checkpoint does not carry them
    assert torch.load(restarted / "checkpoint.pt", weights_only=False)["callbacks"]["finetune_check"]["initial"] is None

    real_fit = gdw.train.fit
    monkeypatch.setattr(gdw.train, "fit", lambda *a, **k: real_fit(*a, **{**k, "start_epoch": 2}))
    assert main(["train", *QUICK, "--method", "ce", "--out", str(ce)]) == 0
    a, b = weights_of(restarted), weights_of(ce)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_restart_of_the_whole_schedule_is_a_plain_run(tmp_path, capsys):
    """With ``plain_epochs=all`` the switch at epoch 3 of 8
    restarts the schedule too: the run trains 2 + 8 epochs and its last 8
    rows have a CE run's learning rates and training losses, and its final
    weights are the CE run's bit for bit (τ = 0, so the plain step is CE's;
    the batches of schedule epoch e are those of the CE run's epoch e)."""
    restarted, ce = tmp_path / "restarted", tmp_path / "ce"
    assert main(["train", *QUICK, "--method-args", "plain_below=0.5,tau=0,plain_epochs=all", "--out",
                 str(restarted)]) == 0
    out = capsys.readouterr().out
    line = [x for x in out.splitlines() if x.startswith("epoch   3/10")][0]
    assert "restarted from the initial weights for 8 epochs (the run ends at epoch 10)" in line
    assert main(["train", *QUICK, "--method", "ce", "--out", str(ce)]) == 0
    rows, plain = rows_of(restarted), rows_of(ce)
    assert [r["epoch"] for r in rows] == list(range(1, 11))
    assert [r["lr"] for r in rows[2:]] == [r["lr"] for r in plain]
    assert [r["lr"] for r in rows[:2]] == [r["lr"] for r in plain[:2]]  # the weighted epochs: the schedule's start
    assert [r["train_loss"] for r in rows[2:]] == [r["train_loss"] for r in plain]
    assert rows[2]["early_restart_epochs"] == 8
    a, b = weights_of(restarted), weights_of(ce)
    assert all(torch.equal(a[k], b[k]) for k in a)
    summary = json.loads((restarted / "summary.json").read_text())
    assert summary["epochs_trained"] == 10 and summary["early_restart"] is True


def test_a_run_interrupted_after_a_schedule_restart_resumes_it(tmp_path, monkeypatch):
    """Ctrl-C after epoch 5 of 10, past a restart of the schedule at epoch 3:
    the resumed run knows where its schedule started and ends as the
    uninterrupted one, at epoch 10."""
    flags = ["train", *QUICK, "--method-args", "plain_below=0.5,plain_epochs=all"]
    cut, full = interrupted_and_resumed(flags, 4, tmp_path, monkeypatch)
    assert [r["epoch"] for r in rows_of(cut)] == list(range(1, 11))
    assert [r["lr"] for r in rows_of(cut)] == [r["lr"] for r in rows_of(full)]
    a, b = weights_of(cut), weights_of(full)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_plain_epochs_is_checked(tmp_path, capsys):
    model = torch.nn.Linear(4, 3)
    assert gdw.GDW(model, 3).plain_epochs == "left"  # the default (design question 21 kept it)
    assert gdw.GDW(model, 3, plain_epochs="all").plain_epochs == "all"
    assert gdw.GDW(model, 3, stage_one="mwnet").plain_epochs == "left"
    with pytest.raises(UserError, match="plain_epochs"):
        gdw.GDW(model, 3, plain_epochs="some")
    assert main(["train", *QUICK, "--method-args", "plain_epochs=3", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "plain_epochs" in err[0]


def test_a_run_interrupted_before_a_restart_restarts_from_the_same_weights(tmp_path, monkeypatch):
    """Ctrl-C after epoch 1, before the switch: the checkpoint carries the
    initial weights, and the resumed run ends as the uninterrupted one."""
    def initial_weights_kept(cut):
        kept = torch.load(cut / "checkpoint.pt", weights_only=False)["callbacks"]["finetune_check"]["initial"]
        assert kept is not None and set(kept) == set(weights_of(cut))

    flags = ["train", *QUICK, "--method-args", "plain_below=0.5,plain_restart=true"]
    cut, full = interrupted_and_resumed(flags, 0, tmp_path, monkeypatch, initial_weights_kept)
    assert [r.get("early_restart") for r in rows_of(cut) if "early_decision" in r] == [True]
    a, b = weights_of(cut), weights_of(full)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_restart_needs_plain_below(tmp_path, capsys):
    model = torch.nn.Linear(4, 3)
    assert gdw.GDW(model, 3).plain_restart is True  # the default (design question 19)
    assert gdw.GDW(model, 3, stage_one="mwnet").plain_restart is False
    assert gdw.GDW(model, 3, plain_below=0).plain_restart is True  # the default, with nothing to restart: no error
    with pytest.raises(UserError, match="plain_restart needs plain_below"):
        gdw.GDW(model, 3, plain_below=0, plain_restart=True)
    assert main(["train", *QUICK, "--method-args", "plain_restart=maybe", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "plain_restart" in err[0]


@pytest.mark.parametrize("name", ["plain_below", "cap_below"])
@pytest.mark.parametrize("value", ["1", "-0.1", "x"])
def test_bad_bound_is_one_line(name, value, tmp_path, capsys):
    assert main(["train", *QUICK, "--method-args", f"{name}={value}", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and name in err[0]


def fake_check(wrong, counts, plain_below=0.0, cap_below=0.0):
    """FinetuneCheck around evidence with 0.9 on each given label of two
    classes, the first ``wrong`` rows on the other class instead, and a meta
    set predicted right; the state is at the check's epoch of 40."""
    labels = np.repeat([0, 1], counts)
    prob = np.full((len(labels), 2), 0.1)
    pred = labels.copy()
    pred[:wrong] = 1 - pred[:wrong]
    prob[np.arange(len(labels)), pred] = 0.9
    meta_labels = np.repeat([0, 1], 20)
    meta_prob = np.full((40, 2), 0.1)
    meta_prob[np.arange(40), meta_labels] = 0.9
    recorder = SimpleNamespace(num_classes=2, device=torch.device("cpu"),
                               evidence=lambda: {"count": np.ones(len(labels), np.int64), "prob": prob})
    data = SimpleNamespace(train=SimpleNamespace(labels=torch.as_tensor(labels)),
                           meta=SimpleNamespace(labels=torch.as_tensor(meta_labels)))
    method = SimpleNamespace(plain_below=plain_below, cap_below=cap_below, max_weight=None, plain=False,
                             finetune_min_noise=0.0, finetuning=False)
    state = SimpleNamespace(method=method, model=None, row={}, epoch=10, epochs=40)
    want = find_label_issues(labels, prob, clean_labels=meta_labels, clean_pred_probs=meta_prob).noise_rate
    return FinetuneCheck(recorder, data), state, meta_prob, want


@pytest.mark.parametrize("wrong, counts, plain_below, cap_below, decision", [
    (0, (100, 100), 0.0, 0.05, "cap"),  # estimate 0 < 0.05
    (20, (100, 100), 0.0, 0.05, "on"),  # estimate 0.1
    (20, (100, 100), 0.0, 0.15, "cap"),
    (0, (150, 50), 0.0, 0.05, "on"),  # 3 : 1 keeps the weighting as it is
    (0, (100, 100), 0.05, 0.5, "plain"),  # below both: plain training wins
    (20, (100, 100), 0.05, 0.5, "cap"),  # between the two
])
def test_decision_by_hand(monkeypatch, wrong, counts, plain_below, cap_below, decision):
    cb, state, meta_prob, want = fake_check(wrong, counts, plain_below, cap_below)
    assert want == pytest.approx(wrong / sum(counts), abs=1e-9)
    monkeypatch.setattr("gdw.recorder.predict_proba", lambda *a, **k: torch.as_tensor(meta_prob))
    state.epoch = 9  # before the check's epoch (10 of 40): nothing happens
    cb.on_epoch_start(state)
    assert cb.early is None and state.row == {} and state.method.max_weight is None
    state.epoch = 10
    cb.on_epoch_start(state)
    assert state.row == {"early_noise_estimate": pytest.approx(want), "early_decision": decision}
    assert state.method.max_weight == (1.0 if decision == "cap" else None)
    assert state.method.plain is (decision == "plain")
    # decided once; a resumed run (a fresh method object) gets the same from the checkpoint's state
    monkeypatch.setattr("gdw.recorder.predict_proba", lambda *a, **k: pytest.fail("estimated twice"))
    again = FinetuneCheck(cb.recorder, cb.data)
    again.load_state_dict(cb.state_dict())
    state.method.max_weight, state.method.plain, state.row, state.epoch = None, False, {}, 30
    again.on_epoch_start(state)
    assert state.row == {} and state.method.max_weight == (1.0 if decision == "cap" else None)
    assert state.method.plain is (decision == "plain")


def test_a_lower_cap_of_the_users_is_kept(monkeypatch):
    cb, state, meta_prob, _ = fake_check(0, (100, 100), cap_below=0.05)
    monkeypatch.setattr("gdw.recorder.predict_proba", lambda *a, **k: torch.as_tensor(meta_prob))
    state.method.max_weight = 0.5
    cb.on_epoch_start(state)
    assert state.row["early_decision"] == "cap" and state.method.max_weight == 0.5


def test_clean_labels_cap_the_weights_and_the_summary_says_when(tmp_path, capsys):
    """Digits without noise, 8 epochs, the MLP with BatchNorm (no cap at the
    start): the check at the start of epoch 3 caps the weights; summary.json
    keeps the cap the run started with and says what the check decided."""
    out = tmp_path / "run"
    assert main(["train", *QUICK, "--method-args", "cap_below=0.5", "--out", str(out)]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("epoch   3/8")][0]
    assert "instance weights capped at 1 from here" in line
    summary = json.loads((out / "summary.json").read_text())
    assert summary["max_weight"] == "inf" and summary["early_decision"] == "cap"
    assert summary["early_decision_epoch"] == 3 and summary["early_noise_estimate"] < 0.5
    assert all(r.get("meta_loss") is not None for r in rows_of(out)[:6])  # still weighted


def test_early_stopping_gives_a_restart_its_own_patience(tmp_path):
    """BestModel with patience 2: best at epoch 1, lower after; a restart at
    epoch 3 (its row has early_restart) moves the count to epoch 2, so the
    run stops after epoch 4 instead of 3, and best.pt stays epoch 1's unless
    the new start beats it; the count is in the state a resume restores."""
    from gdw.callbacks import BestModel
    from gdw.distributed import Comm

    def run(vals, restart_at=None):
        cb = BestModel(tmp_path / "best.pt", patience=2)
        state = SimpleNamespace(is_main=True, comm=Comm.single(), model=torch.nn.Linear(2, 2), stop=False, row={})
        stopped = None
        for epoch, acc in enumerate(vals, 1):
            state.row = {"epoch": epoch, "val_accuracy": acc, **({"early_restart": True} if epoch == restart_at else {})}
            cb.on_epoch_end(state)
            if state.stop:
                stopped = epoch
                break
        return stopped, cb

    assert run([0.9, 0.8, 0.5, 0.7, 0.7])[0] == 3  # no restart: 2 epochs after the best
    stopped, cb = run([0.9, 0.8, 0.5, 0.7, 0.7], restart_at=3)
    assert stopped == 4 and cb.best_epoch == 1 and cb.state_dict()["restart_epoch"] == 2
    assert run([0.9, 0.8, 0.5, 0.95, 0.7, 0.7], restart_at=3)[0] == 6  # the new start's best counts as any best
    again = BestModel(tmp_path / "b.pt", patience=2)
    again.load_state_dict(cb.state_dict())
    assert again.restart_epoch == 2
    again.load_state_dict({"best_accuracy": 0.5, "best_epoch": 1, "stopped": False})  # a checkpoint from before
    assert again.restart_epoch == 0


@pytest.mark.parametrize("estimate, raw, factor, decision", [
    (0.02, 0.30, 2.0, "on"),  # the correction removed most of a large disagreement: kept on
    (0.02, 0.10, 2.0, "plain"),  # under 2 × 8%
    (0.02, 0.30, 0.0, "plain"),  # without the condition (raw_factor=0)
    (0.10, 0.10, 2.0, "on"),  # the estimate itself above the bound
])
def test_the_uncorrected_disagreement_can_keep_the_weighting(monkeypatch, estimate, raw, factor, decision):
    cb, state, _, _ = fake_check(0, (100, 100), plain_below=0.08)
    state.method.raw_factor = factor
    monkeypatch.setattr(FinetuneCheck, "estimate", lambda self, model: estimate)
    monkeypatch.setattr(FinetuneCheck, "disagreement", lambda self: raw)
    cb.on_epoch_start(state)
    assert state.row["early_decision"] == decision and state.method.plain is (decision == "plain")
    assert state.row.get("early_disagreement") == (raw if factor > 0 else None)


def test_disagreement_by_hand():
    """20 of 200 rows (the first 20) have evidence for the other class: 10%;
    rows never seen do not count."""
    cb, _, _, _ = fake_check(20, (100, 100))
    assert cb.disagreement() == pytest.approx(0.1)
    count = np.ones(200, np.int64)
    count[:20] = 0
    prob = cb.recorder.evidence()["prob"]
    cb.recorder = SimpleNamespace(num_classes=2, evidence=lambda: {"count": count, "prob": prob})
    assert cb.disagreement() == 0.0


def own_csv(path, n=240, seed=0):
    """A CSV of the user's own: three features, two classes from their sign
    pattern, about 10% of the labels flipped; its truth is unknown to gdw."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(int)
    y = np.where(rng.random(n) < 0.1, 1 - y, y)
    with open(path, "w") as f:
        f.write("a,b,c,label\n" + "".join(f"{a:.5f},{b:.5f},{c:.5f},{'yes' if t else 'no'}\n"
                                          for (a, b, c), t in zip(x, y)))
    return path


def test_a_meta_set_drawn_from_unchecked_labels_trains_plainly(tmp_path, capsys):
    """The user's own CSV, no --meta, no noise added: the meta set is drawn
    from the same unchecked labels, so by default (unchecked_meta=ce) gdw
    trains plainly from the first epoch as CE does: no meta loss in any row,
    the first row and the summary say why, and the final weights, the
    predictions' shift and the label issues are a CE run's bit for bit.
    unchecked_meta=plain trains plainly on the logit-adjusted loss (a CE run
    only with τ = 0); unchecked_meta=weight, checked examples as --meta or
    noise added after the draw keep the weighting."""
    data = own_csv(tmp_path / "own.csv")
    base = ["train", "--dataset", f"csv:{data}", "--model", "mlp", "--meta-per-class", "10", "--epochs", "4",
            "--no-progress", "--threads", "1"]
    plain, ce = tmp_path / "plain", tmp_path / "ce"
    assert main([*base, "--out", str(plain)]) == 0
    out = capsys.readouterr().out
    assert "the meta set was drawn from labels not known to be clean: plain training" in \
        [x for x in out.splitlines() if x.startswith("epoch   1/4")][0]
    assert "gdw trains plainly, as --method ce does" in out and "cap on the instance weights" not in out
    rows = rows_of(plain)
    assert rows[0]["early_decision"] == "plain" and rows[0]["early_reason"] == "unchecked meta set"
    assert all(r.get("meta_loss") is None and not r["finetuning"] for r in rows)
    summary = json.loads((plain / "summary.json").read_text())
    assert summary["meta_unchecked"] is True and summary["early_decision"] == "plain"
    assert summary["early_decision_epoch"] == 1 and summary["early_noise_estimate"] is None
    assert main([*base, "--method", "ce", "--out", str(ce)]) == 0
    a, b = weights_of(plain), weights_of(ce)
    assert all(torch.equal(a[k], b[k]) for k in a)
    config = [json.loads((d / "config.json").read_text())["target"] for d in (plain, ce)]
    assert config[0]["fits"] == config[1]["fits"] == "train"
    assert config[0]["prediction_shift"] == config[1]["prediction_shift"]
    assert (plain / "label_issues.csv").read_text() == (ce / "label_issues.csv").read_text()
    adjusted = tmp_path / "adjusted"  # unchecked_meta=plain: plain training on the logit-adjusted loss
    assert main([*base, "--method-args", "unchecked_meta=plain", "--out", str(adjusted)]) == 0
    assert rows_of(adjusted)[0]["early_reason"] == "unchecked meta set"
    assert json.loads((adjusted / "config.json").read_text())["target"]["fits"] == "balanced"
    c = weights_of(adjusted)
    assert not all(torch.equal(c[k], b[k]) for k in c)
    assert main([*base, "--method-args", "unchecked_meta=plain,tau=0", "--out", str(tmp_path / "tau0")]) == 0
    c = weights_of(tmp_path / "tau0")
    assert all(torch.equal(c[k], b[k]) for k in c)

    weighted = tmp_path / "weighted"
    assert main([*base, "--method-args", "unchecked_meta=weight", "--out", str(weighted)]) == 0
    assert rows_of(weighted)[0].get("meta_loss") is not None
    assert json.loads((weighted / "summary.json").read_text())["meta_unchecked"] is True
    noisy = tmp_path / "noisy"
    assert main([*base, "--noise", "uniform:0.2", "--out", str(noisy)]) == 0
    assert rows_of(noisy)[0].get("meta_loss") is not None
    assert json.loads((noisy / "summary.json").read_text())["meta_unchecked"] is False
    checked = tmp_path / "checked"
    meta = own_csv(tmp_path / "checked.csv", n=40, seed=1)
    assert main([*base, "--meta", f"csv:{meta}", "--out", str(checked)]) == 0
    assert rows_of(checked)[0].get("meta_loss") is not None
    assert json.loads((checked / "summary.json").read_text())["meta_unchecked"] is False


def test_unchecked_meta_is_checked(tmp_path, capsys):
    model = torch.nn.Linear(4, 3)
    assert gdw.GDW(model, 3).unchecked_meta == "ce"  # the default (design question 22, plain training as CE's)
    assert gdw.GDW(model, 3, stage_one="mwnet").unchecked_meta == "weight"
    with pytest.raises(UserError, match="unchecked_meta"):
        gdw.GDW(model, 3, unchecked_meta="never")
    for value in ("plain", "ce"):
        with pytest.raises(UserError, match=f"unchecked_meta='{value}' needs stage_one='l2rw'"):
            gdw.GDW(model, 3, stage_one="mwnet", unchecked_meta=value)
    assert main(["train", *QUICK, "--method-args", "unchecked_meta=1", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unchecked_meta" in err[0]
