"""The grid of tiles of an image, as the official ``dynamic_preprocess`` chooses it: pure arithmetic.

Its own module so that both the reference path (``image.py``) and the fast ones (``image_tiles.py``,
``image_device.py``) read the one rule. ``image.py`` re-exports every name here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import ImageDecodeError, InvalidRequest

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "candidate_grids",
    "find_closest_aspect_ratio",
    "select_grid",
    "count_tiles",
    "check_positive_int",
    "check_image_size",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def candidate_grids(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """Every ``(cols, rows)`` grid with ``min_num <= cols * rows <= max_num``, sorted by area.

    Grids of equal area keep the order in which the official code's Python ``set`` yields them (the
    sort is stable), so the same set is built here, with the same insertion order, and sorted the same way.
    """
    check_positive_int("min_num", min_num)
    check_positive_int("max_num", max_num)
    if min_num > max_num:
        raise InvalidRequest(f"min_num ({min_num}) must not exceed max_num ({max_num})")
    grids: set[tuple[int, int]] = set()
    # Official: set((i, j) for n in [min_num, max_num] for i in [1, n] for j in [1, n] if area in range).
    for n in range(min_num, max_num + 1):
        for cols in range(1, n + 1):
            for rows in range(1, n + 1):
                if min_num <= cols * rows <= max_num:
                    grids.add((cols, rows))
    return sorted(grids, key=lambda grid: grid[0] * grid[1])


def find_closest_aspect_ratio(
    aspect_ratio: float,
    target_ratios: Sequence[tuple[int, int]],
    width: int,
    height: int,
    image_size: int,
) -> tuple[int, int]:
    """The grid of ``target_ratios`` (in order) whose ``cols / rows`` is closest to ``aspect_ratio``.

    Tie rule (official): a later grid with exactly the same distance replaces the current best only when
    the image's area exceeds half the area the later grid covers (``width * height > 0.5 * image_size**2
    * cols * rows``), i.e. a large enough image earns more tiles. Defaults to ``(1, 1)`` when
    ``target_ratios`` is empty.
    """
    best_diff = float("inf")
    best: tuple[int, int] = (1, 1)
    area = width * height
    for grid in target_ratios:
        diff = abs(aspect_ratio - grid[0] / grid[1])
        if diff < best_diff:
            best_diff, best = diff, grid
        elif diff == best_diff and area > 0.5 * image_size * image_size * grid[0] * grid[1]:
            best = grid  # official tie rule: a big enough image takes the larger grid
    return best


def select_grid(
    width: int, height: int, *, min_num: int = 1, max_num: int = 12, image_size: int = 448
) -> tuple[int, int]:
    """The ``(cols, rows)`` tiling :func:`dynamic_preprocess` uses for a ``width x height`` image."""
    check_image_size(width, height, "image")
    check_positive_int("image_size", image_size)
    grids = candidate_grids(min_num, max_num)
    return find_closest_aspect_ratio(width / height, grids, width, height, image_size)


def count_tiles(
    width: int,
    height: int,
    *,
    min_num: int,
    max_num: int,
    use_thumbnail: bool,
    image_size: int = 448,
) -> int:
    """Number of tiles :func:`dynamic_preprocess` yields for a ``width x height`` image, without resizing.

    ``image_size`` is the model's tile size (``force_image_size``, 224 for InternVL2-2B): it matters,
    because the tie rule of :func:`find_closest_aspect_ratio` compares the image's area with it.
    """
    cols, rows = select_grid(width, height, min_num=min_num, max_num=max_num, image_size=image_size)
    blocks = cols * rows
    # Official: the thumbnail is appended only when the image was split into more than one tile.
    return blocks + 1 if use_thumbnail and blocks != 1 else blocks


def check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InvalidRequest(f"{name} must be an integer >= 1, got {value!r}")


def check_image_size(width: int, height: int, name: str, *, max_pixels: int | None = None) -> None:
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"image {name} is empty ({width}x{height} pixels)")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageDecodeError(
            f"image {name} is too large: {width}x{height} = {width * height} pixels, "
            f"the limit is {max_pixels}"
        )
