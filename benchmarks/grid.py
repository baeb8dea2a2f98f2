"""What the benchmark grids share beyond gdw's runner and its table of variants.

A grid is a list of cells, each an ordinary ``gdw train`` run directory
``OUT/<name>`` (``name`` may hold a ``/``: ``digits/flip0.4_none_ce_s0``),
trained by :func:`gdw.compare.sweep`, the runner of ``gdw compare`` too: a
cell with a ``summary.json`` is finished and skipped; one with only a
checkpoint is resumed. While a process trains a cell it holds a ``flock`` on
``OUT/.running/<name>.lock`` (``/`` written as ``__``), so any number of
processes started on one grid share it out between them; the lock ends with
its process. ``shard=(K, N)`` splits the grid statically instead (every N-th
cell from K). The methods are labels of :mod:`gdw.variants`.

The report helpers here read only what every grid writes: ``summary.json``,
``metrics.jsonl`` and ``config.json`` of each cell (the files kept by
:func:`prune`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from gdw.compare import FAILED, claimed, lock_path, sweep  # noqa: F401  (claimed, lock_path: the tests' way in)

KEEP = {"summary.json", "metrics.jsonl", "config.json"}  # what is committed of each cell
SPLIT_FIELDS = ["many_shot_accuracy", "few_shot_accuracy"]


def cell_config(dataset, meta_per_class, noise, imbalance, method, seed, epochs, device, val_per_class=0,
                model="mlp"):
    """The ``TrainConfig`` of one cell: ``method`` is a variant ``(gdw method,
    method_args, head_only)``; every other hyper-parameter is the grids' own."""
    from gdw.train import TrainConfig

    name, method_args, head = method
    return TrainConfig(dataset=dataset, noise=noise, imbalance=imbalance, method=name, method_args=dict(method_args),
                       head_only=head, seed=seed, model=model, epochs=epochs, batch_size=100, meta_batch_size=100,
                       lr=0.1, meta_per_class=meta_per_class, val_per_class=val_per_class, progress=False,
                       device=device)


def run_grid(out: Path, cells: Sequence[tuple[str, object]], shard: tuple[int, int] = (0, 1), *,
             keep_going: bool = False, verify: bool = False) -> list[tuple[str, str]]:
    """Train every cell ``(name, TrainConfig)`` that is neither finished nor
    held by another process, in order (:func:`gdw.compare.sweep`, its
    ``shard``, ``keep_going`` and ``verify``); ``(name, error message)`` of
    every cell that failed."""
    return [(name, result) for name, _, how, result in sweep(
        out, cells, shard=shard, share=True, verify=verify, keep_going=keep_going, progress=True) if how == "failed"]


def failed_cells(out: Path, pattern: str = f"*/*/{FAILED}") -> list[dict]:
    """The cells under ``out`` whose run diverged or collapsed: ``run_dir``
    (relative to ``out``), ``error`` and the run's settings (``method``,
    ``method_args``, ``head_only``, ``noise``, ``imbalance``, ``seed``, and
    ``num_classes`` when the run saved its config.json)."""
    rows = []
    for path in sorted(out.glob(pattern)):
        record = json.loads(path.read_text())
        config = path.parent / "config.json"
        cfg = json.loads(config.read_text()) if config.exists() else {}
        rows.append({**{k: cfg.get(k, record.get(k)) for k in ("method", "method_args", "head_only", "noise",
                                                                  "imbalance", "seed", "num_classes")},
                     "error": record["error"], "run_dir": path.parent.relative_to(out).as_posix()})
    return rows


# ----------------------------------------------------------------------------- reading finished cells

def plain_label(summary: dict, run: Path) -> str:
    """A run's method label: its method, with ``-head`` when head-only."""
    return summary["method"] + ("-head" if summary.get("head_only") else "")


