"""The robustness grid: cells are trained once, shared out through lock files
and refused when their settings changed; the report's tables and acceptance
questions are computed from results.csv."""

import csv
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "robustness.py"
TINY_TABULAR = {"source": "make_classification", "train": 300, "test": 200, "features": 10, "informative": 5,
                "redundant": 2, "clusters_per_class": 1, "class_sep": 1.5, "random_state": 0}


@pytest.fixture
def rb(monkeypatch):
    spec = importlib.util.spec_from_file_location("robustness", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "REGIMES", {"digits": {"source": "digits"}, "tabular": TINY_TABULAR})
    monkeypatch.setattr(module, "META_PER_CLASS", 5)
    return module


def table_line(text, section, method):
    """The cells of ``method``'s row in the first table after ``## section``."""
    part = text.split(f"## {section}\n")[1]
    line = next(l for l in part.splitlines() if l.startswith(f"| {method} |"))
    return [c.strip() for c in line.split("|")[2:-1]]


def grid_claimed(lock):
    import grid

    return grid.claimed(lock)


def test_grid_trains_skips_and_reports_from_the_csv(rb, tmp_path, capsys):
    out, data = tmp_path / "out", tmp_path / "data"
    args = ["--datasets", "digits,tabular", "--methods", "ce,gdw", "--settings", "flip:0.4", "--seeds", "0",
            "--epochs", "1", "--out", str(out), "--data", str(data)]
    # a cell whose lock another holder has (here an open file of this process) is left to it
    import fcntl

    lock = out / ".running" / "digits__flip0.4_none_ce_s0.lock"
    lock.parent.mkdir(parents=True)
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert rb.main(args) == 0
    first = capsys.readouterr().out
    assert first.count("[shard 0/1") == 3 and "digits/flip0.4_none_ce_s0" not in first.split("# Data")[0]
    assert rb.main(args) == 0
    assert capsys.readouterr().out.split("# Data")[0].count("[shard 0/1") == 1

    summaries = sorted(out.glob("*/*/summary.json"))
    assert [p.parent.relative_to(out).as_posix() for p in summaries] == [
        "digits/flip0.4_none_ce_s0", "digits/flip0.4_none_gdw_s0",
        "tabular/flip0.4_none_ce_s0", "tabular/flip0.4_none_gdw_s0"]
    assert (data / "tabular.npz").exists()
    for lock in (out / ".running").iterdir():  # every lock released
        with grid_claimed(lock) as ours:
            assert ours
    record = json.loads((out / "tabular" / "dataset.json").read_text())
    # 300 training examples plus 5 meta examples per class; a tenth of the smallest class is fewer than 5
    assert record["train_before_meta"] == 350 and record["test"] == 200 and record["meta_per_class"] == 3
    assert json.loads((out / "digits" / "dataset.json").read_text())["meta_per_class"] == 5
    stamps = {p: p.stat().st_mtime_ns for p in summaries}

    # a second run trains nothing
    assert rb.main(args) == 0
    assert "[shard" not in capsys.readouterr().out.split("# Data")[0]
    # other settings than the finished cells' are refused, not reported under the new ones
    assert rb.main([*args[:-5], "2", *args[-4:]]) == 1
    assert "finished with epochs = 1, but the grid asks for 2" in capsys.readouterr().err
    assert stamps == {p: p.stat().st_mtime_ns for p in out.glob("*/*/summary.json")}

    # a second seed of digits' ce, made by hand, so that the tables have a mean and a std
    twin = out / "digits" / "flip0.4_none_ce_s1"
    shutil.copytree(out / "digits" / "flip0.4_none_ce_s0", twin)
    summary = json.loads((twin / "summary.json").read_text())
    summary.update(seed=1, final_test_accuracy=summary["final_test_accuracy"] - 0.05)
    (twin / "summary.json").write_text(json.dumps(summary))
    assert rb.main([*args[:6], "--seeds", "0,1", *args[8:], "--report"]) == 0
    capsys.readouterr()

    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 and {r["dataset"] for r in rows} == {"digits", "tabular"}
    assert {r["method"] for r in rows} == {"ce", "gdw"}
    text = (out / "results.md").read_text()
    means = {}
    for regime in ("digits", "tabular"):
        for method in ("ce", "gdw"):
            values = [100 * float(r["final_test_accuracy"]) for r in rows
                      if r["dataset"] == regime and r["method"] == method]
            mean = sum(values) / len(values)
            means[regime, method] = mean
            cell = table_line(text, regime, method)[0].strip("*")
            if len(values) == 1:
                assert cell == f"{mean:.2f}"
            else:
                std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
                assert cell == f"{mean:.2f} ± {std:.2f}"
        best = max(("ce", "gdw"), key=lambda m: means[regime, m])
        assert table_line(text, regime, best)[0].startswith("**")
    # the acceptance questions, from the same means
    for regime in ("digits", "tabular"):
        diff = round(means[regime, "gdw"] - means[regime, "ce"], 2)
        line = next(l for l in text.splitlines() if l.startswith(f"| {regime} | flip:0.4 | gdw − ce |"))
        assert f"| {diff:+.2f} | – | ≥ +2 | {'pass' if diff >= 2 else '**fail**'} |" in line  # one seed of ce: no SE
        line = next(l for l in text.splitlines() if l.startswith(f"| {regime} | flip:0.4 | gdw − max(l2rw, mwnet) |"))
        assert line.endswith("missing: l2rw, mwnet |")
    missing = text.split("## Missing cells")[1].split("##")[0]
    assert "- digits (1): `flip0.4_none_gdw_s1`" in missing
    assert "- tabular (2): `flip0.4_none_ce_s1`, `flip0.4_none_gdw_s1`" in missing
    assert "5 of 8 runs finished" in text
    # (--datasets is left out: digits and tabular are all the regimes of this test)
    assert (f"Command: `python benchmarks/robustness.py --methods ce,gdw --settings flip:0.4 --epochs 1 --out {out}`"
            in text)  # an --out other than the default is part of the command
    assert "Software: gdw " in text and "scikit-learn" in text
    assert (out / "accuracy.png").stat().st_size > 0
    assert "### The other cells over every seed run" not in text  # every seed run is selected

    # with seed 0 selected, the heavy cells are also judged on every seed run: digits' ce has two
    assert rb.main([*args, "--report"]) == 0
    capsys.readouterr()
    text = (out / "results.md").read_text()
    every = text.split("### The other cells over every seed run")[1].split("##")[0]
    diff = round(means["digits", "gdw"] - means["digits", "ce"], 2)
    line = next(l for l in every.splitlines() if l.startswith("| digits | flip:0.4 | gdw − ce |"))
    assert f"| {diff:+.2f} |" in line
    main_line = next(l for l in text.split("### The other cells")[0].splitlines()
                     if l.startswith("| digits | flip:0.4 | gdw − ce |"))
    ce0 = 100 * float(next(r["final_test_accuracy"] for r in rows if r["run_dir"] == "digits/flip0.4_none_ce_s0"))
    assert f"| {round(means['digits', 'gdw'] - ce0, 2):+.2f} |" in main_line


