"""GDW's finetune_min_noise: ``gdw.fit``'s FinetuneCheck skips the
fine-tuning phase on the meta set where the run's own estimate of wrong
labels is below the threshold and the classes are not imbalanced."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from gdw.cli import main
from gdw.errors import UserError
from gdw.issues import find_label_issues
from gdw.recorder import FinetuneCheck

QUICK = ["--dataset", "digits", "--meta-per-class", "10", "--epochs", "5", "--no-progress", "--threads", "1"]


def rows_of(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights_of(out):
    return torch.load(out / "checkpoint.pt", weights_only=False)["model"]


def same_weights(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("noise, skipped", [("none", True), ("flip:0.4", False)])
def test_the_phase_is_skipped_only_where_the_labels_look_clean(noise, skipped, tmp_path, capsys):
    """Digits, 5 epochs (the last fine-tunes): without noise the estimate is
    below 5% and the run is the run without the phase, weight for weight;
    with 40% flips it is above, and the run is the run without the check."""
    checked, plain = tmp_path / "checked", tmp_path / "plain"
    # plain_below=0: without it the clean run would train plainly from epoch 2 on (test_early_check.py)
    other = "finetune_fraction=0,plain_below=0" if skipped else "finetune_min_noise=0,plain_below=0"
    assert main(["train", *QUICK, "--noise", noise, "--method-args", "finetune_min_noise=0.05,plain_below=0",
                 "--out", str(checked)]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("epoch   5/5")][0]
    assert main(["train", *QUICK, "--noise", noise, "--method-args", other, "--out", str(plain)]) == 0
    rows = rows_of(checked)
    decided = [r for r in rows if "finetune_skipped" in r]
    assert len(decided) == 1 and decided[0]["epoch"] == 5 and decided[0]["finetune_skipped"] is skipped
    estimate = decided[0]["finetune_noise_estimate"]
    assert (estimate < 0.05) if skipped else (estimate > 0.2)
    said = "no fine-tuning on the meta set" if skipped else ": fine-tuning on the meta set"
    assert f"{100 * estimate:.1f}% of labels look wrong" in line and said in line, line
    assert rows[-1]["finetuning"] is (not skipped)
    assert same_weights(weights_of(checked), weights_of(plain))
    ckpt = torch.load(checked / "checkpoint.pt", weights_only=False)
    assert ckpt["callbacks"]["finetune_check"] == {"skip": skipped, "early": None, "initial": None, "offset": 0}


def fake_state(labels, meta_labels, prob, meta_prob, threshold=0.05):
    """A FitState-like object around a recorder whose evidence is ``prob``
    and a model that predicts ``meta_prob`` on the meta set."""
    C = prob.shape[1]
    recorder = SimpleNamespace(num_classes=C, device=torch.device("cpu"),
                               evidence=lambda: {"count": np.ones(len(labels), np.int64), "prob": prob})
    meta = SimpleNamespace(labels=torch.as_tensor(meta_labels))
    data = SimpleNamespace(train=SimpleNamespace(labels=torch.as_tensor(labels)), meta=meta)
    method = SimpleNamespace(finetune_min_noise=threshold, finetuning=True)
    return FinetuneCheck(recorder, data), SimpleNamespace(method=method, model=None, row={}), meta_prob


def confident(labels, C, wrong=0):
    """Probabilities 0.9 on each label, the first ``wrong`` rows on the next class instead."""
    y = np.asarray(labels).copy()
    y[:wrong] = (y[:wrong] + 1) % C
    p = np.full((len(y), C), 0.1 / (C - 1))
    p[np.arange(len(y)), y] = 0.9
    return p


@pytest.mark.parametrize("wrong, counts, skip", [(0, (100, 100), True), (20, (100, 100), False),
                                                 (0, (150, 50), False)])
def test_decision_by_hand(monkeypatch, wrong, counts, skip):
    """Two classes: no row wrong (estimate 0) and balanced -> skipped; 20 of
    200 predicted against their label (estimate 0.1) -> kept; no row wrong
    but 150:50 -> kept (the long tail keeps its phase). The estimate is
    find_label_issues' own on the same arrays."""
    labels = np.repeat([0, 1], counts)
    meta_labels = np.repeat([0, 1], 20)
    cb, state, meta_prob = fake_state(labels, meta_labels, confident(labels, 2, wrong), confident(meta_labels, 2))
    monkeypatch.setattr("gdw.recorder.predict_proba", lambda *a, **k: torch.as_tensor(meta_prob))
    cb.on_epoch_start(state)
    want = find_label_issues(labels, confident(labels, 2, wrong), clean_labels=meta_labels,
                             clean_pred_probs=meta_prob).noise_rate
    assert state.row["finetune_noise_estimate"] == pytest.approx(want)
    assert want == pytest.approx(wrong / len(labels), abs=1e-9)
    assert state.row["finetune_skipped"] is skip and state.method.finetuning is (not skip)
    # decided once: a later epoch applies it without estimating again
    state.method.finetuning, state.row = True, {}
    monkeypatch.setattr("gdw.recorder.predict_proba", lambda *a, **k: pytest.fail("estimated twice"))
    cb.on_epoch_start(state)
    assert state.row == {} and state.method.finetuning is (not skip)


