"""LMDeploy's ``lmdeploy.vl`` names, so its InternVL snippets run with only the import changed::

    from internvl_runtime.vl import load_image
    from internvl_runtime.vl.constants import IMAGE_TOKEN

``load_image`` here returns a PIL image, as LMDeploy's does (``internvl_runtime.load_image`` is the official
InternVL one, which returns the tiles as a tensor).
"""

from .constants import IMAGE_TOKEN
from .utils import encode_image_base64, load_image

__all__ = ["IMAGE_TOKEN", "encode_image_base64", "load_image"]
