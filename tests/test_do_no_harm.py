"""Doing no harm: a run that collapses stops and says so, the target prior
the predictions follow, balanced accuracy, and a model without BatchNorm."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

import gdw
from gdw.cli import main
from gdw.fit import TrainingCollapsed, _check_collapse, evaluate
from gdw.prior import prediction_shift, resolve_target_prior, shares

QUICK = ["--dataset", "digits", "--meta-per-class", "10", "--no-progress"]


class DyingNet(nn.Module):
    """Learns for ``live`` training forwards, then every hidden unit is dead
    (as after a step too large for ReLUs): the logits are the head's bias,
    the same class for every input, the loss near ln C."""

    live = 30

    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.body = nn.Linear(math.prod(input_shape), 32)
        self.head = nn.Linear(32, num_classes)
        self.calls = 0

    def forward(self, x):
        if self.training and torch.is_grad_enabled():
            self.calls += 1
        h = torch.relu(self.body(x.flatten(1)))
        if self.calls > self.live:
            h = h * 0
        return self.head(h)


def dying(input_shape, num_classes):
    return DyingNet(input_shape, num_classes)


@pytest.mark.parametrize("method", ["ce", "gdw"])
def test_a_collapsed_run_stops_with_one_line_and_keeps_the_last_good_checkpoint(method, tmp_path, capsys):
    """Digits (14 steps an epoch): the model learns for two epochs, then
    predicts one class; the run ends with exit 1 and one line naming the
    collapse and a fix, and checkpoint.pt is the last epoch before it."""
    out = tmp_path / "run"
    code = main(["train", *QUICK, "--method", method, "--model", "test_do_no_harm:dying", "--epochs", "8",
                 "--out", str(out)])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "training collapsed in epoch" in err[0] and "--lr" in err[0], err
    assert "it had learned before" in err[0]
    collapsed = int(err[0].split("training collapsed in epoch ")[1].split(":")[0])
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["epoch"] + 1 == collapsed - 1  # the last good epoch, not the collapsed one
    assert not (out / "summary.json").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == collapsed - 1 and all(r["prediction_share"] < 0.99 for r in rows)


def state_with(history, classes=("a", "b", "c")):
    return SimpleNamespace(history=history, row={}, data=SimpleNamespace(classes=list(classes)))


def test_collapse_rule_on_hand_made_counts():
    """The rule itself: constant predictions after learning stop the run;
    labels that are themselves one class, a model that has not learned yet
    (fewer than three such epochs) and a diverse epoch do not."""
    const = torch.tensor([[100, 0, 0], [40, 30, 30]])
    learned = [{"prediction_share": 0.5}]
    with pytest.raises(TrainingCollapsed, match="predicts class 'a' for 100.0%"):
        _check_collapse(const, 1.0, 3, state_with(learned))
    _check_collapse(torch.tensor([[100, 0, 0], [95, 5, 0]]), 1.0, 3, state_with(learned))  # labels 95% one class
    _check_collapse(torch.tensor([[60, 20, 20], [40, 30, 30]]), 1.0, 3, state_with(learned))  # diverse
    never = [{"prediction_share": 1.0}]
    _check_collapse(const, 1.0, 1, state_with(never))  # two such epochs in a row, never learned: not yet
    with pytest.raises(TrainingCollapsed, match="3 epochs in a row"):
        _check_collapse(const, 1.0, 2, state_with(never * 2))
    with pytest.raises(TrainingCollapsed, match="blew up"):  # a loss far above ln C
        _check_collapse(torch.tensor([[60, 20, 20], [40, 30, 30]]), 51 * math.log(3), 0, state_with([]))
    s = state_with([])
    _check_collapse(torch.tensor([[60, 20, 20], [40, 30, 30]]), 1.0, 0, s)
    assert s.row["prediction_share"] == pytest.approx(0.6)
    # after a restart of the schedule (GDW's plain restart, at epoch 2) only the epochs since count: the restarted
    # model's first epochs are a new model's, which has not learned yet
    restarted = state_with(learned * 2)
    restarted.offset = 2
    _check_collapse(const, 1.0, 2, restarted)
    with pytest.raises(TrainingCollapsed, match="had learned"):
        restarted.offset = 0
        _check_collapse(const, 1.0, 2, restarted)


class OneBatch:
    """A split of a few examples, given as one batch."""

    def __init__(self, x, y):
        self.x, self.labels = x, y

    def batches(self, size, shuffle, device, augment):
        yield self.x.to(device), self.labels.to(device), torch.arange(len(self.labels))


def test_balanced_accuracy_by_hand():
    """Three classes with 4, 2 and 0 test examples: 3 of 4 and 1 of 2 right
    is accuracy 4/6 and balanced accuracy (3/4 + 1/2) / 2 (the absent class
    does not count)."""
    x = torch.tensor([[0.0], [0.0], [0.0], [1.0], [0.0], [1.0]])
    y = torch.tensor([0, 0, 0, 0, 1, 1])
    split = OneBatch(x, y)
    model = nn.Linear(1, 3)
    with torch.no_grad():  # input 0 -> class 0, input 1 -> class 1
        model.weight.copy_(torch.tensor([[-10.0], [10.0], [0.0]]))
        model.bias.copy_(torch.tensor([5.0, -5.0, -20.0]))
    m = evaluate(model, split, 3)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 1 / 2) / 2)
    shifted = evaluate(model, split, 3, shift=torch.tensor([0.0, 100.0, 0.0]))  # everything becomes class 1
    assert shifted["accuracy"] == pytest.approx(2 / 6) and shifted["balanced_accuracy"] == pytest.approx(0.5)


def test_target_prior_rule_and_shift_by_hand():
    assert resolve_target_prior("auto", [650, 350], "none") == "train"
    assert resolve_target_prior("auto", [100, 90, 80], "none") == "balanced"  # about equally frequent
    assert resolve_target_prior("auto", [650, 350], "longtail:10") == "balanced"  # the protocol's balanced test
    assert resolve_target_prior("balanced", [650, 350]) == "balanced"
    with pytest.raises(gdw.UserError, match="--target-prior"):
        resolve_target_prior("natural", [1, 1])
    # a balanced meta set, aimed at the training shares: log(0.65/0.5) - log(0.35/0.5), centred
    shift = prediction_shift("meta", "train", [650, 350], [50, 50])
    assert (shift[0] - shift[1]).item() == pytest.approx(math.log(0.65 / 0.35), rel=1e-6)
    assert shift.sum().item() == pytest.approx(0.0, abs=1e-6)
    assert prediction_shift("train", "balanced", [650, 350], [50, 50]) is None  # plain training is never shifted
    assert prediction_shift("balanced", "balanced", [650, 350], None) is None
    assert prediction_shift("meta", "balanced", [650, 350], [50, 50]) is None
    natural_meta = prediction_shift("meta", "balanced", [650, 350], [60, 40])  # a hand-checked set with a prior
    assert (natural_meta[0] - natural_meta[1]).item() == pytest.approx(-math.log(60 / 40), rel=1e-6)
    np.testing.assert_allclose(shares([3, 0, 1]), [0.6, 0.2, 0.2])


def test_methods_say_which_prior_they_fit():
    model = nn.Linear(4, 3)
    counts = [30, 10, 5]
    assert gdw.make("ce", model, 3).fits_prior == "train"
    assert gdw.make("l2rw", model, 3).fits_prior == "meta"
    assert gdw.make("la", model, 3, class_counts=counts).fits_prior == "balanced"
    assert gdw.make("la", model, 3, class_counts=counts, tau=0).fits_prior == "train"
    assert gdw.make("gdw", model, 3, class_counts=counts).fits_prior == "balanced"  # its logit adjustment
    assert gdw.make("gdw", model, 3).fits_prior == "meta"
    assert gdw.make("ce", model, 3, finetune_fraction=0.2).fits_prior == "meta"


@pytest.fixture(scope="module")
def imbalanced_npz(tmp_path_factory):
    """Two overlapping Gaussian classes, 70% / 30%, in train and test."""
    rng = np.random.default_rng(0)

    def draw(n):
        y = (rng.random(n) < 0.3).astype(np.int64)
        x = rng.normal(size=(n, 5)).astype(np.float32) + 0.8 * y[:, None]
        return x, y

    (xtr, ytr), (xte, yte) = draw(1500), draw(500)
    path = tmp_path_factory.mktemp("prior") / "data.npz"
    np.savez(path, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte, classes=np.array(["common", "rare"]))
    return path


def test_run_follows_its_target_prior_in_every_output(imbalanced_npz, tmp_path, capsys):
    """An imbalanced dataset of the user's: the default aims at the training
    shares (printed at the start, recorded in config.json and summary.json);
    the test accuracy and gdw predict use the shifted logits, and
    --target-prior balanced records no shift for GDW (it trains for balanced
    error). The meta set is drawn from the file's own labels, where gdw
    would train as CE (unchecked_meta), so the runs weight anyway."""
    out = tmp_path / "run"
    assert main(["train", "--dataset", f"npz:{imbalanced_npz}", "--method", "gdw", "--epochs", "3", "--no-progress",
                 "--meta-per-class", "20", "--method-args", "unchecked_meta=weight", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "target prior: train (auto: the classes' shares differ" in printed
    config = json.loads((out / "config.json").read_text())
    target = config["target"]
    assert target["prior"] == "train" and target["fits"] == "balanced"
    counts = np.bincount(np.load(out / "split.npz")["train_labels"], minlength=2)
    want = np.log(counts / counts.sum()) - np.log(counts / counts.sum()).mean()
    np.testing.assert_allclose(target["prediction_shift"], want, rtol=1e-5)
    assert json.loads((out / "summary.json").read_text())["target_prior"] == "train"
    # gdw predict applies the same shift: its probabilities are softmax(z + shift)
    import csv

    from gdw.predict import load_model, predict

    test_x = np.load(imbalanced_npz)["x_test"][:50]
    new = tmp_path / "new.npz"
    np.savez(new, x=test_x)
    predict(out, f"npz:{new}", tmp_path / "pred.csv", model_file="final")
    model, config, _ = load_model(out, "final")
    rows = list(csv.DictReader(open(tmp_path / "pred.csv")))
    got = np.array([[float(r["p_common"]), float(r["p_rare"])] for r in rows])
    plain = predict_plain(model, config, new)
    expected = torch.softmax(torch.log(torch.tensor(plain)) + torch.tensor(want, dtype=torch.float64), 1).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)

    out2 = tmp_path / "balanced"
    assert main(["train", "--dataset", f"npz:{imbalanced_npz}", "--method", "gdw", "--epochs", "1", "--no-progress",
                 "--meta-per-class", "20", "--target-prior", "balanced", "--method-args", "unchecked_meta=weight",
                 "--out", str(out2)]) == 0
    assert json.loads((out2 / "config.json").read_text())["target"]["prediction_shift"] is None


def test_share_counts_by_hand():
    from gdw.data.split import share_counts

    assert share_counts([2600, 1400], 100).tolist() == [65, 35]
    # 30 * (950, 50, 5) / 1005 = (28.36, 1.49, 0.15): floors (28, 1, 0), the one left to the largest remainder
    # (class 1), then class 2 gets 1 from the largest class
    assert share_counts([950, 50, 5], 30).tolist() == [27, 2, 1]
    assert share_counts([1, 1], 0).tolist() == [0, 0]


def test_per_class_draw_takes_one_count_or_one_per_class():
    from gdw.data.split import per_class_draw

    labels = np.random.default_rng(1).integers(0, 3, 300)
    same = per_class_draw(labels, 4, 3, np.random.default_rng(5))
    assert np.array_equal(same, per_class_draw(labels, [4, 4, 4], 3, np.random.default_rng(5)))
    got = per_class_draw(labels, [6, 2, 1], 3, np.random.default_rng(5), exclude=same)
    assert np.bincount(labels[got], minlength=3).tolist() == [6, 2, 1]
    assert not np.isin(got, same).any()


def test_meta_and_validation_draws_follow_the_target_prior(imbalanced_npz, tmp_path, capsys):
    """On a 70/30 dataset of the user's the default (target prior train) draws
    the meta and validation sets in the training labels' shares; a balanced
    target, or an injected long tail, draws as many of every class."""
    from gdw.data import prepare
    from gdw.data.split import share_counts

    d = prepare(f"npz:{imbalanced_npz}", meta_per_class=20, val_per_class=5)
    pool = np.load(imbalanced_npz)["y_train"]
    counts = np.bincount(pool, minlength=2)  # the whole training array: the test split is the file's own
    assert d.record["meta_draw_prior"] == d.record["val_draw_prior"] == "train"
    assert d.record["counts"]["meta"] == share_counts(counts, 40).tolist()
    assert d.record["counts"]["val"] == share_counts(counts, 10).tolist()
    assert d.record["counts"]["meta"][0] > 2 * d.record["counts"]["meta"][1]
    for kw in ({"target_prior": "balanced"}, {"imbalance": "longtail:2"}):
        b = prepare(f"npz:{imbalanced_npz}", meta_per_class=20, val_per_class=5, **kw)
        assert b.record["meta_draw_prior"] == b.record["val_draw_prior"] == "balanced"
        assert b.record["counts"]["meta"] == [20, 20] and b.record["counts"]["val"] == [5, 5]
    p = prepare(f"npz:{imbalanced_npz}", meta_per_class=20, val_per_class=5, meta_draw="per-class")
    assert p.record["meta_draw_prior"] == "balanced" and p.record["counts"]["meta"] == [20, 20]
    assert p.record["counts"]["val"] == share_counts(counts, 10).tolist()  # the validation set follows the target
    with pytest.raises(gdw.UserError, match="training labels' shares need"):
        prepare(f"npz:{imbalanced_npz}", meta_per_class=750)
    out = tmp_path / "run"
    assert main(["train", "--dataset", f"npz:{imbalanced_npz}", "--method", "l2rw", "--epochs", "1", "--no-progress",
                 "--meta-per-class", "20", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "the meta set drawn from your data has them" in printed
    # the meta set comes from the user's own labels and no noise was injected: the run points to dm
    assert "note: the meta set is as noisy as your labels" in printed and "--method dm" in printed
    assert main(["train", "--dataset", f"npz:{imbalanced_npz}", "--method", "l2rw", "--epochs", "1", "--no-progress",
                 "--meta-per-class", "20", "--noise", "uniform:0.2", "--out", str(tmp_path / "injected")]) == 0
    assert "as noisy as your labels" not in capsys.readouterr().out  # drawn before the injected noise
    # L2RW fits the meta set's prior, which is now the target's: the shift is what rounding leaves
    shift = json.loads((out / "config.json").read_text())["target"]["prediction_shift"]
    assert shift is None or max(abs(v) for v in shift) < 0.05


def predict_plain(model, config, new_npz):
    """The run's probabilities on ``new_npz`` without any shift (the run's
    own preprocessing, through gdw.data.load_new)."""
    from gdw.data import load_new
    from gdw.fit import predict_proba

    data = load_new(f"npz:{new_npz}", config["preprocess"], [str(c) for c in config["classes"]])
    return predict_proba(model, data.split).double().numpy()


def test_plain_mlp_is_registered_without_normalisation():
    model = gdw.models.create_model("mlp-plain", (8,), 3)
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.LayerNorm)) for m in model.modules())
    assert model(torch.zeros(2, 8)).shape == (2, 3)


@pytest.mark.parametrize("vals, n, want", [
    ([0.70, 0.90, 0.80], 50, "final"),  # 10 points on 50 examples: within 2 SE (11.3 points)
    ([0.70, 0.95, 0.80], 500, "best"),  # 15 points on 500 examples: beyond 2 SE (3.6 points)
    ([0.70, 0.80, 0.80], 5000, "final"),  # the best epoch is the last one's accuracy
])
def test_predict_uses_best_pt_only_when_it_clearly_beats_the_final_model(tmp_path, vals, n, want):
    from gdw.predict import choose_model_file

    (tmp_path / "best.pt").write_bytes(b"")
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"epoch": k + 1, "val_accuracy": v}) + "\n"
                                                    for k, v in enumerate(vals)))
    (tmp_path / "config.json").write_text(json.dumps({"data": {"n_val": n}}))
    got, why = choose_model_file(tmp_path)
    assert got == want and f"on {n} examples" in why
    (tmp_path / "best.pt").unlink()
    assert choose_model_file(tmp_path) == ("final", "the run has no validation split")
