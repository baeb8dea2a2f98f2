"""Readers: each turns files in their published on-disk format into a :class:`Source`.

Lookup of official datasets (mnist, fashion-mnist, cifar10, cifar100, clothing1m, and the
CIFAR-N label files), first folder that has the files wins:
``data_root``, ``data_root/<name>``, ``/usr/share/datasets/<name>`` (Debian's
``dataset-fashion-mnist``), then the cache (``$GDW_CACHE/<name>`` or ``~/.cache/gdw/<name>``).

Train/test splits that are not published (digits, csv, folder without ``train/`` and
``test/``) are stratified and use the fixed seed ``SPLIT_SEED`` = 0, *not* the experiment
seed, so every experiment sees the same test set.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import gzip
import hashlib
import pickle
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..errors import UserError
from ..io import file_digest
from ._errors import one_line
from .batches import ImageFileStore, TensorStore, View, channel_stats, load_image, _pil
from .download import cache_dir, fetch_official, safe_extract
from .labels import classes_from, ids_by_name, label_names
from .noise import check_labels

SYSTEM_DIR = Path("/usr/share/datasets")
SPLIT_SEED = 0
FOLDER_MEMORY_LIMIT = 1 << 30  # bytes of uint8 pixels above which a folder is streamed
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}

MNIST_CLASSES = [str(i) for i in range(10)]
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]
CLOTHING_CLASSES = ["T-Shirt", "Shirt", "Knitwear", "Chiffon", "Sweater", "Hoodie",
                    "Windbreaker", "Jacket", "Downcoat", "Suit", "Shawl", "Dress", "Vest",
                    "Underwear"]
CIFAR_STATS = {  # the usual per-channel mean / std of the CIFAR training sets
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "clothing1m[:PATH]",
            "folder:PATH", "npz:PATH", "csv:PATH")
ALIASES = {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist",
           "fmnist": "fashion-mnist", "cifar-10": "cifar10", "cifar-100": "cifar100"}


@dataclass
class Origin:
    """Where the examples of one store come from, in the user's terms.

    file: the file or folder they were read from. rows: for each store position, the
    example's row in that file (0-based data row of a CSV, position in an npz array or in
    a dataset's published array); None means the store position itself. paths: for image
    files, each example's path relative to the folder given (``cat/img_003.png``), else None.
    """

    file: str
    rows: np.ndarray | None = None
    paths: list | None = None

    def rows_of(self, pos) -> np.ndarray:
        pos = np.asarray(pos, dtype=np.int64)
        return pos.copy() if self.rows is None else np.asarray(self.rows, np.int64)[pos]

    def paths_of(self, pos) -> list | None:
        return None if self.paths is None else [self.paths[int(i)] for i in pos]


@dataclass
class Source:
    """What a reader found. Labels are int64 numpy arrays; stores hold the inputs.

    y_train_true: true training labels when ``y_train`` is already noisy (-1 = unknown),
    else None (``y_train`` is clean). x_meta/y_meta: a clean meta set that comes with the
    data (npz ``x_meta``; Clothing1M clean val). meta_pool: (store, labels) of a clean set a
    balanced meta set is drawn from instead of the training set (Clothing1M clean train).
    clean: whether ``y_train`` is known to be the true labels (benchmark datasets) or just
    the user's labels (csv, folder, npz), which may be noisy.
    origins: :class:`Origin` of the stores, keyed "train", "test", "meta", "pool".
    preprocess: how raw inputs of this kind become stored inputs (``kind``, ``input``
    "image"/"tabular", CSV feature and label columns, image size, channels, fit).
    """

    name: str
    classes: list
    x_train: object
    y_train: np.ndarray
    x_test: object
    y_test: np.ndarray
    view: View
    augment: bool = False
    y_train_true: np.ndarray | None = None
    x_meta: object = None
    y_meta: np.ndarray | None = None
    meta_pool: tuple | None = None
    files: list = field(default_factory=list)
    notes: dict = field(default_factory=dict)
    clean: bool = True
    origins: dict = field(default_factory=dict)
    preprocess: dict = field(default_factory=dict)

    def origin(self, part: str) -> Origin:
        return self.origins.get(part) or Origin(self.name)


def image_preprocess(kind: str, store, fit: str = "squash") -> dict:
    """The ``preprocess`` entries of image data held in ``store``."""
    return {"kind": kind, "input": "image", "image_size": list(store.shape[-2:]),
            "channels": int(store.shape[0]), "fit": fit}


# ----------------------------------------------------------------------------- helpers

def search_dirs(name: str, data_root=None) -> list[Path]:
    """Folders searched for an official dataset (see module doc), without duplicates."""
    dirs = [Path(data_root), Path(data_root) / name] if data_root else []
    dirs += [SYSTEM_DIR / name, cache_dir(name)]
    return list(dict.fromkeys(dirs))


def stratified_split(labels: np.ndarray, fraction: float, seed: int = SPLIT_SEED):
    """Split positions into (train, test), sorted int64: round(fraction * n_c) of each
    class c go to test, keeping at least one example of every class in train. Fraction 0
    (the test set is given separately): everything is train."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.floating)) \
            or not 0 <= fraction < 1:
        raise UserError(f"test_fraction must be in [0, 1), got {fraction!r}")
    if fraction == 0:
        return np.arange(len(labels), dtype=np.int64), np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test.append(idx[:min(int(np.floor(fraction * idx.size + 0.5)), idx.size - 1)])
    test = np.sort(np.concatenate(test)).astype(np.int64)
    return np.setdiff1d(np.arange(len(labels)), test), test


