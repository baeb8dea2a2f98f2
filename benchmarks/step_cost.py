"""Cost of one training step of every gdw method, relative to a plain step.

Run from the repository root::

    python benchmarks/step_cost.py                      # everything (~8 min on 2 CPU cores)
    python benchmarks/step_cost.py --model mlp --reps 3 --no-sweep --no-data-path
    python benchmarks/step_cost.py --device cuda --out step_cost.md

Every variant is one full step (``optimizer.zero_grad()``, the method's
``backward``, ``optimizer.step()`` with SGD lr 0.1, momentum 0.9, weight decay
5e-4) on fixed random data. Each variant owns one model copy, all built from
the same seeded initial state; variants are timed interleaved round-robin
(sample 1 of every variant, then sample 2, ...) after warm-up, so load from
other processes hits all of them alike. A sample is k consecutive steps, k
chosen so that a plain step sample lasts at least ``SAMPLE_SECONDS``; the
table shows the median seconds per step. Progress goes to stderr, the
Markdown tables to stdout (and to ``--out``).

Peak memory of one step: on CUDA, ``torch.cuda.max_memory_allocated`` minus
the memory allocated just before the step. On CPU (tracemalloc does not see
torch's allocations) each variant runs in a fresh spawned process with glibc's
mmap threshold fixed at 64 KiB, so freed tensors go back to the OS; after
warm-up the process resets its peak RSS (``/proc/self/clear_refs``), runs one
step, and reports VmHWM minus the VmRSS just before the step. Where that reset
is not allowed, it reports the growth of ``ru_maxrss`` over a cold first step.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import math
import multiprocessing
import os
import resource
import shlex
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import gdw
from gdw.data import prepare
from gdw.data.batches import TensorStore, View
from gdw.data.split import Split
from gdw.models import create_model

LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4
SAMPLE_SECONDS = 0.1
SEED = 0
INPUT_SHAPES = {"resnet32": (3, 32, 32), "mlp": (784,)}
DEFAULT_CLASSES = {"resnet32": [10, 100], "mlp": [10]}
SWEEP_CLASSES = (10, 100, 1000)
# (label, method name for gdw.make, or None for a bare loss.backward(), hyper-parameters)
VARIANTS = [
    ("plain CE (loss.backward)", None, {}),
    ("gdw CE method", "ce", {}),
    ("GDW jvp", "gdw", {"meta_grad": "jvp"}),
    ("GDW double", "gdw", {"meta_grad": "double"}),
    ("GDW jvp low_memory", "gdw", {"meta_grad": "jvp", "low_memory": True}),
    ("GDW fd", "gdw", {"meta_grad": "fd"}),
    ("GDW fd_central", "gdw", {"meta_grad": "fd_central"}),
    ("GDW head_only", "gdw", {"head_only": True}),
    ("MW-Net jvp", "mwnet", {"meta_grad": "jvp"}),
    ("MW-Net double", "mwnet", {"meta_grad": "double"}),
    ("L2RW jvp", "l2rw", {"meta_grad": "jvp"}),
    ("L2RW jvp low_memory", "l2rw", {"meta_grad": "jvp", "low_memory": True}),
    ("L2RW fd", "l2rw", {"meta_grad": "fd"}),
    ("L2RW double", "l2rw", {"meta_grad": "double"}),
    ("DM", "dm", {}),
]


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work, so wall-clock timings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_data(shape, classes, batch, meta_batch, device):
    """Fixed seeded random (x, y, x_meta, y_meta) on ``device``."""
    g = torch.Generator().manual_seed(SEED)
    x, xm = torch.randn(batch, *shape, generator=g), torch.randn(meta_batch, *shape, generator=g)
    y, ym = torch.randint(classes, (batch,), generator=g), torch.randint(classes, (meta_batch,), generator=g)
    return tuple(t.to(device) for t in (x, y, xm, ym))


def build_step(model_name, shape, classes, variant, device):
    """A fresh model (same seeded initial state for every call), its optimizer
    and method, and ``step(x, y, xm, ym)``: one full training step."""
    _, name, hparams = variant
    torch.manual_seed(SEED)
    model = create_model(model_name, shape, classes).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    method = None if name is None else gdw.make(name, model, classes, **hparams)

    def step(x, y, xm, ym):
        opt.zero_grad()
        if method is None:
            F.cross_entropy(model(x), y).backward()
        else:
            method.backward(x, y, xm, ym, inner_lr=LR)
        opt.step()

    return step


def timed(fn, n, device) -> float:
    """Seconds per call of ``fn()`` over ``n`` consecutive calls."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / n


