"""The results table: hand-made runs, means and stds worked out by hand."""

import pytest

from gdw.report import results_markdown


def run(method, seed, final, best, noise="uniform:0.4", imbalance="none"):
    return {"method": method, "seed": seed, "noise": noise, "imbalance": imbalance,
            "final_test_accuracy": final, "best_test_accuracy": best}


ROWS = [
    run("ce", 0, 0.80, 0.85), run("ce", 1, 0.82, 0.83),
    run("gdw", 0, 0.86, 0.87), run("gdw", 1, 0.88, 0.89),
    run("ce", 0, 0.70, 0.90, noise="none", imbalance="longtail:10"),
]


def line(table, method):
    return [c.strip() for c in next(l for l in table.splitlines() if l.startswith(f"| {method} |")).split("|")[2:-1]]


def test_final_and_best_tables():
    final = results_markdown(ROWS)
    assert "| method | uniform:0.4 | none + longtail:10 |" in final
    # mean 81, sample std of (80, 82) = sqrt(2) = 1.41
    assert line(final, "ce") == ["81.00 ± 1.41", "**70.00**"]
    assert line(final, "gdw") == ["**87.00 ± 1.41**", "–"]
    assert "last 5 epochs" in final
    best = results_markdown(ROWS, metric="best")
    assert line(best, "ce") == ["84.00 ± 1.41", "**90.00**"]
    assert line(best, "gdw") == ["**88.00 ± 1.41**", "–"]
    assert "best epoch" in best


def test_unknown_metric():
    with pytest.raises(ValueError, match="metric"):
        results_markdown(ROWS, metric="median")


def val_run(method, setting, val, test, n_val=10):
    return {**run(method, 0, test, test, noise=setting), "best_val_accuracy": val,
            "test_accuracy_at_best_val": test, "n_val": n_val}


def test_a_tie_on_validation_picks_no_method():
    from gdw.report import validation_markdown

    table = validation_markdown([
        val_run("ce", "uniform:0.4", 1.0, 0.80), val_run("gdw", "uniform:0.4", 1.0, 0.90),
        val_run("mwnet", "uniform:0.4", 0.9, 0.85),
        val_run("ce", "flip:0.4", 0.7, 0.70), val_run("gdw", "flip:0.4", 0.8, 0.75),
    ])
    rows = {tuple(c.strip() for c in l.split("|")[1:3]): l.split("|")[5].strip()
            for l in table.splitlines() if l.startswith("| uniform") or l.startswith("| flip")}
    assert rows == {("uniform:0.4", "ce"): "tie: no pick", ("uniform:0.4", "gdw"): "tie: no pick",
                    ("uniform:0.4", "mwnet"): "", ("flip:0.4", "ce"): "", ("flip:0.4", "gdw"): "← pick"}
    assert "10 validation examples a run" in table


def test_weights_plot_clips_outliers_and_shows_each_group(tmp_path, monkeypatch):
    """A few weights of 38 no longer stretch the axis, and clean and
    mislabelled examples are drawn in panels of their own."""
    import matplotlib.figure
    import numpy as np

    from gdw.report import plot_weights

    figures = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: figures.append(self))
    rng = np.random.default_rng(0)
    weights = np.concatenate([rng.uniform(0.6, 0.9, 897), [38.0, 38.0, 38.0], rng.uniform(0.1, 0.3, 100)])
    noisy = np.arange(1000) >= 900
    lo, hi = plot_weights(weights, noisy, tmp_path / "w.png")
    assert lo == weights.min() and 0.85 < hi < 0.9  # the 99th percentile lies in the clean bulk, far below 38
    top, bottom = figures[0].axes
    assert top.get_title() == f"clean labels: n=900, mean {weights[:900].mean():.3f}"
    assert bottom.get_title() == f"mislabelled: n=100, mean {weights[900:].mean():.3f}"
    assert top.get_xlim()[1] < 1
    assert sum(p.get_height() for p in top.patches) == 900 and sum(p.get_height() for p in bottom.patches) == 100
    assert "above" in bottom.get_xlabel()
