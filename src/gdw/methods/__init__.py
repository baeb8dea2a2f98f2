"""Weighting methods. Each lives in one file and registers itself by name."""

from .base import METHODS, MetaMethod, Method, Stats
from .cb import CB
from .ce import CE
from .dm import DM
from .finetune import Finetune
from .focal import Focal, LossMethod
from .gce import GCE
from .gdw import GDW, zero_mean
from .l2rw import L2RW
from .la import LogitAdjusted
from .ldam import LDAM
from .mwnet import MWNet, WeightNet
from .sce import SCE


def make(name: str, model, num_classes: int, **hparams) -> Method:
    """Build the method registered as ``name`` ("ce", "l2rw", "mwnet", "gdw", ...).

    ``hparams`` go to the method's constructor; an unknown name or
    hyper-parameter raises UserError listing the valid ones.
    """
    import inspect

    from ..errors import UserError

    cls = METHODS.get(name)
    accepted = set()
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            accepted |= {p for p, v in inspect.signature(klass.__init__).parameters.items()
                         if v.kind == v.KEYWORD_ONLY}
    unknown = sorted(set(hparams) - accepted)
    if unknown:
        raise UserError(f"method {name!r} has no parameter {', '.join(unknown)}; it takes: {', '.join(sorted(accepted))}")
    return cls(model, num_classes, **hparams)


__all__ = ["METHODS", "Method", "MetaMethod", "Stats", "CE", "GDW", "L2RW", "MWNet", "WeightNet", "make", "zero_mean",
           "CB", "DM", "Finetune", "Focal", "GCE", "LDAM", "LogitAdjusted", "LossMethod", "SCE"]
