"""Data layer of gdw: datasets, label-noise and imbalance protocols, meta sets, batching.

One call builds everything an experiment needs::

    from gdw.data import prepare
    d = prepare("cifar10", noise="uniform:0.4", imbalance="longtail:10", seed=0)
    for x, y, pos in d.train.batches(128, seed=0, epoch=3, device="cuda"):
        ...

Your own data with labels that may be noisy, and a small set checked by hand::

    d = prepare("csv:data.csv", meta="csv:checked.csv", val_per_class=20)
    d.record["warnings"]          # sentences to show the user (empty here)
    d.train.source_rows           # each training example's row in data.csv
    new = load_new("csv:more.csv", d.preprocess, d.classes)   # same model inputs

See :func:`prepare` for the datasets, :mod:`gdw.data.noise` for the noise and imbalance
specs, :mod:`gdw.data.batches` for how batches are formed and
:mod:`gdw.data.download` for downloads.
"""

from .batches import crop_flip, epoch_plan
from .download import fetch, safe_extract
from .noise import (ImbalanceSpec, NoiseSpec, apply_imbalance, apply_noise, longtail_counts, parse_imbalance,
                    parse_noise, realised_noise_rate, realised_transition, step_counts, transition_matrix)
from . import builtin, files  # noqa: F401 - they register the dataset formats
from .builtin import read_idx
from .sources import FORMATS, register_format, stratified_split
from .own import NewData, load_new
from .prepare import prepare
from .split import Prepared, Split, load_split

__all__ = [
    "FORMATS", "register_format", "prepare", "Prepared", "Split", "load_split", "load_new", "NewData",
    "parse_noise", "parse_imbalance", "NoiseSpec", "ImbalanceSpec",
    "apply_noise", "transition_matrix", "realised_transition", "realised_noise_rate",
    "apply_imbalance", "longtail_counts", "step_counts",
    "fetch", "safe_extract", "read_idx", "stratified_split", "crop_flip", "epoch_plan",
]
