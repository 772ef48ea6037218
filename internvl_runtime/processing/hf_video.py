"""Video frames of an HF-format checkpoint, as transformers' own InternVL video path takes them.

An HF-format folder (transformers' native ``InternVLForConditionalGeneration``) is served the way transformers
4.55's ``InternVLProcessor`` serves it, not the way the GitHub format's ``load_video`` does; this module owns
the one difference in frame choice (the rest of the video path is shared):

- frames: ``InternVLVideoProcessor.sample_frames`` with ``num_frames`` (what ``apply_chat_template(...,
  num_frames=N)`` asks for): ``torch.arange(shift, total, total / N).int()`` with ``shift = total / N / 2``
  (float32 arithmetic, as torch computes it), over the whole clip; there is no ``bound``. The GitHub format
  takes the centres of ``(total - 1) / N``-frame segments instead (``video.get_index``): for 40 frames and 8
  segments transformers picks 2, 7, 12, 17, 22, 27, 32, 37 where the official ``load_video`` picks 2, 7, 12,
  17, 22, 26, 31, 36.
- prompt: the processor writes ``Frame1: <img>...</img>\\n...FrameN: <img>...</img>`` for the template's
  ``<video>\\n``: the same text as the GitHub format's ``FrameK: <image>\\n`` prefix once expanded, so the
  shared prefix (``InputProcessor``) serves both.
- pixels: each frame one 448x448 tile (torch's antialiased bicubic resize of the uint8 frame; equal to PIL's
  bicubic on the fixtures' frames), normalised with the folder's ImageNet mean/std: the tiling of an image
  with ``max_num`` 1, shared.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import VideoDecodeError


def frame_indices(bound: Sequence[float] | None, fps: float, max_frame: int, first_idx: int = 0,
                  num_segments: int = 8) -> np.ndarray:
    """The ``num_segments`` frames transformers' ``InternVLVideoProcessor`` samples from frames
    ``first_idx..max_frame`` (the signature of ``video.get_index``, so either rule can be passed where frames are
    chosen; ``fps`` is not used). Raises :class:`VideoDecodeError` for a ``bound`` (the HF path has none), for
    fewer frames than asked (transformers refuses them too) or an empty clip."""
    if bound is not None and any(b is not None for b in bound):
        raise VideoDecodeError("an HF-format checkpoint samples the whole clip: a bound is not supported")
    total = max_frame - first_idx + 1
    if num_segments < 1 or total < 1:
        raise VideoDecodeError(f"cannot sample {num_segments} frames from a clip of {total}")
    if num_segments > total:
        raise VideoDecodeError(f"cannot sample {num_segments} frames from a clip of {total} (transformers' "
                               "InternVL video processor refuses more frames than the clip has)")
    step = total / num_segments
    picked = torch.arange(step / 2, total, step).int()[:num_segments]
    return picked.numpy().astype(np.int64) + first_idx


#: ImageNet's mean and std, as the folder's video_preprocessor_config.json has them (the image tiling's too).
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)
_RESCALE = 1 / 255


def frame_pixels(image: Image.Image, image_size: int) -> torch.Tensor:
    """One video frame -> its one tile, (1, 3, image_size, image_size) float32, as ``InternVLVideoProcessor``
    makes it: the uint8 frame resized by torch's antialiased bicubic interpolation, then rescale and normalise
    fused as transformers' fast processors fuse them, ``(x - mean / r) / (std / r)`` with ``r = 1/255`` (not
    ``(x * r - mean) / std``: the two differ in the last bits of float32)."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    frame = torch.from_numpy(np.array(rgb)).permute(2, 0, 1).unsqueeze(0)             # (1, 3, H, W) uint8
    if tuple(frame.shape[-2:]) != (image_size, image_size):
        frame = torch.nn.functional.interpolate(frame, size=[image_size, image_size], mode="bicubic",
                                                align_corners=False, antialias=True)
    mean = (torch.tensor(_MEAN) * (1.0 / _RESCALE)).view(1, 3, 1, 1)
    std = (torch.tensor(_STD) * (1.0 / _RESCALE)).view(1, 3, 1, 1)
    return ((frame.to(torch.float32) - mean) / std).contiguous()