def time_interleaved(fns: dict, reps: int, warmup: int, device):
    """Median seconds per call of every function in ``fns`` (the first is the
    baseline), sampled round-robin. Returns ``(medians, min/max, k)``."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    first = next(iter(fns.values()))
    k = max(1, math.ceil(SAMPLE_SECONDS / min(timed(first, 1, device) for _ in range(3))))
    samples = {key: [] for key in fns}
    for r in range(reps):
        for key, fn in fns.items():
            samples[key].append(timed(fn, k, device))
        log(f"    round {r + 1}/{reps} done")
    medians = {key: statistics.median(s) for key, s in samples.items()}
    return medians, {key: (min(s), max(s)) for key, s in samples.items()}, k


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_resettable() -> bool:
    """Whether this process may reset its peak RSS (Linux ≥ 4.0, /proc writable)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_kib("VmHWM")
        return True
    except (OSError, StopIteration):
        return False


def rss_worker(model_name, shape, classes, variants, batch, meta_batch, warmup, threads):
    """In a fresh process: {label: MiB by which one step raises the resident set}.

    With a resettable peak, variants run one after the other, each on its own
    model: warm-up, reset the peak, one step, VmHWM − VmRSS before the step.
    Otherwise (one variant per process) the growth of ru_maxrss over a cold
    first step."""
    torch.set_num_threads(threads)
    cpu = torch.device("cpu")
    data = make_data(shape, classes, batch, meta_batch, cpu)
    out = {}
    for v in variants:
        step = build_step(model_name, shape, classes, v, cpu)
        if not peak_resettable():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            step(*data)
            out[v[0]] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
            continue
        for _ in range(max(1, warmup)):
            step(*data)
        peak_resettable()
        before = _status_kib("VmRSS")
        step(*data)
        out[v[0]] = (_status_kib("VmHWM") - before) / 1024
        del step
    return out


def step_memories(model_name, shape, classes, variants, args, device, steps, data):
    """({label: MiB of peak memory added by one step}, how it was measured)."""
    if device.type == "cuda":
        out = {}
        for label, step in steps.items():
            step(*data)
            sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            step(*data)
            sync(device)
            out[label] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        return out, "CUDA `max_memory_allocated` − `memory_allocated` just before the step, after warm-up"
    resettable = peak_resettable()
    groups = [variants] if resettable else [[v] for v in variants]
    old = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # freed tensors go back to the OS
    out = {}
    try:
        ctx = multiprocessing.get_context("spawn")
        for group in groups:
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as ex:
                out.update(ex.submit(rss_worker, model_name, shape, classes, group, args.batch,
                                     args.meta_batch, args.warmup, torch.get_num_threads()).result())
    finally:
        if old is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = old
    how = ("resident set: a fresh process (glibc mmap threshold 64 KiB, so freed tensors return to the OS) "
           "runs the variants one by one, each on its own model: warm-up, reset of the peak "
           "(`/proc/self/clear_refs`), one step; VmHWM − VmRSS before the step") if resettable else \
        ("resident set: one fresh process per variant; growth of `ru_maxrss` over its cold first step "
         "(includes one-off allocations such as the momentum buffers)")
    return out, how


def variant_table(model_name, classes, variants, args, device) -> list[str]:
    """Time and measure every variant on one (model, C); return Markdown lines."""
    shape = INPUT_SHAPES[model_name]
    log(f"{model_name}, C={classes}: timing {len(variants)} variants")
    data = make_data(shape, classes, args.batch, args.meta_batch, device)
    steps = {v[0]: build_step(model_name, shape, classes, v, device) for v in variants}
    fns = {label: (lambda s=s: s(*data)) for label, s in steps.items()}
    med, spread, k = time_interleaved(fns, args.reps, args.warmup, device)
    base = med[variants[0][0]]
    lines = [f"### {model_name}, C = {classes}, batch {args.batch}, meta batch {args.meta_batch}",
             "", f"{args.reps} samples of {k} step(s) each, interleaved; median.", "",
             "| variant | s / step | × plain | min–max s | peak MiB, one step |",
             "|---|---:|---:|---:|---:|"]
    log(f"  memory of one step, {len(variants)} variants")
    mem, how = step_memories(model_name, shape, classes, variants, args, device, steps, data)
    for v in variants:
        label, mib = v[0], mem[v[0]]
        lo, hi = spread[label]
        lines.append(f"| {label} | {med[label]:.4f} | {med[label] / base:.2f} | {lo:.4f}–{hi:.4f} | {mib:.1f} |")
    return lines + ["", f"Peak memory of one step: {how}.", ""]


