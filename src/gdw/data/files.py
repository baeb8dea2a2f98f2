"""The user's own files: a folder of images, an npz of arrays, a CSV table."""

from __future__ import annotations

import csv
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError, one_line
from .batches import ImageFileStore, TensorStore, View, channel_stats, load_image, _pil
from .labels import classes_from, ids_by_name, label_names
from .noise import check_labels

from .sources import (FOLDER_MEMORY_LIMIT, IMAGE_SUFFIXES, SPLIT_SEED, Origin, Source, _size, cifar_style,
                      image_preprocess, image_view, register_format, stratified_split)


# ----------------------------------------------------------------------------- folder

def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted by path."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def class_folders(root: Path) -> list[str]:
    """Sorted names of the non-hidden sub-folders of ``root``."""
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _scan(root: Path, classes=None):
    """(paths, labels, classes) of ``root/<class>/**/image``; ``classes`` None means the
    sorted sub-folders (each must hold an image), else a fixed list (a test folder)."""
    found = class_folders(root)
    training = classes is None
    if training:
        classes = found
        if not classes:
            raise UserError(f"no class sub-folders in {root}")
    elif set(found) - set(classes):
        raise UserError(f"{root} has class folders not in the training set: {sorted(set(found) - set(classes))}")
    paths, labels = [], []
    for c, name in enumerate(classes):
        d = root / name
        files = list_images(d) if d.is_dir() else []
        if not files and training:
            raise UserError(f"class folder {d} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        paths += files
        labels += [c] * len(files)
    return paths, np.array(labels, dtype=np.int64), classes


def image_store(paths, size, channels: int, *, stream: bool | None = None, fit: str = "squash"):
    """Images read with :func:`load_image`: streamed from disk (:class:`ImageFileStore`)
    when ``stream`` is True (None: when the pixels exceed FOLDER_MEMORY_LIMIT), else loaded
    into a uint8 :class:`TensorStore`. Both give the same pixels."""
    size = tuple(int(s) for s in size)
    if stream is None:
        stream = len(paths) * channels * size[0] * size[1] > FOLDER_MEMORY_LIMIT
    if stream:
        return ImageFileStore(paths, size, channels, fit=fit)
    x = torch.empty((len(paths), channels, *size), dtype=torch.uint8)
    for i, p in enumerate(paths):
        x[i] = load_image(p, size, channels, fit)
    return TensorStore(x)


def relative_paths(paths, root: Path) -> list[str]:
    """Paths relative to ``root``, with forward slashes (``cat/img_003.png``)."""
    return [Path(p).relative_to(root).as_posix() for p in paths]


@register_format("folder", path="required", user_files=True, suffixes=("/",),
                 options=("image_size", "test_fraction", "stream"))
def read_folder(path, image_size=None, test_fraction=0.2, stream=None) -> Source:
    """One sub-folder per class of image files; class names = sorted folder names.

    Layout ``PATH/train/<class>/...`` + ``PATH/test/<class>/...``, or ``PATH/<class>/...``
    with a stratified test split of ``test_fraction`` (seed SPLIT_SEED). Images are
    resized (squashed) to ``image_size`` (default: the first image's size) and are
    greyscale if the first image is, else RGB. Kept in memory as uint8 unless the pixels
    exceed FOLDER_MEMORY_LIMIT (1 GiB) or ``stream=True``: then streamed from disk.
    Normalisation: per-channel statistics of the training images (of at most 256 of them
    when streaming). Source rows: position in the sorted list of the images of the folder
    (of ``train/`` or ``test/``); source paths relative to PATH.
    """
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"image folder not found: {root}")
    if (root / "train").is_dir() and (root / "test").is_dir():
        ptr, ytr, classes = _scan(root / "train")
        pte, yte, _ = _scan(root / "test", classes)
        rtr, rte = np.arange(len(ptr)), np.arange(len(pte))
        note = "train/ and test/ folders"
    else:
        paths, y, classes = _scan(root)
        rtr, rte = stratified_split(y, test_fraction)
        ptr, ytr, pte, yte = [paths[i] for i in rtr], y[rtr], [paths[i] for i in rte], y[rte]
        note = f"stratified {test_fraction:g}, seed {SPLIT_SEED}"
    Image = _pil()
    try:
        with Image.open(ptr[0]) as im:
            first, mode = (im.height, im.width), im.mode
    except OSError as e:
        raise UserError(f"cannot read image {ptr[0]}: {one_line(e)}") from None
    size = _size(image_size) or first
    ch = 1 if mode in ("1", "L", "LA", "I", "I;16", "F") else 3
    if stream is None:
        stream = (len(ptr) + len(pte)) * ch * size[0] * size[1] > FOLDER_MEMORY_LIMIT
    train = image_store(ptr, size, ch, stream=bool(stream))
    rows = torch.from_numpy(np.random.default_rng(SPLIT_SEED).permutation(len(ptr))[:256]) if stream else None
    return Source(f"folder:{root}", classes, train, ytr, image_store(pte, size, ch, stream=bool(stream)),
                  yte, image_view(train, rows=rows), augment=cifar_style(train),
                  files=[str(root)], notes={"test_split": note, "streamed": bool(stream)},
                  clean=False,
                  origins={"train": Origin(str(root), rtr, relative_paths(ptr, root)),
                           "test": Origin(str(root), rte, relative_paths(pte, root))},
                  preprocess=image_preprocess("folder", train))


