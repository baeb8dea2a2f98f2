"""Stores of inputs and the batch pipeline.

Inputs live in a *store*: :class:`TensorStore` (in memory: uint8 images N x C x H x W,
float32 images, or float32 tabular N x D) or :class:`ImageFileStore` (image files read
lazily with PIL and streamed through a torch DataLoader). Either way a batch is gathered
as a whole on the CPU, moved to the device, then -- still as a whole batch, with no
per-example Python -- scaled to [0, 1] (uint8 only), augmented (zero padding, random crop,
horizontal flip) and normalised with per-channel (images) or per-feature (tabular)
mean and std.

Reproducibility: the shuffling order and every crop offset / flip of an epoch are drawn
up front on the CPU from ``torch.Generator().manual_seed(mix_seed(seed, epoch))`` and only
then moved to the device, so a given (seed, epoch) gives the same batches bit-for-bit on
any device, and a resumed epoch (``start=k``) continues exactly where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError, one_line


class TensorStore:
    """Inputs held in memory as one CPU tensor ``x`` of shape (N, *shape)."""

    streaming = False

    def __init__(self, x: torch.Tensor):
        self.x = x

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def shape(self) -> tuple:
        return tuple(self.x.shape[1:])

    def read(self, chunks: Sequence[torch.Tensor], num_workers: int = 0) -> Iterator[torch.Tensor]:
        """Yield ``x[rows]`` for each LongTensor of rows in ``chunks``."""
        for rows in chunks:
            yield self.x.index_select(0, rows)  # a fresh copy; several times faster than x[rows]


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise UserError("reading image files needs Pillow: pip install pillow") from None
    return Image


def load_image(path: str | Path, size: tuple[int, int], channels: int, fit: str = "squash") -> torch.Tensor:
    """Read one image file as a uint8 tensor (channels, h, w), ``size = (h, w)``.

    ``fit="squash"`` resizes to exactly (h, w); ``fit="center"`` scales the image so it
    covers (h, w) keeping its aspect ratio, then takes the central (h, w) crop.
    Bilinear resampling. Raises UserError naming the file if it cannot be read.
    """
    Image = _pil()
    h, w = size
    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            if fit == "center":
                scale = max(h / im.height, w / im.width)
                im = im.resize((max(w, round(im.width * scale)), max(h, round(im.height * scale))), Image.BILINEAR)
                left, top = (im.width - w) // 2, (im.height - h) // 2
                im = im.crop((left, top, left + w, top + h))
            elif im.size != (w, h):
                im = im.resize((w, h), Image.BILINEAR)
            a = np.array(im, dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read image {path}: {one_line(e)}") from None
    t = torch.from_numpy(a)
    return t[None] if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


class ImageFileStore(torch.utils.data.Dataset):
    """Image files read on demand (uint8, (channels, h, w) each; see :func:`load_image`).

    ``read`` streams batches through a ``torch.utils.data.DataLoader`` with ``num_workers``
    worker processes. A file that cannot be read raises UserError when its batch is read.
    """

    streaming = True

    def __init__(self, paths: Sequence[str | Path], size: tuple[int, int], channels: int, fit: str = "squash"):
        self.paths = [str(p) for p in paths]
        self.size, self.channels, self.fit = tuple(size), int(channels), fit

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return load_image(self.paths[i], self.size, self.channels, self.fit)

    @property
    def shape(self) -> tuple:
        return (self.channels, *self.size)

    def read(self, chunks: Sequence[torch.Tensor], num_workers: int = 0) -> Iterator[torch.Tensor]:
        sampler = [rows.tolist() for rows in chunks]
        yield from torch.utils.data.DataLoader(self, batch_sampler=sampler,
                                               num_workers=num_workers, collate_fn=torch.stack)


def channel_stats(store, rows: torch.Tensor | None = None, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std (float32) of a store's inputs after scaling to [0, 1]: per channel for
    images (N, C, H, W) -> shape (C,), per feature for tabular (N, D) -> shape (D,).
    ``rows`` restricts to some rows. A zero std is replaced by 1."""
    rows = torch.arange(len(store)) if rows is None else rows
    total = s1 = s2 = 0
    for x in store.read([rows[i:i + chunk] for i in range(0, len(rows), chunk)]):
        x = x.double() / 255 if x.dtype == torch.uint8 else x.double()
        dims = (0, 2, 3) if x.ndim == 4 else (0,)
        s1 = s1 + x.sum(dims)
        s2 = s2 + (x * x).sum(dims)
        total += x.numel() // x.shape[1]
    mean = s1 / max(total, 1)
    std = (s2 / max(total, 1) - mean * mean).clamp_min(0).sqrt()
    std[std < 1e-8] = 1.0
    return mean.float(), std.float()


@dataclass
class View:
    """How stored inputs become model inputs.

    mean/std: (C,) per channel for images or (D,) per feature for tabular data.
    out_hw: output (h, w) of images (stored images larger than this are cropped:
    randomly when augmenting, centrally otherwise); None for tabular.
    pad: zero padding on each side before the random crop (4 for CIFAR-style).
    """

    mean: torch.Tensor
    std: torch.Tensor
    out_hw: tuple[int, int] | None = None
    pad: int = 0


