"""``gdw compare`` and the benchmark grids' one runner: a grid of cells,
each an ordinary run directory. A finished cell is reused and an interrupted
one resumed only when its saved settings are the requested ones
(:func:`run_cell`), so a stopped grid continues where it was and a changed
grid never reports old numbers under new settings; :func:`sweep` walks the
cells, shared out between processes by locks when asked. ``gdw compare``
tabulates its grid into results.csv, results.md and compare.png."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import re
import shutil
import time
from pathlib import Path
from typing import Optional, Sequence

from .errors import UserError
from .report import VAL_FIELDS, plot_compare, results_markdown, validation_markdown, write_results_csv
from .train import RunInterrupted, TrainConfig, TrainingDiverged, changed_data_files, describe_difference, train
from .variants import variant

FAILED = "failed.json"  # written into a cell whose run diverged or collapsed: {"error": the message, its settings}


def cell_name(noise: str, imbalance: str, method: str, seed: int) -> str:
    raw = f"{noise}_{imbalance}_{method}_s{seed}"
    return re.sub(r"[^A-Za-z0-9_.+-]", "", raw.replace(":", ""))


def finished_summary(run_dir: Path) -> Optional[dict]:
    """The run's summary.json, or None where it has not finished (or the file is unreadable)."""
    try:
        return json.loads((Path(run_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return None


def stale_cell(cfg: TrainConfig) -> Optional[str]:
    """Why the cell ``cfg.out`` cannot be reused for ``cfg`` (its saved
    settings differ), or None when it can (or does not exist yet)."""
    run_dir = Path(cfg.out)
    if not (run_dir / "config.json").exists():
        return None
    remedy = "pass --force to rerun such cells, or use another --out"
    diff = cfg.first_difference(TrainConfig.load(run_dir), summary=finished_summary(run_dir))
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


@contextlib.contextmanager
def claimed(lock: Path):
    """Hold the cell's lock file while the block runs: yields True for this
    process, False when another one holds it (so any number of processes can
    work through one grid). The lock is the operating system's (``flock``): it
    ends with its process, so a killed process leaves no lock behind."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


def lock_path(out: Path, name: str) -> Path:
    return out / ".running" / (name.replace("/", "__") + ".lock")


def sweep(out: Path, cells, *, shard: tuple[int, int] = (0, 1), share: bool = False, verify: bool = False,
          keep_going: bool = False, force: bool = False, progress: bool = False, log=lambda *a, **kw: None):
    """Train the cells ``(name, config)`` (run directory ``out/name``) in
    order, yielding ``(name, config, how, result)``: ``how`` "finished"
    (reused), "new" or "resumed" (``result``: the summary) or "failed" (the
    message). ``shard=(K, N)``: every N-th cell from the K-th. ``share``: a
    cell is trained under its lock in ``out/.running/``, and one another
    process holds is left to it (not yielded). ``verify``: a finished cell
    saved with other settings fails (else it is reused unread). ``keep_going``:
    a cell whose run raises a UserError or diverges fails and the next one
    is trained (a diverged one leaves :data:`FAILED` and is not retried).
    ``force``: cells saved with other settings are rerun (:func:`run_cell`).
    ``progress``: a line before and after each cell trained; ``log``: the
    runs' epoch lines. Ctrl-C raises RunInterrupted naming the cell."""
    k, n = shard
    mine = list(cells)[k::n]
    for i, (name, cfg) in enumerate(mine, 1):
        run_dir = out / name
        cfg, done = dataclasses.replace(cfg, out=str(run_dir)), run_dir / "summary.json"
        if keep_going and (run_dir / FAILED).exists():  # a run that diverged or collapsed does so again
            yield name, cfg, "failed", json.loads((run_dir / FAILED).read_text())["error"]
            continue
        if done.exists() and not force:
            diff = verify and cfg.first_difference(TrainConfig.load(run_dir), summary=finished_summary(run_dir))
            if diff:
                yield name, cfg, "failed", f"finished with {diff[0]} = {diff[2]!r}, but the grid asks for {diff[1]!r}"
            else:
                yield name, cfg, "finished", json.loads(done.read_text())
            continue
        with claimed(lock_path(out, name)) if share else contextlib.nullcontext(True) as ours:
            if not ours or (done.exists() and not force):  # another's, or finished since the check
                continue
            t0 = time.time()
            if progress:
                print(f"[shard {k}/{n}: {i}/{len(mine)}] {name}", flush=True)
            try:
                result, how = run_cell(cfg, force=force, log=log)
            except RunInterrupted:
                raise RunInterrupted(f"interrupted in cell {name}; finished cells are kept: run the same command "
                                     "again to continue") from None
            except (UserError, TrainingDiverged) as err:
                if not keep_going:
                    raise
                result, how = str(err).splitlines()[0] if str(err) else type(err).__name__, "failed"
                if isinstance(err, TrainingDiverged):  # the cell's settings with it: a run that failed in its
                    run_dir.mkdir(parents=True, exist_ok=True)  # first epoch leaves no config.json
                    record = {"error": result, **{key: getattr(cfg, key) for key in (
                        "method", "method_args", "head_only", "noise", "imbalance", "seed")}}
                    (run_dir / FAILED).write_text(json.dumps(record) + "\n")
        if progress:
            print(f"    failed: {result}" if how == "failed" else f"    final {100 * result['final_test_accuracy']:.2f}"
                  f"%  best {100 * result['best_test_accuracy']:.2f}%  {time.time() - t0:.0f}s", flush=True)
        yield name, cfg, how, result


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
        methods: labels of :func:`gdw.variants.variant`: method names (``NAME-head``
            runs NAME with head_only=True) or the table's variants.
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
    variants = [(label, *variant(label)) for label in methods]
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
    cells = [(Path(cfg.out).name, cfg) for _, cfg in configs]
    for k, ((label, _), (name, _, how, summary)) in enumerate(zip(configs, sweep(
            root, cells, force=force, log=(lambda *a, **kw: None) if quiet else print)), 1):
        if not quiet:
            done = {"finished": "finished, skipped", "resumed": "resumed and finished", "new": "trained"}[how]
            print(f"[{k}/{len(configs)}] {name}: {done}", flush=True)
        rows.append({**summary, "method": label, "run_dir": name})
        write_results_csv(rows, root / "results.csv", extra_fields=VAL_FIELDS)
    _report(rows, root, title=f"{base.dataset}, {base.model}, {base.epochs} epochs")
    return rows


def cell_configs(base: TrainConfig, variants, settings, seeds, root: Path, quiet: bool) -> list:
    """``(label, TrainConfig)`` of every (setting, method variant, seed) cell, checked."""
    return [(label, dataclasses.replace(
        base, noise=noise, imbalance=imbalance, method=name, method_args={**args, **base.method_args},
        head_only=head or base.head_only, seed=seed, out=str(root / cell_name(noise, imbalance, label, seed)),
        resume=False, progress=base.progress and not quiet).validate())
        for noise, imbalance in settings for label, name, args, head in variants for seed in seeds]


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
