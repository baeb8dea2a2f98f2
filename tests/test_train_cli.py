"""gdw train / compare: run directory schema, exact resume after SIGKILL,
skipped cells, one-line user errors, and a diverging run."""

import dataclasses
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
    assert summary["max_weight"] == "inf"  # "auto": the MLP has BatchNorm and digits' classes are about equal
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
    out_text = capsys.readouterr().out
    assert "epoch   3/3" in out_text
    assert "gdw: no cap on the instance weights (the model has BatchNorm" in out_text


def _train_cmd(out, epochs):
    # GDW's paper mode: the weighting network and its Adam state must resume exactly too
    return [sys.executable, "-m", "gdw", "train", *QUICK, "--method", "gdw", "--method-args", "stage_one=mwnet",
            "--epochs", str(epochs), "--batch-size", "20", "--seed", "3", "--out", str(out)]


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

    # the run's own settings: no flag but --out and --resume
    subprocess.run([sys.executable, "-m", "gdw", "train", "--out", str(killed), "--resume", "--no-progress"],
                   check=True, capture_output=True)
    subprocess.run(_train_cmd(full, epochs), check=True, capture_output=True)
    a, b = _final_params(killed), _final_params(full)
    for key in ("model", "method"):
        ta, tb = list(_tensors(a[key])), list(_tensors(b[key]))
        assert len(ta) == len(tb) and all(torch.equal(x, y) for x, y in zip(ta, tb)), key
    assert a["history"][-1]["test_accuracy"] == b["history"][-1]["test_accuracy"]
    rows = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, epochs + 1))


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
        (["train", "--method-args", "optimizer=1"], "'optimizer' is set by gdw itself"),
        (["train", "--method-args", "head_only=maybe"], "head_only must be True or False"),
        (["train", "--method-args", "zero_mean=nope"], "zero_mean must be True or False"),
        (["train", "--method-args", "eta=3,eta=4"], "'eta' is given twice"),
        (["train", "--model", "test_train_cli:wrong_signature"], "must accept (input_shape, num_classes)"),
        (["train", "--model", "test_train_cli:StringOutput"], "str"),
        (["train", "--model", "test_train_cli:int_width"],
         "failed when called as int_width((1, 8, 8), 10) (input_shape is the shape of one example, a tuple): TypeError"),
        (["train", "--resume"], "no config.json"),
    ],
)
def test_user_mistakes_are_one_line_exit_2(args, message, tmp_path, capsys):
    code, err = run_cli([args[0], *QUICK, *args[1:], "--out", str(tmp_path / "r" / "deeper")], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert list(tmp_path.iterdir()) == [], "a failed command left files behind"


def wrong_signature(a, b, c):
    return torch.nn.Linear(64, 10)


def int_width(in_features, num_classes):  # a factory that takes the shape for a width: torch raises TypeError
    return torch.nn.Linear(in_features, num_classes)


class StringOutput(torch.nn.Module):
    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.fc = torch.nn.Linear(int(np.prod(input_shape)), num_classes)

    def forward(self, x):
        return "logits"


class TupleOutput(torch.nn.Module):
    """Returns ``(logits, features)`` as many models do."""

    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(int(np.prod(input_shape)), 32), torch.nn.ReLU())
        self.fc = torch.nn.Linear(32, num_classes)

    def forward(self, x):
        h = self.body(x)
        return self.fc(h), h


