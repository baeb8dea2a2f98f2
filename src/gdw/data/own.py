"""The user's own labelled or unlabelled files, read like the training data.

* :func:`read_examples` reads ``csv:PATH``, ``folder:PATH`` or ``npz:PATH`` into a store
  preprocessed exactly like the training inputs (same CSV feature columns, same image
  size, channels and fit, same array type and shape) with labels matched to the training
  classes by name. :func:`gdw.data.prepare` uses it for a hand-checked meta set.
* :func:`preprocess_record` describes, as plain JSON, how raw inputs of the training kind
  become model inputs; :func:`load_new` uses that description to read new data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .batches import ImageFileStore, TensorStore, View
from .labels import ids_by_name, label_names
from .noise import check_labels
from .files import _inputs, class_folders, image_store, list_images, read_csv_table, read_npz_arrays, relative_paths
from .sources import FORMATS, IMAGE_SUFFIXES, Origin, resolve
from .split import Split
from .text import text_examples

PREPROCESS_FORMAT = 1
REQUIRED = ("format", "kind", "input", "stored_shape", "dtype", "mean", "std", "out_hw", "pad")


def source_format(src) -> dict:
    """What :func:`read_examples` needs to read files like the training data of ``src``: its
    preprocess entries, the shape of one stored input and its type ("uint8" or "float32")."""
    store = src.x_train
    streamed = isinstance(store, ImageFileStore)  # image files are read as uint8
    return {**src.preprocess, "dataset": src.name, "stored_shape": list(store.shape),
            "dtype": "uint8" if streamed or store.x.dtype == torch.uint8 else "float32", "streamed": streamed}


def preprocess_record(src, view: View, input_shape, dataset, classes) -> dict:
    """A JSON-serialisable description of how raw inputs of the training kind become
    model inputs (see :attr:`gdw.data.Prepared.preprocess`)."""
    fmt = source_format(src)
    fmt.pop("streamed")
    return {
        "format": PREPROCESS_FORMAT, **fmt, "dataset": str(dataset),
        "input_shape": [int(s) for s in input_shape],
        "scale": 1 / 255 if fmt["dtype"] == "uint8" else 1.0,
        "mean": view.mean.tolist(), "std": view.std.tolist(),
        "out_hw": None if view.out_hw is None else [int(s) for s in view.out_hw],
        "pad": int(view.pad), "classes": [str(c) for c in classes],
    }


@dataclass
class Examples:
    """Examples read by :func:`read_examples`: inputs in ``store``, ``labels`` (int64 class
    ids, -1 = no label), ``has_labels`` (the data has a label column / class folders /
    ``y`` array), ``origin`` (file, rows, relative paths) and ``name`` (the spec)."""

    store: object
    labels: np.ndarray
    has_labels: bool
    origin: Origin
    name: str


def read_examples(spec, pre: dict, classes, *, what: str, need_labels: bool, stream: bool | None = None) -> Examples:
    """Read ``csv:PATH``, ``folder:PATH`` or ``npz:PATH`` (or a bare path) like the
    training data described by ``pre`` (:func:`source_format` or a preprocess record).

    csv: the training feature columns (by name; other columns ignored) or text column
    (:mod:`gdw.data.text`) and, if present, the label column (an empty label is -1 unless
    labels are needed). folder: one sub-folder per class, or (unlabelled) image files directly in it; images loaded at
    the training size, channels and fit. npz: ``x`` and optional ``y`` (or ``x_meta``,
    ``y_meta``); a ``classes`` array makes numeric ``y`` positions in it. Labels are
    matched to ``classes`` by name. ``what`` names the data in messages. UserError for
    anything that does not fit the training data.
    """
    kind, arg = resolve(spec)
    read = FORMATS.get(kind).examples
    if read is None:
        raise UserError(f"{what} must be csv:PATH, folder:PATH or npz:PATH, got {spec!r}")
    return read(Path(arg), pre, classes, what, need_labels, f"{kind}:{arg}", stream)


def _read_csv(path, pre, classes, what, need_labels, name, stream=None) -> Examples:
    if pre.get("kind") != "csv":
        raise UserError(f"{what} {name} is a CSV file, but the training data ({pre.get('dataset') or pre.get('kind')}) "
                        f"is not: a CSV needs training data read from a CSV (its feature columns)")
    t = read_csv_table(path)
    label_column = pre["label_column"]
    if pre.get("input") == "text":
        x = text_examples(t, pre)
    else:
        x = t.features(list(pre["feature_columns"]), pre.get("categories"))
    has = label_column in t.header
    if need_labels and not has:
        raise UserError(f"CSV file {path} has no label column {label_column!r} (columns: {t.header})")
    n = len(x)
    labels = np.full(n, -1, dtype=np.int64)
    if has:
        raw = t.column(label_column, empty="label" if need_labels else None)
        labels = ids_by_name(raw, classes, f"column {label_column!r} of {path}", empty_unknown=True)
    return Examples(TensorStore(torch.from_numpy(x)), labels, has, Origin(str(path), np.arange(n)), name)


def _read_folder(root, pre, classes, what, need_labels, name, stream) -> Examples:
    # image files (uint8, scaled by 1/255) stand for training images stored as uint8, or digits (floats in [0, 1])
    if pre.get("input") != "image" or (pre["dtype"] != "uint8" and pre.get("kind") != "digits"):
        raise UserError(f"{what} {name} is a folder of images, but the training inputs "
                        f"({pre.get('dataset') or pre.get('kind')}) are not images stored as uint8")
    if not root.is_dir():
        raise UserError(f"image folder not found: {root}")
    groups = [(d, list_images(root / d)) for d in class_folders(root)]
    groups = [(d, files) for d, files in groups if files]
    top = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if groups and top:
        raise UserError(f"{root} has both image files and class sub-folders of images; "
                        f"use one sub-folder per class, or only image files (unlabelled)")
    if not groups and (need_labels or not top):
        needs = "one sub-folder per class" if need_labels else "one sub-folder per class or image files"
        raise UserError(f"{what} {root} has no images: it needs {needs} ({', '.join(sorted(IMAGE_SUFFIXES))})")
    if groups:
        ids = ids_by_name(np.array([d for d, _ in groups]), classes, f"the class folders of {root}")
        paths = [p for _, files in groups for p in files]
        labels = np.concatenate([np.full(len(files), i, np.int64) for i, (_, files) in zip(ids, groups)])
    else:
        paths, labels = top, np.full(len(top), -1, dtype=np.int64)
    size, channels = pre["image_size"], int(pre["channels"])
    if stream is None and pre.get("streamed") is not None:
        stream = bool(pre["streamed"])
    store = image_store(paths, size, channels, stream=stream, fit=pre.get("fit", "squash"))
    return Examples(store, labels, bool(groups), Origin(str(root), np.arange(len(paths)),
                                                        relative_paths(paths, root)), name)


def _read_npz(path, pre, classes, what, need_labels, name, stream=None) -> Examples:
    arrays = read_npz_arrays(path)
    xk, yk = next(((a, b) for a, b in (("x", "y"), ("x_meta", "y_meta")) if a in arrays), (None, None))
    if xk is None or (need_labels and yk not in arrays):
        want = "x and y" if need_labels else "x (and optionally y)"
        raise UserError(f"{what} {path} needs arrays {want} (or x_meta and y_meta); found {sorted(arrays)}")
    x = _inputs(arrays[xk], xk, path)
    dtype = "uint8" if x.dtype == torch.uint8 else "float32"
    shape = list(x.shape[1:])
    if shape != list(pre["stored_shape"]):
        raise UserError(f"{path}: {xk} holds inputs of shape {tuple(shape)}, but the training "
                        f"inputs are {tuple(pre['stored_shape'])}")
    if dtype != pre["dtype"]:
        raise UserError(f"{path}: {xk} is {arrays[xk].dtype}, but the training images are stored as {pre['dtype']}; "
                        "give them with the same type (uint8 0..255 or floats as in the training data)")
    has = yk in arrays
    labels = np.full(len(x), -1, dtype=np.int64)
    if has:
        y = np.asarray(arrays[yk])
        if y.ndim != 1 or len(y) != len(x):
            raise UserError(f"{path}: {yk} must hold one label per row of {xk} ({len(x)}), got shape {y.shape}")
        if "classes" in arrays and y.dtype.kind in "iuf":
            own = label_names(arrays["classes"].reshape(-1), f"classes in {path}")
            y = own[check_labels(y, len(own), f"{yk} in {path} (positions in its classes)")]
        labels = ids_by_name(label_names(y, f"{yk} in {path}"), classes, f"{yk} in {path}")
    return Examples(TensorStore(x), labels, has, Origin(str(path), np.arange(len(x))), name)


for _kind, _read in (("csv", _read_csv), ("folder", _read_folder), ("npz", _read_npz)):
    FORMATS.get(_kind).examples = _read  # a meta, test or new set of this format, read like the training data


# ----------------------------------------------------------------------------- new data

@dataclass
class NewData:
    """New data read by :func:`load_new`.

    split: a :class:`gdw.data.Split` named "new" (``batches(..., shuffle=False)`` gives the
    model inputs in file order; labels -1 where unknown). source_rows: each example's
    row in the file (0-based CSV data row, position in the npz arrays, position in the
    folder listing). source_paths: image paths relative to the folder, else None.
    has_labels: the data came with labels. source_file: the file or folder read.
    """

    split: object
    source_rows: np.ndarray
    source_paths: list | None
    has_labels: bool
    source_file: str
    classes: list

    def __len__(self) -> int:
        return len(self.split)


def load_new(spec, preprocess: dict, classes=None, *, stream: bool | None = None,
             num_workers: int = 0, text_dir=None) -> NewData:
    """Read new data and turn it into model inputs exactly as the training data was.

    Args:
        spec: ``csv:PATH`` (the training feature columns, by name, or text column; the
            label column is optional), ``folder:PATH`` (one sub-folder per class, or a flat folder of
            images = unlabelled), ``npz:PATH`` (``x``, optional ``y``), or a bare path.
        preprocess: :attr:`gdw.data.Prepared.preprocess` of the training data (e.g. read
            back from ``split.npz``'s ``preprocess`` or a saved JSON file).
        classes: the training class names (``Prepared.classes``); None -> those recorded
            in ``preprocess``. Labels are matched to them by name.
        stream: folders: stream images from disk (None: only when larger than 1 GiB).
        text_dir: a text run's directory: its fitted text encoder and cached embeddings
            (not needed in the process that prepared the data).

    Returns a :class:`NewData`. Raises UserError for an unknown label, missing feature
    columns, inputs of another shape or type than the training inputs, a bad preprocess.
    """
    if not isinstance(preprocess, dict):
        raise UserError(f"preprocess must be a dict (Prepared.preprocess), got {type(preprocess).__name__}")
    missing = [k for k in REQUIRED if k not in preprocess]
    if missing:
        raise UserError(f"preprocess lacks {missing}: it is not a Prepared.preprocess record")
    if preprocess["format"] != PREPROCESS_FORMAT:
        raise UserError(f"preprocess has format {preprocess['format']!r}; this gdw reads format {PREPROCESS_FORMAT}")
    classes = list(preprocess.get("classes", [])) if classes is None else [str(c) for c in classes]
    if not classes:
        raise UserError("load_new needs the training classes (none given or recorded)")
    pre = {**preprocess, "streamed": None, "text_dir": text_dir}
    ex = read_examples(spec, pre, classes, what="new data", need_labels=False, stream=stream)
    n = len(ex.labels)
    rows, paths = ex.origin.rows_of(np.arange(n)), ex.origin.paths_of(np.arange(n))
    view = View(*(torch.tensor(preprocess[k], dtype=torch.float32) for k in ("mean", "std")),
                None if preprocess["out_hw"] is None else tuple(map(int, preprocess["out_hw"])), int(preprocess["pad"]))
    split = Split("new", ex.store, np.arange(n), ex.labels, None, view, num_workers=num_workers,
                  source_rows=rows, source_paths=paths, source_file=ex.origin.file)
    return NewData(split, rows, paths, ex.has_labels, ex.origin.file, classes)
