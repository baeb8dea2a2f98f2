import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # the tests' shared helpers (models.py)

# The test models are tiny: one thread is faster than two, and it keeps the
# suite from fighting itself (and subprocesses it starts) for the cores.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """No test reads or writes the user's download cache or mirror setting."""
    monkeypatch.setenv("GDW_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("GDW_MIRROR", raising=False)


def one_line_error(excinfo, *needles):
    """The raised error's message is one non-empty line containing every needle."""
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)
