"""Reports: plots of one run, and the table and plot of a comparison grid."""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history: Sequence[dict], path: Path, title: str = "") -> None:
    """Test (and validation) accuracy (left) and train / meta / test loss
    (right) per epoch; the fine-tuning epochs shaded, and a dotted line
    where a GDW run started again from its initial weights."""
    plt = _plt()
    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.plot(epochs, [100 * h["test_accuracy"] for h in history], marker="o", ms=3, label="test")
    if any("val_accuracy" in h for h in history):
        a.plot(epochs, [100 * h.get("val_accuracy", math.nan) for h in history], marker="s", ms=3, label="validation")
    a.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    a.grid(alpha=0.3)
    tuned = [h["epoch"] for h in history if h.get("finetuning")]
    restart = [h["epoch"] for h in history if h.get("early_restart")]  # GDW's plain_restart (gdw.recorder)
    for ax in (a, b):
        if tuned:
            ax.axvspan(min(tuned) - 0.5, max(tuned) + 0.5, color="0.85", zorder=0, label="fine-tuning on the meta set")
        if restart:
            ax.axvline(restart[0] - 0.5, color="0.4", ls=":", lw=1,
                       label="restart: plain training (labels look clean)")
    a.legend(fontsize=8)
    b.plot(epochs, [h["train_loss"] for h in history], label="train (noisy labels)")
    if any(h.get("meta_loss") is not None for h in history):
        b.plot(epochs, [h.get("meta_loss") or math.nan for h in history], label="meta (after virtual step)")
    b.plot(epochs, [h["test_loss"] for h in history], label="test")
    b.set(xlabel="epoch", ylabel="cross-entropy", title="losses")
    b.legend()
    b.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_weights(weights: np.ndarray, noisy: Optional[np.ndarray], path: Path, title: str = "") -> tuple[float, float]:
    """Histograms of the per-example weights (N,): one panel for the clean and
    one for the mislabelled examples when the noise mask (N,) is known, each
    with its mean marked. The x-axis ends at the 99th percentile, weights
    above it counted in the last bin, so that a few outliers do not squash
    the rest. Returns the axis' range ``(lo, hi)``."""
    plt = _plt()
    lo, hi = float(weights.min()), float(np.quantile(weights, 0.99))
    bins = np.linspace(lo, hi + 1e-9, 41)
    both = noisy is not None and noisy.any() and (~noisy).any()
    groups = [("clean labels", ~noisy), ("mislabelled", noisy)] if both else [("all examples", slice(None))]
    fig, axes = plt.subplots(len(groups), 1, figsize=(6, 1.6 + 1.7 * len(groups)), sharex=True, squeeze=False)
    for ax, (name, mask) in zip(axes[:, 0], groups):
        w = weights[mask]
        ax.hist(np.clip(w, lo, hi), bins=bins, alpha=0.8)
        ax.axvline(float(w.mean()), color="k", ls="--", lw=1)
        ax.set(ylabel="examples", title=f"{name}: n={len(w)}, mean {w.mean():.3f}")
    above = int((weights > hi).sum())
    axes[-1, 0].set_xlabel("mean weight on the labelled class (last epoch)"
                           + (f"; {above} above {hi:.3g} counted at {hi:.3g}" if above else ""))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return lo, hi


RESULT_FIELDS = ["dataset", "noise", "imbalance", "method", "seed", "final_test_accuracy",
                 "final_test_balanced_accuracy", "best_test_accuracy", "best_epoch", "realised_noise_rate",
                 "train_seconds", "run_dir"]