def test_no_threshold_or_no_phase_leaves_the_method_alone(monkeypatch):
    labels = np.repeat([0, 1], 50)
    cb, state, _ = fake_state(labels, labels[:20], confident(labels, 2), confident(labels[:20], 2), threshold=0.0)
    monkeypatch.setattr("gdw.recorder.predict_proba", lambda *a, **k: pytest.fail("no estimate wanted"))
    cb.on_epoch_start(state)
    assert state.method.finetuning is True and cb.skip is None
    state.method.finetune_min_noise, state.method.finetuning = 0.05, False
    cb.on_epoch_start(state)
    assert cb.skip is None


@pytest.mark.parametrize("value", ["1", "-0.1", "x"])
def test_bad_threshold_is_one_line(value, tmp_path, capsys):
    assert main(["train", *QUICK, "--method-args", f"finetune_min_noise={value}", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "finetune_min_noise" in err[0]
    assert not (tmp_path / "r").exists()


def test_defaults_by_stage_and_the_constructor_checks_it():
    import gdw

    model = torch.nn.Linear(4, 3)
    assert gdw.GDW(model, 3, stage_one="mwnet", finetune_min_noise=0.1).finetune_min_noise == 0.1
    assert gdw.GDW(model, 3).finetune_min_noise == 0.04  # the default (design question 9)
    assert gdw.GDW(model, 3, stage_one="mwnet").finetune_min_noise == 0.0  # the paper always does as it says
    with pytest.raises(UserError, match="finetune_min_noise"):
        gdw.GDW(model, 3, finetune_min_noise=1.0)


def test_a_run_interrupted_after_the_decision_resumes_to_the_same_model(tmp_path, monkeypatch):
    """Digits without noise, 10 epochs (the last 2 would fine-tune): Ctrl-C at
    the end of epoch 9, after its checkpoint, where the phase was skipped;
    the resumed run keeps skipping it and ends with the uninterrupted run's
    weights."""
    from gdw.callbacks import MetricsWriter

    flags = ["train", "--dataset", "digits", "--meta-per-class", "10", "--epochs", "10", "--no-progress",
             "--threads", "1", "--method-args", "plain_below=0"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main([*flags, "--out", str(full)]) == 0
    real = MetricsWriter.on_epoch_end

    def interrupt(self, state):
        real(self, state)
        if state.epoch == 8:
            raise KeyboardInterrupt

    monkeypatch.setattr(MetricsWriter, "on_epoch_end", interrupt)
    assert main([*flags, "--out", str(cut)]) != 0
    assert torch.load(cut / "checkpoint.pt", weights_only=False)["callbacks"]["finetune_check"]["skip"] is True
    monkeypatch.setattr(MetricsWriter, "on_epoch_end", real)
    assert main(["train", "--out", str(cut), "--resume", "--no-progress", "--threads", "1"]) == 0
    assert [r["finetuning"] for r in rows_of(cut)] == [False] * 10
    assert same_weights(weights_of(cut), weights_of(full))
