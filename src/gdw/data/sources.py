"""What a dataset reader returns (:class:`Source`), the registry of dataset formats
(:data:`FORMATS`: one reader per format, in ``builtin.py`` and ``files.py``), and
:func:`load_source` / :func:`resolve`, which read a dataset by its name.

Lookup of official datasets (mnist, fashion-mnist, cifar10, cifar100, clothing1m, and the
CIFAR-N label files), first folder that has the files wins:
``data_root``, ``data_root/<name>``, ``/usr/share/datasets/<name>`` (Debian's
``dataset-fashion-mnist``), then the cache (``$GDW_CACHE/<name>`` or ``~/.cache/gdw/<name>``).

Train/test splits that are not published (digits, csv, folder without ``train/`` and
``test/``) are stratified and use the fixed seed ``SPLIT_SEED`` = 0, *not* the experiment
seed, so every experiment sees the same test set.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..errors import UserError
from ..registry import Registry
from ..io import file_digest
from .batches import View, channel_stats
from .download import cache_dir

SYSTEM_DIR = Path("/usr/share/datasets")
SPLIT_SEED = 0
FOLDER_MEMORY_LIMIT = 1 << 30  # bytes of uint8 pixels above which a folder is streamed
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}

MNIST_CLASSES = [str(i) for i in range(10)]
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CLOTHING_CLASSES = ["T-Shirt", "Shirt", "Knitwear", "Chiffon", "Sweater", "Hoodie", "Windbreaker", "Jacket",
                    "Downcoat", "Suit", "Shawl", "Dress", "Vest", "Underwear"]
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


def _size(image_size):
    if image_size is None:
        return None
    size = (image_size, image_size) if np.isscalar(image_size) else tuple(image_size)
    if len(size) != 2 or not all(isinstance(s, (int, np.integer)) and s > 0 for s in size):
        raise UserError(f"image_size must be a positive int or (height, width), got {image_size!r}")
    return tuple(int(s) for s in size)


def stratified_split(labels: np.ndarray, fraction: float, seed: int = SPLIT_SEED):
    """Split positions into (train, test), sorted int64: round(fraction * n_c) of each
    class c go to test, keeping at least one example of every class in train. Fraction 0
    (the test set is given separately): everything is train."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.floating)) or not 0 <= fraction < 1:
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
    mean, std = (torch.tensor(s, dtype=torch.float32) for s in stats) if stats else channel_stats(store, rows)
    pad = max(1, round(H / 8)) if out_hw == (H, W) else 0
    return View(mean, std, out_hw, pad)


def cifar_style(store) -> bool:
    """Default augmentation rule: colour 32 x 32 images."""
    return tuple(store.shape) == (3, 32, 32)


@dataclass
class Format:
    """A dataset format: ``read(arg, **options) -> Source`` and how its name is spelled.

    path: ``"required"`` (``csv:PATH``), ``"optional"`` (``clothing1m[:PATH]``) or
    ``"none"`` (``digits``). user_files: the user's own file or folder (the labels may be
    noisy; the file is digested so a reused run notices an edit; a test split drawn from
    it is scored for label issues). suffixes: a bare path with one of these suffixes (or
    a folder, ``"/"``) is this format. examples: reads a meta, test or new set of this
    format like the training data (:func:`gdw.data.own.read_examples`), or None.
    options: the keyword options ``read`` takes from :func:`load_source`'s.
    """

    name: str
    read: Callable[..., "Source"]
    path: str = "none"
    user_files: bool = False
    suffixes: tuple = ()
    options: tuple = ()
    examples: Optional[Callable] = None


FORMATS: Registry[Format] = Registry("dataset")


def register_format(name: str, *, path: str = "none", user_files: bool = False, suffixes=(), options=()):
    """Decorator: register ``read`` as the reader of dataset format ``name``."""
    def add(read):
        FORMATS.register(name)(Format(name, read, path, user_files, tuple(suffixes), tuple(options)))
        return read
    return add


def resolve(dataset) -> tuple[str, str | None]:
    """``(kind, path)`` of a dataset name such as ``digits``, ``npz:a.npz`` or a bare path
    (a folder, or a file with a registered suffix such as ``.npz`` or ``.csv``).
    UserError for an unknown name."""
    if not isinstance(dataset, (str, Path)):
        raise UserError(f"dataset must be a name or path, got {dataset!r}")
    text = str(dataset).strip()
    kind, _, arg = text.partition(":")
    kind = ALIASES.get(kind.lower(), kind.lower())
    fmt = FORMATS._items.get(kind)
    if fmt is not None and fmt.path == "required" and not arg:
        raise UserError(f"dataset {text!r} needs a path, e.g. '{kind}:/data/x'")
    if fmt is not None and (fmt.path != "none" or not arg):
        return kind, arg or None
    path = Path(text)
    for f in FORMATS._items.values():
        if ("/" in f.suffixes and path.is_dir()) or (path.suffix.lower() in f.suffixes and path.is_file()):
            return f.name, text
    raise UserError(f"unknown dataset {text!r}: not an existing folder/.npz/.csv and not one of {', '.join(DATASETS)}")


def files_digest(dataset) -> Optional[str]:
    """A digest of the user's file or folder a dataset spec names (``csv:``,
    ``npz:``, ``folder:`` or a bare path), ``None`` for the built-in datasets
    and Clothing1M. A file's is the SHA-256 of its bytes; a folder's, of every
    file's relative path, size and modification time (reading every image
    would cost as much as a training). UserError as :func:`resolve`."""
    kind, arg = resolve(dataset)
    if not FORMATS.get(kind).user_files:
        return None
    path = Path(arg).expanduser().resolve()
    if path.is_file():
        return cached_digest(path)
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


def cached_digest(path) -> str:
    """:func:`_file_digest` of ``path`` as it is now (its size and modification time)."""
    stat = Path(path).stat()
    return _file_digest(str(path), stat.st_size, stat.st_mtime_ns)


def load_source(dataset, **options) -> Source:
    """Read a dataset (see :func:`gdw.data.prepare` for the names) into a :class:`Source`.

    ``options`` (data_root, download, mirror, label_column, test_fraction, image_size,
    stream, features, ignore, text_column, encoder, text_dir): each format takes the ones it names (:class:`Format`);
    one set for a format that does not take it is a UserError."""
    kind, arg = resolve(dataset)
    fmt = FORMATS.get(kind)
    for name in ("features", "ignore", "text_column", "encoder"):
        if options.get(name) and name not in fmt.options:
            raise UserError(f"--features, --ignore and --text-column choose the columns of a csv: dataset, "
                            f"not of {dataset!r}")
    taken = {k: v for k, v in options.items() if k in fmt.options}
    return fmt.read(arg, **taken) if fmt.path != "none" else fmt.read(**taken)
