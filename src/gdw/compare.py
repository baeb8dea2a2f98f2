"""``gdw compare``: a grid of methods × settings × seeds, each cell an
ordinary run directory, tabulated into results.csv, results.md and
compare.png. Finished cells are skipped and interrupted ones resumed, so a
stopped grid continues where it was."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Sequence

from .errors import UserError
from .methods import METHODS
from .report import plot_compare, results_markdown, write_results_csv
from .train import TrainConfig, train


def method_variant(spec: str) -> tuple[str, bool]:
    """``"gdw-head"`` → ("gdw", True); ``"gdw"`` → ("gdw", False)."""
    name, head = (spec[:-5], True) if spec.endswith("-head") else (spec, False)
    METHODS.get(name)  # unknown → UserError listing the methods
    return name, head


def cell_name(noise: str, imbalance: str, method: str, seed: int) -> str:
    raw = f"{noise}_{imbalance}_{method}_s{seed}"
    return re.sub(r"[^A-Za-z0-9_.+-]", "", raw.replace(":", ""))


def compare(
    base: TrainConfig,
    methods: Sequence[str],
    settings: Sequence[tuple[str, str]],
    seeds: Sequence[int],
    out: str,
    quiet: bool = False,
) -> list[dict]:
    """Run every (setting, method, seed) cell under ``out`` and tabulate.

    Args:
        base: settings shared by every cell (dataset, model, epochs, ...).
        methods: method names; ``NAME-head`` runs NAME with head_only=True.
        settings: (noise spec, imbalance spec) pairs.
        seeds: random seeds.
        out: the grid's directory; each cell is ``out/<cell>/``.
        quiet: print only the final table, not the per-epoch lines.
    Returns:
        The rows of results.csv (one dict per run).
    """
    variants = [(spec, *method_variant(spec)) for spec in methods]
    if not variants or not settings or not seeds:
        raise UserError("compare needs at least one method, one setting and one seed")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    cells = [(s, v, seed) for s in settings for v in variants for seed in seeds]
    for k, ((noise, imbalance), (label, name, head), seed) in enumerate(cells, 1):
        run_dir = root / cell_name(noise, imbalance, label, seed)
        summary_path = run_dir / "summary.json"
        if summary_path.exists():
            summary = json.loads(summary_path.read_text())
            if not quiet:
                print(f"[{k}/{len(cells)}] {run_dir.name}: finished, skipped")
        else:
            cfg = dataclasses.replace(
                base, noise=noise, imbalance=imbalance, method=name, head_only=head or base.head_only, seed=seed,
                out=str(run_dir), resume=(run_dir / "checkpoint.pt").exists(), progress=base.progress and not quiet,
            )
            print(f"[{k}/{len(cells)}] {run_dir.name}" + (" (resuming)" if cfg.resume else ""), flush=True)
            summary = train(cfg, log=(lambda *a, **kw: None) if quiet else print)
        rows.append({**summary, "method": label, "run_dir": run_dir.name})
        write_results_csv(rows, root / "results.csv")
    table = results_markdown(rows)
    (root / "results.md").write_text(table)
    plot_compare(rows, root / "compare.png", title=f"{base.dataset}, {base.model}, {base.epochs} epochs")
    print()
    print(table)
    print(f"results: {root / 'results.csv'}, {root / 'results.md'}, {root / 'compare.png'}")
    return rows
