"""Act on a run's label issues: the user's data back, in its own format,
without the flagged rows or with their suggested labels (``gdw detect RUN
--export FILE [--relabel]``).

* ``csv:``: the same columns and delimiter; flagged data rows left out, or
  their label cell replaced by the suggested label; every other row as read.
* ``npz:``: the same arrays; the training arrays' flagged rows left out or
  their labels replaced (label values as the file stored them).
* ``folder:``: images are not moved; FILE is a CSV ``path,given_label,
  action`` (``remove``) or ``path,given_label,suggested_label`` (``move to
  the suggested label's folder``) for the flagged images, paths relative to
  the folder.

The training examples and the rows of a test split drawn from the same data
are scored (``label_issues.csv``); rows of the clean set, and of a test set
given with ``--test``, are written unchanged.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional

import numpy as np

from .detect import load_issues
from .errors import UserError
from .io import atomic_path


def flagged_rows(issues, num_issues: Optional[int] = None) -> tuple[dict, dict]:
    """``{user row: suggested class}`` of the flagged training examples (the
    run's own flagged set, or the ``num_issues`` most suspicious), and the
    same for the flagged rows of a test split drawn from the user's data."""
    picks = np.flatnonzero(issues.suggested != issues.given) if num_issues is None else \
        issues.order[: max(0, int(num_issues))]
    rows = issues.rows if issues.rows is not None else issues.index
    train = {int(rows[i]): int(issues.suggested[i]) if issues.suggested[i] != issues.given[i] else None for i in picks}
    t = issues.test if num_issues is None else None
    test = {} if t is None else {int(r): int(s) for r, s, g in zip(t["source_rows"], t["suggested"], t["given"])
                                 if s != g}
    return train, test


def export(run_dir, out_file, *, relabel: bool = False, num_issues: Optional[int] = None) -> dict:
    """Write the run's data without (or relabelling) its flagged examples.

    Returns ``{"kind", "source", "out", "flagged", "written"}`` (written:
    data rows or list entries in the output). Raises UserError for a run on
    a built-in dataset, a source file that changed or is gone, or an output
    that cannot be written.
    """
    run = Path(run_dir)
    issues = load_issues(run)
    config = json.loads((run / "config.json").read_text())
    spec = str(config.get("dataset", ""))
    kind, _, rest = spec.partition(":")
    if kind not in ("csv", "npz", "folder") or not rest:
        raise UserError(f"--export works on the user's own data (csv:, npz: or folder:); this run trained on {spec!r}")
    source = run / rest  # the data file or folder, recorded relative to the run directory (an absolute path stays)
    if not source.exists():
        raise UserError(f"--export: the run's data {source} is gone")
    flagged, test = flagged_rows(issues, num_issues)
    if relabel and any(v is None for v in flagged.values()):
        raise UserError("--relabel needs a suggested label for every flagged row; drop --num-issues")
    names = [str(c) for c in issues.classes]
    out = Path(out_file)
    if out.resolve() == source.resolve():
        raise UserError("--export: refusing to overwrite the run's own data; choose another file")
    try:
        if kind == "csv":  # a test split drawn from the file: its rows are rows of the same file
            written = _csv(source, out, {**flagged, **test}, names, config.get("label_column", "label"), relabel)
        elif kind == "npz":
            written = _npz(source, out, flagged, test, issues.classes, relabel)
        else:
            written = _folder(out, flagged, test, issues, names, relabel)
    except OSError as err:
        raise UserError(f"--export: cannot write {out}: {err.strerror or err}") from None
    return {"kind": kind, "source": str(source), "out": str(out), "flagged": len(flagged) + len(test),
            "written": written}


def _csv(source: Path, out: Path, flagged: dict, names: list, label_column: str, relabel: bool) -> int:
    """The CSV as the run read it (its data rows numbered as in ``label_issues.csv``), with
    its delimiter; flagged rows left out or relabelled."""
    from .data.files import read_csv_table

    table = read_csv_table(source)
    if label_column not in table.header:
        raise UserError(f"--export: {source} no longer has the label column {label_column!r}")
    col, written = table.header.index(label_column), 0
    with atomic_path(out) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f, delimiter=table.delimiter, lineterminator="\n")
        writer.writerow(table.header)
        for r, row in enumerate(table.table.tolist()):
            if r in flagged:
                if not relabel:
                    continue
                row[col] = names[flagged[r]]
            writer.writerow(row)
            written += 1
    return written


def _npz(source: Path, out: Path, flagged: dict, test: dict, classes: list, relabel: bool) -> int:
    with np.load(source, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    pairs = [("x_train", "y_train", flagged), ("x_test", "y_test", test)] if "x_train" in arrays else [
        ("x", "y", flagged)]
    for xk, yk, picked in pairs:
        if xk not in arrays or not picked:
            continue
        y, rows = arrays[yk], np.array(sorted(picked), dtype=np.int64)
        if relabel:  # the label as the file stores it: a value, or a position in its own `classes`
            if "classes" in arrays and y.dtype.kind in "iuf":
                values = {str(c): i for i, c in enumerate(arrays["classes"].reshape(-1))}
            else:
                values = {str(v): v for v in np.unique(y)}
            y = y.copy()
            y[rows] = [values[str(classes[picked[r]])] for r in rows]
            arrays[yk] = y
        else:
            keep = np.ones(len(y), bool)
            keep[rows] = False
            arrays[xk], arrays[yk] = arrays[xk][keep], y[keep]
    with atomic_path(out) as tmp:
        np.savez(tmp, **arrays)
    return int(sum(len(arrays[yk]) for _, yk, _ in pairs if yk in arrays))


def _folder(out: Path, flagged: dict, test: dict, issues, names: list, relabel: bool) -> int:
    rows = issues.rows if issues.rows is not None else issues.index
    entries = [(issues.paths[i] if issues.paths is not None else str(int(rows[i])), int(issues.given[i]),
                flagged[int(rows[i])]) for i in range(len(rows)) if int(rows[i]) in flagged]
    t = issues.test
    if test and t is not None and len(t["source_paths"]):
        entries += [(str(p), int(g), test[int(r)]) for r, p, g in zip(t["source_rows"], t["source_paths"], t["given"])
                    if int(r) in test]
    with atomic_path(out) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["path", "given_label", "suggested_label" if relabel else "action"])
        for path, given, suggested in sorted(entries):
            writer.writerow([path, names[given], names[suggested] if relabel else "remove"])
    return len(entries)