def test_acceptance_gives_the_standard_error_of_each_difference(rb):
    """± SE = sqrt(s²/n + s'²/n') of the two means compared, s the std over
    seeds (n − 1 in the denominator), worked by hand: gdw 80, 82 (s² = 2),
    l2rw 79, 80 (s² = 0.5), mwnet 60, 70, 65 (below): sqrt(2/2 + 0.5/2)."""
    rows = [{"dataset": "C", "noise": "flip:0.4", "imbalance": "none", "method": m, "seed": k,
             "final_test_accuracy": a / 100, "best_test_accuracy": a / 100}
            for m, accs in {"gdw": (80, 82), "l2rw": (79, 80), "mwnet": (60, 70, 65), "ce": (50, 50)}.items()
            for k, a in enumerate(accs)]
    got = {c["check"]: c for c in rb.acceptance(rows, ["C"], [("flip:0.4", "none")])}
    best = got["gdw − max(l2rw, mwnet)"]
    assert best["reference_method"] == "l2rw" and best["seeds"] == 2
    assert best["se"] == pytest.approx(1.25 ** 0.5)
    assert got["gdw − ce"]["se"] == pytest.approx(1.0)  # ce's two seeds agree: only gdw's spread
    assert "| +1.50 | 1.12 | ≥ -0.5 | pass |" in rb.acceptance_markdown(list(got.values()))


