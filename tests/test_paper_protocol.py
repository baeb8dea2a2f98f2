"""The paper-protocol grid runner: finished cells are skipped, and the
results table is computed from results.csv."""

import csv
import importlib.util
import json
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "paper_protocol.py"


@pytest.fixture
def protocol(monkeypatch):
    spec = importlib.util.spec_from_file_location("paper_protocol", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "SETTINGS", [("uniform:0.4", "none"), ("none", "longtail:2")])
    monkeypatch.setattr(module, "METHODS", {k: module.METHODS[k] for k in ("ce", "gdw-paper", "gdw", "cb")})
    return module


def test_grid_skips_finished_cells_and_tabulates_the_csv(protocol, tmp_path, capsys):
    args = ["--dataset", "digits", "--meta-per-class", "10", "--epochs", "1", "--seeds", "0,1", "--out", str(tmp_path)]
    protocol.main(args)
    first = capsys.readouterr().out
    summaries = sorted(tmp_path.glob("*/summary.json"))
    # 2 settings × (ce, gdw-paper, gdw) × 2 seeds, plus cb in the long-tail setting
    assert len(summaries) == 14 and first.count("] ") == 14
    assert (tmp_path / "uniform0.4_none_gdw-paper_s0").is_dir() and (tmp_path / "uniform0.4_none_gdw_s0").is_dir()
    for cell, method_args in (("uniform0.4_none_gdw-paper_s1", {"stage_one": "mwnet"}),
                              ("uniform0.4_none_gdw_s1", {"stage_one": "l2rw", "finetune_fraction": 0.2, "tau": 1.0,
                                                          "meta_grad": "fd", "weight_norm": "kept",
                                                          "class_grad": "constrained", "max_weight": 1.0,
                                                          "finetune_min_noise": 0.0, "plain_below": 0.0,
                                                          "plain_restart": False, "raw_factor": 0.0, "plain_epochs": "left",
                   "unchecked_meta": "weight", "meta_prior": "model"})):
        config = json.loads((tmp_path / cell / "config.json").read_text())
        assert config["method"] == "gdw" and config["method_args"] == method_args
    stamps = {p: p.stat().st_mtime_ns for p in summaries}

    protocol.main(args)
    second = capsys.readouterr().out
    assert "] " not in second.split("| method")[0]  # no cell was run again
    assert stamps == {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/summary.json")}

    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 14
    assert [r["method"] for r in rows if r["noise"] == "uniform:0.4" and r["seed"] == "0"] == ["ce", "gdw-paper", "gdw"]
    text = (tmp_path / "results.md").read_text()
    final_table, best_table = text.split("The best epoch")
    for method in ("ce", "gdw-paper", "gdw"):
        for table, column in ((final_table, "final_test_accuracy"), (best_table, "best_test_accuracy")):
            values = [float(r[column]) for r in rows if r["method"] == method and r["noise"] == "uniform:0.4"]
            mean = 100 * sum(values) / len(values)
            line = next(l for l in table.splitlines() if l.startswith(f"| {method} |"))
            assert f"{mean:.2f}" in line.split("|")[2]
    assert "Command: `python benchmarks/paper_protocol.py --dataset digits --epochs 1" in text
    assert "none + longtail:2:" in text  # class sizes of the imbalanced setting
    # many-shot / few-shot accuracy of the imbalanced setting, also from the CSV
    split_table = text.split("Under imbalance")[1].split("The best epoch")[0]
    for method in ("ce", "gdw-paper", "gdw", "cb"):
        rs = [r for r in rows if r["method"] == method and r["imbalance"] == "longtail:2"]
        many = 100 * sum(float(r["many_shot_accuracy"]) for r in rs) / len(rs)
        few = 100 * sum(float(r["few_shot_accuracy"]) for r in rs) / len(rs)
        line = next(l for l in split_table.splitlines() if l.startswith(f"| {method} |"))
        assert line.split("|")[2].strip() == f"{many:.1f} / {few:.1f}"
    assert all(r["many_shot_accuracy"] == "" for r in rows if r["imbalance"] == "none")
    assert (tmp_path / "accuracy.png").stat().st_size > 0
    assert "ran as `gdw`" not in text  # no relabelled cells here


def test_processes_share_the_grid_through_lock_files(protocol, tmp_path, monkeypatch, capsys):
    """A cell whose lock a live process holds is left to it; a lock file
    nobody holds (its process is gone) is taken; every lock is free at the end."""
    import subprocess
    import sys

    sys.path.insert(0, str(SCRIPT.parent))
    import grid

    monkeypatch.setattr(protocol, "SETTINGS", [("uniform:0.4", "none")])
    monkeypatch.setattr(protocol, "METHODS", {"ce": ("ce", {}, False)})
    locks = tmp_path / ".running"
    locks.mkdir()
    held, left = locks / "uniform0.4_none_ce_s0.lock", locks / "uniform0.4_none_ce_s1.lock"
    left.write_text("")  # a lock file whose process is gone holds no lock
    live = subprocess.Popen([sys.executable, "-c", f"import fcntl, sys, time; f = open({str(held)!r}, 'a'); "
                             "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)"],
                            stdout=subprocess.PIPE, text=True)
    assert live.stdout.readline().strip() == "held"
    try:
        protocol.main(["--dataset", "digits", "--meta-per-class", "10", "--epochs", "1", "--seeds", "0,1",
                       "--out", str(tmp_path)])
    finally:
        live.kill()
        live.wait()
    assert not (tmp_path / "uniform0.4_none_ce_s0" / "summary.json").exists()
    assert (tmp_path / "uniform0.4_none_ce_s1" / "summary.json").exists()
    # once the owner is gone, the next pass trains the cell it had locked
    protocol.main(["--dataset", "digits", "--meta-per-class", "10", "--epochs", "1", "--seeds", "0,1",
                   "--out", str(tmp_path)])
    assert (tmp_path / "uniform0.4_none_ce_s0" / "summary.json").exists()
    for lock in locks.iterdir():
        with grid.claimed(lock) as ours:
            assert ours


def test_the_grid_of_the_paper_protocol():
    """Every method in every setting, the long-tail baselines only with
    imbalance, gdw-jvp only in the three balanced noisy settings it is
    checked on: 134 cells for two seeds."""
    spec = importlib.util.spec_from_file_location("paper_protocol_cells", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cells = list(module.cells([0, 1]))
    assert len(cells) == 134 and len(set(cells)) == 134
    per_setting = {}
    for noise, imbalance, label, seed in cells:
        per_setting.setdefault((noise, imbalance), []).append(label)
    common = ["ce", "finetune", "l2rw", "mwnet", "dm", "gdw-paper", "gdw-paper-head", "gdw-raw", "gdw", "gdw-uncapped"]
    for (noise, imbalance), labels in per_setting.items():
        checked = {("uniform:0.4", "none"), ("uniform:0.6", "none"), ("flip:0.4", "none")}
        extra = (["gdw-jvp"] if (noise, imbalance) in checked else []) + (
            ["cb", "la"] if imbalance != "none" else [])
        assert labels == [m for m in common + extra for _ in (0, 1)]
    assert module.METHODS["gdw-paper"] == ("gdw", {"stage_one": "mwnet"}, False)
    assert module.METHODS["gdw-paper-head"] == ("gdw", {"stage_one": "mwnet"}, True)
    default = {"stage_one": "l2rw", "finetune_fraction": 0.2, "tau": 1.0, "meta_grad": "fd", "weight_norm": "kept",
               "class_grad": "constrained", "max_weight": 1.0, "finetune_min_noise": 0.0, "plain_below": 0.0,
               "plain_restart": False, "raw_factor": 0.0, "plain_epochs": "left",
                   "unchecked_meta": "weight", "meta_prior": "model"}  # the default as they ran (added since
    # spelled out at what they were then)
    assert module.METHODS["gdw"] == ("gdw", default, False)
    assert module.METHODS["gdw-uncapped"] == ("gdw", {**default, "max_weight": math.inf}, False)
    assert module.METHODS["gdw-raw"] == ("gdw", {**default, "class_grad": "raw", "max_weight": math.inf}, False)
    assert module.METHODS["gdw-jvp"] == ("gdw", {**default, "meta_grad": "jvp"}, False)
    from gdw.methods import resolved_params  # "gdw" spells out gdw's defaults

    assert (resolved_params("gdw", {**default, "finetune_min_noise": 0.04, "meta_prior": "meta",
                                    "max_weight": "auto", "plain_below": 0.08, "plain_restart": True,
                                    "raw_factor": 2.0, "unchecked_meta": "ce"})
            == resolved_params("gdw", {}))
    # a run is labelled by its method, arguments and head_only; one that is in no entry keeps its arguments
    label = module.method_label
    assert label({"method": "gdw", "method_args": {"stage_one": "mwnet"}, "head_only": True}, None) == "gdw-paper-head"
    assert label({"method": "gdw", "method_args": {}, "head_only": False}, None) == "gdw"
    assert label({"method": "gdw", "method_args": {"stage_one": "l2rw"}}, None) == "gdw(stage_one=l2rw)"


def _protocol_module():
    spec = importlib.util.spec_from_file_location("paper_protocol_labels", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_results_cover_the_grid_under_their_labels():
    """results.csv, the committed summary of the Fashion-MNIST grid (its run
    folders are rebuilt by the script, not committed): one row per cell of the
    grid, each cell named after its label."""
    from gdw.compare import cell_name

    module = _protocol_module()
    out = SCRIPT.parent / "results" / "fashion_mnist"
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        assert r["run_dir"] == cell_name(r["noise"], r["imbalance"], r["method"], int(r["seed"]))
    assert {r["run_dir"] for r in rows} == {cell_name(*c) for c in module.cells([0, 1])}
    assert "ran as `gdw` and `gdw-head`" in (out / "results.md").read_text()
    assert (out / "gdw_weights.png").exists() and (out / "accuracy.png").exists()


def test_run_folders_carry_their_labels():
    """Where the grid's run folders are (after running the script): each is
    named after the label its method, arguments and head_only have in
    ``METHODS``, and the paper-mode cells made before the stage_one option
    are relabelled."""
    from gdw.compare import cell_name

    module = _protocol_module()
    out = SCRIPT.parent / "results" / "fashion_mnist"
    paths = sorted(out.glob("*/summary.json"))
    if not paths:
        pytest.skip("the grid's run folders are not in the repository; benchmarks/paper_protocol.py rebuilds them")
    found = {}
    for path in paths:
        summary = json.loads(path.read_text())
        label = module.method_label(summary, path.parent)
        assert path.parent.name == cell_name(summary["noise"], summary["imbalance"], label, summary["seed"])
        found[path.parent.name] = label
    old = module.relabelled_cells(out)
    assert len(old) == 24 and {found[name] for name in old} == {"gdw-paper", "gdw-paper-head"}


def test_many_and_few_shot_accuracy_by_hand(protocol, tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps(
        {"imbalance": "longtail:5", "data": {"counts": {"train_true": [5, 1, 3, 2]}}}))
    epochs = [[0.0, 0.0, 0.0, 0.0]] * 3 + [[0.9, 0.1, 0.7, 0.3], [0.7, 0.3, 0.5, 0.1]] * 2 + [[0.8, 0.2, 0.6, 0.2]]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"per_class_test_accuracy": a}) + "\n" for a in epochs))
    # last 5 epochs: per class 0.8, 0.2, 0.6, 0.2; most examples: classes 0 and 2, fewest: 3 and 1
    got = protocol.head_tail_accuracy(tmp_path)
    assert got == pytest.approx({"many_shot_accuracy": 0.7, "few_shot_accuracy": 0.2})
    (tmp_path / "config.json").write_text(json.dumps({"imbalance": "none"}))
    assert protocol.head_tail_accuracy(tmp_path) == {}


def test_readme_shows_the_committed_results_table():
    """docs/results.md's Fashion-MNIST table is the first table of the committed results.md."""
    root = SCRIPT.parents[1]

    def first_table(text):
        lines = text.splitlines()
        start = next(i for i, l in enumerate(lines) if l.startswith("| method |"))
        end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
        return lines[start:end]

    results = (root / "benchmarks" / "results" / "fashion_mnist" / "results.md").read_text()
    readme = (root / "docs" / "results.md").read_text()  # the table moved there from README.md
    section = readme[readme.index("## Results on Fashion-MNIST"):]
    assert first_table(section) == first_table(results)
    assert "134 of 134 runs finished" in results
