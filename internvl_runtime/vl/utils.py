"""LMDeploy's ``lmdeploy.vl.utils`` image helpers, on this package's own image reader.

Example::

    image = load_image("tests/fixtures/data/img_800x600.png")      # or an http(s) URL, a data URL, file://...
    url = "data:image/png;base64," + encode_image_base64(image)
"""

from __future__ import annotations

import base64
import io
import os
from urllib.parse import unquote, urlparse

from PIL import Image

from ..processing.image import open_image


def load_image(image_url: str | os.PathLike[str] | Image.Image) -> Image.Image:
    """An image as an RGB PIL image, from an http(s) URL, a ``data:`` URL, a ``file://`` URL or a path (or a PIL
    image, converted), fully decoded. Raises ``ImageDecodeError`` (or ``MediaFetchError`` for a URL that cannot
    be fetched) where LMDeploy raises its own errors."""
    if isinstance(image_url, str) and image_url.startswith("file://"):
        image_url = unquote(urlparse(image_url).path)
    return open_image(image_url)


def encode_image_base64(image: str | os.PathLike[str] | Image.Image, format: str = "PNG") -> str:
    """The image (a PIL image, or anything ``load_image`` reads) encoded in ``format`` and base64, without the
    ``data:`` prefix, as LMDeploy's ``encode_image_base64``."""
    picture = image.convert("RGB") if isinstance(image, Image.Image) else load_image(image)
    with io.BytesIO() as buffer:
        picture.save(buffer, format)
        return base64.b64encode(buffer.getvalue()).decode("utf-8")