# ----------------------------------------------------------------------------- npz / csv

def _inputs(a: np.ndarray, what: str, path) -> torch.Tensor:
    if a.dtype.kind not in "uifb":
        raise UserError(f"{path}: {what} must be numeric, got dtype {a.dtype}")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise UserError(f"{path}: {what} contains NaN or infinite values")
    if a.ndim == 3:
        a = a[:, None]
    elif a.ndim == 4 and a.shape[1] > 4 and a.shape[-1] <= 4:
        a = a.transpose(0, 3, 1, 2)  # N x H x W x C -> N x C x H x W
    elif a.ndim not in (2, 4):
        raise UserError(f"{path}: {what} must be (N, D), (N, H, W) or (N, C, H, W), got shape {a.shape}")
    a = a if a.dtype == np.uint8 and a.ndim == 4 else a.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(a))


def read_npz_arrays(path) -> dict:
    """All arrays of an ``.npz`` file (no pickles). UserError if missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"npz file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        hint = "; save string arrays with .astype(str), numbers with .astype(float)" if "bject arrays" in str(e) else ""
        raise UserError(f"cannot read npz file {path}: {one_line(e)}{hint}") from None


def npz_label_ids(y: np.ndarray, classes: list, what: str, *, indices: bool, unknown: bool = False) -> np.ndarray:
    """Class ids of one npz label array. ``indices``: the file has a ``classes`` array, so
    numeric labels are positions in it (checked to be in range); string labels are always
    matched by name. ``unknown``: -1 (numeric) means an unknown label."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise UserError(f"{what} must be a 1-D array, got shape {y.shape}")
    if y.dtype.kind in "US":
        return ids_by_name(label_names(y, what), classes, what)
    known = (y != -1) if unknown and y.dtype.kind in "if" else np.ones(len(y), bool)
    out = np.full(len(y), -1, dtype=np.int64)
    out[known] = check_labels(y[known], len(classes), what) if indices else \
        ids_by_name(label_names(y[known], what), classes, what)
    return out


@register_format("npz", path="required", user_files=True, suffixes=(".npz",))
def read_npz(path) -> Source:
    """Arrays ``x_train, y_train, x_test, y_test`` (required), ``y_train_true`` (if y_train is
    already noisy; -1 = unknown), ``x_meta, y_meta`` (a clean meta set), ``classes`` (names).

    x: (N, D) tabular -> float32, per-feature normalisation; (N, H, W), (N, C, H, W) or
    (N, H, W, C) images -> uint8 kept (scaled by 1/255) or float32, per-channel
    normalisation. Labels: with ``classes``, integer positions in it (integral floats
    accepted) or the names themselves (strings); without, label values (integers or
    strings), named and numbered as in :mod:`gdw.data.labels` (``10, 20, 30`` -> classes
    ``"10", "20", "30"``, ids 0, 1, 2).
    """
    path = Path(path)
    arrays = read_npz_arrays(path)
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in arrays]
    if missing:
        raise UserError(f"{path} lacks arrays {missing} (found {sorted(arrays)})")
    if ("x_meta" in arrays) != ("y_meta" in arrays):
        raise UserError(f"{path}: x_meta and y_meta must be given together")
    ys = {k: arrays[k] for k in ("y_train", "y_test", "y_train_true", "y_meta") if k in arrays}
    indices = "classes" in arrays
    if indices:
        classes = [str(c) for c in label_names(arrays["classes"].reshape(-1), f"classes in {path}")]
    else:
        names = []
        for k, v in ys.items():
            v = np.asarray(v)
            if k == "y_train_true" and v.dtype.kind in "if":
                v = v[v != -1]
            names.append(label_names(v.reshape(-1) if v.ndim == 1 else v, f"{k} in {path}"))
        classes = classes_from(np.concatenate(names))
    ys = {k: npz_label_ids(v, classes, f"{k} in {path}", indices=indices,
                           unknown=k == "y_train_true") for k, v in ys.items()}
    xs = {k: _inputs(arrays[k], k, path) for k in ("x_train", "x_test", "x_meta") if k in arrays}
    for k, x in xs.items():
        yk = "y" + k[1:]
        if len(x) != len(ys[yk]) or x.shape[1:] != xs["x_train"].shape[1:]:
            raise UserError(f"{path}: {k} has shape {tuple(x.shape)} but {yk} has "
                            f"{len(ys[yk])} labels and x_train is {tuple(xs['x_train'].shape)}")
    if "y_train_true" in ys and len(ys["y_train_true"]) != len(ys["y_train"]):
        raise UserError(f"{path}: y_train_true and y_train differ in length")
    train = TensorStore(xs["x_train"])
    image = train.x.ndim == 4
    view = image_view(train) if image else View(*channel_stats(train))
    meta = TensorStore(xs["x_meta"]) if "x_meta" in xs else None
    pre = image_preprocess("npz", train) if image else {"kind": "npz", "input": "tabular"}
    file = str(path)
    return Source(f"npz:{path}", classes, train, ys["y_train"], TensorStore(xs["x_test"]),
                  ys["y_test"], view, augment=image and cifar_style(train),
                  y_train_true=ys.get("y_train_true"), x_meta=meta, y_meta=ys.get("y_meta"),
                  files=[file], clean=False, preprocess=pre,
                  origins={"train": Origin(file), "test": Origin(file), "meta": Origin(file)})