def image_view(store, *, stats=None, out_hw=None, rows=None) -> View:
    """View of an image store: given (mean, std) constants or the store's own statistics;
    padding max(1, round(H / 8)) (4 for 32x32 and 28x28) for the CIFAR-style random crop."""
    H, W = store.shape[-2:]
    out_hw = tuple(out_hw or (H, W))
    mean, std = (torch.tensor(s, dtype=torch.float32) for s in stats) if stats \
        else channel_stats(store, rows)
    pad = max(1, round(H / 8)) if out_hw == (H, W) else 0
    return View(mean, std, out_hw, pad)


def cifar_style(store) -> bool:
    """Default augmentation rule: colour 32 x 32 images."""
    return tuple(store.shape) == (3, 32, 32)


def resolve(dataset) -> tuple[str, str | None]:
    """``(kind, path)`` of a dataset name such as ``digits``, ``npz:a.npz`` or a bare path
    (a folder, ``.npz`` or ``.csv`` file). UserError for an unknown name."""
    if not isinstance(dataset, (str, Path)):
        raise UserError(f"dataset must be a name or path, got {dataset!r}")
    text = str(dataset).strip()
    kind, _, arg = text.partition(":")
    kind = ALIASES.get(kind.lower(), kind.lower())
    if kind in ("folder", "npz", "csv"):
        if not arg:
            raise UserError(f"dataset {text!r} needs a path, e.g. '{kind}:/data/x'")
        return kind, arg
    if kind == "clothing1m":
        return kind, arg or None
    if kind in ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100") and not arg:
        return kind, None
    path = Path(text)
    if path.is_dir():
        return "folder", text
    if path.suffix.lower() in (".npz", ".csv") and path.is_file():
        return path.suffix.lower()[1:], text
    raise UserError(f"unknown dataset {text!r}: not an existing folder/.npz/.csv and not one "
                    f"of {', '.join(DATASETS)}")


