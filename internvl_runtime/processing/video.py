"""Video preprocessing of the InternVL2 models: the official quick start's frame sampling, with PyAV.

The official quick start (OpenGVLab/InternVL README, ``load_video``) reads a clip with decord, takes
``num_segments`` frames at the centres of equal segments of the clip (or of ``bound``, in seconds,
converted to frame numbers with the stream's average frame rate; :func:`get_index`), tiles every frame
with ``dynamic_preprocess(..., use_thumbnail=True, max_num=max_num)``, transforms the tiles and
concatenates them; the prompt names each frame ``FrameK: <image>`` (:func:`video_prompt`).

Here PyAV (the optional ``video`` extra) decodes the clip in order: the frame count is the number of
frames the decoder yields and the frame rate is the stream's average frame rate, as decord reports them.
Only the chosen frames are converted to RGB and kept (already tiled and transformed), never the whole
clip. Display-rotation metadata is applied (decord ignores it). Bad input raises
:class:`~internvl_runtime.errors.VideoDecodeError` (an unreadable clip or an impossible frame
selection) or :class:`~internvl_runtime.errors.InvalidRequest` (bad arguments), naming the clip.

Clips from requests are read safely (:mod:`internvl_runtime.processing.video_io`): only an allowlist of
container formats is opened, never with nested opens, and the keyword-only limits of :func:`sample_frames`
(pixels per frame, decoded duration, decoded bytes, kept-frame size; none by default) stop decoding at the
first frame that breaks one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeGuard, TypeVar

import numpy as np
import torch
from PIL import Image

from internvl_runtime.errors import InvalidRequest, VideoDecodeError
from internvl_runtime.processing.image import build_transform, candidate_grids, dynamic_preprocess
from internvl_runtime.processing.video_io import (
    ACCEPTED_FORMATS,
    DecodeWatch,
    VideoLimits,
    VideoSource,
    check_declared_duration,
    check_frame_size,
    clip_opener,
    import_av,
)

if TYPE_CHECKING:      # PyAV is optional (the video extra): imported where a clip is opened
    from types import ModuleType

    from av.container import InputContainer
    from av.video.frame import VideoFrame
    from av.video.stream import VideoStream

__all__ = [
    "ACCEPTED_FORMATS",
    "VideoSource",
    "SampledFrames",
    "get_index",
    "sample_frames",
    "load_video",
    "video_prompt",
]

_T = TypeVar("_T")

# PIL transposition that turns a frame by k quarter turns counter-clockwise.
_QUARTER_TURNS = {
    1: Image.Transpose.ROTATE_90,
    2: Image.Transpose.ROTATE_180,
    3: Image.Transpose.ROTATE_270,
}


@dataclass(frozen=True)
class SampledFrames:
    """The frames :func:`sample_frames` chose: RGB images (rotation applied), their indices, the fps used."""

    frames: list[Image.Image]
    indices: list[int]
    fps: float


# --------------------------------------------------------------------------------------------------
# Frame choice
# --------------------------------------------------------------------------------------------------

#: A frame choice: (bound, fps, max_frame, first_idx, num_segments) -> the chosen frame indices.
FrameRule = Callable[[Sequence[float] | None, float, int, int, int], np.ndarray]



def get_index(
    bound: Sequence[float] | None,
    fps: float,
    max_frame: int,
    first_idx: int = 0,
    num_segments: int = 32,
) -> np.ndarray:
    """Indices of the ``num_segments`` frames the official ``load_video`` samples.

    The range ``[start_idx, end_idx]`` is the whole clip ``[first_idx, max_frame]``, or, with
    ``bound = (start_s, end_s)``, ``[max(first_idx, round(start_s * fps)), min(round(end_s * fps),
    max_frame)]`` (Python's half-to-even ``round``). It is cut into ``num_segments`` segments of
    ``seg = (end_idx - start_idx) / num_segments`` frames and segment ``k`` gives frame
    ``int(start_idx + seg / 2 + round(seg * k))``. Frames repeat when the clip is shorter than
    ``num_segments``; indices always lie in ``[first_idx, max_frame]``.

    Without ``bound`` the official code uses ``(-100000 s, 100000 s)``; this is the whole clip for any
    real frame rate, and here it is the whole clip whatever ``fps`` is.

    Returns an int64 array of ``num_segments`` indices. Raises :class:`VideoDecodeError` when
    ``num_segments < 1``, the clip is empty (``max_frame < first_idx``), ``bound`` is malformed, or it
    selects no frame of the clip (e.g. it starts after the clip ends).
    """
    _check_num_segments(num_segments)
    if max_frame < first_idx:
        raise VideoDecodeError(f"the clip has no frame to sample (max_frame {max_frame} < first_idx {first_idx})")
    if not _has_bound(bound):
        start_idx, end_idx = first_idx, max_frame
    else:
        start_s, end_s = _parse_bound(bound)
        if not (math.isfinite(fps) and fps > 0):
            raise VideoDecodeError(f"cannot apply bound ({start_s:g} s, {end_s:g} s): the frame rate is unknown")
        start_idx = max(first_idx, _frame_number(start_s * fps))
        end_idx = min(_frame_number(end_s * fps), max_frame)
        if start_idx > end_idx:
            raise VideoDecodeError(
                f"bound ({start_s:g} s, {end_s:g} s) selects no frame: the clip has frames {first_idx}..{max_frame}, "
                f"i.e. {first_idx / fps:g} s to {max_frame / fps:g} s at {fps:g} fps"
            )
    seg_size = (end_idx - start_idx) / num_segments
    # Official: the centre of each segment, int(start + seg/2 + round(seg * k)), half-to-even rounding.
    indices = [int(start_idx + seg_size / 2 + round(seg_size * k)) for k in range(num_segments)]
    return np.clip(np.asarray(indices, dtype=np.int64), first_idx, max_frame)


def video_prompt(num_frames: int) -> str:
    """The official video prefix: ``'Frame1: <image>\\nFrame2: <image>\\n...'`` (one line per frame)."""
    if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)) or num_frames < 0:
        raise InvalidRequest(f"num_frames must be an integer >= 0, got {num_frames!r}")
    return "".join(f"Frame{k + 1}: <image>\n" for k in range(num_frames))


# --------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------


def sample_frames(
    video_path: VideoSource,
    bound: Sequence[float] | None = None,
    num_segments: int = 32,
    *,
    max_pixels: int | None = None,
    max_seconds: float | None = None,
    max_decoded_bytes: int | None = None,
    max_kept_pixels: int | None = None,
    rule: FrameRule | None = None,
) -> SampledFrames:
    """Decode ``video_path`` and return the RGB frames :func:`get_index` chooses (rotation applied).

    Repeated indices (clips shorter than ``num_segments``) give the same image object repeatedly. The
    keyword-only limits (none by default) are those of :class:`~.video_io.VideoLimits`; decoding stops at
    the first frame that breaks one (VideoDecodeError), except ``max_kept_pixels``, which scales kept
    frames down instead. ``rule`` chooses the frames (default :func:`get_index`, the official choice; an
    HF-format checkpoint passes ``hf_video.frame_indices``, transformers' choice).
    """
    limits = VideoLimits.checked(max_pixels, max_seconds, max_decoded_bytes, max_kept_pixels)
    images, indices, fps = _sample(video_path, bound, num_segments, lambda image: image, limits, rule)
    return SampledFrames(frames=images, indices=indices, fps=fps)


def load_video(
    video_path: VideoSource,
    bound: Sequence[float] | None = None,
    input_size: int = 448,
    max_num: int = 1,
    num_segments: int = 32,
    *,
    max_pixels: int | None = None,
    max_seconds: float | None = None,
    max_decoded_bytes: int | None = None,
    max_kept_pixels: int | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """The official ``load_video``: sample frames, tile each (with thumbnail) and transform the tiles.

    Returns ``(pixel_values, num_patches_list)``: a float32 tensor ``(sum(num_patches_list), 3,
    input_size, input_size)`` holding every chosen frame's tiles in frame order, and each frame's tile
    count. Use :func:`video_prompt` with ``len(num_patches_list)`` for the matching prompt prefix. The
    keyword-only limits are those of :func:`sample_frames`.
    """
    transform = build_transform(input_size)  # validates input_size before any decoding
    candidate_grids(1, max_num)  # validates max_num
    limits = VideoLimits.checked(max_pixels, max_seconds, max_decoded_bytes, max_kept_pixels)

    def to_tiles(image: Image.Image) -> torch.Tensor:
        tiles = dynamic_preprocess(image, image_size=input_size, use_thumbnail=True, max_num=max_num)
        return torch.stack([transform(tile) for tile in tiles])

    per_frame, _, _ = _sample(video_path, bound, num_segments, to_tiles, limits)
    return torch.cat(per_frame), [int(t.shape[0]) for t in per_frame]


def _sample(
    source: VideoSource,
    bound: Sequence[float] | None,
    num_segments: int,
    convert: Callable[[Image.Image], _T],
    limits: VideoLimits,
    rule: FrameRule | None = None,
) -> tuple[list[_T], list[int], float]:
    """Decode ``source``, pick frames as ``rule`` (default :func:`get_index`) does, and ``convert`` only the
    picked ones.

    The frame count is what the decoder yields. The container's count (or, lacking one, the number of
    packets) is used as a first guess so that a single decoding pass usually suffices; when the decoded
    count disagrees and changes the choice, the missing frames are decoded in a second pass.
    """
    _check_num_segments(num_segments)
    choose: FrameRule = rule or get_index
    if _has_bound(bound):
        _parse_bound(bound)
    av = import_av()
    name, opener = clip_opener(source)

    with opener() as container:
        stream = _video_stream(container, name, limits)
        check_declared_duration(container, stream, name, limits)
        fps = _average_fps(stream)
        guess = int(stream.frames or 0) or _count_packets(container, stream, name)
    if bound is not None and _has_bound(bound):
        # Errors that do not depend on the clip's length are raised before any decoding.
        start_s, end_s = _parse_bound(bound)
        if not (math.isfinite(fps) and fps > 0):
            raise VideoDecodeError(
                f"cannot apply bound ({start_s:g} s, {end_s:g} s) to video {name}: its frame rate is unknown"
            )
        if _frame_number(end_s * fps) < 0:
            raise VideoDecodeError(f"bound ({start_s:g} s, {end_s:g} s) ends before video {name} starts")

    try:
        wanted = {int(i) for i in choose(bound, fps, guess - 1, 0, num_segments)} if guess > 0 else set()
    except VideoDecodeError:
        wanted = set()  # the guess may be wrong: decide once the frames are counted
    # With a bound ending inside the clip, the choice does not depend on the clip's length: the decoding
    # can stop as soon as frame round(end * fps) is reached.
    stop_after = None
    if bound is not None and _has_bound(bound) and wanted:
        stop_after = max(max(wanted), _frame_number(_parse_bound(bound)[1] * fps))

    watch = DecodeWatch(name, limits, fps)
    count, kept = _decode_pass(av, opener, watch, wanted, convert, stop_after)
    if count == 0:
        raise VideoDecodeError(f"video {name} has no decodable video frame")
    try:
        indices = [int(i) for i in choose(bound, fps, count - 1, 0, num_segments)]
    except VideoDecodeError as exc:
        raise VideoDecodeError(f"video {name}: {exc}") from exc
    missing = set(indices) - kept.keys()
    if missing:
        _, more = _decode_pass(av, opener, watch, missing, convert, max(missing))
        kept.update(more)
        if set(indices) - kept.keys():
            raise VideoDecodeError(f"video {name} decodes differently on a second pass; cannot sample it")
    return [kept[i] for i in indices], indices, fps


def _decode_pass(
    av: ModuleType,
    opener: Callable[[], AbstractContextManager[InputContainer]],
    watch: DecodeWatch,
    wanted: set[int],
    convert: Callable[[Image.Image], _T],
    stop_after: int | None,
) -> tuple[int, dict[int, _T]]:
    """Decode in order; return how many frames were decoded and ``convert``-ed images of the ``wanted`` ones.

    Stops once frame ``stop_after`` has been decoded (the returned count is then ``stop_after + 1``), or
    with an error as soon as a frame breaks one of ``watch``'s limits.
    """
    kept: dict[int, _T] = {}
    count = 0
    name, limits = watch.name, watch.limits
    with opener() as container:
        stream = _video_stream(container, name, limits)
        stream.thread_type = "AUTO"
        if limits.max_pixels is not None:
            # The decoder refuses larger frames before allocating them (a frame may change size mid-stream).
            stream.codec_context.options = {"max_pixels": str(limits.max_pixels)}
        try:
            for frame in container.decode(stream):
                watch.check(frame, count)
                if count in wanted:
                    kept[count] = convert(_frame_to_image(frame, limits.max_kept_pixels))
                count += 1
                if stop_after is not None and count > stop_after:
                    break
        except av.error.FFmpegError as exc:
            if isinstance(exc, av.error.ArgumentError) and limits.max_pixels is not None:
                # EINVAL is what the decoder's own size check (max_pixels, set above) returns.
                raise VideoDecodeError(
                    f"cannot decode frame {count} of video {name} within the limit of {limits.max_pixels} "
                    f"pixels per frame: {exc}"
                ) from exc
            raise VideoDecodeError(f"cannot decode video {name} after {count} frames: {exc}") from exc
    return count, kept


def _frame_to_image(frame: VideoFrame, max_pixels: int | None = None) -> Image.Image:
    """An RGB PIL image of a decoded frame, turned as its display matrix says (multiples of 90°).

    A frame of more than ``max_pixels`` pixels is scaled down (aspect ratio kept) in the same conversion,
    so its full-resolution RGB copy is never made.
    """
    size = _scaled_size(frame.width, frame.height, max_pixels)
    if size is None:
        image: Image.Image = frame.to_image()
    else:
        image = frame.to_image(width=size[0], height=size[1], interpolation="AREA")
    # frame.rotation (PyAV >= 14) is the counter-clockwise angle the display applies.
    rotation = getattr(frame, "rotation", 0) or 0
    turns = round(rotation / 90) % 4
    if turns:
        image = image.transpose(_QUARTER_TURNS[turns])
    return image


def _scaled_size(width: int, height: int, max_pixels: int | None) -> tuple[int, int] | None:
    """The size a ``width x height`` frame is scaled down to so as to hold at most ``max_pixels``
    pixels (aspect ratio kept), or None when it already fits."""
    if max_pixels is None or width * height <= max_pixels:
        return None
    scale = math.sqrt(max_pixels / (width * height))
    return max(1, int(width * scale)), max(1, int(height * scale))


def _count_packets(container: InputContainer, stream: VideoStream, name: str) -> int:
    """Number of non-empty packets of ``stream`` (a cheap frame-count guess when the container has none)."""
    count = 0
    try:
        for packet in container.demux(stream):
            if packet.size:
                count += 1
    except Exception as exc:  # any demuxing failure: the decoding pass will tell
        if isinstance(exc, MemoryError):
            raise
        return 0
    return count


def _average_fps(stream: VideoStream) -> float:
    """The stream's average frame rate (decord's ``get_avg_fps``), else its guessed rate, else 0.0."""
    for rate in (stream.average_rate, getattr(stream, "guessed_rate", None)):
        if rate is not None and rate > 0:
            return float(rate)
    if stream.frames and stream.duration and stream.time_base:
        seconds = float(stream.duration * stream.time_base)
        if seconds > 0:
            return stream.frames / seconds
    return 0.0


def _video_stream(container: InputContainer, name: str, limits: VideoLimits) -> VideoStream:
    """The clip's video stream (the one decord would open), its declared frame size checked."""
    if not container.streams.video:
        kinds: list[str] = sorted({s.type for s in container.streams}) or ["no"]
        raise VideoDecodeError(f"video {name} has no video stream (it has {', '.join(kinds)} streams)")
    # decord opens the "best" video stream as FFmpeg ranks them.
    stream = container.streams.video[0]
    try:
        best = container.streams.best("video")
    except AttributeError:  # older PyAV
        best = None
    if best is not None:
        stream = next((s for s in container.streams.video if s.index == best.index), stream)
    codec = stream.codec_context
    check_frame_size(codec.width, codec.height, name, limits.max_pixels, what="declares frames")
    return stream


