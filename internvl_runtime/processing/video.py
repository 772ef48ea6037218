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
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, Union

import numpy as np
import torch
from PIL import Image

from internvl_runtime.errors import InvalidRequest, UnsupportedFeature, VideoDecodeError
from internvl_runtime.processing.image import build_transform, candidate_grids, dynamic_preprocess

if TYPE_CHECKING:
    import av.container

__all__ = [
    "VideoSource",
    "SampledFrames",
    "get_index",
    "sample_frames",
    "load_video",
    "video_prompt",
]

#: A clip: a filesystem path (``str`` or ``os.PathLike``) or the encoded file's bytes.
VideoSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview]

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
) -> SampledFrames:
    """Decode ``video_path`` and return the RGB frames :func:`get_index` chooses (rotation applied).

    Repeated indices (clips shorter than ``num_segments``) give the same image object repeatedly.
    """
    images, indices, fps = _sample(video_path, bound, num_segments, lambda image: image)
    return SampledFrames(frames=images, indices=indices, fps=fps)


def probe_duration(video_path: VideoSource) -> float | None:
    """The clip's duration in seconds from its container or stream header (None when unknown);
    reads headers only. Raises VideoDecodeError when the source is not a readable video."""
    _, open_container = _opener(video_path)
    with open_container() as container:
        stream = _video_stream(container, "video")
        if stream.duration is not None and stream.time_base is not None:
            return float(stream.duration * stream.time_base)
        if container.duration is not None:
            return container.duration / 1_000_000
    return None


def load_video(
    video_path: VideoSource,
    bound: Sequence[float] | None = None,
    input_size: int = 448,
    max_num: int = 1,
    num_segments: int = 32,
) -> tuple[torch.Tensor, list[int]]:
    """The official ``load_video``: sample frames, tile each (with thumbnail) and transform the tiles.

    Returns ``(pixel_values, num_patches_list)``: a float32 tensor ``(sum(num_patches_list), 3,
    input_size, input_size)`` holding every chosen frame's tiles in frame order, and each frame's tile
    count. Use :func:`video_prompt` with ``len(num_patches_list)`` for the matching prompt prefix.
    """
    transform = build_transform(input_size)  # validates input_size before any decoding
    candidate_grids(1, max_num)  # validates max_num

    def to_tiles(image: Image.Image) -> torch.Tensor:
        tiles = dynamic_preprocess(image, image_size=input_size, use_thumbnail=True, max_num=max_num)
        return torch.stack([transform(tile) for tile in tiles])

    per_frame, _, _ = _sample(video_path, bound, num_segments, to_tiles)
    return torch.cat(per_frame), [int(t.shape[0]) for t in per_frame]


def _sample(
    source: VideoSource,
    bound: Sequence[float] | None,
    num_segments: int,
    convert: Callable[[Image.Image], _T],
) -> tuple[list[_T], list[int], float]:
    """Decode ``source``, pick frames as :func:`get_index` does, and ``convert`` only the picked ones.

    The frame count is what the decoder yields. The container's count (or, lacking one, the number of
    packets) is used as a first guess so that a single decoding pass usually suffices; when the decoded
    count disagrees and changes the choice, the missing frames are decoded in a second pass.
    """
    _check_num_segments(num_segments)
    if _has_bound(bound):
        _parse_bound(bound)
    av = _import_av()
    name, opener = _opener(source)

    with opener() as container:
        stream = _video_stream(container, name)
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
        wanted = {int(i) for i in get_index(bound, fps, guess - 1, 0, num_segments)} if guess > 0 else set()
    except VideoDecodeError:
        wanted = set()  # the guess may be wrong: decide once the frames are counted
    # With a bound ending inside the clip, the choice does not depend on the clip's length: the decoding
    # can stop as soon as frame round(end * fps) is reached.
    stop_after = None
    if bound is not None and _has_bound(bound) and wanted:
        stop_after = max(max(wanted), _frame_number(_parse_bound(bound)[1] * fps))

    count, kept = _decode_pass(av, opener, name, wanted, convert, stop_after)
    if count == 0:
        raise VideoDecodeError(f"video {name} has no decodable video frame")
    try:
        indices = [int(i) for i in get_index(bound, fps, count - 1, 0, num_segments)]
    except VideoDecodeError as exc:
        raise VideoDecodeError(f"video {name}: {exc}") from exc
    missing = set(indices) - kept.keys()
    if missing:
        _, more = _decode_pass(av, opener, name, missing, convert, max(missing))
        kept.update(more)
        if set(indices) - kept.keys():
            raise VideoDecodeError(f"video {name} decodes differently on a second pass; cannot sample it")
    return [kept[i] for i in indices], indices, fps


