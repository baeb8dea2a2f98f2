"""gdw.integrations.tensorboard.TensorBoardLogger writes every numeric field
of each epoch's metrics row; read back with TensorBoard's EventAccumulator."""

import types

import pytest
import torch

import gdw

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from gdw.inputs import InputSplit  # noqa: E402
from gdw.integrations.tensorboard import TensorBoardLogger, scalars  # noqa: E402


class PerClass:
    """What the evaluator adds: a list per class, and a field that is not a number."""

    def on_epoch_end(self, state):
        state.row["per_class_test_accuracy"] = [0.25 * state.epoch, 0.5]
        state.row["note"] = "text"


def test_every_numeric_field_of_every_epoch_is_read_back(tmp_path):
    g = torch.Generator().manual_seed(0)
    x, xm = torch.randn(60, 5, generator=g), torch.randn(12, 5, generator=g)
    y, ym = (x[:, 0] > 0).long(), (xm[:, 0] > 0).long()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    method = gdw.make("gdw", model, 2, finetune_fraction=0)
    data = types.SimpleNamespace(train=InputSplit(x, y), meta=InputSplit(xm, ym, name="meta"))
    logger = TensorBoardLogger(tmp_path / "tb")
    history = gdw.fit(model, method, data, torch.optim.SGD(model.parameters(), lr=0.1), epochs=3, lr=0.1,
                      batch_size=20, meta_batch_size=6, callbacks=[PerClass(), logger])
    assert logger.writer is None  # closed at the end

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = scalars(history[0])
    assert {"train_loss", "meta_loss", "lr", "steps", "seconds", "finetuning", "per_class_test_accuracy/0",
            "per_class_test_accuracy/1"} <= set(expected)
    assert "note" not in expected and "epoch" not in expected
    assert tags == set(expected)
    for tag in tags:
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        want = [(row["epoch"], scalars(row)[tag]) for row in history]
        assert [s for s, _ in got] == [1, 2, 3]
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6), tag


def test_scalars_flattens_and_skips():
    row = {"epoch": 2, "a": 1, "b": None, "c": True, "d": {"x": 0.5, "y": "no"}, "e": [1, [2, 3]]}
    assert scalars(row) == {"a": 1.0, "c": 1.0, "d/x": 0.5, "e/0": 1.0, "e/1/0": 2.0, "e/1/1": 3.0}


def test_gdw_train_logger_tensorboard_writes_the_metrics_rows(tmp_path):
    """``gdw train --logger tensorboard``: the event file in RUN_DIR/tensorboard
    holds each row of metrics.jsonl; the setting is recorded but is not part
    of the run's fingerprint (it does not change the result: a resume may
    choose otherwise)."""
    import json

    from gdw.cli import main

    out = tmp_path / "run"
    flags = ["train", "--dataset", "digits", "--meta-per-class", "5", "--batch-size", "200", "--no-progress",
             "--threads", "1", "--out", str(out)]
    assert main([*flags, "--epochs", "2", "--logger", "tensorboard"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == set().union(*(scalars(r) for r in rows))  # a row may add a number
    for tag in ("train_loss", "test_accuracy", "meta_loss"):
        assert [e.value for e in events.Scalars(tag)] == pytest.approx([r[tag] for r in rows], rel=1e-6)
    assert json.loads((out / "config.json").read_text())["logger"] == "tensorboard"
    from gdw.config import TrainConfig

    assert TrainConfig(logger="tensorboard").fingerprint() == TrainConfig().fingerprint()
    with pytest.raises(gdw.UserError, match="--logger must be one of none, tensorboard"):
        TrainConfig(logger="wandb").validate()
