"""GDW's plain_below: ``gdw.fit``'s FinetuneCheck turns the weighting off a
quarter of the way into a run whose labels look clean (design question 16)."""

import json

import pytest
import torch
import torch.nn.functional as F

import gdw
from gdw.cli import main
from gdw.errors import UserError
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
    assert gdw.GDW(model, 3).plain_below == 0.0  # off by default
    with pytest.raises(UserError, match="plain_below"):
        gdw.GDW(model, 3, plain_below=1.0)
    with pytest.raises(UserError, match="plain_below needs stage_one='l2rw'"):
        gdw.GDW(model, 3, stage_one="mwnet", plain_below=0.1)


@pytest.mark.parametrize("epochs, at", [(40, 10), (8, 2), (2, 1), (1, 1), (30, 8)])
def test_the_check_comes_a_quarter_of_the_way_in(epochs, at):
    assert FinetuneCheck.plain_epoch(epochs) == at


def test_clean_labels_turn_the_weighting_off_and_noisy_ones_keep_it(tmp_path, capsys):
    """Digits, 8 epochs, the check at the start of epoch 3 (0-based 2):
    without noise the estimate is below 50% and from then on the rows have no
    meta loss and no fine-tuning; under 40% flips and a bound of 1e-6 the run
    is the run without the check, weight for weight."""
    clean = tmp_path / "clean"
    assert main(["train", *QUICK, "--method-args", "plain_below=0.5", "--out", str(clean)]) == 0
    out = capsys.readouterr().out
    rows = rows_of(clean)
    decided = [r for r in rows if "plain_training" in r]
    assert [r["epoch"] for r in decided] == [3] and decided[0]["plain_training"] is True
    assert decided[0]["plain_noise_estimate"] < 0.5
    assert "plain training from here" in [x for x in out.splitlines() if x.startswith("epoch   3/8")][0]
    assert all(r.get("meta_loss") is not None for r in rows[:2])
    assert all(r.get("meta_loss") is None and not r["finetuning"] for r in rows[2:])
    assert torch.load(clean / "checkpoint.pt", weights_only=False)["callbacks"]["finetune_check"]["plain"] is True

    checked, plain = tmp_path / "checked", tmp_path / "plain"
    noisy = ["--noise", "flip:0.4"]
    assert main(["train", *QUICK, *noisy, "--method-args", "plain_below=1e-6", "--out", str(checked)]) == 0
    assert main(["train", *QUICK, *noisy, "--out", str(plain)]) == 0
    assert [r["plain_training"] for r in rows_of(checked) if "plain_training" in r] == [False]
    a, b = weights_of(checked), weights_of(plain)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_interrupted_run_resumes_plain(tmp_path, monkeypatch):
    """Ctrl-C after epoch 5, past the switch: the resumed run trains plainly
    to the end and ends with the uninterrupted run's weights."""
    from gdw.callbacks import MetricsWriter

    flags = ["train", *QUICK, "--method-args", "plain_below=0.5"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main([*flags, "--out", str(full)]) == 0
    real = MetricsWriter.on_epoch_end

    def interrupt(self, state):
        real(self, state)
        if state.epoch == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(MetricsWriter, "on_epoch_end", interrupt)
    assert main([*flags, "--out", str(cut)]) != 0
    monkeypatch.setattr(MetricsWriter, "on_epoch_end", real)
    assert main(["train", "--out", str(cut), "--resume", "--no-progress", "--threads", "1"]) == 0
    assert all(r.get("meta_loss") is None for r in rows_of(cut)[2:])
    a, b = weights_of(cut), weights_of(full)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("value", ["1", "-0.1", "x"])
def test_bad_bound_is_one_line(value, tmp_path, capsys):
    assert main(["train", *QUICK, "--method-args", f"plain_below={value}", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "plain_below" in err[0]
