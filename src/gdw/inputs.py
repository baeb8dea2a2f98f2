"""What a batch of model inputs may be, and how the model is called on it.

Every forward gdw runs (the real one, the meta forward, the forward-mode
pass, the finite-difference and recomputed forwards, evaluation) calls the
model through :func:`call`, so the inputs may take three forms:

* a tensor ``x``: ``model(x)`` (what the methods have always taken);
* a dict (any mapping) of keyword arguments: ``model(**x)``, e.g. a
  tokenizer's ``{"input_ids": ..., "attention_mask": ...}``;
* a tuple or list of positional arguments: ``model(*x)``, e.g.
  ``(input_ids, attention_mask)`` (a DataLoader's default collation turns a
  tuple into a list, so lists count too).

The batch size is the labels' length. Every tensor in a dict or tuple with
at least one dimension is one row per example (its first dimension must be
the labels' length, checked by ``Method.backward``); other values (a flag, a
0-d tensor) are passed to every call as they are.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Union

import torch
import torch.nn as nn
from torch.func import functional_call

from .errors import UserError

Inputs = Union[torch.Tensor, Mapping[str, Any], tuple, list]


def call(model: nn.Module, x: Inputs, params: Optional[dict] = None):
    """The model's output on ``x`` (see the module's docstring); with
    ``params`` (names → tensors, buffers included) through
    ``torch.func.functional_call``, the module itself unchanged."""
    args = () if isinstance(x, Mapping) else tuple(x) if isinstance(x, (tuple, list)) else (x,)
    kwargs = dict(x) if isinstance(x, Mapping) else {}
    if params is None:
        return model(*args, **kwargs)
    return functional_call(model, params, args, kwargs)


def tensors(x: Inputs) -> list[torch.Tensor]:
    """The tensors of ``x`` that hold one row per example (at least one dimension)."""
    if isinstance(x, torch.Tensor):
        return [x]
    values = x.values() if isinstance(x, Mapping) else x if isinstance(x, (tuple, list)) else ()
    return [v for v in values if isinstance(v, torch.Tensor) and v.ndim > 0]


def device_of(x: Inputs, default: Optional[torch.device] = None) -> torch.device:
    """The device of the first tensor in ``x`` (``default``, else the CPU, when it holds none)."""
    held = tensors(x)
    return held[0].device if held else default if default is not None else torch.device("cpu")


def _each(x: Inputs, fn) -> Inputs:
    """``x`` with ``fn`` applied to the tensor itself or to every value of its dict, tuple or list."""
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, Mapping):
        return {k: fn(v) for k, v in x.items()}
    return [fn(v) for v in x] if isinstance(x, list) else tuple(fn(v) for v in x)


def take(x: Inputs, rows) -> Inputs:
    """The examples ``rows`` (a slice or an index tensor) of ``x``: every
    per-example tensor indexed, the other values kept."""
    return _each(x, lambda v: v[rows] if isinstance(v, torch.Tensor) and v.ndim > 0 else v)


def check(x: Inputs, what: str, *, values: bool = True) -> int:
    """Check the form of ``x``; return its number of examples.

    A tensor needs at least one dimension; a dict or tuple at least one
    tensor with one, and all of them the same first dimension. ``values``:
    also check the floating tensors' values (reads them): a tensor must be
    finite, a dict's or tuple's tensors free of NaN."""
    if isinstance(x, torch.Tensor):
        if x.ndim == 0:
            raise UserError(f"{what} batch is empty")
        held = [x]
    elif isinstance(x, (Mapping, tuple, list)) and not isinstance(x, (str, bytes)):
        held = tensors(x)
        if not held:
            kind = "dict" if isinstance(x, Mapping) else type(x).__name__
            raise UserError(f"{what} inputs: the {kind} holds no tensor with a batch dimension")
        sizes = sorted({int(t.shape[0]) for t in held})
        if len(sizes) > 1:
            items = x.items() if isinstance(x, Mapping) else ((f"[{i}]", v) for i, v in enumerate(x))
            shown = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in items if isinstance(v, torch.Tensor) and v.ndim > 0)
            raise UserError(f"{what} inputs: the tensors' first dimensions differ ({shown}); "
                            "each must hold one row per example")
    else:
        raise UserError(f"{what} inputs must be a torch.Tensor, a dict of tensors (keyword arguments of the model) "
                        f"or a tuple of tensors (positional arguments), got {type(x).__name__}")
    n = int(held[0].shape[0])
    if n == 0:
        raise UserError(f"{what} batch is empty")
    # a plain tensor must be finite; in a dict or tuple only NaN is refused, since an additive attention
    # mask may hold -inf on purpose
    finite = torch.isfinite if isinstance(x, torch.Tensor) else (lambda t: ~torch.isnan(t))
    for t in held:
        if t.is_floating_point() and (values or t.device.type == "cpu") and not bool(finite(t).all()):
            raise UserError(f"{what} inputs contain NaN or infinite values" if isinstance(x, torch.Tensor)
                            else f"{what} inputs contain NaN values")
    return n


def to(x: Inputs, device) -> Inputs:
    """``x`` with every tensor moved to ``device`` (other values kept)."""
    return _each(x, lambda v: v.to(device) if isinstance(v, torch.Tensor) else v)


class InputSplit:
    """A set of examples held in memory, whose inputs are a tensor, a dict of
    tensors or a tuple (see the module's docstring), batched as
    :meth:`gdw.data.Split.batches` batches: what :func:`gdw.fit` and
    :func:`gdw.fit.evaluate` take as ``data.train``, ``data.meta`` or a
    test split when the inputs are not one tensor::

        data = types.SimpleNamespace(train=InputSplit(enc, y), meta=InputSplit(enc_meta, y_meta))
        gdw.fit(model, method, data, optimizer, epochs=3, lr=1e-3)

    with ``enc = {"input_ids": ..., "attention_mask": ...}`` (a tokenizer's
    padded output as tensors). The order of an epoch depends only on
    ``(seed, epoch)``, as for :class:`gdw.data.Split`.
    """

    def __init__(self, inputs: Inputs, labels, name: str = "train"):
        self.labels = torch.as_tensor(labels).long().cpu()
        n = check(inputs, name)
        if self.labels.ndim != 1 or self.labels.shape[0] != n:
            raise UserError(f"{name}: {n} inputs but labels of shape {tuple(self.labels.shape)}")
        self.inputs, self.name = inputs, name
        self.true_labels = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batches(self, batch_size: int, *, shuffle: bool = True, seed: int = 0, epoch: int = 0, device="cpu",
                augment: Optional[bool] = None, drop_last: bool = False, start: int = 0,
                shard: Optional[tuple[int, int]] = None):
        """Yield ``(x, y, pos)`` on ``device`` (arguments as :meth:`gdw.data.Split.batches`;
        no augmentation)."""
        from .data.batches import batch_plan

        if augment:
            raise UserError("InputSplit does not augment; use augment=False")
        _, chunks, _ = batch_plan(len(self), batch_size, shuffle=shuffle, seed=seed, epoch=epoch,
                                  drop_last=drop_last, start=start, shard=shard)
        for pos in chunks:
            yield to(take(self.inputs, pos), device), self.labels[pos].to(device), pos.to(device)
