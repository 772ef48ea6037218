"""Reading untrusted clips: an allowlist of container formats, no nested opens, and decoding limits.

:mod:`internvl_runtime.processing.video` samples frames as the official ``load_video`` does; this module
is what makes that safe on a clip from a request:

- **Only known container formats** are opened (:data:`ACCEPTED_FORMATS`: MP4/MOV, Matroska/WebM, AVI,
  MPEG-TS, MPEG-PS, GIF, Ogg). The format is recognised here from the first bytes and named to FFmpeg,
  which never guesses: its probing would also pick demuxers that open other files or URLs (``ffconcat``
  scripts, HLS/DASH playlists, image sequences) or draw text files as frames (``tty``). Every open also
  forbids nested opens (no protocol is allowed, and MOV external data references stay off), and the clip
  itself is read through a Python file object, so a clip cannot make the process read another file and
  an error never says whether some path exists.
- **Limits** (:class:`VideoLimits`, all off by default), checked frame by frame by :class:`DecodeWatch`
  before a frame is converted, so decoding stops at the first frame that breaks one: pixels per frame
  (also from the stream header before decoding, and given to the decoder, which then refuses larger
  frames before allocating them); the time the decoded frames' timestamps span (the header is checked
  too, but a header may claim any duration); the RGB bytes of every frame decoded (a bound on the work);
  and the pixels of each kept frame, above which it is scaled down while it is converted.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, BinaryIO, Union

import numpy as np

from internvl_runtime.errors import InvalidRequest, UnsupportedFeature, VideoDecodeError

if TYPE_CHECKING:      # PyAV is optional (the video extra): imported where a clip is opened
    from av.container import InputContainer
    from av.video.frame import VideoFrame
    from av.video.stream import VideoStream

__all__ = [
    "ACCEPTED_FORMATS",
    "DecodeWatch",
    "VideoLimits",
    "VideoSource",
    "check_declared_duration",
    "check_frame_size",
    "clip_opener",
    "import_av",
]

#: A clip: a filesystem path (``str`` or ``os.PathLike``) or the encoded file's bytes.
VideoSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview]


# --------------------------------------------------------------------------------------------------
# Limits
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VideoLimits:
    """Limits on decoding one clip (None: no limit).

    ``max_pixels``: pixels per frame (width x height); ``max_seconds``: the time the decoded frames span;
    ``max_decoded_bytes``: width x height x 3 summed over every frame decoded (sampled or not);
    ``max_kept_pixels``: kept frames above it are scaled down (aspect ratio kept), never refused.
    """

    max_pixels: int | None = None
    max_seconds: float | None = None
    max_decoded_bytes: int | None = None
    max_kept_pixels: int | None = None

    @classmethod
    def checked(
        cls,
        max_pixels: int | None,
        max_seconds: float | None,
        max_decoded_bytes: int | None,
        max_kept_pixels: int | None,
    ) -> VideoLimits:
        """The limits, each checked (InvalidRequest names a bad one)."""
        for label, value in (
            ("max_pixels", max_pixels),
            ("max_decoded_bytes", max_decoded_bytes),
            ("max_kept_pixels", max_kept_pixels),
        ):
            if value is not None and not _is_count(value):
                raise InvalidRequest(f"{label} must be an integer >= 1 or None, got {value!r}")
        if max_seconds is not None and not (_is_number(max_seconds) and max_seconds > 0):
            raise InvalidRequest(f"max_seconds must be a number > 0 or None, got {max_seconds!r}")
        return cls(max_pixels, max_seconds, max_decoded_bytes, max_kept_pixels)


def _is_count(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer)) and bool(value >= 1)


def _is_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))


class DecodeWatch:
    """What decoding one clip has cost so far (all passes together), checked against the limits frame by
    frame, before the frame is converted: its size, the RGB bytes decoded, and the time its frames span."""

    def __init__(self, name: str, limits: VideoLimits, fps: float) -> None:
        self.name = name
        self.limits = limits
        self.fps = fps
        self.decoded_bytes = 0
        self.first_s: float | None = None  # earliest and latest frame time seen, in seconds
        self.last_s: float | None = None

    def check(self, frame: VideoFrame, index: int) -> None:
        """Raise VideoDecodeError when decoded frame number ``index`` breaks a limit."""
        limits, name = self.limits, self.name
        check_frame_size(frame.width, frame.height, name, limits.max_pixels, what=f"has a frame (number {index})")
        self.decoded_bytes += frame.width * frame.height * 3
        if limits.max_decoded_bytes is not None and self.decoded_bytes > limits.max_decoded_bytes:
            raise VideoDecodeError(
                f"video {name} decodes to more than the limit of {limits.max_decoded_bytes} bytes of frames "
                f"(width x height x 3 per frame; {index + 1} frames decoded)"
            )
        if limits.max_seconds is not None:
            self._check_time(frame, index, limits.max_seconds)

    def _check_time(self, frame: VideoFrame, index: int, max_seconds: float) -> None:
        # The decoded frames' own timestamps, not the header: a header may claim any duration.
        seconds = frame.time if frame.time is not None else (index / self.fps if self.fps > 0 else None)
        if seconds is None:
            return
        self.first_s = seconds if self.first_s is None else min(self.first_s, seconds)
        self.last_s = seconds if self.last_s is None else max(self.last_s, seconds)
        if self.last_s - self.first_s > max_seconds:
            raise VideoDecodeError(
                f"video {self.name} lasts more than the limit of {max_seconds:g} s: its decoded frames span "
                f"{self.last_s - self.first_s:g} s by frame {index}"
            )


def check_frame_size(width: int, height: int, name: str, max_pixels: int | None, *, what: str) -> None:
    """Raise VideoDecodeError when a ``width x height`` frame has more than ``max_pixels`` pixels."""
    if max_pixels is not None and width * height > max_pixels:
        raise VideoDecodeError(
            f"video {name} {what} of {width}x{height} = {width * height} pixels; the limit is {max_pixels} "
            "pixels per frame"
        )


def check_declared_duration(container: InputContainer, stream: VideoStream, name: str, limits: VideoLimits) -> None:
    """Refuse a clip whose header already says it is too long (the decoded frames are checked anyway)."""
    if limits.max_seconds is None:
        return
    if stream.duration is not None and stream.time_base is not None:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        seconds = container.duration / 1_000_000
    else:
        return
    if seconds > limits.max_seconds:
        raise VideoDecodeError(
            f"video {name} declares a duration of {seconds:g} s; the limit is {limits.max_seconds:g} s"
        )


# --------------------------------------------------------------------------------------------------
# Opening: an allowlist of container formats, no nested opens
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Format:
    """A container format clips may use: its name for people, FFmpeg's demuxer, and how it begins."""

    label: str
    demuxer: str
    matches: Callable[[bytes], bool]
    options: tuple[tuple[str, str], ...] = ()