def write_results_csv(rows: Sequence[dict], path: Path, extra_fields: Sequence[str] = ()) -> None:
    """One row per finished run, columns ``RESULT_FIELDS`` then ``extra_fields``
    (empty where a row lacks one)."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*RESULT_FIELDS, *extra_fields], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def read_results_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ("final_test_accuracy", "final_test_balanced_accuracy", "best_test_accuracy", "realised_noise_rate",
                  "train_seconds"):
            r[k] = float(r[k]) if r.get(k) not in (None, "") else math.nan
    return rows


def setting_label(noise: str, imbalance: str) -> str:
    """The column name of a setting: ``"uniform:0.4"``, or ``"none + longtail:100"``
    when there is imbalance."""
    return noise if imbalance in ("none", "") else f"{noise} + {imbalance}"


def aggregate(rows: Sequence[dict], extra: Sequence[str] = ()) -> tuple[list[str], list[str], dict]:
    """Group runs into settings (noise + imbalance) × methods.

    Returns ``(settings, methods, cells)`` where ``cells[(setting, method)]``
    is a dict with mean and std (over seeds) of the final and best test
    accuracy and the final balanced accuracy (fractions; keys ``final_mean``,
    ``final_std``, ``best_mean``, ``best_std``, ``balanced_mean``,
    ``balanced_std``: NaN for runs that did not record it),
    ``NAME_mean`` / ``NAME_std`` for each column NAME in
    ``extra``, and the number of seeds ``n``.
    """
    groups = defaultdict(list)
    for r in rows:
        groups[(setting_label(r["noise"], r["imbalance"]), r["method"])].append(r)
    settings, methods = (list(dict.fromkeys(key[i] for key in groups)) for i in (0, 1))  # in order of appearance
    columns = {"final": "final_test_accuracy", "best": "best_test_accuracy",
               "balanced": "final_test_balanced_accuracy", **{name: name for name in extra}}
    cells = {}
    for key, rs in groups.items():
        cells[key] = {"n": len(rs)}
        for name, column in columns.items():
            values = np.array([r.get(column, math.nan) for r in rs], dtype=float)
            cells[key][f"{name}_mean"] = values.mean()
            cells[key][f"{name}_std"] = values.std(ddof=1) if len(values) > 1 else 0.0
    return settings, methods, cells


LAST = "mean of the last 5 epochs (of every epoch, in a shorter run)"
METRICS = {"final": f"Test accuracy, {LAST}", "best": "Test accuracy, best epoch",
           "balanced": f"Test balanced accuracy (mean of the per-class accuracies), {LAST}"}


def results_markdown(rows: Sequence[dict], metric: str = "final") -> str:
    """Markdown table: one row per method, one column per setting, mean ± std
    (over seeds) of the test accuracy in %, the best per setting in bold.

    ``metric="final"`` is the mean test accuracy of the last 5 epochs (the
    papers' main number); ``metric="best"`` the highest test accuracy of any
    epoch; ``metric="balanced"`` the mean balanced accuracy (the mean of the
    per-class accuracies) of the last 5 epochs. Raises ValueError for
    another ``metric``.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(map(repr, METRICS))}, not {metric!r}")
    settings, methods, cells = aggregate(rows)
    mean, std = f"{metric}_mean", f"{metric}_std"
    lines = ["| method | " + " | ".join(settings) + " |", "|---|" + "---|" * len(settings)]
    best = {s: max((cells[(s, m)][mean] for m in methods if (s, m) in cells), default=None) for s in settings}
    for m in methods:
        row = []
        for s in settings:
            c = cells.get((s, m))
            if c is None:
                row.append("–")
                continue
            text = f"{100 * c[mean]:.2f}" + (f" ± {100 * c[std]:.2f}" if c["n"] > 1 else "")
            row.append(f"**{text}**" if c[mean] == best[s] else text)
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    n = sorted({c["n"] for c in cells.values()})
    lines += ["", f"{METRICS[metric]} (%), mean ± std over {', '.join(map(str, n))} seed(s); "
                  "best per setting in bold."]
    return "\n".join(lines) + "\n"


VAL_FIELDS = ["best_val_accuracy", "best_val_epoch", "test_accuracy_at_best_val", "n_val"]


