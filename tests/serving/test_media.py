"""MediaFetcher and decode_image: address rules, redirects re-checked, byte and time limits, local-folder
confinement, data URLs, and image decoding limits. HTTP tests use a local http.server on 127.0.0.1 only."""

from __future__ import annotations

import asyncio
import base64
import io
import ipaddress
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from internvl_runtime.errors import ImageDecodeError, InvalidRequest
from internvl_runtime.serving.config import ServerConfig
from internvl_runtime.serving.media import (
    VIDEO_FRAME_PIXELS,
    MediaFetcher,
    MediaFetchError,
    MediaNotAllowed,
    decode_image,
    decode_video,
    refused_address_reason,
)

from .helpers import png_bytes, png_header_only

PNG = png_bytes(20, 10)
LOCAL = ipaddress.ip_address("127.0.0.1")


def run(coroutine):
    return asyncio.run(coroutine)


# ---------------------------------------------------------------------------------------------------
# Address rules
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("address, reason", [
    ("127.0.0.1", "loopback"), ("127.8.9.10", "loopback"), ("::1", "loopback"),
    ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("192.168.1.1", "private"), ("fd12::1", "private"),
    ("169.254.169.254", "metadata"), ("169.254.170.2", "metadata"), ("fd00:ec2::254", "metadata"),
    ("100.100.100.200", "metadata"), ("168.63.129.16", "metadata"),
    ("169.254.1.1", "link-local"), ("fe80::1", "link-local"),
    ("0.0.0.0", "unspecified"), ("::", "unspecified"), ("224.0.0.1", "multicast"), ("ff02::1", "multicast"),
    ("100.64.0.1", "not a public address"), ("240.0.0.1", "reserved"),
    ("::ffff:127.0.0.1", "loopback"), ("::ffff:169.254.169.254", "metadata"), ("2002:7f00:1::", "loopback"),
])
def test_refused_addresses(address, reason):
    got = refused_address_reason(ipaddress.ip_address(address))
    assert got is not None and reason in got, got


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2001:4860:4860::8888", "::ffff:8.8.8.8"])
def test_public_addresses_allowed(address):
    assert refused_address_reason(ipaddress.ip_address(address)) is None


def test_allow_private_still_refuses_metadata():
    assert refused_address_reason(ipaddress.ip_address("10.0.0.1"), allow_private=True) is None
    assert refused_address_reason(ipaddress.ip_address("127.0.0.1"), allow_private=True) is None
    assert "metadata" in refused_address_reason(ipaddress.ip_address("169.254.169.254"), allow_private=True)


# Link-local addresses (where metadata services live) in every form: direct, IPv4-mapped, 6to4, NAT64.
LINK_LOCAL = ["169.254.1.1", "169.254.0.1", "169.254.255.254", "169.254.170.3", "fe80::1", "fe80::a9fe:a9fe",
              "::ffff:169.254.1.1", "2002:a9fe:101::", "64:ff9b::a9fe:101"]
METADATA = ["169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200", "168.63.129.16",
            "::ffff:169.254.169.254", "2002:a9fe:a9fe::", "64:ff9b::a9fe:a9fe"]


@pytest.mark.parametrize("address", LINK_LOCAL)
def test_allow_private_still_refuses_link_local(address):
    reason = refused_address_reason(ipaddress.ip_address(address), allow_private=True)
    assert reason is not None and "link-local" in reason


@pytest.mark.parametrize("address", LINK_LOCAL)
def test_link_local_allowed_by_its_own_flag(address):
    ip = ipaddress.ip_address(address)
    assert refused_address_reason(ip, allow_link_local=True, allow_private=True) is None
    if ip.version == 4 or ip.is_link_local:
        assert refused_address_reason(ip, allow_link_local=True) is None


@pytest.mark.parametrize("address", METADATA)
def test_metadata_refused_whatever_the_flags(address):
    for private in (False, True):
        for link_local in (False, True):
            reason = refused_address_reason(ipaddress.ip_address(address), allow_private=private,
                                            allow_link_local=link_local)
            assert reason is not None and "metadata" in reason, (private, link_local, reason)