@dataclass
class CsvTable:
    """A CSV file read as text: ``header`` (stripped names), ``table`` (n, columns) str
    array of the non-empty data rows, ``lines`` (file line of each data row), and the
    ``delimiter`` it was read with."""

    path: Path
    header: list
    table: np.ndarray
    lines: list
    delimiter: str = ","

    def column(self, name: str, empty: str | None = None) -> np.ndarray:
        """The stripped values of column ``name``; with ``empty`` (what a value is, e.g. "label"),
        UserError naming the line of the first empty one."""
        v = np.char.strip(self.table[:, self.header.index(name)])
        if empty is not None and (v == "").any():
            raise UserError(f"{self.path}, line {self.lines[int(np.argmax(v == ''))]}: empty {empty}")
        return v

    def features(self, names: list, categories: dict | None = None) -> np.ndarray:
        """The columns ``names`` as float32 (n, D). A
        column in ``categories`` ({name: [values]}) is one-hot encoded in that order (a value
        not among them: all zeros). UserError naming the missing columns, or the line and
        column of a non-numeric value."""
        missing = [n for n in names if n not in self.header]
        if missing:
            raise UserError(f"CSV file {self.path} lacks the feature columns {missing} of the training data")
        parts = []
        for name in names:
            v = self.column(name)
            if name in (categories or {}):
                parts.append((v[:, None] == np.array(categories[name], dtype=str)).astype(np.float32))
                continue
            try:
                x = v.astype(np.float64)
            except ValueError:
                x = None
            if x is None or not np.isfinite(x).all():
                bad = next(r for r, s in enumerate(v) if not _finite(s))
                raise UserError(f"{self.path}, line {self.lines[bad]}, column {name!r}: "
                                f"non-numeric value {str(v[bad])!r}")
            parts.append(x.astype(np.float32)[:, None])
        return np.concatenate(parts, 1) if parts else np.zeros((len(self.table), 0), np.float32)


def _finite(s: str) -> bool:
    try:
        return bool(np.isfinite(float(s)))
    except ValueError:
        return False


