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
