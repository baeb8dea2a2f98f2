"""Cost of one training step of every gdw method, relative to a plain step.

Run from the repository root::

    python benchmarks/step_cost.py --model resnet32 --classes 10 --no-sweep --no-data-path   # the targets' table
    python benchmarks/step_cost.py                      # everything
    python benchmarks/step_cost.py --model mlp --reps 3 --repeats 3 --no-sweep --no-data-path
    python benchmarks/step_cost.py --device cuda --out step_cost.md

Every variant is one full step (``optimizer.zero_grad()``, the method's
``backward``, ``optimizer.step()`` with SGD lr 0.1, momentum 0.9, weight decay
5e-4) on fixed random data. Each variant owns one model copy, all built from
the same seeded initial state. GDW's default ends training with fine-tuning on
the meta set (``finetune_fraction=0.2``); no epoch is started here, so every
step measured is the weighted step. GDW's default meta-gradient is the
finite difference (``meta_grad="fd"``); "GDW default jvp" is the same step
with the exact forward-mode JVP, "GDW default raw" the same step with the
paper's raw class-level gradient (``class_grad="raw"``).

Timing. One *repeat* is the whole measurement: ``--warmup`` untimed rounds,
then ``--reps`` samples of every variant and of every pass (below), taken
interleaved round-robin (sample 1 of everything, then sample 2, ...), so that
load from other processes hits all of them alike; it gives one median per
variant, and that median's ratio to the same repeat's plain step. The
repeats (``--repeats``, at least 3) run one after the other; the tables give
the median over the repeats and, as the spread, the min–max of the repeats'
ratios. A sample is k consecutive steps, k chosen once so that a plain step
sample lasts at least ``SAMPLE_SECONDS`` (k = 1 for ResNet-32 on a CPU).

Floor. The passes a step is made of are timed in the same rounds on a model of
their own: the forward with graph (F), the backward (B = (F+B) − F), the
forward without graph (N) and the forward-mode JVP in all parameters (J), on
the training batch and (when its size differs) on the meta batch. A variant's
floor is the sum of its passes (e.g. GDW's default: the meta forward and
backward at θ, the real forward, the finite difference's forward and the real
backward, 2F + 2B + N),
per repeat in units of that repeat's plain step; ``"double"`` has none.

Peak memory of one step: on CUDA, ``torch.cuda.max_memory_allocated`` minus
the memory allocated just before the step. On CPU (tracemalloc does not see
torch's allocations) every variant runs in a fresh spawned process of its own
(so nothing another variant allocated or freed can hide or add to its peak),
with glibc's mmap threshold fixed at 64 KiB, so freed tensors go back to the
OS; after warm-up the process resets its peak RSS (``/proc/self/clear_refs``),
runs one step, and reports VmHWM minus the VmRSS just before the step. Where
that reset is not allowed, it reports the growth of ``ru_maxrss`` over a cold
first step. The ratio is to the plain step's.

Targets (``TARGETS``) apply to ResNet-32, C = 10, batch 100; that table gets
a pass/fail table of its own. Progress goes to stderr, the Markdown tables to
stdout (and to ``--out``).
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
from gdw.methods.meta import MetaMethod
from gdw.models import create_model

LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4
SAMPLE_SECONDS = 0.1
SEED = 0
INPUT_SHAPES = {"resnet32": (3, 32, 32), "mlp": (784,)}
DEFAULT_CLASSES = {"resnet32": [10, 100], "mlp": [10]}
SWEEP_CLASSES = (10, 100, 1000)
PLAIN = "plain CE (loss.backward)"
# (label, method name for gdw.make, or None for a bare loss.backward(), hyper-parameters)
VARIANTS = [
    (PLAIN, None, {}),
    ("gdw CE method", "ce", {}),
    ("GDW default", "gdw", {}),
    ("GDW default jvp", "gdw", {"meta_grad": "jvp"}),
    ("GDW default raw", "gdw", {"class_grad": "raw"}),
    ("GDW default uncapped", "gdw", {"max_weight": float("inf")}),
    ("GDW head_only", "gdw", {"head_only": True}),
    ("GDW paper jvp", "gdw", {"stage_one": "mwnet"}),
    ("GDW paper fd", "gdw", {"stage_one": "mwnet", "meta_grad": "fd"}),
    ("GDW paper jvp low_memory", "gdw", {"stage_one": "mwnet", "low_memory": True}),
    ("GDW paper double", "gdw", {"stage_one": "mwnet", "meta_grad": "double"}),
    ("MW-Net jvp", "mwnet", {}),
    ("L2RW jvp", "l2rw", {}),
    ("L2RW fd", "l2rw", {"meta_grad": "fd"}),
    ("DM", "dm", {}),
]
# (what, variant label, "time" or "memory", the largest ratio to the plain step that meets it)
TARGETS = [
    ("GDW default (no virtual step)", "GDW default", "time", 2.5),
    ("GDW paper mode (stage_one=\"mwnet\"), meta_grad=\"fd\"", "GDW paper fd", "time", 3.0),
    ("GDW head_only=True", "GDW head_only", "time", 1.45),
    ("GDW default: peak memory of one step", "GDW default", "memory", 1.5),
]
TARGET_SETTING = ("resnet32", 10, 100)  # model, C, batch the targets are set for


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
    and method, and ``step(x, y, xm, ym)``: one full training step. Returns
    ``(step, method)`` (``method`` is None for the bare loss.backward())."""
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

    return step, method


