"""The opt-in device image path: the official tiling with torch's antialiased bicubic on any device.

On a GPU the host then only decodes the image and copies its uint8 pixels; the resize, the cut into tiles
and the normalisation run on the device, and the pixel values stay there for the vision encoder.

It follows PIL's structure: torch's ``antialias=True`` bicubic uses PIL's filter (a = -0.5, support widened
by the scale when shrinking), run as PIL's reference code runs it, a horizontal pass then a vertical one, each
rounded half up and clamped to uint8 values. It is still not bit-identical to the exact path (PIL,
:mod:`.image_tiles`): PIL weighs in 22-bit fixed point, torch in float32, so a value near a rounding boundary
can land one step of 1/255 away; and for some size pairs the installed PIL (13) gives the result of its vertical
pass run first, where more values differ (measured over 25 random sizes: at most 3 steps, at most ~5% of the
values). The measured pixel and first-step logit differences are in ``docs/image_preprocessing.md``
(``benchmarks/preprocess.py --compare`` measures them).

The content hash covers the source pixels, the grid and the mode: device pixel values never share a
cache entry with exact ones.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .grid import IMAGENET_MEAN, IMAGENET_STD, select_grid
from .image_tiles import TiledImage

__all__ = ["device_pixel_values", "resize_tensor"]


def resize_tensor(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(1, 3, H, W)`` float32 values in [0, 255] -> ``(1, 3, h, w)`` (``size`` is ``(w, h)``, as PIL's):
    PIL's two bicubic passes, horizontal then vertical, each rounded half up and clamped to uint8 values
    (still float32) as PIL stores its passes."""
    width, height = size
    out = pixels
    if out.shape[-1] != width:
        out = _bicubic_pass(out, (out.shape[-2], width))
    if out.shape[-2] != height:
        out = _bicubic_pass(out, (height, width))
    return out


def _bicubic_pass(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """One pass (only one side changes size): torch's antialiased bicubic is PIL's filter (a = -0.5, support
    widened by the scale when shrinking); rounded half up and clamped as PIL's ``clip8``."""
    out = F.interpolate(pixels, size=size, mode="bicubic", align_corners=False, antialias=True)
    return out.add_(0.5).floor_().clamp_(0, 255)


def device_pixel_values(image: Image.Image, *, max_num: int, image_size: int, use_thumbnail: bool = True,
                        min_num: int = 1, device: torch.device | str = "cpu") -> TiledImage:
    """``(N, 3, image_size, image_size)`` float32 pixel values on ``device``: the official grid and tile order,
    torch's resize (see the module docstring)."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    cols, rows = select_grid(image.width, image.height, min_num=min_num, max_num=max_num, image_size=image_size)
    source = np.array(image)           # (H, W, 3) uint8 on the host; writable, as torch.from_numpy wants
    digest = hashlib.sha256(f"device|{image_size}|{cols}x{rows}|{use_thumbnail}|{source.shape}|".encode())
    digest.update(np.ascontiguousarray(source).data)
    pixels = torch.from_numpy(source).to(device).permute(2, 0, 1)[None].to(torch.float32)   # (1, 3, H, W)
    grid = resize_tensor(pixels, (cols * image_size, rows * image_size))[0]                # (3, rows*S, cols*S)
    # (3, rows, S, cols, S) -> (rows, cols, 3, S, S): the tiles, row-major
    tiles = grid.reshape(3, rows, image_size, cols, image_size).permute(1, 3, 0, 2, 4)
    parts = [tiles.reshape(rows * cols, 3, image_size, image_size)]
    if use_thumbnail and cols * rows != 1:
        parts.append(resize_tensor(pixels, (image_size, image_size)))
    out = torch.cat(parts) if len(parts) > 1 else parts[0].contiguous()
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=out.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=out.device).view(1, 3, 1, 1)
    return TiledImage(out.div_(255).sub_(mean).div_(std), digest.hexdigest()[:32])