def files_digest(dataset) -> Optional[str]:
    """A digest of the user's file or folder a dataset spec names (``csv:``,
    ``npz:``, ``folder:`` or a bare path), ``None`` for the built-in datasets
    and Clothing1M. A file's is the SHA-256 of its bytes; a folder's, of every
    file's relative path, size and modification time (reading every image
    would cost as much as a training). UserError as :func:`resolve`."""
    kind, arg = resolve(dataset)
    if kind not in ("csv", "npz", "folder"):
        return None
    path = Path(arg).expanduser().resolve()
    if path.is_file():
        stat = path.stat()
        return _file_digest(str(path), stat.st_size, stat.st_mtime_ns)
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            stat = f.stat()
            h.update(f"{f.relative_to(path).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return "files:" + h.hexdigest()
    raise UserError(f"dataset {dataset!r}: {path} does not exist")


@functools.lru_cache(maxsize=64)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """SHA-256 of a file's bytes (cached on its path, size and modification time)."""
    return "sha256:" + file_digest(path)


def load_source(dataset, *, data_root=None, download=False, mirror=None, label_column="label",
                test_fraction=0.2, image_size=None, stream=None, features=None, ignore=None) -> Source:
    """Read a dataset (see :func:`gdw.data.prepare` for the names) into a :class:`Source`."""
    kind, arg = resolve(dataset)
    if kind != "csv" and (features or ignore):
        raise UserError(f"--features and --ignore choose the columns of a csv: dataset, not of {dataset!r}")
    if kind == "digits":
        return read_digits(test_fraction)
    if kind in ("mnist", "fashion-mnist"):
        return read_idx_dataset(kind, data_root, download, mirror)
    if kind in ("cifar10", "cifar100"):
        return read_cifar(kind, data_root, download, mirror)
    if kind == "clothing1m":
        return read_clothing1m(arg, data_root, image_size)
    if kind == "folder":
        return read_folder(arg, image_size, test_fraction, stream)
    if kind == "npz":
        return read_npz(arg)
    return read_csv(arg, label_column, test_fraction, features, ignore)


# ----------------------------------------------------------------------------- digits

def read_digits(test_fraction: float = 0.2) -> Source:
    """scikit-learn's bundled 8x8 digits: 1797 images (N, 1, 8, 8) float32 in [0, 1]
    (pixel values 0..16 divided by 16), 10 classes; stratified test split of
    ``test_fraction`` with seed SPLIT_SEED."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy((d.images / 16.0).astype(np.float32))[:, None]
    y = d.target.astype(np.int64)
    tr, te = stratified_split(y, test_fraction)
    train, test = TensorStore(x[torch.from_numpy(tr)]), TensorStore(x[torch.from_numpy(te)])
    note = f"stratified {test_fraction:g}, seed {SPLIT_SEED}"
    file = "sklearn.datasets.load_digits"
    return Source("digits", list(MNIST_CLASSES), train, y[tr], test, y[te], image_view(train),
                  notes={"test_split": note},
                  origins={"train": Origin(file, tr), "test": Origin(file, te)},
                  preprocess=image_preprocess("digits", train))


# ----------------------------------------------------------------------------- IDX

IDX_TYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (gzip-compressed if the name ends in .gz) into a numpy array.

    Raises UserError naming the file for a bad magic number, an unknown type code, or a
    size that does not match the header (truncated or corrupt file).
    """
    path = Path(path)
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"cannot read IDX file {path}: {one_line(e)}") from None
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in IDX_TYPES:
        raise UserError(f"{path} is not an IDX file (bad magic number)")
    ndim = data[3]
    head = 4 + 4 * ndim
    if len(data) < head:
        raise UserError(f"IDX file {path} is truncated (incomplete header)")
    dims = struct.unpack(f">{ndim}I", data[4:head])
    dtype = np.dtype(IDX_TYPES[data[2]])
    expected = head + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise UserError(f"IDX file {path} is truncated or corrupt: {len(data)} bytes, "
                        f"header says {expected}")
    return np.frombuffer(data, dtype, offset=head).reshape(dims)


