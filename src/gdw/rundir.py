"""A run directory over its life: created or refused, checkpoints loaded and
checked against the settings and the data, Ctrl-C and divergence turned
into messages that say what was kept, and config.json / summary.json
records. The files it holds are listed in :mod:`gdw.train`."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import __version__
from .distributed import Comm
from .errors import UserError
from .fit import TrainingCollapsed, TrainingDiverged
from .config import TrainConfig, _map_paths, data_files, default_out


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run; the message says what was kept and what works next."""


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


@contextlib.contextmanager
def run_dir(out: Path, main: bool):
    """Creates the run directory on entry (on rank 0, ``main``) and, if the run fails or
    is interrupted before its first checkpoint, removes everything it created."""
    top, before = out, set()
    while not top.parent.exists():
        top = top.parent
    created = None if out.exists() else top
    if main:
        out.mkdir(parents=True, exist_ok=True)
        before = set(out.iterdir())
    try:
        yield
    except BaseException:
        if main and not (out / "checkpoint.pt").exists():
            for p in [created] if created is not None else set(out.iterdir()) - before:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        raise


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


def _config_record(cfg: TrainConfig, data, device, comm: Comm, fingerprint: str) -> dict:
    """config.json: the settings with paths relative to the run directory,
    plus what was resolved from them."""
    base = Path(cfg.out).resolve()
    rel = dataclasses.replace(cfg, **_map_paths(cfg, lambda p: os.path.relpath(p, base)))
    settings = {**dataclasses.asdict(rel), "out": ".", "resume": False}
    return {**settings, "device": str(device), "world_size": comm.world, "num_classes": data.num_classes,
            "classes": list(data.classes), "input_shape": list(data.input_shape),
            "preprocess": getattr(data, "preprocess", None), "data": data.record, "data_files": data_files(cfg),
            "method_params": cfg.method_params(), "fingerprint": fingerprint,
            "versions": {"gdw": __version__, "torch": torch.__version__, "numpy": np.__version__,
                         "python": platform.python_version()},
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _summary(cfg, data, history, train_seconds, steps_per_epoch, world) -> dict:
    accs = [h["test_accuracy"] for h in history]
    last = accs[-min(5, len(accs)):]
    balanced = [h.get("test_balanced_accuracy", math.nan) for h in history][-len(last):]
    return {**{k: getattr(cfg, k) for k in ("method", "dataset", "noise", "imbalance", "seed", "epochs", "model",
                                            "head_only", "method_args")},
            "final_test_accuracy": float(np.mean(last)), "final_test_balanced_accuracy": float(np.mean(balanced)),
            "best_test_accuracy": float(max(accs)), "best_epoch": int(np.argmax(accs)) + 1,
            "per_class_test_accuracy": history[-1]["per_class_test_accuracy"],
            "realised_noise_rate": data.record.get("realised_noise_rate"), "train_seconds": train_seconds,
            "steps_per_second": sum(h.get("steps", steps_per_epoch) for h in history) / max(train_seconds, 1e-9),
            **{k: history[-1].get(k) for k in ("mean_weight_clean", "mean_weight_noisy")},
            **({"guard_shrink": history[-1]["guard_shrink"]} if "guard_shrink" in history[-1] else {}),
            "world_size": world, "epochs_trained": len(history), **_best_val(history),
            **({"n_val": data.record["n_val"]} if data.record.get("n_val") else {})}


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
