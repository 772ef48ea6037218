"""The official image preprocessing at the encoder's rate: the same pixel values, less host time per image.

:func:`~internvl_runtime.processing.image.load_image` (tile with ``dynamic_preprocess``, transform each tile,
stack) is the reference; :func:`tile_pixel_values` returns bit-identical pixel values (the golden sha256
tests run through it) with three changes, each exact by construction:

1. **The thumbnail's resize runs beside the grid's** on a thread pool (PIL's resampling releases the GIL),
   and the tiles are normalised there too, one task per tile. (Splitting one resize into bands of rows
   or columns is not exact with PIL 13, which orders its two passes by the sizes: not done.)
2. **Normalise through a table.** ``(x / 255 - mean) / std`` in float32 takes 256 values per channel; the
   table holds them, computed by the very torch operations of the official transform, and one gather per
   tile replaces four passes over float32 tensors and the ``torch.stack`` copy.
3. **Hash the uint8 tiles** (a quarter of the bytes of the float32 tiles; the table makes them determine
   the pixel values) for the image's content hash: hashing 22 MB of float32 cost as much as tiling.

The opt-in device path (``mode="device"``: :mod:`.image_device`) resizes with torch instead; its
differences from this one are measured and documented (``docs/image_preprocessing.md``).

Example::

    pool = concurrent.futures.ThreadPoolExecutor(4)
    tiled = tile_pixel_values(pil_image, max_num=12, image_size=448, executor=pool)
    tiled.pixel_values, tiled.content_hash     # (N, 3, 448, 448) float32, a hex digest
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from PIL import Image

from ..errors import InvalidRequest
from .grid import IMAGENET_MEAN, IMAGENET_STD, select_grid

__all__ = [
    "TiledImage",
    "normalize_tiles",
    "pixel_table",
    "tile_array",
    "tile_pixel_values",
]

_BICUBIC = Image.Resampling.BICUBIC

T = TypeVar("T")
R = TypeVar("R")


@functools.lru_cache(maxsize=1)
def pixel_table() -> np.ndarray:
    """``(3, 256)`` float32: the official transform's value for each channel and uint8 value.

    Computed with the operations of ``build_transform`` (ToTensor's ``to(float32).div(255)``, then
    Normalize's in-place ``sub_(mean).div_(std)``), so a lookup equals the transform bit for bit.
    """
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(-1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(-1, 1)
    values = torch.arange(256, dtype=torch.uint8).expand(3, 256).to(torch.float32).div(255)
    table = values.sub_(mean).div_(std).numpy()
    table.setflags(write=False)
    return table


def normalize_tiles(tiles: np.ndarray, *, executor: concurrent.futures.Executor | None = None) -> torch.Tensor:
    """``(N, H, W, 3)`` uint8 tiles -> ``(N, 3, H, W)`` float32 pixel values, one table gather per tile
    (tiles in parallel on ``executor``)."""
    if tiles.dtype != np.uint8 or tiles.ndim != 4 or tiles.shape[-1] != 3:
        raise InvalidRequest(f"tiles must be (N, H, W, 3) uint8, got {tiles.shape} {tiles.dtype}")
    table = pixel_table()
    n, height, width, _ = tiles.shape
    out = np.empty((n, 3, height, width), dtype=np.float32)

    def one(i: int) -> None:
        for channel in range(3):
            np.take(table[channel], tiles[i, :, :, channel], out=out[i, channel])

    _run_all(executor, one, range(n))
    return torch.from_numpy(out)


def tile_array(image: Image.Image, *, max_num: int, image_size: int, use_thumbnail: bool, min_num: int = 1,
               executor: concurrent.futures.Executor | None = None) -> np.ndarray:
    """``dynamic_preprocess``'s tiles as one ``(N, image_size, image_size, 3)`` uint8 array, row-major, the
    thumbnail last (when asked and more than one tile); the thumbnail resizes on ``executor`` beside the grid.

    Each resize is one PIL call: PIL (13) orders its two passes by the sizes, so a resize split into bands
    of one pass is not always the same bytes (measured: ~1 in 12 random size pairs differ), and is not used."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    cols, rows = select_grid(image.width, image.height, min_num=min_num, max_num=max_num, image_size=image_size)
    thumbnail = use_thumbnail and cols * rows != 1
    pending = None
    if thumbnail and executor is not None:
        pending = executor.submit(lambda: np.asarray(image.resize((image_size, image_size), _BICUBIC)))
    grid = np.asarray(image.resize((cols * image_size, rows * image_size), _BICUBIC))
    # (rows*S, cols*S, 3) -> (rows, S, cols, S, 3) -> (rows, cols, S, S, 3): the tiles, row-major
    tiles = grid.reshape(rows, image_size, cols, image_size, 3).transpose(0, 2, 1, 3, 4)
    tiles = tiles.reshape(rows * cols, image_size, image_size, 3)
    if not thumbnail:
        return np.ascontiguousarray(tiles)
    small = pending.result() if pending is not None else np.asarray(image.resize((image_size, image_size), _BICUBIC))
    return np.concatenate([tiles, small[None]])


@dataclass(frozen=True)
class TiledImage:
    """One image as the vision encoder takes it: ``(N, 3, S, S)`` float32 pixel values and a content hash
    that tells apart different pixel values (and the preprocessing mode that made them)."""

    pixel_values: torch.Tensor
    content_hash: str


def tiles_digest(tiles: np.ndarray, tag: str) -> str:
    """A hash of uint8 tiles and of what turns them into pixel values (``tag``)."""
    digest = hashlib.sha256(f"{tag}|{tiles.shape}|".encode())
    digest.update(np.ascontiguousarray(tiles).data)
    return digest.hexdigest()[:32]


def tile_pixel_values(image: Image.Image, *, max_num: int, image_size: int, use_thumbnail: bool = True,
                      min_num: int = 1, executor: concurrent.futures.Executor | None = None) -> TiledImage:
    """The official ``load_image`` pixel values of an opened image, bit for bit, and their content hash."""
    tiles = tile_array(image, max_num=max_num, image_size=image_size, use_thumbnail=use_thumbnail,
                       min_num=min_num, executor=executor)
    return TiledImage(normalize_tiles(tiles, executor=executor), tiles_digest(tiles, "exact"))


def _run_all(executor: concurrent.futures.Executor | None, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """``[fn(item) for item in items]``, on ``executor`` when given (the results in order)."""
    if executor is None or len(items) < 2:
        return [fn(item) for item in items]
    return list(executor.map(fn, items))
