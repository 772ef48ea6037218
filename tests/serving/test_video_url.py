"""``video_url`` content parts: frames sampled as the official load_video, same media safety as images."""

from __future__ import annotations

import base64

import httpx
import pytest

from internvl_runtime.serving.config import ServerConfig

from .helpers import FIXTURES, MODEL, run_server

VIDEO = FIXTURES / "data" / "video.mp4"


def _video_url(data: bytes) -> str:
    return "data:video/mp4;base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def server(tiny_1b):
    config = ServerConfig(model=str(tiny_1b), max_model_len=4096, num_blocks=1024, max_video_frames=8,
                          max_num_seqs=4)
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