def floor_table(model_name, classes, args, device) -> list[str]:
    """The passes a meta step is made of, timed interleaved on one model, and
    the cost they imply for GDW (jvp) and head-only GDW, as multiples of a
    plain step. Floor of GDW: the real forward, the virtual backward, the meta
    forward and backward, the JVP, the real backward = 2F + 3B + JVP."""
    import torch.autograd.forward_ad as fwAD
    from torch.func import functional_call

    shape = INPUT_SHAPES[model_name]
    torch.manual_seed(SEED)
    model = create_model(model_name, shape, classes).to(device).train()
    x, y, _, _ = make_data(shape, classes, args.batch, args.meta_batch, device)
    params = {n: p for n, p in model.named_parameters()}
    tangents = {n: torch.randn_like(p) for n, p in params.items()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}

    def forward():
        model(x)

    def forward_no_grad():
        with torch.no_grad():
            model(x)

    def forward_backward():
        F.cross_entropy(model(x), y).backward()

    def jvp():
        with fwAD.dual_level():
            duals = {n: fwAD.make_dual(p.detach(), tangents[n]) for n, p in params.items()}
            fwAD.unpack_dual(functional_call(model, {**buffers, **duals}, (x,))).tangent

    med, _, _ = time_interleaved(
        {"F+B": forward_backward, "F": forward, "F no grad": forward_no_grad, "JVP": jvp}, args.reps, args.warmup, device
    )
    step, f, b = med["F+B"], med["F"], med["F+B"] - med["F"]
    rows = [
        f"### Where a meta step's time goes: {model_name}, C = {classes}, batch {args.batch}",
        "",
        "| pass | s | × plain step (F+B) |",
        "|---|---:|---:|",
        f"| plain step: forward + backward (F+B) | {step:.4f} | 1.00 |",
        f"| forward with graph (F) | {f:.4f} | {f / step:.2f} |",
        f"| backward (B = (F+B) − F) | {b:.4f} | {b / step:.2f} |",
        f"| forward without graph | {med['F no grad']:.4f} | {med['F no grad'] / step:.2f} |",
        f"| JVP (forward-mode, all parameters) | {med['JVP']:.4f} | {med['JVP'] / step:.2f} ({med['JVP'] / f:.1f} F) |",
        f"| **floor of GDW jvp**: 2F + 3B + JVP | {2 * f + 3 * b + med['JVP']:.4f} | {(2 * f + 3 * b + med['JVP']) / step:.2f} |",
        f"| **floor of GDW head_only**: F + B + forward without graph | {step + med['F no grad']:.4f} | {(step + med['F no grad']) / step:.2f} |",
        "",
    ]
    return rows


def class_sweep(args, device) -> list[str]:
    """How plain CE, GDW (jvp) and MW-Net (jvp) on the MLP grow with C."""
    picked = [v for v in VARIANTS if v[0] in ("plain CE (loss.backward)", "GDW jvp", "MW-Net jvp")]
    fns = {}
    for c in SWEEP_CLASSES:
        data = make_data(INPUT_SHAPES["mlp"], c, args.batch, args.meta_batch, device)
        for v in picked:
            step = build_step("mlp", INPUT_SHAPES["mlp"], c, v, device)
            fns[(v[0], c)] = lambda s=step, d=data: s(*d)
    log(f"class sweep: timing {len(fns)} (variant, C) pairs")
    med, _, k = time_interleaved(fns, args.reps, args.warmup, device)
    names = [v[0] for v in picked]
    lines = [f"### Class-count sweep: mlp (784 → 256 → 256 → C), batch {args.batch}, meta batch {args.meta_batch}",
             "", f"{args.reps} samples of {k} step(s) each, interleaved; s / step (× the same variant at C = 10).", "",
             "| C | " + " | ".join(names) + " | GDW / CE |", "|---:|" + "---:|" * (len(names) + 1)]
    for c in SWEEP_CLASSES:
        cells = [f"{med[(n, c)]:.4f} (×{med[(n, c)] / med[(n, SWEEP_CLASSES[0])]:.2f})" for n in names]
        lines.append(f"| {c} | " + " | ".join(cells) + f" | {med[('GDW jvp', c)] / med[(names[0], c)]:.2f} |")
    return lines + [""]


