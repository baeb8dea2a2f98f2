import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))  # the tests' shared helpers (models.py)

# The test models are tiny: one thread is faster than two, and it keeps the
# suite from fighting itself (and subprocesses it starts) for the cores.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
