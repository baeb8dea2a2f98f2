"""Weighting methods. Each lives in one file and registers itself by name."""

import inspect

from ..errors import UserError
from .base import METHODS, Method, Stats
from .loss import LossMethod
from .meta import MetaMethod, WeightNetMethod
from .cb import CB
from .ce import CE
from .dm import DM
from .finetune import Finetune
from .focal import Focal
from .gce import GCE
from .gdw import GDW, zero_mean
from .l2rw import L2RW
from .la import LogitAdjusted
from .ldam import LDAM
from .mwnet import MWNet, WeightNet
from .sce import SCE


NOT_HYPER_PARAMETERS = ("optimizer", "output", "comm", "class_counts", "meta_counts", "head")


def _keyword_params(cls) -> dict:
    """``{name: default}`` of the keyword-only parameters of the constructors
    of ``cls`` and its bases (a subclass's default wins)."""
    out = {}
    for klass in reversed(cls.__mro__):
        if "__init__" in vars(klass):
            out.update({p: v.default for p, v in inspect.signature(klass.__init__).parameters.items()
                        if v.kind == v.KEYWORD_ONLY})
    return out


def resolved_params(name: str, hparams: dict) -> dict:
    """Every hyper-parameter of method ``name`` as it will be used: the
    constructor defaults (of the class and its bases) updated by ``hparams``,
    without the objects the caller passes (optimizer, comm, ...). Recorded
    in a run's config.json, so that a change of a default is seen."""
    cls = METHODS.get(name)
    given = {**_keyword_params(cls), **hparams}
    return cls.resolve_params({k: v for k, v in given.items() if k not in NOT_HYPER_PARAMETERS})


def make(name: str, model, num_classes: int, **hparams) -> Method:
    """Build the method registered as ``name`` ("ce", "l2rw", "mwnet", "gdw", ...).

    ``hparams`` go to the method's constructor; an unknown name or
    hyper-parameter raises UserError listing the valid ones.
    """
    cls = METHODS.get(name)
    accepted = set(_keyword_params(cls))
    unknown = sorted(set(hparams) - accepted)
    if unknown:
        raise UserError(f"method {name!r} has no parameter {', '.join(unknown)}; "
                        f"it takes: {', '.join(sorted(accepted))}")
    return cls(model, num_classes, **hparams)


def recorded_params(name: str, saved: dict) -> dict:
    """The method parameters saved in a run's config.json, completed with the
    values that parameters added since then had in such a run
    (``Method.ADDED_PARAMS``); ``saved`` itself when the method is unknown."""
    cls = METHODS.get(name) if name in METHODS else None
    added = getattr(cls, "ADDED_PARAMS", {})
    # a parameter recorded as None before it had a default meant the value it had then
    return {**added, **{k: added[k] if v is None and added.get(k) is not None else v for k, v in saved.items()}}


__all__ = ["METHODS", "Method", "MetaMethod", "Stats", "resolved_params", "CE", "GDW", "L2RW", "MWNet", "WeightNet",
           "make", "zero_mean", "CB", "DM", "Finetune", "Focal", "GCE", "LDAM", "LogitAdjusted", "LossMethod", "SCE",
           "WeightNetMethod"]