def read_idx_dataset(name: str, data_root=None, download=False, mirror=None) -> Source:
    """MNIST / Fashion-MNIST from the four IDX files (``.gz`` or uncompressed):
    60000 + 10000 uint8 images (N, 1, 28, 28), 10 classes; per-channel normalisation from
    the training images. ``download=True`` fetches missing official files into the cache."""
    def present(d, stem):
        return next((d / f for f in (stem + ".gz", stem) if (d / f).is_file()), None)

    dirs = search_dirs(name, data_root)
    folder = next((d for d in dirs if any(present(d, s) for s in IDX_FILES)), None)
    if folder is None and download:
        for stem in IDX_FILES:
            fetch_official(name, stem + ".gz", mirror=mirror)
        folder = cache_dir(name)
    if folder is None:
        raise UserError(f"{name} IDX files not found in {', '.join(map(str, dirs))}; "
                        "pass data_root= or download=True")
    paths = []
    for stem in IDX_FILES:
        p = present(folder, stem)
        if p is None:
            raise UserError(f"missing {name} file {folder / (stem + '.gz')} (or uncompressed)")
        paths.append(p)
    xtr, ytr, xte, yte = (read_idx(p) for p in paths)
    for x, y, px in ((xtr, ytr, paths[0]), (xte, yte, paths[2])):
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y) or x.dtype != np.uint8:
            raise UserError(f"{px}: expected uint8 images (N, H, W) matching the N labels, "
                            f"got {x.dtype} {x.shape} and labels {y.shape}")
    ytr = check_labels(ytr, 10, f"labels in {paths[1]}")
    yte = check_labels(yte, 10, f"labels in {paths[3]}")
    train = TensorStore(torch.from_numpy(xtr.copy())[:, None])
    classes = FASHION_CLASSES if name == "fashion-mnist" else MNIST_CLASSES
    test = TensorStore(torch.from_numpy(xte.copy())[:, None])
    return Source(name, list(classes), train, ytr, test, yte, image_view(train),
                  files=[str(p) for p in paths],
                  origins={"train": Origin(str(paths[0])), "test": Origin(str(paths[2]))},
                  preprocess=image_preprocess("idx", train))


# ----------------------------------------------------------------------------- CIFAR

