"""benchmarks/noise_estimate.py's report on hand-made cells."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_report_counts_estimates_within_three_points_and_good_flagged_sets(tmp_path):
    ne = pytest.importorskip("noise_estimate")
    cell = lambda tool, est, p, r, a: {"regime": "digits", "noise": "uniform:0.1", "tool": tool,  # noqa: E731
                                       "true_rate": 0.10, "estimate": est, "auroc": a, "precision": p,
                                       "recall": r, "seconds": 1.0}
    (tmp_path / "digits_uniform0.1.json").write_text(json.dumps([cell("gdw (1 run)", 0.12, 0.9, 0.86, 0.99),
                                                                 cell("cleanlab (5-fold CE)", 0.14, 0.9, 0.9, 0.94)]))
    (tmp_path / "digits_flip0.1.json").write_text(json.dumps([{**cell("gdw (1 run)", 0.131, 0.8, 0.9, 0.96),
                                                               "noise": "flip:0.1"}]))
    text = ne.main(["--out", str(tmp_path), "--report"]) == 0 and (tmp_path / "results.md").read_text()
    assert "| digits | uniform:0.1 | 10.0 | gdw (1 run) | 12.0 | +2.0 | 0.900 | 0.860 | 0.990 | 1 |" in text
    # gdw: |+2.0| ≤ 3 yes, |+3.1| no; AUROC ≥ 0.95 in both, precision and recall ≥ 0.85 only in the first
    assert ("- gdw (1 run): estimate within 3 points in 1 of 2 cells (largest error 3.1); where AUROC ≥ 0.95 "
            "(2 cells) precision and recall ≥ 0.85 in 1.") in text
    assert "- cleanlab (5-fold CE): estimate within 3 points in 0 of 1 cells" in text
    assert (tmp_path / "results.csv").read_text().count("\n") == 4


def test_two_class_regimes_skip_the_flips_that_repeat_uniform_noise_and_caveats_are_marked(tmp_path):
    """On two classes flip:r changes the rows uniform:2r does: the reviews' flip:0.1 and flip:0.2 are not
    cells, and a row read from an older file for them is left out; a run whose summary carried the caveat
    gets a dagger."""
    ne = pytest.importorskip("noise_estimate")
    reviews = [n for r, n in ne.cells() if r == "reviews"]
    assert reviews == ["uniform:0.05", "uniform:0.1", "uniform:0.2", "uniform:0.4", "flip:0.4"]
    assert [n for r, n in ne.cells() if r == "digits"] == ne.NOISES
    row = {"regime": "reviews", "tool": "gdw (1 run)", "true_rate": 0.05, "estimate": 0.19, "caveat": True,
           "auroc": 0.7, "precision": 0.1, "recall": 0.4, "seconds": 1.0}
    (tmp_path / "reviews_uniform0.1.json").write_text(json.dumps([{**row, "noise": "uniform:0.1"}]))
    (tmp_path / "reviews_flip0.1.json").write_text(json.dumps([{**row, "noise": "flip:0.1"}]))
    assert ne.main(["--out", str(tmp_path), "--report"]) == 0
    text = (tmp_path / "results.md").read_text()
    assert "| reviews | uniform:0.1 | 5.0 | gdw (1 run) | 19.0 † | +14.0 |" in text
    assert "| reviews | flip:0.1 |" not in text
    assert "estimate within 3 points in 0 of 1 cells" in text


def test_runs_switched_to_plain_training_show_the_checks_estimate(tmp_path):
    """The section on runs the early check switched: one row per run, and the mean absolute error of the
    end-of-run count and of the check's estimate."""
    ne = pytest.importorskip("noise_estimate")
    row = {"regime": "digits", "tool": "gdw (1 run)", "auroc": 0.99, "seconds": 1.0, "caveat": False}
    (tmp_path / "digits_flip0.05.json").write_text(json.dumps([
        {**row, "noise": "flip:0.05", "true_rate": 0.05, "estimate": 0.035, "precision": 1.0, "recall": 0.7,
         "switched": True, "switch_estimate": 0.07}]))
    (tmp_path / "digits_uniform0.05.json").write_text(json.dumps([
        {**row, "noise": "uniform:0.05", "true_rate": 0.04, "estimate": 0.03, "precision": 1.0, "recall": 0.75,
         "switched": True, "switch_estimate": 0.06}]))
    (tmp_path / "digits_uniform0.1.json").write_text(json.dumps([
        {**row, "noise": "uniform:0.1", "true_rate": 0.09, "estimate": 0.09, "precision": 0.9, "recall": 0.9,
         "switched": False, "switch_estimate": None}]))
    assert ne.main(["--out", str(tmp_path), "--report"]) == 0
    section = (tmp_path / "results.md").read_text().split("### Runs switched to plain training")[1]
    assert "| digits | uniform:0.05 | 4.0 | 3.0 | 1.000 | 0.750 | 6.0 |" in section
    assert "| digits | flip:0.05 | 5.0 | 3.5 | 1.000 | 0.700 | 7.0 |" in section
    assert "uniform:0.1" not in section
    assert "Over 2 runs: mean absolute error 1.2 points at the end, 2.0 for the check's estimate." in section