def read_csv_table(path) -> CsvTable:
    """Read a CSV file with a header. Empty rows are skipped: data row k (0-based, the
    header not counted) is the k-th non-empty row after the header, as pandas numbers
    them. UserError for a missing/unreadable file, no data rows, or a row with the wrong
    number of fields (naming the line)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"CSV file not found: {path}")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            sep = max(",;\t", key=f.readline().count)  # the header's most frequent of , ; and tab
            f.seek(0)
            numbered = [(i + 1, r) for i, r in enumerate(csv.reader(f, delimiter=sep)) if any(s.strip() for s in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"cannot read CSV file {path}: {one_line(e)}") from None
    if len(numbered) < 2:
        raise UserError(f"CSV file {path} has no data rows")
    rows = [r for _, r in numbered]
    header = [h.strip() for h in rows[0]]
    bad = next((i for i, r in enumerate(rows) if len(r) != len(header)), None)
    if bad is not None:
        raise UserError(f"{path}, line {numbered[bad][0]}: {len(rows[bad])} fields, header has {len(header)}")
    twice = next((h for k, h in enumerate(header) if h and h in header[:k]), None)
    if twice is not None:
        raise UserError(f"CSV file {path} has two columns named {twice!r}; give each column its own name")
    return CsvTable(path, header, np.array(rows[1:], dtype=str), [n for n, _ in numbered[1:]], sep)


@register_format("csv", path="required", user_files=True, suffixes=(".csv",),
                 options=("label_column", "test_fraction", "features", "ignore", "text_column", "encoder", "text_dir"))
def read_csv(path, label_column="label", test_fraction=0.2, features=None, ignore=None, text_column=None,
             encoder=None, text_dir=None) -> Source:
    """A CSV file with a header (comma-, semicolon- or tab-delimited): feature columns and
    a label column, or a text column (``text_column``).

    Feature columns: ``features`` (names, a list or comma-separated), else every column
    but the label column, those in ``ignore`` and those without a name (pandas' index). A
    column none of whose values is a number is one-hot encoded (one 0/1 feature per
    distinct value, sorted; ``preprocess["categories"]`` keeps the values for new data).
    ``text_column``: the features are that column's text through an encoder instead
    (:mod:`gdw.data.text`: a model folder ``encoder``, or TF-IDF and SVD fitted on the
    training rows; ``text_dir``, a resumed run's directory, holds the fitted one and the
    cached embeddings). Labels that are all integers become classes in increasing numeric
    order (names are the values); otherwise classes are the sorted distinct strings.
    Features are float32 (N, D), normalised per feature with training statistics. Test
    split: stratified ``test_fraction``, seed SPLIT_SEED. Source rows: the 0-based data
    row (:func:`read_csv_table`). UserError for a missing label or named column, two columns
    of one name, a row with the wrong number of fields, an empty label or text, or a
    non-numeric / non-finite value in a numeric column (naming line and column).
    """
    t = read_csv_table(path)
    path = t.path
    if label_column not in t.header:
        hint = f"; if the labels are its last column: --label-column {t.header[-1]}" if t.header else ""
        raise UserError(f"CSV file {path} has no column {label_column!r} (columns: {t.header}){hint}"
                        if label_column == "label" else
                        f"CSV file {path} has no column {label_column!r} (--label-column; columns: {t.header})")
    if encoder is not None and text_column is None:
        raise UserError("--encoder turns a text column into features: give --text-column too")
    raw = t.column(label_column, empty="label")
    classes = classes_from(raw)
    y = ids_by_name(raw, classes, f"column {label_column!r} of {path}")
    tr, te = stratified_split(y, test_fraction)
    if text_column is not None:
        if features or ignore:
            raise UserError("--features and --ignore do not go with --text-column: the text is the features")
        from .text import text_features

        x, pre = text_features(t, tr, label_column, text_column, encoder, text_dir)
        names = [text_column]
    else:
        names, pre = _feature_columns(t, label_column, features, ignore)
        x = t.features(names, pre["categories"])
    X = torch.from_numpy(x)
    train = TensorStore(X[torch.from_numpy(tr)])
    file = str(path)
    return Source(f"csv:{path}", classes, train, y[tr], TensorStore(X[torch.from_numpy(te)]),
                  y[te], View(*channel_stats(train)), files=[file],
                  notes={"test_split": f"stratified {test_fraction:g}, seed {SPLIT_SEED}",
                         "features": names},
                  clean=False,
                  origins={"train": Origin(file, tr), "test": Origin(file, te)},
                  preprocess={"kind": "csv", "input": "tabular", **pre, "label_column": label_column})


def _feature_columns(t: CsvTable, label_column: str, features, ignore) -> tuple[list, dict]:
    """``(feature column names, {"feature_columns", "categories"})`` of a table."""
    path = t.path
    chosen, ignored = (_names(v) for v in (features, ignore))
    for flag, given in (("--features", chosen), ("--ignore", ignored)):
        unknown = [n for n in given or [] if n not in t.header or n == label_column]
        if unknown:
            raise UserError(f"{flag}: {unknown[0]!r} is not a feature column of {path} (columns: {t.header})")
    names = [h for h in (chosen or t.header) if h and h != label_column and h not in (ignored or [])]
    if not names:
        raise UserError(f"CSV file {path} has no feature columns left (columns: {t.header})")
    columns = {n: t.column(n) for n in names}  # a column without a single number holds categories
    categories = {n: sorted(set(v.tolist())) for n, v in columns.items() if not any(_finite(s) for s in v)}
    return names, {"feature_columns": names, "categories": categories}


def _names(value) -> list | None:
    """``"a, b"`` or ``["a", "b"]`` -> ``["a", "b"]``; None stays None."""
    if value is None:
        return None
    return [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()]
