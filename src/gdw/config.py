"""The settings of one run (:class:`TrainConfig`): each field with its
default and its check, the fingerprint that defines a run, and the user's
files a run reads (their digests, to tell a reused run from a changed file),
and settings written as text (a flag's value, ``--method-args``, a TOML or
YAML ``--config`` file).
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional


from .errors import UserError
from .methods import METHODS, recorded_params, resolved_params
from .prior import TARGET_PRIORS


NEUTRAL = ("device", "progress", "out", "resume", "data_root", "download", "logger")
"""Settings that cannot change a run's result: they may differ on ``--resume``
and are left out of the config fingerprint."""


META_DRAWS = ("target", "per-class")  # --meta-draw; None (unset) is "target"

LOGGERS = ("none", "tensorboard")  # --logger: where the per-epoch metrics go besides metrics.jsonl

ADDED_SETTINGS = ("text_column", "encoder", "holdout", "meta_draw")
"""Settings added after runs were recorded without them: left out of the
fingerprint while unset (None), so that those runs keep theirs."""

RESERVED_METHOD_ARGS = ("model", "num_classes", "optimizer", "class_counts", "meta_counts", "output", "comm")


def _digest(settings: dict) -> str:
    """A run's fingerprint: 16 hex digits of the SHA-256 of its settings as sorted JSON."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def setting(default, help: str, **flag):
    """A :class:`TrainConfig` field: its ``default`` (a callable makes a fresh
    one per config, e.g. ``dict``) and the ``help`` of its command-line flag;
    ``flag`` holds further ``argparse`` options (``choices``, ``metavar``,
    ``type``, and ``flag="--no-x"`` for a flag that sets a boolean to False)."""
    meta = {"help": help, **flag}
    if callable(default):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Every setting of one run, each with its default and help text (the
    command-line flag ``--field-name`` is made from them: :func:`gdw.cli`),
    checked in :meth:`validate`."""

    dataset: str = setting("digits", "digits, fashion-mnist, mnist, cifar10, cifar100, clothing1m, folder:PATH, "
                                     "npz:PATH, csv:PATH")
    data_root: Optional[str] = setting(None, "folder holding the dataset files")
    download: bool = setting(False, "fetch the dataset if it is not on disk")
    noise: str = setting("none", "synthetic label noise to inject: none, uniform:R, symmetric:R, flip:R, pair:R, "
                                 "matrix:PATH, cifar10n:KEY; none: your labels as they are")
    imbalance: str = setting("none", "none, longtail:RHO, step:RHO")
    target_prior: str = setting("auto", "the class prior predictions aim at: train (the training labels' shares: "
                                        "plain accuracy), balanced (every class alike: balanced accuracy) or auto "
                                        "(balanced under --imbalance or when the classes are about equally frequent, "
                                        "else train)", choices=["auto", "train", "balanced"])
    meta_draw: Optional[str] = setting(None, "how a meta set drawn from the training data is shared between the "
                                             "classes: target (the default: the training labels' shares when the "
                                             "target prior is train, else as many of every class) or per-class (as "
                                             "many of every class whatever the target, as in the papers)",
                                       choices=list(META_DRAWS))
    meta: Optional[str] = setting(None, "your own clean (hand-checked) labelled set, used as the meta set: csv:PATH, "
                                        "folder:PATH or npz:PATH (arrays x, y); labels matched to the training "
                                        "classes by name")
    meta_per_class: Optional[int] = setting(None, "clean meta examples per class (default: all of --meta; else 100 "
                                                  "when C <= 10, else 10, at most a tenth of the smallest class)")
    val_per_class: int = setting(0, "clean validation examples per class, taken from the clean source and kept "
                                    "apart: val_accuracy per epoch, best.pt, the epoch chosen on it")
    test: Optional[str] = setting(None, "your own labelled test set (e.g. hand-checked), used as the test split: "
                                        "csv:PATH, folder:PATH or npz:PATH, read like --meta; the dataset is then not "
                                        "split, all of it trains")
    early_stop: Optional[int] = setting(None, "stop after K epochs without a better validation accuracy", metavar="K")
    label_column: str = setting("label", "label column of a csv: dataset")
    features: Optional[str] = setting(None, "csv: the feature columns, comma-separated (default: all but the label "
                                            "column and columns without a name; text columns are one-hot encoded)",
                                      metavar="COLS")
    ignore: Optional[str] = setting(None, "csv: columns that are not features, comma-separated (e.g. an id)",
                                    metavar="COLS")
    text_column: Optional[str] = setting(None, "csv: a column of text, encoded into the features (see --encoder)",
                                         metavar="COL")
    encoder: Optional[str] = setting(None, "the text's encoder: a local (sentence-transformers) model folder; "
                                           "default TF-IDF + SVD", metavar="PATH")
    test_fraction: float = setting(0.2, "test split of csv: / folder: data without one")
    holdout: Optional[str] = setting(None, "K/N: fold K (0 to N-1) of N of the training rows is left out of training "
                                           "and scored by the final model (gdw detect --folds N runs all N)",
                                     metavar="K/N")
    method: str = setting("gdw", "weighting method: " + ", ".join(METHODS.names()))
    method_args: dict = setting(dict, "the method's hyper-parameters, key=value,... (e.g. lam=0.5,beta=8)", type=str)
    head_only: bool = setting(False, "only the classifier head takes the virtual step")
    model: str = setting("mlp", "mlp, mlp-plain (no BatchNorm), cnn, resnet32 or module.path:factory")
    epochs: int = setting(30, "training epochs")
    batch_size: int = setting(100, "training batch size")
    meta_batch_size: int = setting(100, "meta batch size")
    lr: float = setting(0.1, "initial learning rate, cosine decay")
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = setting(0, "random seed")
    device: Optional[str] = setting(None, "cpu, cuda or cuda:N (default: CUDA when present)")
    amp: bool = setting(False, "bfloat16 autocast (CUDA)")
    sync_bn: bool = setting(False, "under torchrun on CUDA: BatchNorm statistics over all ranks")
    out: Optional[str] = setting(None, "run directory (default: a fresh one under runs/)")
    resume: bool = setting(False, "continue the run in --out from its checkpoint, with the settings saved there")
    progress: bool = setting(True, "no progress bar", flag="--no-progress")
    logger: str = setting("none", "tensorboard: every epoch's metrics also as TensorBoard scalars in "
                                  "RUN_DIR/tensorboard (pip install 'gdw[tensorboard]')",
                          choices=["none", "tensorboard"])

    def validate(self) -> "TrainConfig":
        """Raise UserError, naming the flag, for a value of the wrong kind."""
        def flag(name):
            return "--" + name.replace("_", "-")

        for name in ("epochs", "batch_size", "meta_batch_size", "seed", "val_per_class", "early_stop",
                     "meta_per_class"):
            value = getattr(self, name)
            if name in ("early_stop", "meta_per_class") and value is None:
                continue
            low = 0 if name in ("seed", "val_per_class", "meta_per_class") else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise UserError(f"{flag(name)} must be a whole number >= {low}, got {value!r}")
        for name in ("lr", "momentum", "weight_decay", "test_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 \
                    or (name in ("lr", "test_fraction") and value == 0) or (name == "test_fraction" and value >= 1):
                kinds = {"lr": "a positive number", "test_fraction": "a number in (0, 1)"}
                raise UserError(f"{flag(name)} must be {kinds.get(name, 'a non-negative number')}, got {value!r}")
        for name in ("download", "head_only", "amp", "sync_bn", "resume", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"{flag(name)} must be true or false, got {getattr(self, name)!r}")
        if self.meta_draw is not None and self.meta_draw not in META_DRAWS:
            raise UserError(f"--meta-draw must be one of {', '.join(META_DRAWS)}, got {self.meta_draw!r}")
        if self.target_prior not in TARGET_PRIORS:
            raise UserError(f"--target-prior must be one of {', '.join(TARGET_PRIORS)}, got {self.target_prior!r}")
        for name in ("dataset", "noise", "imbalance", "method", "model", "label_column"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise UserError(f"{flag(name)} must be a non-empty string, got {getattr(self, name)!r}")
        if self.holdout is not None:
            k, _, n = str(self.holdout).partition("/")
            if not (k.isdigit() and n.isdigit() and int(n) >= 2 and int(k) < int(n)):
                raise UserError(f"--holdout must be K/N with 0 <= K < N and N >= 2, got {self.holdout!r}")
        if self.early_stop is not None and not self.val_per_class and not self.meta:
            raise UserError("--early-stop needs a validation split: give --val-per-class N")
        for name in ("meta", "test", "features", "ignore", "text_column", "encoder"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                kinds = {"meta": "a dataset spec such as csv:PATH", "test": "a dataset spec such as csv:PATH",
                         "text_column": "a column name", "encoder": "a model folder"}
                kind = kinds.get(name, "column names separated by commas")
                raise UserError(f"{flag(name)} must be {kind}, got {value!r}")
        if self.encoder is not None and self.text_column is None:
            raise UserError("--encoder turns a text column into features: give --text-column too")
        if not isinstance(self.method_args, dict):
            raise UserError(f"--method-args must be key=value pairs, got {self.method_args!r}")
        reserved = sorted(set(self.method_args) & set(RESERVED_METHOD_ARGS))
        if reserved:
            raise UserError(f"--method-args: {reserved[0]!r} is set by gdw itself, not a method hyper-parameter")
        if self.logger not in LOGGERS:
            raise UserError(f"--logger must be one of {', '.join(LOGGERS)}, got {self.logger!r}")
        if self.logger == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
            raise UserError("--logger tensorboard needs the tensorboard package: pip install 'gdw[tensorboard]'")
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
        d = {k: v for k, v in d.items() if k not in NEUTRAL and not (k in ADDED_SETTINGS and v is None)}
        d["method_params"] = self.method_params()
        return json.loads(json.dumps(d, default=str))

    def method_params(self) -> dict:
        """The method's hyper-parameters as they will be used (its defaults
        updated by ``method_args`` and ``head_only``)."""
        given = {**self.method_args, **({"head_only": True} if self.head_only else {})}
        return json.loads(json.dumps(resolved_params(self.method, given), default=str))

    def _record_is_whole(self) -> bool:
        """Whether the fingerprint a loaded run recorded is that of its
        recorded settings and method parameters (not so for a config.json
        edited by hand, or written by a gdw that fingerprinted otherwise)."""
        recorded = getattr(self, "saved_fingerprint", None)
        return recorded is not None and _digest(
            {**self.result_settings(), "method_params": self.saved_method_params}) == recorded

    def fingerprint(self) -> str:
        """A short hash of :meth:`result_settings`; stored in every checkpoint."""
        return _digest(self.result_settings())

    def first_difference(self, other: "TrainConfig", only=None,
                         summary: Optional[dict] = None) -> Optional[tuple[str, Any, Any]]:
        """``(name, self's value, other's value)`` of the first result setting
        that differs (among ``only`` if given), or None. Then the method's
        parameters with their defaults are compared (always): a run loaded
        from its directory brings those it was trained with, so a default
        that changed since is a difference too (name ``method parameter P``),
        and ``method_args`` that spell the same parameters otherwise (a
        default written out) are not. ``summary``: ``other``'s finished
        run's summary.json; a parameter that changes nothing unless the
        summary says so (the method's ``INERT_UNLESS``, e.g. GDW's
        ``plain_restart`` where the early check did not switch) is then no
        difference."""
        a, b = self.result_settings(), other.result_settings()
        saved = getattr(other, "saved_method_params", None)
        if saved is not None:
            b["method_params"] = recorded_params(other.method, saved)
        for k in {**a, **b}:  # method_args are compared by their effect, in method_params below
            if k not in ("method_params", "method_args") and (only is None or k in only) and a.get(k) != b.get(k):
                return k, a.get(k), b.get(k)
        pa, pb = a["method_params"], b["method_params"]
        inert = getattr(METHODS.get(self.method), "INERT_UNLESS", {}) if self.method in METHODS else {}
        for p in sorted(set(pa) | set(pb)):
            if summary is not None and p in inert and summary.get(inert[p][0]) != inert[p][1]:
                continue
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
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise UserError(f"cannot read {path}: {first}") from None
        base = run.resolve()
        cfg = dataclasses.replace(cfg, **_map_paths(cfg, lambda p: str((base / p).resolve())))
        cfg = dataclasses.replace(cfg, out=str(run))
        cfg.saved_method_params = saved.get("method_params")  # absent in runs of older versions
        cfg.saved_fingerprint = saved.get("fingerprint")
        return cfg

    def with_recorded_params(self) -> tuple[TrainConfig, list[str]]:
        """For a config :meth:`load`-ed from a run: ``(config, changes)``, the
        config with the method's hyper-parameters spelled out as the run
        recorded them where a default has changed since it started (so that
        ``--resume`` goes on with the run's own), and one ``"P=recorded
        (now: default)"`` per parameter that changed; ``(self, [])`` where
        none did or nothing was recorded. UserError if this gdw no longer has
        a parameter the run used."""
        saved = getattr(self, "saved_method_params", None)
        if saved is None or not self._record_is_whole():
            return self, []
        then, now = recorded_params(self.method, saved), self.method_params()
        gone = sorted(set(then) - set(now))
        if gone:
            raise UserError(f"the run in {self.out} used method parameter(s) {', '.join(gone)}, which this gdw no "
                            "longer has; start the run again with another --out")
        changes = [f"{p}={then[p]} (now: {now[p]})" for p in sorted(now) if p in then and then[p] != now[p]]
        if not changes:
            return self, []
        pinned = dataclasses.replace(self, method_args={k: v for k, v in then.items() if k != "head_only"})
        pinned.saved_method_params = saved
        return pinned, changes


# ----------------------------------------------------------------------------- settings written as text

def parse_value(text: str) -> Any:
    """``"3"`` → 3, ``"0.5"`` → 0.5, ``"true"``/``"yes"`` → True,
    ``"false"``/``"no"`` → False, otherwise the string (a method then
    rejects a string where it needs a number or a boolean)."""
    low = text.strip().lower()
    if low in ("true", "yes"):
        return True
    if low in ("false", "no"):
        return False
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


def parse_method_args(text: Optional[str]) -> dict:
    """``"lam=0.5,beta=8"`` → ``{"lam": 0.5, "beta": 8}``."""
    if not text:
        return {}
    out = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--method-args: expected key=value[,key=value...], got {item!r}")
        if key.strip() in out:
            raise UserError(f"--method-args: {key.strip()!r} is given twice")
        out[key.strip()] = parse_value(value)
    return out


def load_config_file(path: str) -> dict:
    """Settings from a TOML or YAML file; keys are TrainConfig fields
    (``meta-per-class`` or ``meta_per_class``)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as err:
        raise UserError(f"--config: cannot read {path}: {err.strerror}") from None
    if p.suffix.lower() not in (".toml", ".yaml", ".yml"):
        raise UserError(f"--config: {path} must end in .toml, .yaml or .yml")
    try:
        if p.suffix.lower() == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as err:  # a parse error of the file's syntax
        raise UserError(f"--config: cannot parse {path}: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"--config: {path} must hold a table of settings")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _map_paths(cfg: TrainConfig, fn) -> dict:
    """The path-bearing settings of ``cfg`` with ``fn`` applied to each path: the part after the ``kind:``
    prefix of every dataset format that takes one (:data:`gdw.data.FORMATS`) and of a noise ``matrix:``."""
    from .data import FORMATS

    prefixes = [f"{name}:" for name in FORMATS.names() if FORMATS.get(name).path != "none"] + ["matrix:"]
    out = {}
    for name in ("dataset", "noise", "meta", "test"):
        value = getattr(cfg, name)
        for prefix in prefixes:
            if isinstance(value, str) and value.startswith(prefix) and len(value) > len(prefix):
                out[name] = prefix + fn(value[len(prefix):])
    for name in ("data_root", "encoder"):
        if getattr(cfg, name):
            out[name] = fn(getattr(cfg, name))
    return out


def default_out(cfg: TrainConfig) -> Path:
    """A fresh directory under ``runs/`` named after the run."""
    stem = "-".join(str(s).replace(":", "").replace("/", "_")
                    for s in (cfg.dataset, cfg.noise, cfg.method, f"s{cfg.seed}"))
    base = Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, k = base, 1
    while path.exists():
        path, k = Path(f"{base}-{k}"), k + 1
    return path


def data_files(cfg: TrainConfig) -> dict:
    """``{setting: digest}`` of the user's files the run reads (``dataset``,
    ``meta`` and ``test`` when they name a CSV, npz or folder; see
    :func:`gdw.data.sources.files_digest`), so that a reused run can be
    checked against the files as they are now."""
    from .data.sources import files_digest

    digests = {k: files_digest(getattr(cfg, k)) for k in ("dataset", "meta", "test") if getattr(cfg, k) is not None}
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
