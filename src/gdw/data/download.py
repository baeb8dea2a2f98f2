"""Checksummed downloads, the user cache, and safe archive extraction.

* :func:`fetch` streams a URL to a temporary file next to the destination, checks the size
  and the checksum, then renames it into place atomically. Any failure raises UserError and
  leaves neither the destination nor the temporary file behind.
* The base URL of every official file can be replaced by a mirror: the ``mirror`` argument
  of :func:`official_url` (``prepare(..., mirror=...)``) or the environment variable
  ``GDW_MIRROR``. A mirror is laid out as ``<mirror>/<dataset>/<file name>``, e.g.
  ``http://127.0.0.1:8000/cifar10/cifar-10-python.tar.gz``.
* The cache is ``$GDW_CACHE/<dataset>`` if ``GDW_CACHE`` is set, else
  ``~/.cache/gdw/<dataset>``.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from ..errors import UserError, one_line
from ..io import file_digest

# Official files: dataset -> (base URL, {file name: md5}). The md5 values are the ones
# published with the datasets (Fashion-MNIST README, CIFAR page) and used by common loaders.
OFFICIAL = {
    "mnist": ("https://ossci-datasets.s3.amazonaws.com/mnist", {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    }),
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com", {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    }),
    "cifar10": ("https://www.cs.toronto.edu/~kriz", {
        "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
    }),
    "cifar100": ("https://www.cs.toronto.edu/~kriz", {
        "cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85",
    }),
}

CHUNK = 1 << 20


def cache_dir(dataset: str) -> Path:
    """The cache folder of a dataset: ``$GDW_CACHE/<dataset>`` or ``~/.cache/gdw/<dataset>``."""
    root = os.environ.get("GDW_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "gdw") / dataset


def official_url(dataset: str, filename: str, mirror: str | None = None) -> tuple[str, str]:
    """``(url, md5)`` of an official file, using ``mirror`` or ``$GDW_MIRROR`` if set."""
    base, files = OFFICIAL[dataset]
    mirror = mirror or os.environ.get("GDW_MIRROR")
    if mirror:
        base = f"{mirror.rstrip('/')}/{dataset}"
    return f"{base}/{filename}", files[filename]


def fetch(url: str, dest: str | Path, *, md5: str | None = None, sha256: str | None = None,
          timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` and verify its checksum (md5 or sha256 hex string).

    If ``dest`` already exists with the right checksum nothing is downloaded. The data is
    streamed into a hidden temporary file in ``dest``'s folder and renamed into place only
    after the byte count (against Content-Length) and the checksum match.

    Returns ``dest`` as a Path. Raises UserError (leaving no partial file) if the server
    cannot be reached, the transfer is truncated, or the checksum differs.
    """
    dest = Path(dest)
    algorithm, expected = ("md5", md5) if md5 else ("sha256", sha256) if sha256 else (None, None)
    if dest.is_file() and (expected is None or file_digest(dest, algorithm) == expected.lower()):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        h = hashlib.new(algorithm or "sha256", usedforsecurity=False)
        size = 0
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            for block in iter(lambda: resp.read(CHUNK), b""):
                out.write(block)
                h.update(block)
                size += len(block)
        if length is not None and size != int(length):
            raise UserError(f"download of {url} is truncated: got {size} of {length} bytes")
        if expected is not None and h.hexdigest() != expected.lower():
            raise UserError(f"checksum mismatch for {url}: {algorithm} is {h.hexdigest()}, "
                            f"expected {expected.lower()} (file discarded)")
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except UserError:
        raise
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        raise UserError(f"cannot download {url}: {one_line(e)}") from None
    finally:  # gone after the rename; on any failure it is removed
        Path(tmp).unlink(missing_ok=True)
    return dest


def safe_extract(archive: str | Path, target: str | Path) -> Path:
    """Extract a tar archive (any compression) into ``target``.

    Every member must be a regular file or folder whose path stays inside ``target``;
    links, devices, absolute paths and ``..`` escapes are refused with UserError before
    anything is written. Files are written to a temporary folder inside ``target`` and
    the top-level entries moved into place at the end, so a failed extraction leaves no
    half-extracted dataset behind. Returns ``target``.
    """
    archive, target = Path(archive), Path(target)
    root = target.resolve()
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for m in members:
                where = (root / m.name).resolve()
                if not (m.isfile() or m.isdir()):
                    raise UserError(f"unsafe member {m.name!r} in {archive}: "
                                    "only plain files and folders are extracted")
                inside = where == root and m.isdir() or root in where.parents
                if not inside:
                    raise UserError(f"unsafe member {m.name!r} in {archive}: path escapes {target}")
            target.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=target))
            try:
                tar.extractall(tmp, members=members, filter="data")  # the standard library's safe extraction
                for entry in tmp.iterdir():
                    if (target / entry.name).is_dir():
                        shutil.rmtree(target / entry.name)
                    os.replace(entry, target / entry.name)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except (tarfile.TarError, EOFError, OSError) as e:  # tarfile.FilterError is a TarError
        raise UserError(f"cannot extract {archive}: {one_line(e)}") from None
    return target


def fetch_official(dataset: str, filename: str, *, mirror: str | None = None) -> Path:
    """Download an official file of ``dataset`` into its cache folder (checksum verified)."""
    url, md5 = official_url(dataset, filename, mirror)
    return fetch(url, cache_dir(dataset) / filename, md5=md5)
