"""The splits of a prepared dataset (:class:`Split`, :class:`Prepared`), their files
(``split.npz``), and the per-class draws and duplicate checks that build them."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError, one_line
from .batches import View, batch_plan, to_model_input


class Split:
    """One set of examples (train, meta or test) and how to batch it.

    Attributes:
        name: "train", "meta", "val", "test" (or "new", :func:`gdw.data.load_new`).
        labels: (N,) LongTensor, the labels training sees (noisy for the training set).
        true_labels: (N,) LongTensor of true labels (-1 where unknown) or None.
        index: (N,) LongTensor, position of each example in the store it is read from: the
            dataset's training array (train, and meta/val drawn from it), or its own array
            (test, a meta set that came with the data or was given).
        source_rows: (N,) int64 numpy array, each example's row in the user's terms: the
            0-based data row of the CSV file (header not counted, empty rows skipped), the
            position in the npz arrays (``x_train``, ``x_test``, ``x``/``x_meta`` of a
            meta file), the position in the dataset's published arrays (built-ins; digits:
            scikit-learn's array of 1797), in the key list (Clothing1M) or in the sorted
            listing of an image folder. Defaults to ``index``.
        source_paths: list of each example's image path relative to the folder given
            (``cat/img_003.png``; Clothing1M keys), or None when not read from image files.
        source_file: the file or folder the examples came from (None if unknown).
        augment: default of ``batches(augment=None)``.
        input_shape: shape of one model input, e.g. (3, 32, 32) or (D,).
    """

    def __init__(self, name: str, store, index, labels, true_labels, view: View, *, augment: bool = False,
                 num_workers: int = 0, source_rows=None, source_paths=None, source_file: str | None = None):
        self.name, self.store, self.view = name, store, view
        self.index = torch.tensor(np.asarray(index), dtype=torch.long)
        self.labels = torch.tensor(np.asarray(labels), dtype=torch.long)
        self.true_labels = None if true_labels is None else torch.tensor(np.asarray(true_labels), dtype=torch.long)
        self.augment, self.num_workers = bool(augment), int(num_workers)
        self.source_rows = self.index.numpy().copy() if source_rows is None else \
            np.asarray(source_rows, dtype=np.int64).reshape(-1)
        self.source_paths = None if source_paths is None else [str(p) for p in source_paths]
        self.source_file = None if source_file is None else str(source_file)
        n = len(self.labels)
        if len(self.index) != n or len(self.source_rows) != n or \
                (self.source_paths is not None and len(self.source_paths) != n):
            raise ValueError(f"split {name!r}: index, labels, source_rows and source_paths must have the same length")

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return f"Split({self.name!r}, n={len(self)}, input_shape={self.input_shape})"

    @property
    def input_shape(self) -> tuple:
        return (self.store.shape[0], *self.view.out_hw) if self.view.out_hw else self.store.shape

    def batches(self, batch_size: int, *, shuffle: bool = True, seed: int = 0, epoch: int = 0, device="cpu",
                augment: bool | None = None, drop_last: bool = False, start: int = 0,
                shard: tuple[int, int] | None = None):
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
        view, augment, jitter = self.view, self.augment if augment is None else bool(augment), None
        if augment and view.out_hw is None:
            raise UserError("augmentation (crop/flip) needs image inputs; use augment=False")
        if augment:
            (H, W), (h, w) = self.store.shape[-2:], view.out_hw
            jitter = (H + 2 * view.pad - h, W + 2 * view.pad - w)
        offsets, chunks, aug = batch_plan(len(self), batch_size, shuffle=shuffle, seed=seed, epoch=epoch,
                                          drop_last=drop_last, start=start, shard=shard, jitter=jitter)
        raw_batches = self.store.read([self.index[c] for c in chunks], self.num_workers)
        for i, pos, raw in zip(offsets, chunks, raw_batches):
            a = None if aug is None else tuple(t[i:i + len(pos)] for t in aug)
            yield to_model_input(raw, view, device, a), self.labels[pos].to(device), pos.to(device)


@dataclass
class Prepared:
    """Result of :func:`prepare`: ``train``, ``meta`` (None if meta_per_class=0), ``test``
    and ``val`` (None unless val_per_class > 0) splits, ``classes`` (names: the user's
    label values as strings, class id k <-> ``classes[k]``), ``input_shape``, a
    JSON-serialisable ``record`` of what was done, and ``preprocess``: a JSON-serialisable
    description of how raw inputs of this kind become model inputs, for
    :func:`gdw.data.load_new`.

    ``preprocess`` keys: ``format`` (1), ``kind`` (digits, idx, cifar, clothing1m, folder,
    npz, csv), ``input`` ("image" or "tabular"), ``dataset``; csv: ``feature_columns``,
    ``label_column``; images: ``image_size`` [h, w] (files are resized to it),
    ``channels``, ``fit`` ("squash" or "center"); ``stored_shape``, ``dtype`` ("uint8":
    scaled by 1/255, or "float32"), ``scale``, ``mean``, ``std`` (per channel or feature),
    ``out_hw`` (images larger are center-cropped), ``pad`` (training crops), ``input_shape``,
    ``classes``.
    """

    train: Split
    meta: Split | None
    test: Split
    classes: list
    input_shape: tuple
    record: dict
    val: Split | None = None
    preprocess: dict | None = None
    holdout: Split | None = None  # training rows left out of training and predicted (``holdout="K/N"``)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def save_split(self, path) -> Path:
        """Save the split as ``.npz``:

        * train_index, train_labels, train_true_labels (-1 = unknown);
        * meta_index, meta_labels, val_index, val_labels, test_index, test_labels (empty
          when the split is absent); meta_source, val_source (where they came from);
        * for each of train / meta / val / test: ``<split>_source_rows`` (the user's rows,
          :attr:`Split.source_rows`) and ``<split>_source_paths`` (relative image paths;
          empty when not read from image files);
        * classes, test_size, seed, record and preprocess (JSON text).

        Returns the path written."""
        path = Path(path)
        path = path if path.suffix == ".npz" else path.with_name(path.name + ".npz")
        tr = self.train
        true = tr.true_labels if tr.true_labels is not None else torch.full_like(tr.labels, -1)
        arrays = {}
        for name, split in (("train", tr), ("meta", self.meta), ("val", self.val), ("test", self.test)):
            arrays.update(_split_arrays(name, split))
        np.savez(path, **arrays, train_true_labels=true.numpy(),
                 meta_source=np.array(self.record["meta_source"]),
                 val_source=np.array(self.record.get("val_source", "none")),
                 classes=np.array([str(c) for c in self.classes], dtype=str),
                 test_size=np.int64(len(self.test)), seed=np.int64(self.record["seed"]),
                 record=np.array(json.dumps(self.record)),
                 preprocess=np.array(json.dumps(self.preprocess)))
        return path


def _split_arrays(name: str, split: Split | None) -> dict:
    """The ``<name>_...`` arrays of :meth:`Prepared.save_split` (empty ones for an absent split)."""
    parts = (split.index.numpy(), split.labels.numpy(), split.source_rows) if split is not None else \
        (np.zeros(0, dtype=np.int64),) * 3
    paths = getattr(split, "source_paths", None) or []
    return {**{f"{name}_{k}": a for k, a in zip(("index", "labels", "source_rows"), parts)},
            f"{name}_source_paths": np.array(paths, dtype=str)}


def load_split(path) -> dict:
    """Read a file written by :meth:`Prepared.save_split` into a dict of numpy arrays
    (``record`` and ``preprocess`` decoded from JSON). UserError if it is missing or not
    such a file."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
        out["record"] = json.loads(str(out["record"]))
        if "preprocess" in out:
            out["preprocess"] = json.loads(str(out["preprocess"]))
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot read split file {path}: {one_line(e)}") from None
    return out