def test_model_with_tuple_output_trains(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *QUICK, "--epochs", "1", "--method", "gdw", "--model", "test_train_cli:TupleOutput",
                 "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["final_test_accuracy"] > 0.3


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 2-epoch flip:0.2 MW-Net run (not the defaults, so a resume that
    forgot its settings would show)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", *QUICK, "--epochs", "2", "--method", "mwnet", "--noise", "flip:0.2", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("flags,message", [
    (["--noise", "uniform:0.4"], "--noise uniform:0.4 differs from flip:0.2"),
    (["--method", "gdw"], "--method gdw differs from mwnet"),
    (["--epochs", "8"], "--epochs 8 differs from 2"),
    (["--dataset", "npz:/nonexistent.npz"], "--dataset"),
    (["--method-args", "hidden=50"], "--method-args hidden=50 differs"),
])
def test_resume_with_a_changed_setting_is_refused(finished_run, flags, message, capsys):
    before = _snapshot(finished_run)
    code, err = run_cli(["train", "--out", str(finished_run), "--resume", *flags], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert _snapshot(finished_run) == before


def test_resume_accepts_settings_that_cannot_change_the_result(finished_run, capsys):
    code, err = run_cli(["train", "--out", str(finished_run), "--resume", "--noise", "flip:0.2", "--device", "cpu",
                         "--no-progress"], capsys)
    assert code == 0, err
    assert json.loads((finished_run / "summary.json").read_text())["noise"] == "flip:0.2"


def test_resume_rewrites_metrics_from_the_checkpoint(tmp_path, capsys):
    """A kill between metrics.jsonl and the checkpoint (simulated: an extra
    row for an epoch the checkpoint does not hold) leaves no duplicate rows."""
    out = tmp_path / "run"
    assert main(["train", *QUICK, "--epochs", "1", "--method", "ce", "--out", str(out)]) == 0
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    ckpt["history"] = ckpt["history"][:1]
    rows = (out / "metrics.jsonl").read_text()
    (out / "metrics.jsonl").write_text(rows + rows.replace('"epoch": 1', '"epoch": 2'))
    (out / "summary.json").unlink()
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1]


def _rewound(tmp_path, name, source):
    """A copy of the finished run ``source`` set back to the end of its first
    epoch (checkpoint, history and summary), so that a resume trains the rest."""
    import shutil

    out = tmp_path / name
    shutil.copytree(source, out)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    ckpt["epoch"], ckpt["history"] = 0, ckpt["history"][:1]
    torch.save(ckpt, out / "checkpoint.pt")
    (out / "summary.json").unlink()
    return out


