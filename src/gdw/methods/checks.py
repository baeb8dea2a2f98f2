"""Argument checks shared by the methods: each returns the value it accepts
or raises a UserError that names the argument; and the logit error
e = softmax(z) − onehot(y) every method's gradient is built from."""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
import torch.nn.functional as F

from ..engine import full
from ..errors import UserError


def check_positive(name: str, value: float, *, allow_zero: bool = False) -> float:
    """Return ``float(value)`` or raise UserError naming ``name``."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise UserError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return v


def check_int(name: str, value, minimum: int = 1) -> int:
    """Return ``int(value)`` if it is a whole number ≥ ``minimum``, else raise UserError."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a whole number, got {value!r}") from None
    if not v.is_integer() or v < minimum:
        raise UserError(f"{name} must be a whole number >= {minimum}, got {value!r}")
    return int(v)


def check_bool(name: str, value) -> bool:
    """Return ``value`` as a bool, or raise UserError naming ``name``.

    Accepted: ``True``/``False``, the integers 1/0, and the strings
    ``"true"``/``"false"``, ``"yes"``/``"no"``, ``"1"``/``"0"`` in any case
    (what a command line or a config file passes). Anything else, e.g.
    ``"maybe"``, ``2`` or ``None``, is an error rather than Python's truthiness.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        word = value.strip().lower()
        if word in ("true", "yes", "1"):
            return True
        if word in ("false", "no", "0"):
            return False
    elif isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    elif type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool"):
        return bool(value)
    raise UserError(f"{name} must be True or False (or 1/0, 'true'/'false', 'yes'/'no'), got {value!r}")


def _check_labels(y: torch.Tensor, n: int, num_classes: int, what: str, *, values: bool = True) -> torch.Tensor:
    """Integer (B,) labels as int64. The range check reads the labels: it
    always runs on the CPU, and on an accelerator only when ``values``."""
    if not isinstance(y, torch.Tensor):
        y = torch.as_tensor(y)
    if y.dtype.is_floating_point or y.dtype == torch.bool or y.is_complex():
        raise UserError(f"{what} labels must be integers, got dtype {y.dtype}")
    if y.ndim != 1:
        raise UserError(f"{what} labels must be a 1-D tensor, got shape {tuple(y.shape)}")
    if y.shape[0] != n:
        raise UserError(f"{what}: {n} inputs but {y.shape[0]} labels")
    if n and (values or y.device.type == "cpu"):
        lo, hi = (int(v) for v in torch.stack([y.min(), y.max()]).tolist())
        if lo < 0 or hi >= num_classes:
            raise UserError(f"{what} labels must lie in [0, {num_classes}), got values from {lo} to {hi}")
    return y.long()


def check_class_counts(counts, num_classes: int) -> torch.Tensor:
    """The per-class training counts as a float64 tensor of length C, or UserError."""
    if counts is None:
        raise UserError("class_counts is required: the number of training examples of each class")
    try:
        t = torch.as_tensor(counts).detach().to("cpu", torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise UserError(f"class_counts must be a sequence of {num_classes} whole numbers, got {counts!r}") from None
    if t.ndim != 1 or t.shape[0] != num_classes:
        raise UserError(f"class_counts must have one entry per class ({num_classes}), got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()) or bool((t < 0).any()) or bool((t != t.round()).any()):
        raise UserError(f"class_counts must be whole numbers >= 0, got {t.tolist()}")
    return t


def logit_error(z: torch.Tensor, y: torch.Tensor, num_classes: int, p_max: Optional[float] = None):
    """``(p, e)``: softmax of the detached logits (clamped at ``p_max`` if
    given) and ``e = p − onehot(y)``, both float32 B×C."""
    p = F.softmax(full(z.detach()), 1)
    if p_max is not None:
        p = p.clamp(max=p_max)
    return p, p - F.one_hot(y, num_classes).to(p.dtype)
