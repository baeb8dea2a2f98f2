"""The training loop: data → model → method → run directory.

``train(TrainConfig(...))`` prepares the data, builds the model and the
method, trains with SGD (momentum 0.9, weight decay 5e-4, cosine decay per
epoch as in the paper) and writes a run directory:

    config.json          every resolved setting, versions, device
    metrics.jsonl        one JSON object per epoch
    summary.json         final numbers (accuracies are fractions in [0, 1])
    split.npz            the data split (indices, noisy and true labels)
    checkpoint.pt        written atomically at the end of every epoch
    example_weights.npy  per training example, the mean over the last epoch
                         of ``Stats.trust``: the weight the method put on its
                         labelled class
    class_weights.npy    (class-level methods) per example, mean weight of
                         every class over the last epoch, float16
    instance_weights.npy (GDW, DM) per example, mean instance-level weight
                         over the last epoch (GDW's stage-one v)
    label_issues.csv     training examples ranked from most to least likely
                         mislabelled (gdw.detect), with label_evidence.npz
    curves.png, weights.png

All randomness is derived from the seed and the epoch (batch order, meta
batches, augmentation) or saved in the checkpoint (the torch generator and
the method's state), so ``resume=True`` ends with the same parameters as an
uninterrupted run on the same device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from . import __version__
from .errors import UserError
from .distributed import Comm, init_from_env, launched_by_torchrun
from .methods import METHODS, make
from .models import check_logits, create_model


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainConfig:
    """Every setting of one run. Field names match the command-line flags."""

    dataset: str = "digits"
    data_root: Optional[str] = None
    download: bool = False
    noise: str = "uniform:0.4"
    imbalance: str = "none"
    meta_per_class: Optional[int] = None
    label_column: str = "label"
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
        for name in ("epochs", "batch_size", "meta_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be a whole number >= 1, got {value!r}")
        for name in ("lr", "momentum", "weight_decay"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 or (name == "lr" and value == 0):
                raise UserError(f"--{name.replace('_', '-')} must be a {'positive' if name == 'lr' else 'non-negative'} number, got {value!r}")
        if self.method not in METHODS:
            METHODS.get(self.method)  # raises the UserError listing the methods
        return self


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


def cosine_lr(base: float, epoch: int, epochs: int) -> float:
    """Learning rate of epoch ``epoch`` (0-based): base · (1 + cos(π·epoch/epochs)) / 2."""
    return 0.5 * base * (1 + math.cos(math.pi * epoch / epochs))


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def default_out(cfg: TrainConfig) -> Path:
    """A fresh directory under ``runs/`` named after the run."""
    stem = "-".join(str(s).replace(":", "").replace("/", "_") for s in (cfg.dataset, cfg.noise, cfg.method, f"s{cfg.seed}"))
    base = Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, k = base, 1
    while path.exists():
        path, k = Path(f"{base}-{k}"), k + 1
    return path


def evaluate(model, split, batch_size, device, num_classes) -> tuple[float, list[float], float]:
    """Accuracy (fraction), per-class accuracy and mean CE of ``model`` on ``split``."""
    model.eval()
    correct = torch.zeros(num_classes, device=device)
    total = torch.zeros(num_classes, device=device)
    loss_sum = torch.zeros((), device=device)
    with torch.no_grad():
        for x, y, _ in split.batches(max(batch_size, 500), shuffle=False, device=device, augment=False):
            logits = model(x).float()
            loss_sum += torch.nn.functional.cross_entropy(logits, y, reduction="sum")
            hit = (logits.argmax(1) == y).float()
            correct.index_add_(0, y, hit)
            total.index_add_(0, y, torch.ones_like(hit))
    model.train()
    n = total.sum().clamp(min=1)
    per_class = (correct / total.clamp(min=1)).tolist()
    return float(correct.sum() / n), per_class, float(loss_sum / n)


def _meta_batches(meta, batch_size, seed, epoch, device, shard=None):
    """An endless stream of meta batches, reshuffled each pass, seeded by epoch
    (this rank's share of each, under data-parallel training)."""
    k = 0
    while True:
        yield from meta.batches(min(batch_size, len(meta)), shuffle=True, seed=_seed(seed, epoch, 1 + k), device=device, shard=shard)
        k += 1


def _silent(*args, **kwargs):
    pass


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across runs and platforms)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


