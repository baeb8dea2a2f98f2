"""A column of text in a CSV file, turned into model inputs by an encoder.

``csv:reviews.csv`` with ``text_column="review"``: every row's text becomes
one feature vector, and the model trains on those (normalised per feature
like any table). Two encoders:

* :class:`TfidfSvd`, the default, needs no download: TF-IDF of words and
  word pairs (the ``MAX_TERMS`` most frequent), then a truncated SVD to
  ``DIM`` features, fitted on the training rows only (random_state 0). The
  run directory keeps it as plain arrays (``text_encoder.npz``: terms, idf,
  components; no pickle), so ``gdw predict`` computes the same features.
* :class:`ModelEncoder`, ``encoder=PATH``: a local model folder, a
  sentence-transformers one (it has ``modules.json``; needs the
  ``sentence-transformers`` package) or a Hugging Face one (``config.json``;
  mean of the last hidden states over the tokens, L2-normalised). The
  preprocess record keeps its path and a digest of its files.

Each file's embeddings are computed once and cached in the run directory
(``embeddings/<key>.npy``, the key a digest of the file, the column and the
encoder). An encoder fitted or loaded in this process is found again by its
digest (:func:`encoder_for`), so a meta, test or new CSV read after the
training data uses the very same one.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import UserError, one_line
from ..io import atomic_path
from .files import read_csv_table
from .sources import cached_digest

ENCODER_FILE = "text_encoder.npz"
EMBEDDINGS = "embeddings"
DIM = 256  # features of the default encoder
MAX_TERMS = 10000  # words and word pairs it keeps, the most frequent of the training texts
NGRAMS = (1, 2)
BATCH = 64  # texts per forward pass of a model encoder

_ENCODERS: dict = {}  # digest -> encoder fitted or loaded in this process


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
        h.update(b"\0")
    return "sha256:" + h.hexdigest()


class TfidfSvd:
    """TF-IDF (sublinear term frequency, L2-normalised rows) followed by a
    projection on ``components`` (a truncated SVD of the training texts)."""

    kind = "tfidf-svd"

    def __init__(self, terms, idf, components):
        self.terms = np.asarray(terms, dtype=str)
        self.idf = np.asarray(idf, dtype=np.float64)
        self.components = np.asarray(components, dtype=np.float32)
        self.digest = _digest(self.kind, "\n".join(self.terms.tolist()), self.idf.tobytes(), self.components.tobytes())
        self.embedded: dict = {}  # cache key -> features of a file's column
        self.cache_dir = None  # the run directory whose embeddings/ is searched first

    @classmethod
    def fit(cls, texts, dim: int = DIM) -> "TfidfSvd":
        from sklearn.decomposition import TruncatedSVD
        from sklearn.feature_extraction.text import TfidfVectorizer

        try:
            vec = TfidfVectorizer(ngram_range=NGRAMS, sublinear_tf=True, max_features=MAX_TERMS).fit(texts)
        except ValueError as err:  # no word of two letters or more in any text
            raise UserError(f"the training texts hold no words to encode ({one_line(err)})") from None
        enc = cls(vec.get_feature_names_out(), vec.idf_, np.zeros((0, len(vec.idf_))))
        x = enc.tfidf(texts)
        k = max(1, min(dim, x.shape[1] - 1, x.shape[0] - 1))
        svd = TruncatedSVD(n_components=k, random_state=0).fit(x)
        return cls(enc.terms, enc.idf, svd.components_)

    def tfidf(self, texts):
        from sklearn.feature_extraction.text import CountVectorizer
        from sklearn.preprocessing import normalize

        counts = CountVectorizer(ngram_range=NGRAMS, vocabulary=self.terms.tolist()).transform(texts)
        counts = counts.astype(np.float64)
        counts.data = 1 + np.log(counts.data)
        return normalize(counts.multiply(self.idf).tocsr())

    def encode(self, texts) -> np.ndarray:
        return np.asarray(self.tfidf(texts) @ self.components.T.astype(np.float64), dtype=np.float32)

    def record(self) -> dict:
        return {"kind": self.kind, "digest": self.digest, "dim": int(len(self.components)), "file": ENCODER_FILE}

    def save(self, folder: Path) -> None:
        with atomic_path(folder / ENCODER_FILE) as tmp, open(tmp, "wb") as f:
            np.savez(f, kind=np.array(self.kind), terms=self.terms, idf=self.idf, components=self.components)

    @classmethod
    def load(cls, path: Path) -> "TfidfSvd":
        try:
            with np.load(path, allow_pickle=False) as z:
                return cls(z["terms"], z["idf"], z["components"])
        except (OSError, KeyError, ValueError) as err:
            raise UserError(f"cannot read the text encoder {path}: {one_line(err)}") from None


class ModelEncoder:
    """A local sentence-transformers or Hugging Face model folder."""

    def __init__(self, path):
        self.path = Path(path).expanduser().resolve()
        if not self.path.is_dir():
            raise UserError(f"--encoder {path}: no such folder (give a local sentence-transformers or Hugging "
                            "Face model folder)")
        self.kind = "sentence-transformers" if (self.path / "modules.json").is_file() else "transformers"
        if self.kind == "transformers" and not (self.path / "config.json").is_file():
            raise UserError(f"--encoder {path}: not a model folder (it has neither modules.json nor config.json)")
        files = sorted(p for p in self.path.rglob("*") if p.is_file() and not p.name.startswith("."))
        self.digest = _digest(self.kind, *(f"{p.relative_to(self.path).as_posix()}={cached_digest(p)}" for p in files))
        self.embedded, self.cache_dir, self._model = {}, None, None  # as TfidfSvd's; the model loaded when first used

    def record(self) -> dict:
        return {"kind": self.kind, "digest": self.digest, "path": str(self.path)}

    def save(self, folder: Path) -> None:
        """Nothing to save: the record keeps the folder's path and digest."""

    def _load(self):
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            if self.kind == "sentence-transformers":
                from sentence_transformers import SentenceTransformer

                return SentenceTransformer(str(self.path), device=device)
            from transformers import AutoModel, AutoTokenizer

            return AutoTokenizer.from_pretrained(self.path), AutoModel.from_pretrained(self.path).to(device).eval()
        except ImportError as err:
            raise UserError(f"--encoder {self.path} needs the {err.name} package "
                            f"(pip install {self.kind})") from None
        except (OSError, ValueError) as err:
            raise UserError(f"--encoder {self.path}: cannot load the model ({one_line(err)})") from None

    def encode(self, texts) -> np.ndarray:
        import torch

        self._model = self._model or self._load()
        if self.kind == "sentence-transformers":
            return self._model.encode(list(texts), batch_size=BATCH, convert_to_numpy=True).astype(np.float32)
        tokenizer, model = self._model
        out = []
        with torch.no_grad():
            for i in range(0, len(texts), BATCH):
                batch = tokenizer(list(texts[i:i + BATCH]), padding=True, truncation=True, return_tensors="pt")
                batch = {k: v.to(model.device) for k, v in batch.items()}
                hidden = model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
                out.append(torch.nn.functional.normalize(mean, dim=1).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, model.config.hidden_size), np.float32)