def timed(fn, n, device) -> float:
    """Seconds per call of ``fn()`` over ``n`` consecutive calls."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / n


def time_interleaved(fns: dict, reps: int, warmup: int, device, k: int | None = None):
    """Median seconds per call of every function in ``fns`` (the first is the
    baseline), sampled round-robin after ``warmup`` rounds; a sample is ``k``
    calls (chosen from the baseline when None). Returns ``(medians, min/max, k)``."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    if k is None:
        first = next(iter(fns.values()))
        k = max(1, math.ceil(SAMPLE_SECONDS / min(timed(first, 1, device) for _ in range(3))))
    samples = {key: [] for key in fns}
    for r in range(reps):
        for key, fn in fns.items():
            samples[key].append(timed(fn, k, device))
        log(f"    round {r + 1}/{reps} done")
    medians = {key: statistics.median(s) for key, s in samples.items()}
    return medians, {key: (min(s), max(s)) for key, s in samples.items()}, k


def repeated(fns: dict, args, device, what: str):
    """``args.repeats`` whole interleaved measurements of ``fns`` (the first is
    the baseline). Returns ``(per-repeat medians, k)``."""
    per, k = [], None
    for r in range(args.repeats):
        log(f"  {what}: repeat {r + 1}/{args.repeats}")
        med, _, k = time_interleaved(fns, args.reps, args.warmup, device, k)
        per.append(med)
    return per, k


def summary(values):
    """``(median, min, max)`` of a list of numbers."""
    return statistics.median(values), min(values), max(values)


# -- the passes a step is made of, and the floor they imply ---------------------------
PASS_NAMES = {"F": "forward with graph", "B": "backward, (F+B) − F", "N": "forward without graph",
              "J": "JVP (forward-mode, all parameters)"}


def pass_functions(model_name, shape, classes, args, device) -> dict:
    """Functions timing one pass each, on a model of their own: ``F+B``, ``F``,
    ``N``, ``J`` on the training batch and, when the meta batch has another
    size, ``Fm+Bm``, ``Fm``, ``Nm`` on it (the meta batch's JVP is never needed)."""
    import torch.autograd.forward_ad as fwAD
    from torch.func import functional_call

    torch.manual_seed(SEED)
    model = create_model(model_name, shape, classes).to(device).train()
    x, y, xm, ym = make_data(shape, classes, args.batch, args.meta_batch, device)
    params = {n: p for n, p in model.named_parameters()}
    tangents = {n: torch.randn_like(p) for n, p in params.items()}

    def forward_backward(a, b):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(a), b).backward()

    def forward(a):
        model(a)

    def forward_no_grad(a):
        with torch.no_grad():
            model(a)

    def jvp(a):
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        with fwAD.dual_level():
            duals = {n: fwAD.make_dual(p.detach(), tangents[n]) for n, p in params.items()}
            fwAD.unpack_dual(functional_call(model, {**buffers, **duals}, (a,))).tangent

    fns = {"F+B": lambda: forward_backward(x, y), "F": lambda: forward(x), "N": lambda: forward_no_grad(x),
           "J": lambda: jvp(x)}
    if args.meta_batch != args.batch:
        fns.update({"Fm+Bm": lambda: forward_backward(xm, ym), "Fm": lambda: forward(xm),
                    "Nm": lambda: forward_no_grad(xm)})
    return fns


