"""Browser and slow-client safety against a real server on loopback (issue #13, items 6 and 7): the Host check
against DNS rebinding, JSON-only bodies, CORS off by default and on for listed origins, read deadlines on
request heads and bodies, bodies refused without being read, and the cap on open connections.

Raw sockets play the slow and hostile clients; h11 (uvicorn's own parser) reads their answers."""

from __future__ import annotations

import json
import select
import socket
import time
from urllib.parse import urlsplit

import h11
import httpx
import pytest

from internvl_runtime import cli
from internvl_runtime.errors import InvalidRequest
from internvl_runtime.serving.config import ServerConfig
from internvl_runtime.serving.http_guard import HostPolicy

from .helpers import MODEL, run_server

KEY = "safety-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.5
SLACK_S = 1.5          # a loaded test machine: the deadline plus this is "in time"
APP_ORIGIN = "http://app.example"


def chat_body(**extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 1, **extra}


@pytest.fixture(scope="module")
def server(tiny_1b):
    config = ServerConfig(model=str(tiny_1b), api_key=KEY, max_model_len=1024, num_blocks=128, max_body_bytes=2**20,
                          header_timeout_s=HEADER_TIMEOUT_S, body_timeout_s=BODY_TIMEOUT_S)
    with run_server(config) as running:
        yield running


@pytest.fixture(scope="module")
def cors_server(tiny_1b):
    config = ServerConfig(model=str(tiny_1b), api_key=KEY, max_model_len=1024, num_blocks=128,
                          allowed_origins=[APP_ORIGIN], allowed_hosts=["chat.example"])
    with run_server(config) as running:
        yield running


def port_of(server) -> int:
    return int(urlsplit(server.base_url).port)


def connect(server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port_of(server)), timeout=5)


