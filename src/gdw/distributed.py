"""Data-parallel training across processes (``torchrun``), exact by construction.

DistributedDataParallel only averages ``.grad`` after an ordinary backward; it
does not see the virtual step, the meta-gradient or the batch-wide
normalisers of the weighting methods. gdw therefore does not wrap the model:
when a process group is initialised, every method splits its batch over the
ranks and all-reduces exactly the quantities a single process would have
summed over the whole batch — the virtual-step gradient, the meta-gradient of
the virtual parameters, the weighting network's gradient, GDW's Σ|g|, L2RW's
and DM's Σw, the batch size itself — and finally the parameter gradient. N
ranks with B/N examples each then compute the same weights and the same
update as one process with the B examples concatenated in rank order.

Without a process group (the usual case) every function here is the
identity, at no cost.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Sequence

import torch
import torch.distributed as dist


class Comm:
    """The ranks a batch is split over; identity when there is only one.

    ``Comm()`` joins the default process group when one is initialised
    (what torchrun sets up); ``Comm.single()`` is one process whatever the
    global state. ``gdw.fit`` takes the communicator as an argument.
    """

    def __init__(self, active: bool | None = None):
        if active is None:
            active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.active = bool(active)

    @classmethod
    def single(cls) -> "Comm":
        """One process: every collective is the identity."""
        return cls(active=False)

    @property
    def rank(self) -> int:
        return dist.get_rank() if self.active else 0

    @property
    def world(self) -> int:
        return dist.get_world_size() if self.active else 1

    @property
    def shard(self) -> tuple[int, int] | None:
        """``(rank, world_size)`` for ``Split.batches(shard=...)``, None in one process."""
        return (self.rank, self.world) if self.active else None

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank (any picklable object)."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, t: torch.Tensor, op=None) -> torch.Tensor:
        """Σ over ranks of ``t`` (a new tensor; ``t`` itself is not changed), or another ``dist.ReduceOp``."""
        if not self.active:
            return t
        t = t.detach().clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op)
        return t

    def max(self, t: torch.Tensor) -> torch.Tensor:
        return self.sum(t, dist.ReduceOp.MAX)

    def sum_(self, tensors: Sequence[torch.Tensor]) -> None:
        """All-reduce (sum) a list of tensors in place, in one collective."""
        tensors = [t for t in tensors if t is not None]
        if not self.active or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    def sum_autograd(self, t: torch.Tensor) -> torch.Tensor:
        """Σ over ranks that autograd can differentiate (for ``meta_grad="double"``)."""
        if not self.active:
            return t
        import warnings

        from torch.distributed.nn.functional import all_reduce

        with warnings.catch_warnings():  # deprecated, but its replacement has no autograd yet
            warnings.simplefilter("ignore", FutureWarning)
            return all_reduce(t)

    def count(self, n: int, device) -> "int | torch.Tensor":
        """Σ over ranks of a local count: ``int(n)`` in one process; across
        ranks a 0-d float32 tensor on ``device`` (exact up to 2²⁴), never
        copied to the host, so the per-step path does not synchronise."""
        if not self.active:
            return int(n)
        return self.sum(torch.full((), float(n), device=device))


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", 0))


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" in os.environ


def init_from_env(device_request: str | None, timeout_minutes: float = 10.0) -> torch.device:
    """Join the process group torchrun set up; return this rank's device.

    NCCL on CUDA (device ``cuda:LOCAL_RANK``), gloo on CPU. A rank that fails
    makes torchrun stop the others; the timeout bounds how long a collective
    waits for a rank that died silently.
    """
    local = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() and (device_request in (None, "", "auto")
                                              or str(device_request).startswith("cuda"))
    if use_cuda:
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=timeout_minutes))
    return device