def test_acceptance_questions_on_hand_made_rows(rb):
    def row(regime, setting, method, final, seed=0):
        noise, _, imbalance = setting.partition("+")
        return {"dataset": regime, "noise": noise, "imbalance": imbalance or "none", "method": method,
                "seed": seed, "final_test_accuracy": final, "best_test_accuracy": final,
                "final_test_balanced_accuracy": final}  # a balanced test split: the two are the same

    rows = [
        # A, flip:0.4: gdw 80.00; l2rw 80.50, mwnet 79.00 (seeds 78, 80); ce 78.00 -> -0.50 and +2.00: both pass
        row("A", "flip:0.4", "gdw", 0.80), row("A", "flip:0.4", "l2rw", 0.805),
        row("A", "flip:0.4", "mwnet", 0.78), row("A", "flip:0.4", "mwnet", 0.80, seed=1),
        row("A", "flip:0.4", "ce", 0.78),
        # A, none + longtail:100: gdw 70.00 = ce 70.00 -> 0.00 passes
        row("A", "none+longtail:100", "gdw", 0.70), row("A", "none+longtail:100", "ce", 0.70),
        # B, flip:0.4: gdw 80.00; mwnet 80.51 -> -0.51 fails; ce 78.01 -> +1.99 fails
        row("B", "flip:0.4", "gdw", 0.80), row("B", "flip:0.4", "l2rw", 0.70),
        row("B", "flip:0.4", "mwnet", 0.8051), row("B", "flip:0.4", "ce", 0.7801),
        # B, uniform:0.4 + longtail:10 (noisy): no mwnet yet; gdw − ce = +5 passes
        row("B", "uniform:0.4+longtail:10", "gdw", 0.85), row("B", "uniform:0.4+longtail:10", "l2rw", 0.80),
        row("B", "uniform:0.4+longtail:10", "ce", 0.80),
        # B, none + longtail:100: gdw 69.99 < ce 70.00 fails
        row("B", "none+longtail:100", "gdw", 0.6999), row("B", "none+longtail:100", "ce", 0.70),
    ]
    settings = [("flip:0.4", "none"), ("none", "longtail:100"), ("uniform:0.4", "longtail:10")]
    got = {(c["regime"], c["setting"], c["check"]): c for c in rb.acceptance(rows, ["A", "B"], settings)}
    verdict = {k: (c["difference"], c["passed"]) for k, c in got.items()}
    assert verdict == {
        ("A", "flip:0.4", "gdw − max(l2rw, mwnet)"): (-0.5, True),
        ("A", "flip:0.4", "gdw − ce"): (2.0, True),
        ("A", "none + longtail:100", "gdw − ce (imbalance only)"): (0.0, True),
        ("A", "uniform:0.4 + longtail:10", "gdw − max(l2rw, mwnet)"): (None, None),
        ("A", "uniform:0.4 + longtail:10", "gdw − ce"): (None, None),
        ("B", "flip:0.4", "gdw − max(l2rw, mwnet)"): (-0.51, False),
        ("B", "flip:0.4", "gdw − ce"): (1.99, False),
        ("B", "none + longtail:100", "gdw − ce (imbalance only)"): (-0.01, False),
        ("B", "uniform:0.4 + longtail:10", "gdw − max(l2rw, mwnet)"): (None, None),
        ("B", "uniform:0.4 + longtail:10", "gdw − ce"): (5.0, True),
    }
    assert got[("A", "flip:0.4", "gdw − max(l2rw, mwnet)")]["reference_method"] == "l2rw"
    assert got[("B", "flip:0.4", "gdw − max(l2rw, mwnet)")]["reference_method"] == "mwnet"
    assert got[("B", "uniform:0.4 + longtail:10", "gdw − max(l2rw, mwnet)")]["missing"] == ["mwnet"]
    table = rb.acceptance_markdown(list(got.values()))
    assert "| B | flip:0.4 | gdw − ce | 80.00 | 78.01 (ce) | +1.99 | – | ≥ +2 | **fail** |" in table
    assert ("| A | none + longtail:100 | gdw − ce (imbalance only) | 70.00 | 70.00 (ce) | +0.00 | – | ≥ 0 | pass |"
            in table)
    assert "gdw − max(l2rw, mwnet): 1 of 2 pass, 2 not answerable yet (cells missing)" in table
    assert "gdw − ce: 2 of 3 pass, 1 not answerable yet (cells missing)" in table
    assert "gdw − ce (imbalance only): 1 of 2 pass." in table