def read_until_closed(sock: socket.socket, within_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took; fails if the
    connection is still open after ``within_s``."""
    start = time.monotonic()
    data = b""
    while True:
        remaining = within_s - (time.monotonic() - start)
        if remaining <= 0:
            raise AssertionError(f"the server kept the connection open for {within_s} s (got {data[:200]!r})")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return data, time.monotonic() - start
        data += chunk


def parse_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of the first HTTP response in ``data``."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    conn.receive_data(b"")
    response = conn.next_event()
    assert isinstance(response, h11.Response), (response, data[:200])
    body = b""
    while isinstance(event := conn.next_event(), h11.Data):
        body += event.data
    headers = {k.decode().lower(): v.decode() for k, v in response.headers}
    return response.status_code, headers, body


def assert_openai_error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error["message"]


def assert_serving(server) -> None:
    response = httpx.post(server.base_url + "/v1/chat/completions", json=chat_body(), headers=AUTH, timeout=30)
    assert response.status_code == 200, response.text


# ---------------------------------------------------------------------------------------------------
# Host check (DNS rebinding)
# ---------------------------------------------------------------------------------------------------


BAD_HOSTS = ["evil.example", "evil.example:{port}", "localhost.evil.example", "127.0.0.1.nip.io"]
GOOD_HOSTS = ["localhost:{port}", "127.0.0.1:{port}", "[::1]:{port}", "LOCALHOST", "10.1.2.3", "[fe80::1]:8080"]


def test_dns_rebinding_host_is_refused_and_good_hosts_are_served(server):
    port = port_of(server)
    for host in [h.format(port=port) for h in BAD_HOSTS]:
        with httpx.Client(base_url=server.base_url, headers={**AUTH, "Host": host}, timeout=30) as client:
            for path in ("/", "/health", "/v1/models"):
                message = assert_openai_error(client.get(path), 400)
                assert repr(host) in message and "--allowed-hosts" in message, message
            assert_openai_error(client.post("/v1/chat/completions", json=chat_body()), 400)
    for host in [h.format(port=port) for h in GOOD_HOSTS]:
        with httpx.Client(base_url=server.base_url, headers={**AUTH, "Host": host}, timeout=30) as client:
            assert client.get("/health").status_code == 200, host
            assert client.get("/").status_code == 200, host
            assert client.post("/v1/chat/completions", json=chat_body()).status_code == 200, host


def test_allowed_hosts_adds_names(server, cors_server):
    for running, status in ((cors_server, 200), (server, 400)):
        response = httpx.get(running.base_url + "/v1/models", headers={**AUTH, "Host": "chat.example:443"})
        assert response.status_code == status, response.text
    assert httpx.get(cors_server.base_url + "/v1/models", headers={**AUTH, "Host": "other.example"}).status_code == 400


def test_host_policy_when_bound_to_all_interfaces():
    policy = HostPolicy(ServerConfig(host="0.0.0.0"))
    for host in ("192.168.1.20:23333", "203.0.113.7", "[2001:db8::1]:80", "localhost:23333", "127.0.0.1"):
        assert policy.allows(host), host
    for host in ("myserver.lan", "myserver.lan:23333", "evil.example", "", "evil.example/x"):
        assert not policy.allows(host), host
    assert policy.refusal(None) is None                   # HTTP/1.0 without Host: no browser sends that
    named = HostPolicy(ServerConfig(host="0.0.0.0", allowed_hosts="myserver.lan, api.example.com:443"))
    assert named.allows("MyServer.LAN:23333") and named.allows("api.example.com.") and not named.allows("evil.example")
    assert HostPolicy(ServerConfig(allowed_hosts=["*"])).allows("anything.example")
    assert HostPolicy(ServerConfig(host="gpu-box.internal")).allows("gpu-box.internal:23333")


# ---------------------------------------------------------------------------------------------------
# JSON-only bodies
# ---------------------------------------------------------------------------------------------------


def test_text_plain_post_is_415_even_with_json_inside(server):
    body = json.dumps(chat_body()).encode()
    url = server.base_url + "/v1/chat/completions"
    response = httpx.post(url, content=body, headers={**AUTH, "Content-Type": "text/plain;charset=UTF-8"}, timeout=30)
    assert "text/plain" in assert_openai_error(response, 415)
    response = httpx.post(url, content=body, headers={**AUTH, "Content-Type": "Application/JSON; charset=utf-8"},
                          timeout=30)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("kind", ["urlencoded", "multipart", "none"])
def test_form_and_untyped_posts_are_415(server, kind):
    url = server.base_url + "/v1/chat/completions"
    if kind == "urlencoded":
        response = httpx.post(url, data={"model": MODEL}, headers=AUTH)
        expected = "application/x-www-form-urlencoded"
    elif kind == "multipart":
        response = httpx.post(url, files={"file": ("a.txt", b"hi")}, headers=AUTH)
        expected = "multipart/form-data"
    else:
        response = httpx.post(url, content=b'{"model": "tiny-1B"}', headers=AUTH)
        expected = "no Content-Type"
    assert expected in assert_openai_error(response, 415)


# ---------------------------------------------------------------------------------------------------
# CORS
# ---------------------------------------------------------------------------------------------------


def preflight(server, origin: str) -> httpx.Response:
    return httpx.options(server.base_url + "/v1/chat/completions", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})


def test_cors_off_by_default_on_for_listed_origins(server, cors_server):
    # Off: no Access-Control-* header on anything.
    response = httpx.get(server.base_url + "/v1/models", headers={**AUTH, "Origin": APP_ORIGIN})
    assert response.status_code == 200 and "access-control-allow-origin" not in response.headers
    response = preflight(server, APP_ORIGIN)
    assert response.status_code >= 400 and "access-control-allow-origin" not in response.headers

    # On: the listed origin's preflight passes without the API key, with the headers a browser needs.
    response = preflight(cors_server, APP_ORIGIN)
    assert response.status_code in (200, 204), response.text
    assert response.headers["access-control-allow-origin"] == APP_ORIGIN
    assert "POST" in response.headers["access-control-allow-methods"]
    allowed = response.headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed and "content-type" in allowed
    response = httpx.post(cors_server.base_url + "/v1/chat/completions", json=chat_body(),
                          headers={**AUTH, "Origin": APP_ORIGIN}, timeout=30)
    assert response.status_code == 200 and response.headers["access-control-allow-origin"] == APP_ORIGIN
    # The browser can read the 401 too, so a page can tell its user the key is wrong.
    response = httpx.get(cors_server.base_url + "/v1/models", headers={"Origin": APP_ORIGIN})
    assert response.status_code == 401 and response.headers["access-control-allow-origin"] == APP_ORIGIN

    # Another origin gets nothing.
    response = preflight(cors_server, "http://evil.example")
    assert response.status_code >= 400 and "access-control-allow-origin" not in response.headers
    response = httpx.get(cors_server.base_url + "/v1/models", headers={**AUTH, "Origin": "http://evil.example"})
    assert response.status_code == 200 and "access-control-allow-origin" not in response.headers


def test_config_checks_origins_and_hosts():
    assert ServerConfig(allowed_origins=["HTTP://App.Example:3000/"]).allowed_origins == ["http://app.example:3000"]
    for bad in ("app.example", "http://app.example/path", "ftp://app.example"):
        with pytest.raises(InvalidRequest, match="allowed_origins"):
            ServerConfig(allowed_origins=[bad])
    with pytest.raises(InvalidRequest, match="allowed_hosts"):
        ServerConfig(allowed_hosts=["https://chat.example/"])
    with pytest.raises(InvalidRequest, match="header_timeout_s"):
        ServerConfig(header_timeout_s=0)


def test_cli_list_flags_take_commas_and_repeats():
    args = cli.build_parser().parse_args(["serve", "--allowed-hosts", "a.example, b.example", "--allowed-hosts",
                                          "c.example", "--allowed-origins", APP_ORIGIN, "--max-connections", "7"])
    assert args.allowed_hosts == ["a.example", "b.example", "c.example"]
    assert args.allowed_origins == [APP_ORIGIN] and args.max_connections == 7
    assert cli.build_parser().parse_args(["serve"]).allowed_hosts == []


# ---------------------------------------------------------------------------------------------------
# Read deadlines
# ---------------------------------------------------------------------------------------------------


def test_slow_loris_head_is_cut_off_while_others_are_served(server):
    with connect(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        start = time.monotonic()
        data = b""
        served = False
        while time.monotonic() - start < HEADER_TIMEOUT_S + 2 * SLACK_S:
            try:
                sock.sendall(b"a")                 # one header byte at a time, never the end of the head
            except OSError:
                break
            if not served:
                assert httpx.get(server.base_url + "/health").status_code == 200
                served = True
            if select.select([sock], [], [], 0.25)[0]:
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                data += chunk
        elapsed = time.monotonic() - start
    assert served
    assert elapsed < HEADER_TIMEOUT_S + SLACK_S, f"the connection stayed open {elapsed:.1f} s"
    if data:                                           # the 408 may be lost to the reset of a still-writing client
        assert parse_response(data)[0] == 408
    assert_serving(server)


def test_idle_connection_is_closed_without_a_word(server):
    with connect(server) as sock:
        data, elapsed = read_until_closed(sock, HEADER_TIMEOUT_S + SLACK_S)
    assert data == b"" and elapsed >= HEADER_TIMEOUT_S * 0.9


def test_head_deadline_applies_to_each_request_on_a_connection(server):
    with connect(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        conn = h11.Connection(h11.CLIENT)
        conn.send(h11.Request(method="GET", target="/health", headers=[("Host", "127.0.0.1")]))
        conn.send(h11.EndOfMessage())
        while not isinstance(event := conn.next_event(), h11.EndOfMessage):
            if event is h11.NEED_DATA:
                conn.receive_data(sock.recv(65536))
            elif isinstance(event, h11.Response):
                assert event.status_code == 200
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")     # the second head never ends
        time.sleep(0.3)
        sock.sendall(b"X-Slow: a")
        data, _ = read_until_closed(sock, HEADER_TIMEOUT_S + SLACK_S)
    assert parse_response(data)[0] == 408


def test_slow_body_gets_408_and_the_connection_closes(server):
    body = b'{"model": "tiny-1B", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 1}'
    with connect(server) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + KEY.encode()
                     + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:10])
        start = time.monotonic()
        data = b""
        for byte in body[10:]:                     # a byte every 0.3 s: the whole body would take ~25 s
            if select.select([sock], [], [], 0.3)[0] or time.monotonic() - start > BODY_TIMEOUT_S + SLACK_S:
                break
            sock.sendall(bytes([byte]))
        data, _ = read_until_closed(sock, BODY_TIMEOUT_S + SLACK_S)
        elapsed = time.monotonic() - start
    status, headers, payload = parse_response(data)
    assert status == 408 and headers["connection"] == "close"
    assert b"--body-timeout-s" in payload
    assert elapsed < BODY_TIMEOUT_S + SLACK_S
    assert_serving(server)


# ---------------------------------------------------------------------------------------------------
# Bodies refused without being read
# ---------------------------------------------------------------------------------------------------


def refused_at_once(server, head: bytes, status: int) -> dict[str, str]:
    """Send only ``head`` (its body never comes): the answer and the close must come at once."""
    with connect(server) as sock:
        sock.sendall(head)
        data, elapsed = read_until_closed(sock, 1.0)       # well before the 1.5 s body deadline
    got, headers, _ = parse_response(data)
    assert got == status, data[:300]
    assert elapsed < 1.0 and headers["connection"] == "close"
    return headers


def test_huge_content_length_is_refused_without_reading(server):
    refused_at_once(server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
                    + KEY.encode() + b"\r\nContent-Type: application/json\r\nContent-Length: 1000000000000\r\n\r\n",
                    413)


def test_huge_content_length_on_an_unknown_path_is_refused_without_reading(server):
    refused_at_once(server, b"POST /nowhere HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 1000000000000\r\n\r\n", 413)


def test_unknown_path_never_reads_the_body(server):
    refused_at_once(server, b"POST /nowhere HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n", 404)
    refused_at_once(server, b"GET /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
                    + KEY.encode() + b"\r\nContent-Length: 1000\r\n\r\n{", 405)


def test_unauthenticated_upload_is_refused_before_its_body(server):
    headers = refused_at_once(server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                              b"Content-Type: application/json\r\nContent-Length: 1000000000000\r\n\r\n", 401)
    assert headers["www-authenticate"] == "Bearer"


# ---------------------------------------------------------------------------------------------------
# Connection cap
# ---------------------------------------------------------------------------------------------------


def test_open_connections_are_capped(tiny_1b):
    config = ServerConfig(model=str(tiny_1b), max_model_len=1024, num_blocks=64, max_connections=2,
                          header_timeout_s=30)
    with run_server(config) as running:
        idle = [connect(running) for _ in range(2)]
        try:
            deadline = time.monotonic() + 5
            while (status := httpx.get(running.base_url + "/health").status_code) != 503:
                assert status == 200 and time.monotonic() < deadline   # until the server has accepted both
                time.sleep(0.05)
        finally:
            for sock in idle:
                sock.close()
        deadline = time.monotonic() + 5
        while httpx.get(running.base_url + "/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
