"""The no-clean-set grid: the noise is in the given labels, so the meta set
gdw draws from them is as noisy as the training set."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def ncs(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location("no_clean_set", BENCH / "no_clean_set.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "REGIMES", ["digits"])
    monkeypatch.setattr(module, "NOISES", ["flip:0.4"])
    monkeypatch.setattr(module, "METHODS", ["ce", "dm", "gdw"])
    monkeypatch.setattr(module, "SEEDS", [0])
    yield module
    sys.modules.pop("no_clean_set", None)


def test_meta_set_is_drawn_from_the_noisy_labels(ncs, tmp_path):
    out, data = tmp_path / "out", tmp_path / "data"
    assert ncs.main(["--out", str(out), "--data", str(data), "--epochs", "1"]) == 0
    from gdw.data.sources import load_source

    clean = np.asarray(load_source("digits").y_train)
    with np.load(data / "no-clean-set" / "digits_flip0.4.npz") as z:
        assert "y_train_true" not in z.files
        given = z["y_train"]
    # flip:0.4 moves about 40% of each class's labels to one other class: counted here without gdw's noise code
    assert abs(np.mean(given != clean) - 0.4) < 0.01
    for c in range(10):
        assert len(set(given[(clean == c) & (given != clean)].tolist())) == 1
    config = json.loads((out / "digits" / "flip0.4_gdw_s0" / "config.json").read_text())
    assert config["data"]["meta_known_clean"] is False and config["data"]["meta_source"] == "train"
    md = (out / "results.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| digits · flip:0.4"))
    assert "| 40.0 |" in row and row.count("±") == 3
