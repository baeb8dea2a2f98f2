"""The built-in datasets, each read from its published on-disk format: scikit-learn's
digits, MNIST and Fashion-MNIST (IDX), CIFAR-10/100 (and the CIFAR-N label files),
Clothing1M. Lookup of the files: :func:`gdw.data.sources.search_dirs`.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError, one_line
from .batches import ImageFileStore, TensorStore, View
from .download import cache_dir, fetch_official, safe_extract
from .noise import check_labels

from .sources import (CIFAR10_CLASSES, CIFAR_STATS, CLOTHING_CLASSES, FASHION_CLASSES, IMAGENET_STATS, MNIST_CLASSES,
                      SPLIT_SEED, Origin, Source, _size, image_preprocess, image_view, register_format, search_dirs,
                      stratified_split)


# ----------------------------------------------------------------------------- digits

@register_format("digits", options=("test_fraction",))
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
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


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
        raise UserError(f"IDX file {path} is truncated or corrupt: {len(data)} bytes, header says {expected}")
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
        raise UserError(f"{name} IDX files not found in {', '.join(map(str, dirs))}; pass data_root= or download=True")
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

    ALLOWED = {("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"), ("numpy", "ndarray"),
               ("numpy", "dtype"), ("_codecs", "encode"), ("collections", "OrderedDict")}

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
        raise UserError(f"{path}: expected 'data' uint8 (N, 3072) and N labels, got {x.dtype} {x.shape} and {y.shape}")
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
        archive = fetch_official(name, "cifar-10-python.tar.gz" if ten else "cifar-100-python.tar.gz", mirror=mirror)
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


CIFAR_N = {"cifar10n": ("cifar10", "CIFAR-10_human.pt"), "cifar100n": ("cifar100", "CIFAR-100_human.pt")}
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
    y = check_labels(y.reshape(-1) if y.ndim == 2 and 1 in y.shape else y, num_classes, f"{name} in {path}")
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


def _clothing_root(root, data_root) -> tuple[Path, Path]:
    """``(root, folder of the lists)`` of Clothing1M, found or checked; UserError if a list is missing."""
    if root is None:
        dirs = search_dirs("clothing1m", data_root)
        root = next((d for d in dirs for a in (d, d / "annotations") if (a / CLOTHING_LISTS[0]).is_file()), None)
        if root is None:
            raise UserError(f"Clothing1M lists ({CLOTHING_LISTS[0]}, ...) not found in "
                            f"{', '.join(map(str, dirs))}; pass 'clothing1m:/path/to/root'")
    root = Path(root)
    ann = root / "annotations" if (root / "annotations" / CLOTHING_LISTS[0]).is_file() else root
    for f in CLOTHING_LISTS:
        if not (ann / f).is_file():
            raise UserError(f"missing Clothing1M file {ann / f}")
    return root, ann


@register_format("clothing1m", path="optional", options=("data_root", "image_size"))
def read_clothing1m(root=None, data_root=None, image_size=None) -> Source:
    """Clothing1M from its lists (in ``root`` or ``root/annotations``) and images under root.

    Train = noisy train keys with their noisy labels (true label from the clean kv, else
    -1); meta = clean val keys (or a balanced draw from the clean train keys, see
    prepare); test = clean test keys. Images are streamed: scaled to cover
    L x L (L = round(image_size * 256 / 224); image_size an int or (h, w), default 224),
    center-cropped to L x L, then randomly (training) or centrally cropped to image_size;
    ImageNet normalisation.
    """
    root, ann = _clothing_root(root, data_root)
    noisy, clean = _read_kv(ann / CLOTHING_LISTS[0]), _read_kv(ann / CLOTHING_LISTS[1])
    keys = {f: _read_lines(ann / f) for f in CLOTHING_LISTS[2:]}
    names = ann / "category_names_eng.txt"
    classes = _read_lines(names) if names.is_file() else list(CLOTHING_CLASSES)
    C = len(classes)

    def labelled(listname, kv, kvname, unknown_ok=False):
        ks = keys[listname]
        y = np.array([kv.get(k, -1) for k in ks], dtype=np.int64)
        if not unknown_ok and (y < 0).any():
            raise UserError(f"key {ks[int(np.argmax(y < 0))]} of {ann / listname} has no label in {ann / kvname}")
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


for _name, _reader in (("mnist", read_idx_dataset), ("fashion-mnist", read_idx_dataset), ("cifar10", read_cifar),
                       ("cifar100", read_cifar)):  # the published datasets: reader(name, data_root, download, mirror)
    register_format(_name, options=("data_root", "download", "mirror"))(functools.partial(_reader, _name))
