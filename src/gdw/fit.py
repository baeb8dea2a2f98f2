"""The training loop, and nothing else: ``fit()``.

``fit`` walks the epochs: it sets the cosine learning rate, gives the method
its epoch (schedules such as fine-tuning), pairs every training batch with a
meta batch from an endless, reshuffled meta stream, calls
``method.backward`` and the optimizer, and hands each step's
:class:`~gdw.methods.Stats` and each epoch's row to the callbacks. What is
not training — evaluation, per-example statistics, label issues, the
checkpoint, ``metrics.jsonl``, the log line, plots — is a callback
(:mod:`gdw.callbacks`). ``gdw train``, ``gdw compare``, ``gdw detect`` and
the benchmark scripts all train through this one function.

Losses stay tensors on the device during an epoch (no host synchronisation
per step); the finite-loss check runs every ``check_every`` steps and at the
epoch end, before any callback can save a checkpoint, so a diverged model is
never saved.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch

from . import inputs as model_inputs
from .distributed import Comm
from .data.batches import num_batches
from .engine import logits_of
from .errors import UserError

CHECK_EVERY = 50  # steps between finite-loss checks (each one synchronises with the device)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class TrainingCollapsed(TrainingDiverged):
    """The model predicts one class for (nearly) every example of an epoch
    although the labels are not one class; the last good checkpoint is kept."""


COLLAPSE_SHARE = 0.99  # an epoch whose training predictions are this much one class has collapsed ...
COLLAPSE_LABEL_SHARE = 0.9  # ... unless its labels are at least this much one class
COLLAPSE_EPOCHS = 3  # a model that never predicted anything else stops after this many such epochs
EXPLODED_LOSS = 50.0  # a mean plain cross-entropy above this many times ln C: the logits have blown up


def cosine_lr(base: float, epoch: int, epochs: int) -> float:
    """Learning rate of epoch ``epoch`` (0-based): base · (1 + cos(π·epoch/epochs)) / 2."""
    return 0.5 * base * (1 + math.cos(math.pi * epoch / epochs))


def seed_of(*parts: int) -> int:
    """A 63-bit seed from integers (stable across runs and platforms)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


def cycle(batches_of_pass) -> Iterator:
    """An endless stream from ``batches_of_pass(k)``, the iterable of pass k.

    For a user's own loop with a DataLoader, ``gdw.cycle(meta_loader)`` does
    the same: ``zip(train_loader, gdw.cycle(meta_loader))`` never stops early
    because the (small) meta loader ran out; every pass over it is reshuffled
    by the loader itself.
    """
    if not callable(batches_of_pass):
        loader = batches_of_pass
        batches_of_pass = lambda k: loader  # noqa: E731 - a new iterator per pass
    k = 0
    while True:
        empty = True
        for batch in batches_of_pass(k):
            empty = False
            yield batch
        if empty:
            raise ValueError("cycle(): the meta data yielded no batch")
        k += 1


def inputs_and_labels(batch, label_key: str = "labels") -> tuple:
    """``(x, y)`` of one loader batch: ``(x, y, ...)`` (a sequence, whose
    ``x`` may itself be a tensor, a dict of keyword arguments or a tuple of
    positional ones), or a dict holding the labels under ``label_key`` and
    the model's keyword arguments under the other keys (what a Hugging Face
    data collator yields)."""
    if isinstance(batch, Mapping):
        if label_key not in batch:
            raise UserError(f"a batch given as a dict must hold the labels under {label_key!r}; "
                            f"it has {', '.join(map(repr, batch))}")
        return {k: v for k, v in batch.items() if k != label_key}, batch[label_key]
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise UserError(f"a batch must be (inputs, labels, ...) or a dict with {label_key!r}, "
                        f"got {type(batch).__name__}")
    return batch[0], batch[1]


def batches(method, train_loader, meta_loader, *, label_key: str = "labels") -> Iterator:
    """One epoch of ``(x, y, x_meta, y_meta)`` for a user's own loop.

    Normally every training batch with the next meta batch (the meta loader
    restarted whenever it runs out, :func:`cycle`); in a method's
    fine-tuning epochs (``method.finetuning``, see ``finetune_fraction``)
    one pass over the meta loader, each batch given as both, since an epoch
    of fine-tuning is a pass over the data it trains on. Call
    ``method.on_epoch_start(epoch, epochs)`` first.

    A loader's batch is read by :func:`inputs_and_labels` (the labels under
    ``label_key`` when it is a dict).
    """
    if getattr(method, "finetuning", False):
        for batch in meta_loader:
            xm, ym = inputs_and_labels(batch, label_key)
            yield xm, ym, xm, ym
    else:
        for batch, meta_batch in zip(train_loader, cycle(meta_loader)):
            yield (*inputs_and_labels(batch, label_key), *inputs_and_labels(meta_batch, label_key))


