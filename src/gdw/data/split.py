"""``prepare``: dataset + noise spec + imbalance spec -> train / meta / val / test splits.

Order of operations (fixed):

1. read the source; the train/test split is the published one, or a stratified split
   with the fixed seed 0 (digits, csv, folder) -- the same for every experiment seed;
2. meta set: a hand-checked labelled set given as ``meta=`` (all of it, or a balanced
   draw of ``meta_per_class`` per class), or the clean meta set shipped with the data
   (npz ``x_meta``, Clothing1M clean val / clean train), or else ``meta_per_class``
   examples of every class drawn by TRUE label from the training array (at least one
   example of each class must stay for training) and removed from it -- clean for
   benchmark datasets; for the user's own csv / folder / npz data the labels drawn by are
   the user's labels, which may be noisy (``record["warnings"]`` says so);
3. validation set (``val_per_class``): drawn from the same source as the meta set,
   disjoint from it and from the training set; training examples with exactly the same
   inputs as a given meta/validation example are left out of training; in a test split drawn
   from the user's CSV file or image folder, so are test examples with the inputs of a
   meta/validation example (left out of the test split) and training examples with those
   of a test example;
4. imbalance: applied by TRUE class to what is left of the training array;
5. noise: synthetic noise injected into the true labels of the kept examples, or the
   real noisy labels (CIFAR-N label file, Clothing1M, npz ``y_train`` with
   ``y_train_true``) looked up for them.

Randomness: ``np.random.SeedSequence(seed).spawn(4)`` gives four independent numpy
generators for the meta draw, imbalance, noise and the validation draw, so the same seed
gives the same split and labels, and asking for a validation set leaves the meta set as
it was.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ._errors import one_line
from .batches import View, iterate, mix_seed
from .labels import class_counts_check
from .noise import (apply_imbalance, apply_noise, parse_imbalance, parse_noise,
                    realised_noise_rate, realised_transition)
from .own import preprocess_record, read_examples, source_format
from .builtin import CIFAR_N, read_cifar_n
from .sources import FORMATS, load_source, resolve


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

    def __init__(self, name: str, store, index, labels, true_labels, view: View, *,
                 augment: bool = False, num_workers: int = 0, source_rows=None,
                 source_paths=None, source_file: str | None = None):
        self.name = name
        self.store, self.view = store, view
        self.index = torch.tensor(np.asarray(index), dtype=torch.long)
        self.labels = torch.tensor(np.asarray(labels), dtype=torch.long)
        self.true_labels = None if true_labels is None else \
            torch.tensor(np.asarray(true_labels), dtype=torch.long)
        self.augment = bool(augment)
        self.num_workers = int(num_workers)
        self.source_rows = self.index.numpy().copy() if source_rows is None else \
            np.asarray(source_rows, dtype=np.int64).reshape(-1)
        self.source_paths = None if source_paths is None else [str(p) for p in source_paths]
        self.source_file = None if source_file is None else str(source_file)
        n = len(self.labels)
        if len(self.index) != n or len(self.source_rows) != n or \
                (self.source_paths is not None and len(self.source_paths) != n):
            raise ValueError(f"split {name!r}: index, labels, source_rows and source_paths "
                             f"must have the same length")

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
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")
        tr = self.train
        true = tr.true_labels if tr.true_labels is not None else torch.full_like(tr.labels, -1)
        arrays = {}
        for name, split in (("train", tr), ("meta", self.meta), ("val", self.val),
                            ("test", self.test)):
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
    empty = np.zeros(0, dtype=np.int64)
    if split is None:
        return {f"{name}_index": empty, f"{name}_labels": empty,
                f"{name}_source_rows": empty, f"{name}_source_paths": np.array([], dtype=str)}
    paths = split.source_paths if split.source_paths is not None else []
    return {f"{name}_index": split.index.numpy(), f"{name}_labels": split.labels.numpy(),
            f"{name}_source_rows": split.source_rows,
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


def per_class_draw(labels: np.ndarray, k: int, num_classes: int, rng: np.random.Generator,
                   exclude: np.ndarray | None = None) -> np.ndarray:
    """Sorted positions of ``k`` random examples of every class (never a position in
    ``exclude``, never a label -1); the caller has checked that there are enough."""
    picks = []
    for c in range(num_classes):
        pos = np.flatnonzero(labels == c)
        if exclude is not None and len(exclude):
            pos = np.setdiff1d(pos, exclude)
        picks.append(rng.choice(pos, size=k, replace=False))
    return np.sort(np.concatenate(picks)).astype(np.int64)


def balanced_draw(labels: np.ndarray, k: int, num_classes: int, rng: np.random.Generator,
                  *, leave: int, classes, what: str) -> np.ndarray:
    """Sorted positions of ``k`` random examples of every class (labels -1 never drawn).
    UserError naming the class if it has fewer than ``k + leave`` examples."""
    extra = " plus at least 1 left for training" if leave else ""
    class_counts_check(labels, num_classes, classes, k + leave, what,
                       lambda _: f"the meta set needs {k} per class{extra}; lower meta_per_class")
    return per_class_draw(labels, k, num_classes, rng)


def _needs(k: int, n_val: int) -> tuple[str, str]:
    """``(what the meta and validation sets need per class, which option to lower)``."""
    if k and n_val:
        return (f"the meta set needs {k} and the validation set {n_val} per class",
                "meta_per_class or val_per_class")
    if k:
        return f"the meta set needs {k} per class", "meta_per_class"
    return f"the validation set needs {n_val} per class", "val_per_class"


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


def default_meta_per_class(labels: np.ndarray, num_classes: int) -> int:
    """100 clean examples per class when C <= 10, else 10 (the papers' CIFAR
    settings), but never more than a tenth of the smallest class, so a small
    dataset (digits: 14 per class) keeps most of its examples for training."""
    counts = np.bincount(labels[labels >= 0], minlength=num_classes)
    return max(1, min(100 if num_classes <= 10 else 10, int(counts.min()) // 10))


def _ints(a) -> list:
    return [int(v) for v in a]


def _count(x: int, noun: str) -> str:
    return f"{x} {noun}" + ("" if x == 1 else "s")


def prepare(dataset="digits", noise="none", imbalance="none", meta_per_class=None, seed=0, *,
            meta=None, val_per_class=0, test=None, data_root=None, download=False, label_column="label",
            test_fraction=0.2, image_size=None, stream=None, num_workers=0,
            mirror=None, features=None, ignore=None) -> Prepared:
    """Read a dataset and build noisy/imbalanced training, clean meta (and validation) and
    test splits.

    Args:
        dataset: ``digits`` (default, scikit-learn, no download), ``mnist``,
            ``fashion-mnist``, ``cifar10``, ``cifar100``, ``clothing1m[:ROOT]``,
            ``folder:PATH``, ``npz:PATH``, ``csv:PATH``, or a bare folder/.npz/.csv path.
        noise: noise spec (:func:`gdw.data.parse_noise`), e.g. ``uniform:0.4``,
            ``cifar10n:worse``. Must be ``none`` when the labels are already noisy.
        imbalance: ``none``, ``longtail:RHO`` or ``step:RHO`` (by true class).
        meta_per_class: clean examples per class in the meta set; None -> all of ``meta``
            if given, else the meta set shipped with the data if any (npz x_meta,
            Clothing1M clean val), else 100 if C <= 10 else 10, capped at a tenth of the
            smallest class (:func:`default_meta_per_class`); 0 -> no meta set.
        seed: non-negative int; same seed -> same split, labels and record.
        meta: a hand-checked labelled set used as the meta set instead of a draw from the
            training data: ``csv:PATH`` (the training CSV's feature columns, by name, and
            its label column), ``folder:PATH`` (one sub-folder per class; images read at
            the training size and channels) or ``npz:PATH`` (arrays ``x``, ``y`` or
            ``x_meta``, ``y_meta``; labels as values, or positions in a ``classes``
            array). Labels are matched to the training classes by name; every class needs
            an example. Preprocessed exactly like the training data (its normalisation).
            Training examples with the very same inputs are left out of training.
        test: your own labelled test set (``csv:PATH``, ``folder:PATH``, ``npz:PATH``, read
            and matched to the classes like ``meta``), e.g. hand-checked examples, used as the
            test split instead of the dataset's own: a csv / folder / digits dataset is then
            not split (``test_fraction`` unused) and all of it is for training. Training
            examples with the very same inputs as a test example are left out of training
            and of the meta and validation draws.
        val_per_class: examples per class in a validation set (``Prepared.val``), taken
            from the clean source -- ``meta`` when given, the meta set shipped with the
            data, else the training array by true label -- disjoint from the meta and
            training sets. On the user's own data without ``meta`` it is drawn by the
            user's (possibly noisy) labels, with a warning in ``record["warnings"]``.
        data_root: folder searched first for official datasets.
        download: fetch missing official files (MNIST, Fashion-MNIST, CIFAR) into the cache.
        label_column, test_fraction: for csv (and digits/folder test splits).
        features, ignore: csv: the feature columns, or the columns left out (names, a list
            or comma-separated; :func:`gdw.data.files.read_csv`).
        image_size: int or (h, w): folder images are resized to it; Clothing1M crop size.
        stream: folders: True/False forces streaming from disk / loading to memory.
        num_workers: DataLoader workers for streamed datasets.
        mirror: base URL replacing the official download servers (else $GDW_MIRROR).

    Returns a :class:`Prepared`. ``record`` (JSON-serialisable) holds what was done,
    including ``warnings`` (sentences to show the user, e.g. that the meta set was drawn
    from labels not known to be clean), ``source_files`` (the file each split came from),
    ``meta_source`` / ``val_source`` (given, provided, provided clean pool, train, none)
    and ``meta_known_clean`` / ``val_known_clean``. Raises UserError for any bad input
    (unknown dataset or spec, missing/corrupt file, labels out of range or unknown, a class
    too small for the meta and validation sets...).
    """
    nspec, ispec = parse_noise(noise), parse_imbalance(imbalance)
    mix_seed(seed)
    for name, v in (("meta_per_class", meta_per_class), ("val_per_class", val_per_class)):
        if v is None and name == "meta_per_class":
            continue
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise UserError(f"{name} must be a non-negative integer"
                            + (" or None" if name == "meta_per_class" else "") + f", got {v!r}")
    N = int(val_per_class)
    kind = resolve(dataset)[0]
    if nspec.kind in CIFAR_N and kind != CIFAR_N[nspec.kind][0]:
        raise UserError(f"noise {nspec.text!r} is for dataset {CIFAR_N[nspec.kind][0]!r}, "
                        f"not {dataset!r}")
    src = load_source(dataset, data_root=data_root, download=download, mirror=mirror,
                      label_column=label_column, test_fraction=0 if test is not None else test_fraction,
                      image_size=image_size, stream=stream, features=features, ignore=ignore)
    C = len(src.classes)
    given_test = None if test is None else read_examples(
        test, source_format(src), src.classes, what="the test set", need_labels=True)
    nspec = parse_noise(nspec, C)
    rng_meta, rng_imb, rng_noise, rng_val = (np.random.default_rng(s)
                                             for s in np.random.SeedSequence(int(seed)).spawn(4))
    given = None if meta is None else read_examples(
        meta, source_format(src), src.classes, what="the meta set", need_labels=True)
    n = len(src.y_train)
    observed = src.y_train
    true = src.y_train if src.y_train_true is None else src.y_train_true
    in_test = np.zeros(n, dtype=bool)  # training examples with the inputs of a given test example
    if given_test is not None:
        in_test = _same_inputs(src.x_train, np.arange(n), given_test.store, np.arange(len(given_test.labels)))
        true = np.where(in_test, -1, true)  # never drawn for the meta / validation sets
    record_extra = {}
    if nspec.kind in CIFAR_N:
        observed, key, file = read_cifar_n(nspec.kind, nspec.key, nspec.path, data_root, n, C)
        record_extra = {"cifar_n_key": key, "cifar_n_file": file}
    elif src.y_train_true is not None and nspec.kind != "none":
        raise UserError(f"the training labels of {src.name} are already noisy; "
                        f"use noise='none' instead of {nspec.text!r}")
    real_noise = nspec.kind in CIFAR_N or src.y_train_true is not None

    # 2./3. the clean source, the meta and the validation sets
    K = meta_per_class if meta_per_class is not None else default_meta_per_class(true, C)
    if given is not None:
        pool, source, all_mode = (given.store, given.labels, given.origin), "given", \
            meta_per_class is None
        what = f"the meta set {given.name}"
    elif src.x_meta is not None and meta_per_class is None:
        pool, source, all_mode = (src.x_meta, src.y_meta, src.origin("meta")), "provided", True
        what = "the provided clean set"
    elif src.meta_pool is not None or src.x_meta is not None:
        pool = (*src.meta_pool, src.origin("pool")) if src.meta_pool is not None else \
            (src.x_meta, src.y_meta, src.origin("meta"))
        source, all_mode, what = "provided clean pool", False, "the provided clean set"
    else:
        pool, source, all_mode, what = None, "train", False, "the training set"
    train_pos = np.flatnonzero(~in_test)
    meta_idx = val_idx = None
    if pool is None:
        k = int(K)
        store, labels, origin = src.x_train, true, src.origin("train")
        if k + N:
            need, lower = _needs(k, N)
            class_counts_check(true, C, src.classes, k + N + 1, what, lambda _: (
                f"{need} plus at least 1 left for training; lower {lower}"))
        meta_idx = per_class_draw(true, k, C, rng_meta) if k else None
        val_idx = per_class_draw(true, N, C, rng_val, exclude=meta_idx) if N else None
        taken = [i for i in (meta_idx, val_idx) if i is not None]
        if taken:
            train_pos = np.setdiff1d(train_pos, np.concatenate(taken))
    else:
        store, labels, origin = pool
        if all_mode:
            if given is not None or N:
                class_counts_check(labels, C, src.classes, N + 1, what, lambda cnt: (
                    f"the validation set needs {N} per class plus at least 1 left for the meta "
                    f"set; lower val_per_class" if N else
                    "every class of the training data needs at least 1 example in it"))
            val_idx = per_class_draw(labels, N, C, rng_val) if N else None
            meta_idx = np.arange(len(labels)) if val_idx is None else \
                np.setdiff1d(np.arange(len(labels)), val_idx)
        else:
            k = int(K) if meta_per_class != 0 else 0
            if k + N:
                need, lower = _needs(k, N)
                class_counts_check(labels, C, src.classes, k + N, what,
                                   lambda _: f"{need}; lower {lower}")
            meta_idx = per_class_draw(labels, k, C, rng_meta) if k else None
            val_idx = per_class_draw(labels, N, C, rng_val, exclude=meta_idx) if N else None
        if meta_per_class == 0:
            meta_idx = None
    removed = 0
    used = [i for i in (meta_idx, val_idx) if i is not None]
    if pool is not None and used:
        other = np.concatenate(used)
        if given is not None:
            drop = _same_inputs(src.x_train, train_pos, store, other)
        elif hasattr(store, "paths") and hasattr(src.x_train, "paths"):
            taken = {store.paths[i] for i in other}  # e.g. Clothing1M: clean keys also noisy
            drop = np.array([src.x_train.paths[i] in taken for i in train_pos], dtype=bool)
        else:
            drop = np.zeros(len(train_pos), dtype=bool)
        removed = int(drop.sum()) if given is not None else 0
        train_pos = train_pos[~drop]
    test_pos, out_of_test = np.arange(len(src.y_test)), 0
    drawn = (given_test is None and FORMATS.get(kind).user_files
             and src.notes.get("test_split", "").startswith("stratified"))
    if drawn:  # a test split drawn from the user's file:
        if pool is not None and used:  # not the inputs of a clean example
            dup = _same_inputs(src.x_test, test_pos, store, np.concatenate(used))
            test_pos, out_of_test = test_pos[~dup], int(dup.sum())
        dup = _same_inputs(src.x_train, train_pos, src.x_test, test_pos)  # nor trained on
        in_test[train_pos[dup]] = True
        train_pos = train_pos[~dup]
    empty = "training" if not len(train_pos) else "test" if out_of_test and not len(test_pos) else None
    if empty:
        raise UserError(f"no {empty} examples are left: each has exactly the inputs of an example of another split "
                        "(meta, validation or test); --meta and --test must be examples apart from the training "
                        "data, not the data file itself")

    # 4. imbalance by true class, 5. noise
    train_pos = train_pos[apply_imbalance(true[train_pos], C, ispec, rng_imb)]
    true_tr = true[train_pos]
    if real_noise:
        noisy_tr, T = observed[train_pos], None
    else:
        noisy_tr, T = apply_noise(true_tr, C, nspec, rng_noise)

    if not (src.clean or src.y_train_true is not None or nspec.kind != "none"):
        # the user's own labels, as they are: their truth is unknown, not equal to them
        true_tr = np.full_like(true_tr, -1)
    known = true_tr >= 0
    nw = num_workers

    def make(name, st, pos, y, yt, org, **kw):
        return Split(name, st, pos, y, yt, src.view, num_workers=nw, source_rows=org.rows_of(pos),
                     source_paths=org.paths_of(pos), source_file=org.file, **kw)

    tr_origin = src.origin("train")
    train = make("train", src.x_train, train_pos, noisy_tr, true_tr, tr_origin, augment=src.augment)
    meta_split = val_split = None
    if meta_idx is not None:
        meta_split = make("meta", store, meta_idx, labels[meta_idx], labels[meta_idx], origin)
    if val_idx is not None:
        val_split = make("val", store, val_idx, labels[val_idx], labels[val_idx], origin)
    if given_test is None:
        test = make("test", src.x_test, test_pos, src.y_test[test_pos], src.y_test[test_pos], src.origin("test"))
    else:
        g = given_test
        test = make("test", g.store, np.arange(len(g.labels)), g.labels, g.labels, g.origin)

    clean = pool is not None or src.clean or src.y_train_true is not None
    warnings = []
    drawn = [s for s, x in (("meta set", meta_split), ("validation set", val_split))
             if x is not None]
    if drawn and not clean:
        sets = " and the ".join(drawn)
        it = "it" if len(drawn) == 1 else "they"
        warnings.append(
            f"The {sets} {'was' if len(drawn) == 1 else 'were'} drawn from the labels of "
            f"{src.name}, which are not known to be clean, so {it} may hold label errors; "
            f"pass a hand-checked labelled set as meta (csv:PATH, folder:PATH or npz:PATH) "
            f"to have clean ones.")
    if removed:
        warnings.append(f"{_count(removed, 'training example')} with exactly the inputs of an "
                        f"example of {given.name} {'was' if removed == 1 else 'were'} left out "
                        f"of the training set.")
    if in_test.any():
        k = int(in_test.sum())
        warnings.append(f"{_count(k, 'training example')} with exactly the inputs of an example of "
                        f"the test set {given_test.name if given_test else 'split'} {'was' if k == 1 else 'were'} "
                        f"left out of the training set.")
    if out_of_test:
        warnings.append(f"{_count(out_of_test, 'test example')} with exactly the inputs of an example of "
                        f"{given.name if given else 'the clean set'} {'was' if out_of_test == 1 else 'were'} "
                        f"left out of the test split.")
    if given is not None and not used:
        warnings.append(f"The meta set {given.name} was not used (meta_per_class=0, "
                        f"val_per_class=0).")

    def counts_of(split):
        return _ints(np.bincount(split.labels.numpy(), minlength=C)) if split is not None \
            else [0] * C

    counts = {
        "train_noisy": _ints(np.bincount(noisy_tr, minlength=C)),
        "train_true": _ints(np.bincount(true_tr[known], minlength=C)),
        "meta": counts_of(meta_split), "val": counts_of(val_split),
        "test": _ints(np.bincount(test.labels.numpy(), minlength=C)),
    }
    meta_source = "none" if meta_split is None else source
    val_source = "none" if val_split is None else source
    record = {
        "dataset": str(dataset), "source": src.name, "noise": nspec.text,
        "imbalance": ispec.text, "seed": int(seed),
        "meta_per_class": 0 if meta_split is None else (None if all_mode else int(K)),
        "meta_source": meta_source, "meta": None if given is None else given.name,
        "meta_known_clean": None if meta_split is None else bool(clean),
        "val_per_class": N, "val_source": val_source,
        "val_known_clean": None if val_split is None else bool(clean),
        "num_classes": C, "classes": list(src.classes),
        "input_shape": list(train.input_shape),
        "n_train": len(train), "n_meta": 0 if meta_split is None else len(meta_split),
        "n_val": 0 if val_split is None else len(val_split),
        "n_test": len(test), "n_train_true_unknown": int((~known).sum()),
        "n_train_left_out_as_in_meta": removed,
        "test": None if given_test is None else given_test.name,
        # a test split drawn from the user's own labels is as noisy as they are; --test is the user's checked set
        "test_known_clean": given_test is not None or not FORMATS.get(kind).user_files,
        "n_train_left_out_as_in_test": int(in_test.sum()), "n_test_left_out_as_in_meta": out_of_test,
        "realised_noise_rate": realised_noise_rate(true_tr, noisy_tr) if known.any() else None,
        "requested_transition": None if T is None else T.tolist(),
        "realised_transition": realised_transition(true_tr, noisy_tr, C).tolist()
        if known.any() else None,
        "counts": counts,
        "order": ("test set given" if given_test is not None else "test split (fixed)") + " -> meta (" + {
            "given": "given", "provided": "provided", "provided clean pool": "provided pool",
            "train": "by true class" if clean else "by the given labels"}[source]
        + (") -> val (same source" if val_split is not None else "")
        + ") -> imbalance (by true class) -> noise",
        "source_files": {"train": tr_origin.file,
                         "meta": None if meta_split is None else meta_split.source_file,
                         "val": None if val_split is None else val_split.source_file,
                         "test": test.source_file},
        "warnings": warnings,
        "files": list(src.files), **src.notes, **record_extra,
    }
    preprocess = preprocess_record(src, src.view, train.input_shape, dataset, src.classes)
    return Prepared(train, meta_split, test, list(src.classes), train.input_shape, record,
                    val=val_split, preprocess=preprocess)