def test_resume_after_a_default_changed_goes_on_with_the_runs_own_parameters(tmp_path, capsys, monkeypatch):
    """A gdw run stopped before a default changed resumes with the method
    parameters it started with: the same model, bit for bit, as the same
    resume without the change, one line on stderr naming the parameter; the
    changed default would have given another model."""
    from gdw.methods import GDW

    first = tmp_path / "first"
    assert main(["train", *QUICK, "--epochs", "4", "--method", "gdw", "--out", str(first)]) == 0
    same, changed = _rewound(tmp_path, "same", first), _rewound(tmp_path, "changed", first)
    assert main(["train", "--out", str(same), "--resume", "--no-progress"]) == 0
    capsys.readouterr()
    stages = {k: dict(v) for k, v in GDW.STAGE_DEFAULTS.items()}
    stages["l2rw"]["max_weight"] = 0.5  # a new default, as a later gdw could have
    monkeypatch.setattr(GDW, "STAGE_DEFAULTS", stages)
    code, err = run_cli(["train", "--out", str(changed), "--resume", "--no-progress"], capsys)
    assert code == 0, err
    assert "resuming with the run's own method parameters: max_weight=auto (now: 0.5)" in err
    a, b = _final_params(same), _final_params(changed)
    ta, tb = list(_tensors(a["model"])), list(_tensors(b["model"]))
    assert len(ta) == len(tb) and all(torch.equal(x, y) for x, y in zip(ta, tb))
    assert json.loads((changed / "summary.json").read_text())["method_args"]["max_weight"] == "auto"
    # the new default itself trains another model from the same checkpoint
    fresh = _rewound(tmp_path, "fresh", first)
    config = json.loads((fresh / "config.json").read_text())
    config["method_params"]["max_weight"] = 0.5  # as if the run had started under the new default
    (fresh / "config.json").write_text(json.dumps(config))
    from gdw.config import TrainConfig

    new = TrainConfig.load(fresh).fingerprint()  # the record and the checkpoint of such a run
    ckpt = torch.load(fresh / "checkpoint.pt", weights_only=False)
    config["fingerprint"] = ckpt["fingerprint"] = new
    (fresh / "config.json").write_text(json.dumps(config))
    torch.save(ckpt, fresh / "checkpoint.pt")
    code, err = run_cli(["train", "--out", str(fresh), "--resume", "--no-progress"], capsys)
    assert code == 0 and "resuming with" not in err, err
    tc = list(_tensors(_final_params(fresh)["model"]))
    assert not all(torch.equal(x, y) for x, y in zip(ta, tc))


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated", None])
def test_corrupt_checkpoint_is_one_line(finished_run, tmp_path, content, capsys):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(finished_run, run)
    (run / "summary.json").unlink()  # as if stopped before its end: a finished run reads no checkpoint
    path = run / "checkpoint.pt"
    if content is None:  # a real checkpoint cut short
        path.write_bytes(path.read_bytes()[:2000])
    else:
        path.write_bytes(content)
    before = _snapshot(run)
    code, err = run_cli(["train", "--out", str(run), "--resume"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "corrupt or truncated" in err, err
    assert _snapshot(run) == before


def test_checkpoint_of_other_settings_is_refused(finished_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(finished_run, run)
    (run / "summary.json").unlink()  # as if stopped before its end: a finished run reads no checkpoint
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    ckpt["fingerprint"] = "0" * 16
    torch.save(ckpt, run / "checkpoint.pt")
    code, err = run_cli(["train", "--out", str(run), "--resume"], capsys)
    assert code == 2 and "other settings" in err


def test_out_pointing_at_a_file(tmp_path, capsys):
    f = tmp_path / "file.txt"
    f.write_text("x")
    code, err = run_cli(["train", *QUICK, "--out", str(f)], capsys)
    assert code == 2 and "is a file" in err and f.read_text() == "x"


def test_compare_refuses_a_changed_grid_and_force_reruns(tmp_path, capsys):
    args = ["compare", *QUICK, "--methods", "ce", "--noise", "uniform:0.4", "--out", str(tmp_path)]
    assert main([*args, "--epochs", "1"]) == 0
    capsys.readouterr()
    before = _snapshot(tmp_path)
    code, err = run_cli([*args, "--epochs", "2"], capsys)
    assert code == 2 and "cell uniform0.4_none_ce_s0" in err and "--epochs 2 differs from 1" in err, err
    assert _snapshot(tmp_path) == before
    assert main([*args, "--epochs", "2", "--force"]) == 0
    summary = json.loads((tmp_path / "uniform0.4_none_ce_s0" / "summary.json").read_text())
    assert summary["epochs"] == 2


def _interrupt(cmd, until, timeout=120):
    """Start ``cmd``, send SIGINT once ``until()`` holds; (returncode, stderr)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while not until():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


def test_ctrl_c_before_the_first_checkpoint_leaves_nothing(tmp_path):
    out = tmp_path / "r" / "run"
    code, err = _interrupt([sys.executable, "-m", "gdw", "train", *QUICK, "--epochs", "50", "--method", "l2rw",
                            "--batch-size", "10", "--out", str(out)], lambda: (out / "split.npz").exists())
    assert code == 130 and "nothing was kept" in err and "--resume" not in err, err
    assert "Traceback" not in err and not (tmp_path / "r").exists()


def test_a_run_killed_before_its_first_checkpoint_can_be_started_again(tmp_path, capsys):
    """SIGKILL leaves config.json and split.npz but no checkpoint: --resume
    says to start again, and starting again replaces the dead run."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "gdw", "train", *QUICK, "--epochs", "50", "--method", "l2rw",
                             "--batch-size", "10", "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "split.npz").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "checkpoint.pt").exists() and (out / "config.json").exists()
    code, err = run_cli(["train", "--out", str(out), "--resume"], capsys)
    assert code == 2 and "without --resume" in err, err
    assert main(["train", *QUICK, "--epochs", "1", "--method", "ce", "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["method"] == "ce"


def test_resuming_a_finished_run_says_so_and_changes_nothing(finished_run, capsys):
    stamps = {p: p.stat().st_mtime_ns for p in finished_run.iterdir()}
    before = _snapshot(finished_run)
    assert main(["train", "--out", str(finished_run), "--resume", "--no-progress"]) == 0
    assert f"the run in {finished_run} is finished (2 of 2 epochs)" in capsys.readouterr().out
    assert _snapshot(finished_run) == before and stamps == {p: p.stat().st_mtime_ns for p in finished_run.iterdir()}


def test_ctrl_c_after_a_checkpoint_advises_a_resume_that_works(tmp_path, capsys):
    out = tmp_path / "run"
    code, err = _interrupt([sys.executable, "-m", "gdw", "train", *QUICK, "--epochs", "30", "--method", "ce",
                            "--out", str(out)], lambda: (out / "checkpoint.pt").exists())
    assert code == 130 and f"gdw train --out {out} --resume" in err, err
    # predict on the unfinished run says how far it got
    from sklearn.datasets import load_digits

    np.savez(tmp_path / "new.npz", x=(load_digits().images[:5, None] / 16).astype(np.float32))
    done = torch.load(out / "checkpoint.pt", weights_only=False)["epoch"] + 1
    assert main(["predict", str(out), "--data", f"npz:{tmp_path / 'new.npz'}", "--out", str(tmp_path / "p.csv")]) == 0
    assert f"the run is unfinished ({done} of 30 epochs trained)" in capsys.readouterr().out
    proc = subprocess.run([sys.executable, "-m", "gdw", "train", "--out", str(out), "--resume", "--no-progress"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_detect_into_a_closed_pipe_has_no_traceback(finished_run):
    proc = subprocess.run(f"{sys.executable} -m gdw detect {finished_run} --top 100000 | head -1", shell=True,
                          capture_output=True, text=True)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    assert proc.stdout.startswith("gdw detect:")


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


def test_a_changed_default_is_a_changed_setting(tmp_path, capsys):
    """config.json records every method parameter with its default; a run
    made when a default was different (simulated by editing the record) is
    neither resumed nor reused by compare as if it were the same."""
    args = ["compare", *QUICK, "--methods", "gdw", "--noise", "uniform:0.4", "--epochs", "1", "--out", str(tmp_path)]
    assert main(args) == 0
    cell = tmp_path / "uniform0.4_none_gdw_s0"
    config = json.loads((cell / "config.json").read_text())
    assert config["method_params"]["stage_one"] == "l2rw" and config["method_args"] == {}
    config["method_params"]["stage_one"] = "mwnet"  # as if gdw's default had been the paper's then
    (cell / "config.json").write_text(json.dumps(config, indent=2))
    capsys.readouterr()
    code, err = run_cli(args, capsys)
    assert code == 2 and "method parameter stage_one is l2rw here but mwnet" in err and "--force" in err, err
    code, err = run_cli(["train", "--out", str(cell), "--resume"], capsys)
    assert code == 2 and "method parameter stage_one" in err, err


def test_resume_refuses_data_edited_since_the_run_started(tmp_path, capsys):
    """A user who fixes labels in their CSV and resumes must not get a run
    that silently mixes the two versions of the file."""
    rng = np.random.default_rng(0)
    path = tmp_path / "data.csv"
    lines = ["a,b,label"] + [f"{rng.normal():.4f},{rng.normal():.4f},{['x', 'y'][i % 2]}" for i in range(200)]
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    assert main(["train", "--dataset", f"csv:{path}", "--method", "ce", "--epochs", "1", "--no-progress",
                 "--out", str(out)]) == 0
    (out / "summary.json").unlink()  # as if stopped before its end: a finished run is not resumed at all
    path.write_text("\n".join(lines[:1] + [line[:-1] + "y" for line in lines[1:50]] + lines[50:]) + "\n")
    before = _snapshot(out)
    code, err = run_cli(["train", "--out", str(out), "--resume"], capsys)
    assert code == 2 and "changed since the run started" in err and len(err.strip().splitlines()) == 1, err
    assert _snapshot(out) == before


def test_train_with_your_own_test_set_measures_on_it_and_keeps_it(tmp_path, capsys):
    """--test csv:PATH: the run's test accuracy is on that file (here its
    labels are the truth, so a model that learnt anything scores far above
    the noisy-label ceiling), config.json records it with its digest, and a
    resume after the test file was edited is refused."""
    rng = np.random.default_rng(0)

    def rows(n, flip):
        out = []
        for i in range(n):
            c = i % 2
            label = ["x", "y"][1 - c if flip and i % 5 == 0 else c]
            out.append(f"{rng.normal(3 * c):.4f},{rng.normal():.4f},{label}")
        return out

    data, test = tmp_path / "data.csv", tmp_path / "test.csv"
    data.write_text("\n".join(["a,b,label"] + rows(300, flip=True)) + "\n")
    test_lines = ["label,b,a"] + [",".join(reversed(line.split(","))) for line in rows(60, flip=False)]
    test.write_text("\n".join(test_lines) + "\n")
    out = tmp_path / "run"
    assert main(["train", "--dataset", f"csv:{data}", "--test", f"csv:{test}", "--method", "ce", "--epochs", "10",
                 "--no-progress", "--out", str(out)]) == 0
    assert "(270 train, 30 meta, 60 test" in capsys.readouterr().out  # no test split taken out of data.csv
    config = json.loads((out / "config.json").read_text())
    assert config["test"] == "csv:../test.csv" and set(config["data_files"]) == {"dataset", "test"}  # relative to the run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_test_accuracy"] > 0.85  # against labels with 20% flipped it could not exceed ~0.8
    test.write_text("\n".join(test_lines[:1] + ["y" + line[1:] if line[0] == "x" else line for line in test_lines[1:]]) + "\n")
    (out / "summary.json").unlink()  # as if stopped before its end: a finished run is not resumed at all
    code, err = run_cli(["train", "--out", str(out), "--resume"], capsys)
    assert code == 2 and "test" in err and len(err.strip().splitlines()) == 1, err


def test_gdw_train_adjusts_by_the_training_labels_counts():
    """gdw train gives GDW (and la) the counts of the training labels as
    drawn (after the imbalance and the meta draw), so τ log π is the log of
    the training set's own class shares; the paper mode takes none."""
    from gdw.distributed import Comm
    from gdw.train import TrainConfig, build

    cfg = TrainConfig(dataset="digits", imbalance="longtail:10", method="gdw", epochs=1)
    data, _, _, method = build(cfg, torch.device("cpu"), Comm())
    counts = np.bincount(data.train.labels.numpy(), minlength=10)
    assert counts.max() >= 5 * counts.min()  # the long tail is there
    np.testing.assert_allclose(method.log_prior.numpy(), np.log(counts / counts.sum()), rtol=1e-12)
    paper = build(TrainConfig(dataset="digits", imbalance="longtail:10", method="gdw", epochs=1,
                              method_args={"stage_one": "mwnet"}), torch.device("cpu"), Comm())[3]
    assert paper.log_prior is None


@pytest.mark.parametrize("stage_one,default,same", [
    ("mwnet", "batch", True),  # the paper's mode: what older runs did
    ("l2rw", "batch", True),  # the scaling runs made before weight_norm existed used
    ("l2rw", "kept", False),  # a default that differs from it: another result
])
def test_a_parameter_added_since_a_run_is_judged_by_the_value_that_run_used(monkeypatch, stage_one, default, same):
    """A run recorded before a method parameter existed (its config.json
    lacks it) equals a new run only if the new run's value is the one the old
    run had in effect (``Method.ADDED_PARAMS``), so adding a parameter does
    not make every earlier result stale, and a default that differs does."""
    from gdw.methods import GDW
    from gdw.train import TrainConfig

    old = TrainConfig(dataset="digits", method="gdw", method_args={"stage_one": stage_one})
    saved = old.method_params()
    del saved["weight_norm"]
    old.saved_method_params = saved
    stages = {k: dict(v) for k, v in GDW.STAGE_DEFAULTS.items()}
    stages[stage_one]["weight_norm"] = default
    monkeypatch.setattr(GDW, "STAGE_DEFAULTS", stages)
    new = TrainConfig(dataset="digits", method="gdw", method_args={"stage_one": stage_one})
    assert new.method_params()["weight_norm"] == default
    assert new.first_difference(old) == (None if same else ("method parameter weight_norm", "kept", "batch"))


@pytest.mark.parametrize("spelled,same", [
    ({"class_grad": "raw"}, True),  # the value the old run had in effect, now written out
    ({"class_grad": "constrained"}, False),  # another value: another result, named by the arguments
])
def test_method_args_are_compared_by_their_effect(spelled, same):
    """A run recorded before ``class_grad`` existed, against a new config that
    writes the parameter out: the same parameters in effect are the same run
    (a benchmark grid that spells out an older default still recognises its
    finished cells); different ones are reported as differing arguments."""
    from gdw.train import TrainConfig

    args = {"stage_one": "l2rw", "weight_norm": "kept"}
    old = TrainConfig(dataset="digits", method="gdw", method_args=dict(args))
    saved = old.method_params()
    del saved["class_grad"]
    old.saved_method_params = saved
    new = TrainConfig(dataset="digits", method="gdw", method_args={**args, **spelled})
    expected = None if same else ("method_args", {**args, **spelled}, args)
    assert new.first_difference(old) == expected


@pytest.mark.parametrize("summary, same", [
    (None, False),  # without the run's summary: the default that changed is a difference
    ({"early_decision": "on"}, True),  # the check kept the weighting: plain_restart changed nothing
    ({}, True),  # no check at all
    ({"early_decision": "plain"}, False),  # it switched: restarting or not are different runs
])
def test_a_parameter_that_changed_nothing_is_no_difference(summary, same):
    """GDW's plain_restart (``INERT_UNLESS``) acts only where the early check
    switched to plain training: a run recorded before it (plain_restart False
    in effect) is the same run as one with the default True where its
    summary.json shows the check did not switch."""
    from gdw.train import TrainConfig

    old = TrainConfig(dataset="digits", method="gdw", method_args={})
    saved = old.method_params()
    del saved["plain_restart"]
    old.saved_method_params = saved
    new = TrainConfig(dataset="digits", method="gdw", method_args={})
    assert new.method_params()["plain_restart"] is True
    want = None if same else ("method parameter plain_restart", True, False)
    assert new.first_difference(old, summary=summary) == want


def test_version_is_the_installed_one(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"gdw {version('gdw')}\n"


def test_threads_sets_torchs_thread_count(tmp_path, capsys):
    try:
        assert main(["train", *QUICK, "--threads", "2", "--epochs", "1", "--method", "ce",
                     "--out", str(tmp_path / "run")]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    code, err = run_cli(["predict", str(tmp_path / "run"), "--data", "x", "--out", "p.csv", "--threads", "0"], capsys)
    assert code == 2 and "--threads must be at least 1" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_the_demo_prints_the_readmes_numbers_whatever_the_thread_count(tmp_path, monkeypatch, capsys):
    """The demo fixes its own thread count: started with two threads it
    prints what the README quotes (measured with one), within the point by
    which CPUs with other vector instructions (AVX2, AVX-512) differ."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    quoted = re.search(r"CE (\d+\.\d\d)%, MW-Net (\d+\.\d\d)%, GDW (\d+\.\d\d)%", readme).groups()
    monkeypatch.chdir(tmp_path)
    try:
        torch.set_num_threads(2)
        assert main(["demo"]) == 0
    finally:
        torch.set_num_threads(1)
    out = capsys.readouterr().out
    printed = tuple(re.search(rf"\| {m} \| \**(\d+\.\d\d)\**", out).group(1) for m in ("ce", "mwnet", "gdw"))
    assert all(abs(float(p) - float(q)) <= 1.0 for p, q in zip(printed, quoted)), (printed, quoted, out)


def test_a_model_module_in_the_current_directory_is_found(tmp_path, monkeypatch, capsys):
    """--model my_net:make finds my_net.py where the command runs, as python -m does, without PYTHONPATH=."""
    from sklearn.datasets import load_digits

    (tmp_path / "my_net_here.py").write_text(
        "import torch\n\n\ndef make(input_shape, num_classes):\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, num_classes))\n")
    np.savez(tmp_path / "new.npz", x=(load_digits().images[:5, None] / 16).astype(np.float32))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    try:
        assert main(["train", *QUICK, "--epochs", "1", "--method", "ce", "--model", "my_net_here:make",
                     "--out", "run"]) == 0
        assert main(["predict", "run", "--data", "npz:new.npz", "--out", "p.csv"]) == 0
    finally:
        sys.modules.pop("my_net_here", None)
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 6


def test_csv_columns_chosen_and_encoded_through_train_and_predict(tmp_path, capsys):
    """--ignore leaves the id out, the text column is one-hot encoded, and
    gdw predict encodes new rows with the categories recorded in the run."""
    rng = np.random.default_rng(0)
    colours = ["red", "green", "blue"]
    lines = ["id;x;colour;label"] + [f"{1000 + i};{rng.normal():.4f};{colours[i % 3]};{'ab'[i % 3 == 0]}"
                                     for i in range(150)]
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "new.csv").write_text("colour,x\nblue,0.1\ngreen,0.2\nred,0.3\n")
    out = tmp_path / "run"
    assert main(["train", "--dataset", f"csv:{tmp_path / 'd.csv'}", "--ignore", "id", "--method", "ce", "--epochs", "3",
                 "--no-progress", "--out", str(out)]) == 0
    pre = json.loads((out / "config.json").read_text())["preprocess"]
    assert pre["feature_columns"] == ["x", "colour"] and pre["categories"] == {"colour": ["blue", "green", "red"]}
    assert main(["predict", str(out), "--data", f"csv:{tmp_path / 'new.csv'}", "--out", str(tmp_path / "p.csv")]) == 0
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert [r.split(",")[1] for r in rows[1:]] == ["a", "a", "b"]  # label b exactly for the red rows


def test_every_setting_with_help_is_a_flag_made_from_its_field():
    """The flags of gdw train come from TrainConfig's fields: a field with help
    text is a flag with that help (and its default), of the field's type."""
    import argparse

    from gdw.cli import build_parser
    from gdw.config import TrainConfig

    parser = build_parser()
    train = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    flags = {a.dest: a for a in train._actions}
    for f in dataclasses.fields(TrainConfig):
        if not f.metadata:
            assert f.name not in flags  # momentum, weight_decay: settings of a config file only
            continue
        action = flags[f.name]
        assert action.help.startswith(f.metadata["help"])
        if f.default not in (None, dataclasses.MISSING) and not isinstance(f.default, bool):
            assert action.help.endswith(f"(default {f.default})") or "(default" in f.metadata["help"]
    args = parser.parse_args(["train", "--epochs", "3", "--lr", "0.05", "--no-progress", "--amp",
                              "--method-args", "lam=0.5"])
    assert (args.epochs, args.lr, args.progress, args.amp, args.method_args) == (3, 0.05, False, True, "lam=0.5")