@dataclass
class FitState:
    """What callbacks see. ``row`` is the current epoch's ``metrics.jsonl``
    row (callbacks may add fields); ``history`` holds the finished rows."""

    model: torch.nn.Module
    method: Any
    optimizer: torch.optim.Optimizer
    data: Any
    comm: Comm
    epochs: int
    epoch: int = 0
    history: list = field(default_factory=list)
    row: dict = field(default_factory=dict)
    stop: bool = False  # a callback sets it to end training after this epoch (early stopping)
    # epochs trained before a callback started the schedule again (GDW's plain restart, gdw.recorder.FinetuneCheck):
    # epoch e of the run is epoch e - offset of the schedule, and the run ends after epochs + offset
    offset: int = 0

    @property
    def total(self) -> int:
        """The epochs this run trains: ``epochs``, plus those before a restart of the schedule."""
        return self.epochs + self.offset

    @property
    def schedule_epoch(self) -> int:
        """The current epoch's place in the schedule (learning rate, batch order, fine-tuning)."""
        return self.epoch - self.offset

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and logs."""
        return self.comm.rank == 0


@torch.no_grad()
def predict_proba(model, split, batch_size: int = 500, device=None, shift=None) -> torch.Tensor:
    """Softmax probabilities (N, C) of ``model`` in eval mode on every example
    of ``split``, in split order, on ``device``; the model's mode is restored.
    ``shift``: (C,) added to the logits first (a run's prediction shift
    towards its target prior, :func:`gdw.prior.prediction_shift`)."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    b = 0.0 if shift is None else torch.as_tensor(shift, dtype=torch.float32, device=device)
    try:
        parts = [torch.softmax(logits_of(model_inputs.call(model, x)).float() + b, 1)
                 for x, _, _ in split.batches(max(batch_size, 1), shuffle=False, device=device, augment=False)]
    finally:
        model.train(was_training)
    return torch.cat(parts) if parts else torch.zeros(0, 0, device=device)


def evaluate(model, split, num_classes: int, batch_size: int = 500, device=None, shift=None) -> dict:
    """Accuracy, balanced accuracy (the mean of the per-class accuracies over
    the classes present in ``split``), per-class accuracy (fractions; 0 for
    an absent class) and mean cross-entropy on ``split``, of the
    predictions shifted by ``shift`` (see :func:`predict_proba`)."""
    prob = predict_proba(model, split, batch_size, device, shift)
    y = split.labels.to(prob.device)
    hit = (prob.argmax(1) == y).float()
    per_class = torch.zeros(num_classes, device=prob.device).index_add_(0, y, hit)
    count = torch.zeros(num_classes, device=prob.device).index_add_(0, y, torch.ones_like(hit))
    loss = -prob.gather(1, y[:, None]).clamp(min=1e-12).log().mean()
    rate = per_class / count.clamp(min=1)
    present = count > 0
    return {"accuracy": float(hit.mean()) if len(y) else float("nan"),
            "balanced_accuracy": float(rate[present].mean()) if len(y) else float("nan"),
            "per_class": rate.tolist(), "loss": float(loss)}


