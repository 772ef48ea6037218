"""Video preprocessing: the official frame choice, decoding with PyAV, rotation, and bad input."""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

av = pytest.importorskip("av")

from internvl_runtime.errors import InvalidRequest, VideoDecodeError  # noqa: E402
from internvl_runtime.processing import video as video_module  # noqa: E402
from internvl_runtime.processing import video_io  # noqa: E402
from internvl_runtime.processing.image import load_image  # noqa: E402
from internvl_runtime.processing.video import get_index, load_video, sample_frames, video_prompt  # noqa: E402
from paths import FIXTURES  # noqa: E402

# --------------------------------------------------------------------------------------------------
# Helpers: clips whose frames say which they are
# --------------------------------------------------------------------------------------------------


def _grey(index: int) -> int:
    return 10 + 6 * index


def _identify(image: Image.Image) -> int:
    """The index a _make_clip frame encodes (its grey level)."""
    return round((float(np.asarray(image, dtype=np.float64).mean()) - 10) / 6)


def _make_clip(
    path: Path,
    n_frames: int,
    *,
    fps: int = 10,
    codec: str = "libx264",
    size: tuple[int, int] = (64, 48),
    pts_ms: Sequence[int] | None = None,
    rotation: int | None = None,
    halves: bool = False,
) -> Path:
    """A clip of ``n_frames`` grey frames (level 10 + 6 * index), or red|blue halves with ``halves``."""
    width, height = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if pts_ms is not None:  # variable frame rate: explicit millisecond timestamps
            stream.codec_context.time_base = Fraction(1, 1000)
            stream.time_base = Fraction(1, 1000)
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for i in range(n_frames):
            pixels = np.full((height, width, 3), _grey(i), dtype=np.uint8)
            if halves:
                pixels[:, : width // 2] = (255, 0, 0)
                pixels[:, width // 2 :] = (0, 0, 255)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = int(pts_ms[i]), Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _make_audio(path: Path) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), dtype=np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def clip20(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_clip(tmp_path_factory.mktemp("clips") / "clip20.mp4", 20)


# --------------------------------------------------------------------------------------------------
# get_index
# --------------------------------------------------------------------------------------------------


def test_get_index_matches_official_goldens() -> None:
    goldens = json.loads((FIXTURES / "data" / "video_goldens.json").read_text())
    max_frame, fps = goldens["n_frames"] - 1, goldens["fps"]
    for n in (8, 16, 32):
        assert get_index(None, fps, max_frame, 0, n).tolist() == goldens[f"num_segments={n}"]
    assert get_index((1.0, 3.0), fps, max_frame, 0, 8).tolist() == goldens["num_segments=8,bound=(1.0,3.0)"]


def test_get_index_rules() -> None:
    # Segment centres with half-to-even rounding, repeats when the clip is shorter than num_segments.
    assert get_index(None, 10, 4, num_segments=8).tolist() == [0, 0, 1, 2, 2, 2, 3, 4]
    assert get_index(None, 10, 0, num_segments=3).tolist() == [0, 0, 0]
    assert get_index(None, 10, 99, num_segments=1).tolist() == [49]
    # A bound reaching past either end is clamped to the clip.
    assert get_index((-5.0, 100.0), 10, 39, num_segments=8).tolist() == get_index(None, 10, 39, num_segments=8).tolist()
    assert get_index((0.0, 0.0), 10, 39, num_segments=4).tolist() == [0, 0, 0, 0]
    assert get_index((3.9, 10.0), 10, 39, num_segments=2).tolist() == [39, 39]
    assert get_index((), 10, 9, num_segments=2).tolist() == [2, 6]  # empty bound = whole clip, as `if bound:`
    # first_idx moves the start.
    assert get_index(None, 10, 39, first_idx=20, num_segments=4).tolist() == [22, 27, 32, 36]
    assert get_index(None, 10, 39).dtype == np.int64


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_segments": 0}, "num_segments"),
        ({"num_segments": -3}, "num_segments"),
        ({"num_segments": 2.5}, "num_segments"),
        ({"bound": (5.0, 6.0)}, "selects no frame"),
        ({"bound": (3.0, 1.0)}, "starts after it ends"),
        ({"bound": (1.0,)}, "bound must be"),
        ({"bound": (0.0, float("nan"))}, "finite"),
        ({"bound": (0.0, 1.0), "fps": 0.0}, "frame rate is unknown"),
        ({"max_frame": -1}, "no frame to sample"),
    ],
)
def test_get_index_rejects(kwargs: dict, message: str) -> None:
    args = {"bound": None, "fps": 10.0, "max_frame": 39, "first_idx": 0, "num_segments": 8} | kwargs
    with pytest.raises(VideoDecodeError, match=message) as info:
        get_index(**args)
    assert isinstance(info.value, InvalidRequest)


