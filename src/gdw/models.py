"""Model registry: ``create_model(name, input_shape, num_classes)``.

Built in: ``mlp`` (two hidden layers of 256 with BatchNorm), ``mlp-plain``
(the same without BatchNorm), ``cnn`` (a small
conv net), ``resnet32`` (the CIFAR ResNet of He et al. 2016 used by the GDW
and MW-Net papers). A user's own model is ``"package.module:factory"``, where
``factory(input_shape, num_classes)`` — or ``factory(num_classes=...)`` —
returns an ``nn.Module`` whose output is the logits (or holds them: see
:func:`gdw.engine.logits_of`). A new built-in model is
one function decorated with ``@MODELS.register("name")``.
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from .engine import logits_of
from .errors import UserError
from .registry import Registry

MODELS: Registry = Registry("model")


@MODELS.register("mlp")
def mlp(input_shape, num_classes, hidden: int = 256, depth: int = 2, norm: bool = True) -> nn.Module:
    """Flatten → [Linear(hidden) → BatchNorm → ReLU] × depth → Linear(C)
    (without the BatchNorm when ``norm`` is False)."""
    layers, width = [nn.Flatten()], math.prod(input_shape)
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), *([nn.BatchNorm1d(hidden)] if norm else []), nn.ReLU(inplace=True)]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


@MODELS.register("mlp-plain")
def mlp_plain(input_shape, num_classes, hidden: int = 256, depth: int = 2) -> nn.Module:
    """``mlp`` without normalisation layers: Flatten → [Linear(hidden) → ReLU]
    × depth → Linear(C), the kind of model many users bring."""
    return mlp(input_shape, num_classes, hidden, depth, norm=False)


def _image_shape(input_shape, name):
    if len(input_shape) != 3:
        raise UserError(f"model {name!r} needs image inputs (channels, height, width), got shape {tuple(input_shape)}")
    return input_shape


@MODELS.register("cnn")
def cnn(input_shape, num_classes, width: int = 32) -> nn.Module:
    """Two conv blocks (3×3 conv → BatchNorm → ReLU → 2×2 max-pool), global
    average pooling, linear head. Works for any image size ≥ 4×4."""
    c = _image_shape(input_shape, "cnn")[0]

    def block(i, o):
        return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True), nn.MaxPool2d(2)]

    return nn.Sequential(*block(c, width), *block(width, 2 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(2 * width, num_classes))


class BasicBlock(nn.Module):
    """Two 3×3 convs with BatchNorm; the shortcut subsamples and zero-pads
    channels when the shape changes (option A of the ResNet paper)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.stride, self.pad = stride, cout - cin

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        short = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
        if self.pad:
            short = F.pad(short, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + short)


class ResNetCifar(nn.Module):
    """ResNet-(6n+2) for small images: 16/32/64 channels, n blocks a stage."""

    def __init__(self, in_channels: int, num_classes: int, n: int = 5):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        blocks, cin = [], 16
        for stage, cout in enumerate((16, 32, 64)):
            for i in range(n):
                blocks.append(BasicBlock(cin, cout, 2 if stage > 0 and i == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):
        x = self.blocks(F.relu(self.bn(self.conv(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


@MODELS.register("resnet32")
def resnet32(input_shape, num_classes) -> nn.Module:
    """ResNet-32 (5 blocks per stage), the GDW / MW-Net CIFAR model."""
    return ResNetCifar(_image_shape(input_shape, "resnet32")[0], num_classes, n=5)


def create_model(name: str, input_shape, num_classes: int, **kwargs) -> nn.Module:
    """Build a registered model, or ``"module.path:factory"`` for your own.

    Args:
        name: a registered name (``mlp``, ``cnn``, ``resnet32``) or
            ``"package.module:factory"`` (found on ``sys.path`` or in the
            current directory).
        input_shape: shape of one example, e.g. ``(1, 28, 28)`` or ``(64,)``.
        num_classes: C, the width of the logits.
    Raises:
        UserError: unknown name, a module or factory that cannot be imported,
            a factory that raises (the message says how it was called and
            what it raised) or does not return an ``nn.Module``.
    """
    input_shape = tuple(int(s) for s in input_shape)
    if ":" in name and name not in MODELS:
        mod_name, _, attr = name.partition(":")
        if os.getcwd() not in sys.path:  # a module.py in the current directory is found, as by python -m
            sys.path.append(os.getcwd())
        try:
            factory = getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError) as err:
            raise UserError(f"cannot load model factory {name!r} (from the current directory or the installed "
                            f"packages): {err}") from None
        if not callable(factory):
            raise UserError(f"model factory {name!r} is a {type(factory).__name__}, not a function or class")
        try:
            params = inspect.signature(factory).parameters
        except (TypeError, ValueError):
            params = {}
        positional = "input_shape" in params or len(params) >= 2
        args, kw = ((input_shape, num_classes), kwargs) if positional else ((), {"num_classes": num_classes, **kwargs})
        try:
            inspect.signature(factory).bind(*args, **kw)
        except TypeError as err:
            raise UserError(f"model factory {name!r} must accept (input_shape, num_classes) or num_classes=: "
                            f"{err}") from None
        except ValueError:
            pass  # no signature to check (a builtin); the call itself will tell
        try:
            model = factory(*args, **kw)
        except Exception as err:  # the user's own code: say how it was called and what it raised, in one line
            call = (f"{attr}({input_shape}, {num_classes})" if positional else f"{attr}(num_classes={num_classes})")
            raise UserError(f"model factory {name!r} failed when called as {call} (input_shape is the shape of one "
                            f"example, a tuple): {type(err).__name__}: {err}") from None
        if not isinstance(model, nn.Module):
            raise UserError(f"model factory {name!r} returned {type(model).__name__}, not an nn.Module")
        return model
    return MODELS.get(name)(input_shape, num_classes, **kwargs)


def check_logits(model: nn.Module, input_shape, num_classes: int, device="cpu", output=None) -> None:
    """Run two fake examples through ``model`` (in eval mode, state restored)
    and raise UserError unless the logits in its output (the tensor itself,
    ``.logits``, ``["logits"]`` or the first element of a tuple/list, or what
    the callable ``output`` picks; see :func:`gdw.engine.logits_of`) have
    shape (2, num_classes)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *input_shape, device=device))
    except Exception as err:  # a user model that does not fit the data
        raise UserError(f"the model cannot take inputs of shape {tuple(input_shape)}: {err}") from None
    finally:
        model.train(was_training)
    logits = logits_of(out, output)
    if tuple(logits.shape) != (2, num_classes):
        tuple_out = output is None and isinstance(out, (tuple, list))
        raise UserError(f"the model must return logits of shape (B, {num_classes}), got {tuple(logits.shape)}" + (
            " as the first element of its tuple output: return the logits first, or (from Python) pick them "
            "with output=, e.g. output=lambda out: out[1]" if tuple_out else ""))
