"""Every epoch's metrics as TensorBoard scalars: a :func:`gdw.fit` callback.

::

    from gdw.integrations.tensorboard import TensorBoardLogger

    gdw.fit(model, method, data, optimizer, epochs=30, lr=0.1,
            callbacks=[Evaluator(...), TensorBoardLogger("runs/gdw")])   # last: it sees every field
    # tensorboard --logdir runs

Needs ``pip install 'gdw[tensorboard]'``.
"""

from __future__ import annotations

import numbers
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from ..callbacks import Callback


def scalars(row: dict, prefix: str = "") -> dict[str, float]:
    """The numeric fields of a ``metrics.jsonl`` row, by name: numbers (a
    bool as 0/1), and lists or dicts of numbers as ``name/0``, ``name/1``
    (per-class accuracies) or ``name/key``; ``None``, strings and the
    ``epoch`` itself (the step) are left out."""
    out = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if key == "epoch" and not prefix:
            continue
        if isinstance(value, (bool, numbers.Real)):
            out[name] = float(value)
        elif isinstance(value, dict):
            out.update(scalars(value, f"{name}/"))
        elif isinstance(value, (list, tuple)):
            out.update(scalars({str(i): v for i, v in enumerate(value)}, f"{name}/"))
    return out


class TensorBoardLogger(Callback):
    """Writes every numeric field of each epoch's row (``state.row``, what
    ``metrics.jsonl`` records: losses, accuracies, learning rate, the
    weights' means, the method's own numbers) as a scalar at step = the
    epoch number (from 1), into an event file in ``log_dir``.

    Put it after the callbacks that add fields to the row (the evaluator,
    the weight statistics). Only rank 0 writes. NaN and infinite values are
    written as they are; TensorBoard shows them as gaps."""

    def __init__(self, log_dir, flush_secs: int = 30):
        self.log_dir = Path(log_dir)
        self.flush_secs = flush_secs
        self.writer = None

    def on_epoch_end(self, state) -> None:
        if not state.is_main:
            return
        if self.writer is None:
            self.writer = SummaryWriter(str(self.log_dir), flush_secs=self.flush_secs)
        step = int(state.row.get("epoch", state.epoch + 1))
        for name, value in scalars(state.row).items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def on_fit_end(self, state) -> None:
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


__all__ = ["TensorBoardLogger", "scalars"]