def fit(model: torch.nn.Module, method, data, optimizer: torch.optim.Optimizer, *, epochs: int, lr: float,
        batch_size: int = 100, meta_batch_size: int = 100, seed: int = 0, callbacks: Sequence = (),
        comm: Optional[Comm] = None, start_epoch: int = 0, history: Optional[list] = None, amp: bool = False,
        progress: bool = False) -> list[dict]:
    """Train ``model`` with ``method`` for ``epochs`` epochs; return the history.

    Args:
        model: any ``nn.Module``, already on its device.
        method: a :class:`gdw.Method` built on ``model``.
        data: a :class:`gdw.data.Prepared` (``train``, ``meta`` or None).
        optimizer: steps after every ``method.backward``; its learning rate
            is set to ``cosine_lr(lr, epoch, epochs)`` at every epoch start.
        epochs, lr, batch_size, meta_batch_size, seed: the schedule; batch
            order and meta batches depend only on (seed, epoch), so a resumed
            run sees the same batches as an uninterrupted one. A callback
            may start the schedule again at an epoch's start
            (``state.offset``, as GDW's plain restart does): the run then
            trains ``epochs`` epochs from there, on the same schedule.
        callbacks: :class:`gdw.Callback` objects (or any with some of its
            hooks), called in order; one that sets ``state.stop`` ends
            training after the epoch.
        comm: the ranks the batches are split over (:class:`Comm`); one
            process when omitted.
        start_epoch, history: continue a run (from a checkpoint).
        amp: bfloat16 autocast on CUDA.
        progress: a tqdm bar per epoch (rank 0).
    Raises:
        TrainingDiverged: the loss became NaN or infinite; TrainingCollapsed: the model
            came to predict one class for (nearly) every example (:func:`_check_collapse`).
    """
    comm = comm or Comm.single()
    device = next(model.parameters()).device
    state = FitState(model, method, optimizer, data, comm, epochs, start_epoch, list(history or []))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    _call(callbacks, "on_fit_start", state)
    epoch = start_epoch
    while epoch < state.total and not state.stop:
        state.epoch, state.row = epoch, {"epoch": epoch + 1}
        lr_now = _schedule(state, lr)
        offset = state.offset
        _call(callbacks, "on_epoch_start", state)
        if state.offset != offset:  # a callback started the schedule again at this epoch
            lr_now = _schedule(state, lr)
        plan = _epoch_plan(state, seed, batch_size, meta_batch_size, device, progress)
        t0 = time.perf_counter()
        done = _train_epoch(state, plan, callbacks, autocast, lr_now, device)
        _end_epoch(state, plan, done, lr_now, t0)
        _call(callbacks, "on_epoch_end", state)
        epoch += 1
    _call(callbacks, "on_fit_end", state)
    return state.history



def _schedule(state: FitState, lr: float) -> float:
    """Set the cosine learning rate of the current epoch's place in the
    schedule and start the method's epoch there; the learning rate."""
    e = state.schedule_epoch
    lr_now = cosine_lr(lr, e, state.epochs)
    for group in state.optimizer.param_groups:
        group["lr"] = lr_now
    state.method.on_epoch_start(e, state.epochs)
    return lr_now


def _epoch_plan(state: FitState, seed: int, batch_size: int, meta_batch_size: int, device, progress: bool):
    """What an epoch trains on: ``source`` (the training split, or in a fine-tuning epoch the
    meta split, one pass), its ``batches``, the cycling ``meta`` batches (or None) and ``finetuning``."""
    data, epoch, shard = state.data, state.schedule_epoch, state.comm.shard
    meta = None
    finetuning = bool(getattr(state.method, "finetuning", False))
    if finetuning:  # an epoch of fine-tuning is one pass over the meta set, whose batches are trained on
        source, size = data.meta, min(meta_batch_size, len(data.meta))
    else:
        source, size = data.train, batch_size
        if data.meta is not None:
            meta = cycle(lambda k: data.meta.batches(min(meta_batch_size, len(data.meta)), shuffle=True,
                                                     seed=seed_of(seed, epoch, 1 + k), device=device, shard=shard))
    batches = source.batches(size, shuffle=True, seed=seed_of(seed, epoch, 0), device=device, shard=shard)
    if progress and state.is_main:
        from tqdm import tqdm

        batches = tqdm(batches, total=num_batches(len(source), size), desc=f"epoch {state.epoch + 1}/{state.total}",
                       leave=False, dynamic_ncols=True)
    return SimpleNamespace(source=source, batches=batches, meta=meta, finetuning=finetuning)


def _train_epoch(state: FitState, plan, callbacks, autocast, lr_now: float, device):
    """The steps of one epoch; the sums they leave (on the device, no synchronisation per step):
    ``loss_sum``, ``meta_sum`` over ``meta_steps``, ``counts`` of predicted and labelled classes, ``steps``."""
    method, optimizer, meta, finetuning = state.method, state.optimizer, plan.meta, plan.finetuning
    done = SimpleNamespace(loss_sum=torch.zeros((), device=device), meta_sum=torch.zeros((), device=device),
                           counts=None, meta_steps=0, steps=0)
    for step, (x, y, pos) in enumerate(plan.batches, 1):
        xm, ym = next(meta)[:2] if meta is not None else (x, y) if finetuning else (None, None)
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            stats = method.backward(x, y, xm, ym, inner_lr=lr_now)
        optimizer.step()
        done.loss_sum += stats.loss * len(y)
        done.counts = _count_classes(done.counts, stats.logits, y if stats.trained_on == "train" else ym)
        if stats.meta_loss is not None:
            done.meta_sum += stats.meta_loss
            done.meta_steps += 1
        _call(callbacks, "on_step", state, pos, stats)
        if step % CHECK_EVERY == 0:
            _check_finite(done.loss_sum, state.epoch)
        done.steps = step
    return done


