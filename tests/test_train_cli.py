"""gdw train / compare: run directory schema, exact resume after SIGKILL,
skipped cells, one-line user errors, and a diverging run."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from gdw.cli import main

SUMMARY_KEYS = {
    "method", "dataset", "noise", "imbalance", "seed", "epochs", "final_test_accuracy", "best_test_accuracy",
    "per_class_test_accuracy", "realised_noise_rate", "train_seconds", "steps_per_second",
}
RUN_FILES = {
    "config.json", "metrics.jsonl", "summary.json", "split.npz", "checkpoint.pt", "example_weights.npy",
    "curves.png", "weights.png",
}
QUICK = ["--dataset", "digits", "--meta-per-class", "10", "--no-progress"]


def test_run_directory_schema(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *QUICK, "--epochs", "3", "--method", "gdw", "--out", str(out)]) == 0
    assert RUN_FILES <= {p.name for p in out.iterdir()}
    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    accs = [m["test_accuracy"] for m in metrics]
    assert summary["final_test_accuracy"] == pytest.approx(np.mean(accs))  # last min(5, epochs) epochs
    assert summary["best_test_accuracy"] == pytest.approx(max(accs))
    for key in ("final_test_accuracy", "best_test_accuracy", *summary["per_class_test_accuracy"]):
        value = summary[key] if isinstance(key, str) else key
        assert 0.0 <= value <= 1.0
    split = np.load(out / "split.npz")
    weights = np.load(out / "example_weights.npy")
    n_train = json.loads((out / "config.json").read_text())["data"]["n_train"]
    assert weights.shape == (n_train,) and np.isfinite(weights).all()
    assert len(split.files) > 0
    config = json.loads((out / "config.json").read_text())
    assert config["device"] == "cpu" and config["versions"]["torch"] == torch.__version__
    assert "epoch   3/3" in capsys.readouterr().out


def _train_cmd(out, epochs):
    return [sys.executable, "-m", "gdw", "train", *QUICK, "--method", "gdw", "--epochs", str(epochs),
            "--batch-size", "20", "--seed", "3", "--out", str(out)]


def _final_params(out):
    return torch.load(out / "checkpoint.pt", weights_only=False)


def test_resume_after_sigkill_is_bit_identical(tmp_path):
    epochs = 6
    full, killed = tmp_path / "full", tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(killed, epochs), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoint.pt").exists():
        assert proc.poll() is None, "training ended before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = torch.load(killed / "checkpoint.pt", weights_only=False)["epoch"] + 1
    assert done < epochs and not (killed / "summary.json").exists(), "the run was not interrupted mid-way"

    subprocess.run(_train_cmd(killed, epochs) + ["--resume"], check=True, capture_output=True)
    subprocess.run(_train_cmd(full, epochs), check=True, capture_output=True)
    a, b = _final_params(killed), _final_params(full)
    for key in ("model", "method"):
        flat_a = torch.nn.utils.parameters_to_vector([t.float() for t in _tensors(a[key])])
        flat_b = torch.nn.utils.parameters_to_vector([t.float() for t in _tensors(b[key])])
        assert torch.equal(flat_a, flat_b), key
    assert a["history"][-1]["test_accuracy"] == b["history"][-1]["test_accuracy"]


def _tensors(state):
    if isinstance(state, torch.Tensor):
        yield state
    elif isinstance(state, dict):
        for k in sorted(state, key=str):
            yield from _tensors(state[k])
    elif isinstance(state, (list, tuple)):
        for v in state:
            yield from _tensors(v)


def test_compare_skips_finished_cells(tmp_path, capsys):
    args = ["compare", *QUICK, "--methods", "ce,gdw", "--noise", "uniform:0.4", "--seeds", "0,1", "--epochs", "1",
            "--out", str(tmp_path)]
    assert main(args) == 0
    first = capsys.readouterr().out
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/summary.json")}
    assert len(stamps) == 4 and "skipped" not in first
    assert main(args) == 0
    second = capsys.readouterr().out
    assert second.count("finished, skipped") == 4
    assert stamps == {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/summary.json")}
    rows = (tmp_path / "results.csv").read_text().splitlines()
    assert len(rows) == 5 and (tmp_path / "compare.png").stat().st_size > 0
    table = (tmp_path / "results.md").read_text()
    assert "| ce |" in table and "| gdw |" in table and "**" in table


def run_cli(args, capsys):
    """``gdw ARGS`` in this process: (exit code, stderr)."""
    try:
        code = main(args)
    except SystemExit as exit:  # argparse's own usage errors
        code = exit.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "args,message",
    [
        (["train", "--method", "nope"], "unknown method 'nope'"),
        (["train", "--model", "nope"], "unknown model 'nope'"),
        (["train", "--epochs", "abc"], "invalid int value"),
        (["train", "--epochs", "0"], "--epochs must be"),
        (["train", "--config", "/nonexistent/cfg.toml"], "cannot read"),
        (["train", "--method-args", "eta"], "key=value"),
        (["train", "--method-args", "etta=3"], "has no parameter etta"),
        (["train", "--device", "tpu9"], "unknown device"),
        (["train", "--noise", "uniform:1.5"], "noise"),
        (["train", "--dataset", "npz:/nonexistent.npz"], "nonexistent.npz"),
        (["compare", "--methods", "ce,nope"], "unknown method 'nope'"),
    ],
)
def test_user_mistakes_are_one_line_exit_2(args, message, tmp_path, capsys):
    code, err = run_cli([args[0], *QUICK, *args[1:], "--out", str(tmp_path / "r")], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], err


def test_user_mistake_in_a_real_process_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "gdw", "train", "--method", "nope", "--out", str(tmp_path / "r")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "unknown method 'nope'" in proc.stderr


def test_bad_config_and_existing_run_dir(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("epochs = [")
    assert main(["train", "--config", str(bad)]) == 2
    assert "cannot parse" in capsys.readouterr().err
    good = tmp_path / "good.yaml"
    good.write_text("epochs: 1\nmethod: ce\nmeta-per-class: 10\nprogress: false\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(good), "--epochs", "2", "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["epochs"] == 2  # the flag overrides the file
    assert main(["train", "--config", str(good), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


class NanAfter(torch.nn.Module):
    """An MLP whose logits turn NaN after ``after`` training forwards."""

    calls = 0

    def __init__(self, input_shape, num_classes, after=30):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(int(np.prod(input_shape)), num_classes))
        self.after = after

    def forward(self, x):
        z = self.net(x)
        if self.training:
            NanAfter.calls += 1
            if NanAfter.calls > self.after:
                z = z * float("nan")
        return z


def test_non_finite_loss_stops_and_keeps_checkpoint(tmp_path, capsys):
    NanAfter.calls = 0
    out = tmp_path / "run"
    code = main(["train", *QUICK, "--method", "ce", "--model", "test_train_cli:NanAfter", "--epochs", "5",
                 "--out", str(out)])
    assert code == 1
    err = capsys.readouterr().err
    assert "non-finite" in err or "became nan" in err
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["epoch"] >= 0 and all(torch.isfinite(t).all() for t in ckpt["model"].values())
    assert not (out / "summary.json").exists()
