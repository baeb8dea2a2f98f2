"""How the engine calls a model: the training batch's forward and what it leaves
(:class:`TrainForward`), the random state a step replays (:class:`RngState`),
the meta-gradient it hands over (:class:`MetaGradient`), the classifier head's
input (:class:`HeadCapture`), stateless calls through
``torch.func.functional_call`` and how the logits are found in a model's output
(:func:`logits_of`). :mod:`gdw.engine` builds the meta-gradient on these.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn as nn

from . import inputs as model_inputs
from .distributed import Comm
from .errors import UserError

@dataclass
class TrainForward:
    """What the real forward of the training batch left behind.

    ``logits`` (B×C) still carries its autograd graph; ``rng`` is the random
    state before that forward, so that a re-run (the JVP) sees the same
    dropout masks; ``head_input`` is the input of the head (B×D) when only the
    head takes the virtual step; ``comm`` sums over the ranks the batch is
    split over (identity in one process) and ``B`` is the whole batch size.
    """

    model: nn.Module
    x: "model_inputs.Inputs"  # a tensor, a dict of keyword arguments or a tuple of positional ones
    logits: torch.Tensor
    rng: "RngState"
    head_input: Optional[torch.Tensor] = None
    backward_logits: Optional[torch.Tensor] = None  # what the real backward goes through
    recompute: bool = False  # free the graph after the virtual step; re-run the forward for the real backward
    comm: Comm = field(default_factory=Comm)
    meta: Optional["MetaGradient"] = None  # u at θ, computed before the real forward (no virtual step)
    B: int = 0  # the batch size summed over ranks (set by Method.backward; a 0-d tensor when split over ranks)
    output: Optional[Callable[[Any], torch.Tensor]] = None  # picks the logits from the model's output (logits_of)


class RngState:
    """The CPU (and, when used, CUDA) random state, to replay a forward."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextlib.contextmanager
    def replay(self):
        devices = [self.device] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield

    def derived_seed(self) -> int:
        """A seed computed from this state (a hash of it, in [0, 2⁶³)): the
        same state gives the same seed, without drawing from the stream."""
        digest = hashlib.blake2b(self.cpu.numpy().tobytes(), digest_size=8)
        if self.cuda is not None:
            digest.update(self.cuda.numpy().tobytes())
        return int.from_bytes(digest.digest(), "little") >> 1

    @contextlib.contextmanager
    def meta_stream(self):
        """The random state of the meta pass at θ (no virtual step): a
        generator seeded with :meth:`derived_seed`, inside a fork, so that the
        meta batch's dropout masks are the same whether the meta pass runs
        before or after the real forward, and the global stream is left as it
        was."""
        devices = [self.device] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            seed = self.derived_seed()
            torch.default_generator.manual_seed(seed)
            if self.cuda is not None:
                with torch.cuda.device(self.device):
                    torch.cuda.manual_seed(seed)
            yield


@dataclass
class MetaGradient:
    """u = ∇_θ L_meta(θ) at the current parameters (no virtual step).

    ``loss`` is this rank's share of the mean meta cross-entropy (detached),
    ``u`` the gradient by trainable-parameter name (``None`` for a parameter
    that does not reach the logits), already summed over the ranks;
    ``correct`` this rank's count of meta examples predicted as labelled.
    """

    loss: torch.Tensor
    u: dict[str, Optional[torch.Tensor]]
    correct: Optional[torch.Tensor] = None


class HeadCapture:
    """Finds the classifier head and records its input during a forward.

    The head is the last ``nn.Linear`` in ``model.modules()`` whose
    ``out_features`` equals the number of classes, unless one is given. Its
    output must be the model's output itself (checked on every call), since
    the closed form assumes ``z = W h + b``.
    """

    def __init__(self, model: nn.Module, num_classes: int, head: Optional[nn.Module] = None):
        if head is None:
            linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
            if not linears:
                raise UserError(
                    f"head_only=True needs an nn.Linear with out_features={num_classes} producing the logits; "
                    "none was found, pass head= explicitly"
                )
            head = linears[-1]
        if not isinstance(head, nn.Linear):
            raise UserError(f"head must be an nn.Linear, got {type(head).__name__}")
        self.module = head
        self.input: Optional[torch.Tensor] = None
        self.output: Optional[torch.Tensor] = None
        head.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        self.input, self.output = inputs[0], output

    def check(self, logits: torch.Tensor) -> torch.Tensor:
        if self.output is not logits:
            raise UserError(
                "head_only=True needs the model's output to be the output of its head Linear "
                "(no layer after it); pass head= or use head_only=False"
            )
        return self.input.detach()