def test_link_local_policy_comes_from_the_server_config():
    async def resolver(host, port):
        return {"ll.example.test": ["169.254.1.1"], "ll6.example.test": ["fe80::1"],
                "meta.example.test": ["169.254.169.254"], "private.example.test": ["10.1.2.3"]}[host]

    def fetcher(**flags):
        return MediaFetcher.from_config(ServerConfig(**flags), resolver=resolver)

    private = fetcher(allow_private_media_urls=True)
    assert run(private.check_url("http://private.example.test/a.png"))[1] == "10.1.2.3"
    for host in ("ll.example.test", "ll6.example.test"):
        with pytest.raises(MediaNotAllowed, match=r"link-local.*--allow-link-local-media-urls"):
            run(private.check_url(f"http://{host}/a.png"))
    link_local = fetcher(allow_link_local_media_urls=True)
    assert run(link_local.check_url("http://ll.example.test/a.png"))[1] == "169.254.1.1"
    assert run(link_local.check_url("http://ll6.example.test/a.png"))[1] == "fe80::1"
    with pytest.raises(MediaNotAllowed, match=r"private.*--allow-private-media-urls"):
        run(link_local.check_url("http://private.example.test/a.png"))
    both = fetcher(allow_private_media_urls=True, allow_link_local_media_urls=True)
    with pytest.raises(MediaNotAllowed, match=r"metadata.*no setting allows"):
        run(both.check_url("http://meta.example.test/a.png"))


def test_media_url_flags_say_what_they_allow():
    from internvl_runtime.cli import build_parser

    options = {f.name: f for f in ServerConfig.cli_fields()}
    private_help = options["allow_private_media_urls"].metadata["help"]
    assert "link-local and cloud metadata addresses stay refused" in private_help
    assert "169.254.0.0/16" in options["allow_link_local_media_urls"].metadata["help"]
    assert ServerConfig().allow_link_local_media_urls is False
    serve = build_parser().parse_args(["serve", "model", "--allow-link-local-media-urls"])
    assert serve.allow_link_local_media_urls is True


# ---------------------------------------------------------------------------------------------------
# data: URLs
# ---------------------------------------------------------------------------------------------------


def data(payload: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(payload).decode()


def test_data_url_ok():
    assert run(MediaFetcher().fetch(data(PNG))) == PNG
    wrapped = data(PNG)[:40] + "\n" + data(PNG)[40:]          # line-wrapped base64 is accepted
    assert run(MediaFetcher().fetch(wrapped)) == PNG


@pytest.mark.parametrize("url, words", [
    ("data:image/png;base64,%%%%", "base64"),
    ("data:image/png;base64,QUJD=QUJD", "base64"),
    ("data:text/plain;base64,aGVsbG8=", "media type"),
    ("data:;base64,aGVsbG8=", "media type"),
    ("data:image/png,abc", "base64"),
    ("data:image/png;base64", "malformed"),
    ("data:image/png;base64,", "no data"),
])
def test_bad_data_urls(url, words):
    with pytest.raises(InvalidRequest, match=words):
        run(MediaFetcher().fetch(url))


def test_data_url_size_limit():
    with pytest.raises(InvalidRequest, match="limit"):
        run(MediaFetcher(max_image_bytes=100).fetch(data(b"x" * 101)))
    with pytest.raises(InvalidRequest, match="limit"):
        run(MediaFetcher(max_image_bytes=100).fetch(data(b"x" * 10_000)))


# ---------------------------------------------------------------------------------------------------
# Local files
# ---------------------------------------------------------------------------------------------------


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "ok.png").write_bytes(PNG)
    (allowed / "nested").mkdir()
    (allowed / "nested" / "deep.png").write_bytes(PNG)
    (outside / "secret.png").write_bytes(b"secret")
    (allowed / "escape.png").symlink_to(outside / "secret.png")
    (allowed / "escape-dir").symlink_to(outside)
    (allowed / "inner-link.png").symlink_to(allowed / "ok.png")
    return allowed, outside


def test_local_files_disabled_by_default(folders):
    allowed, _ = folders
    with pytest.raises(MediaNotAllowed, match="disabled"):
        run(MediaFetcher().fetch(str(allowed / "ok.png")))


def test_local_files_inside(folders):
    allowed, _ = folders
    fetcher = MediaFetcher(allowed_local_media_path=str(allowed))
    for source in ("ok.png", str(allowed / "ok.png"), (allowed / "ok.png").as_uri(), "nested/deep.png",
                   "nested/../ok.png", "inner-link.png", "file://localhost" + str(allowed / "ok.png")):
        assert run(fetcher.fetch(source)) == PNG, source


@pytest.mark.parametrize("source", ["../outside/secret.png", "nested/../../outside/secret.png", "/etc/passwd",
                                    "file:///etc/passwd", "escape.png", "escape-dir/secret.png",
                                    "file://otherhost/etc/passwd"])
def test_local_files_outside_refused(folders, source):
    allowed, _ = folders
    with pytest.raises(MediaNotAllowed):
        run(MediaFetcher(allowed_local_media_path=str(allowed)).fetch(source))


