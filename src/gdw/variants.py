"""The named method variants of ``gdw compare`` and the benchmark grids: one
table, label -> ``(method, method_args, head_only)``. A method's name is a
variant too, the method at its defaults; ``LABEL-head`` is LABEL on the
output layer only. GDW's variants are spelled out in full, so that a label
keeps its parameters when a default changes (the old default then takes a
label, as ``gdw-raw`` did): ``gdw`` here writes the defaults out for the
benchmarks' cells, while ``gdw compare --methods gdw`` runs the method by
its name; the tests check that the two agree.
"""

from __future__ import annotations

import math

from .errors import UserError
from .methods import METHODS

CAPPED = {"stage_one": "l2rw", "finetune_fraction": 0.2, "tau": 1.0, "meta_grad": "fd", "weight_norm": "kept",
          "class_grad": "constrained", "max_weight": 1.0, "finetune_min_noise": 0.04,
          "plain_below": 0.0, "plain_restart": False,
          "raw_factor": 0.0, "plain_epochs": "left",
          "unchecked_meta": "weight"}  # the defaults to question 14 (plain_below: off until 18)
AUTO = {**CAPPED, "max_weight": "auto"}  # the defaults from question 14 to question 18
CONTINUE = {**AUTO, "plain_below": 0.08}  # the defaults from question 18 to question 19
RESTART = {**CONTINUE, "plain_restart": True}  # the defaults from question 19 to question 20
RAWCHECK = {**RESTART, "raw_factor": 2.0}  # the defaults from question 20 to question 21
DEFAULT = {**RAWCHECK, "unchecked_meta": "ce"}  # gdw's defaults
# (DEFAULT leaves meta_prior to its default, "meta" since question 13; it only changes runs whose meta set is not
# balanced, so the suite's runs made before it keep their label wherever the meta set is balanced)
MODEL_PRIOR = {"meta_prior": "model"}  # the meta loss on the model's own logits: every default before question 13
ALWAYS = {**CAPPED, "finetune_min_noise": 0.0, **MODEL_PRIOR}  # the default before finetune_min_noise
L2RW_STEP = {"stage_one": "l2rw", "finetune_fraction": 0.0, "tau": 0.0, "meta_grad": "jvp", "weight_norm": "batch",
             "class_grad": "raw", "max_weight": math.inf,
             "finetune_min_noise": 0.0, "plain_below": 0.0, "plain_restart": False, "raw_factor": 0.0,
             "plain_epochs": "left", "unchecked_meta": "weight",
             **MODEL_PRIOR}  # the class-level step on L2RW alone, exactly
