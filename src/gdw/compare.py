"""``gdw compare``: a grid of methods × settings × seeds, each cell an
ordinary run directory, tabulated into results.csv, results.md and
compare.png. A finished cell is reused and an interrupted one resumed only
when its saved settings are the requested ones (:func:`run_cell`), so a
stopped grid continues where it was and a changed grid never reports old
numbers under new settings."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Optional, Sequence

from .errors import UserError
from .methods import METHODS
from .report import VAL_FIELDS, plot_compare, results_markdown, validation_markdown, write_results_csv
from .train import RunInterrupted, TrainConfig, changed_data_files, describe_difference, train


def method_variant(spec: str) -> tuple[str, bool]:
    """``"gdw-head"`` → ("gdw", True); ``"gdw"`` → ("gdw", False)."""
    name, head = (spec[:-5], True) if spec.endswith("-head") else (spec, False)
    METHODS.get(name)  # unknown → UserError listing the methods
    return name, head


def cell_name(noise: str, imbalance: str, method: str, seed: int) -> str:
    raw = f"{noise}_{imbalance}_{method}_s{seed}"
    return re.sub(r"[^A-Za-z0-9_.+-]", "", raw.replace(":", ""))


def stale_cell(cfg: TrainConfig) -> Optional[str]:
    """Why the cell ``cfg.out`` cannot be reused for ``cfg`` (its saved
    settings differ), or None when it can (or does not exist yet)."""
    run_dir = Path(cfg.out)
    if not (run_dir / "config.json").exists():
        return None
    remedy = "pass --force to rerun such cells, or use another --out"
    diff = cfg.first_difference(TrainConfig.load(run_dir))
    if diff is not None:
        return f"cell {run_dir.name}: " + describe_difference(diff, str(run_dir), remedy)
    changed = changed_data_files(cfg, run_dir)
    if changed is not None:
        return f"cell {run_dir.name}: the data of {changed} changed since the cell was trained; {remedy}"
    return None


def run_cell(cfg: TrainConfig, *, force: bool = False, log=print) -> tuple[dict, str]:
    """Train the run ``cfg.out``, reusing what is already there when it was
    made with the same settings: ``(summary, "finished" | "resumed" | "new")``.

    A cell directory whose saved settings differ from ``cfg`` raises a
    UserError naming the cell and the first difference, unless ``force``:
    then the cell is deleted and trained again.
    """
    run_dir = Path(cfg.out)
    stale = stale_cell(cfg)
    if stale and not force:
        raise UserError(stale)
    if stale:
        shutil.rmtree(run_dir)
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        return json.loads(summary_path.read_text()), "finished"
    resume = (run_dir / "checkpoint.pt").exists()
    if run_dir.exists() and not resume:  # started but never finished an epoch
        shutil.rmtree(run_dir)
    return train(dataclasses.replace(cfg, resume=resume), log=log), "resumed" if resume else "new"


def compare(
    base: TrainConfig,
    methods: Sequence[str],
    settings: Sequence[tuple[str, str]],
    seeds: Sequence[int],
    out: str,
    quiet: bool = False,
    force: bool = False,
) -> list[dict]:
    """Run every (setting, method, seed) cell under ``out`` and tabulate.

    Args:
        base: settings shared by every cell (dataset, model, epochs, ...).
        methods: method names; ``NAME-head`` runs NAME with head_only=True.
        settings: (noise spec, imbalance spec) pairs.
        seeds: random seeds.
        out: the grid's directory; each cell is ``out/<cell>/``.
        quiet: print only the final table, not the per-epoch lines.
        force: rerun cells whose saved settings differ from the requested ones.
    Returns:
        The rows of results.csv (one dict per run).
    Raises:
        UserError: a bad setting, or a cell saved with other settings (without ``force``).
        RunInterrupted: Ctrl-C; finished cells are kept.
    """
    variants = [(spec, *method_variant(spec)) for spec in methods]
    if not variants or not settings or not seeds:
        raise UserError("compare needs at least one method, one setting and one seed")
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise UserError(f"--out {root} is a file, not a directory")
    configs = cell_configs(base, variants, settings, seeds, root, quiet)
    stale = None if force else next(filter(None, (stale_cell(cfg) for _, cfg in configs)), None)
    if stale:  # refuse a changed grid before training anything
        raise UserError(stale)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for k, (label, cfg) in enumerate(configs, 1):
        name = Path(cfg.out).name
        try:
            summary, how = run_cell(cfg, force=force, log=(lambda *a, **kw: None) if quiet else print)
        except RunInterrupted:
            raise RunInterrupted(f"interrupted in cell {name}; finished cells are kept: run the same gdw compare "
                                 "command again to continue") from None
        if not quiet:
            print(f"[{k}/{len(configs)}] {name}: " + {"finished": "finished, skipped", "resumed": "resumed and finished",
                                                      "new": "trained"}[how], flush=True)
        rows.append({**summary, "method": label, "run_dir": name})
        write_results_csv(rows, root / "results.csv", extra_fields=VAL_FIELDS)
    _report(rows, root, title=f"{base.dataset}, {base.model}, {base.epochs} epochs")
    return rows


def cell_configs(base: TrainConfig, variants, settings, seeds, root: Path, quiet: bool) -> list:
    """``(label, TrainConfig)`` of every (setting, method variant, seed) cell, checked."""
    configs = []
    for (noise, imbalance), (label, name, head), seed in ((s, v, seed) for s in settings for v in variants
                                                          for seed in seeds):
        cfg = dataclasses.replace(
            base, noise=noise, imbalance=imbalance, method=name, head_only=head or base.head_only, seed=seed,
            out=str(root / cell_name(noise, imbalance, label, seed)), resume=False, progress=base.progress and not quiet,
        )
        configs.append((label, cfg.validate()))
    return configs


def _report(rows: list[dict], root: Path, title: str) -> None:
    """results.md (accuracy, balanced accuracy, the validation pick) and compare.png; the table printed."""
    table = results_markdown(rows) + "\n" + results_markdown(rows, "balanced")
    chosen = validation_markdown(rows)
    if chosen:
        table += "\n" + chosen
    (root / "results.md").write_text(table)
    plot_compare(rows, root / "compare.png", title=title)
    print()
    print(table)
    print(f"results: {root / 'results.csv'}, {root / 'results.md'}, {root / 'compare.png'}")
