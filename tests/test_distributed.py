"""Two gloo processes on the CPU compute exactly what one process computes on
the concatenated batches, for every method; and `torchrun -m gdw train` works."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import gdw
from models import C, make_batch, make_model

B, BM, STEPS = 9, 7, 3  # odd sizes: the ranks get unequal shares
COUNTS = [40, 20, 10, 5]
CASES = [
    ("ce", {}),
    ("l2rw", {}),
    ("mwnet", {}),
    # GDW's default meta_grad is "fd", which divides the logits' rounding
    # (which differs with the split) by c: the exact "jvp" here, and a larger c
    # than float64's default 1.5e-9 for fd, keep it below the 1e-10 tolerance
    ("gdw", {"meta_grad": "jvp"}),
    ("gdw", {"meta_grad": "double"}),
    ("gdw", {"stage_one": "mwnet"}),
    ("gdw", {"class_counts": COUNTS, "meta_grad": "jvp"}),  # the logit adjustment of gdw train's default
    ("gdw", {"stage_one": "mwnet", "low_memory": True}),
    ("gdw", {"fd_scale": 1e-4}),
    ("gdw", {"class_counts": COUNTS, "fd_scale": 1e-4}),
    ("l2rw", {"meta_grad": "fd_central", "fd_scale": 1e-4, "low_memory": True}),
    ("l2rw", {"low_memory": True}),
    ("gdw", {"head_only": True}),
    ("gdw", {"head_only": True, "meta_grad": "double"}),
    ("mwnet", {"head_only": True}),
    ("dm", {}),
    ("focal", {}),
    ("cb", {"class_counts": COUNTS}),
    ("la", {"class_counts": COUNTS}),
    ("ldam", {"class_counts": COUNTS, "drw": True, "drw_epoch": 1, "s": 1.0}),
    ("gce", {}),
    ("sce", {}),
    ("finetune", {}),
]


def tensor_share(x, rank, world):
    return torch.tensor_split(x, world)[rank]


def run_case(name, kw, rank, world, model_of=lambda: make_model("mlp"),
             batch_of=lambda n, seed: make_batch("mlp", n, seed), share=tensor_share):
    """STEPS optimizer steps of ``name`` on this rank's share of fixed batches
    (``batch_of(n, seed)`` -> (inputs, labels), this rank's inputs
    ``share(inputs, rank, world)``)."""
    model = model_of()  # no BatchNorm: batch statistics would be per rank
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    torch.manual_seed(11)
    method = gdw.make(name, model, C, optimizer=opt, **kw)
    if getattr(method, "vnet", None) is not None:
        method.vnet.double()
    for step in range(STEPS):
        method.on_epoch_start(step // 2, 2)  # finetune and LDAM-DRW switch phase at step 2
        x, y = batch_of(B, 100 + step)
        xm, ym = batch_of(BM, 200 + step)
        if world > 1:
            x, y = share(x, rank, world), tensor_share(y, rank, world)
            xm, ym = share(xm, rank, world), tensor_share(ym, rank, world)
        opt.zero_grad()
        stats = method.backward(x, y, xm, ym)
        opt.step()
    return [p.detach().clone() for p in model.parameters()], stats.loss, stats.weights, stats.trust


def every_case(rank, world):
    return [run_case(name, kw, rank, world) for name, kw in CASES]


def _worker(rank, world, init_file, out_dir, results_of=every_case):
    """One rank: ``results_of(rank, world)`` saved to ``out_dir``/rank{rank}.pt."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = results_of(rank, world)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for k, (name, kw) in enumerate(CASES):
        single, loss, weights, trust = run_case(name, kw, 0, 1)
        for r in range(2):
            params, rank_loss, _, _ = ranks[r][k]
            for a, b in zip(params, single):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"{name} {kw} rank {r}")
            # Stats.loss: a 0-d float32 tensor, the mean over the whole batch on every rank
            assert rank_loss.shape == () and rank_loss.dtype == torch.float32
            torch.testing.assert_close(rank_loss, loss, rtol=1e-6, atol=0, msg=f"{name} {kw}")
        # each rank reports the weights of its share, in the whole batch's convention (G = weights ⊙ e / B)
        for index, want, what in ((2, weights, "weights"), (3, trust, "trust")):
            joined = torch.cat([ranks[r][k][index] for r in range(2)])
            torch.testing.assert_close(joined, want, rtol=1e-10, atol=1e-10, msg=f"{name} {kw} {what}")
        # the parameters really moved, so the equality is not trivial
        initial = list(make_model("mlp").parameters())
        assert not torch.equal(single[0], initial[0].detach())


def test_torchrun_train_on_digits(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "gdw", "train",
         "--dataset", "digits", "--meta-per-class", "10", "--epochs", "2", "--method", "gdw", "--no-progress",
         "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    for key in ("final_test_accuracy", "best_test_accuracy", "realised_noise_rate", "train_seconds", "steps_per_second"):
        assert summary[key] is not None
    assert summary["world_size"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # one run directory
    assert proc.stdout.count("epoch   2/2") == 1  # only rank 0 logs


def mlp_without_batchnorm(input_shape, num_classes):
    """No BatchNorm: its batch statistics would be per rank, so only then do
    two ranks train exactly what one process trains."""
    import numpy as np

    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(int(np.prod(input_shape)), 64), torch.nn.Tanh(),
                               torch.nn.Linear(64, num_classes))


@pytest.mark.parametrize("meta_grad", ["jvp", "fd"])
def test_torchrun_equals_one_process_end_to_end(tmp_path, meta_grad):
    """`torchrun -m gdw train` with two ranks ends with the parameters of the
    same run in one process (GDW, 2 epochs on digits), with the exact
    meta-gradient and with the default finite difference (on a long tail, so
    that the logit adjustment is in effect too)."""
    here = os.path.dirname(__file__)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": here + os.pathsep + os.environ.get("PYTHONPATH", "")}
    flags = ["train", "--dataset", "digits", "--meta-per-class", "10", "--epochs", "2", "--method", "gdw",
             "--model", "test_distributed:mlp_without_batchnorm", "--no-progress", "--device", "cpu",
             "--imbalance", "longtail:10", "--method-args", f"meta_grad={meta_grad}"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "gdw", *flags, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[:3000] + "\n...\n" + two.stderr[-3000:]  # the cause is near the top
    one = subprocess.run([sys.executable, "-m", "gdw", *flags, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    a = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=False)
    # jvp: float32 sums in another order over the steps with momentum, measured max |Δ| ~5e-8.
    # fd: the same rounding in the logits, divided by the step c = 3.5e-5 of the finite
    # difference, measured max |Δ| ~2e-5 (2026-11-25): the bound is ten times that.
    tol = {"jvp": {"rtol": 1e-5, "atol": 1e-6}, "fd": {"rtol": 1e-3, "atol": 2e-4}}[meta_grad]
    for k, v in b["model"].items():
        torch.testing.assert_close(a["model"][k], v, **tol, msg=k)
    assert a["history"][-1]["test_accuracy"] == pytest.approx(b["history"][-1]["test_accuracy"], abs=0.003)
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["world_size"] == 2
    assert b["history"][-1]["test_accuracy"] > 0.5  # it really trained