def _check_num_segments(num_segments: object) -> None:
    if isinstance(num_segments, bool) or not isinstance(num_segments, (int, np.integer)) or num_segments < 1:
        raise VideoDecodeError(f"num_segments must be an integer >= 1, got {num_segments!r}")


def _frame_number(position: float) -> int:
    """``round(position)`` (half to even), saturated so that huge or infinite positions stay integers."""
    limit = 2**62
    if not position < limit:
        return limit
    if not position > -limit:
        return -limit
    return round(position)


def _has_bound(bound: Sequence[float] | None) -> TypeGuard[Sequence[float]]:
    """Whether a bound is given (the official ``if bound:``: ``None`` and an empty sequence mean no bound)."""
    if bound is None:
        return False
    try:
        return len(bound) != 0
    except TypeError as exc:
        raise VideoDecodeError(f"bound must be (start_seconds, end_seconds), got {bound!r}") from exc


def _parse_bound(bound: Sequence[float]) -> tuple[float, float]:
    """``(start_s, end_s)`` as finite floats with ``start_s <= end_s``."""
    try:
        start_s, end_s = (float(x) for x in bound)
    except (TypeError, ValueError) as exc:
        raise VideoDecodeError(f"bound must be (start_seconds, end_seconds), got {bound!r}") from exc
    if not (math.isfinite(start_s) and math.isfinite(end_s)):
        raise VideoDecodeError(f"bound must hold finite seconds, got {bound!r}")
    if start_s > end_s:
        raise VideoDecodeError(f"bound starts after it ends: ({start_s:g} s, {end_s:g} s)")
    return start_s, end_s
