"""Image preprocessing of the InternVL2 models, reproducing the official quick start pixel for pixel.

The official quick start (OpenGVLab/InternVL README, ``load_image``) does, for every image:

1. open it with PIL and convert it to RGB;
2. choose a grid of ``cols x rows`` tiles whose aspect ratio is closest to the image's
   (:func:`find_closest_aspect_ratio`, :func:`dynamic_preprocess`), resize the image to
   ``(cols * size, rows * size)`` with PIL bicubic and cut it into tiles, row-major, adding a
   ``size x size`` thumbnail of the whole image when there is more than one tile;
3. turn every tile into a normalised float32 ``(3, size, size)`` tensor with torchvision's
   ``Compose([to RGB, Resize((size, size), BICUBIC), ToTensor(), Normalize(mean, std)])``
   (:func:`build_transform`, reproduced here without torchvision, bit for bit);
4. stack the tiles into ``(N, 3, size, size)``.

:func:`build_transform` and :func:`dynamic_preprocess` are that reference, step by step; :func:`load_image`
returns the same pixel values, bit for bit, through the faster path of ``image_tiles.py`` (strips resized in
parallel, normalisation by table). The grid arithmetic lives in ``grid.py`` (re-exported here).

Everything here is pure: no global state is changed (in particular no warning filter and no PIL
setting). Bad input raises :class:`~internvl_runtime.errors.ImageDecodeError` (a file that cannot be
read or decoded, or that is too large) or :class:`~internvl_runtime.errors.InvalidRequest` (bad
arguments), with a message that names the image.
"""

from __future__ import annotations

import io
import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Union

import numpy as np
import torch
from PIL import Image

from internvl_runtime.errors import ImageDecodeError, InvalidRequest
from internvl_runtime.processing.data_url import decode_data_url
from internvl_runtime.processing.grid import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    candidate_grids,
    check_image_size,
    check_positive_int,
    count_tiles,
    find_closest_aspect_ratio,
    select_grid,
)
from internvl_runtime.processing.image_tiles import tile_pixel_values

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DEFAULT_URL_TIMEOUT_S",
    "DEFAULT_MAX_DOWNLOAD_BYTES",
    "ImageSource",
    "build_transform",
    "candidate_grids",
    "find_closest_aspect_ratio",
    "select_grid",
    "count_tiles",
    "dynamic_preprocess",
    "open_image",
    "load_image",
]


#: Seconds an http(s) image download may take (connect and each read).
DEFAULT_URL_TIMEOUT_S: float = 30.0
#: Largest http(s) / data: image accepted, in bytes.
DEFAULT_MAX_DOWNLOAD_BYTES: int = 64 * 1024 * 1024

#: What :func:`load_image` / :func:`open_image` accept: a filesystem path (``str`` or ``os.PathLike``),
#: an ``http(s)://`` or ``data:`` URL (``str``), the encoded file's bytes, or an already opened PIL image.
ImageSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, Image.Image]

_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")
_BICUBIC = Image.Resampling.BICUBIC


# --------------------------------------------------------------------------------------------------
# Tensor transform (torchvision-free)
# --------------------------------------------------------------------------------------------------


