"""The HTTP boundary: what every request must pass before a route sees it, and how long a client may take.

Two pieces, one per layer:

- ``HTTPGuard``, an ASGI middleware in front of every route. In this order:

  1. **Host** (400): the Host header must be an IP address, ``localhost``, the name the server was bound to,
     or a name in ``allowed_hosts`` (``*`` allows any). DNS rebinding makes a web page's own name point at
     127.0.0.1, so the browser sends ``Host: evil.example`` to the loopback server and lets the page read the
     answer; an IP address in Host is only ever sent by a page that came from that address, so addresses
     are always fine and names must be listed.
  2. **CORS**, only when ``allowed_origins`` is set: preflights from those origins are answered (before the
     API key check: browsers send preflights without credentials), and their responses carry
     ``Access-Control-Allow-Origin``. Otherwise no CORS header is ever sent, and browsers keep pages from
     other sites from reading answers.
  3. **API key** (401) on ``/v1/*``, ``/metrics``, ``/tokenize`` and ``/detokenize``, before a byte of the body is read.
  4. **JSON only** (415) on POST/PUT/PATCH: a page can send ``text/plain`` or a form to any address without
     a CORS preflight; ``application/json`` always needs one.
  5. **Body size** (413): a declared ``Content-Length`` over ``max_body_bytes`` is refused without reading.
  6. Then the routes, with ``receive`` wrapped: the body counts against the limit as it is read (413), and
     must be complete ``body_timeout_s`` after its head arrived (408). Nothing is buffered here; a route
     that never reads the body (an unknown path) never makes the server read it. A response sent before
     the body was read whole says ``Connection: close``, so nobody waits for the rest.

- ``DeadlineH11Protocol``, uvicorn's h11 protocol with a deadline on each request head: a connection whose
  request line and headers are not complete ``header_timeout_s`` after it opened (or after its previous
  response) is closed, with a 408 if part of a head had come. uvicorn has no such timeout of its own, and
  a client sending a header byte a second would otherwise hold its connection forever. uvicorn's
  ``limit_concurrency`` caps the open connections (503 beyond).

``error_response`` is the one place an exception becomes an HTTP response; it logs one line per 4xx with the
status and the reason sent to the client (never the request body).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import time
from collections import Counter
from typing import Any

import h11
from fastapi.responses import JSONResponse
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..errors import HostNotAllowed, InternVLError, PayloadTooLarge, RequestTimeout, Unauthorized, UnsupportedMediaType
from .config import ServerConfig, host_name
from .protocol import error_payload

logger = logging.getLogger(__name__)

_PROTECTED_PREFIXES = ("/v1/", "/metrics", "/tokenize", "/detokenize")
_BODY_METHODS = ("POST", "PUT", "PATCH")


_LOGGED_REASON_CHARS = 500


def error_response(error: BaseException, *, where: str = "") -> JSONResponse:
    """The JSON error response of any exception (the one place errors become HTTP). ``where``: the request's
    method and path, for the log line a 4xx gets (its status and the message the client is sent)."""
    status, payload = error_payload(error)
    if status >= 500 and not isinstance(error, InternVLError):
        logger.error("internal error: %r", error, exc_info=error)
    elif 400 <= status < 500:
        reason = " ".join(str(payload["error"]["message"]).split())      # one line, whatever the message holds
        if len(reason) > _LOGGED_REASON_CHARS:
            reason = reason[:_LOGGED_REASON_CHARS] + "..."
        logger.info("%s%d %s: %s", f"{where} -> " if where else "", status, type(error).__name__, reason)
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    if status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    return JSONResponse(payload, status_code=status, headers=headers)


def _where(scope: Scope) -> str:
    """``METHOD /path`` of a request (for log lines)."""
    return f"{scope.get('method', '')} {scope.get('path', '')}"


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers") or ():
        if key == name:
            return bytes(value)
    return None


class HostPolicy:
    """Which Host headers the server answers: IP addresses, ``localhost``, the bound name, ``allowed_hosts``.

    Example::

        policy = HostPolicy(ServerConfig(host="0.0.0.0", allowed_hosts=["chat.example.com"]))
        policy.allows("192.168.1.20:23333")   # True: an address
        policy.allows("chat.example.com")     # True: listed
        policy.allows("evil.example")         # False
    """

    def __init__(self, config: ServerConfig) -> None:
        self.any = "*" in config.allowed_hosts
        self.names = frozenset({"localhost", host_name(config.host), *config.allowed_hosts}) - {""}

    def allows(self, host: str) -> bool:
        name = host_name(host)
        if self.any or name in self.names:
            return True
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return True

    def refusal(self, raw: bytes | None) -> HostNotAllowed | None:
        """The error for a request with Host ``raw`` (None: no Host header, as HTTP/1.0 clients; allowed)."""
        if raw is None:
            return None
        host = raw.decode("latin-1")
        if self.allows(host):
            return None
        name = host_name(host) or host
        return HostNotAllowed(f"Host {host!r} is not allowed: this server answers requests addressed to an IP "
                              f"address, localhost or a name given with --allowed-hosts; to serve it as {name!r}, "
                              f"start it with --allowed-hosts {name} (this check stops DNS-rebinding attacks "
                              "from web pages)")


class _Body:
    """One request's body as the routes read it: counted against the limit, on a deadline, never buffered."""

    def __init__(self, receive: Receive, scope: Scope, *, limit: int, timeout_s: float) -> None:
        self._receive = receive
        length = _header(scope, b"content-length")
        self.declared = int(length) if length is not None and length.isdigit() else None
        self.pending = bool(self.declared) or _header(scope, b"transfer-encoding") is not None
        self.limit = limit
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s
        self.size = 0

    async def receive(self) -> Message:
        if not self.pending:               # read whole (or none): later calls wait for a disconnect
            return await self._receive()
        try:
            message = await asyncio.wait_for(self._receive(), max(0.0, self.deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise RequestTimeout(f"the request body did not arrive within {self.timeout_s:g} s "
                                 "(--body-timeout-s)") from None
        if message["type"] != "http.request":
            self.pending = False           # the client left
            return message
        self.size += len(message.get("body", b""))
        if self.size > self.limit:
            raise PayloadTooLarge(f"the request body is more than {self.limit} bytes, the limit "
                                  "(--max-body-bytes)")
        if not message.get("more_body", False):
            self.pending = False
        return message


class HTTPGuard:
    """ASGI middleware: Host (400), CORS, API key (401), JSON only (415), body size (413) and body deadline
    (408), response counting. See the module docstring for the order and the reasons."""

    def __init__(self, app: ASGIApp, *, config: ServerConfig, counts: Counter[int]) -> None:
        self.app = app
        self.config = config
        self.counts = counts
        self.hosts = HostPolicy(config)
        self.keys = [f"Bearer {key}".encode() for key in config.api_key]     # any of them is accepted
        self.inner: ASGIApp = self._checked
        if config.allowed_origins:
            self.inner = CORSMiddleware(self._checked, allow_origins=config.allowed_origins,
                                        allow_methods=("GET", "POST", "OPTIONS"), allow_headers=("*",),
                                        max_age=600)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body = _Body(receive, scope, limit=self.config.max_body_bytes, timeout_s=self.config.body_timeout_s)

        async def guarded_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.counts[int(message["status"])] += 1
                if body.pending:           # answered before the body came: do not wait for the rest
                    message = {**message, "headers": [*message.get("headers", ()), (b"connection", b"close")]}
            await send(message)

        refusal = self.hosts.refusal(_header(scope, b"host"))
        if refusal is not None:
            await error_response(refusal, where=_where(scope))(scope, body.receive, guarded_send)
            return
        await self.inner(scope, body.receive, guarded_send)

    async def _checked(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = self._refusal(scope)
        if refusal is not None:
            await error_response(refusal, where=_where(scope))(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _refusal(self, scope: Scope) -> InternVLError | None:
        path = scope.get("path", "")
        if self.keys and (path.startswith(_PROTECTED_PREFIXES) or path == "/v1"):
            given = _header(scope, b"authorization") or b""
            # every key compared (no early exit): the time taken says nothing about which key is close
            matches = [hmac.compare_digest(given, key) for key in self.keys]
            if not any(matches):
                return Unauthorized("missing API key: send 'Authorization: Bearer KEY'" if not given
                                    else "wrong API key")
        if scope.get("method") in _BODY_METHODS:
            content_type = (_header(scope, b"content-type") or b"").decode("latin-1")
            if content_type.partition(";")[0].strip().lower() != "application/json":
                sent = f"Content-Type {content_type!r}" if content_type else "no Content-Type"
                return UnsupportedMediaType(f"request bodies must be JSON sent with 'Content-Type: application/json'; "
                                            f"this request has {sent}")
        declared = _header(scope, b"content-length")
        limit = self.config.max_body_bytes
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return PayloadTooLarge(f"the request body is {int(declared)} bytes; the limit is {limit} bytes "
                                   "(--max-body-bytes)")
        return None


class DeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, with a deadline (``header_timeout_s``, set by ``deadline_protocol``) on each
    request head, counted from the connection's opening or its previous response."""

    header_timeout_s: float = 20.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # as uvicorn
        super().connection_made(transport)
        self._watch_head()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_deadline()
        super().connection_lost(exc)

    def _watch_head(self) -> None:
        """Run the deadline while h11 waits for a request head; stop it once the head is in."""
        if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
            self._stop_head_deadline()
        elif self._head_deadline is None:
            self._head_deadline = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _stop_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
            return
        partial, _ = self.conn.trailing_data
        if partial:           # part of a head came: say why (an idle keep-alive connection just closes)
            client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
            logger.info("closed the connection of %s: its request head took more than %g s", client,
                        self.header_timeout_s)
            _, payload = error_payload(RequestTimeout(
                f"the request head did not arrive within {self.header_timeout_s:g} s (--header-timeout-s)"))
            body = json.dumps(payload).encode()
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                 b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        self.transport.close()


def deadline_protocol(header_timeout_s: float) -> type[DeadlineH11Protocol]:
    """``DeadlineH11Protocol`` with this head deadline (uvicorn builds protocols from a class)."""
    timeout_s = header_timeout_s

    class Protocol(DeadlineH11Protocol):
        header_timeout_s = timeout_s

    return Protocol
