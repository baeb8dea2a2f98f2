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
