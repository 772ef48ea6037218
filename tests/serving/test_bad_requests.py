"""Bad requests against a real server: each gets a 4xx JSON error in OpenAI's shape, and the server answers
a normal request right after. Also: API key (401), body limit (413), concurrency limit (429), engine
queue limit (503), and the media safety rules end to end."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from internvl_runtime.errors import CheckpointError
from internvl_runtime.serving.app import load_async_engine
from internvl_runtime.serving.config import ServerConfig

from .helpers import MODEL, data_url, png_bytes, png_header_only, run_server

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
GOOD_PNG = png_bytes(32, 32)
NOISY = png_bytes(64, 64, noise=True)


@pytest.fixture(scope="module")
def media_dirs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("media")
    allowed, outside = root / "allowed", root / "outside"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "ok.png").write_bytes(GOOD_PNG)
    (outside / "secret.png").write_bytes(GOOD_PNG)
    (allowed / "escape.png").symlink_to(outside / "secret.png")
    (allowed / "sub").mkdir()
    return allowed, outside


@pytest.fixture(scope="module")
def server(tiny_1b, media_dirs):
    allowed, _ = media_dirs
    config = ServerConfig(model=str(tiny_1b), api_key=KEY, max_body_bytes=2**20, max_images_per_request=3,
                          max_model_len=2048, max_tiles_per_image=2, num_blocks=512, max_queue_len=1,
                          allowed_local_media_path=str(allowed), media_fetch_timeout_s=5)
    with run_server(config) as running:
        yield running


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=30) as client:
        yield client


def chat(content, **extra):
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 2}
    body.update(extra)
    return body


def image(url: str) -> list:
    return [{"type": "text", "text": "What is it?"}, {"type": "image_url", "image_url": {"url": url}}]


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    return error


def assert_still_serving(http: httpx.Client) -> None:
    response = http.post("/v1/chat/completions", json=chat("Hello", temperature=0, max_tokens=1))
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["role"] == "assistant"


LONG_TEXT = "hello " * 2500          # well over the 2048-token context

CASES: list[tuple[str, object, int, str | None]] = [
    # (id, body (dict -> JSON, bytes -> raw), expected status, expected param)
    ("malformed-json", b'{"model": "tiny-1B", "messages": [', 400, None),
    ("not-json-at-all", b"hello", 400, None),
    ("json-array", b"[]", 400, None),
    ("json-string", b'"hi"', 400, None),
    ("empty-body", b"", 400, None),
    ("missing-model", {"messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
    ("missing-messages", {"model": MODEL}, 400, "messages"),
    ("messages-not-a-list", {"model": MODEL, "messages": {"role": "user", "content": "hi"}}, 400, "messages"),
    ("empty-messages", {"model": MODEL, "messages": []}, 400, "messages"),
    ("unknown-role", {"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role"),
    ("function-role", {"model": MODEL, "messages": [{"role": "function", "content": "hi"}]}, 400, "messages.0.role"),
    ("content-wrong-type", chat(42), 400, None),
    ("unknown-part-type", chat([{"type": "audio", "audio": "x"}]), 400, None),
    ("image-url-missing", chat([{"type": "image_url", "image_url": {}}]), 400, None),
    ("model-wrong-type", {"model": 7, "messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
    ("unknown-model", {"model": "gpt-17", "messages": [{"role": "user", "content": "hi"}]}, 404, None),
    ("negative-max-tokens", chat("hi", max_tokens=-5), 400, "max_tokens"),
    ("zero-max-tokens", chat("hi", max_tokens=0), 400, "max_tokens"),
    ("string-max-tokens", chat("hi", max_tokens="5"), 400, "max_tokens"),
    ("float-max-tokens", chat("hi", max_tokens=2.5), 400, "max_tokens"),
    ("temperature-too-high", chat("hi", temperature=3.5), 400, "temperature"),
    ("temperature-negative", chat("hi", temperature=-0.1), 400, "temperature"),
    ("top-p-zero", chat("hi", top_p=0), 400, "top_p"),
    ("top-p-over-one", chat("hi", top_p=1.5), 400, "top_p"),
    ("n-zero", chat("hi", n=0), 400, "n"),
    ("n-too-large", chat("hi", n=100), 400, None),
    ("stream-not-bool", chat("hi", stream="yes"), 400, "stream"),
    ("known-field-wrong-type", chat("hi", ignore_eos="yes"), 400, "ignore_eos"),
    ("negative-seed", chat("hi", seed=-1), 400, "seed"),
    ("top-logprobs-without-logprobs", chat("hi", top_logprobs=2), 400, None),
    ("top-logprobs-too-many", chat("hi", logprobs=True, top_logprobs=50), 400, "top_logprobs"),
    ("empty-stop-string", chat("hi", stop=[""]), 400, None),
    ("stream-options-wrong-type", chat("hi", stream=True, stream_options={"include_usage": "yes"}), 400,
     "stream_options.include_usage"),
    ("presence-penalty-out-of-range", chat("hi", presence_penalty=3.0), 400, "presence_penalty"),
    ("min-tokens-over-max", chat("hi", max_tokens=2, min_tokens=5), 400, None),
    ("last-message-from-assistant", {"model": MODEL, "messages": [{"role": "user", "content": "hi"},
                                                                 {"role": "assistant", "content": "yo"}]}, 400, None),
    ("image-in-system-message", {"model": MODEL, "messages": [
        {"role": "system", "content": image(data_url(GOOD_PNG))}, {"role": "user", "content": "hi"}]}, 400, None),
    ("image-placeholder-without-image", chat("look: <image>"), 400, None),
    ("bad-base64", chat(image("data:image/png;base64,@@@not-base64@@@")), 400, None),
    ("data-url-not-an-image", chat(image("data:text/plain;base64,aGVsbG8gd29ybGQ=")), 400, None),
    ("data-url-image-type-but-text", chat(image(data_url(b"this is not a png at all"))), 400, None),
    ("data-url-not-base64", chat(image("data:image/png,rawbytes")), 400, None),
    ("truncated-png", chat(image(data_url(NOISY[: len(NOISY) // 2]))), 400, None),
    ("png-declaring-50000x50000", chat(image(data_url(png_header_only(50000, 50000)))), 400, None),
    ("png-declaring-10000x10000", chat(image(data_url(png_header_only(10000, 10000)))), 400, None),
    ("too-many-images", chat([*image(data_url(GOOD_PNG)), *image(data_url(GOOD_PNG))[1:] * 3]), 400, None),
    ("too-many-tiles", chat(image(data_url(GOOD_PNG)), max_dynamic_patch=12), 400, None),
    ("prompt-over-context", chat(LONG_TEXT), 400, None),
    ("prompt-plus-max-tokens-over-context", chat("hi", max_tokens=2040), 400, None),
    ("url-to-loopback", chat(image("http://127.0.0.1:9/cat.png")), 400, None),
    ("url-to-localhost-name", chat(image("http://localhost:9/cat.png")), 400, None),
    ("url-to-metadata", chat(image("http://169.254.169.254/latest/meta-data/")), 400, None),
    ("url-to-private-range", chat(image("http://10.0.0.1/cat.png")), 400, None),
    ("url-to-ipv6-loopback", chat(image("http://[::1]:9/cat.png")), 400, None),
    ("url-decimal-loopback", chat(image("http://2130706433:9/cat.png")), 400, None),
    ("url-with-credentials", chat(image("http://user:pw@example.invalid/cat.png")), 400, None),
    ("url-unsupported-scheme", chat(image("ftp://example.com/cat.png")), 400, None),
    ("local-file-outside", chat(image("file:///etc/passwd")), 400, None),
    ("local-path-dotdot", chat(image("../outside/secret.png")), 400, None),
    ("local-symlink-escape", chat(image("escape.png")), 400, None),
    ("local-directory", chat(image("sub")), 400, None),
    ("local-missing-file", chat(image("nope.png")), 400, None),
    ("completions-empty-prompt", {"model": MODEL, "prompt": ""}, 400, None),
    ("completions-prompt-wrong-type", {"model": MODEL, "prompt": 12}, 400, None),
]


@pytest.mark.parametrize("body, status, param", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_request(http, body, status, param, request):
    path = "/v1/completions" if request.node.callspec.id.startswith("completions") else "/v1/chat/completions"
    if isinstance(body, bytes):
        response = http.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        response = http.post(path, json=body)
    error = assert_openai_error(response, status)
    if param is not None:
        assert error["param"] == param, error
    if status == 404:
        assert error["code"] == "model_not_found"
    assert_still_serving(http)


def test_at_least_thirty_cases():
    assert len(CASES) >= 30


def test_error_messages_say_what_is_wrong(http):
    error = assert_openai_error(http.post("/v1/chat/completions", json=chat(image("http://169.254.169.254/x"))), 400)
    assert "metadata" in error["message"]
    error = assert_openai_error(http.post("/v1/chat/completions", json=chat(image("http://127.0.0.1:9/x"))), 400)
    assert "loopback" in error["message"]
    error = assert_openai_error(http.post("/v1/chat/completions", json=chat(LONG_TEXT)), 400)
    assert error["code"] == "context_length_exceeded"
    error = assert_openai_error(http.post("/v1/chat/completions", json=chat("hi", temperature=9)), 400)
    assert "temperature" in error["message"]


def test_local_file_inside_allowed_folder_works(http, media_dirs):
    allowed, _ = media_dirs
    for url in ("ok.png", str(allowed / "ok.png"), (allowed / "ok.png").as_uri()):
        response = http.post("/v1/chat/completions", json=chat(image(url), max_dynamic_patch=1))
        assert response.status_code == 200, (url, response.text)


def test_api_key(server):
    body = chat("hi")
    with httpx.Client(base_url=server.base_url, timeout=30) as anonymous:
        error = assert_openai_error(anonymous.post("/v1/chat/completions", json=body), 401)
        assert error["code"] == "invalid_api_key"
        assert_openai_error(anonymous.post("/v1/chat/completions", json=body,
                                           headers={"Authorization": "Bearer wrong"}), 401)
        assert_openai_error(anonymous.get("/v1/models"), 401)
        assert_openai_error(anonymous.get("/metrics"), 401)
        assert anonymous.get("/health").status_code == 200          # open: load balancers probe it
        assert anonymous.get("/").status_code == 200                # the page asks for the key itself
        assert anonymous.get("/v1/models", headers=AUTH).status_code == 200


def test_body_over_the_limit(http):
    big = chat("x" * (2 * 2**20))
    error = assert_openai_error(http.post("/v1/chat/completions", json=big), 413)
    assert error["code"] == "request_too_large"
    assert_still_serving(http)


def test_body_over_the_limit_without_content_length(http):
    def chunks():
        payload = json.dumps(chat("y" * (3 * 2**20))).encode()
        for i in range(0, len(payload), 65536):
            yield payload[i:i + 65536]

    response = http.post("/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert_openai_error(response, 413)
    assert_still_serving(http)


def test_unknown_route_and_method(http):
    assert_openai_error(http.get("/v1/nothing-here"), 404)
    assert_openai_error(http.get("/v1/chat/completions"), 405)


def _open_long_stream(client: httpx.Client):
    body = chat("Write forever.", max_tokens=1500, min_tokens=1500, temperature=0, stream=True)
    context = client.stream("POST", "/v1/chat/completions", json=body)
    response = context.__enter__()
    assert response.status_code == 200
    lines = response.iter_lines()
    for line in lines:               # wait until it is in the engine and generating
        if '"content"' in line and '"role"' not in line:   # a token, past the opening role chunk
            break
    return context, lines            # keep the line iterator alive: dropping it closes the response


def test_engine_queue_full_is_503(server, http):
    with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=30) as holder:
        stream, _lines = _open_long_stream(holder)      # max_queue_len=1: the engine is now full
        try:
            error = assert_openai_error(http.post("/v1/chat/completions", json=chat("hi")), 503)
            assert error["code"] == "engine_overloaded"
        finally:
            stream.__exit__(None, None, None)
    _wait_until_serving(http)


def test_concurrency_limit_is_429(tiny_1b):
    config = ServerConfig(model=str(tiny_1b), max_concurrent_requests=1, max_model_len=2048, num_blocks=512)
    with run_server(config) as limited, httpx.Client(base_url=limited.base_url, timeout=30) as client:
        with httpx.Client(base_url=limited.base_url, timeout=30) as holder:
            stream, _lines = _open_long_stream(holder)
            try:
                response = client.post("/v1/chat/completions", json=chat("hi"))
                error = assert_openai_error(response, 429)
                assert error["type"] == "rate_limit_error"
                assert response.headers["retry-after"] == "1"
            finally:
                stream.__exit__(None, None, None)
        _wait_until_serving(client)


def _wait_until_serving(client: httpx.Client) -> None:
    """After a stream is dropped its slot frees within moments; then a normal request succeeds."""
    deadline = time.monotonic() + 20
    while True:
        response = client.post("/v1/chat/completions", json=chat("Hello", temperature=0, max_tokens=1))
        if response.status_code == 200:
            return
        assert response.status_code in (429, 503) and time.monotonic() < deadline, response.text
        time.sleep(0.05)


def test_health_and_requests_while_loading(tiny_1b):
    config = ServerConfig(model=str(tiny_1b), max_model_len=2048, num_blocks=256)
    release = threading.Event()

    def slow_loader():
        release.wait(30)
        return load_async_engine(config)

    with run_server(config, loader=slow_loader, wait_ready=False) as server, \
            httpx.Client(base_url=server.base_url, timeout=30) as client:
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "loading"
        error = assert_openai_error(client.post("/v1/chat/completions", json=chat("hi")), 503)
        assert error["code"] == "model_not_ready"
        assert client.get("/").status_code == 200             # the page can say "loading" meanwhile
        release.set()
        deadline = time.monotonic() + 30
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert client.post("/v1/chat/completions", json=chat("hi")).status_code == 200


def test_health_when_loading_failed(tiny_1b):
    config = ServerConfig(model=str(tiny_1b))

    def broken_loader():
        raise CheckpointError("no weights in this folder")

    with run_server(config, loader=broken_loader, wait_ready=False) as server, \
            httpx.Client(base_url=server.base_url, timeout=30) as client:
        deadline = time.monotonic() + 10
        while client.get("/health").json()["status"] != "error":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert client.get("/health").status_code == 503
        assert "no weights" in client.get("/health").json()["error"]
        error = assert_openai_error(client.post("/v1/chat/completions", json=chat("hi")), 503)
        assert "failed to load" in error["message"]