def per_class_draw(labels: np.ndarray, k, num_classes: int, rng: np.random.Generator,
                   exclude: np.ndarray | None = None) -> np.ndarray:
    """Sorted positions of ``k`` random examples of every class (``k`` an int, or
    (C,) ints: ``k[c]`` of class c), never a position in ``exclude``, never a
    label -1; the caller has checked that there are enough."""
    ks = np.broadcast_to(np.asarray(k, dtype=np.int64), (num_classes,))
    picks = []
    for c in range(num_classes):
        pos = np.flatnonzero(labels == c)
        if exclude is not None and len(exclude):
            pos = np.setdiff1d(pos, exclude)
        picks.append(rng.choice(pos, size=int(ks[c]), replace=False))
    return np.sort(np.concatenate(picks)).astype(np.int64)


def share_counts(counts, total: int) -> np.ndarray:
    """(C,) ints summing to ``total`` in the shares of ``counts`` (C,): the
    largest remainders of ``total * counts / sum(counts)`` round up, and every
    class gets at least 1 (taken from the largest), so that no class is
    missing from a draw of ``total`` >= C. An example: counts (2600, 1400),
    total 100 -> (65, 35)."""
    c = np.maximum(np.asarray(counts, dtype=np.float64), 0.0)
    exact = total * c / c.sum()
    out = np.floor(exact).astype(np.int64)
    out[np.argsort(-(exact - out), kind="stable")[:total - int(out.sum())]] += 1
    for i in np.flatnonzero(out < 1):
        if total < len(out):
            break
        out[int(np.argmax(out))] -= 1
        out[i] = 1
    return out


def _same_inputs(train_store, train_pos: np.ndarray, other_store, other_idx) -> np.ndarray:
    """Mask over ``train_pos``: the training example has exactly the inputs of one of the
    ``other_idx`` examples (same image file, or the same stored bytes)."""
    drop = np.zeros(len(train_pos), dtype=bool)
    if hasattr(train_store, "paths") and hasattr(other_store, "paths"):
        taken = {os.path.realpath(other_store.paths[i]) for i in other_idx}
        drop[:] = [os.path.realpath(train_store.paths[p]) in taken for p in train_pos]
    elif hasattr(train_store, "x") and hasattr(other_store, "x") and \
            train_store.x.dtype == other_store.x.dtype and train_store.shape == other_store.shape:
        a = train_store.x.reshape(len(train_store), -1).numpy()
        b = other_store.x.reshape(len(other_store), -1).numpy()
        taken = {b[i].tobytes() for i in other_idx}
        drop[:] = [a[p].tobytes() in taken for p in train_pos]
    return drop