def _prepare(cfg: TrainConfig):
    from .data import prepare  # imported here: the data layer pulls in scikit-learn

    return prepare(
        cfg.dataset,
        noise=cfg.noise,
        imbalance=cfg.imbalance,
        meta_per_class=cfg.meta_per_class,
        seed=cfg.seed,
        data_root=cfg.data_root,
        download=cfg.download,
        label_column=cfg.label_column,
        test_fraction=cfg.test_fraction,
    )


def check_run_dir(cfg: TrainConfig) -> Path:
    """The run directory ``cfg`` asks for; UserError if it cannot be used."""
    out = Path(cfg.out) if cfg.out else default_out(cfg)
    if cfg.resume:
        if not (out / "checkpoint.pt").exists():
            raise UserError(f"--resume: no checkpoint in {out}")
    elif out.exists() and any(out.iterdir()):
        raise UserError(f"run directory {out} already exists; pass --resume to continue it or choose another --out")
    return out


def _open_run_dir(cfg: TrainConfig) -> Path:
    out = check_run_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    return out


def train(cfg: TrainConfig, log=print) -> dict:
    """Train one model as configured; return the summary (also in summary.json).

    Raises:
        UserError: a bad setting, dataset or run directory.
        TrainingDiverged: the loss became non-finite (the last good
            checkpoint stays loadable).
    """
    cfg.validate()
    distributed = launched_by_torchrun()
    device = init_from_env(cfg.device) if distributed else pick_device(cfg.device)
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    shard = (rank, world) if distributed else None
    main = rank == 0  # only rank 0 writes the run directory and logs
    if not main:
        log = _silent
    if cfg.amp and device.type != "cuda":
        raise UserError("--amp needs a CUDA device")
    if cfg.sync_bn and not (distributed and device.type == "cuda"):
        raise UserError("--sync-bn needs torchrun on CUDA devices (SyncBatchNorm has no CPU kernel)")
    if distributed:  # rank 0 opens the run directory; its verdict goes to every rank
        box = [None]
        if main:
            try:
                box = [str(_open_run_dir(cfg))]
            except UserError as err:
                box = [err]
        dist.broadcast_object_list(box, src=0)
        if isinstance(box[0], UserError):
            raise box[0]
        out = Path(box[0])
    else:
        out = _open_run_dir(cfg)
    torch.manual_seed(cfg.seed)
    data = _prepare(cfg)
    C = data.num_classes
    method_cls = METHODS.get(cfg.method)
    if method_cls.needs_meta and data.meta is None:
        raise UserError(f"method {cfg.method!r} needs a meta set, but --meta-per-class is 0")

    model = create_model(cfg.model, data.input_shape, C).to(device)
    check_logits(model, data.input_shape, C, device)
    if cfg.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    hparams = dict(cfg.method_args)
    if cfg.head_only:
        hparams["head_only"] = True
    if method_cls.needs_class_counts:
        hparams.setdefault("class_counts", torch.bincount(data.train.labels, minlength=C).tolist())
    method = make(cfg.method, model, C, optimizer=opt, **hparams)

    resolved = dataclasses.asdict(cfg)
    resolved.update(out=str(out), device=str(device), world_size=world)
    config = {
        **resolved,
        "num_classes": C,
        "classes": list(data.classes),
        "input_shape": list(data.input_shape),
        "data": data.record,
        "versions": {"gdw": __version__, "torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version()},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    start_epoch, history, train_seconds = 0, [], 0.0
    if cfg.resume:
        ckpt = torch.load(out / "checkpoint.pt", map_location=device, weights_only=False)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        method.load_state_dict(ckpt["method"])
        torch.set_rng_state(ckpt["rng"])
        start_epoch, history, train_seconds = ckpt["epoch"] + 1, ckpt["history"], ckpt["train_seconds"]
    elif main:
        _atomic_write(out / "config.json", json.dumps(config, indent=2, default=str))
        data.save_split(out / "split.npz")
        (out / "metrics.jsonl").write_text("")

    N = len(data.train)
    true = data.train.true_labels
    noisy_mask = None
    if true is not None and bool((true >= 0).all()):
        noisy_mask = (data.train.labels != true).numpy()
    steps_per_epoch = math.ceil(N / cfg.batch_size)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cfg.amp else contextlib.nullcontext()
    log(f"gdw train: {cfg.method} on {cfg.dataset} ({N} train, {0 if data.meta is None else len(data.meta)} meta, "
        f"{len(data.test)} test, {C} classes), noise {cfg.noise}, imbalance {cfg.imbalance}, "
        f"realised noise {data.record.get('realised_noise_rate', float('nan')):.3f}, device {device} → {out}")

    weight_sum = torch.zeros(N, device=device)
    weight_count = torch.zeros(N, device=device)
    class_sum = None
    from .detect import LabelIssueRecorder  # label_issues.csv, read by gdw detect
    issues = LabelIssueRecorder(N, C, cfg.epochs, device, state=ckpt.get("label_issues") if cfg.resume else None)
    for epoch in range(start_epoch, cfg.epochs):
        lr = cosine_lr(cfg.lr, epoch, cfg.epochs)
        for group in opt.param_groups:
            group["lr"] = lr
        method.on_epoch_start(epoch, cfg.epochs)
        weight_sum.zero_()
        weight_count.zero_()
        class_sum = inst_sum = None
        meta_iter = _meta_batches(data.meta, cfg.meta_batch_size, cfg.seed, epoch, device, shard) if data.meta is not None else None
        loss_sum = torch.zeros((), device=device)
        meta_sum, meta_n = torch.zeros((), device=device), 0
        t0 = time.perf_counter()
        batches = data.train.batches(cfg.batch_size, shuffle=True, seed=_seed(cfg.seed, epoch, 0), device=device, shard=shard)
        bar = _progress(batches, steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}", cfg.progress and main)
        for x, y, pos in bar:
            xm, ym = next(meta_iter)[:2] if meta_iter is not None else (None, None)
            opt.zero_grad(set_to_none=True)
            with amp:
                stats = method.backward(x, y, xm, ym, inner_lr=lr)
            if not math.isfinite(stats.loss):
                raise TrainingDiverged(
                    f"the training loss became {stats.loss} in epoch {epoch + 1}; stopped. "
                    f"The last good checkpoint is {out / 'checkpoint.pt'}"
                    + (" (none yet: it failed in the first epoch)" if epoch == 0 else "")
                    + "; try a lower --lr"
                )
            opt.step()
            loss_sum += stats.loss * len(y)
            if stats.meta_loss is not None:
                meta_sum += stats.meta_loss
                meta_n += 1
            if stats.trained_on == "train":  # finetune's last epochs step on the meta batch instead
                weight_sum.index_add_(0, pos, stats.trust.float())
                weight_count.index_add_(0, pos, torch.ones(len(y), device=device))
                issues.update(epoch, pos, stats)
                if stats.weights.ndim == 2:
                    if class_sum is None:
                        class_sum = torch.zeros(N, C, device=device)
                    class_sum.index_add_(0, pos, stats.weights.float())
                if stats.instance_weights is not None:
                    if inst_sum is None:
                        inst_sum = torch.zeros(N, device=device)
                    inst_sum.index_add_(0, pos, stats.instance_weights.float())
        seconds = time.perf_counter() - t0
        train_seconds += seconds
        Comm().sum_([weight_sum, weight_count, loss_sum] + [t for t in (class_sum, inst_sum) if t is not None])
        issues.end_epoch(epoch, Comm())
        if not main:
            continue
        acc, per_class, test_loss = evaluate(model, data.test, cfg.batch_size, device, C)
        ew = (weight_sum / weight_count.clamp(min=1)).cpu().numpy()
        row = {
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": float(loss_sum) / N,
            "meta_loss": float(meta_sum) / meta_n if meta_n else None,
            "test_loss": test_loss,
            "test_accuracy": acc,
            "per_class_test_accuracy": per_class,
            "seconds": seconds,
        }
        if noisy_mask is not None and noisy_mask.any() and (~noisy_mask).any():
            row["mean_weight_clean"] = float(ew[~noisy_mask].mean())
            row["mean_weight_noisy"] = float(ew[noisy_mask].mean())
        history.append(row)
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        np.save(out / "example_weights.npy", ew.astype(np.float32))
        if class_sum is not None:
            np.save(out / "class_weights.npy", (class_sum / weight_count.clamp(min=1)[:, None]).cpu().numpy().astype(np.float16))
        if inst_sum is not None:
            np.save(out / "instance_weights.npy", (inst_sum / weight_count.clamp(min=1)).cpu().numpy().astype(np.float32))
        _atomic_torch_save(
            {
                "epoch": epoch,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "method": method.state_dict(),
                "rng": torch.get_rng_state(),
                "history": history,
                "train_seconds": train_seconds,
                "config": resolved,
                "label_issues": issues.state_dict(),
            },
            out / "checkpoint.pt",
        )
        log(_epoch_line(row, cfg.epochs))

    if not main:
        dist.barrier()
        return {}
    summary = _summary(cfg, data, history, train_seconds, steps_per_epoch)
    summary["world_size"] = world
    _atomic_write(out / "summary.json", json.dumps(summary, indent=2))
    from .report import plot_curves, plot_weights

    plot_curves(history, out / "curves.png", title=f"{cfg.method} on {cfg.dataset}, {cfg.noise}")
    plot_weights(np.load(out / "example_weights.npy"), noisy_mask, out / "weights.png", title=f"{cfg.method}: weight on the labelled class")
    issues.write(out, data.train, cfg.method, model=model)
    if distributed:
        dist.barrier()
    return summary


def _summary(cfg, data, history, train_seconds, steps_per_epoch) -> dict:
    accs = [h["test_accuracy"] for h in history]
    last = accs[-min(5, len(accs)):]
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
        "best_test_accuracy": float(max(accs)),
        "best_epoch": int(np.argmax(accs)) + 1,
        "per_class_test_accuracy": history[-1]["per_class_test_accuracy"],
        "realised_noise_rate": data.record.get("realised_noise_rate"),
        "train_seconds": train_seconds,
        "steps_per_second": steps_per_epoch * len(history) / max(train_seconds, 1e-9),
        "mean_weight_clean": history[-1].get("mean_weight_clean"),
        "mean_weight_noisy": history[-1].get("mean_weight_noisy"),
    }


def _epoch_line(row: dict, epochs: int) -> str:
    parts = [f"epoch {row['epoch']:>3}/{epochs}", f"loss {row['train_loss']:.4f}"]
    if row["meta_loss"] is not None:
        parts.append(f"meta {row['meta_loss']:.4f}")
    parts += [f"test acc {100 * row['test_accuracy']:.2f}%", f"{row['seconds']:.1f}s"]
    if "mean_weight_clean" in row:
        parts.append(f"weight clean {row['mean_weight_clean']:.3f} / mislabelled {row['mean_weight_noisy']:.3f}")
    return "  ".join(parts)


def _progress(it, total, desc, enabled):
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, total=total, desc=desc, leave=False, dynamic_ncols=True)