def method_label(table: dict, summary: dict, run: Path) -> str:
    """A finished run's label in ``table`` (label -> ``(method, method_args,
    head_only)``), matched on the method, its arguments and head_only as the
    run's summary records them; a run that matches no entry gets its plain
    label with its arguments, e.g. ``gdw(stage_one=mwnet)``, so that it is
    never reported under a label it was not run as."""
    from gdw.methods import METHODS, recorded_params, resolved_params

    key = (summary["method"], summary.get("method_args") or {}, bool(summary.get("head_only")))
    added = getattr(METHODS.get(key[0]), "ADDED_PARAMS", {}) if key[0] in METHODS else {}
    inert = getattr(METHODS.get(key[0]), "INERT_UNLESS", {}) if key[0] in METHODS else {}

    def same_run(k, v) -> bool:  # a parameter added since the run: at the value the run had, or inert in it
        return k in added and (added[k] == v or (k in inert and summary.get(inert[k][0]) != inert[k][1]))

    for label, (method, method_args, head) in table.items():
        # the same arguments, but for parameters added since the run, spelled at the value the run had (or
        # at any value where the run's summary shows that the parameter changed nothing)
        extra = {k: v for k, v in method_args.items() if k not in key[1]}
        if ((method, head) == (key[0], key[2]) and all(same_run(k, v) for k, v in extra.items())
                and {k: v for k, v in method_args.items() if k in key[1]} == key[1]):
            return label
    # arguments spelled otherwise (e.g. a parameter added since the run spelled out at the value the run had):
    # the entry whose parameters, defaults resolved, are those the run's config.json records
    config = None if run is None else Path(run) / "config.json"
    saved = json.loads(config.read_text()).get("method_params") if config and config.is_file() else None
    if saved is not None and key[0] in METHODS:
        have = recorded_params(key[0], saved)
        for label, (method, method_args, head) in table.items():
            same = resolved_params(method, {**method_args, "head_only": head}) == have
            if (method, head) == (key[0], key[2]) and same:
                return label
    args = ",".join(f"{k}={v}" for k, v in key[1].items())
    return plain_label(summary, run) + (f"({args})" if args else "")


def finished_rows(out: Path, pattern: str = "*/summary.json",
                  label: Callable[[dict, Path], str] = plain_label, sort_key=None) -> list[dict]:
    """One row per finished cell under ``out`` (the summaries matching
    ``pattern``): the summary, ``method`` = ``label(summary, run_dir)``,
    ``run_dir`` relative to ``out`` and, under imbalance, the many- and
    few-shot accuracies; sorted by ``sort_key`` when given."""
    rows = []
    for path in sorted(out.glob(pattern)):
        s = json.loads(path.read_text())
        rows.append({**s, "method": label(s, path.parent), "run_dir": path.parent.relative_to(out).as_posix(),
                     **head_tail_accuracy(path.parent)})
    if sort_key is not None:
        rows.sort(key=sort_key)
    return rows