def test_long_tail_cells_are_judged_on_balanced_accuracy_where_the_test_split_is_skewed(rb):
    """A long tail's target prior is balanced, so where the test split keeps
    a skewed prior (the reviews: 65% / 35%) the long-tail questions compare
    balanced accuracy: ce always answering the majority class has accuracy
    65% but balanced accuracy 50%; gdw 62% / 61%. The clean cell keeps both
    questions on their own metrics; a regime with a balanced test split
    keeps accuracy (older runs there did not record balanced accuracy)."""
    def row(setting, method, acc, bal, regime="reviews"):
        noise, _, imbalance = setting.partition("+")
        return {"dataset": regime, "noise": noise, "imbalance": imbalance or "none", "method": method, "seed": 0,
                "final_test_accuracy": acc, "best_test_accuracy": acc, "final_test_balanced_accuracy": bal}

    rows = [row("none+longtail:100", "gdw", 0.62, 0.61), row("none+longtail:100", "ce", 0.65, 0.50),
            row("uniform:0.4+longtail:10", "gdw", 0.58, 0.58), row("uniform:0.4+longtail:10", "ce", 0.64, 0.55),
            row("uniform:0.4+longtail:10", "l2rw", 0.59, 0.61), row("uniform:0.4+longtail:10", "mwnet", 0.63, 0.54),
            row("none", "gdw", 0.74, 0.70), row("none", "ce", 0.75, 0.72)]
    settings = [("none", "longtail:100"), ("uniform:0.4", "longtail:10"), ("none", "none")]
    assert "reviews" in rb.SKEWED_TEST and "digits" not in rb.SKEWED_TEST
    got = {(c["setting"], c["check"]): (c["difference"], c["reference_method"], c["passed"])
           for c in rb.acceptance(rows, ["reviews"], settings)}
    assert got == {
        ("none + longtail:100", "gdw − ce (imbalance only)"): (11.0, "ce", True),
        ("uniform:0.4 + longtail:10", "gdw − max(l2rw, mwnet)"): (-3.0, "l2rw", False),
        ("uniform:0.4 + longtail:10", "gdw − ce"): (3.0, "ce", True),
        ("none", "gdw − ce (clean or mild noise)"): (-1.0, "ce", False),
        ("none", "gdw − ce (clean or mild noise), balanced accuracy"): (-2.0, "ce", False),
    }
    digits = [row("none+longtail:100", "gdw", 0.62, None, "digits"), row("none+longtail:100", "ce", 0.65, None, "digits")]
    (check,) = rb.acceptance(digits, ["digits"], [("none", "longtail:100")])
    assert (check["difference"], check["passed"]) == (-3.0, False)


def test_command_line_subsets(rb):
    args = rb.parse_args(["--settings", "none+longtail:100, flip:0.4", "--methods", "gdw-paper,la"])
    assert args.settings == [("none", "longtail:100"), ("flip:0.4", "none")]
    assert rb.METHODS["gdw-paper"] == ("gdw", {"stage_one": "mwnet", "finetune_fraction": 0.0}, False)
    from gdw.methods import resolved_params  # "gdw" spells out gdw's defaults, "gdw-paper" the paper's

    assert resolved_params("gdw", rb.METHODS["gdw"][1]) == resolved_params("gdw", {})
    assert resolved_params("gdw", rb.METHODS["gdw-paper"][1]) == resolved_params("gdw", {"stage_one": "mwnet"})
    # la only under imbalance, seed 0 of everything before seed 1, cheap regimes first
    assert list(rb.cells(["tabular", "digits"], args.methods, args.settings, [0, 1])) == [
        (regime, noise, imbalance, label, seed)
        for seed in (0, 1) for regime in ("digits", "tabular")
        for noise, imbalance, label in (("flip:0.4", "none", "gdw-paper"), ("none", "longtail:100", "gdw-paper"),
                                        ("none", "longtail:100", "la"))
    ]
    assert rb.parse_args(["--seeds", "0-3,7"]).seeds == [0, 1, 2, 3, 7]
    assert rb.command_line(rb.parse_args(["--seeds", "0-39"]), rb.EPOCHS).endswith("--seeds 0-39")
    assert rb.command_line(rb.parse_args(["--seeds", "2,5"]), rb.EPOCHS).endswith("--seeds 2,5")
    for bad in (["--settings", "flip:0.2"], ["--methods", "gdw-head"], ["--datasets", "cifar10"],
                ["--seeds", "0-x"], ["--seeds", ","]):
        with pytest.raises(SystemExit):
            rb.parse_args(bad)


