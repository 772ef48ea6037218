"""Which image path a processor takes: the exact one (default) or the opt-in device one, and its threads.

``InputProcessor`` holds one :class:`ImagePreprocessor`; the server builds it from ``--image-preprocess``
with a thread pool of its own for the thumbnail and tiles of each image (``serving/state.py``).

Example::

    pool = concurrent.futures.ThreadPoolExecutor(4)
    images = ImagePreprocessor(448, executor=pool)              # exact; thumbnail and tiles on the pool
    tiled = images(pil_image, max_num=12)                       # TiledImage
    on_gpu = ImagePreprocessor(448, mode="device", device="cuda")
"""

from __future__ import annotations

import concurrent.futures

import torch
from PIL import Image

from ..errors import InvalidRequest
from .image_device import device_pixel_values
from .image_tiles import TiledImage, tile_pixel_values

__all__ = ["IMAGE_PREPROCESS_MODES", "ImagePreprocessor"]

#: ``exact``: PIL, bit-identical to the official ``load_image`` (default); ``device``: torch's antialiased
#: bicubic on the given device (faster on a GPU, pixel values differ slightly: docs/image_preprocessing.md).
IMAGE_PREPROCESS_MODES: tuple[str, ...] = ("exact", "device")


class ImagePreprocessor:
    """Opened images -> :class:`TiledImage`, exactly (PIL, the default) or on a device (opt-in).

    Args:
        image_size: the model's tile size (``force_image_size``).
        use_thumbnail: append the thumbnail tile to images of more than one tile (the config's flag).
        mode: one of :data:`IMAGE_PREPROCESS_MODES`.
        device: where ``mode="device"`` resizes and leaves the pixel values (ignored by ``exact``).
        executor: threads for the thumbnail and tiles of one image (``exact``); None: the caller's thread alone.
            Never the pool whose threads call this (its tasks would wait on tasks queued behind them).
    """

    def __init__(self, image_size: int, *, use_thumbnail: bool = True, mode: str = "exact",
                 device: torch.device | str | None = None, executor: concurrent.futures.Executor | None = None) -> None:
        if mode not in IMAGE_PREPROCESS_MODES:
            raise InvalidRequest(f"image preprocessing mode must be one of {', '.join(IMAGE_PREPROCESS_MODES)}, "
                                 f"got {mode!r}")
        self.image_size = image_size
        self.use_thumbnail = use_thumbnail
        self.mode = mode
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.executor = executor

    def __call__(self, image: Image.Image, *, max_num: int) -> TiledImage:
        if self.mode == "device":
            return device_pixel_values(image, max_num=max_num, image_size=self.image_size,
                                       use_thumbnail=self.use_thumbnail, device=self.device)
        return tile_pixel_values(image, max_num=max_num, image_size=self.image_size,
                                 use_thumbnail=self.use_thumbnail, executor=self.executor)

    def describe(self) -> str:
        where = f" on {self.device}" if self.mode == "device" else (" on a thread pool" if self.executor else "")
        return f"image preprocessing: {self.mode}{where}"