def passes_of(method) -> dict | None:
    """The passes one step of ``method`` is made of, ``{pass: count}`` (meta
    batch: ``Fm``, ``Bm``, ``Nm``), or None when it has no floor of that kind
    (``meta_grad="double"`` differentiates through a backward)."""
    if not isinstance(method, MetaMethod):
        return {"F": 1, "B": 1}
    if method.head is not None:  # closed form: the meta batch through the backbone, without a graph
        return {"F": 1, "B": 1, "Nm": 1}
    if method.meta_grad == "double":
        return None
    counts = {"F": 1, "B": 1, "Fm": 1, "Bm": 1}  # real forward and backward; meta forward and backward
    if method.virtual_step:
        counts["B"] += 1  # the virtual step's backward J_zᵀA through the training graph
        counts["F"] += method.recompute  # low_memory: the forward again for the real backward
    tangent, n = {"jvp": ("J", 1), "fd": ("N", 1), "fd_central": ("N", 2)}[method.meta_grad]
    counts[tangent] = counts.get(tangent, 0) + n
    return counts


def pass_seconds(med: dict) -> dict:
    """Seconds of every pass symbol from one repeat's medians of the pass functions."""
    t = {"F": med["F"], "B": med["F+B"] - med["F"], "N": med["N"], "J": med["J"]}
    if "Fm" in med:
        t.update({"Fm": med["Fm"], "Bm": med["Fm+Bm"] - med["Fm"], "Nm": med["Nm"]})
    else:
        t.update({"Fm": t["F"], "Bm": t["B"], "Nm": t["N"]})
    return t


def formula(counts: dict, same_batch: bool) -> str:
    """E.g. ``2F + 3B + J`` (meta passes merged with the training ones when
    the two batches have the same size)."""
    if same_batch:
        merged = {}
        for key, n in counts.items():
            merged[key.rstrip("m")] = merged.get(key.rstrip("m"), 0) + n
        counts = merged
    order = ["F", "Fm", "B", "Bm", "N", "Nm", "J"]
    return " + ".join(f"{'' if counts[k] == 1 else counts[k]}{k}" for k in order if counts.get(k))


# -- peak memory --------------------------------------------------------------------
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


def rss_worker(model_name, shape, classes, variant, batch, meta_batch, warmup, threads):
    """In a fresh process, for one variant: MiB by which one step raises the
    resident set. With a resettable peak: warm-up, reset the peak, one step,
    VmHWM − VmRSS before the step. Otherwise the growth of ru_maxrss over a
    cold first step."""
    torch.set_num_threads(threads)
    cpu = torch.device("cpu")
    data = make_data(shape, classes, batch, meta_batch, cpu)
    step, _ = build_step(model_name, shape, classes, variant, cpu)
    if not peak_resettable():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        step(*data)
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    for _ in range(max(1, warmup)):
        step(*data)
    peak_resettable()
    before = _status_kib("VmRSS")
    step(*data)
    return (_status_kib("VmHWM") - before) / 1024


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
    old = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # freed tensors go back to the OS
    out = {}
    try:
        ctx = multiprocessing.get_context("spawn")
        for v in variants:  # one fresh process per variant: no high-water mark or free list carries over
            log(f"    memory: {v[0]}")
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as ex:
                out[v[0]] = ex.submit(rss_worker, model_name, shape, classes, v, args.batch, args.meta_batch,
                                      args.warmup, torch.get_num_threads()).result()
    finally:
        if old is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = old
    how = ("resident set: one fresh process per variant (glibc mmap threshold 64 KiB, so freed tensors return "
           "to the OS): warm-up, reset of the peak (`/proc/self/clear_refs`), one step; VmHWM − VmRSS before "
           "the step") if resettable else \
        ("resident set: one fresh process per variant; growth of `ru_maxrss` over its cold first step "
         "(includes one-off allocations such as the momentum buffers)")
    return out, how