def test_local_non_files(folders):
    allowed, _ = folders
    fetcher = MediaFetcher(allowed_local_media_path=str(allowed), max_image_bytes=10)
    os.mkfifo(allowed / "fifo")
    with pytest.raises(MediaNotAllowed, match="regular file"):
        run(fetcher.fetch("fifo"))                       # must not block on the FIFO
    with pytest.raises(MediaNotAllowed, match="regular file"):
        run(fetcher.fetch("nested"))
    with pytest.raises(InvalidRequest, match="does not exist"):
        run(fetcher.fetch("missing.png"))
    with pytest.raises(InvalidRequest, match="limit"):
        run(fetcher.fetch("ok.png"))                     # larger than 10 bytes


# ---------------------------------------------------------------------------------------------------
# http(s), against a local server
# ---------------------------------------------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    hosts: ClassVar[list[str]] = []      # the Host headers seen, across the server's handler instances

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):  # http.server's naming
        Handler.hosts.append(self.headers.get("Host", ""))
        port = self.server.server_address[1]
        routes = {
            "/image.png": (200, {"Content-Type": "image/png"}, PNG),
            "/big.png": (200, {"Content-Type": "image/png"}, b"x" * 5000),
            "/redirect-ok": (302, {"Location": "/image.png"}, b""),
            "/redirect-absolute": (301, {"Location": f"http://127.0.0.1:{port}/image.png"}, b""),
            "/redirect-metadata": (302, {"Location": "http://169.254.169.254/latest/meta-data/"}, b""),
            "/redirect-private": (307, {"Location": "http://10.11.12.13/image.png"}, b""),
            "/redirect-other-loopback": (302, {"Location": f"http://127.0.0.2:{port}/image.png"}, b""),
            "/redirect-loop": (302, {"Location": "/redirect-loop"}, b""),
            "/redirect-no-location": (302, {}, b""),
            "/missing": (404, {}, b"nope"),
        }
        if self.path == "/chunked-big":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for _ in range(10):
                self.wfile.write(b"3e8\r\n" + b"y" * 1000 + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
            return
        if self.path == "/slow":
            time.sleep(1.5)
        status, headers, body = routes.get(self.path, (200, {}, PNG))
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # a client that gave up (timeout tests): expected
        pass


@pytest.fixture(scope="module")
def http_server():
    server = QuietServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(5)


def only_local(ip):
    """A policy that treats 127.0.0.1 as the only 'public' address (everything else refused)."""
    return None if ip == LOCAL else "not the test server"


def test_loopback_refused_by_default_without_connecting(http_server):
    Handler.hosts.clear()
    with pytest.raises(MediaNotAllowed, match="loopback"):
        run(MediaFetcher().fetch(http_server + "/image.png"))
    assert Handler.hosts == []                       # refused before any connection


def test_names_are_resolved_before_the_check(http_server):
    async def resolver(host, port):
        return ["127.0.0.1"]

    with pytest.raises(MediaNotAllowed, match="loopback"):
        run(MediaFetcher(resolver=resolver).fetch("http://images.example.test/cat.png"))


def test_one_bad_address_among_several_refuses(http_server):
    async def resolver(host, port):
        return ["8.8.8.8", "10.0.0.1"]

    with pytest.raises(MediaNotAllowed, match="private"):
        run(MediaFetcher(resolver=resolver).fetch("http://mixed.example.test/cat.png"))


def test_fetch_when_allowed(http_server):
    fetcher = MediaFetcher(allow_private_urls=True)
    assert run(fetcher.fetch(http_server + "/image.png")) == PNG
    assert run(fetcher.fetch(http_server + "/redirect-ok")) == PNG
    assert run(fetcher.fetch(http_server + "/redirect-absolute")) == PNG


def test_connects_to_the_checked_address_keeping_the_host_header(http_server):
    port = http_server.rsplit(":", 1)[1]
    resolved = []

    async def resolver(host, p):
        resolved.append(host)
        return ["127.0.0.1"]

    Handler.hosts.clear()
    fetcher = MediaFetcher(resolver=resolver, address_check=only_local)
    assert run(fetcher.fetch(f"http://images.example.test:{port}/image.png")) == PNG
    assert resolved == ["images.example.test"]
    assert Handler.hosts == [f"images.example.test:{port}"]


@pytest.mark.parametrize("path, words", [
    ("/redirect-metadata", "metadata"),
    ("/redirect-private", "10.11.12.13"),
    ("/redirect-other-loopback", "127.0.0.2"),
])
def test_redirects_are_rechecked(http_server, path, words):
    fetcher = MediaFetcher(address_check=only_local)
    assert run(fetcher.fetch(http_server + "/image.png")) == PNG      # the first URL passes the policy
    with pytest.raises(MediaNotAllowed, match=words):
        run(fetcher.fetch(http_server + path))


def test_redirect_metadata_refused_even_when_private_allowed(http_server):
    with pytest.raises(MediaNotAllowed, match="metadata"):
        run(MediaFetcher(allow_private_urls=True).fetch(http_server + "/redirect-metadata"))


def test_redirect_limits(http_server):
    fetcher = MediaFetcher(allow_private_urls=True, max_redirects=3)
    with pytest.raises(MediaFetchError, match="redirected more than 3"):
        run(fetcher.fetch(http_server + "/redirect-loop"))
    with pytest.raises(MediaFetchError, match="Location"):
        run(fetcher.fetch(http_server + "/redirect-no-location"))
    with pytest.raises(MediaFetchError, match="redirected more than 0"):
        run(MediaFetcher(allow_private_urls=True, max_redirects=0).fetch(http_server + "/redirect-ok"))


def test_http_errors_and_limits(http_server):
    fetcher = MediaFetcher(allow_private_urls=True, max_image_bytes=2000, timeout_s=0.5)
    with pytest.raises(MediaFetchError, match="404"):
        run(fetcher.fetch(http_server + "/missing"))
    with pytest.raises(InvalidRequest, match="limit"):
        run(fetcher.fetch(http_server + "/big.png"))            # Content-Length over the limit
    with pytest.raises(InvalidRequest, match="limit"):
        run(fetcher.fetch(http_server + "/chunked-big"))        # no Content-Length: cut while streaming
    started = time.monotonic()
    with pytest.raises(MediaFetchError, match="took more than"):
        run(fetcher.fetch(http_server + "/slow"))
    assert time.monotonic() - started < 1.4


def test_bad_urls():
    fetcher = MediaFetcher(allow_private_urls=True)
    with pytest.raises(InvalidRequest, match="scheme"):
        run(fetcher.fetch("gopher://example.com/x.png"))
    with pytest.raises(MediaNotAllowed, match="credentials"):
        run(fetcher.fetch("http://user:pass@127.0.0.1/x.png"))
    with pytest.raises(InvalidRequest):
        run(fetcher.fetch("http://[::1/x.png"))
    with pytest.raises(InvalidRequest, match="no host"):
        run(fetcher.fetch("http:///x.png"))


# ---------------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------------


def test_decode_image_ok():
    assert decode_image(PNG, max_pixels=1000).size == (20, 10)


def test_decode_image_pixel_limit_from_the_header():
    with pytest.raises(ImageDecodeError, match="too large"):
        decode_image(PNG, max_pixels=199)
    with pytest.raises(ImageDecodeError, match="too large"):
        decode_image(png_header_only(10_000, 10_000), max_pixels=25_000_000)
    with pytest.raises(ImageDecodeError, match="too large"):
        decode_image(png_header_only(50_000, 50_000), max_pixels=25_000_000)


def test_decode_image_bad_data():
    noisy = png_bytes(64, 64, noise=True)
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_image(noisy[: len(noisy) // 2], max_pixels=10**6)
    with pytest.raises(ImageDecodeError, match="not a recognised image"):
        decode_image(b"GIF89a? no, just text", max_pixels=10**6)


def _clip(width: int, height: int, frames: int) -> bytes:
    av = pytest.importorskip("av")
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for _ in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), 120, dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def test_decode_video_keeps_frames_small():
    frames = decode_video(_clip(2400, 1200, 2), num_segments=2, max_pixels=25_000_000, max_seconds=600,
                          max_decoded_bytes=10**9)
    assert len(frames) == 2
    for frame in frames:
        assert frame.width * frame.height <= VIDEO_FRAME_PIXELS and abs(frame.width / frame.height - 2) < 0.01


def test_video_frames_uses_the_server_limits():
    from internvl_runtime.errors import VideoDecodeError
    from internvl_runtime.serving.routes.chat import video_frames

    clip = _clip(64, 48, 10)
    assert len(video_frames(clip, 4, ServerConfig())) == 4
    with pytest.raises(VideoDecodeError, match="limit of 30000 bytes"):
        video_frames(clip, 4, ServerConfig(max_video_decoded_bytes=30_000))
    with pytest.raises(VideoDecodeError, match="the limit is 3000 pixels"):
        video_frames(clip, 4, ServerConfig(max_image_pixels=3000))
    with pytest.raises(VideoDecodeError, match=r"limit is 0\.5 s"):
        video_frames(clip, 4, ServerConfig(max_video_seconds=0.5))