def full(t: torch.Tensor) -> torch.Tensor:
    """``t`` in at least float32 (half and bfloat16 are promoted; float64 kept)."""
    return t if t.dtype == torch.float64 else t.float()


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that take the virtual step: those that require grad."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def logits_of(out: Any, output: Optional[Callable[[Any], torch.Tensor]] = None) -> torch.Tensor:
    """The logits in a model's output ``out``.

    The rule, in this order:

    1. ``output(out)`` when an ``output=`` callable is given (it takes
       precedence over everything below and must return a tensor);
    2. ``out`` itself when it is a tensor;
    3. ``out.logits`` when ``out`` has that attribute (Hugging Face style
       outputs, named tuples with a ``logits`` field);
    4. ``out["logits"]`` when ``out`` is a mapping (a dict) with that key;
    5. ``out[0]`` when ``out`` is a non-empty tuple or list.

    Anything else (a dict without ``"logits"``, a string, ``None``, an empty
    tuple, a rule that yields a non-tensor) raises a one-line UserError
    naming the type. No value is read, so this costs nothing on any device.
    """
    if output is not None:
        try:
            picked = output(out)
        except Exception as err:  # the user's selector does not fit the output
            raise UserError(
                f"output= could not take the logits from the model's output ({type(out).__name__}): "
                f"{type(err).__name__}: {err}"
            ) from None
        if not isinstance(picked, torch.Tensor):
            raise UserError(f"output= must return the logits as a torch.Tensor, got {type(picked).__name__}")
        return picked
    if isinstance(out, torch.Tensor):
        return out
    if not isinstance(out, (str, bytes)):
        logits = getattr(out, "logits", None)
        if logits is None and isinstance(out, Mapping):
            logits = out.get("logits")
        if logits is None and isinstance(out, (tuple, list)) and len(out) > 0:
            logits = out[0]
        if isinstance(logits, torch.Tensor):
            return logits
    what = type(out).__name__
    if isinstance(out, Mapping) and "logits" not in out:
        what += f" without a 'logits' key (keys: {', '.join(map(repr, list(out)[:8]))})"
    raise UserError(
        f"the model's output must be the logits tensor, or hold it as .logits, ['logits'] or the first element "
        f"of a tuple/list; got {what}: pass output= (e.g. output=lambda out: out[1]) to pick the logits"
    )


def stateless_forward(model: nn.Module, params: dict, x: "model_inputs.Inputs",
                      output: Optional[Callable[[Any], torch.Tensor]] = None) -> torch.Tensor:
    """The logits of the model on ``x`` (a tensor, a dict of keyword
    arguments or a tuple of positional ones: :func:`gdw.inputs.call`; the
    logits: :func:`logits_of`) with ``params`` swapped in and buffers
    copied, so running statistics of the real model are not touched."""
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    return logits_of(model_inputs.call(model, x, {**buffers, **params}), output)


def check_logits_shape(z: torch.Tensor, n: int, num_classes: int) -> None:
    """Raise a UserError unless ``z`` has shape (n, num_classes)."""
    if z.ndim != 2 or z.shape != (n, num_classes):
        raise UserError(
            f"the model must return logits of shape (B, {num_classes}) = ({n}, {num_classes}), got {tuple(z.shape)}; "
            "if its output holds them elsewhere (e.g. second in a tuple), pick them with output= "
            "(e.g. output=lambda out: out[1])"
        )


def math_attention():
    """A context in which ``scaled_dot_product_attention`` uses its math backend."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # an older torch without the selector
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)