def build_transform(input_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """The official per-tile transform, without torchvision.

    Equal, bit for bit, to torchvision's ``Compose([Lambda(to RGB unless RGB), Resize((input_size,
    input_size), BICUBIC), ToTensor(), Normalize(IMAGENET_MEAN, IMAGENET_STD)])`` applied to a PIL image.

    Returns a function mapping a PIL image to a contiguous float32 tensor ``(3, input_size, input_size)``.
    """
    check_positive_int("input_size", input_size)
    # Normalize turns mean/std into tensors of the image's dtype (float32) shaped (C, 1, 1).
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(-1, 1, 1)
    size = (input_size, input_size)

    def transform(image: Image.Image) -> torch.Tensor:
        # Lambda: convert to RGB only when the mode is not already RGB.
        if image.mode != "RGB":
            image = image.convert("RGB")
        # Resize((h, w), BICUBIC) on a PIL image is PIL's resize((w, h), BICUBIC); PIL returns an
        # unchanged copy when the size already matches, so skipping it is exact.
        if image.size != size:
            image = image.resize(size, _BICUBIC)
        # ToTensor: uint8 HWC -> CHW, then float32 true division by 255.
        array = np.array(image, dtype=np.uint8)  # a writable copy, as ToTensor takes
        tensor = torch.from_numpy(array).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
        # Normalize: in place, subtract the mean first, then divide by std (the same float32 roundings).
        return tensor.sub_(mean).div_(std)

    return transform


# --------------------------------------------------------------------------------------------------
# Tiling
# --------------------------------------------------------------------------------------------------


def dynamic_preprocess(
    image: Image.Image,
    min_num: int = 1,
    max_num: int = 12,
    image_size: int = 448,
    use_thumbnail: bool = False,
) -> list[Image.Image]:
    """Split ``image`` into ``image_size`` square tiles on the grid closest to its aspect ratio.

    The image is resized (PIL bicubic) to ``(cols * image_size, rows * image_size)`` and cut row-major;
    with ``use_thumbnail`` and more than one tile, the whole image resized to ``image_size`` square
    (PIL bicubic) is appended. Returns ``cols * rows`` (+1) PIL images in the image's mode.
    """
    width, height = image.size
    cols, rows = select_grid(width, height, min_num=min_num, max_num=max_num, image_size=image_size)
    # PIL's default resample for RGB images is bicubic (and nearest for "1"/"P", whatever is asked).
    resized = image.resize((cols * image_size, rows * image_size), _BICUBIC)
    tiles = [
        resized.crop((c * image_size, r * image_size, (c + 1) * image_size, (r + 1) * image_size))
        for r in range(rows)
        for c in range(cols)
    ]
    # Official: thumbnail only when there is more than one tile.
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size), _BICUBIC))
    return tiles


# --------------------------------------------------------------------------------------------------
# Opening images
# --------------------------------------------------------------------------------------------------


def open_image(
    image_file: ImageSource,
    *,
    max_pixels: int | None = None,
    timeout: float = DEFAULT_URL_TIMEOUT_S,
    max_bytes: int = DEFAULT_MAX_DOWNLOAD_BYTES,
) -> Image.Image:
    """Open, fully decode and convert to RGB an image given as a path, URL, bytes or PIL image.

    ``str`` values starting with ``http://`` / ``https://`` are downloaded with urllib (``timeout``
    seconds, at most ``max_bytes`` bytes); ``data:`` URLs are decoded (``max_bytes`` too); any other
    ``str`` or ``os.PathLike`` is a filesystem path. A PIL image is converted to RGB (a copy).

    Raises :class:`ImageDecodeError` when the image cannot be read or decoded (missing file, not an
    image, truncated data), is empty, is larger than PIL's decompression-bomb limit
    (``PIL.Image.MAX_IMAGE_PIXELS``; the warning PIL may emit is turned into this error) or than
    ``max_pixels`` (when given). EXIF orientation is not applied (the official code does not either).
    """
    if max_pixels is not None:
        check_positive_int("max_pixels", max_pixels)
    if isinstance(image_file, Image.Image):
        name = f"<PIL image {image_file.mode} {image_file.width}x{image_file.height}>"
        check_image_size(image_file.width, image_file.height, name, max_pixels=max_pixels)
        try:
            return image_file.convert("RGB")
        except Exception as exc:  # e.g. a lazily loaded image whose file is broken
            if isinstance(exc, MemoryError):
                raise
            raise ImageDecodeError(f"cannot convert image {name} to RGB: {exc}") from exc

    data: bytes | None
    if isinstance(image_file, (bytes, bytearray, memoryview)):
        data = bytes(image_file)
        name = f"<{len(data)} bytes>"
        source: str | io.BytesIO = io.BytesIO(data)
    elif isinstance(image_file, str) and _is_url(image_file):
        name = _short(image_file)
        data = _read_url(image_file, name, timeout=timeout, max_bytes=max_bytes)
        source = io.BytesIO(data)
    elif isinstance(image_file, (str, os.PathLike)):
        path = os.fspath(image_file)
        if not isinstance(path, str):
            raise InvalidRequest(f"image path must be text, got {type(path).__name__}")
        name = path
        source = path
    else:
        raise InvalidRequest(
            f"unsupported image input of type {type(image_file).__name__}: "
            "expected a path, an http(s)/data URL, bytes or a PIL image"
        )
    return _decode(source, name, max_pixels=max_pixels)