def test_video_prompt() -> None:
    assert video_prompt(3) == "Frame1: <image>\nFrame2: <image>\nFrame3: <image>\n"
    assert video_prompt(0) == ""
    assert video_prompt(8) == "".join(f"Frame{i + 1}: <image>\n" for i in range(8))
    with pytest.raises(InvalidRequest):
        video_prompt(-1)


# --------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------


def test_fixture_video_frames() -> None:
    data = FIXTURES / "data"
    goldens = json.loads((data / "video_goldens.json").read_text())
    backgrounds = []
    for k in range(goldens["n_frames"]):
        with Image.open(data / f"frame_{k:03d}.png") as im:
            backgrounds.append(np.asarray(im.convert("RGB"), dtype=np.int32)[0, 0])
    backgrounds_arr = np.stack(backgrounds)

    def identify(image: Image.Image) -> int:
        corner = np.asarray(image, dtype=np.int32)[0, 0]
        return int(np.abs(backgrounds_arr - corner).sum(axis=1).argmin())

    for key, bound, n in [
        ("num_segments=8", None, 8),
        ("num_segments=16", None, 16),
        ("num_segments=32", None, 32),
        ("num_segments=8,bound=(1.0,3.0)", (1.0, 3.0), 8),
    ]:
        sampled = sample_frames(data / goldens["file"], bound=bound, num_segments=n)
        assert sampled.fps == goldens["fps"]
        assert sampled.indices == goldens[key], key
        assert [identify(f) for f in sampled.frames] == goldens[key], key


def test_fixture_video_load_video_close_to_png_frames() -> None:
    data = FIXTURES / "data"
    pixel_values, num_patches = load_video(data / "video.mp4", num_segments=8, max_num=1, input_size=448)
    assert num_patches == [1] * 8
    assert pixel_values.shape == (8, 3, 448, 448) and pixel_values.dtype == torch.float32
    # The goldens' video case uses the source PNGs of the same frames; the decoded (lossy) frames are close.
    expected = torch.cat([load_image(data / f"frame_{k:03d}.png", max_num=1) for k in (2, 7, 12, 17, 22, 26, 31, 36)])
    assert (pixel_values - expected).abs().mean().item() < 0.1


@pytest.mark.parametrize("num_segments", [1, 4, 8, 32])
def test_generated_clip_frames(clip20: Path, num_segments: int) -> None:
    sampled = sample_frames(clip20, num_segments=num_segments)
    expected = get_index(None, 10, 19, num_segments=num_segments).tolist()
    assert sampled.indices == expected
    assert [_identify(f) for f in sampled.frames] == expected
    assert all(f.mode == "RGB" and f.size == (64, 48) for f in sampled.frames)


@pytest.mark.parametrize("bound", [(0.5, 1.2), (0.0, 0.3), (1.5, 99.0), (-1.0, 0.9), (1.9, 1.9)])
def test_generated_clip_bounds(clip20: Path, bound: tuple[float, float]) -> None:
    sampled = sample_frames(clip20, bound=bound, num_segments=6)
    expected = get_index(bound, 10, 19, num_segments=6).tolist()
    assert sampled.indices == expected
    assert [_identify(f) for f in sampled.frames] == expected


def test_short_clip_repeats_frames(tmp_path: Path) -> None:
    clip = _make_clip(tmp_path / "short.mp4", 5)
    sampled = sample_frames(clip, num_segments=8)
    assert sampled.indices == [0, 0, 1, 2, 2, 2, 3, 4]
    assert [_identify(f) for f in sampled.frames] == [0, 0, 1, 2, 2, 2, 3, 4]
    pixel_values, num_patches = load_video(clip, num_segments=8, input_size=16)
    assert num_patches == [1] * 8 and pixel_values.shape == (8, 3, 16, 16)
    torch.testing.assert_close(pixel_values[0], pixel_values[1], rtol=0, atol=0)


