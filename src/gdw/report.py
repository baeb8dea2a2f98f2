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
    """Test accuracy (left) and train / meta / test loss (right) per epoch."""
    plt = _plt()
    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.plot(epochs, [100 * h["test_accuracy"] for h in history], marker="o", ms=3)
    a.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy")
    a.grid(alpha=0.3)
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


def plot_weights(weights: np.ndarray, noisy: Optional[np.ndarray], path: Path, title: str = "") -> None:
    """Histogram of per-example weights, split into clean and mislabelled
    examples when the noise mask is known."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    bins = np.linspace(float(weights.min()), float(weights.max()) + 1e-9, 41)
    if noisy is not None and noisy.any() and (~noisy).any():
        ax.hist(weights[~noisy], bins=bins, alpha=0.6, label=f"clean labels (n={int((~noisy).sum())})", density=True)
        ax.hist(weights[noisy], bins=bins, alpha=0.6, label=f"mislabelled (n={int(noisy.sum())})", density=True)
        ax.legend()
    else:
        ax.hist(weights, bins=bins, alpha=0.8, density=True)
    ax.set(xlabel="mean weight on the labelled class (last epoch)", ylabel="density", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


RESULT_FIELDS = [
    "dataset", "noise", "imbalance", "method", "seed", "final_test_accuracy", "best_test_accuracy",
    "best_epoch", "realised_noise_rate", "train_seconds", "run_dir",
]


def write_results_csv(rows: Sequence[dict], path: Path) -> None:
    """One row per finished run, columns ``RESULT_FIELDS``."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=RESULT_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)


def read_results_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ("final_test_accuracy", "best_test_accuracy", "realised_noise_rate", "train_seconds"):
            r[k] = float(r[k]) if r.get(k) not in (None, "") else math.nan
    return rows


def aggregate(rows: Sequence[dict]) -> tuple[list[str], list[str], dict]:
    """Group runs into settings (noise + imbalance) × methods.

    Returns ``(settings, methods, cells)`` where ``cells[(setting, method)]``
    is a dict with mean and std (over seeds) of the final and best test
    accuracy (fractions) and the number of seeds.
    """
    groups = defaultdict(list)
    settings, methods = [], []
    for r in rows:
        setting = r["noise"] if r["imbalance"] in ("none", "") else f"{r['noise']} + {r['imbalance']}"
        if setting not in settings:
            settings.append(setting)
        if r["method"] not in methods:
            methods.append(r["method"])
        groups[(setting, r["method"])].append(r)
    cells = {}
    for key, rs in groups.items():
        final = np.array([r["final_test_accuracy"] for r in rs], dtype=float)
        best = np.array([r["best_test_accuracy"] for r in rs], dtype=float)
        cells[key] = {
            "final_mean": final.mean(), "final_std": final.std(ddof=1) if len(final) > 1 else 0.0,
            "best_mean": best.mean(), "best_std": best.std(ddof=1) if len(best) > 1 else 0.0,
            "n": len(rs),
        }
    return settings, methods, cells


def results_markdown(rows: Sequence[dict]) -> str:
    """Markdown table: one row per method, one column per setting, mean ± std
    (over seeds) of the final test accuracy in %, the best per setting in bold."""
    settings, methods, cells = aggregate(rows)
    lines = [
        "| method | " + " | ".join(settings) + " |",
        "|---|" + "---|" * len(settings),
    ]
    best = {s: max((cells[(s, m)]["final_mean"] for m in methods if (s, m) in cells), default=None) for s in settings}
    for m in methods:
        row = []
        for s in settings:
            c = cells.get((s, m))
            if c is None:
                row.append("–")
                continue
            text = f"{100 * c['final_mean']:.2f}" + (f" ± {100 * c['final_std']:.2f}" if c["n"] > 1 else "")
            row.append(f"**{text}**" if c["final_mean"] == best[s] else text)
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    n = sorted({c["n"] for c in cells.values()})
    lines.append("")
    lines.append(
        f"Test accuracy (%), mean of the last 5 epochs, mean ± std over {', '.join(map(str, n))} seed(s); best per setting in bold."
    )
    return "\n".join(lines) + "\n"


def plot_compare(rows: Sequence[dict], path: Path, title: str = "") -> None:
    """Grouped bars: final test accuracy per setting per method, error bars = std over seeds."""
    plt = _plt()
    settings, methods, cells = aggregate(rows)
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(settings) * max(1, len(methods)) * 0.35 + 2), 4.2))
    x = np.arange(len(settings))
    for k, m in enumerate(methods):
        means = [100 * cells[(s, m)]["final_mean"] if (s, m) in cells else np.nan for s in settings]
        stds = [100 * cells[(s, m)]["final_std"] if (s, m) in cells else 0 for s in settings]
        ax.bar(x + (k - (len(methods) - 1) / 2) * width, means, width, yerr=stds, capsize=2, label=m)
    ax.set_xticks(x, settings)
    finite = [100 * c["final_mean"] for c in cells.values() if np.isfinite(c["final_mean"])]
    if finite:
        ax.set_ylim(max(0, min(finite) - 10), min(100, max(finite) + 5))
    ax.set(ylabel="test accuracy (%), last-5-epoch mean", title=title)
    ax.legend(ncol=min(4, len(methods)), fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