def _end_epoch(state: FitState, plan, done, lr_now: float, t0: float) -> None:
    """Sum the epoch over the ranks, stop a run that diverged or collapsed, and fill in its row
    (its ``seconds`` since ``t0``, after the sums, so that on an accelerator they include its work)."""
    state.comm.sum_([done.loss_sum] + ([done.counts] if done.counts is not None else []))
    _check_finite(done.loss_sum, state.epoch)
    _check_collapse(done.counts, float(done.loss_sum) / max(len(plan.source), 1), state.epoch, state)
    state.row.update(lr=lr_now, steps=done.steps, finetuning=plan.finetuning,
                     train_loss=float(done.loss_sum) / len(plan.source),
                     meta_loss=float(done.meta_sum) / done.meta_steps if done.meta_steps else None,
                     seconds=time.perf_counter() - t0)
    state.row.update(getattr(state.method, "epoch_record", dict)())
    state.history.append(state.row)

def _count_classes(counts, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``counts`` (2×C, on the device) plus this batch's predicted classes
    (row 0) and labels (row 1); no host synchronisation."""
    C = logits.shape[1]
    now = torch.stack([torch.bincount(logits.detach().argmax(1), minlength=C)[:C], torch.bincount(y, minlength=C)[:C]])
    return now if counts is None else counts + now


def _check_collapse(counts, mean_loss: float, epoch: int, state: FitState) -> None:
    """Raise :class:`TrainingCollapsed` when the epoch's mean plain
    cross-entropy is above ``EXPLODED_LOSS``·ln C (the logits blew up), or
    when its training predictions are at least ``COLLAPSE_SHARE`` one class
    while its labels are at most ``COLLAPSE_LABEL_SHARE`` one class and the
    model predicted otherwise in an earlier epoch (it had learned; else after
    ``COLLAPSE_EPOCHS`` such epochs in a row). Called before the epoch's
    callbacks, so the checkpoint stays the last good epoch's. Records
    ``prediction_share`` (the most predicted class's share of the epoch) in
    ``state.row``."""
    if counts is None:
        return
    counts = counts.double().cpu()
    total = float(counts[1].sum())
    if total == 0:
        return
    if mean_loss > EXPLODED_LOSS * math.log(max(counts.shape[1], 2)):
        raise TrainingCollapsed(f"training blew up in epoch {epoch + 1}: the mean training cross-entropy is "
                                f"{mean_loss:.4g}, over {EXPLODED_LOSS:g}·ln C")
    share = float(counts[0].max()) / total
    state.row["prediction_share"] = share
    if share < COLLAPSE_SHARE or float(counts[1].max()) / total > COLLAPSE_LABEL_SHARE:
        return
    before = [h.get("prediction_share") for h in state.history[getattr(state, "offset", 0):]]  # since the schedule began
    learned = any(s is not None and s < COLLAPSE_SHARE for s in before)
    fine = [s is None or s < COLLAPSE_SHARE for s in reversed(before)]  # the epochs before it, the latest first
    streak = 1 + (fine.index(True) if True in fine else len(fine))  # this epoch and the collapsed ones just before
    if learned or streak >= COLLAPSE_EPOCHS:
        cls = int(counts[0].argmax())
        names = getattr(state.data, "classes", None)
        name = repr(str(names[cls])) if names is not None and cls < len(names) else f"{cls}"
        raise TrainingCollapsed(
            f"training collapsed in epoch {epoch + 1}: the model predicts class {name} for {100 * share:.1f}% of "
            f"the examples trained on, whose labels are at most {100 * float(counts[1].max()) / total:.0f}% one "
            "class" + (" (it had learned before)" if learned else f" ({streak} epochs in a row)"))


def _check_finite(loss_sum: torch.Tensor, epoch: int) -> None:
    if not bool(torch.isfinite(loss_sum)):
        raise TrainingDiverged(f"the training loss became {float(loss_sum)} (non-finite) in epoch {epoch + 1}")


def _call(callbacks, hook: str, *args) -> None:
    for cb in callbacks:
        fn = getattr(cb, hook, None)
        if fn is not None:
            fn(*args)