def test_load_video_tiles_each_frame(clip20: Path) -> None:
    # 64x48 frames: grid (1,1) for max_num=1; (4,3) + thumbnail for max_num=12 at tile size 16.
    pixel_values, num_patches = load_video(clip20, num_segments=3, input_size=16, max_num=12)
    assert num_patches == [13, 13, 13]
    assert pixel_values.shape == (39, 3, 16, 16)
    expected = [load_image(f, input_size=16, max_num=12) for f in sample_frames(clip20, num_segments=3).frames]
    torch.testing.assert_close(pixel_values, torch.cat(expected), rtol=0, atol=0)
    assert video_prompt(len(num_patches)) == "Frame1: <image>\nFrame2: <image>\nFrame3: <image>\n"


def test_bytes_input_equals_path(clip20: Path) -> None:
    from_path = load_video(clip20, num_segments=4, input_size=16)
    from_bytes = load_video(clip20.read_bytes(), num_segments=4, input_size=16)
    torch.testing.assert_close(from_path[0], from_bytes[0], rtol=0, atol=0)
    assert from_path[1] == from_bytes[1]


@pytest.mark.parametrize(
    ("rotation", "size", "top", "bottom", "left", "right"),
    [
        (None, (64, 32), None, None, "red", "blue"),
        (90, (32, 64), "blue", "red", None, None),  # counter-clockwise: the right side goes up
        (-90, (32, 64), "red", "blue", None, None),
        (180, (64, 32), None, None, "blue", "red"),
    ],
)
def test_rotation_metadata_is_applied(
    tmp_path: Path,
    rotation: int | None,
    size: tuple[int, int],
    top: str | None,
    bottom: str | None,
    left: str | None,
    right: str | None,
) -> None:
    clip = _make_clip(tmp_path / "rot.mp4", 3, size=(64, 32), rotation=rotation, halves=True)
    frame = sample_frames(clip, num_segments=1).frames[0]
    assert frame.size == size
    pixels = np.asarray(frame, dtype=np.int32)
    h, w = pixels.shape[:2]

    def colour(region: np.ndarray) -> str:
        r, _, b = region.reshape(-1, 3).mean(axis=0)
        return "red" if r > b else "blue"

    if top is not None:
        assert colour(pixels[: h // 4]) == top and colour(pixels[-h // 4 :]) == bottom
    else:
        assert colour(pixels[:, : w // 4]) == left and colour(pixels[:, -w // 4 :]) == right


def test_variable_frame_rate(tmp_path: Path) -> None:
    gaps = [50, 150, 100, 50, 250, 50, 100, 100, 300, 50] * 2
    pts = np.cumsum([0, *gaps[:-1]]).tolist()
    clip = _make_clip(tmp_path / "vfr.mp4", 20, pts_ms=pts)
    with av.open(str(clip)) as container:
        average = float(container.streams.video[0].average_rate)
    for bound, n in [(None, 7), (None, 32), ((0.5, 1.5), 5)]:
        sampled = sample_frames(clip, bound=bound, num_segments=n)
        assert sampled.fps == average  # frame numbers come from the average rate, as decord's get_avg_fps
        expected = get_index(bound, average, 19, num_segments=n).tolist()
        assert sampled.indices == expected
        assert [_identify(f) for f in sampled.frames] == expected


def test_container_without_frame_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clip = _make_clip(tmp_path / "lossless.mkv", 12, codec="ffv1")
    expected = get_index(None, 10, 11, num_segments=5).tolist()
    sampled = sample_frames(clip, num_segments=5)
    assert sampled.indices == expected and [_identify(f) for f in sampled.frames] == expected
    # A wrong first guess of the length (too short, too long, none) still gives the decoded count's choice.
    for wrong in (3, 40, 0):
        monkeypatch.setattr(video_module, "_count_packets", lambda *args, n=wrong: n)
        sampled = sample_frames(clip, num_segments=5)
        assert sampled.indices == expected and [_identify(f) for f in sampled.frames] == expected
        bounded = sample_frames(clip, bound=(0.2, 0.9), num_segments=3)
        assert bounded.indices == get_index((0.2, 0.9), 10, 11, num_segments=3).tolist()


def test_audio_only_file(tmp_path: Path) -> None:
    audio = _make_audio(tmp_path / "sound.mka")  # an accepted container (Matroska) holding only audio
    with pytest.raises(VideoDecodeError, match="no video stream") as info:
        load_video(audio)
    assert str(audio) in str(info.value)


def test_corrupt_and_missing_files(tmp_path: Path, clip20: Path) -> None:
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(clip20.read_bytes()[: clip20.stat().st_size // 2])
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    missing = tmp_path / "missing.mp4"
    for path, message in [
        (garbage, "cannot open video"),
        (truncated, "cannot open video|no decodable"),
        (empty, "empty"),
        (missing, "no such file"),
        (tmp_path, "directory"),
    ]:
        with pytest.raises(VideoDecodeError, match=message) as info:
            load_video(path, num_segments=2, input_size=16)
        assert str(path) in str(info.value)
    with pytest.raises(VideoDecodeError, match="cannot open video"):
        load_video(b"not a video at all", num_segments=2)


def test_bad_arguments(clip20: Path) -> None:
    with pytest.raises(VideoDecodeError, match="num_segments"):
        load_video(clip20, num_segments=0)
    with pytest.raises(VideoDecodeError, match="selects no frame") as info:
        load_video(clip20, bound=(10.0, 20.0), num_segments=4)
    assert "0..19" in str(info.value) and str(clip20) in str(info.value)
    with pytest.raises(VideoDecodeError, match="ends before"):
        load_video(clip20, bound=(-3.0, -1.0))
    with pytest.raises(VideoDecodeError, match="starts after it ends"):
        load_video(clip20, bound=(1.0, 0.5))
    with pytest.raises(InvalidRequest, match="max_num"):
        load_video(clip20, max_num=0)
    with pytest.raises(InvalidRequest, match="input_size"):
        load_video(clip20, input_size=0)
    with pytest.raises(InvalidRequest, match="unsupported video input"):
        load_video(42)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# Untrusted clips: container allowlist, no nested opens, decoding limits (issue #13, items 3 and 4)
# --------------------------------------------------------------------------------------------------


def _encode(fmt: str, codec: str, n_frames: int = 6, *, fps: int = 10, pix_fmt: str = "yuv420p") -> bytes:
    """An in-memory clip of ``n_frames`` 64x48 grey frames (as _make_clip) in container ``fmt``."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, pix_fmt
        for i in range(n_frames):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), _grey(i), dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def _png(width: int, height: int, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, "PNG")
    return buffer.getvalue()


def _mjpeg_mkv(sizes: Sequence[tuple[int, int]]) -> bytes:
    """A Matroska clip of JPEG frames of the given sizes: the stream header says the first size only."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="matroska") as container:
        stream = container.add_stream("mjpeg", rate=10)
        stream.width, stream.height, stream.pix_fmt = *sizes[0], "yuvj420p"
        for i, (width, height) in enumerate(sizes):
            jpeg = io.BytesIO()
            Image.new("RGB", (width, height), (90, 90, 90)).save(jpeg, "JPEG")
            packet = av.Packet(jpeg.getvalue())
            packet.stream, packet.pts, packet.dts = stream, i, i
            packet.time_base, packet.is_keyframe = Fraction(1, 10), True
            container.mux(packet)
    return buffer.getvalue()


def _lying_clip(n_frames: int = 9, step_s: int = 300, claimed_s: float = 0.09) -> bytes:
    """A Matroska clip whose frames are ``step_s`` seconds apart ((n_frames - 1) * step_s in all) while
    its header's Duration element claims ``claimed_s`` seconds."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="matroska") as container:
        stream = container.add_stream("ffv1", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 24, "yuv420p"
        stream.codec_context.time_base = stream.time_base = Fraction(1, 1000)
        for i in range(n_frames):
            frame = av.VideoFrame.from_ndarray(np.full((24, 32, 3), _grey(i), dtype=np.uint8), format="rgb24")
            frame.pts, frame.time_base = i * step_s * 1000, Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    data = bytearray(buffer.getvalue())
    at = data.find(b"\x44\x89\x88")  # Segment Info / Duration, an 8-byte float in milliseconds
    assert at > 0
    data[at + 3 : at + 11] = struct.pack(">d", claimed_s * 1000)
    return bytes(data)


@pytest.fixture
def recorded_opens(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """The keyword arguments of every av.open call that reads (the tests' own writes are left out)."""
    calls: list[dict] = []
    real_open = av.open

    def recording_open(*args: object, **kwargs: object) -> object:
        if kwargs.get("mode") == "r":
            calls.append(kwargs)
        return real_open(*args, **kwargs)

    monkeypatch.setattr(av, "open", recording_open)
    return calls


@pytest.mark.parametrize(
    ("fmt", "codec", "pix_fmt", "fps"),
    [
        ("mp4", "libx264", "yuv420p", 10),
        ("mov", "mjpeg", "yuvj420p", 10),
        ("matroska", "ffv1", "yuv420p", 10),
        ("webm", "libvpx", "yuv420p", 10),
        ("avi", "mpeg4", "yuv420p", 10),
        ("mpegts", "mpeg2video", "yuv420p", 10),
        ("mpeg", "mpeg1video", "yuv420p", 25),
        ("ogg", "libvpx", "yuv420p", 10),
        ("gif", "gif", "rgb8", 10),
    ],
)
def test_accepted_container_formats(fmt: str, codec: str, pix_fmt: str, fps: int, recorded_opens: list[dict]) -> None:
    sampled = sample_frames(_encode(fmt, codec, fps=fps, pix_fmt=pix_fmt), num_segments=4)
    assert [_identify(f) for f in sampled.frames] == sampled.indices == get_index(None, fps, 5, num_segments=4).tolist()
    # FFmpeg is told the demuxer (it never probes) and may open nothing else.
    assert recorded_opens and all(call["format"] != "concat" and call["format"] for call in recorded_opens)
    assert all(call["options"]["protocol_whitelist"] == "none" for call in recorded_opens)


def test_mp4_external_data_references_stay_off(clip20: Path, recorded_opens: list[dict]) -> None:
    sample_frames(clip20, num_segments=2)
    assert {call["format"] for call in recorded_opens} == {"mov,mp4,m4a,3gp,3g2,mj2"}
    assert all(call["options"]["enable_drefs"] == "0" for call in recorded_opens)


def test_no_nested_opens_even_for_a_demuxer_that_would(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The options every open uses stop FFmpeg's nested opens: shown on the concat demuxer itself, which
    # the allowlist never picks.
    _make_clip(tmp_path / "somefile.mp4", 3)
    monkeypatch.chdir(tmp_path)
    script = io.BytesIO(b"ffconcat version 1.0\nfile somefile.mp4\n")
    options = {**video_io._open_options(video_io._FORMATS[0]), "format_whitelist": "concat"}
    with pytest.raises(av.error.FFmpegError), av.open(script, format="concat", options=options) as container:
        list(container.decode(video=0))


@pytest.mark.parametrize(
    "payload",
    [
        b"ffconcat version 1.0\nfile somefile.mp4\n",  # the concat demuxer would decode ./somefile.mp4
        b"ffconcat version 1.0\nfile notes.nfo\n",  # ... and draw ./notes.nfo as frames (tty demuxer)
        b"ffconcat version 1.0\nfile missing.mp4\n",
        b"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nsomefile.mp4\n#EXT-X-ENDLIST\n",  # HLS playlist
        b"\x1b[1;31mANSI art\x1b[0m\n" * 40,  # text for the tty demuxer
    ],
)
def test_scripts_and_text_are_refused_without_opening_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recorded_opens: list[dict], payload: bytes
) -> None:
    _make_clip(tmp_path / "somefile.mp4", 5)
    (tmp_path / "notes.nfo").write_text("hello " * 200)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(VideoDecodeError, match="not in an accepted container format") as info:
        sample_frames(payload, num_segments=2)
    message = str(info.value)
    assert "MP4/MOV" in message and "Matroska/WebM" in message  # names what is accepted
    assert "somefile" not in message and "notes" not in message and "missing" not in message
    assert recorded_opens == []  # FFmpeg never saw the data


def test_huge_png_is_not_a_video(recorded_opens: list[dict]) -> None:
    png = _png(10000, 10000, mode="1")  # about 12 KB; 10^8 pixels once decoded
    assert len(png) < 20_000
    with pytest.raises(VideoDecodeError, match="not in an accepted container format"):
        sample_frames(png, num_segments=2)
    assert recorded_opens == []


def test_pixel_limit_from_the_header_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    gif = io.BytesIO()
    Image.new("P", (2000, 1500)).save(gif, "GIF")  # an accepted format whose frame is too large
    monkeypatch.setattr(video_module, "_frame_to_image", lambda *args: pytest.fail("a frame was converted"))
    with pytest.raises(VideoDecodeError, match=r"declares frames of 2000x1500 = 3000000 pixels; the limit is 1000000"):
        sample_frames(gif.getvalue(), num_segments=1, max_pixels=1_000_000)


def test_pixel_limit_for_every_decoded_frame() -> None:
    clip = _mjpeg_mkv([(32, 24), (32, 24), (400, 300)])  # the third frame is larger than the header says
    assert len(sample_frames(clip, num_segments=3).frames) == 3
    with pytest.raises(VideoDecodeError, match=r"frame 2 .*limit of 1536 pixels"):
        sample_frames(clip, num_segments=3, max_pixels=2 * 32 * 24)


def test_pixel_limit_checked_before_converting_a_frame() -> None:
    # The watch refuses from the frame's size alone, whatever the decoder does.
    watch = video_io.DecodeWatch("clip", video_io.VideoLimits(max_pixels=1000), fps=10.0)
    watch.check(SimpleNamespace(width=40, height=25, time=0.0), 0)
    with pytest.raises(VideoDecodeError, match=r"frame \(number 1\) of 40x26 = 1040 pixels; the limit is 1000"):
        watch.check(SimpleNamespace(width=40, height=26, time=0.1), 1)


def test_duration_from_decoded_frames_not_the_header() -> None:
    clip = _lying_clip()  # 9 frames 300 s apart (2400 s); the header claims 0.09 s
    with av.open(io.BytesIO(clip)) as container:
        assert container.duration is not None and container.duration / 1e6 < 0.1
    assert len(sample_frames(clip, num_segments=9).frames) == 9
    with pytest.raises(VideoDecodeError, match=r"lasts more than the limit of 600 s: .* span 900 s by frame 3"):
        sample_frames(clip, num_segments=9, max_seconds=600)


def test_duration_declared_too_long_is_refused_before_decoding(clip20: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(video_module, "_decode_pass", lambda *args: pytest.fail("decoded"))
    with pytest.raises(VideoDecodeError, match=r"declares a duration of 2 s; the limit is 1.5 s"):
        sample_frames(clip20, max_seconds=1.5)


def test_duration_limit_keeps_normal_clips(clip20: Path) -> None:
    expected = get_index(None, 10, 19, num_segments=4).tolist()
    assert sample_frames(clip20, num_segments=4, max_seconds=2.0).indices == expected


def test_decoded_bytes_cap(clip20: Path) -> None:
    per_frame = 64 * 48 * 3
    sampled = sample_frames(clip20, num_segments=4, max_decoded_bytes=20 * per_frame)  # exactly the clip
    assert [_identify(f) for f in sampled.frames] == get_index(None, 10, 19, num_segments=4).tolist()
    with pytest.raises(VideoDecodeError, match=rf"more than the limit of {5 * per_frame} bytes .*6 frames decoded"):
        sample_frames(clip20, num_segments=4, max_decoded_bytes=5 * per_frame)


def test_kept_frames_are_scaled_down_while_decoding(clip20: Path) -> None:
    sampled = sample_frames(clip20, num_segments=4, max_kept_pixels=48 * 36)
    assert all(f.size == (48, 36) for f in sampled.frames)
    assert [_identify(f) for f in sampled.frames] == get_index(None, 10, 19, num_segments=4).tolist()
    pixel_values, _ = load_video(clip20, num_segments=2, input_size=16, max_kept_pixels=48 * 36)
    scaled = sample_frames(clip20, num_segments=2, max_kept_pixels=48 * 36).frames
    torch.testing.assert_close(pixel_values, torch.cat([load_image(f, input_size=16, max_num=1) for f in scaled]))
    assert sample_frames(clip20, num_segments=2, max_kept_pixels=64 * 48).frames[0].size == (64, 48)  # fits


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"max_pixels": 0}, "max_pixels"),
        ({"max_decoded_bytes": -1}, "max_decoded_bytes"),
        ({"max_kept_pixels": 1.5}, "max_kept_pixels"),
        ({"max_seconds": 0}, "max_seconds"),
        ({"max_seconds": True}, "max_seconds"),
    ],
)
def test_bad_limits(clip20: Path, kwargs: dict, name: str) -> None:
    with pytest.raises(InvalidRequest, match=name):
        sample_frames(clip20, **kwargs)
