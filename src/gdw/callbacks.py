"""What happens around training: the callbacks ``gdw train`` gives ``fit()``.

Each is a small stateful object with some of the hooks ``on_fit_start``,
``on_epoch_start``, ``on_step(state, pos, stats)``, ``on_epoch_end`` and
``on_fit_end`` (``state`` is a :class:`gdw.fit.FitState`). Those that keep
state across epochs have ``name``, ``state_dict`` and ``load_state_dict``,
and the :class:`Checkpointer` saves them with the model. Only rank 0 writes
files or logs (``state.is_main``); collective work (summing per-example
statistics over ranks) runs on every rank.

``gdw train`` runs, in this order (:func:`gdw.train._callbacks`), the
:class:`gdw.recorder.LabelIssueRecorder`, :class:`Evaluator`,
:class:`WeightStats`, :class:`BestModel`, :class:`Checkpointer`,
:class:`MetricsWriter`, :class:`EpochLog`, :class:`Plots` and
:class:`LabelIssues`; each says what it adds to the row or writes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from .fit import FitState, evaluate
from .io import atomic_path, atomic_write
from .report import plot_curves, plot_weights


def atomic_torch_save(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def rng_state() -> dict:
    """The CPU and (when present) every CUDA device's random state."""
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


class Callback:
    """The hooks :func:`gdw.fit.fit` calls, each a no-op here: subclass and
    override the ones you need (``state`` is the :class:`gdw.fit.FitState`;
    ``state.row`` the epoch's ``metrics.jsonl`` row, ``state.is_main`` whether
    this process writes files). A callback with state across epochs sets
    ``name`` and returns it from :meth:`state_dict`; ``gdw train`` saves it in
    the checkpoint under ``name`` and restores it on ``--resume``. Plain
    objects with some of these methods work too: ``fit`` calls what exists."""

    name: Optional[str] = None

    def on_fit_start(self, state: FitState) -> None:
        """Before the first epoch (also of a resumed run)."""

    def on_epoch_start(self, state: FitState) -> None:
        """Before each epoch."""

    def on_step(self, state: FitState, pos, stats) -> None:
        """After each training step: ``pos`` the positions of the batch's
        examples in the training split, ``stats`` the method's :class:`gdw.Stats`."""

    def on_epoch_end(self, state: FitState) -> None:
        """After each epoch, in list order (the row is complete for later callbacks)."""

    def on_fit_end(self, state: FitState) -> None:
        """After the last epoch."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Evaluator(Callback):
    """Adds ``test_accuracy``, ``test_balanced_accuracy``, ``per_class_test_accuracy`` and ``test_loss``
    (and the same for ``val_`` when a validation split is given) to each row,
    of the predictions shifted by ``shift`` (the run's target prior)."""

    def __init__(self, splits: dict, num_classes: int, batch_size: int = 500, shift=None):
        self.splits = {k: v for k, v in splits.items() if v is not None}
        self.num_classes, self.batch_size, self.shift = num_classes, max(batch_size, 500), shift

    def on_epoch_end(self, state: FitState) -> None:
        if not state.is_main:
            return
        for name, split in self.splits.items():
            m = evaluate(state.model, split, self.num_classes, self.batch_size, shift=self.shift)
            state.row.update({f"{name}_loss": m["loss"], f"{name}_accuracy": m["accuracy"],
                              f"{name}_balanced_accuracy": m["balanced_accuracy"],
                              f"per_class_{name}_accuracy": m["per_class"]})


class WeightStats(Callback):
    """Per-example weights of the last epoch that trained on examples, from
    the recorder's sums (one set of per-example sums for the whole run).

    Writes ``example_weights.npy`` (``Stats.trust``: the weight on the
    labelled class), ``class_weights.npy`` (class-level methods, float16)
    and ``instance_weights.npy`` (methods with instance weights besides
    ``weights``) into ``out``; adds ``mean_weight_clean`` /
    ``mean_weight_noisy`` to the row when the true labels are known.
    """

    def __init__(self, recorder, out: Path, noisy_mask: Optional[np.ndarray]):
        self.recorder, self.out = recorder, Path(out)
        both = noisy_mask is not None and noisy_mask.any() and (~noisy_mask).any()
        self.noisy = noisy_mask if both else None

    def on_epoch_end(self, state: FitState) -> None:
        means = self.recorder.epoch_means()
        if not state.is_main or not means:
            return
        trust = means.get("trust")
        if trust is not None:
            ew = trust.cpu().numpy().astype(np.float32)
            np.save(self.out / "example_weights.npy", ew)
            if self.noisy is not None:
                state.row["mean_weight_clean"] = float(ew[~self.noisy].mean())
                state.row["mean_weight_noisy"] = float(ew[self.noisy].mean())
        if "class_weight" in means:
            np.save(self.out / "class_weights.npy", means["class_weight"].cpu().numpy().astype(np.float16))
        if "instance_weight" in means:
            np.save(self.out / "instance_weights.npy", means["instance_weight"].cpu().numpy().astype(np.float32))


class Checkpointer(Callback):
    """``checkpoint.pt`` at the end of every epoch, written atomically: model,
    optimizer, method, random states, history, the config's
    fingerprint and the state of every stateful callback."""

    def __init__(self, path: Path, fingerprint: str, stateful: dict):
        self.path, self.fingerprint, self.stateful = Path(path), fingerprint, stateful

    def on_epoch_end(self, state: FitState) -> None:
        if not state.is_main:
            return
        atomic_torch_save({"epoch": state.epoch, "model": state.model.state_dict(),
                           "optimizer": state.optimizer.state_dict(), "method": state.method.state_dict(),
                           "rng": rng_state(), "history": state.history, "fingerprint": self.fingerprint,
                           "callbacks": {name: cb.state_dict() for name, cb in self.stateful.items()}}, self.path)


class MetricsWriter(Callback):
    """``metrics.jsonl``: one JSON object per finished epoch, rewritten from the
    history after the checkpoint is saved (so the file never holds an epoch
    that the checkpoint does not, nor the same epoch twice)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_epoch_end(self, state: FitState) -> None:
        if state.is_main:
            atomic_write(self.path, "".join(json.dumps(row) + "\n" for row in state.history))

    on_fit_start = on_epoch_end  # a resumed run's file holds the checkpoint's epochs from the start


class EpochLog(Callback):
    """One line per epoch through ``log`` (rank 0), starting with the mean
    plain (unweighted) cross-entropy of the batches trained on against the
    labels given, which may be noisy: it rises when a method stops fitting
    the wrong ones. ``test_clean=False``: the
    test labels are the user's own, not known to be clean, and the line says
    so; fine-tuning epochs are marked, and the epoch where a method decides
    whether to fine-tune says what it found."""

    def __init__(self, log: Callable[[str], Any] = print, test_clean: bool = True):
        self.log, self.test_clean = log, test_clean

    def on_epoch_end(self, state: FitState) -> None:
        if not state.is_main:
            return
        row = state.row
        parts = [f"epoch {row['epoch']:>3}/{state.total}", f"CE on the given labels {row['train_loss']:.4f}"]
        if row.get("meta_loss") is not None:
            parts.append(f"meta {row['meta_loss']:.4f}")
        if "val_accuracy" in row:
            parts.append(f"val acc {100 * row['val_accuracy']:.2f}%")
        if "test_accuracy" in row:
            parts.append(f"test acc {100 * row['test_accuracy']:.2f}%"
                         + ("" if self.test_clean else " (on labels not known to be clean)"))
        if row.get("early_reason") == "unchecked meta set":  # gdw.recorder.FinetuneCheck, GDW's unchecked_meta
            parts.append("the meta set was drawn from labels not known to be clean: plain training (pass checked "
                         "examples as --meta to weight; --method-args unchecked_meta=weight weights anyway)")
        elif "early_decision" in row:  # the check a quarter of the way in (gdw.recorder.FinetuneCheck)
            parts.append(f"{100 * row['early_noise_estimate']:.1f}% of labels look wrong: "
                         + {"plain": "plain training from here", "cap": "instance weights capped at 1 from here",
                            "on": "weighting as it was"}[row["early_decision"]]
                         + (", restarted from the initial weights" if row.get("early_restart") else "")
                         + (f" for {row['early_restart_epochs']} epochs (the run ends at epoch "
                            f"{state.total})" if row.get("early_restart_epochs") else ""))
        if "finetune_skipped" in row:  # the fine-tuning check's decision (gdw.recorder.FinetuneCheck)
            parts.append(f"{100 * row['finetune_noise_estimate']:.1f}% of labels look wrong: "
                         + ("no fine-tuning on the meta set" if row["finetune_skipped"] else "fine-tuning on the meta set"))
        elif row.get("finetuning"):
            parts.append("fine-tuning on the meta set")
        elif "guard_shrink" in row:
            parts.append(f"guard λ {row['guard_shrink']:.2f}")
        parts.append(f"{row['seconds']:.1f}s")
        if "mean_weight_clean" in row:
            parts.append(f"weight clean {row['mean_weight_clean']:.3f} / mislabelled {row['mean_weight_noisy']:.3f}")
        self.log("  ".join(parts))


class BestModel(Callback):
    """``best.pt``: the model at the epoch of the best validation accuracy
    (the first of equals), written atomically when it improves; the row gets
    ``best_val_accuracy`` and ``best_val_epoch``. With ``patience`` K, sets
    ``state.stop`` after K epochs without improvement (early stopping),
    counted from the restart where a GDW run started again from its initial
    weights (``early_restart`` in the row) after its best epoch, so that
    the new start gets K epochs of its own; a resumed run that had stopped
    stays stopped."""

    name = "best_model"

    def __init__(self, path: Path, patience: Optional[int] = None):
        self.path, self.patience = Path(path), patience
        self.best_accuracy, self.best_epoch, self.stopped = -1.0, 0, False
        self.restart_epoch = 0  # the last epoch before a restart (0: none)

    def on_fit_start(self, state: FitState) -> None:
        state.stop = state.stop or self.stopped

    def on_epoch_end(self, state: FitState) -> None:
        acc = state.row.get("val_accuracy") if state.is_main else None
        if state.row.get("early_restart"):
            self.restart_epoch = state.row["epoch"] - 1
        if acc is not None and acc > self.best_accuracy:
            self.best_accuracy, self.best_epoch = acc, state.row["epoch"]
            atomic_torch_save({"model": state.model.state_dict(), "epoch": self.best_epoch,
                               "val_accuracy": acc}, self.path)
        if acc is not None:
            state.row.update(best_val_accuracy=self.best_accuracy, best_val_epoch=self.best_epoch)
        if self.patience is not None:
            since = max(self.best_epoch, self.restart_epoch)
            self.stopped = state.comm.broadcast(state.row["epoch"] - since >= self.patience
                                                if state.is_main else None)
            state.stop = self.stopped

    def state_dict(self) -> dict:
        return {"best_accuracy": self.best_accuracy, "best_epoch": self.best_epoch, "stopped": self.stopped,
                "restart_epoch": self.restart_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.best_accuracy, self.best_epoch = state["best_accuracy"], state["best_epoch"]
        self.stopped, self.restart_epoch = state["stopped"], state.get("restart_epoch", 0)


class Plots(Callback):
    """``curves.png`` (loss and accuracy per epoch) and ``weights.png`` (the
    distribution of the labelled-class weight, clean vs mislabelled)."""

    def __init__(self, out: Path, title: str, noisy_mask: Optional[np.ndarray]):
        self.out, self.title, self.noisy = Path(out), title, noisy_mask

    def on_fit_end(self, state: FitState) -> None:
        if not state.is_main or not state.history:
            return
        plot_curves(state.history, self.out / "curves.png", title=self.title)
        weights = self.out / "example_weights.npy"
        if weights.exists():
            plot_weights(np.load(weights), self.noisy, self.out / "weights.png",
                         title=f"{self.title.split(' on ')[0]}: weight on the labelled class")


class LabelIssues(Callback):
    """Writes ``label_issues.csv`` from the recorder at the end of the run."""

    def __init__(self, recorder, out: Path, data, method_name: str):
        self.recorder, self.out, self.data, self.method_name = recorder, Path(out), data, method_name

    def on_fit_end(self, state: FitState) -> None:
        if state.is_main:
            self.recorder.write(self.out, self.data, self.method_name, model=state.model,
                                fits_meta=bool(getattr(state.method, "needs_meta", False))
                                and not getattr(state.method, "as_ce", False))