def epoch_cost(split, model_name, classes, batch, device, reps=3):
    """Median seconds of one epoch of only producing batches, and of producing
    and consuming them with plain CE steps (gdw's "ce" method, SGD)."""
    torch.manual_seed(SEED)
    model = create_model(model_name, split.input_shape, classes).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    method = gdw.make("ce", model, classes)

    def run(epoch, train):
        for x, y, _ in split.batches(batch, shuffle=True, seed=SEED, epoch=epoch, device=device):
            if train:
                opt.zero_grad()
                method.backward(x, y)
                opt.step()

    x, y, _ = next(iter(split.batches(batch, device=device)))
    method.backward(x, y)  # warm-up
    produce, consume = [], []
    for e in range(reps):  # interleaved, like the step timings
        produce.append(timed(lambda: run(e, False), 1, device))
        consume.append(timed(lambda: run(e, True), 1, device))
    return statistics.median(produce), statistics.median(consume)


def data_path(args, device, models) -> list[str]:
    """Share of a plain CE epoch spent producing batches (gather, scale, augment, normalise)."""
    cases, notes = [], []
    try:
        fm = prepare("fashion-mnist", noise="none")
        cases.append((f"Fashion-MNIST train ({len(fm.train)} × 1×28×28 uint8), no augmentation", fm.train, "mlp"))
    except gdw.UserError as e:
        notes.append(f"Fashion-MNIST skipped: {e}")
    n = 1000
    g = torch.Generator().manual_seed(SEED)
    store = TensorStore(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g))
    view = View(torch.full((3,), 0.5), torch.full((3,), 0.25), (32, 32), 4)
    cifar = Split("train", store, np.arange(n), torch.randint(10, (n,), generator=g).numpy(), None, view, augment=True)
    for m in models:
        cases.append((f"synthetic CIFAR-shaped ({n} × 3×32×32 uint8), crop + flip", cifar, m))
    lines = [f"### Data path: batch production vs a plain CE epoch (batch {args.batch}, device {device})", "",
             "Production = iterating `split.batches(...)` alone; consumption = the same epoch with a gdw `ce` "
             "step per batch; compute = consumption − production. Median of 3 epochs, "
             "production and consumption alternating.", "",
             "| data | model | production s / epoch | consumption s / epoch | compute s | production % |",
             "|---|---|---:|---:|---:|---:|"]
    for desc, split, m in cases:
        log(f"data path: {desc}, {m}")
        p, c = epoch_cost(split, m, 10, args.batch, device)
        lines.append(f"| {desc} | {m} | {p:.3f} | {c:.3f} | {c - p:.3f} | {100 * p / c:.1f} % |")
    return lines + [""] + [f"{x}" for x in notes] + ([""] if notes else [])


def header(device) -> list[str]:
    """Environment lines: command, versions, device, CPU, threads, date."""
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    dev = f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)
    cmd = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    return ["## gdw step cost", "",
            f"`{cmd}` — torch {torch.__version__}, gdw {gdw.__version__}, device {dev}, CPU {cpu} "
            f"({os.cpu_count()} logical cores), {torch.get_num_threads()} torch threads, "
            f"{datetime.datetime.now().isoformat(timespec='seconds')}, load average at start "
            f"{os.getloadavg()[0]:.1f}", ""]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["resnet32", "mlp", "all"], default="all")
    p.add_argument("--variants", nargs="+", help="only these variants (names as in the table; the plain step is always kept)")
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--meta-batch", type=int, default=100)
    p.add_argument("--classes", type=int, nargs="+", default=None,
                   help="class counts of the main tables (default: 10 and 100 for resnet32, 10 for mlp)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=5, help="timed samples per variant (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds of every variant before timing")
    p.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True,
                   help="class-count sweep C = 10, 100, 1000 on the MLP")
    p.add_argument("--data-path", action=argparse.BooleanOptionalAction, default=True,
                   help="share of an epoch spent producing batches")
    p.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True,
                   help="time the passes a meta step is made of, and the floor they imply")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--out", help="also write the Markdown to this file")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    models = ["resnet32", "mlp"] if args.model == "all" else [args.model]
    variants = [v for v in VARIANTS if v[1] is None or v[1] in gdw.METHODS]
    if args.variants:
        variants = [v for v in variants if v[1] is None and v is VARIANTS[0] or v[0] in args.variants]
    skipped = [v[0] for v in VARIANTS if v not in variants]
    lines = header(device)
    if skipped:
        lines += [f"Skipped (method not registered in this gdw): {', '.join(skipped)}.", ""]
    for m in models:
        for c in args.classes or DEFAULT_CLASSES[m]:
            lines += variant_table(m, c, variants, args, device)
    if args.floor:
        for m in models:
            lines += floor_table(m, 10, args, device)
    if args.sweep:
        lines += class_sweep(args, device)
    if args.data_path:
        lines += data_path(args, device, models)
    lines.append(f"Total benchmark time: {time.perf_counter() - start:.0f} s.")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
