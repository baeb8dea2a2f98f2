"""One run: settings → data, model, method → ``fit()`` → run directory.

``train(TrainConfig(...))`` prepares the data, builds the model and the
method, trains through :func:`gdw.fit.fit` with SGD (momentum 0.9, weight
decay 5e-4, cosine decay per epoch as in the paper) and the callbacks of
:mod:`gdw.callbacks`, and writes a run directory (what each file holds: the
run-directory contract in CONTRIBUTING.md).

A run is defined by its settings. ``resume=True`` continues the run in
``out`` with the settings saved there; a setting that differs from the
saved one is refused, except those in :data:`NEUTRAL`, which cannot change
the result. All randomness is derived from the seed and the epoch or saved
in the checkpoint, so a resumed run ends with the same parameters as an
uninterrupted one on the same device. A run that fails or is interrupted
before its first checkpoint leaves nothing behind (one killed then is
replaced when started again); resuming a finished run changes nothing.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from .callbacks import (BestModel, Checkpointer, EpochLog, Evaluator, LabelIssues, MetricsWriter, Plots,
                        WeightStats, set_rng_state)
from .data.batches import num_batches
from .distributed import Comm, init_from_env, launched_by_torchrun
from .io import atomic_write
from .errors import UserError
from .fit import TrainingDiverged, fit  # noqa: F401 - re-exported
from .methods import METHODS, make
from .models import check_logits, create_model
from .prior import describe, prediction_shift, resolve_target_prior
from .recorder import FinetuneCheck, LabelIssueRecorder, meta_unchecked, plain_when_unchecked
from .config import NEUTRAL, TrainConfig, changed_data_files, default_out  # noqa: F401 - re-exported
from .rundir import (RunInterrupted, _config_record, _interrupts, _summary, check_run_dir,  # noqa: F401 - re-exported
                     check_same_data, describe_difference, load_checkpoint, run_dir)


def pick_device(requested: Optional[str]) -> torch.device:
    """CUDA when present, else CPU; ``requested`` ("cpu", "cuda", "cuda:1") overrides."""
    if requested in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UserError(f"--device: unknown device {requested!r} (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but CUDA is not available on this machine")
    return device


def _resumed_fingerprint(cfg: TrainConfig, out: Path, fingerprint: str) -> str:
    """The fingerprint the run in ``out`` recorded, where ``cfg`` is that run
    with its method parameters spelled out (a default changed since it
    started: :meth:`TrainConfig.with_recorded_params`); else ``fingerprint``,
    and the checkpoint's check decides."""
    path = out / "config.json"
    recorded = json.loads(path.read_text()).get("fingerprint") if path.is_file() else None
    if recorded is None or recorded == fingerprint:
        return fingerprint
    saved = TrainConfig.load(out)
    return recorded if saved._record_is_whole() and cfg.first_difference(saved) is None else fingerprint


def build(cfg: TrainConfig, device: torch.device, comm: Comm):
    """``(data, model, optimizer, method)`` for ``cfg``; every user mistake
    in them raises UserError before anything is written."""
    from .data import prepare  # the data layer pulls in scikit-learn

    torch.manual_seed(cfg.seed)
    data = prepare(cfg.dataset, noise=cfg.noise, imbalance=cfg.imbalance, meta_per_class=cfg.meta_per_class,
                   seed=cfg.seed, data_root=cfg.data_root, download=cfg.download, label_column=cfg.label_column,
                   test_fraction=cfg.test_fraction, meta=cfg.meta, val_per_class=cfg.val_per_class, test=cfg.test,
                   features=cfg.features, ignore=cfg.ignore, text_column=cfg.text_column, encoder=cfg.encoder,
                   text_dir=cfg.out if cfg.resume else None,  # a resumed text run: its fitted encoder, its embeddings
                   holdout=cfg.holdout, target_prior=cfg.target_prior,
                   meta_draw=cfg.meta_draw or "target")
    C = data.num_classes
    method_cls = METHODS.get(cfg.method)
    model = create_model(cfg.model, data.input_shape, C).to(device)
    check_logits(model, data.input_shape, C, device)
    if cfg.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    hparams = {**cfg.method_args, **({"head_only": True} if cfg.head_only else {})}
    if method_cls.needs_class_counts:
        hparams["class_counts"] = torch.bincount(data.train.labels, minlength=C).tolist()
    if getattr(method_cls, "needs_meta_counts", False) and data.meta is not None:
        hparams["meta_counts"] = torch.bincount(data.meta.labels, minlength=C).tolist()
    method = make(cfg.method, model, C, optimizer=opt, comm=comm, **hparams)
    if method.needs_meta and data.meta is None:
        raise UserError(f"method {cfg.method!r} needs a meta set, but --meta-per-class is 0")
    return data, model, opt, method