# -- the tables -----------------------------------------------------------------------
def variant_table(model_name, classes, variants, args, device) -> list[str]:
    """Time and measure every variant (and, with --floor, the passes) on one
    (model, C); return Markdown lines."""
    shape = INPUT_SHAPES[model_name]
    log(f"{model_name}, C={classes}: timing {len(variants)} variants, {args.repeats} repeats")
    data = make_data(shape, classes, args.batch, args.meta_batch, device)
    built = {v[0]: build_step(model_name, shape, classes, v, device) for v in variants}
    steps = {label: b[0] for label, b in built.items()}
    fns = {label: (lambda s=s: s(*data)) for label, s in steps.items()}
    passes = pass_functions(model_name, shape, classes, args, device) if args.floor else {}
    fns.update({("pass", key): fn for key, fn in passes.items()})
    per, k = repeated(fns, args, device, f"{model_name}, C={classes}")
    plain = [m[PLAIN] for m in per]
    same = args.meta_batch == args.batch

    log(f"  memory of one step, {len(variants)} variants")
    mem, how = step_memories(model_name, shape, classes, variants, args, device, steps, data)
    secs = [pass_seconds({key[1]: m[key] for key in m if isinstance(key, tuple)}) for m in per] if passes else None
    rows = {}
    for v in variants:
        label = v[0]
        ratio = summary([m[label] / p for m, p in zip(per, plain)])
        counts = passes_of(built[label][1]) if passes else None
        floor = None
        if counts is not None:  # per repeat: the passes' seconds over that repeat's plain step
            floor = summary([sum(n * t[key] for key, n in counts.items()) / p for t, p in zip(secs, plain)])
        rows[label] = {"s": statistics.median(m[label] for m in per), "ratio": ratio, "floor": floor,
                       "formula": formula(counts, same) if counts else "—", "mib": mem[label],
                       "mem_ratio": mem[label] / mem[PLAIN] if mem[PLAIN] > 0 else float("nan")}

    lines = [f"### {model_name}, C = {classes}, batch {args.batch}, meta batch {args.meta_batch}", "",
             f"{args.repeats} repeats of the whole measurement, each {args.reps} interleaved samples of {k} step(s) "
             "of every variant and pass; × plain = median over the repeats of (the variant's median / the plain "
             "step's median in the same repeat), spread = min–max of those ratios; floor = the variant's passes "
             "(timed in the same rounds), in the same units.", "",
             "| variant | s / step | × plain | spread × | floor × | floor passes | peak MiB, one step | peak × plain |",
             "|---|---:|---:|---:|---:|---|---:|---:|"]
    for v in variants:
        r = rows[v[0]]
        med, lo, hi = r["ratio"]
        floor = "—" if r["floor"] is None else f"{r['floor'][0]:.2f}"
        lines.append(f"| {v[0]} | {r['s']:.4f} | {med:.2f} | {lo:.2f}–{hi:.2f} | {floor} | {r['formula']} | "
                     f"{r['mib']:.1f} | {r['mem_ratio']:.2f} |")
    lines += ["", f"Peak memory of one step: {how}.", ""]
    if passes:
        lines += pass_table(secs, plain, same)
    if (model_name, classes, args.batch) == TARGET_SETTING:
        lines += target_table(rows)
    return lines


def pass_table(secs, plain, same) -> list[str]:
    """Seconds of every pass (median over the repeats) and × the plain step;
    ``secs``: per repeat, :func:`pass_seconds`."""
    keys = ["F", "B", "N", "J"] + ([] if same else ["Fm", "Bm", "Nm"])
    lines = ["Where a step's time goes (passes timed in the same rounds as the steps, on a model of their own; "
             + ("meta batch passes = training batch passes, same size" if same else "m: on the meta batch") + "):",
             "", "| pass | s | × plain step |", "|---|---:|---:|"]
    for key in keys:
        name = PASS_NAMES.get(key.rstrip("m"), key) + (" (meta batch)" if key.endswith("m") else "")
        s = statistics.median(t[key] for t in secs)
        ratio = statistics.median(t[key] / p for t, p in zip(secs, plain))
        lines.append(f"| {name} ({key}) | {s:.4f} | {ratio:.2f} |")
    return lines + [""]


