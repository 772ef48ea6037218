"""``video_url`` content parts: frames sampled as the official load_video, same media safety as images."""

from __future__ import annotations

import base64
import io
import struct
from fractions import Fraction
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from internvl_runtime.serving.config import ServerConfig

from .helpers import FIXTURES, MODEL, run_server

VIDEO = FIXTURES / "data" / "video.mp4"


def _video_url(data: bytes) -> str:
    return "data:video/mp4;base64," + base64.b64encode(data).decode()


av = pytest.importorskip("av")

#: The fixture clip decodes to 40 frames of 320x240 (9.2 MB as RGB); the module's server allows twice that.
DECODED_BYTES = 2 * 40 * 320 * 240 * 3


@pytest.fixture(scope="module")
def server(tiny_1b):
    config = ServerConfig(model=str(tiny_1b), max_model_len=4096, num_blocks=1024, max_video_frames=8,
                          max_num_seqs=4, max_image_pixels=1_000_000, max_video_decoded_bytes=DECODED_BYTES)
    with run_server(config) as running:
        yield running


def _chat(server, parts: list[dict], **extra) -> httpx.Response:
    body = {"model": MODEL, "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "user", "content": parts}], **extra}
    return httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=120)


def test_video_chat_counts_frame_tokens(server) -> None:
    parts = [{"type": "text", "text": "What is happening in the video?"},
             {"type": "video_url", "video_url": {"url": _video_url(VIDEO.read_bytes()), "num_segments": 4}}]
    response = _chat(server, parts)
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    assert usage["prompt_tokens"] > 4 * 256            # four one-tile frames of 256 tokens each
    eight = _chat(server, [parts[0], {"type": "video_url", "video_url": {"url": parts[1]["video_url"]["url"],
                                                                          "num_segments": 8}}])
    assert eight.status_code == 200
    assert eight.json()["usage"]["prompt_tokens"] - usage["prompt_tokens"] >= 4 * 256


@pytest.mark.parametrize(("video", "fragment"), [
    ({"url": _video_url(b"not a video at all")}, "video"),
    ({"url": _video_url(VIDEO.read_bytes()), "num_segments": 9}, "num_segments"),
    ({"url": _video_url(VIDEO.read_bytes()), "num_segments": 0}, "num_segments"),
    ({"url": "http://127.0.0.1:9/clip.mp4"}, "127.0.0.1"),
    ({"url": "http://169.254.169.254/latest/clip.mp4"}, "169.254.169.254"),
])
def test_bad_videos_are_400_and_the_server_keeps_serving(server, video, fragment) -> None:
    response = _chat(server, [{"type": "text", "text": "hi"}, {"type": "video_url", "video_url": video}])
    assert response.status_code == 400, response.text
    assert "error" in response.json()
    ok = _chat(server, [{"type": "text", "text": "hello"}])
    assert ok.status_code == 200


def test_video_beside_an_image_is_refused(server) -> None:
    parts = [{"type": "video_url", "video_url": {"url": _video_url(VIDEO.read_bytes())}},
             {"type": "image_url", "image_url": {"url": _video_url(VIDEO.read_bytes())}}]
    assert _chat(server, parts).status_code == 400


# ---------------------------------------------------------------------------------------------------
# Untrusted clips (issue #13): only accepted containers, no files opened, pixel / duration / work limits
# ---------------------------------------------------------------------------------------------------


def _encode(fmt: str, codec: str, frames: list[np.ndarray], *, pts_ms: list[int] | None = None) -> bytes:
    """Encode RGB frames (all one size) into container ``fmt``, 10 fps or at ``pts_ms`` milliseconds."""
    height, width = frames[0].shape[:2]
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if pts_ms is not None:
            stream.codec_context.time_base = stream.time_base = Fraction(1, 1000)
        for i, pixels in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[i], Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def _grey_frames(count: int, width: int, height: int) -> list[np.ndarray]:
    return [np.full((height, width, 3), 10 + 5 * (i % 40), dtype=np.uint8) for i in range(count)]