def load_image(
    image_file: ImageSource,
    input_size: int = 448,
    max_num: int = 12,
    *,
    max_pixels: int | None = None,
    timeout: float = DEFAULT_URL_TIMEOUT_S,
    max_bytes: int = DEFAULT_MAX_DOWNLOAD_BYTES,
) -> torch.Tensor:
    """The official ``load_image``: open, tile (with thumbnail) and transform an image.

    Returns a float32 tensor ``(N, 3, input_size, input_size)``, where ``N`` is
    ``count_tiles(w, h, min_num=1, max_num=max_num, use_thumbnail=True, image_size=input_size)``.
    See :func:`open_image` for the accepted inputs, the errors and the keyword-only guards.
    """
    check_positive_int("input_size", input_size)
    check_positive_int("max_num", max_num)
    image = open_image(image_file, max_pixels=max_pixels, timeout=timeout, max_bytes=max_bytes)
    # The fast exact path (image_tiles.py): bit-identical to stacking build_transform over dynamic_preprocess.
    return tile_pixel_values(image, max_num=max_num, image_size=input_size).pixel_values


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _is_url(text: str) -> bool:
    match = _URL_SCHEME.match(text)
    if match is None or len(match.group(1)) == 1:  # "C:\\..." is a Windows drive, not a scheme
        return False
    scheme = match.group(1).lower()
    if scheme in ("http", "https", "data"):
        return True
    if text[match.end():].startswith("//"):
        raise InvalidRequest(f"unsupported URL scheme {scheme!r} for image {_short(text)}: use http(s) or data")
    return False


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_url(url: str, name: str, *, timeout: float, max_bytes: int) -> bytes:
    """The bytes behind an http(s) or data URL, at most ``max_bytes`` of them."""
    if url[:5].lower() == "data:":
        return _read_data_url(url, name, max_bytes=max_bytes)
    request = urllib.request.Request(url, headers={"User-Agent": "internvl-runtime"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > max_bytes:
                raise ImageDecodeError(
                    f"image {name} is too large to download: {int(length)} bytes, the limit is {max_bytes}"
                )
            data: bytes = response.read(max_bytes + 1)
    except ImageDecodeError:
        raise
    except urllib.error.HTTPError as exc:
        raise ImageDecodeError(f"cannot download image {name}: HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise ImageDecodeError(f"cannot download image {name}: {exc.reason}") from exc
    except (OSError, ValueError) as exc:  # timeouts, connection resets, malformed URLs
        raise ImageDecodeError(f"cannot download image {name}: {exc}") from exc
    if len(data) > max_bytes:
        raise ImageDecodeError(f"image {name} is too large to download: more than {max_bytes} bytes")
    return data


def _read_data_url(url: str, name: str, *, max_bytes: int) -> bytes:
    try:
        return decode_data_url(url, max_bytes=max_bytes, what=f"image {name}").data
    except InvalidRequest as exc:
        raise ImageDecodeError(str(exc)) from None


def _decode(source: str | io.BytesIO, name: str, *, max_pixels: int | None) -> Image.Image:
    """Open ``source`` with PIL, check its size, decode it fully and return an RGB copy."""
    try:
        image = Image.open(source)      # not `with open() as image`: Pillow's __enter__ -> Self is Any for 3.10
        with image:
            width, height = image.size
            check_image_size(width, height, name, max_pixels=max_pixels)
            # Decompression bombs: PIL only warns between MAX_IMAGE_PIXELS and twice that; we refuse
            # (the same rule whatever the warning filters say, so the behaviour is deterministic).
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and width * height > limit:
                raise ImageDecodeError(
                    f"image {name} is too large: {width}x{height} = {width * height} pixels exceeds "
                    f"the decompression-bomb limit of {limit} pixels"
                )
            image.load()  # decode now, so truncated data fails here and not later
            return image.convert("RGB")
    except ImageDecodeError:
        raise
    except FileNotFoundError as exc:
        raise ImageDecodeError(f"cannot read image file {name}: no such file") from exc
    except IsADirectoryError as exc:
        raise ImageDecodeError(f"cannot read image file {name}: it is a directory") from exc
    except PermissionError as exc:
        raise ImageDecodeError(f"cannot read image file {name}: permission denied") from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageDecodeError(f"cannot decode image {name}: not a recognised image format") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Raised by Image.open itself (the warning only when the warning filters turn it into an error).
        raise ImageDecodeError(f"image {name} is too large (decompression bomb): {exc}") from exc
    except MemoryError:
        raise
    except Exception as exc:  # truncated or corrupt data: OSError, SyntaxError, ValueError, EOFError...
        raise ImageDecodeError(f"cannot decode image {name}: {type(exc).__name__}: {exc}") from exc