def _known(enc):
    """The encoder of this process with ``enc``'s digest (``enc`` itself the first time)."""
    return _ENCODERS.setdefault(enc.digest, enc)


def training_encoder(texts, encoder=None, text_dir=None):
    """The encoder of a run: ``encoder`` (a model folder), else the default
    saved in ``text_dir`` (a resumed run), else the default fitted on ``texts``."""
    if encoder is not None:
        return _known(ModelEncoder(encoder))
    if text_dir is not None and (Path(text_dir) / ENCODER_FILE).is_file():
        return _known(TfidfSvd.load(Path(text_dir) / ENCODER_FILE))
    return _known(TfidfSvd.fit(texts))


def encoder_for(pre: dict, text_dir=None):
    """The encoder a preprocess record names: the one of this process with
    its digest, else read from ``text_dir`` (the run directory; default
    encoder) or from its recorded model folder. UserError when it is missing
    or its files changed."""
    rec = pre.get("encoder") or {}
    if rec.get("digest") in _ENCODERS:
        return _ENCODERS[rec["digest"]]
    if rec.get("kind") == TfidfSvd.kind:
        if text_dir is None or not (Path(text_dir) / ENCODER_FILE).is_file():
            raise UserError(f"the run's text encoder ({ENCODER_FILE}) is not at hand; read new texts through the run "
                            "directory (gdw predict RUN, or load_new(..., text_dir=RUN))")
        enc = TfidfSvd.load(Path(text_dir) / ENCODER_FILE)
    else:
        enc = ModelEncoder(rec.get("path", "?"))
    if enc.digest != rec.get("digest"):
        raise UserError(f"the text encoder {rec.get('path') or Path(text_dir) / ENCODER_FILE} is not the one the run "
                        "was trained with (its files changed); train the run again")
    return _known(enc)


