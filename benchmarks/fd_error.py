"""How far ``meta_grad="fd"`` / ``"fd_central"`` are from ``"jvp"``.

Run from the repository root (about 30 s on one CPU core)::

    python benchmarks/fd_error.py
    python benchmarks/fd_error.py --no-resnet      # only the small test models (a few seconds)

For each model and dtype, one real forward of a training batch in training
mode (BatchNorm on batch statistics, dropout active), a GDW-like logit
gradient ``A = (softmax(z) − onehot(y)) / B`` and a meta batch; then
∂L_meta/∂A from the engine with ``mode="jvp"`` (the exact value up to
rounding) and with the finite-difference modes at several relative steps c.
The table gives ‖dA_fd − dA_jvp‖ / ‖dA_jvp‖ (Frobenius norms). "default" is
the c that :func:`gdw.engine.default_fd_scale` picks for that dtype and
scheme. A second table gives, under bfloat16 autocast, the errors of the JVP
and of the one-sided difference against the float32 JVP, next to how much
the float32 JVP result changes with another meta batch. Markdown on stdout.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from models import C, make_batch, make_model  # noqa: E402  (the test suite's small models)

from gdw.engine import RngState, TrainForward, default_fd_scale, meta_logit_grad, trainable  # noqa: E402
from gdw.models import create_model  # noqa: E402

SCALES = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8)
LR = 0.1


def small(kind, **kw):
    def build(dtype):
        return make_model(kind, **kw).to(dtype).train()

    def data(n, seed, dtype):
        x, y = make_batch(kind, n, seed)
        return x.to(dtype), y

    return build, data, C, 16, 12


def resnet32(batch):
    def build(dtype):
        torch.manual_seed(0)
        return create_model("resnet32", (3, 32, 32), 10).to(dtype).train()

    def data(n, seed, dtype):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(n, 3, 32, 32, generator=g).to(dtype), torch.randint(10, (n,), generator=g)

    return build, data, 10, batch, batch


def rel_errors(spec, dtype):
    """{(scheme, c): relative error}, and the default c of each scheme."""
    build, data, classes, B, BM = spec
    model = build(dtype)
    x, y = data(B, 1, dtype)
    xm, ym = data(BM, 2, dtype)
    torch.manual_seed(3)
    rng = RngState(x.device)
    z = model(x)
    fwd = TrainForward(model, x, z, rng)
    A = (F.softmax(z.detach(), 1) - F.one_hot(y, classes).to(dtype)) / B
    torch.manual_seed(4)  # the meta forward's dropout masks: the same in every call
    _, ref = meta_logit_grad(fwd, A, xm, ym, LR, mode="jvp")
    out, defaults = {}, {}
    dtypes = [p.dtype for p in trainable(model).values()]
    for scheme in ("fd", "fd_central"):
        defaults[scheme] = default_fd_scale(dtypes)
        for c in SCALES + (defaults[scheme],):
            torch.manual_seed(4)
            _, dA = meta_logit_grad(fwd, A, xm, ym, LR, mode=scheme, fd_scale=c)
            out[(scheme, c)] = float((dA - ref).norm() / ref.norm())
    return out, defaults


def autocast_errors(spec):
    """Relative errors against the float32 JVP under bfloat16 autocast (CPU):
    {"jvp": ..., "fd": ...} at the default step, and "meta batch": the
    relative difference between the float32 JVP results of two meta batches
    (the sampling noise the meta-gradient has anyway). Without a virtual
    step (A = None, GDW's default and L2RW)."""
    build, data, classes, B, BM = spec
    model = build(torch.float32)
    x, y = data(B, 1, torch.float32)

    def dA(mode, amp, meta_seed=2):
        xm, ym = data(BM, meta_seed, torch.float32)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            torch.manual_seed(3)
            rng = RngState(x.device)
            fwd = TrainForward(model, x, model(x), rng)
            torch.manual_seed(4)
            return meta_logit_grad(fwd, None, xm, ym, LR, mode=mode)[1].float()

    ref = dA("jvp", False)
    rel = lambda a: float((a - ref).norm() / ref.norm())  # noqa: E731
    return {"jvp": rel(dA("jvp", True)), "fd": rel(dA("fd", True)), "meta batch": rel(dA("jvp", False, 5))}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resnet", action=argparse.BooleanOptionalAction, default=True,
                   help="also resnet32 (3x32x32, 10 classes, BatchNorm, ReLU) at batch --resnet-batch")
    p.add_argument("--resnet-batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    specs = {
        "MLP (tanh)": small("mlp"),
        "CNN + BatchNorm": small("cnn"),
        "MLP + dropout 0.3": small("mlp", dropout=0.3),
    }
    if args.resnet:
        specs[f"resnet32, batch {args.resnet_batch}"] = resnet32(args.resnet_batch)
    head = "| model | dtype | scheme | " + " | ".join(f"c={c:.0e}" for c in SCALES) + " | default c | at default |"
    lines = ["### ‖dA_fd − dA_jvp‖ / ‖dA_jvp‖", "", head, "|---|---|---|" + "---:|" * (len(SCALES) + 2)]
    for name, spec in specs.items():
        for dtype in (torch.float64, torch.float32):
            errs, defaults = rel_errors(spec, dtype)
            for scheme in ("fd", "fd_central"):
                cells = [f"{errs[(scheme, c)]:.1e}" for c in SCALES]
                d = defaults[scheme]
                lines.append(f"| {name} | {str(dtype).replace('torch.', '')} | {scheme} | " + " | ".join(cells)
                             + f" | {d:.1e} | **{errs[(scheme, d)]:.1e}** |")
            print(f"{name} {dtype} done", file=sys.stderr, flush=True)
    lines += ["", "### Under bfloat16 autocast: ‖dA − dA_jvp,float32‖ / ‖dA_jvp,float32‖", "",
              "| model | jvp, bf16 | fd, bf16 (default c) | another meta batch, float32 jvp |", "|---|---:|---:|---:|"]
    for name, spec in specs.items():
        e = autocast_errors(spec)
        lines.append(f"| {name} | {e['jvp']:.1e} | {e['fd']:.1e} | {e['meta batch']:.1e} |")
    lines += ["", f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
              f"{time.perf_counter() - start:.1f} s."]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
