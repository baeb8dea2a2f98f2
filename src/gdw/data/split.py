"""``prepare``: dataset + noise spec + imbalance spec -> train / meta / test splits + record.

Order of operations (fixed):

1. read the source; the train/test split is the published one, or a stratified split
   with the fixed seed 0 (digits, csv, folder) -- the same for every experiment seed;
2. meta set: ``meta_per_class`` examples of every class drawn by TRUE label from the
   training array (at least one example of each class must stay for training) and
   removed from it -- or the clean meta set shipped with the data (npz ``x_meta``,
   Clothing1M clean val / clean train); always clean, disjoint from the training set;
3. imbalance: applied by TRUE class to what is left of the training array;
4. noise: synthetic noise injected into the true labels of the kept examples, or the
   real noisy labels (CIFAR-N label file, Clothing1M, npz ``y_train`` with
   ``y_train_true``) looked up for them.

Randomness: ``np.random.SeedSequence(seed).spawn(3)`` gives three independent numpy
generators for steps 2, 3 and 4, so the same seed gives the same split and labels.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ._errors import one_line
from .batches import View, iterate, mix_seed
from .noise import (apply_imbalance, apply_noise, parse_imbalance, parse_noise,
                    realised_noise_rate, realised_transition)
from .sources import CIFAR_N, load_source, read_cifar_n, resolve


class Split:
    """One set of examples (train, meta or test) and how to batch it.

    Attributes:
        name: "train", "meta" or "test".
        labels: (N,) LongTensor, the labels training sees (noisy for the training set).
        true_labels: (N,) LongTensor of true labels (-1 where unknown) or None.
        index: (N,) LongTensor, position of each example in the dataset's original training
            array (train, and meta drawn from it), or in its own array (test, a meta set
            that came with the data).
        augment: default of ``batches(augment=None)``.
        input_shape: shape of one model input, e.g. (3, 32, 32) or (D,).
    """

    def __init__(self, name: str, store, index, labels, true_labels, view: View, *,
                 augment: bool = False, num_workers: int = 0):
        self.name = name
        self.store, self.view = store, view
        self.index = torch.tensor(np.asarray(index), dtype=torch.long)
        self.labels = torch.tensor(np.asarray(labels), dtype=torch.long)
        self.true_labels = None if true_labels is None else \
            torch.tensor(np.asarray(true_labels), dtype=torch.long)
        self.augment = bool(augment)
        self.num_workers = int(num_workers)

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return f"Split({self.name!r}, n={len(self)}, input_shape={self.input_shape})"

    @property
    def input_shape(self) -> tuple:
        return (self.store.shape[0], *self.view.out_hw) if self.view.out_hw else self.store.shape

    def batches(self, batch_size: int, *, shuffle: bool = True, seed: int = 0, epoch: int = 0,
                device="cpu", augment: bool | None = None, drop_last: bool = False,
                start: int = 0, shard: tuple[int, int] | None = None):
        """Iterate over the split in batches.

        Yields ``(x, y, pos)`` on ``device``: x float32 (b, *input_shape), scaled and
        normalised (and augmented if asked); y (b,) LongTensor labels; pos (b,)
        LongTensor positions 0..len(self)-1 of the examples within this split.

        shuffle: random order (else 0..N-1). seed, epoch: non-negative ints; the order
        and augmentation of an epoch depend only on them (drawn on the CPU), so batches
        are identical on every device. augment: None -> ``self.augment`` (True only for
        CIFAR-style colour 32x32 and Clothing1M training sets); crop with zero padding +
        horizontal flip. drop_last: skip a final short batch. start: index of the first
        batch to yield (resume in mid-epoch without reading the skipped batches).
        shard: ``(rank, world_size)`` for data-parallel training: every rank walks the
        same global batches and yields only its contiguous share of each
        (``torch.tensor_split`` order), so the shares concatenated in rank order are
        the batch one process would see; a final batch smaller than world_size is
        skipped.
        Every example appears exactly once per epoch (unless dropped by drop_last).
        Raises UserError for a bad batch_size/seed/epoch or augment=True on tabular data.
        """
        aug = self.augment if augment is None else bool(augment)
        return iterate(self.store, self.index, self.labels, self.view, batch_size,
                       shuffle=shuffle, seed=seed, epoch=epoch, device=device, augment=aug,
                       drop_last=drop_last, start=start, num_workers=self.num_workers,
                       shard=shard)


@dataclass
class Prepared:
    """Result of :func:`prepare`: ``train``, ``meta`` (None if meta_per_class=0),
    ``test`` splits, ``classes`` (names), ``input_shape`` and a JSON-serialisable
    ``record`` of what was done."""

    train: Split
    meta: Split | None
    test: Split
    classes: list
    input_shape: tuple
    record: dict

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def save_split(self, path) -> Path:
        """Save the split as ``.npz``: train_index, train_labels, train_true_labels (-1 =
        unknown), meta_index, meta_labels (empty without a meta set), meta_source,
        test_size, seed, record (JSON text). Returns the path written."""
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")
        tr = self.train
        true = tr.true_labels if tr.true_labels is not None else torch.full_like(tr.labels, -1)
        empty = np.zeros(0, dtype=np.int64)
        np.savez(path, train_index=tr.index.numpy(), train_labels=tr.labels.numpy(),
                 train_true_labels=true.numpy(),
                 meta_index=self.meta.index.numpy() if self.meta is not None else empty,
                 meta_labels=self.meta.labels.numpy() if self.meta is not None else empty,
                 meta_source=np.array(self.record["meta_source"]),
                 test_size=np.int64(len(self.test)), seed=np.int64(self.record["seed"]),
                 record=np.array(json.dumps(self.record)))
        return path


def load_split(path) -> dict:
    """Read a file written by :meth:`Prepared.save_split` into a dict of numpy arrays
    (``record`` decoded from JSON). UserError if it is missing or not such a file."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
        out["record"] = json.loads(str(out["record"]))
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot read split file {path}: {one_line(e)}") from None
    return out


