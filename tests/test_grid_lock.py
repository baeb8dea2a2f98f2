"""benchmarks/grid.py shares a grid's cells between processes with flock."""

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import grid  # noqa: E402


def test_a_claimed_cell_is_nobody_elses_until_released(tmp_path):
    lock = grid.lock_path(tmp_path, "digits/flip0.4_none_ce_s0")
    with grid.claimed(lock) as first:
        with grid.claimed(lock) as second:  # another open file: as another process would
            assert first and not second
    with grid.claimed(lock) as again:
        assert again


def test_a_killed_process_leaves_no_lock(tmp_path):
    lock = grid.lock_path(tmp_path, "cell")
    code = (f"import fcntl, os; f = open({str(lock)!r}, 'a'); fcntl.flock(f, fcntl.LOCK_EX); "
            "os.kill(os.getpid(), 9)")
    lock.parent.mkdir(parents=True)
    assert subprocess.run([sys.executable, "-c", code]).returncode == -9
    with grid.claimed(lock) as ours:
        assert ours


def test_data_notes_where_the_true_labels_are_not_known(tmp_path):
    """A data set's own labels (no true labels): no rate where no noise was
    added, and class sizes by the given labels; with true labels, theirs."""
    import json

    def cell(name, train_true, train_noisy):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(
            {"data": {"counts": {"train_true": train_true, "train_noisy": train_noisy}}}))
        return name

    rows = [{"noise": "none", "imbalance": "none", "realised_noise_rate": "", "run_dir": "a"},
            {"noise": "none", "imbalance": "none", "realised_noise_rate": "", "run_dir": "b"},
            {"noise": "uniform:0.1", "imbalance": "none", "realised_noise_rate": "0.05", "run_dir": "c"},
            {"noise": "none", "imbalance": "longtail:100", "realised_noise_rate": "",
             "run_dir": cell("d", [0, 0], [1350, 14])},
            {"noise": "uniform:0.4", "imbalance": "longtail:10", "realised_noise_rate": "0.359",
             "run_dir": cell("e", [126, 13], [100, 39])}]
    text = grid.data_notes(rows, tmp_path)
    assert "none: none added; uniform:0.1: 5.0%" in text and "nan" not in text
    assert "none + longtail:100: 1350 / 14, 1364; uniform:0.4 + longtail:10: 126 / 13, 139" in text