def _decode_pass(
    av: Any,
    opener: Callable[[], Any],
    name: str,
    wanted: set[int],
    convert: Callable[[Image.Image], _T],
    stop_after: int | None,
) -> tuple[int, dict[int, _T]]:
    """Decode in order; return how many frames were decoded and ``convert``-ed images of the ``wanted`` ones.

    Stops once frame ``stop_after`` has been decoded (the returned count is then ``stop_after + 1``).
    """
    kept: dict[int, _T] = {}
    count = 0
    with opener() as container:
        stream = _video_stream(container, name)
        stream.thread_type = "AUTO"
        try:
            for frame in container.decode(stream):
                if count in wanted:
                    kept[count] = convert(_frame_to_image(frame))
                count += 1
                if stop_after is not None and count > stop_after:
                    break
        except av.error.FFmpegError as exc:
            raise VideoDecodeError(f"cannot decode video {name} after {count} frames: {exc}") from exc
    return count, kept


def _frame_to_image(frame: Any) -> Image.Image:
    """An RGB PIL image of a decoded frame, turned as its display matrix says (multiples of 90°)."""
    image: Image.Image = frame.to_image()
    # frame.rotation (PyAV >= 14) is the counter-clockwise angle the display applies.
    rotation = getattr(frame, "rotation", 0) or 0
    turns = round(rotation / 90) % 4
    if turns:
        image = image.transpose(_QUARTER_TURNS[turns])
    return image


def _count_packets(container: Any, stream: Any, name: str) -> int:
    """Number of non-empty packets of ``stream`` (a cheap frame-count guess when the container has none)."""
    count = 0
    try:
        for packet in container.demux(stream):
            if packet.size:
                count += 1
    except Exception as exc:  # noqa: BLE001 - any demuxing failure: the decoding pass will tell
        if isinstance(exc, MemoryError):
            raise
        return 0
    return count


def _average_fps(stream: Any) -> float:
    """The stream's average frame rate (decord's ``get_avg_fps``), else its guessed rate, else 0.0."""
    for rate in (stream.average_rate, getattr(stream, "guessed_rate", None)):
        if rate is not None and rate > 0:
            return float(rate)
    if stream.frames and stream.duration and stream.time_base:
        seconds = float(stream.duration * stream.time_base)
        if seconds > 0:
            return stream.frames / seconds
    return 0.0


def _video_stream(container: Any, name: str) -> Any:
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["no"]
        raise VideoDecodeError(f"video {name} has no video stream (it has {', '.join(kinds)} streams)")
    # decord opens the "best" video stream as FFmpeg ranks them.
    try:
        return container.streams.best("video") or container.streams.video[0]
    except AttributeError:  # older PyAV
        return container.streams.video[0]


def _opener(source: VideoSource) -> tuple[str, Callable[[], Any]]:
    """A display name and a function opening a fresh PyAV input container on ``source``."""
    av = _import_av()
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        name = f"<{len(data)} bytes>"
        if not data:
            raise VideoDecodeError(f"video {name} is empty")
        target: Callable[[], Any] = lambda: io.BytesIO(data)  # noqa: E731
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not isinstance(path, str):
            raise InvalidRequest(f"video path must be text, got {type(path).__name__}")
        name = path
        if not os.path.exists(path):
            raise VideoDecodeError(f"cannot read video file {name}: no such file")
        if os.path.isdir(path):
            raise VideoDecodeError(f"cannot read video file {name}: it is a directory")
        if os.path.getsize(path) == 0:
            raise VideoDecodeError(f"cannot read video file {name}: the file is empty")
        # The "file:" protocol keeps FFmpeg from reading names such as "concat:..." as other protocols.
        url = "file:" + os.path.abspath(path)
        target = lambda: url  # noqa: E731
    else:
        raise InvalidRequest(
            f"unsupported video input of type {type(source).__name__}: expected a path or bytes"
        )

    @contextmanager
    def open_container() -> Iterator[av.container.InputContainer]:
        try:
            container = av.open(target(), mode="r", metadata_errors="replace")
        except PermissionError as exc:
            raise VideoDecodeError(f"cannot read video file {name}: permission denied") from exc
        except av.error.FFmpegError as exc:
            raise VideoDecodeError(f"cannot open video {name}: {exc}") from exc
        except OSError as exc:
            raise VideoDecodeError(f"cannot read video file {name}: {exc}") from exc
        try:
            yield container
        finally:
            container.close()

    return name, open_container


def _import_av() -> Any:
    try:
        import av
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise UnsupportedFeature("video input needs PyAV: pip install 'internvl-runtime[video]'") from exc
    return av


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


def _has_bound(bound: Sequence[float] | None) -> bool:
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