def balanced_draw(labels: np.ndarray, k: int, num_classes: int, rng: np.random.Generator,
                  *, leave: int, classes, what: str) -> np.ndarray:
    """Sorted positions of ``k`` random examples of every class (labels -1 never drawn).
    UserError naming the class if it has fewer than ``k + leave`` examples."""
    counts = np.bincount(labels[labels >= 0], minlength=num_classes)
    short = np.flatnonzero(counts < k + leave)
    if short.size:
        c = int(short[0])
        extra = " plus at least 1 left for training" if leave else ""
        raise UserError(f"class {c} ({classes[c]!r}) has {counts[c]} examples in {what}, but "
                        f"the meta set needs {k} per class{extra}; lower meta_per_class")
    picks = [rng.choice(np.flatnonzero(labels == c), size=k, replace=False)
             for c in range(num_classes)]
    return np.sort(np.concatenate(picks)).astype(np.int64)


def default_meta_per_class(labels: np.ndarray, num_classes: int) -> int:
    """100 clean examples per class when C <= 10, else 10 (the papers' CIFAR
    settings), but never more than a tenth of the smallest class, so a small
    dataset (digits: 14 per class) keeps most of its examples for training."""
    counts = np.bincount(labels[labels >= 0], minlength=num_classes)
    return max(1, min(100 if num_classes <= 10 else 10, int(counts.min()) // 10))


def _ints(a) -> list:
    return [int(v) for v in a]


def prepare(dataset="digits", noise="none", imbalance="none", meta_per_class=None, seed=0, *,
            data_root=None, download=False, label_column="label", test_fraction=0.2,
            image_size=None, stream=None, num_workers=0, mirror=None) -> Prepared:
    """Read a dataset and build noisy/imbalanced training, clean meta and test splits.

    Args:
        dataset: ``digits`` (default, scikit-learn, no download), ``mnist``,
            ``fashion-mnist``, ``cifar10``, ``cifar100``, ``clothing1m[:ROOT]``,
            ``folder:PATH``, ``npz:PATH``, ``csv:PATH``, or a bare folder/.npz/.csv path.
        noise: noise spec (:func:`gdw.data.parse_noise`), e.g. ``uniform:0.4``,
            ``cifar10n:worse``. Must be ``none`` when the labels are already noisy.
        imbalance: ``none``, ``longtail:RHO`` or ``step:RHO`` (by true class).
        meta_per_class: clean examples per class in the meta set; None -> the meta set
            shipped with the data if any (npz x_meta, Clothing1M clean val), else 100 if
            C <= 10 else 10, capped at a tenth of the smallest class
            (:func:`default_meta_per_class`); 0 -> no meta set.
        seed: non-negative int; same seed -> same split, labels and record.
        data_root: folder searched first for official datasets.
        download: fetch missing official files (MNIST, Fashion-MNIST, CIFAR) into the cache.
        label_column, test_fraction: for csv (and digits/folder test splits).
        image_size: int or (h, w): folder images are resized to it; Clothing1M crop size.
        stream: folders: True/False forces streaming from disk / loading to memory.
        num_workers: DataLoader workers for streamed datasets.
        mirror: base URL replacing the official download servers (else $GDW_MIRROR).

    Returns a :class:`Prepared`. Raises UserError for any bad input (unknown dataset or
    spec, missing/corrupt file, labels out of range, a class too small for the meta set...).
    """
    nspec, ispec = parse_noise(noise), parse_imbalance(imbalance)
    mix_seed(seed)
    if meta_per_class is not None and (isinstance(meta_per_class, bool) or not isinstance(
            meta_per_class, (int, np.integer)) or meta_per_class < 0):
        raise UserError(f"meta_per_class must be a non-negative integer or None, "
                        f"got {meta_per_class!r}")
    kind = resolve(dataset)[0]
    if nspec.kind in CIFAR_N and kind != CIFAR_N[nspec.kind][0]:
        raise UserError(f"noise {nspec.text!r} is for dataset {CIFAR_N[nspec.kind][0]!r}, "
                        f"not {dataset!r}")
    src = load_source(dataset, data_root=data_root, download=download, mirror=mirror,
                      label_column=label_column, test_fraction=test_fraction,
                      image_size=image_size, stream=stream)
    C = len(src.classes)
    nspec = parse_noise(nspec, C)
    rng_meta, rng_imb, rng_noise = (np.random.default_rng(s)
                                    for s in np.random.SeedSequence(int(seed)).spawn(3))
    n = len(src.y_train)
    observed = src.y_train
    true = src.y_train if src.y_train_true is None else src.y_train_true
    record_extra = {}
    if nspec.kind in CIFAR_N:
        observed, key, file = read_cifar_n(nspec.kind, nspec.key, nspec.path, data_root, n, C)
        record_extra = {"cifar_n_key": key, "cifar_n_file": file}
    elif src.y_train_true is not None and nspec.kind != "none":
        raise UserError(f"the training labels of {src.name} are already noisy; "
                        f"use noise='none' instead of {nspec.text!r}")
    real_noise = nspec.kind in CIFAR_N or src.y_train_true is not None

    # 2. meta set
    K = meta_per_class if meta_per_class is not None else default_meta_per_class(true, C)
    train_pos = np.arange(n)
    meta = None
    if meta_per_class == 0:
        meta_source = "none"
    elif meta_per_class is None and src.x_meta is not None:
        meta_source = "provided"
        meta = (src.x_meta, np.arange(len(src.y_meta)), src.y_meta)
    elif src.meta_pool is not None or src.x_meta is not None:
        store, labels = src.meta_pool or (src.x_meta, src.y_meta)
        meta_source = "provided clean pool"
        idx = balanced_draw(labels, K, C, rng_meta, leave=0, classes=src.classes,
                            what="the provided clean set")
        meta = (store, idx, labels[idx])
    else:
        meta_source = "train"
        idx = balanced_draw(true, K, C, rng_meta, leave=1, classes=src.classes,
                            what="the training set")
        meta = (src.x_train, idx, true[idx])
        train_pos = np.setdiff1d(train_pos, idx)
    if meta is not None and hasattr(meta[0], "paths") and hasattr(src.x_train, "paths"):
        taken = {meta[0].paths[i] for i in meta[1]}  # e.g. Clothing1M: clean keys also noisy
        train_pos = train_pos[[src.x_train.paths[i] not in taken for i in train_pos]]

    # 3. imbalance by true class, 4. noise
    train_pos = train_pos[apply_imbalance(true[train_pos], C, ispec, rng_imb)]
    true_tr = true[train_pos]
    if real_noise:
        noisy_tr, T = observed[train_pos], None
    else:
        noisy_tr, T = apply_noise(true_tr, C, nspec, rng_noise)

    known = true_tr >= 0
    aug = src.augment
    train = Split("train", src.x_train, train_pos, noisy_tr, true_tr, src.view, augment=aug,
                  num_workers=num_workers)
    meta_split = None if meta is None else Split("meta", meta[0], meta[1], meta[2], meta[2],
                                                 src.view, num_workers=num_workers)
    test = Split("test", src.x_test, np.arange(len(src.y_test)), src.y_test, src.y_test,
                 src.view, num_workers=num_workers)
    counts = {
        "train_noisy": _ints(np.bincount(noisy_tr, minlength=C)),
        "train_true": _ints(np.bincount(true_tr[known], minlength=C)),
        "meta": _ints(np.bincount(meta[2], minlength=C)) if meta is not None else [0] * C,
        "test": _ints(np.bincount(src.y_test, minlength=C)),
    }
    record = {
        "dataset": str(dataset), "source": src.name, "noise": nspec.text,
        "imbalance": ispec.text, "seed": int(seed),
        "meta_per_class": 0 if meta is None else (None if meta_source == "provided" else int(K)),
        "meta_source": meta_source, "num_classes": C, "classes": list(src.classes),
        "input_shape": list(train.input_shape),
        "n_train": len(train), "n_meta": 0 if meta_split is None else len(meta_split),
        "n_test": len(test), "n_train_true_unknown": int((~known).sum()),
        "realised_noise_rate": realised_noise_rate(true_tr, noisy_tr),
        "requested_transition": None if T is None else T.tolist(),
        "realised_transition": realised_transition(true_tr, noisy_tr, C).tolist()
        if known.any() else None,
        "counts": counts,
        "order": "test split (fixed) -> meta (clean, by true class) -> imbalance (by true "
                 "class) -> noise",
        "files": list(src.files), **src.notes, **record_extra,
    }
    return Prepared(train, meta_split, test, list(src.classes), train.input_shape, record)