def head_tail_accuracy(run: Path) -> dict:
    """For a run with class imbalance: the mean test accuracy (last 5 epochs)
    of the half of the classes with the most training examples ("many-shot")
    and of the other half ("few-shot"); {} for a balanced run."""
    config = json.loads((run / "config.json").read_text())
    if config["imbalance"] == "none":
        return {}
    counts = np.asarray(config["data"]["counts"]["train_true"])
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    per_class = np.mean([h["per_class_test_accuracy"] for h in history[-5:]], axis=0)
    order = np.argsort(-counts, kind="stable")
    many, few = order[: len(order) // 2], order[len(order) // 2:]
    return {"many_shot_accuracy": float(per_class[many].mean()), "few_shot_accuracy": float(per_class[few].mean())}


# ----------------------------------------------------------------------------- report helpers

COLORS = {  # one colour per method label, the same in every plot of both grids
    "ce": "#7f7f7f", "finetune": "#bcbd22", "dm": "#8c564b", "cb": "#9467bd", "la": "#e377c2",
    "l2rw": "#1f77b4", "l2rw-ft": "#aec7e8", "mwnet": "#ff7f0e", "gdw-paper": "#98df8a", "gdw-paper-head": "#d9f0d3",
    "gdw-l2rw": "#17becf", "gdw-l2rw-c": "#9edae5", "gdw-tau0": "#c5b0d5", "gdw-batch": "#dadaeb",
    "gdw-raw": "#74c476", "gdw": "#2ca02c", "gdw-jvp": "#006400",
}


def split_markdown(rows: list[dict], settings: Optional[Sequence[str]] = None,
                   methods: Optional[Sequence[str]] = None) -> str:
    """Markdown table for the imbalanced settings: many-shot / few-shot class
    accuracy (%) per method, mean over seeds, from the CSV rows. Columns and
    rows in the order of first appearance, or in the order of ``settings`` /
    ``methods`` (those without a run left out)."""
    from gdw.report import aggregate

    rows = [r for r in rows if r["imbalance"] != "none" and r.get("many_shot_accuracy") not in (None, "")]
    if not rows:
        return ""
    found_settings, found_methods, cells = aggregate(rows, extra=SPLIT_FIELDS)
    settings = found_settings if settings is None else [s for s in settings if s in found_settings]
    methods = found_methods if methods is None else [m for m in methods if m in found_methods]
    lines = ["| method | " + " | ".join(f"{s}: many / few" for s in settings) + " |", "|---|" + "---|" * len(settings)]
    for m in methods:
        row = []
        for s in settings:
            c = cells.get((s, m))
            row.append("–" if c is None else " / ".join(f"{100 * c[f + '_mean']:.1f}" for f in SPLIT_FIELDS))
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def provenance(out: Path, command: str, pattern: str = "*/config.json",
               note: str = " (the same cells whether run as one process or split with `--shard K/N`)") -> str:
    """The command, the dates and the software the finished runs were made
    with, read from each run's config.json."""
    configs = [json.loads(p.read_text()) for p in sorted(out.glob(pattern)) if (p.parent / "summary.json").exists()]
    started = sorted(c["started"] for c in configs if "started" in c)
    versions = sorted({", ".join(f"{k} {v}" for k, v in c.get("versions", {}).items()) for c in configs})
    devices = sorted({c.get("device") or "auto" for c in configs})
    lines = [
        f"Command: `{command}`{note}.",
        f"Runs started between {started[0]} and {started[-1]}." if started else "",
        f"Software: {'; '.join(versions)}. Device: {', '.join(devices)}.",
    ]
    return "\n".join(l for l in lines if l) + "\n"


def data_notes(rows: list[dict], out: Path) -> str:
    """Realised noise rate and class sizes per setting, from the CSV rows and
    the runs' config.json (the split is the same for every method and seed of
    a setting only up to the seed, so every distinct value is listed)."""
    from gdw.report import setting_label

    realised, sizes = {}, {}
    for r in rows:
        key = setting_label(r["noise"], r["imbalance"])
        rate = r["realised_noise_rate"]
        known = rate not in (None, "") and float(rate) == float(rate)  # none where the true labels are unknown
        realised.setdefault(key, set()).update([round(float(rate), 4)] if known else [])
        config = out / r["run_dir"] / "config.json"
        if r["imbalance"] != "none" and config.exists():
            counts = json.loads(config.read_text())["data"]["counts"]
            # by the given labels where the true ones are not known (a data set's own labels)
            counts = counts["train_true"] if sum(counts["train_true"]) else counts["train_noisy"]
            sizes.setdefault(key, set()).add((max(counts), min(counts), sum(counts)))
    lines = ["Realised noise rates (fraction of training labels that differ from the true label; against the "
             "given labels where the true ones are not known): " + "; ".join(
                 f"{k}: {', '.join(f'{100 * v:.1f}%' for v in sorted(vs)) or 'none added'}"
                 for k, vs in realised.items())]
    if sizes:
        lines.append("Training-set class sizes under imbalance (largest / smallest class, total): " + "; ".join(
            f"{k}: " + ", ".join(f"{a} / {b}, {n}" for a, b, n in sorted(v)) for k, v in sizes.items()))
    return "\n\n".join(lines) + "\n"


def prune(out: Path, pattern: str = "*/summary.json", spare: Iterable[str] = ()) -> None:
    """Delete from finished cells what is not committed (checkpoints, arrays,
    plots), keeping the cells named in ``spare`` (relative to ``out``) whole."""
    spare = set(spare)
    for path in out.glob(pattern):
        if path.parent.relative_to(out).as_posix() in spare:
            continue
        for f in path.parent.iterdir():
            if f.name not in KEEP:
                f.unlink()


def run_and_report(args, run: Callable, report: Callable, pattern: str = "*/*/summary.json") -> int:
    """A grid script's main: ``run(args)`` (the failed cells) unless
    ``--report`` or ``--prune``, then ``report(args)`` (results.md's text,
    printed), then with ``--prune`` :func:`prune`. 1 if a cell failed, else 0."""
    args.out.mkdir(parents=True, exist_ok=True)
    failed = [] if args.report or args.prune else run(args)
    md = report(args)
    if md:
        print(md)
    if args.prune:
        prune(args.out, pattern=pattern)
    for name, message in failed:
        print(f"failed: {name}: {message}", file=sys.stderr)
    return 1 if failed else 0
