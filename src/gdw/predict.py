"""``gdw predict``: the model of a finished run on new data.

The run directory holds everything needed: the settings (``config.json``:
the model, the class names, the preprocessing of the inputs, the shift
towards the run's target prior) and the weights: the final model in
``checkpoint.pt``, or ``best.pt`` (the epoch chosen on the validation split)
when the choice is trustworthy (:func:`choose_model_file`). New data is read with the
run's own preprocessing (:func:`gdw.data.load_new`), so a CSV's feature
columns, an image folder's size and channels and the normalisation
statistics are those of training.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .io import atomic_path
from .errors import UserError
from .fit import predict_proba
from .models import create_model
from .train import TrainConfig, pick_device


def best_or_final(val_accuracies, n: int) -> tuple[str, int, float]:
    """``("best" | "final", best epoch's index, margin)`` from the validation
    accuracy of every epoch (fractions) on ``n`` validation examples: best
    only when the best epoch's accuracy a* beats the last epoch's a by more
    than ``margin`` = max(2·sqrt(a(1 − a)/n), 1/n)."""
    k = int(np.argmax(val_accuracies))
    final = val_accuracies[-1]
    margin = max(2 * math.sqrt(final * (1 - final) / n), 1 / n)
    return ("best" if val_accuracies[k] - final > margin else "final"), k, margin


def choose_model_file(run_dir) -> tuple[str, str]:
    """``("best" | "final", why)``: best.pt only when its validation accuracy
    beats the final model's by more than twice the standard error of an
    accuracy on the validation split (sqrt(a(1 − a)/n), at least 1/n): with
    a few validation examples per class the best epoch is mostly noise, and
    the final model (fine-tuned, trained longest) is the better bet."""
    run = Path(run_dir)
    if not (run / "best.pt").exists():
        return "final", "the run has no validation split"
    if not (run / "metrics.jsonl").is_file() or not (run / "config.json").is_file():
        return "final", "the run records no validation accuracy"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    vals = [r.get("val_accuracy") for r in rows]
    n = int((json.loads((run / "config.json").read_text()).get("data") or {}).get("n_val") or 0)
    if not rows or vals[-1] is None or n == 0:
        return "final", "no validation accuracy was recorded"
    choice, k, margin = best_or_final(vals, n)
    best, final = vals[k], vals[-1]
    if choice == "best":
        return "best", (f"its validation accuracy {100 * best:.1f}% (epoch {k + 1}) beats the final model's "
                        f"{100 * final:.1f}% by more than twice its standard error on {n} examples")
    return "final", (f"best.pt's validation accuracy {100 * best:.1f}% (epoch {k + 1}) is within twice the standard "
                     f"error ({100 * margin:.1f} points on {n} examples) of the final model's {100 * final:.1f}%")


def load_model(run_dir, model_file: Optional[str] = None, device=None) -> tuple[torch.nn.Module, dict, str]:
    """``(model in eval mode, config.json as a dict, "best.pt" | "checkpoint.pt")``.

    ``model_file``: ``"best"`` (best.pt; an error when the run has none),
    ``"final"`` (checkpoint.pt) or None (:func:`choose_model_file`).
    """
    run = Path(run_dir)
    cfg = TrainConfig.load(run)
    config = json.loads((run / "config.json").read_text())
    if model_file not in (None, "best", "final"):
        raise UserError(f"--model-file must be best or final, got {model_file!r}")
    best = run / "best.pt"
    if model_file == "best" and not best.exists():
        raise UserError(f"{run} has no best.pt (it was trained without --val-per-class or --meta)")
    if model_file is None:
        model_file = choose_model_file(run)[0]
    path = best if model_file == "best" else run / "checkpoint.pt"
    if not path.exists():
        raise UserError(f"{run} has no trained model yet (no checkpoint.pt)")
    device = pick_device(device)
    try:
        state = torch.load(path, map_location=device, weights_only=False)["model"]
    except Exception as err:  # a truncated or foreign file
        raise UserError(f"cannot read {path} ({type(err).__name__}); it is corrupt or truncated") from None
    model = create_model(cfg.model, config["input_shape"], len(config["classes"])).to(device)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise UserError(f"{path} does not fit the model {cfg.model!r}: {str(err).splitlines()[0]}") from None
    model.eval()
    return model, config, path.name


def predict(run_dir, data: str, out_csv, *, model_file: Optional[str] = None, device=None,
            batch_size: int = 500, label_column: Optional[str] = None) -> dict:
    """Predict ``data`` (a dataset spec: ``csv:PATH``, ``folder:PATH``,
    ``npz:PATH``) with the run in ``run_dir`` and write ``out_csv``.

    Columns: ``index`` (the 0-based data row of the CSV file or the position
    in the npz arrays) or ``path`` (relative to the folder),
    ``predicted_label`` (a class name, i.e. your label value),
    ``confidence`` (its probability) and one probability column per class
    (``p_<class>``), in the order of the data.

    Returns ``{"n", "accuracy" (None without labels), "n_labelled",
    "model_file", "why", "unfinished"}`` (``unfinished``: ``(epochs
    trained, epochs)`` of a run without summary.json, else None). Raises
    UserError for a missing run, file or column, or labels unknown to the run.
    ``label_column``: the column of a CSV that holds its labels, where it is
    not the run's own (None: the run's; then a CSV without it is read as
    unlabelled, while a named column that is missing is an error). A
    text run reads the text column with its own encoder and caches the
    file's embeddings in ``run_dir/embeddings``.
    """
    from .data import load_new

    chosen, why = (model_file, "asked for") if model_file is not None else choose_model_file(run_dir)
    model, config, used = load_model(run_dir, chosen, device)
    pre = config.get("preprocess")
    if pre is None:
        raise UserError(f"{run_dir} records no preprocessing (made by an older gdw); train it again to predict")
    classes = [str(c) for c in config["classes"]]
    if label_column is not None:
        if pre.get("kind") != "csv" or not str(data).startswith("csv:"):
            raise UserError("--label-column names a column of CSV data; the labels of a folder are its sub-folders "
                            "and those of an npz file its y")
        pre = {**pre, "label_column": label_column}
    new = load_new(data, pre, classes, text_dir=run_dir)
    if label_column is not None and not new.has_labels:
        raise UserError(f"{data} has no column {label_column!r} (--label-column)")
    out = Path(out_csv)
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give a file name such as predictions.csv")
    if not out.parent.exists():
        raise UserError(f"--out {out}: the folder {out.parent} does not exist")
    shift = (config.get("target") or {}).get("prediction_shift")  # towards the run's target prior
    prob = predict_proba(model, new.split, batch_size, shift=shift).cpu().numpy().astype(np.float64)
    pred = prob.argmax(1) if len(prob) else np.zeros(0, dtype=np.int64)
    key = "path" if new.source_paths is not None else "index"
    where = new.source_paths if new.source_paths is not None else [int(r) for r in new.source_rows]
    with atomic_path(out) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([key, "predicted_label", "confidence", *[f"p_{c}" for c in classes]])
        for i in range(len(pred)):
            w.writerow([where[i], classes[pred[i]], f"{prob[i, pred[i]]:.6g}", *[f"{p:.6g}" for p in prob[i]]])
    from .data.text import save as save_text

    save_text(run_dir, pre, [new.source_file])  # a text run keeps the new file's embeddings too
    labels = new.split.labels.numpy()
    known = labels >= 0
    accuracy = float((pred[known] == labels[known]).mean()) if new.has_labels and known.any() else None
    run = Path(run_dir)
    unfinished = None
    if not (run / "summary.json").is_file():  # the epochs its checkpoint holds (metrics.jsonl may be one ahead)
        ckpt = run / "checkpoint.pt"
        done = torch.load(ckpt, map_location="cpu", weights_only=False)["epoch"] + 1 if ckpt.is_file() else 0
        unfinished = (done, int(config["epochs"]))
    return {"n": len(pred), "accuracy": accuracy, "n_labelled": int(known.sum()) if new.has_labels else 0,
            "model_file": used, "why": why, "unfinished": unfinished}