def mix_seed(seed: int, epoch: int = 0) -> int:
    """One 63-bit torch seed from (seed, epoch); both must be non-negative integers."""
    for name, v in (("seed", seed), ("epoch", epoch)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise UserError(f"{name} must be a non-negative integer, got {v!r}")
    state = np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))


def epoch_plan(n: int, *, shuffle: bool, seed: int, epoch: int, jitter: tuple[int, int] | None = None):
    """Draw an epoch's randomness on the CPU.

    Returns ``(order, aug)``: ``order`` (n,) LongTensor, a permutation of 0..n-1 (identity
    if not shuffling); ``aug`` None, or ``(top, left, flip)`` (n,) tensors for the k-th
    example of the epoch: crop offsets uniform in 0..jitter[0] / 0..jitter[1] and a flip
    with probability 1/2.
    """
    g = torch.Generator().manual_seed(mix_seed(seed, epoch))
    order = torch.randperm(n, generator=g) if shuffle else torch.arange(n)
    if jitter is None:
        return order, None
    top = torch.randint(0, jitter[0] + 1, (n,), generator=g)
    left = torch.randint(0, jitter[1] + 1, (n,), generator=g)
    flip = torch.randint(0, 2, (n,), generator=g).bool()
    return order, (top, left, flip)


def crop_flip(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor,
              size: tuple[int, int]) -> torch.Tensor:
    """Per-example crop and optional horizontal flip of a whole batch, in one gather.

    x: (B, C, H, W); top/left: (B,) long offsets with top + h <= H, left + w <= W;
    flip: (B,) bool; size: (h, w). Returns (B, C, h, w):
    ``out[b] = x[b, :, top[b]:top[b]+h, left[b]:left[b]+w]``, flipped left-right if flip[b].
    """
    h, w = size
    dev = x.device
    rows = top[:, None] + torch.arange(h, device=dev)
    cols = left[:, None] + torch.arange(w, device=dev)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    b = torch.arange(x.shape[0], device=dev)[:, None, None]
    return x.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def to_model_input(raw: torch.Tensor, view: View, device, aug=None) -> torch.Tensor:
    """Move a raw batch to ``device`` and make it a normalised float32 model input.

    uint8 is scaled by 1/255; images are zero-padded by ``view.pad`` and cropped/flipped
    with ``aug = (top, left, flip)`` (CPU tensors) when given, else center-cropped to
    ``view.out_hw`` if larger; finally ``(x - mean) / std``.
    """
    scale = 1 / 255 if raw.dtype == torch.uint8 else 1.0
    x = raw.to(device=device, dtype=torch.float32)
    if view.out_hw is not None:  # padding zeros before scaling = zeros after it
        if aug is not None:
            p = view.pad
            x = F.pad(x, (p, p, p, p)) if p else x
            top, left, flip = (t.to(device) for t in aug)
            x = crop_flip(x, top, left, flip, view.out_hw)
        elif tuple(x.shape[-2:]) != tuple(view.out_hw):
            h, w = view.out_hw
            t0, l0 = (x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2
            x = x[..., t0:t0 + h, l0:l0 + w]
    shape = (1, -1, 1, 1) if x.ndim == 4 else (1, -1)
    std = view.std.to(device).view(shape)
    # (x·scale − mean) / std, in place on the batch's own float copy
    return x.mul_(scale / std).sub_(view.mean.to(device).view(shape) / std)


def _offsets(stop: int, batch_size: int) -> list:
    """Where the batches over positions 0..stop-1 start; a last batch of one example joins the one before
    it (a BatchNorm layer cannot normalise a single example in training mode)."""
    offsets = list(range(0, stop, batch_size))
    if len(offsets) > 1 and stop - offsets[-1] == 1:
        offsets.pop()
    return offsets


def num_batches(n: int, batch_size: int) -> int:
    """How many batches :func:`batch_plan` makes of ``n`` examples (without ``drop_last``)."""
    return len(_offsets(n, batch_size))


def batch_plan(n: int, batch_size: int, *, shuffle: bool, seed: int, epoch: int, drop_last: bool = False,
               start: int = 0, shard: tuple[int, int] | None = None, jitter: tuple[int, int] | None = None):
    """The batches of an epoch over positions 0..n-1 (arguments as :meth:`gdw.data.Split.batches`):
    ``(offsets, chunks, aug)``, each batch's positions, its offset in the epoch's order and the
    augmentation draws of :func:`epoch_plan` (``jitter``). Where the last batch would hold a
    single example it is part of the one before (that batch has ``batch_size + 1``). UserError
    for a bad batch_size."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise UserError(f"batch_size must be a positive integer, got {batch_size!r}")
    order, aug = epoch_plan(n, shuffle=shuffle, seed=seed, epoch=epoch, jitter=jitter)
    stop = n - n % batch_size if drop_last else n
    offsets = _offsets(stop, batch_size)
    ends = offsets[1:] + [stop]
    chunks = [order[i:j] for i, j in zip(offsets, ends)][int(start):]
    offsets = offsets[int(start):]
    if shard is not None:
        rank, world = shard
        keep = [k for k, c in enumerate(chunks) if len(c) >= world]
        sizes = [torch.tensor_split(torch.arange(len(chunks[k])), world)[rank] for k in keep]
        offsets = [offsets[k] + int(s[0]) for k, s in zip(keep, sizes)]
        chunks = [chunks[k][s] for k, s in zip(keep, sizes)]
    return offsets, chunks, aug
