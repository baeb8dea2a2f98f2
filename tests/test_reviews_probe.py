"""The reviews probe: its cells are the design study's protocol with one
change each, and the user's runs are gdw train at its own defaults."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def probe(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location("reviews_probe", BENCH / "reviews_probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("reviews_probe", None)


def test_every_label_is_read_back_from_its_run_directory(probe):
    names = [name for name, _ in probe.cells({r: ("npz:/x.npz", 50) for r in probe.USER_REGIMES})]
    assert len(names) == len(set(names)) == (len(probe.PROBES) * len(probe.PROBE_SETTINGS) * len(probe.PROBE_SEEDS)
                                             + len(probe.USER) * len(probe.USER_SETTINGS) * len(probe.USER_SEEDS)
                                             * len(probe.USER_REGIMES))
    for name in names:
        part = name.split("/")[0]
        label = probe._label(name, part)
        assert probe.slug(label) in name and label in (probe.PROBES if part == "probe" else probe.USER)


def test_a_small_probe_runs_and_reports(probe, monkeypatch, tmp_path):
    """On digits, one epoch: the probe's cells hold a validation split and
    the candidate's one change; the user's cell draws gdw's own meta set."""
    import robustness as rb

    monkeypatch.setattr(probe, "REGIME", "digits")
    monkeypatch.setattr(rb, "EPOCHS", 1)
    monkeypatch.setattr(probe, "USER_EPOCHS", 1)
    monkeypatch.setattr(probe, "PROBES", {k: probe.PROBES[k] for k in ("ce", "gdw tau=0")}
                        | {"gdw-meta5": (probe.PROBES["gdw"][0], {"meta_per_class": 5})})
    monkeypatch.setattr(probe, "PROBE_SETTINGS", [("uniform:0.2", "none")])
    monkeypatch.setattr(probe, "PROBE_SEEDS", [0])
    monkeypatch.setattr(probe, "USER_SETTINGS", [("none", "none")])
    monkeypatch.setattr(probe, "USER_SEEDS", [0])
    monkeypatch.setattr(probe, "USER_REGIMES", ["digits"])
    out = tmp_path / "out"
    assert probe.main(["--out", str(out), "--data", str(tmp_path / "data")]) == 0
    config = {p.parent.name: json.loads(p.read_text()) for p in out.glob("**/config.json")}
    assert set(config) == {"uniform0.2_ce_s0", "uniform0.2_gdw_tau0_s0", "uniform0.2_gdw-meta5_s0", "none_gdw_s0",
                           "none_ce_s0", "none_gdw-cap1_s0", "none_gdw-auto_s0"}
    assert config["none_gdw-cap1_s0"]["method_params"]["max_weight"] == 1.0
    assert config["none_gdw-cap1_s0"]["method_params"]["plain_below"] == 0.0
    assert config["none_gdw_s0"]["method_params"]["max_weight"] == "auto"
    assert config["none_gdw_s0"]["method_params"]["plain_below"] == 0.08
    assert config["none_gdw-auto_s0"]["method_params"]["plain_below"] == 0.0
    assert config["uniform0.2_gdw_tau0_s0"]["method_params"]["tau"] == 0.0
    assert config["uniform0.2_gdw-meta5_s0"]["data"]["n_meta"] == 5 * 10
    assert all(config[k]["val_per_class"] == 13 for k in config if k.startswith("uniform"))
    user = config["none_gdw_s0"]
    assert user["val_per_class"] == 0 and user["epochs"] == 1 and user["method_args"] == {}
    from gdw.data.sources import load_source

    smallest = int(np.bincount(np.asarray(load_source("digits").y_train)).min())
    assert user["data"]["n_meta"] == 10 * (smallest // 10)  # gdw's own draw on digits: a tenth of the smallest class
    md = (out / "results.md").read_text()
    assert "| gdw tau=0 |" in md and "| gdw-meta5 |" in md and "### digits" in md and "–" not in md.split("## As a user runs it")[1]