def _setup(cfg: TrainConfig, comm: Optional[Comm]) -> tuple[Comm, torch.device]:
    if comm is None and launched_by_torchrun():
        device = init_from_env(cfg.device)
        comm = Comm()
    else:
        device = pick_device(cfg.device)
        comm = comm or Comm.single()
    if cfg.amp and device.type != "cuda":
        raise UserError("--amp needs a CUDA device")
    if cfg.sync_bn and not (comm.active and device.type == "cuda"):
        raise UserError("--sync-bn needs torchrun on CUDA devices (SyncBatchNorm has no CPU kernel)")
    return comm, device


def _on_rank0(comm: Comm, fn):
    """``fn()`` on rank 0; its result, or the UserError it raised, on every rank."""
    result = None
    if comm.rank == 0:
        try:
            result = fn()
        except UserError as err:
            result = err
    result = comm.broadcast(result)
    if isinstance(result, UserError):
        raise result
    return result


def train(cfg: TrainConfig, log=print, comm: Optional[Comm] = None) -> dict:
    """Train one model as configured; return the summary (also in summary.json).

    Raises:
        UserError: a bad setting, dataset or run directory (nothing written).
        TrainingDiverged: the loss became non-finite (the last good
            checkpoint stays loadable).
        RunInterrupted: Ctrl-C; the message says what was kept.
    """
    cfg = cfg.validate().absolute()
    owns_group = comm is None and launched_by_torchrun()
    comm, device = _setup(cfg, comm)
    main = comm.rank == 0
    out = Path(_on_rank0(comm, lambda: str(check_run_dir(cfg))))
    cfg.out = str(out)
    if cfg.resume and (out / "summary.json").is_file():
        summary = json.loads((out / "summary.json").read_text())
        n = summary.get("epochs_trained", cfg.epochs)
        trained = f"{n} of {cfg.epochs} epochs" if n <= cfg.epochs else f"{n} epochs, the last {cfg.epochs} after a restart"
        log(f"gdw train: the run in {out} is finished ({trained}); nothing to resume, nothing changed")
        return summary
    fingerprint = cfg.fingerprint()  # once: the checkpoint, its check on --resume and config.json
    if cfg.resume:
        fingerprint = _resumed_fingerprint(cfg, out, fingerprint)
    ckpt = load_checkpoint(out, device, fingerprint) if cfg.resume else None
    data, model, opt, method = build(cfg, device, comm)
    if ckpt is not None:
        check_same_data(out, data)
    if getattr(method, "unchecked_meta", "weight") == "ce" and meta_unchecked(data):
        method.train_as_ce()  # gdw's unchecked_meta: a CE run, its predictions aimed as CE's are
    target, shift = target_prior(cfg, data, method)
    callbacks, stateful = _callbacks(cfg, data, out, device, log if main else (lambda *a, **k: None), shift,
                                     fingerprint)
    if ckpt is not None:
        _restore(ckpt, model, opt, method, stateful)
    start, history = (ckpt["epoch"] + 1, ckpt["history"]) if ckpt else (0, [])
    _log_start(log, cfg, data, device, out, target, start if ckpt else None, method)
    with run_dir(out, main), _interrupts(out, cfg):
        if main and ckpt is None:
            record = {**_config_record(cfg, data, device, comm, fingerprint),
                      "target": {k: v for k, v in target.items() if k != "line"}}
            atomic_write(out / "config.json", json.dumps(record, indent=2, default=str))
            data.save_split(out / "split.npz")
            from .data.text import save as save_text  # a text run's encoder and embeddings

            save_text(out, data.preprocess, [s.source_file for s in (data.train, data.meta, data.val, data.test) if s])
        history = fit(model, method, data, opt, epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                      meta_batch_size=cfg.meta_batch_size, seed=cfg.seed, callbacks=callbacks, comm=comm,
                      start_epoch=start, history=history, amp=cfg.amp, progress=cfg.progress)
    summary = {}
    if main:
        seconds = sum(row["seconds"] for row in history)
        summary = _summary(cfg, data, history, seconds, num_batches(len(data.train), cfg.batch_size), comm.world)
        summary["target_prior"] = target["prior"]
        summary.update(getattr(method, "decided_params", {}))  # what the method decided from the model and data
        early = [row for row in history if "early_decision" in row]  # the check a quarter of the way in
        if early:
            summary.update({k: early[0].get(k) for k in ("early_noise_estimate", "early_decision")},
                           early_decision_epoch=early[0]["epoch"], early_restart=bool(early[0].get("early_restart")),
                           **{k: early[0][k] for k in ("early_disagreement", "early_reason") if k in early[0]})
        if data.meta is not None:  # the meta set drawn from labels not known to be clean (gdw's unchecked_meta)
            summary["meta_unchecked"] = meta_unchecked(data)
        summary.update(getattr(stateful.get("label_issues"), "noise", {}))
        _log_end(log, summary)
        atomic_write(out / "summary.json", json.dumps(summary, indent=2))
    comm.barrier()
    if owns_group:  # the process group torchrun's environment made us join: left before the process exits
        torch.distributed.destroy_process_group()
    return summary


