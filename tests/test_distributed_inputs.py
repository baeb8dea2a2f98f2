"""Two gloo processes compute exactly what one process computes when the
inputs are a dict of keyword arguments or a tuple of positional ones: each
rank takes its share of every tensor in them (gdw.inputs.take)."""

from functools import partial

import torch
import torch.multiprocessing as mp
import torch.nn as nn

from gdw.inputs import take
from models import make_batch, make_model
from test_distributed import _worker, run_case

CASES = [
    ("l2rw", {}),
    ("mwnet", {}),
    ("gdw", {"meta_grad": "jvp"}),  # the L2RW stage one with the guard, which halves the meta batch
    ("gdw", {"fd_scale": 1e-4}),
    ("gdw", {"stage_one": "mwnet", "low_memory": True}),
    ("gdw", {"head_only": True}),
    ("l2rw", {"meta_grad": "double"}),
]


class TwoInputs(nn.Module):
    """An MLP on ``features`` scaled row-wise by ``gate``: ``model(features=..., gate=...)`` or ``model(f, g)``."""

    def __init__(self):
        super().__init__()
        self.inner = make_model("mlp")

    def forward(self, features, gate):
        return self.inner(features * gate[:, None])


def inputs(n, seed, form):
    x, y = make_batch("mlp", n, seed)
    gate = 0.5 + torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return ({"features": x, "gate": gate} if form == "dict" else (x, gate)), y


def share(x, rank, world):
    """This rank's rows of every tensor in the inputs."""
    n = len(x["gate"] if isinstance(x, dict) else x[1])
    return take(x, torch.tensor_split(torch.arange(n), world)[rank])


def every_case(rank, world):
    return [run_case(name, kw, rank, world, model_of=TwoInputs, batch_of=partial(inputs, form=form), share=share)
            for name, kw in CASES for form in ("dict", "tuple")]


def test_two_ranks_equal_one_process_on_dict_and_tuple_inputs(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path), every_case), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    k = 0
    for name, kw in CASES:
        for form in ("dict", "tuple"):
            single, _, weights, _ = run_case(name, kw, 0, 1, model_of=TwoInputs, batch_of=partial(inputs, form=form))
            for r in range(2):
                for a, b in zip(ranks[r][k][0], single):
                    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"{name} {kw} {form} rank {r}")
            joined = torch.cat([ranks[r][k][2] for r in range(2)])
            torch.testing.assert_close(joined, weights, rtol=1e-10, atol=1e-10, msg=f"{name} {kw} {form}")
            assert not torch.equal(single[0], TwoInputs().inner.body[0].weight.detach())
            k += 1