def validation_markdown(rows: Sequence[dict]) -> str:
    """How to choose without looking at the test set: per setting, each
    method's best validation accuracy (mean over seeds) and the test accuracy
    at that epoch; the one method with the highest validation accuracy is
    the pick (marked ←); methods tied at the highest are marked as a tie and
    none is picked. The footer gives the validation split's size (rows'
    ``n_val``, examples). Empty when a run has no validation split."""
    if not rows or any(r.get("best_val_accuracy") in (None, "") for r in rows):
        return ""
    settings, methods, cells = aggregate(rows, extra=("best_val_accuracy", "test_accuracy_at_best_val"))
    lines = ["| setting | method | validation accuracy | test accuracy at that epoch | |", "|---|---|---|---|---|"]
    for s in settings:
        here = [m for m in methods if (s, m) in cells]
        best = max(cells[(s, m)]["best_val_accuracy_mean"] for m in here)
        top = [m for m in here if cells[(s, m)]["best_val_accuracy_mean"] == best]
        for m in here:
            c = cells[(s, m)]
            mark = "" if m not in top else "← pick" if len(top) == 1 else "tie: no pick"
            lines.append(f"| {s} | {m} | {100 * c['best_val_accuracy_mean']:.2f} | "
                         f"{100 * c['test_accuracy_at_best_val_mean']:.2f} | {mark} |")
    sizes = sorted({int(r["n_val"]) for r in rows if r.get("n_val") not in (None, "")})
    lines += ["", "Each run's epoch is chosen on its validation split (mean over seeds"
              + (f"; {' or '.join(map(str, sizes))} validation examples a run" if sizes else "")
              + "); the pick is the method with the highest validation accuracy, chosen without the test set, "
              "and none when methods tie."]
    return "\n".join(lines) + "\n"


def bar_panel(ax, means: np.ndarray, stds: np.ndarray, colors, *, width: float = 0.75, margin=(3, 2),
              value_size: float = 7, missing=None, **bar_kw) -> np.ndarray:
    """One panel of grouped bars, a bar per method at its place: ``means`` and
    ``stds`` in % (NaN: not finished), the value above each error bar,
    "missing" where ``missing[k]`` and no value; the y-range fitted to the
    bars (``margin`` points below / above), so small differences stay
    visible. Returns the bars' x positions."""
    x = np.arange(len(means))
    ok = np.isfinite(means)
    ax.bar(x[ok], means[ok], width, yerr=stds[ok], capsize=2, color=[c for c, o in zip(colors, ok) if o], **bar_kw)
    if ok.any():  # room for the error bars and the values above them
        ax.set_ylim(max(0.0, (means - stds)[ok].min() - margin[0]), min(100.0, (means + stds)[ok].max() + margin[1]))
    for k in range(len(means)):
        if ok[k]:
            ax.text(k, means[k] + stds[k], f"{means[k]:.1f}", ha="center", va="bottom", fontsize=value_size)
        elif missing is not None and missing[k]:
            ax.text(k, 0.03, "missing", rotation=90, ha="center", va="bottom", fontsize=value_size + 0.5,
                    color="gray", transform=ax.get_xaxis_transform())
    ax.grid(axis="y", alpha=0.3)
    return x


def plot_compare(rows: Sequence[dict], path: Path, title: str = "") -> None:
    """Grouped bars: one panel per setting, one bar per method (the same colour
    in every panel), height = mean over seeds of the final test accuracy,
    error bar = std over seeds. Each panel has its own y-range, so small
    differences stay visible when settings differ by tens of points."""
    plt = _plt()
    settings, methods, cells = aggregate(rows)
    ncols = min(3, len(settings))
    nrows = math.ceil(len(settings) / ncols)
    width = max(4.5, 0.45 * len(methods) + 1.2)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, 3.4 * nrows + 0.9), squeeze=False,
                             layout="constrained")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, s in zip(axes.flat, settings):
        means = np.array([100 * cells[(s, m)]["final_mean"] if (s, m) in cells else np.nan for m in methods])
        stds = np.array([100 * cells[(s, m)]["final_std"] if (s, m) in cells else 0.0 for m in methods])
        x = bar_panel(ax, means, stds, [colors[k % len(colors)] for k in range(len(methods))], margin=(3, 2))
        ax.set_xticks(x, methods, rotation=40, ha="right", fontsize=8)
        ax.set_title(s, fontsize=10)
    for ax in axes.flat[len(settings):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("test accuracy (%),\nlast-5-epoch mean")
    subtitle = "mean over seeds; error bars: std over seeds"
    fig.suptitle(f"{title}\n{subtitle}" if title else subtitle, fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
