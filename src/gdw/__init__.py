"""gdw: train classifiers on noisy, imbalanced labels by data weighting.

The centre is Generalized Data Weighting (GDW), which learns one weight per
class-level gradient flow of every example from a small clean meta set; around
it stand MW-Net, L2RW, Derivative Manipulation and robust-loss baselines, all
used the same way in any PyTorch training loop::

    w = gdw.GDW(model, num_classes=10)
    optimizer.zero_grad()
    stats = w.backward(x, y, x_meta, y_meta, inner_lr=lr)
    optimizer.step()
"""

from .errors import UserError
from .callbacks import Callback
from .detect import read_label_issues
from .recorder import LabelIssueRecorder
from .fit import batches, cycle, fit
from .methods import CE, GDW, L2RW, METHODS, Method, MetaMethod, MWNet, Stats, WeightNet, make
from .issues import LabelIssues, find_label_issues, label_score
from .prior import prediction_shift

__version__ = "0.1.0"

__all__ = ["Callback", "CE", "GDW", "L2RW", "MWNet", "METHODS", "Method", "MetaMethod", "Stats", "UserError",
           "WeightNet", "cycle", "batches", "read_label_issues", "prediction_shift", "find_label_issues", "label_score", "LabelIssues",
           "LabelIssueRecorder", "fit", "make", "__version__"]
