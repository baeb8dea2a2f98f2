"""One run: settings → data, model, method → ``fit()`` → run directory.

``train(TrainConfig(...))`` prepares the data, builds the model and the
method, trains through :func:`gdw.fit.fit` with SGD (momentum 0.9, weight
decay 5e-4, cosine decay per epoch as in the paper) and the callbacks of
:mod:`gdw.callbacks`, and writes a run directory:

    config.json          every resolved setting (paths relative to the run
                         directory), versions, device, the data record
    metrics.jsonl        one JSON object per finished epoch
    summary.json         final numbers (accuracies are fractions in [0, 1])
    split.npz            the data split (indices, noisy and true labels)
    checkpoint.pt        written atomically at the end of every epoch
    example_weights.npy  per training example, the mean over the last epoch
                         of ``Stats.trust``: the weight on its labelled class
    class_weights.npy    (class-level methods) per example and class, float16
    instance_weights.npy (GDW, DM) per example, the instance-level weight
    label_issues.csv     training examples ranked from most to least likely
                         mislabelled (gdw.detect), with label_evidence.npz
    curves.png, weights.png

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

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from . import __version__
from .callbacks import (BestModel, Checkpointer, EpochLog, Evaluator, LabelIssues, MetricsWriter, Plots,
                        WeightStats, set_rng_state)
from .distributed import Comm, init_from_env, launched_by_torchrun
from .io import atomic_write
from .errors import UserError
from .fit import TrainingCollapsed, TrainingDiverged, cosine_lr, fit  # noqa: F401 - re-exported
from .methods import METHODS, make
from .models import check_logits, create_model

NEUTRAL = ("device", "progress", "out", "resume", "data_root", "download")
"""Settings that cannot change a run's result: they may differ on ``--resume``
and are left out of the config fingerprint."""

RESERVED_METHOD_ARGS = ("model", "num_classes", "optimizer", "class_counts", "output", "comm")
PATH_PREFIXES = ("csv:", "npz:", "folder:", "clothing1m:", "matrix:")


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run; the message says what was kept and what works next."""