VARIANTS = {
    "l2rw-ft": ("l2rw", {"finetune_fraction": 0.2}, False),
    "gdw-paper": ("gdw", {"stage_one": "mwnet"}, False),  # the paper's algorithm
    # the same parameters, spelled as the robustness suite's cells were trained (it shows them as gdw-paper)
    "gdw-paper-ft0": ("gdw", {"stage_one": "mwnet", "finetune_fraction": 0.0}, False),
    "gdw": ("gdw", {**DEFAULT}, False),
    "gdw-jvp": ("gdw", {**ALWAYS, "meta_grad": "jvp"}, False),
    "gdw-uncapped": ("gdw", {**ALWAYS, "max_weight": math.inf}, False),  # the default before max_weight
    "gdw-raw": ("gdw", {**ALWAYS, "class_grad": "raw", "max_weight": math.inf}, False),  # ... before class_grad
    "gdw-batch": ("gdw", {**ALWAYS, "weight_norm": "batch", "class_grad": "raw", "max_weight": math.inf},
                  False),  # ... before weight_norm="kept"
    "gdw-binary": ("gdw", {**ALWAYS, "weight_norm": "binary"}, False),  # one for each kept example
    "gdw-guarded": ("gdw", {**ALWAYS, "guard": 0.05}, False),  # the held-out check on the meta batch
    "gdw-gated": ("gdw", {**ALWAYS, "gate": 0.2, "gate_form": "linear"}, False),  # the noise gate, in proportion
    "gdw-stepped": ("gdw", {**ALWAYS, "gate": 0.05, "gate_form": "step"}, False),  # ... all or nothing
    "gdw-ft0": ("gdw", {**ALWAYS, "finetune_fraction": 0.0}, False),  # no fine-tuning phase on the meta set
    "gdw-ftcheck": ("gdw", {**CAPPED, **MODEL_PRIOR}, False),  # the default from question 9 to 12
    "gdw-ftalways": ("gdw", {**ALWAYS}, False),  # the default before it
    "gdw-own-guarded": ("gdw", {**CAPPED, **MODEL_PRIOR, "guard": 0.05}, False),  # ... with the held-out check
    "gdw-metaprior": ("gdw", {**CAPPED, "meta_prior": "meta"}, False),  # the meta loss under the meta set's prior
    "gdw-cap1": ("gdw", {**CAPPED}, False),  # the same, spelled as the suite's cells were: the default to question 14
    # no cap on the instance weights where the model has BatchNorm and the classes are about equally frequent
    "gdw-autocap": ("gdw", {**CAPPED, "meta_prior": "meta", "max_weight": "auto"}, False),
    # ... and the cap kept where the meta set's classes are 1.5 or more times as frequent as another (a natural prior)
    "gdw-autoprior": ("gdw", {**CAPPED, "meta_prior": "meta", "max_weight": "auto", "cap_meta_ratio": 1.5}, False),
    # ... and plain training from a quarter of the run on where under 8% of the labels look wrong (question 16)
    "gdw-lateplain": ("gdw", {**CAPPED, "meta_prior": "meta", "max_weight": "auto", "plain_below": 0.08}, False),
    # ... and the instance weights capped at 1 from a quarter of the run on where under 8% look wrong (question 17)
    "gdw-latecap": ("gdw", {**CAPPED, "meta_prior": "meta", "max_weight": "auto", "cap_below": 0.08}, False),
    # ... and that plain training restarted from the initial weights (question 19)
    "gdw-restart": ("gdw", {**CAPPED, "meta_prior": "meta", "max_weight": "auto", "plain_below": 0.08,
                            "plain_restart": True}, False),
    # ... and the check's switch only where the uncorrected disagreement is also under twice the bound (question 20)
    "gdw-rawcheck": ("gdw", {**CAPPED, "meta_prior": "meta", "max_weight": "auto", "plain_below": 0.08,
                             "plain_restart": True, "raw_factor": 2.0}, False),
    # ... and the restarted plain training on the whole schedule again (question 21: not adopted)
    "gdw-fullrestart": ("gdw", {**CAPPED, "meta_prior": "meta", "max_weight": "auto", "plain_below": 0.08,
                                "plain_restart": True, "raw_factor": 2.0, "plain_epochs": "all"}, False),
    # ... (question 20's) and plain training from the start where the meta set is drawn from labels not known to be
    # clean (question 22; the default until that plain training became CE's, unchecked_meta="ce")
    "gdw-ownplain": ("gdw", {**CAPPED, "meta_prior": "meta", "max_weight": "auto", "plain_below": 0.08,
                             "plain_restart": True, "raw_factor": 2.0, "unchecked_meta": "plain"}, False),
    "gdw-auto": ("gdw", {**AUTO}, False),  # the default from question 14 to 18, spelled as the suite's cells were
    "gdw-continue": ("gdw", {**CONTINUE}, False),  # ... from 18 to 19: the plain training goes on from where it is
    "gdw-restarted": ("gdw", {**RESTART}, False),  # ... from 19 to 20: the switch without the disagreement check
    "gdw-rawchecked": ("gdw", {**RAWCHECK}, False),  # ... from 20 to 22: the weighting on an unchecked meta set
    "gdw-tau0": ("gdw", {**ALWAYS, "tau": 0.0, "class_grad": "raw", "max_weight": math.inf}, False),
    "gdw-l2rw": ("gdw", {**L2RW_STEP}, False),
    "gdw-l2rw-c": ("gdw", {**L2RW_STEP, "class_grad": "constrained"}, False),  # ... through the constraint
}


def variant(label: str) -> tuple[str, dict, bool]:
    """``(method, method_args, head_only)`` of ``label``: a method's name
    (``NAME-head``: head-only) at its defaults, else the table's entry."""
    base, head = (label[:-5], True) if label.endswith("-head") else (label, False)
    if base in METHODS:
        return base, {}, head
    if label in VARIANTS or base in VARIANTS:
        method, args, head_only = VARIANTS.get(label) or VARIANTS[base]
        return method, args, head_only or head
    raise UserError(f"unknown method {label!r}; choose one of: {', '.join(METHODS.names())} (NAME-head: the "
                    f"output layer only), or a variant: {', '.join(VARIANTS)}")


def pick(labels, renamed=None) -> dict:
    """A benchmark's table, ``{label: variant}`` in the order of ``labels``:
    the table's entry, else :func:`variant`'s; ``renamed`` maps a label to
    the one it runs (cells trained under another spelling keep their label)."""
    names = {label: (renamed or {}).get(label, label) for label in labels}
    return {label: VARIANTS.get(name) or variant(name) for label, name in names.items()}