def _restore(ckpt: dict, model, opt, method, stateful: dict) -> None:
    """Model, optimiser, method, callbacks and random state from a checkpoint."""
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    method.load_state_dict(ckpt["method"])
    for name, cb in stateful.items():
        if name in ckpt["callbacks"]:  # a checkpoint from before a callback existed has none of its state
            cb.load_state_dict(ckpt["callbacks"][name])
    set_rng_state(ckpt["rng"])


def _log_start(log, cfg: TrainConfig, data, device, out: Path, target: dict, resumed_after: Optional[int],
               method=None) -> None:
    """The lines a run starts with: what it trains on, its target prior,
    what the method decided from the model and data, the data's warnings."""
    rate = data.record.get("realised_noise_rate")
    val = getattr(data, "val", None)
    log(f"gdw train: {cfg.method} on {cfg.dataset} ({len(data.train)} train, "
        f"{0 if data.meta is None else len(data.meta)} meta, " + (f"{len(val)} val, " if val is not None else "")
        + f"{len(data.test)} test, {data.num_classes} classes), noise {cfg.noise}, imbalance {cfg.imbalance}, "
        + ("true labels unknown" if rate is None else f"realised noise {rate:.3f}") + f", device {device} → {out}"
        + (f" (resuming after epoch {resumed_after})" if resumed_after is not None else ""))
    log("gdw train: " + target["line"])
    if getattr(method, "cap_note", None):
        log(f"gdw train: {cfg.method}: {method.cap_note}")
    for warning in data.record.get("warnings", []):
        log(f"gdw train: warning: {warning}")
    if meta_unchecked(data) and METHODS.get(cfg.method).needs_meta:
        if plain_when_unchecked(method):
            log("gdw train: note: the meta set is as noisy as your labels, so gdw trains plainly"
                + (", as --method ce does" if getattr(method, "as_ce", False) else "") + " (pass checked "
                "examples as --meta to weight). Without a clean set, --method dm (no meta set) did better than "
                "plain training where 20-40% of the labels were wrong (docs/results.md, 'No clean set')")
        else:
            log("gdw train: note: the meta set is as noisy as your labels. Without a clean set, --method dm (no meta "
                "set) did better than gdw where 20-40% of the labels were wrong, and plain training (--method ce) "
                "where few were (docs/results.md, 'No clean set')")