@dataclass
class TrainConfig:
    """Every setting of one run. Field names match the command-line flags."""

    dataset: str = "digits"
    data_root: Optional[str] = None
    download: bool = False
    noise: str = "none"
    imbalance: str = "none"
    target_prior: str = "auto"
    meta: Optional[str] = None
    meta_per_class: Optional[int] = None
    val_per_class: int = 0
    test: Optional[str] = None
    early_stop: Optional[int] = None
    label_column: str = "label"
    features: Optional[str] = None
    ignore: Optional[str] = None
    test_fraction: float = 0.2
    method: str = "gdw"
    method_args: dict = field(default_factory=dict)
    head_only: bool = False
    model: str = "mlp"
    epochs: int = 30
    batch_size: int = 100
    meta_batch_size: int = 100
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    device: Optional[str] = None
    amp: bool = False
    sync_bn: bool = False
    out: Optional[str] = None
    resume: bool = False
    progress: bool = True

    def validate(self) -> "TrainConfig":
        """Raise UserError, naming the flag, for a value of the wrong kind."""
        def flag(name):
            return "--" + name.replace("_", "-")

        for name in ("epochs", "batch_size", "meta_batch_size", "seed", "val_per_class", "early_stop"):
            value = getattr(self, name)
            if name == "early_stop" and value is None:
                continue
            low = 0 if name in ("seed", "val_per_class") else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise UserError(f"{flag(name)} must be a whole number >= {low}, got {value!r}")
        if self.meta_per_class is not None and (not isinstance(self.meta_per_class, int)
                                                or isinstance(self.meta_per_class, bool) or self.meta_per_class < 0):
            raise UserError(f"--meta-per-class must be a whole number >= 0, got {self.meta_per_class!r}")
        for name in ("lr", "momentum", "weight_decay", "test_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 \
                    or (name in ("lr", "test_fraction") and value == 0) or (name == "test_fraction" and value >= 1):
                kind = {"lr": "a positive number", "test_fraction": "a number in (0, 1)"}.get(name, "a non-negative number")
                raise UserError(f"{flag(name)} must be {kind}, got {value!r}")
        for name in ("download", "head_only", "amp", "sync_bn", "resume", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"{flag(name)} must be true or false, got {getattr(self, name)!r}")
        from .prior import TARGET_PRIORS

        if self.target_prior not in TARGET_PRIORS:
            raise UserError(f"--target-prior must be one of {', '.join(TARGET_PRIORS)}, got {self.target_prior!r}")
        for name in ("dataset", "noise", "imbalance", "method", "model", "label_column"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise UserError(f"{flag(name)} must be a non-empty string, got {getattr(self, name)!r}")
        if self.early_stop is not None and not self.val_per_class and not self.meta:
            raise UserError("--early-stop needs a validation split: give --val-per-class N")
        for name in ("meta", "test", "features", "ignore"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise UserError(f"--{name} must be " + ("a dataset spec such as csv:PATH" if name in ("meta", "test")
                                                       else "column names separated by commas") + f", got {value!r}")
        if not isinstance(self.method_args, dict):
            raise UserError(f"--method-args must be key=value pairs, got {self.method_args!r}")
        reserved = sorted(set(self.method_args) & set(RESERVED_METHOD_ARGS))
        if reserved:
            raise UserError(f"--method-args: {reserved[0]!r} is set by gdw itself, not a method hyper-parameter")
        METHODS.get(self.method)  # unknown → UserError listing the methods
        return self

    # -- identity of a run ---------------------------------------------------------
    def absolute(self) -> "TrainConfig":
        """A copy whose file paths (dataset, noise matrix, data root) are absolute."""
        return dataclasses.replace(self, **_map_paths(self, lambda p: str(Path(p).expanduser().resolve())))

    def result_settings(self) -> dict:
        """The settings that define the result (all but :data:`NEUTRAL`), as
        plain JSON values, paths absolute, plus ``method_params``: every
        hyper-parameter of the method with the defaults of this gdw."""
        d = dataclasses.asdict(self.absolute())
        d = {k: v for k, v in d.items() if k not in NEUTRAL}
        d["method_params"] = self.method_params()
        return json.loads(json.dumps(d, default=str))

    def method_params(self) -> dict:
        """The method's hyper-parameters as they will be used (its defaults
        updated by ``method_args`` and ``head_only``)."""
        from .methods import resolved_params

        given = {**self.method_args, **({"head_only": True} if self.head_only else {})}
        return json.loads(json.dumps(resolved_params(self.method, given), default=str))

    def fingerprint(self) -> str:
        """A short hash of :meth:`result_settings`; stored in every checkpoint."""
        text = json.dumps(self.result_settings(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def first_difference(self, other: "TrainConfig", only=None) -> Optional[tuple[str, Any, Any]]:
        """``(name, self's value, other's value)`` of the first result setting
        that differs (among ``only`` if given), or None. Then the method's
        parameters with their defaults are compared (always): a run loaded
        from its directory brings those it was trained with, so a default
        that changed since is a difference too (name ``method parameter P``),
        and ``method_args`` that spell the same parameters otherwise (a
        default written out) are not."""
        a, b = self.result_settings(), other.result_settings()
        saved = getattr(other, "saved_method_params", None)
        if saved is not None:
            from .methods import recorded_params

            b["method_params"] = recorded_params(other.method, saved)
        for k in a:  # method_args are compared by their effect, in method_params below
            if k not in ("method_params", "method_args") and (only is None or k in only) and a[k] != b.get(k):
                return k, a[k], b.get(k)
        pa, pb = a["method_params"], b["method_params"]
        for p in sorted(set(pa) | set(pb)):
            if p not in pa or p not in pb or pa[p] != pb[p]:
                if a["method_args"] != b.get("method_args") and (only is None or "method_args" in only):
                    return "method_args", a["method_args"], b.get("method_args")
                return f"method parameter {p}", pa.get(p, "(none)"), pb.get(p, "(none)")
        return None

    @classmethod
    def load(cls, run_dir) -> "TrainConfig":
        """The settings saved in ``run_dir/config.json`` (paths resolved against
        the run directory; ``out`` = run_dir). UserError if it is unreadable."""
        run = Path(run_dir)
        path = run / "config.json"
        if not path.is_file():
            raise UserError(f"{run} is not a gdw run directory (no config.json)")
        try:
            saved = json.loads(path.read_text())
            names = {f.name for f in dataclasses.fields(cls)}
            cfg = cls(**{k: v for k, v in saved.items() if k in names})
        except (OSError, ValueError, TypeError) as err:
            raise UserError(f"cannot read {path}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
        base = run.resolve()
        cfg = dataclasses.replace(cfg, **_map_paths(cfg, lambda p: str((base / p).resolve())))
        cfg = dataclasses.replace(cfg, out=str(run))
        cfg.saved_method_params = saved.get("method_params")  # absent in runs of older versions
        return cfg


def _map_paths(cfg: TrainConfig, fn) -> dict:
    """The path-bearing settings of ``cfg`` with ``fn`` applied to each path."""
    out = {}
    for name in ("dataset", "noise", "meta", "test"):
        value = getattr(cfg, name)
        for prefix in PATH_PREFIXES:
            if isinstance(value, str) and value.startswith(prefix) and len(value) > len(prefix):
                out[name] = prefix + fn(value[len(prefix):])
    if cfg.data_root:
        out["data_root"] = fn(cfg.data_root)
    return out


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


def default_out(cfg: TrainConfig) -> Path:
    """A fresh directory under ``runs/`` named after the run."""
    stem = "-".join(str(s).replace(":", "").replace("/", "_") for s in (cfg.dataset, cfg.noise, cfg.method, f"s{cfg.seed}"))
    base = Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, k = base, 1
    while path.exists():
        path, k = Path(f"{base}-{k}"), k + 1
    return path


def check_run_dir(cfg: TrainConfig) -> Path:
    """The run directory ``cfg`` asks for; UserError if it cannot be used
    (a file, a non-empty directory without --resume, a resume whose saved
    settings differ from ``cfg``)."""
    cfg = cfg.absolute()
    out = Path(cfg.out) if cfg.out else default_out(cfg)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory")
    if cfg.resume:
        saved = TrainConfig.load(out)
        diff = cfg.first_difference(saved)
        if diff:
            raise UserError(describe_difference(diff, "the run in " + str(out)))
        if not (out / "checkpoint.pt").exists():
            raise UserError(f"--resume: {out} has no checkpoint.pt (the run never finished an epoch); start it again "
                            "with the same command without --resume")
    elif out.exists() and any(out.iterdir()) and not never_checkpointed(out):
        raise UserError(f"run directory {out} already exists; continue it with gdw train --out {out} --resume, "
                        "or choose another --out")
    return out


def never_checkpointed(out: Path) -> bool:
    """``out`` holds a run that never finished an epoch (killed before its
    first checkpoint): starting it again in ``out`` replaces it."""
    return (out / "config.json").is_file() and not (out / "checkpoint.pt").exists()


def describe_difference(diff, where: str, remedy: Optional[str] = None) -> str:
    """One line for ``TrainConfig.first_difference``'s result, ending with
    what to do (``remedy``; by default: drop the flag or use another --out)."""
    name, mine, theirs = diff
    if name.startswith("method parameter "):
        return (f"the {name} is {_show(mine)} here but {_show(theirs)} in {where} (a default changed since "
                f"it was made); a run keeps its settings ({remedy or 'use another --out'})")
    return (f"--{name.replace('_', '-')} {_show(mine)} differs from {_show(theirs)} saved in {where}; "
            f"a run keeps its settings ({remedy or 'drop the flag, or use another --out'})")


def _show(v) -> str:
    if isinstance(v, dict):
        return ",".join(f"{k}={x}" for k, x in v.items()) or "(none)"
    return json.dumps(v) if not isinstance(v, str) else v


def load_checkpoint(out: Path, device, fingerprint: str) -> dict:
    """The checkpoint of the run in ``out``; UserError if it is unreadable or
    belongs to other settings than the run's config.json."""
    path = out / "checkpoint.pt"
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
        if not isinstance(ckpt, dict) or "model" not in ckpt:
            raise ValueError("not a gdw checkpoint")
    except Exception as err:  # torch raises many kinds for a truncated or corrupt file
        reason = (str(err).splitlines() or [""])[0].split(". ")[0][:100]
        raise UserError(f"cannot read {path} ({type(err).__name__}: {reason}); "
                        "it is corrupt or truncated: start the run again with another --out") from None
    if ckpt.get("fingerprint") != fingerprint:
        raise UserError(f"{path} was written with other settings than {out / 'config.json'}; "
                        "start the run again with another --out")
    return ckpt


def check_same_data(out: Path, data) -> None:
    """UserError unless ``data`` is the split saved in ``out/split.npz``
    (same training, meta and test examples, same labels): a resumed run must
    not continue on a file that was edited since it started."""
    from .data import load_split

    saved = load_split(out / "split.npz")
    now = {"train_index": data.train.index, "train_labels": data.train.labels,
           "meta_labels": data.meta.labels if data.meta is not None else torch.zeros(0, dtype=torch.long),
           "test_labels": data.test.labels}
    for key, tensor in now.items():
        if key in saved and not np.array_equal(np.asarray(saved[key]), tensor.numpy()):
            raise UserError(f"the data of {out} changed since the run started ({key.replace('_', ' ')} differ from "
                            f"{out / 'split.npz'}); a run keeps its data: start a new run with another --out")


class RunDir:
    """Creates the run directory on entry and, if the run fails or is
    interrupted before its first checkpoint, removes everything it created."""

    def __init__(self, out: Path, main: bool):
        self.out, self.main = out, main

    def __enter__(self) -> "RunDir":
        self.created = None
        if self.main:
            top = self.out
            while not top.parent.exists():
                top = top.parent
            self.created = None if self.out.exists() else top
            self.out.mkdir(parents=True, exist_ok=True)
            self.before = set(self.out.iterdir())
        return self

    def __exit__(self, kind, err, tb) -> None:
        if kind is None or not self.main or (self.out / "checkpoint.pt").exists():
            return
        if self.created is not None:
            shutil.rmtree(self.created, ignore_errors=True)
        else:
            for p in set(self.out.iterdir()) - self.before:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def build(cfg: TrainConfig, device: torch.device, comm: Comm):
    """``(data, model, optimizer, method)`` for ``cfg``; every user mistake
    in them raises UserError before anything is written."""
    from .data import prepare  # the data layer pulls in scikit-learn

    torch.manual_seed(cfg.seed)
    data = prepare(cfg.dataset, noise=cfg.noise, imbalance=cfg.imbalance, meta_per_class=cfg.meta_per_class,
                   seed=cfg.seed, data_root=cfg.data_root, download=cfg.download, label_column=cfg.label_column,
                   test_fraction=cfg.test_fraction, meta=cfg.meta, val_per_class=cfg.val_per_class, test=cfg.test,
                   features=cfg.features, ignore=cfg.ignore)
    C = data.num_classes
    method_cls = METHODS.get(cfg.method)
    model = create_model(cfg.model, data.input_shape, C).to(device)
    check_logits(model, data.input_shape, C, device)
    if cfg.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    hparams = dict(cfg.method_args)
    if cfg.head_only:
        hparams["head_only"] = True
    if method_cls.needs_class_counts:
        hparams["class_counts"] = torch.bincount(data.train.labels, minlength=C).tolist()
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
    comm, device = _setup(cfg, comm)
    main = comm.rank == 0
    out = Path(_on_rank0(comm, lambda: str(check_run_dir(cfg))))
    cfg.out = str(out)
    if cfg.resume and (out / "summary.json").is_file():
        summary = json.loads((out / "summary.json").read_text())
        log(f"gdw train: the run in {out} is finished ({summary.get('epochs_trained', cfg.epochs)} of {cfg.epochs} "
            "epochs); nothing to resume, nothing changed")
        return summary
    ckpt = load_checkpoint(out, device, cfg.fingerprint()) if cfg.resume else None
    data, model, opt, method = build(cfg, device, comm)
    if ckpt is not None:
        check_same_data(out, data)
    target, shift = target_prior(cfg, data, method)
    callbacks, stateful = _callbacks(cfg, data, out, device, log if main else (lambda *a, **k: None), shift)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        method.load_state_dict(ckpt["method"])
        for name, cb in stateful.items():
            cb.load_state_dict(ckpt["callbacks"][name])
        set_rng_state(ckpt["rng"])
    start, history = (ckpt["epoch"] + 1, ckpt["history"]) if ckpt else (0, [])
    rate = data.record.get("realised_noise_rate")
    val = getattr(data, "val", None)
    log(f"gdw train: {cfg.method} on {cfg.dataset} ({len(data.train)} train, "
        f"{0 if data.meta is None else len(data.meta)} meta, " + (f"{len(val)} val, " if val is not None else "")
        + f"{len(data.test)} test, {data.num_classes} classes), noise {cfg.noise}, imbalance {cfg.imbalance}, "
        + ("true labels unknown" if rate is None else f"realised noise {rate:.3f}") + f", device {device} → {out}"
        + (f" (resuming after epoch {start})" if ckpt else ""))
    log("gdw train: " + target["line"])
    for warning in data.record.get("warnings", []):
        log(f"gdw train: warning: {warning}")
    with RunDir(out, main), _interrupts(out, cfg):
        if main and ckpt is None:
            record = {**_config_record(cfg, data, device, comm), "target": {k: v for k, v in target.items()
                                                                              if k != "line"}}
            atomic_write(out / "config.json", json.dumps(record, indent=2, default=str))
            data.save_split(out / "split.npz")
        history = fit(model, method, data, opt, epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                      meta_batch_size=cfg.meta_batch_size, seed=cfg.seed, callbacks=callbacks, comm=comm,
                      start_epoch=start, history=history, amp=cfg.amp, progress=cfg.progress)
    summary = {}
    if main:
        seconds = sum(row["seconds"] for row in history)
        summary = _summary(cfg, data, history, seconds, math.ceil(len(data.train) / cfg.batch_size), comm.world)
        summary["target_prior"] = target["prior"]
        summary.update(getattr(stateful.get("label_issues"), "noise", {}))
        if summary.get("guard_shrink", 0) >= 0.5:
            log(f"gdw train: note: weights learned on half of the meta set did not help its other half "
                f"(λ = {summary['guard_shrink']:.2f} at the end): the run trained close to plain training. "
                "The weighting needs a meta set whose labels are cleaner than the training labels (--meta)")
        atomic_write(out / "summary.json", json.dumps(summary, indent=2))
    comm.barrier()
    return summary


def target_prior(cfg: TrainConfig, data, method) -> tuple[dict, Optional[torch.Tensor]]:
    """``(record, shift)``: the run's target prior resolved (``record``:
    ``prior`` "train" | "balanced", ``setting``, the method's ``fits``,
    ``prediction_shift`` (C floats, or None) and ``line``, the sentence
    printed at the start) and the shift added to the logits of every
    prediction (:mod:`gdw.prior`)."""
    from .prior import describe, prediction_shift, resolve_target_prior

    C = data.num_classes
    true = data.train.true_labels
    labels = true if true is not None and bool((true >= 0).all()) else data.train.labels
    counts = torch.bincount(labels, minlength=C).tolist()
    meta = None if data.meta is None else torch.bincount(data.meta.labels, minlength=C).tolist()
    prior = resolve_target_prior(cfg.target_prior, counts, cfg.imbalance)
    shift = prediction_shift(method.fits_prior, prior, counts, meta)
    how = "set" if cfg.target_prior != "auto" else (
        "auto: --imbalance keeps the test split balanced" if cfg.imbalance != "none" else
        "auto: the classes are about equally frequent" if prior == "balanced" else "auto: the classes' shares differ")
    return ({"prior": prior, "setting": cfg.target_prior, "fits": method.fits_prior,
             "prediction_shift": None if shift is None else [round(float(v), 6) for v in shift],
             "line": describe(prior, counts, [str(c) for c in data.classes], how)}, shift)


def _callbacks(cfg: TrainConfig, data, out: Path, device, log, shift=None):
    """The callbacks of a ``gdw train`` run, in the order they must run at an
    epoch end: rows are complete before the checkpoint, the checkpoint is
    saved before metrics.jsonl is rewritten from it."""
    from .recorder import LabelIssueRecorder

    true = data.train.true_labels
    noisy = (data.train.labels != true).numpy() if true is not None and bool((true >= 0).all()) else None
    recorder = LabelIssueRecorder(len(data.train), data.num_classes, cfg.epochs, device)
    val = getattr(data, "val", None)
    stateful = {"label_issues": recorder}
    if val is not None:
        stateful["best_model"] = BestModel(out / "best.pt", cfg.early_stop)
    title = f"{cfg.method} on {cfg.dataset}, {cfg.noise}"
    return [
        recorder,
        Evaluator({"val": val, "test": data.test}, data.num_classes, cfg.batch_size, shift),
        WeightStats(recorder, out, noisy),
        *([stateful["best_model"]] if val is not None else []),
        Checkpointer(out / "checkpoint.pt", cfg.fingerprint(), stateful),
        MetricsWriter(out / "metrics.jsonl"),
        EpochLog(log, test_clean=data.record.get("test_known_clean", True)),
        Plots(out, title, noisy),
        LabelIssues(recorder, out, data, cfg.method),
    ], stateful


@contextlib.contextmanager
def _interrupts(out: Path, cfg: TrainConfig):
    """Turn Ctrl-C into a :class:`RunInterrupted` that says what was kept;
    a divergence before the first checkpoint says that nothing was."""
    try:
        yield
    except KeyboardInterrupt:
        if (out / "checkpoint.pt").exists():
            raise RunInterrupted(f"interrupted; the finished epochs are saved in {out / 'checkpoint.pt'}: "
                                 f"continue with gdw train --out {out} --resume") from None
        raise RunInterrupted("interrupted before the first epoch finished; nothing was kept") from None
    except TrainingDiverged as err:
        kept = (f"the last good checkpoint is {out / 'checkpoint.pt'}" if (out / "checkpoint.pt").exists()
                else "nothing was kept (it failed in the first epoch)")
        fix = ("try a lower --lr, or a model with normalisation layers (BatchNorm, LayerNorm)"
               if isinstance(err, TrainingCollapsed) else "try a lower --lr")
        raise type(err)(f"{err}; stopped, {kept}; {fix}") from None


def data_files(cfg: TrainConfig) -> dict:
    """``{setting: digest}`` of the user's files the run reads (``dataset``,
    ``meta`` and ``test`` when they name a CSV, npz or folder; see
    :func:`gdw.data.sources.files_digest`), so that a reused run can be
    checked against the files as they are now."""
    from .data.sources import files_digest

    specs = {"dataset": cfg.dataset, "meta": cfg.meta, "test": cfg.test}
    digests = {k: files_digest(v) for k, v in specs.items() if v is not None}
    return {k: v for k, v in digests.items() if v is not None}


def changed_data_files(cfg: TrainConfig, run_dir) -> Optional[str]:
    """Which of the files recorded in ``run_dir/config.json`` changed since
    (e.g. ``"--dataset csv:data.csv"``), or None (also for runs that recorded
    none)."""
    saved = json.loads((Path(run_dir) / "config.json").read_text()).get("data_files") or {}
    now = data_files(cfg) if saved else {}
    for key, digest in saved.items():
        if now.get(key) != digest:
            return f"--{key} {getattr(cfg, key)}"
    return None


def _config_record(cfg: TrainConfig, data, device, comm: Comm) -> dict:
    """config.json: the settings with paths relative to the run directory,
    plus what was resolved from them."""
    base = Path(cfg.out).resolve()
    rel = dataclasses.replace(cfg, **_map_paths(cfg, lambda p: os.path.relpath(p, base)))
    settings = {**dataclasses.asdict(rel), "out": ".", "resume": False}
    return {
        **settings,
        "device": str(device),
        "world_size": comm.world,
        "num_classes": data.num_classes,
        "classes": list(data.classes),
        "input_shape": list(data.input_shape),
        "preprocess": getattr(data, "preprocess", None),
        "data": data.record,
        "data_files": data_files(cfg),
        "method_params": cfg.method_params(),
        "fingerprint": cfg.fingerprint(),
        "versions": {"gdw": __version__, "torch": torch.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _summary(cfg, data, history, train_seconds, steps_per_epoch, world) -> dict:
    accs = [h["test_accuracy"] for h in history]
    last = accs[-min(5, len(accs)):]
    balanced = [h.get("test_balanced_accuracy", math.nan) for h in history][-len(last):]
    return {
        "method": cfg.method,
        "dataset": cfg.dataset,
        "noise": cfg.noise,
        "imbalance": cfg.imbalance,
        "seed": cfg.seed,
        "epochs": cfg.epochs,
        "model": cfg.model,
        "head_only": cfg.head_only,
        "method_args": cfg.method_args,
        "final_test_accuracy": float(np.mean(last)),
        "final_test_balanced_accuracy": float(np.mean(balanced)),
        "best_test_accuracy": float(max(accs)),
        "best_epoch": int(np.argmax(accs)) + 1,
        "per_class_test_accuracy": history[-1]["per_class_test_accuracy"],
        "realised_noise_rate": data.record.get("realised_noise_rate"),
        "train_seconds": train_seconds,
        "steps_per_second": sum(h.get("steps", steps_per_epoch) for h in history) / max(train_seconds, 1e-9),
        "mean_weight_clean": history[-1].get("mean_weight_clean"),
        "mean_weight_noisy": history[-1].get("mean_weight_noisy"),
        **({"guard_shrink": history[-1]["guard_shrink"]} if "guard_shrink" in history[-1] else {}),
        "world_size": world,
        "epochs_trained": len(history),
        **_best_val(history),
        **({"n_val": data.record["n_val"]} if data.record.get("n_val") else {}),
    }


def _best_val(history) -> dict:
    """The epoch chosen on the validation split (the first of the best), and
    the test accuracy there: the honest way to pick an epoch."""
    vals = [h.get("val_accuracy") for h in history]
    if not history or vals[0] is None:
        return {}
    k = int(np.argmax(vals))
    return {"best_val_epoch": k + 1, "best_val_accuracy": vals[k],
            "test_accuracy_at_best_val": history[k]["test_accuracy"],
            "final_val_accuracy": float(np.mean(vals[-min(5, len(vals)):]))}
