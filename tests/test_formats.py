"""The dataset-format registry: a new format is one reader plus one registration."""

import numpy as np
import pytest
import torch

from gdw.data import FORMATS, prepare, register_format
from gdw.data.batches import TensorStore, View
from gdw.data.sources import Source, resolve


@pytest.fixture
def tiny_format():
    """A format ``tiny`` registered the way a new file in gdw/data would: three
    Gaussian clusters as a Source, with a test split of its own."""
    def read_tiny(test_fraction=0.2):
        g = np.random.default_rng(0)
        y = np.repeat(np.arange(3), 40)
        x = (g.normal(0, 1, (120, 4)) + 3 * np.eye(3, 4)[y]).astype(np.float32)
        n_test = int(round(test_fraction * 120))
        return Source("tiny", ["a", "b", "c"], TensorStore(torch.from_numpy(x[n_test:])), y[n_test:],
                      TensorStore(torch.from_numpy(x[:n_test])), y[:n_test], View(torch.zeros(4), torch.ones(4)),
                      preprocess={"kind": "tiny"})

    register_format("tiny", options=("test_fraction",))(read_tiny)
    yield read_tiny
    del FORMATS._items["tiny"]


def test_a_registered_format_is_read_by_name(tiny_format):
    assert resolve("tiny") == ("tiny", None)
    data = prepare("tiny", meta_per_class=2, seed=0)
    assert data.classes == ["a", "b", "c"] and len(data.test) == 24 and len(data.meta) == 6
    assert len(data.train) == 96 - 6
    assert data.record["test_known_clean"]  # not the user's own files: its labels count as clean


def test_the_builtin_and_file_formats_are_registered():
    assert {"digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "clothing1m", "csv", "npz",
            "folder"} <= set(FORMATS.names())
    assert {n for n in FORMATS.names() if FORMATS.get(n).user_files} == {"csv", "npz", "folder"}
    with pytest.raises(RuntimeError, match="registered twice"):
        register_format("csv")(lambda path: None)
