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