class _SafeUnpickler(pickle.Unpickler):
    """Unpickles only plain containers and numpy arrays (what the CIFAR files contain)."""

    ALLOWED = {("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
               ("collections", "OrderedDict")}

    def find_class(self, module, name):
        if module.startswith("numpy.core") and hasattr(np, "_core"):
            module = module.replace("numpy.core", "numpy._core", 1)
        elif module.startswith("numpy._core") and not hasattr(np, "_core"):
            module = module.replace("numpy._core", "numpy.core", 1)
        if (module.replace("numpy.core", "numpy._core", 1), name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def safe_unpickle(path: str | Path) -> object:
    """Load a pickle that may hold only dicts/lists/bytes/numpy arrays (Python 2 pickles
    read with encoding='bytes'). UserError naming the file if it is missing or invalid."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"file not found: {path}")
    try:
        with open(path, "rb") as f:
            return _SafeUnpickler(f, encoding="bytes").load()
    except Exception as e:  # any unpickling failure is a bad file
        raise UserError(f"cannot read pickle file {path}: {one_line(e)}") from None


def _str_keys(d, path) -> dict:
    if not isinstance(d, dict):
        raise UserError(f"{path} does not hold a dict")
    return {k.decode() if isinstance(k, bytes) else str(k): v for k, v in d.items()}


def read_cifar_batch(path: str | Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR python batch: (uint8 (N, 3, 32, 32), int64 (N,) labels). UserError if the
    file is missing, unreadable, lacks the keys, or has rows that are not 3072 bytes."""
    d = _str_keys(safe_unpickle(path), path)
    if "data" not in d or label_key not in d:
        raise UserError(f"{path} lacks the keys 'data' and {label_key!r} (found {sorted(d)})")
    x = np.asarray(d["data"])
    y = np.asarray(d[label_key])
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072 or len(y) != len(x):
        raise UserError(f"{path}: expected 'data' uint8 (N, 3072) and N labels, got "
                        f"{x.dtype} {x.shape} and {y.shape}")
    return x.reshape(-1, 3, 32, 32), y


def read_cifar(name: str, data_root=None, download=False, mirror=None) -> Source:
    """CIFAR-10 (``cifar-10-batches-py``: data_batch_1..5, test_batch, batches.meta) or
    CIFAR-100 (``cifar-100-python``: train, test, meta; fine labels): uint8 (N, 3, 32, 32),
    the usual normalisation constants, augmentation on by default.
    ``download=True`` fetches and safely extracts the official archive into the cache."""
    ten = name == "cifar10"
    sub = "cifar-10-batches-py" if ten else "cifar-100-python"
    marker = "data_batch_1" if ten else "train"
    dirs = search_dirs(name, data_root)
    base = next((b for d in dirs for b in (d / sub, d) if (b / marker).is_file()), None)
    if base is None and download:
        archive = fetch_official(name, "cifar-10-python.tar.gz" if ten else
                                 "cifar-100-python.tar.gz", mirror=mirror)
        safe_extract(archive, archive.parent)
        base = archive.parent / sub
    if base is None:
        raise UserError(f"{name} not found: no {sub}/{marker} in {', '.join(map(str, dirs))}; "
                        "pass data_root= or download=True")
    key = "labels" if ten else "fine_labels"
    train_files = [f"data_batch_{i}" for i in range(1, 6)] if ten else ["train"]
    parts = [read_cifar_batch(base / f, key) for f in train_files]
    xte, yte = read_cifar_batch(base / ("test_batch" if ten else "test"), key)
    C = 10 if ten else 100
    meta = base / ("batches.meta" if ten else "meta")
    classes = CIFAR10_CLASSES if ten else [str(i) for i in range(C)]
    if meta.is_file():
        m = _str_keys(safe_unpickle(meta), meta)
        names = m.get("label_names" if ten else "fine_label_names")
        if names is not None and len(names) == C:
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    ytr = check_labels(np.concatenate([p[1] for p in parts]), C, f"labels in {base}")
    yte = check_labels(yte, C, f"labels in {base}")
    train = TensorStore(torch.from_numpy(np.concatenate([p[0] for p in parts])))
    return Source(name, list(classes), train, ytr, TensorStore(torch.from_numpy(xte)), yte,
                  image_view(train, stats=CIFAR_STATS[name]), augment=True,
                  files=[str(base / f) for f in train_files],
                  origins={"train": Origin(str(base)),
                           "test": Origin(str(base / ("test_batch" if ten else "test")))},
                  preprocess=image_preprocess("cifar", train))


CIFAR_N = {"cifar10n": ("cifar10", "CIFAR-10_human.pt"),
           "cifar100n": ("cifar100", "CIFAR-100_human.pt")}
CIFAR_N_KEYS = {"aggregate": "aggre_label", "worst": "worse_label", "rand1": "random_label1",
                "rand2": "random_label2", "rand3": "random_label3", "random1": "random_label1",
                "random2": "random_label2", "random3": "random_label3"}


def _label_dict(path: Path) -> dict:
    """A dict of label arrays from a torch.save file (loaded weights-only, with numpy arrays
    allowed, also as pickled by numpy 1.x) or from a plain pickle."""
    try:
        if zipfile.is_zipfile(path):
            mm = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
            dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25 pickles dtype classes
            allowed = [mm._reconstruct, np.ndarray, np.dtype,
                       (mm._reconstruct, "numpy.core.multiarray._reconstruct")] + \
                [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
            safe = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
            with safe(allowed) if safe else contextlib.nullcontext():
                d = torch.load(path, map_location="cpu", weights_only=True)
        else:
            d = safe_unpickle(path)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot read label file {path}: {one_line(e)}") from None
    return _str_keys(d, path)


def read_cifar_n(kind: str, key: str, path=None, data_root=None, n_train: int = 50000,
                 num_classes: int = 10) -> tuple[np.ndarray, str, str]:
    """Human noisy labels of CIFAR-10N / CIFAR-100N from the published label file.

    ``key`` is e.g. ``worse`` / ``worse_label`` / ``aggre`` / ``random1`` / ``noisy``. The
    file (``CIFAR-10_human.pt`` / ``CIFAR-100_human.pt``, torch.save or pickle of a dict of
    label arrays) is ``path`` or looked up like the data. Returns (labels (n_train,) int64,
    resolved key, file path). UserError for a missing file, unknown key, wrong length or
    labels out of range.
    """
    dataset, filename = CIFAR_N[kind]
    if path is None:
        dirs = search_dirs(kind, data_root) + search_dirs(dataset, data_root)
        path = next((d / filename for d in dirs if (d / filename).is_file()), None)
        if path is None:
            raise UserError(f"{kind} label file {filename} not found in "
                            f"{', '.join(map(str, dict.fromkeys(dirs)))}; get it from "
                            f"https://github.com/UCSC-REAL/cifar-10-100n (data/{filename}) "
                            f"or give it as '{kind}:{key}:/path/to/{filename}'")
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{kind} label file not found: {path}")
    d = _label_dict(path)
    k = key.lower()
    name = next((c for c in (k, f"{k}_label", CIFAR_N_KEYS.get(k)) if c in d), None)
    if name is None:
        raise UserError(f"no label key {key!r} in {path}; available: {', '.join(sorted(d))}")
    y = d[name]
    y = y.numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    y = check_labels(y.reshape(-1) if y.ndim == 2 and 1 in y.shape else y, num_classes,
                     f"{name} in {path}")
    if len(y) != n_train:
        raise UserError(f"{name} in {path} has {len(y)} labels but the training set has {n_train}")
    return y, name, str(path)


# ----------------------------------------------------------------------------- Clothing1M

CLOTHING_LISTS = ("noisy_label_kv.txt", "clean_label_kv.txt", "noisy_train_key_list.txt",
                  "clean_train_key_list.txt", "clean_val_key_list.txt", "clean_test_key_list.txt")


def _read_lines(path: Path) -> list[str]:
    try:
        return [s for s in path.read_text(encoding="utf-8").splitlines() if s.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {one_line(e)}") from None


def _read_kv(path: Path) -> dict:
    out = {}
    for i, line in enumerate(_read_lines(path), 1):
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            raise UserError(f"{path}, line {i}: expected 'path label', got {line!r}")
        out[parts[0]] = int(parts[1])
    return out


def read_clothing1m(root=None, data_root=None, image_size=None) -> Source:
    """Clothing1M from its lists (in ``root`` or ``root/annotations``) and images under root.

    Train = noisy train keys with their noisy labels (true label from the clean kv, else
    -1); meta = clean val keys (or a balanced draw from the clean train keys, see
    prepare); test = clean test keys. Images are streamed: scaled to cover
    L x L (L = round(image_size * 256 / 224); image_size an int or (h, w), default 224),
    center-cropped to L x L, then randomly (training) or centrally cropped to image_size;
    ImageNet normalisation.
    """
    if root is None:
        dirs = search_dirs("clothing1m", data_root)
        root = next((d for d in dirs for a in (d, d / "annotations")
                     if (a / CLOTHING_LISTS[0]).is_file()), None)
        if root is None:
            raise UserError(f"Clothing1M lists ({CLOTHING_LISTS[0]}, ...) not found in "
                            f"{', '.join(map(str, dirs))}; pass 'clothing1m:/path/to/root'")
    root = Path(root)
    ann = root / "annotations" if (root / "annotations" / CLOTHING_LISTS[0]).is_file() else root
    for f in CLOTHING_LISTS:
        if not (ann / f).is_file():
            raise UserError(f"missing Clothing1M file {ann / f}")
    noisy, clean = _read_kv(ann / CLOTHING_LISTS[0]), _read_kv(ann / CLOTHING_LISTS[1])
    keys = {f: _read_lines(ann / f) for f in CLOTHING_LISTS[2:]}
    names = ann / "category_names_eng.txt"
    classes = _read_lines(names) if names.is_file() else list(CLOTHING_CLASSES)
    C = len(classes)

    def labelled(listname, kv, kvname, unknown_ok=False):
        ks = keys[listname]
        y = np.array([kv.get(k, -1) for k in ks], dtype=np.int64)
        if not unknown_ok and (y < 0).any():
            raise UserError(f"key {ks[int(np.argmax(y < 0))]} of {ann / listname} has no label "
                            f"in {ann / kvname}")
        if (y >= C).any():
            raise UserError(f"label {y.max()} of {ks[int(np.argmax(y >= C))]} in {ann / kvname} "
                            f"is out of range 0..{C - 1}")
        return ks, y

    crop = _size(image_size) or (224, 224)
    load = tuple(round(s * 256 / 224) for s in crop)

    def store(ks):
        return ImageFileStore([root / k for k in ks], load, 3, fit="center")

    tr_keys, ytr = labelled("noisy_train_key_list.txt", noisy, "noisy_label_kv.txt")
    _, ytrue = labelled("noisy_train_key_list.txt", clean, "clean_label_kv.txt", unknown_ok=True)
    pool_keys, ypool = labelled("clean_train_key_list.txt", clean, "clean_label_kv.txt")
    val_keys, yval = labelled("clean_val_key_list.txt", clean, "clean_label_kv.txt")
    te_keys, yte = labelled("clean_test_key_list.txt", clean, "clean_label_kv.txt")
    train = store(tr_keys)

    def origin(listname, ks):
        return Origin(str(ann / listname), None, list(ks))

    return Source("clothing1m", classes, train, ytr, store(te_keys), yte,
                  View(*(torch.tensor(s) for s in IMAGENET_STATS), crop, 0),
                  augment=True, y_train_true=ytrue, x_meta=store(val_keys), y_meta=yval,
                  meta_pool=(store(pool_keys), ypool),
                  files=[str(ann / f) for f in CLOTHING_LISTS],
                  origins={"train": origin("noisy_train_key_list.txt", tr_keys),
                           "test": origin("clean_test_key_list.txt", te_keys),
                           "meta": origin("clean_val_key_list.txt", val_keys),
                           "pool": origin("clean_train_key_list.txt", pool_keys)},
                  preprocess=image_preprocess("clothing1m", train, fit="center"))


# ----------------------------------------------------------------------------- folder

def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted by path."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                  and p.is_file())


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
        raise UserError(f"{root} has class folders not in the training set: "
                        f"{sorted(set(found) - set(classes))}")
    paths, labels = [], []
    for c, name in enumerate(classes):
        d = root / name
        files = list_images(d) if d.is_dir() else []
        if not files and training:
            raise UserError(f"class folder {d} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        paths += files
        labels += [c] * len(files)
    return paths, np.array(labels, dtype=np.int64), classes


def _size(image_size):
    if image_size is None:
        return None
    size = (image_size, image_size) if np.isscalar(image_size) else tuple(image_size)
    if len(size) != 2 or not all(isinstance(s, (int, np.integer)) and s > 0 for s in size):
        raise UserError(f"image_size must be a positive int or (height, width), got {image_size!r}")
    return tuple(int(s) for s in size)


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
    n_bytes = (len(ptr) + len(pte)) * ch * size[0] * size[1]
    if stream is None:
        stream = n_bytes > FOLDER_MEMORY_LIMIT
    train = image_store(ptr, size, ch, stream=bool(stream))
    rows = None
    if stream:
        rows = torch.from_numpy(np.random.default_rng(SPLIT_SEED).permutation(len(ptr))[:256])
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
        raise UserError(f"{path}: {what} must be (N, D), (N, H, W) or (N, C, H, W), "
                        f"got shape {a.shape}")
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


def npz_label_ids(y: np.ndarray, classes: list, what: str, *, indices: bool,
                  unknown: bool = False) -> np.ndarray:
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
    if indices:
        out[known] = check_labels(y[known], len(classes), what)
    else:
        out[known] = ids_by_name(label_names(y[known], what), classes, what)
    return out


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
    array of the non-empty data rows, ``lines`` (file line of each data row)."""

    path: Path
    header: list
    table: np.ndarray
    lines: list

    def column(self, name: str) -> np.ndarray:
        return np.char.strip(self.table[:, self.header.index(name)])

    def features(self, names: list, categories: dict | None = None) -> np.ndarray:
        """The columns ``names`` as float32 (n, D). A
        column in ``categories`` ({name: [values]}) is one-hot encoded in that order (a value
        not among them: all zeros). UserError naming the missing columns, or the line and
        column of a non-numeric value."""
        missing = [n for n in names if n not in self.header]
        if missing:
            raise UserError(f"CSV file {self.path} lacks the feature columns {missing} of the "
                            f"training data")
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
        raise UserError(f"{path}, line {numbered[bad][0]}: {len(rows[bad])} fields, "
                        f"header has {len(header)}")
    twice = next((h for k, h in enumerate(header) if h and h in header[:k]), None)
    if twice is not None:
        raise UserError(f"CSV file {path} has two columns named {twice!r}; give each column its own name")
    return CsvTable(path, header, np.array(rows[1:], dtype=str), [n for n, _ in numbered[1:]])


def read_csv(path, label_column="label", test_fraction=0.2, features=None, ignore=None) -> Source:
    """A CSV file with a header (comma-, semicolon- or tab-delimited): feature columns and
    a label column.

    Feature columns: ``features`` (names, a list or comma-separated), else every column
    but the label column, those in ``ignore`` and those without a name (pandas' index). A
    column none of whose values is a number is one-hot encoded (one 0/1 feature per
    distinct value, sorted; ``preprocess["categories"]`` keeps the values for new data).
    Labels that are all integers become classes in increasing numeric order (names are
    the values); otherwise classes are the sorted distinct strings. Features are float32
    (N, D), normalised per feature with training statistics. Test split: stratified
    ``test_fraction``, seed SPLIT_SEED. Source rows: the 0-based data row
    (:func:`read_csv_table`). UserError for a missing label or named column, two columns
    of one name, a row with the wrong number of fields, an empty label, or a non-numeric /
    non-finite value in a numeric column (naming line and column).
    """
    t = read_csv_table(path)
    path = t.path
    if label_column not in t.header:
        raise UserError(f"CSV file {path} has no column {label_column!r} (columns: {t.header})")
    chosen, ignored = (_names(v) for v in (features, ignore))
    for flag, given in (("--features", chosen), ("--ignore", ignored)):
        unknown = [n for n in given or [] if n not in t.header or n == label_column]
        if unknown:
            raise UserError(f"{flag}: {unknown[0]!r} is not a feature column of {path} (columns: {t.header})")
    names = [h for h in (chosen or t.header) if h and h != label_column and h not in (ignored or [])]
    if not names:
        raise UserError(f"CSV file {path} has no feature columns left (columns: {t.header})")
    categories = {}
    for n in names:  # a column without a single number holds categories
        v = t.column(n)
        if not any(_finite(s) for s in v):
            categories[n] = sorted(set(v.tolist()))
    x = t.features(names, categories)
    raw = t.column(label_column)
    if (raw == "").any():
        raise UserError(f"{path}, line {t.lines[int(np.argmax(raw == ''))]}: empty label")
    classes = classes_from(raw)
    y = ids_by_name(raw, classes, f"column {label_column!r} of {path}")
    tr, te = stratified_split(y, test_fraction)
    X = torch.from_numpy(x)
    train = TensorStore(X[torch.from_numpy(tr)])
    file = str(path)
    return Source(f"csv:{path}", classes, train, y[tr], TensorStore(X[torch.from_numpy(te)]),
                  y[te], View(*channel_stats(train)), files=[file],
                  notes={"test_split": f"stratified {test_fraction:g}, seed {SPLIT_SEED}",
                         "features": names},
                  clean=False,
                  origins={"train": Origin(file, tr), "test": Origin(file, te)},
                  preprocess={"kind": "csv", "input": "tabular", "feature_columns": names,
                              "categories": categories, "label_column": label_column})


def _names(value) -> list | None:
    """``"a, b"`` or ``["a", "b"]`` -> ``["a", "b"]``; None stays None."""
    if value is None:
        return None
    return [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()]