def _log_end(log, summary: dict) -> None:
    if summary.get("estimated_noise_caveat"):
        log(f"gdw train: note: the estimate of wrong labels, {100 * summary['estimated_noise_rate']:.1f}%, is "
            f"rough: {summary['estimated_noise_caveat']}")
    if summary.get("guard_shrink", 0) >= 0.5:
        log(f"gdw train: note: weights learned on half of the meta set did not help its other half "
            f"(λ = {summary['guard_shrink']:.2f} at the end): the run trained close to plain training. "
            "The weighting needs a meta set whose labels are cleaner than the training labels (--meta)")


def target_prior(cfg: TrainConfig, data, method) -> tuple[dict, Optional[torch.Tensor]]:
    """``(record, shift)``: the run's target prior resolved (``record``:
    ``prior`` "train" | "balanced", ``setting``, the method's ``fits``,
    ``prediction_shift`` (C floats, or None) and ``line``, the sentence
    printed at the start) and the shift added to the logits of every
    prediction (:mod:`gdw.prior`)."""
    C = data.num_classes
    true = data.train.true_labels
    labels = true if true is not None and bool((true >= 0).all()) else data.train.labels
    counts = torch.bincount(labels, minlength=C).tolist()
    meta = None if data.meta is None else torch.bincount(data.meta.labels, minlength=C).tolist()
    # resolved once: where the meta / validation sets were drawn from the training data, as their draw was
    prior = data.record.get("val_draw_prior") or resolve_target_prior(cfg.target_prior, counts, cfg.imbalance)
    shift = prediction_shift(method.fits_prior, prior, counts, meta)
    how = "set" if cfg.target_prior != "auto" else (
        "auto: --imbalance keeps the test split balanced" if cfg.imbalance != "none" else
        "auto: the classes are about equally frequent" if prior == "balanced" else "auto: the classes' shares differ")
    return ({"prior": prior, "setting": cfg.target_prior, "fits": method.fits_prior,
             "prediction_shift": None if shift is None else [round(float(v), 6) for v in shift],
             "line": describe(prior, counts, [str(c) for c in data.classes], how,
                              drawn=data.record.get("meta_draw_prior") == "train")}, shift)


def _callbacks(cfg: TrainConfig, data, out: Path, device, log, shift, fingerprint: str):
    """The callbacks of a ``gdw train`` run, in the order they must run at an
    epoch end: rows are complete before the checkpoint, the checkpoint is
    saved before metrics.jsonl is rewritten from it."""
    if cfg.logger == "tensorboard":  # the rows as scalars in out/tensorboard
        from .integrations.tensorboard import TensorBoardLogger
    true = data.train.true_labels
    noisy = (data.train.labels != true).numpy() if true is not None and bool((true >= 0).all()) else None
    recorder = LabelIssueRecorder(len(data.train), data.num_classes, cfg.epochs, device)
    val = getattr(data, "val", None)
    stateful = {"label_issues": recorder, "finetune_check": FinetuneCheck(recorder, data, cfg.batch_size)}
    if val is not None:
        stateful["best_model"] = BestModel(out / "best.pt", cfg.early_stop)
    title = f"{cfg.method} on {cfg.dataset}, {cfg.noise}"
    return [
        recorder,
        stateful["finetune_check"],
        Evaluator({"val": val, "test": data.test}, data.num_classes, cfg.batch_size, shift),
        WeightStats(recorder, out, noisy),
        *([stateful["best_model"]] if val is not None else []),
        Checkpointer(out / "checkpoint.pt", fingerprint, stateful),
        MetricsWriter(out / "metrics.jsonl"),
        EpochLog(log, test_clean=data.record.get("test_known_clean", True)),
        *([TensorBoardLogger(out / "tensorboard")] if cfg.logger == "tensorboard" else []),
        Plots(out, title, noisy),
        LabelIssues(recorder, out, data, cfg.method),
    ], stateful
