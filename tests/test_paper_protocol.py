"""The paper-protocol grid runner: finished cells are skipped, and the
results table is computed from results.csv."""

import csv
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "paper_protocol.py"


@pytest.fixture
def protocol(monkeypatch):
    spec = importlib.util.spec_from_file_location("paper_protocol", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "SETTINGS", [("uniform:0.4", "none"), ("none", "longtail:2")])
    monkeypatch.setattr(module, "METHODS", ["ce", "gdw"])
    return module


def test_grid_skips_finished_cells_and_tabulates_the_csv(protocol, tmp_path, capsys):
    args = ["--dataset", "digits", "--meta-per-class", "10", "--epochs", "1", "--seeds", "0,1", "--out", str(tmp_path)]
    protocol.main(args)
    first = capsys.readouterr().out
    summaries = sorted(tmp_path.glob("*/summary.json"))
    # 2 settings × (ce, gdw) × 2 seeds, plus cb in the long-tail setting
    assert len(summaries) == 10 and first.count("] ") == 10
    stamps = {p: p.stat().st_mtime_ns for p in summaries}

    protocol.main(args)
    second = capsys.readouterr().out
    assert "] " not in second.split("| method")[0]  # no cell was run again
    assert stamps == {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/summary.json")}

    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 10
    text = (tmp_path / "results.md").read_text()
    final_table, best_table = text.split("The best epoch")
    for method in ("ce", "gdw"):
        for table, column in ((final_table, "final_test_accuracy"), (best_table, "best_test_accuracy")):
            values = [float(r[column]) for r in rows if r["method"] == method and r["noise"] == "uniform:0.4"]
            mean = 100 * sum(values) / len(values)
            line = next(l for l in table.splitlines() if l.startswith(f"| {method} |"))
            assert f"{mean:.2f}" in line.split("|")[2]
    assert "Command: `python benchmarks/paper_protocol.py --dataset digits --epochs 1" in text
    assert "none + longtail:2:" in text  # class sizes of the imbalanced setting
    # many-shot / few-shot accuracy of the imbalanced setting, also from the CSV
    split_table = text.split("Under imbalance")[1].split("The best epoch")[0]
    for method in ("ce", "gdw", "cb"):
        rs = [r for r in rows if r["method"] == method and r["imbalance"] == "longtail:2"]
        many = 100 * sum(float(r["many_shot_accuracy"]) for r in rs) / len(rs)
        few = 100 * sum(float(r["few_shot_accuracy"]) for r in rs) / len(rs)
        line = next(l for l in split_table.splitlines() if l.startswith(f"| {method} |"))
        assert line.split("|")[2].strip() == f"{many:.1f} / {few:.1f}"
    assert all(r["many_shot_accuracy"] == "" for r in rows if r["imbalance"] == "none")
    assert (tmp_path / "accuracy.png").stat().st_size > 0


def test_processes_share_the_grid_through_lock_files(protocol, tmp_path, monkeypatch, capsys):
    """A cell locked by a live process is left to it; a lock whose process is
    gone is taken over; the lock is removed when the cell is done."""
    import json
    import socket
    import subprocess
    import sys

    monkeypatch.setattr(protocol, "SETTINGS", [("uniform:0.4", "none")])
    monkeypatch.setattr(protocol, "METHODS", ["ce"])
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    locks = tmp_path / ".running"
    locks.mkdir()
    host = socket.gethostname()
    (locks / "uniform0.4_none_ce_s0.lock").write_text(json.dumps({"host": host, "pid": live.pid}))
    (locks / "uniform0.4_none_ce_s1.lock").write_text(json.dumps({"host": host, "pid": gone.pid}))
    try:
        protocol.main(["--dataset", "digits", "--meta-per-class", "10", "--epochs", "1", "--seeds", "0,1",
                       "--out", str(tmp_path)])
    finally:
        live.kill()
        live.wait()
    assert not (tmp_path / "uniform0.4_none_ce_s0" / "summary.json").exists()
    assert (locks / "uniform0.4_none_ce_s0.lock").exists()
    assert (tmp_path / "uniform0.4_none_ce_s1" / "summary.json").exists()
    assert not (locks / "uniform0.4_none_ce_s1.lock").exists()
    # once the owner is gone, the next pass trains the cell it had locked
    protocol.main(["--dataset", "digits", "--meta-per-class", "10", "--epochs", "1", "--seeds", "0,1",
                   "--out", str(tmp_path)])
    assert (tmp_path / "uniform0.4_none_ce_s0" / "summary.json").exists()
    assert not any(locks.iterdir())


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
    """The README's Fashion-MNIST table is the first table of the committed results.md."""
    root = SCRIPT.parents[1]

    def first_table(text):
        lines = text.splitlines()
        start = next(i for i, l in enumerate(lines) if l.startswith("| method |"))
        end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
        return lines[start:end]

    results = (root / "benchmarks" / "results" / "fashion_mnist" / "results.md").read_text()
    readme = (root / "README.md").read_text()
    section = readme[readme.index("## Results on Fashion-MNIST"):]
    assert first_table(section) == first_table(results)
    assert "88 of 88 runs finished" in results