def _lying_mkv() -> bytes:
    """Nine frames 300 s apart (2400 s) whose Matroska header claims a duration of 0.09 s."""
    data = bytearray(_encode("matroska", "ffv1", _grey_frames(9, 32, 24), pts_ms=[i * 300_000 for i in range(9)]))
    at = data.find(b"\x44\x89\x88")  # Segment Info / Duration: an 8-byte float, in milliseconds
    data[at + 3 : at + 11] = struct.pack(">d", 90.0)
    return bytes(data)


def _image(fmt: str, width: int, height: int, mode: str) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, fmt)
    return buffer.getvalue()


def _error(response: httpx.Response) -> str:
    assert response.status_code == 400, response.text
    return str(response.json()["error"]["message"])


@pytest.fixture
def media_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The server process's working directory, holding a real clip and a text file a script could name."""
    (tmp_path / "somefile.mp4").write_bytes(VIDEO.read_bytes())
    (tmp_path / "notes.nfo").write_text("secret notes " * 100)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("script", [
    b"ffconcat version 1.0\nfile somefile.mp4\n",      # was decoded: the server read ./somefile.mp4
    b"ffconcat version 1.0\nfile notes.nfo\n",         # was drawn as frames by the tty demuxer
    b"ffconcat version 1.0\nfile missing.mp4\n",       # the error told that it does not exist
])
def test_concat_scripts_open_no_file(server, media_folder, script) -> None:
    parts = [{"type": "text", "text": "hi"}, {"type": "video_url", "video_url": {"url": _video_url(script)}}]
    message = _error(_chat(server, parts))
    assert "not in an accepted container format" in message and "MP4/MOV" in message
    for leak in ("somefile", "notes", "missing", str(media_folder)):
        assert leak not in message


@pytest.mark.parametrize(("make", "fragment"), [
    (lambda: _image("PNG", 10_000, 10_000, "1"), "not in an accepted container format"),   # a 12 KB PNG
    (lambda: _image("GIF", 1200, 1000, "P"), "1200x1000 = 1200000 pixels; the limit is 1000000"),
    (_lying_mkv, "lasts more than the limit of 600 s"),
    (lambda: _encode("mp4", "libx264", _grey_frames(100, 320, 240)), f"limit of {DECODED_BYTES} bytes"),
])
def test_video_limits(server, make, fragment) -> None:
    parts = [{"type": "text", "text": "hi"}, {"type": "video_url", "video_url": {"url": _video_url(make())}}]
    assert fragment in _error(_chat(server, parts))
    ok = _chat(server, [{"type": "text", "text": "hello"}])
    assert ok.status_code == 200


@pytest.fixture(scope="module")
def private_server(tiny_1b):
    config = ServerConfig(model=str(tiny_1b), max_model_len=2048, num_blocks=256, max_num_seqs=2,
                          allow_private_media_urls=True, media_fetch_timeout_s=2)
    with run_server(config) as running:
        yield running


@pytest.mark.parametrize(("url", "fragment"), [
    ("http://169.254.1.1/clip.mp4", "link-local"),
    ("http://[fe80::1]/clip.mp4", "link-local"),
    ("http://169.254.169.254/latest/clip.mp4", "metadata"),
])
def test_link_local_refused_when_private_urls_are_allowed(private_server, url, fragment) -> None:
    parts = [{"type": "text", "text": "hi"}, {"type": "video_url", "video_url": {"url": url}}]
    assert fragment in _error(_chat(private_server, parts))


def test_decoding_budget_is_per_request(server) -> None:
    """Each clip alone fits the decoded-bytes cap; three in one request share it and break it."""
    clip = {"type": "video_url", "video_url": {"url": _video_url(VIDEO.read_bytes()), "num_segments": 2}}
    one = _chat(server, [{"type": "text", "text": "hi"}, clip])
    assert one.status_code == 200, one.text
    turns = [{"role": "user", "content": [{"type": "text", "text": "and this?"}, clip]},
             {"role": "assistant", "content": "a clip"}] * 2
    body = {"model": MODEL, "max_tokens": 2, "temperature": 0,
            "messages": [*turns, {"role": "user", "content": [{"type": "text", "text": "and this?"}, clip]}]}
    three = httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=120)
    assert three.status_code == 400 and f"limit of {DECODED_BYTES // 3} bytes" in _error(three)