# ISO base media (MP4, MOV, 3GP) files begin with one of these boxes (size, then the four-letter type).
_ISO_BOXES = frozenset({b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot"})


def _is_transport_stream(head: bytes) -> bool:
    """Two MPEG-TS sync bytes one packet apart (188-byte packets, or 192 with the M2TS prefix)."""
    return any(len(head) > step + offset and head[offset] == head[offset + step] == 0x47
               for offset, step in ((0, 188), (4, 192)))


_FORMATS = (
    # External data references (drefs) would open other files: they stay off, paths or not.
    _Format("MP4/MOV", "mov,mp4,m4a,3gp,3g2,mj2", lambda h: h[4:8] in _ISO_BOXES,
            (("enable_drefs", "0"), ("use_absolute_path", "0"))),
    _Format("Matroska/WebM", "matroska,webm", lambda h: h.startswith(b"\x1a\x45\xdf\xa3")),
    _Format("AVI", "avi", lambda h: h.startswith(b"RIFF") and h[8:12] == b"AVI "),
    _Format("MPEG-TS", "mpegts", _is_transport_stream),
    _Format("MPEG-PS", "mpeg", lambda h: h.startswith(b"\x00\x00\x01\xba")),
    _Format("GIF", "gif", lambda h: h[:6] in (b"GIF87a", b"GIF89a")),
    _Format("Ogg", "ogg", lambda h: h.startswith(b"OggS")),
)

#: The container formats a clip may use; nothing else is opened.
ACCEPTED_FORMATS: tuple[str, ...] = tuple(c.label for c in _FORMATS)

_HEAD_BYTES = 512  # enough for every signature above


def _format_of(head: bytes, name: str) -> _Format:
    """The accepted container format ``head`` (the clip's first bytes) begins, else VideoDecodeError."""
    for container_format in _FORMATS:
        if container_format.matches(head):
            return container_format
    raise VideoDecodeError(
        f"cannot open video {name}: it is not in an accepted container format ({', '.join(ACCEPTED_FORMATS)})"
    )


def _open_options(container_format: _Format) -> dict[str, str]:
    """FFmpeg options for opening a clip: this demuxer only, and no protocol for nested opens (the clip
    itself is read through a Python file object, which needs none)."""
    return {"protocol_whitelist": "none", "format_whitelist": container_format.demuxer,
            **dict(container_format.options)}


def clip_opener(source: VideoSource) -> tuple[str, Callable[[], AbstractContextManager[InputContainer]]]:
    """A display name and a function opening a fresh PyAV input container on ``source``.

    The container format is recognised once, from the first bytes; each open names it to FFmpeg.
    """
    av = import_av()
    name, open_file = _reader(source)
    with open_file() as file:
        head = file.read(_HEAD_BYTES)
    container_format = _format_of(head, name)
    options = _open_options(container_format)

    @contextmanager
    def open_container() -> Iterator[InputContainer]:
        with open_file() as file:
            try:
                container = av.open(file, mode="r", format=container_format.demuxer, options=options,
                                    metadata_errors="replace")
            except av.error.FFmpegError as exc:
                raise VideoDecodeError(f"cannot open video {name} as {container_format.label}: {exc}") from exc
            try:
                yield container
            finally:
                container.close()

    return name, open_container


def _reader(source: VideoSource) -> tuple[str, Callable[[], BinaryIO]]:
    """A display name and a function opening ``source`` as a binary file object."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        name = f"<{len(data)} bytes>"
        if not data:
            raise VideoDecodeError(f"video {name} is empty")
        return name, lambda: io.BytesIO(data)
    if not isinstance(source, (str, os.PathLike)):
        raise InvalidRequest(
            f"unsupported video input of type {type(source).__name__}: expected a path or bytes"
        )
    path = os.fspath(source)
    if not isinstance(path, str):
        raise InvalidRequest(f"video path must be text, got {type(path).__name__}")
    if not os.path.exists(path):
        raise VideoDecodeError(f"cannot read video file {path}: no such file")
    if os.path.isdir(path):
        raise VideoDecodeError(f"cannot read video file {path}: it is a directory")
    if os.path.getsize(path) == 0:
        raise VideoDecodeError(f"cannot read video file {path}: the file is empty")

    def open_file() -> BinaryIO:
        try:
            return open(path, "rb")
        except PermissionError as exc:
            raise VideoDecodeError(f"cannot read video file {path}: permission denied") from exc
        except OSError as exc:
            raise VideoDecodeError(f"cannot read video file {path}: {exc.strerror or exc}") from exc

    return path, open_file


def import_av() -> ModuleType:
    try:
        import av
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise UnsupportedFeature("video input needs PyAV: pip install 'internvl-runtime[video]'") from exc
    return av