def test_a_failing_cell_is_reported_and_the_grid_goes_on(rb, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(rb, "REGIMES", {"digits": {"source": "digits"}})
    monkeypatch.setattr(rb, "METHODS", {**rb.METHODS, "broken": ("gdw", {"no_such_option": 1}, False)})
    monkeypatch.setattr(rb, "RUN_ORDER", ["broken", *rb.RUN_ORDER])
    out = tmp_path / "out"
    code = rb.main(["--methods", "broken,ce", "--settings", "flip:0.4", "--seeds", "0", "--epochs", "1",
                    "--out", str(out), "--data", str(tmp_path / "data")])
    captured = capsys.readouterr()
    assert code == 1
    assert "failed: digits/flip0.4_none_broken_s0: method 'gdw' has no parameter no_such_option" in captured.err
    assert (out / "digits" / "flip0.4_none_ce_s0" / "summary.json").exists()
    assert not (out / "digits" / "flip0.4_none_broken_s0").exists()
    assert "- digits (1): `flip0.4_none_broken_s0`" in (out / "results.md").read_text()


def test_readme_shows_the_committed_headline_table(rb):
    """The README's robustness table is results.md's headline table, and
    results.md's headline and overview tables are what --report computes
    from results.csv."""
    root = Path(__file__).resolve().parents[1]
    md = (root / "benchmarks" / "results" / "robustness" / "results.md").read_text()

    def table_at(marker):
        start = md.index(marker)
        return md[start: md.index("\n\n", start) + 1]

    headline, overview = table_at("| data (cells) |"), table_at("| regime · setting |")
    assert headline in (root / "README.md").read_text()
    from gdw.report import read_results_csv

    rows = read_results_csv(root / "benchmarks" / "results" / "robustness" / "results.csv")
    assert headline == rb.headline_table(rows)
    regimes = [r for r in ["digits", "tabular", "fashion-mnist-5k", "fashion-mnist-10k", "digits-plain",
                           "fashion-mnist-5k-plain", "reviews"] if any(row["dataset"] == r for row in rows)]
    assert overview == rb.overview_table(rows, regimes, rb.SETTINGS, list(rb.METHODS))


def test_a_run_is_labelled_by_the_parameters_in_effect(tmp_path):
    """grid.method_label: a run whose arguments lack a parameter added since
    (its config.json lacks it too) gets the label that spells that parameter
    out at the value the run had in effect, never one at another value."""
    import sys

    sys.path.insert(0, str(SCRIPT.parent))
    import grid
    from gdw.train import TrainConfig

    args = {"stage_one": "l2rw", "tau": 1.0}
    params = TrainConfig(dataset="digits", method="gdw", method_args=args).method_params()
    del params["class_grad"]
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"method_params": params}))
    summary = {"method": "gdw", "method_args": args, "head_only": False}
    raw = {"gdw-raw": ("gdw", {**args, "class_grad": "raw"}, False)}
    constrained = {"gdw-new": ("gdw", {**args, "class_grad": "constrained"}, False)}
    assert grid.method_label({**constrained, **raw}, summary, run) == "gdw-raw"
    assert grid.method_label(constrained, summary, run) == "gdw(stage_one=l2rw,tau=1.0)"
    assert grid.method_label({"as-run": ("gdw", dict(args), False), **raw}, summary, run) == "as-run"


def test_a_parameter_that_changed_nothing_in_a_run_takes_either_value():
    """GDW's plain_restart acts only where the early check switched to plain
    training: a run recorded before it existed matches an entry that spells
    it True when its summary shows the check kept the weighting, and only the
    entry at the value it had (False) when the check switched."""
    import sys

    sys.path.insert(0, str(SCRIPT.parent))
    import grid

    args = {"stage_one": "l2rw", "plain_below": 0.08}
    table = {"restart": ("gdw", {**args, "plain_restart": True}, False),
             "continue": ("gdw", {**args, "plain_restart": False}, False)}
    kept = {"method": "gdw", "method_args": args, "head_only": False, "early_decision": "on"}
    switched = {**kept, "early_decision": "plain"}
    assert grid.method_label(table, kept, None) == "restart"
    assert grid.method_label(table, switched, None) == "continue"
    assert grid.method_label({"restart": table["restart"]}, switched, None) == "gdw(stage_one=l2rw,plain_below=0.08)"
    # spelled by the run itself, the value counts as it is
    spelled = {**kept, "method_args": {**args, "plain_restart": False}}
    assert grid.method_label({"restart": table["restart"]}, spelled, None) == "gdw(stage_one=l2rw,plain_below=0.08,plain_restart=False)"