def column_texts(table, column: str) -> np.ndarray:
    """The texts of ``column`` of a :class:`gdw.data.files.CsvTable`; UserError
    for a missing column or an empty text (naming the line)."""
    if column not in table.header:
        raise UserError(f"CSV file {table.path} has no text column {column!r} (columns: {table.header})")
    return table.column(column, empty=f"text in column {column!r}")


def _key(path, column: str, enc) -> str:
    return _digest(cached_digest(Path(path).resolve()), column, enc.digest)[7:31]


def embed(path, texts, column: str, enc, text_dir=None) -> np.ndarray:
    """The encoder's features of every row of a file's column: from this
    process, from ``text_dir``'s cache, or computed (and kept for :func:`save`)."""
    key = _key(path, column, enc)
    text_dir = text_dir if text_dir is not None else enc.cache_dir
    if key not in enc.embedded:
        cached = Path(text_dir) / EMBEDDINGS / f"{key}.npy" if text_dir is not None else None
        if cached is not None and cached.is_file():
            enc.embedded[key] = np.load(cached, allow_pickle=False)
        else:
            enc.embedded[key] = enc.encode(texts.tolist())
    return enc.embedded[key]


def save(out, pre: Optional[dict], files=()) -> None:
    """Write a text run's encoder (the default one) into the run directory
    ``out``, and the embeddings of ``files`` (CSV files it read) not cached yet."""
    if not pre or pre.get("input") != "text":
        return
    out = Path(out)
    enc = encoder_for(pre, out)
    enc.save(out)
    for f in dict.fromkeys(str(f) for f in files if f and str(f).lower().endswith(".csv") and Path(f).is_file()):
        key = _key(f, pre["text_column"], enc)
        target = out / EMBEDDINGS / f"{key}.npy"
        if key in enc.embedded and not target.is_file():
            target.parent.mkdir(exist_ok=True)
            with atomic_path(target) as tmp, open(tmp, "wb") as fh:
                np.save(fh, enc.embedded[key])


def text_features(table, train_rows, label_column: str, text_column: str, encoder=None, text_dir=None):
    """``(features (n, D) float32, preprocess entries)`` of a training CSV
    whose ``text_column`` holds the text (the encoder fitted on ``train_rows``)."""
    if text_column == label_column:
        raise UserError(f"--text-column and --label-column are both {text_column!r}; the text and the label are "
                        "two columns")
    texts = column_texts(table, text_column)
    enc = training_encoder(texts[train_rows], encoder, text_dir)
    enc.cache_dir = text_dir
    x = embed(table.path, texts, text_column, enc, text_dir)
    return x, {"input": "text", "text_column": text_column, "encoder": enc.record()}


def text_examples(table, pre: dict) -> np.ndarray:
    """The features of a meta, test or new CSV read like the training texts."""
    texts = column_texts(table, pre["text_column"])
    enc = encoder_for(pre, pre.get("text_dir"))
    return embed(table.path, texts, pre["text_column"], enc, pre.get("text_dir"))


def split_texts(split, pre: Optional[dict]) -> Optional[list]:
    """The text of every example of ``split`` (from its CSV file), or None
    when the run does not train on text."""
    if not pre or pre.get("input") != "text" or getattr(split, "source_file", None) is None:
        return None
    texts = read_csv_table(split.source_file).column(pre["text_column"])
    return [str(texts[int(r)]) for r in split.source_rows]