def target_table(rows) -> list[str]:
    """The targets, the measured medians with their spread and floor, and pass/fail."""
    lines = [f"Targets ({TARGET_SETTING[0]}, C = {TARGET_SETTING[1]}, batch {TARGET_SETTING[2]}; ratios to the "
             "plain step; pass = median within the target, \"every repeat\" when the whole spread is):", "",
             "| target | variant | limit | measured × (median) | spread × | floor × | result |",
             "|---|---|---:|---:|---:|---:|---|"]
    for what, label, kind, limit in TARGETS:
        r = rows.get(label)
        if r is None:
            lines.append(f"| {what} | {label} | ≤ {limit:.2f}× | not measured | | | — |")
            continue
        if kind == "memory":
            value = r["mem_ratio"]
            result = "pass" if value <= limit else "fail"
            lines.append(f"| {what} | {label} | ≤ {limit:.2f}× | {value:.2f} ({r['mib']:.0f} MiB) | — | — | {result} |")
            continue
        med, lo, hi = r["ratio"]
        floor = r["floor"][0] if r["floor"] else None
        if med > limit:
            result = "fail" + (" (its floor is above the limit)" if floor is not None and floor > limit else "")
        else:
            result = "pass, every repeat" if hi <= limit else "pass (median; not every repeat)"
        floor_cell = "—" if floor is None else f"{floor:.2f}"
        lines.append(f"| {what} | {label} | ≤ {limit:.2f}× | {med:.2f} | {lo:.2f}–{hi:.2f} | {floor_cell} | {result} |")
    return lines + [""]


def class_sweep(args, device) -> list[str]:
    """How plain CE, GDW's default and GDW's paper mode on the MLP grow with C."""
    picked = [v for v in VARIANTS if v[0] in (PLAIN, "GDW default", "GDW paper jvp")]
    fns = {}
    for c in SWEEP_CLASSES:
        data = make_data(INPUT_SHAPES["mlp"], c, args.batch, args.meta_batch, device)
        for v in picked:
            step, _ = build_step("mlp", INPUT_SHAPES["mlp"], c, v, device)
            fns[(v[0], c)] = lambda s=step, d=data: s(*d)
    log(f"class sweep: timing {len(fns)} (variant, C) pairs")
    per, k = repeated(fns, args, device, "class sweep")
    med = {key: statistics.median(m[key] for m in per) for key in fns}
    names = [v[0] for v in picked]
    lines = [f"### Class-count sweep: mlp (784 → 256 → 256 → C), batch {args.batch}, meta batch {args.meta_batch}",
             "", f"{args.repeats} repeats of {args.reps} interleaved samples of {k} step(s) each; s / step, median "
             "over the repeats (× the same variant at C = 10).", "",
             "| C | " + " | ".join(names) + " | GDW default / CE |", "|---:|" + "---:|" * (len(names) + 1)]
    for c in SWEEP_CLASSES:
        cells = [f"{med[(n, c)]:.4f} (×{med[(n, c)] / med[(n, SWEEP_CLASSES[0])]:.2f})" for n in names]
        lines.append(f"| {c} | " + " | ".join(cells) + f" | {med[('GDW default', c)] / med[(names[0], c)]:.2f} |")
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
    p.add_argument("--reps", type=int, default=5, help="timed samples per variant in one repeat (its median)")
    p.add_argument("--repeats", type=int, default=3,
                   help="whole interleaved measurements (at least 3); the median over them is reported, with the spread")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds of every variant before each repeat")
    p.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True,
                   help="class-count sweep C = 10, 100, 1000 on the MLP")
    p.add_argument("--data-path", action=argparse.BooleanOptionalAction, default=True,
                   help="share of an epoch spent producing batches")
    p.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True,
                   help="time the passes a step is made of (in the same rounds) and give each variant's floor")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--out", help="also write the Markdown to this file")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.repeats < 3:
        raise SystemExit("--repeats must be at least 3 (the spread of the repeats' medians is part of the result)")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    models = ["resnet32", "mlp"] if args.model == "all" else [args.model]
    variants = [v for v in VARIANTS if v[1] is None or v[1] in gdw.METHODS]
    skipped = [v[0] for v in VARIANTS if v not in variants]
    if args.variants:
        variants = [v for v in variants if v[0] == PLAIN or v[0] in args.variants]
    lines = header(device)
    if skipped:
        lines += [f"Skipped (method not registered in this gdw): {', '.join(skipped)}.", ""]
    for m in models:
        for c in args.classes or DEFAULT_CLASSES[m]:
            lines += variant_table(m, c, variants, args, device)
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
