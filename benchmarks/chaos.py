"""Chaos check of the OpenAI-compatible server (issue #13): clients that leave, bad inputs and scrapes, for minutes.

Starts ``python -m internvl_runtime serve`` as a subprocess on a free loopback port (127.0.0.1; nothing else is
ever contacted), so that the engine's death, the process's exit and its resident memory can be observed. Then:

1. asks each of ``--distinct`` greedy requests alone, one after the other (the reference answers);
2. for ``--minutes`` (or ``--seconds``), ``--concurrency`` clients loop over a seeded random mix of
   - streaming requests: ``--drop-share`` of them disconnect (before the first byte, after the first chunk, or
     after k chunks; half close the socket, half reset it), the others complete: greedy ones from the fixed
     prompts (compared with the reference) and sampled ones with random prompts;
   - bad inputs (malformed JSON, wrong model, bad image data URLs, oversize max_tokens, a form body, a body
     over the size limit), each of which must get a 4xx;
   - /metrics scrapes;
   while a monitor polls /health, the process and its memory every second. The first tenth of the time (5 to
   60 s) is a warm-up with the same mix: after it, drained and idle, resident memory (VmRSS of the server) is
   read, so that the allocator's high-water mark under load is not taken for a leak;
3. drains: requests in flight get ``--drain`` seconds, /metrics must then show 0 KV blocks in use; resident
   memory is read again (idle); the greedy requests are asked alone again.

Criteria: completed requests > 0; no unexpected errors (bad inputs answered with a 4xx are counted apart); no
engine death or restart (/health turning non-200, the process exiting, a 5xx saying the engine is loading or
dead); 0 KV blocks in use after the drain; resident-memory growth within ``--max-rss-growth-mib``; every
completed greedy answer (and the greedy requests asked alone after the run) equal to the answer alone. Exit
status 0 only when all are met.

Bounded: every client call has a timeout, each phase a budget, and the whole run a hard deadline (duration +
two drains + 180 s for start-up and the solo requests); the server is always stopped (SIGTERM, then
SIGKILL). A dead engine stops the load early instead of waiting out the duration.

    python benchmarks/chaos.py                                # 10 minutes, 64 clients, --demo model
    python benchmarks/chaos.py --seconds 60 --concurrency 32 --json chaos.json
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import random
import re
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
DROP_KINDS = ("before_first_byte", "after_first_chunk", "mid_stream")
BAD_INPUTS = ("malformed_json", "wrong_model", "bad_image_base64", "bad_image_bytes", "oversize_max_tokens",
              "wrong_content_type", "body_too_large")
MAX_BODY_BYTES = 256 * 1024          # the server's body limit in this check (413 above)
HARD_MARGIN_S = 180.0                # start-up and the two solo rounds, on top of duration + two drains
# a 5xx that says the engine is not there: it died (and maybe restarts) mid-run
ENGINE_DOWN = re.compile(rb"loading|engine.?dead|engine loop stopped", re.IGNORECASE)
WORDS = ("red", "circle", "river", "number", "engine", "quiet", "window", "seven", "garden", "signal", "paper",
         "orbit", "copper", "winter", "music", "ladder", "forest", "glass", "market", "storm")


# ---------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------


@dataclass
class Figures:
    """Everything the run measured; written as JSON by ``--json``."""

    host: dict[str, Any]
    settings: dict[str, Any]
    model: str = ""
    load_s: float = 0.0
    wall_s: float = 0.0
    stopped_early: str | None = None
    warmup_s: float = 0.0
    requests_started: int = 0
    completed: int = 0
    completed_greedy: int = 0
    completed_per_min: float = 0.0
    dropped: dict[str, int] = field(default_factory=lambda: {kind: 0 for kind in DROP_KINDS})
    dropped_by_reset: int = 0
    bad_inputs_4xx: dict[str, dict[str, int]] = field(default_factory=dict)   # name -> {status: count}
    metrics_scrapes: int = 0
    errors: dict[str, int] = field(default_factory=dict)                      # unexpected, by kind
    error_samples: list[str] = field(default_factory=list)
    engine_deaths: int = 0
    engine_restarts: int = 0
    engine_signals: list[str] = field(default_factory=list)
    server_exit_code: int | None = None
    server_log_tracebacks: int = 0
    server_log_tail: list[str] = field(default_factory=list)
    kv_blocks_total: float | None = None
    kv_blocks_in_use_peak: float | None = None
    kv_blocks_in_use_after_drain: float | None = None
    rss_start_mib: float | None = None
    rss_peak_mib: float | None = None
    rss_end_mib: float | None = None
    rss_growth_mib: float | None = None
    rss_timeline_mib: list[tuple[float, float]] = field(default_factory=list)   # (seconds since start, MiB)
    greedy_compared: int = 0
    greedy_mismatches: int = 0
    greedy_alone_after_run: int | None = None             # greedy requests asked alone again after the run
    greedy_alone_after_run_mismatches: int | None = None
    greedy_samples: list[str] = field(default_factory=list)
    criteria: dict[str, bool] = field(default_factory=dict)
    passed: bool = False

    @property
    def num_errors(self) -> int:
        return sum(self.errors.values())


def host_record() -> dict[str, Any]:
    """CPU model and flags, as every benchmark of the project records them."""
    from internvl_runtime.hardware import INTERESTING_FLAGS, cpu_flags, cpu_model

    flags = cpu_flags()
    return {"cpu_model": cpu_model(), "flags": [f for f in INTERESTING_FLAGS if f in flags],
            "avx512_bf16": "avx512_bf16" in flags, "avx2": "avx2" in flags, "cpus": os.cpu_count()}


# ---------------------------------------------------------------------------------------------------
# A raw HTTP/1.1 client: one connection per exchange, so a client can leave at any byte
# ---------------------------------------------------------------------------------------------------


@dataclass
class Drop:
    """Where a client leaves: ``kind`` in DROP_KINDS, after ``after`` SSE events; ``reset`` sends RST, not FIN."""

    kind: str
    after: int
    reset: bool


@dataclass
class Exchange:
    status: int | None = None
    body: bytes = b""           # non-streaming answers
    events: int = 0             # SSE data events read (``[DONE]`` excluded)
    text: str = ""
    finish_reason: str | None = None
    done: bool = False          # ``data: [DONE]`` seen
    stream_error: str | None = None
    dropped: str | None = None  # the drop kind, once the client left


def _request_bytes(port: int, method: str, path: str, body: bytes, content_type: str) -> bytes:
    head = (f"{method} {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\nAccept: */*\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode("ascii") + body


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    raw = await reader.readuntil(b"\r\n\r\n")
    lines = raw.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    return status, headers


async def _body_pieces(reader: asyncio.StreamReader, headers: dict[str, str]) -> AsyncIterator[bytes]:
    """The body as it arrives: chunked transfer encoding, Content-Length, or up to EOF."""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            line = await reader.readline()
            if not line:
                raise ConnectionError("the connection closed inside a chunked body")
            size = int(line.split(b";")[0].strip(), 16)
            if size == 0:
                await reader.readline()
                return
            data = await reader.readexactly(size)
            await reader.readexactly(2)
            yield data
    elif "content-length" in headers:
        yield await reader.readexactly(int(headers["content-length"]))
    else:
        yield await reader.read()


def _close(writer: asyncio.StreamWriter, reset: bool) -> None:
    """Leave: FIN after what is buffered, or RST (SO_LINGER 0) at once."""
    if reset:
        with contextlib.suppress(OSError):
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
    else:
        writer.close()


async def exchange(port: int, method: str, path: str, body: bytes = b"", *, content_type: str = "application/json",
                   drop: Drop | None = None) -> Exchange:
    """One request on a fresh connection; reads the answer (an SSE stream is parsed) unless ``drop`` leaves first.

    Raises what the connection raises (OSError, IncompleteReadError, ...); the caller puts a timeout around it."""
    reader, writer = await asyncio.open_connection(HOST, port)
    result = Exchange()
    try:
        writer.write(_request_bytes(port, method, path, body, content_type))
        # the server may answer (413) before it has read the whole body: read its answer
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        if drop is not None and drop.kind == "before_first_byte":
            result.dropped = drop.kind
            return result
        result.status, headers = await _read_head(reader)
        async with contextlib.aclosing(_body_pieces(reader, headers)) as pieces:
            if result.status != 200 or not headers.get("content-type", "").startswith("text/event-stream"):
                result.body = b"".join([piece async for piece in pieces])
                return result
            buffer = b""
            async for piece in pieces:
                buffer += piece
                while b"\n\n" in buffer:
                    event, buffer = buffer.split(b"\n\n", 1)
                    _sse_event(result, event)
                    if drop is not None and result.events >= drop.after and not result.done:
                        result.dropped = drop.kind
                        return result
        return result
    finally:
        _close(writer, reset=drop is not None and drop.reset and result.dropped is not None)


def _sse_event(result: Exchange, event: bytes) -> None:
    # split on "\n" only: str.splitlines() also splits on U+2028, U+0085 ..., which JSON strings may hold raw
    for line in event.decode("utf-8").split("\n"):
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            result.done = True
            continue
        result.events += 1
        payload = json.loads(data)
        if "error" in payload:
            result.stream_error = str(payload["error"].get("message", payload["error"]))[:200]
        for choice in payload.get("choices", []):
            result.text += choice.get("delta", {}).get("content") or choice.get("text") or ""
            if choice.get("finish_reason"):
                result.finish_reason = choice["finish_reason"]


def _metric(text: str, name: str) -> float | None:
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


def rss_mib(pid: int) -> float | None:
    """Resident memory of ``pid`` (VmRSS) in MiB; None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


# ---------------------------------------------------------------------------------------------------
# The server subprocess
# ---------------------------------------------------------------------------------------------------


class ServerProcess:
    """``python -m internvl_runtime serve`` on a free loopback port; its output goes to a temporary log."""

    def __init__(self, model: Path | None, *, concurrency: int, max_tokens: int) -> None:
        with socket.socket() as s:
            s.bind((HOST, 0))
            self.port = int(s.getsockname()[1])
        # KV blocks: a prompt with one image tile is ~450 tokens, plus the answer; 48 blocks of 16 per
        # sequence leave room, and a sequence per client means no request ever waits for blocks
        self.num_blocks = max(1024, 48 * concurrency)
        self.args = ["serve", str(model) if model else "--demo", "--port", str(self.port), "--host", HOST,
                     "--log-level", "warning", "--max-model-len", "2048", "--max-num-seqs", str(concurrency),
                     "--num-blocks", str(self.num_blocks), "--max-queue-len", str(max(256, 2 * concurrency)),
                     "--max-concurrent-requests", str(max(512, 4 * concurrency)),
                     "--max-body-bytes", str(MAX_BODY_BYTES), "--default-max-tokens", str(max_tokens)]
        # open for the server's lifetime: stop() closes and removes it
        self.log = tempfile.NamedTemporaryFile("w+b", prefix="internvl-chaos-", suffix=".log", delete=False)  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "internvl_runtime", *self.args], stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=subprocess.STDOUT)

    @property
    def exit_code(self) -> int | None:
        return self.proc.poll()

    def rss_mib(self) -> float | None:
        return None if self.exit_code is not None else rss_mib(self.proc.pid)

    def log_text(self) -> str:
        with open(self.log.name, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s; removes the log."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        with contextlib.suppress(OSError):
            os.unlink(self.log.name)


# ---------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------


def _png(color: tuple[int, int, int]) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), color).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class Chaos:
    def __init__(self, server: ServerProcess, figures: Figures, *, duration: float, concurrency: int,
                 drop_share: float, greedy_share: float, bad_share: float, scrape_share: float, distinct: int,
                 max_tokens: tuple[int, int], seed: int, request_timeout: float, drain: float) -> None:
        self.server = server
        self.port = server.port
        self.figures = figures
        self.duration = duration
        self.concurrency = concurrency
        self.drop_share, self.greedy_share = drop_share, greedy_share
        self.bad_share, self.scrape_share = bad_share, scrape_share
        self.distinct = distinct
        self.max_tokens = max_tokens
        self.seed = seed
        self.request_timeout = request_timeout
        self.drain = drain
        # the first tenth of the run (5..60 s) warms up with the same mix; memory is read after it
        self.warmup = figures.warmup_s = min(60.0, max(5.0, 0.1 * duration), 0.5 * duration)
        self.stop = asyncio.Event()        # the whole run: set when the engine is gone
        self.phase_end = asyncio.Event()   # the warm-up's or the load's end
        self.engine_ok = True
        self.engine_down_since: float | None = None
        self.in_flight = 0
        self.errors: Counter[str] = Counter()
        self.bad_statuses: dict[str, Counter[str]] = defaultdict(Counter)
        rng = random.Random(f"{seed}:bodies")
        self.images = [_png((rng.randrange(256), rng.randrange(256), rng.randrange(256))) for _ in range(8)]
        self.greedy_max_tokens = [rng.randint(*max_tokens) for _ in range(distinct)]
        self.reference: list[str | None] = [None] * distinct
        self.model = ""

    # -- bookkeeping -------------------------------------------------------------------------------
    def error(self, kind: str, detail: str) -> None:
        self.errors[kind] += 1
        if len(self.figures.error_samples) < 10:
            self.figures.error_samples.append(f"{kind}: {detail}"[:300])

    def engine_down(self, signal: str) -> None:
        if self.engine_ok:
            self.engine_ok = False
            self.engine_down_since = time.monotonic()
            self.figures.engine_deaths += 1
            if len(self.figures.engine_signals) < 10:
                self.figures.engine_signals.append(signal[:300])

    def engine_up(self) -> None:
        if not self.engine_ok:
            self.engine_ok = True
            self.engine_down_since = None
            self.figures.engine_restarts += 1

    def _check_5xx(self, result: Exchange, what: str) -> None:
        if result.status is not None and result.status >= 500 and ENGINE_DOWN.search(result.body):
            self.engine_down(f"{what}: HTTP {result.status} {result.body[:160]!r}")
        if result.stream_error and ENGINE_DOWN.search(result.stream_error.encode()):
            self.engine_down(f"{what}: stream error {result.stream_error!r}")

    # -- request bodies ----------------------------------------------------------------------------
    def greedy_body(self, index: int) -> dict[str, Any]:
        content: Any = f"Request {index}: describe what you know about topic number {index * 7 + 3}."
        if index % 2 == 0:
            content = [{"type": "text", "text": content},
                       {"type": "image_url", "image_url": {"url": self.images[index % len(self.images)]}}]
        return {"model": self.model, "messages": [{"role": "user", "content": content}], "stream": True,
                "temperature": 0, "max_tokens": self.greedy_max_tokens[index], "max_dynamic_patch": 1,
                "stream_options": {"include_usage": True}}

    def sampled_body(self, rng: random.Random) -> dict[str, Any]:
        content: Any = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 24)))
        if rng.random() < 0.3:
            content = [{"type": "text", "text": content},
                       {"type": "image_url", "image_url": {"url": rng.choice(self.images)}}]
        return {"model": self.model, "messages": [{"role": "user", "content": content}], "stream": True,
                "temperature": 0.8, "top_p": 0.95, "seed": rng.randrange(2**31),
                "max_tokens": rng.randint(*self.max_tokens), "max_dynamic_patch": 1}

    def bad_input(self, name: str, rng: random.Random) -> tuple[bytes, str]:
        """(body, content type) of a request that must get a 4xx."""
        body: dict[str, Any] = {"model": self.model, "messages": [{"role": "user", "content": "hello"}],
                                "max_tokens": 8, "stream": rng.random() < 0.5}
        content_type = "application/json"
        if name == "malformed_json":
            return json.dumps(body).encode()[:-rng.randint(1, 20)], content_type
        if name == "wrong_model":
            body["model"] = "no-such-model"
        elif name in ("bad_image_base64", "bad_image_bytes"):
            payload = "!!not*base64!!" if name == "bad_image_base64" else base64.b64encode(rng.randbytes(64)).decode()
            body["messages"][0]["content"] = [{"type": "text", "text": "what is this?"},
                                              {"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                                                 + payload}}]
        elif name == "oversize_max_tokens":
            body["max_tokens"] = 10**9
        elif name == "wrong_content_type":   # a form post (requests' data=dict) where JSON is expected
            return f"model={self.model}&max_tokens=8&messages=hello".encode(), "application/x-www-form-urlencoded"
        elif name == "body_too_large":       # valid JSON; only its size is wrong
            body["messages"][0]["content"] = "x" * (MAX_BODY_BYTES + 4096)
        else:
            raise ValueError(name)
        return json.dumps(body).encode(), content_type

    # -- one action each ---------------------------------------------------------------------------
    async def post(self, body: dict[str, Any], drop: Drop | None = None) -> Exchange:
        return await exchange(self.port, "POST", "/v1/chat/completions", json.dumps(body).encode(), drop=drop)

    async def complete(self, body: dict[str, Any], what: str) -> Exchange | None:
        """A streaming request read to the end; None (and an error counted) unless it completed."""
        result = await self.post(body)
        self._check_5xx(result, what)
        if result.status != 200:
            self.error(f"HTTP {result.status}", f"{what}: {result.body[:200]!r}")
        elif result.stream_error:
            self.error("stream error event", f"{what}: {result.stream_error}")
        elif result.finish_reason is None or not result.done:
            self.error("stream ended early", f"{what}: {result.events} events, finish {result.finish_reason}")
        else:
            return result
        return None

    async def greedy(self, index: int) -> None:
        result = await self.complete(self.greedy_body(index), f"greedy {index}")
        if result is None:
            return
        self.figures.completed += 1
        self.figures.completed_greedy += 1
        self.figures.greedy_compared += 1
        if result.text != self.reference[index]:
            self.figures.greedy_mismatches += 1
            if len(self.figures.greedy_samples) < 5:
                self.figures.greedy_samples.append(f"greedy {index}: {result.text!r} != alone "
                                                   f"{self.reference[index]!r}")

    async def sampled(self, rng: random.Random) -> None:
        if await self.complete(self.sampled_body(rng), "sampled") is not None:
            self.figures.completed += 1

    async def dropped(self, rng: random.Random) -> None:
        kind = rng.choice(DROP_KINDS)
        body = self.sampled_body(rng)
        after = {"before_first_byte": 0, "after_first_chunk": 1}.get(kind) or rng.randint(2, body["max_tokens"])
        drop = Drop(kind, after, reset=rng.random() < 0.5)
        result = await self.post(body, drop)
        self._check_5xx(result, f"drop {kind}")
        if result.dropped:
            self.figures.dropped[kind] += 1
            self.figures.dropped_by_reset += drop.reset
        elif result.status != 200:
            self.error(f"HTTP {result.status}", f"drop {kind}: {result.body[:200]!r}")
        elif result.stream_error:
            self.error("stream error event", f"drop {kind}: {result.stream_error}")
        else:                               # the answer ended before the client meant to leave
            self.figures.completed += 1

    async def bad(self, rng: random.Random) -> None:
        name = rng.choice(BAD_INPUTS)
        body, content_type = self.bad_input(name, rng)
        result = await exchange(self.port, "POST", "/v1/chat/completions", body, content_type=content_type)
        self._check_5xx(result, f"bad input {name}")
        if result.status is not None and 400 <= result.status < 500:
            self.bad_statuses[name][str(result.status)] += 1
        else:
            self.error(f"bad input {name} -> HTTP {result.status}", f"{result.body[:200]!r}")

    async def scrape(self) -> None:
        result = await exchange(self.port, "GET", "/metrics")
        if result.status != 200:
            self.error(f"/metrics HTTP {result.status}", f"{result.body[:200]!r}")
            return
        self.figures.metrics_scrapes += 1
        in_use = _metric(result.body.decode(), "internvl_kv_blocks_in_use")
        if in_use is not None:
            self.figures.kv_blocks_in_use_peak = max(self.figures.kv_blocks_in_use_peak or 0.0, in_use)

    async def timed(self, action: Any, what: str) -> None:
        """Run one action under the request timeout; a failure of the connection is an error of its own kind."""
        self.in_flight += 1
        try:
            await asyncio.wait_for(action, self.request_timeout)
        except asyncio.TimeoutError:
            self.error("timeout", f"{what}: no answer in {self.request_timeout:g} s")
        except Exception as exc:  # noqa: BLE001 - OSError, IncompleteReadError, bad JSON...: counted by type
            self.error(type(exc).__name__, f"{what}: {exc}")
        finally:
            self.in_flight -= 1

    # -- phases ------------------------------------------------------------------------------------
    async def monitor(self) -> None:
        """Every second: the process, /health and resident memory. A dead engine stops the load after 5 s."""
        started = time.monotonic()
        next_sample = started
        while True:
            code = self.server.exit_code
            if code is not None:
                self.figures.server_exit_code = code
                self.engine_down(f"the server process exited with status {code}")
                self.stop.set()
                self.figures.stopped_early = self.figures.stopped_early or f"the server exited ({code})"
                return
            rss = self.server.rss_mib()
            if rss is not None:
                self.figures.rss_peak_mib = max(self.figures.rss_peak_mib or 0.0, rss)
                if time.monotonic() >= next_sample:
                    self.figures.rss_timeline_mib.append((round(time.monotonic() - started, 1), round(rss, 1)))
                    next_sample += 10.0
            try:
                health = await asyncio.wait_for(exchange(self.port, "GET", "/health"), 5.0)
                if health.status == 200:
                    self.engine_up()
                else:
                    self.engine_down(f"/health {health.status} {health.body[:160]!r}")
            except (asyncio.TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as exc:
                self.error("/health unanswered", f"{type(exc).__name__}: {exc}")
            if self.engine_down_since is not None and time.monotonic() - self.engine_down_since > 5.0:
                if not self.stop.is_set():
                    self.figures.stopped_early = "the engine stayed down for 5 s"
                self.stop.set()
            await asyncio.sleep(1.0)

    async def solo_round(self, phase: str) -> list[str | None]:
        """Each greedy request alone, one after the other (nothing else in flight)."""
        answers: list[str | None] = []
        for index in range(self.distinct):
            result: Exchange | None = None
            try:
                result = await asyncio.wait_for(self.complete(self.greedy_body(index), f"{phase} greedy {index}"),
                                                self.request_timeout)
            except asyncio.TimeoutError:
                self.error("timeout", f"{phase} greedy {index} alone")
            except Exception as exc:  # noqa: BLE001 - counted by type, as in ``timed``
                self.error(type(exc).__name__, f"{phase} greedy {index} alone: {exc}")
            answers.append(None if result is None else result.text)
        return answers

    async def worker(self, index: int, phase: str) -> None:
        try:
            await self._worker(index, phase)
        except Exception as exc:  # noqa: BLE001 - a bug of this script must fail the verdict, not hide
            self.error("client crashed", f"{phase} worker {index}: {type(exc).__name__}: {exc}")

    async def _worker(self, index: int, phase: str) -> None:
        rng = random.Random(f"{self.seed}:{phase}:{index}")
        while not self.stop.is_set() and not self.phase_end.is_set():
            self.figures.requests_started += 1
            r = rng.random()
            if r < self.bad_share:
                await self.timed(self.bad(rng), "bad input")
            elif r < self.bad_share + self.scrape_share:
                await self.timed(self.scrape(), "/metrics")
            elif rng.random() < self.drop_share:
                await self.timed(self.dropped(rng), "dropped stream")
            elif rng.random() < self.greedy_share:
                greedy = rng.randrange(self.distinct)
                await self.timed(self.greedy(greedy), f"greedy {greedy}")
            else:
                await self.timed(self.sampled(rng), "sampled")

    async def kv_after_drain(self, wait: float) -> float | None:
        """Poll /metrics until no KV block is in use (or ``wait`` seconds pass); the last value read."""
        deadline = time.monotonic() + wait
        in_use: float | None = None
        while True:
            try:
                result = await asyncio.wait_for(exchange(self.port, "GET", "/metrics"), 10.0)
                if result.status == 200:
                    text = result.body.decode()
                    in_use = _metric(text, "internvl_kv_blocks_in_use")
                    self.figures.kv_blocks_total = _metric(text, "internvl_kv_blocks_total")
            except (asyncio.TimeoutError, OSError, asyncio.IncompleteReadError, ValueError):
                in_use = None
            if in_use == 0 or time.monotonic() >= deadline:
                return in_use
            await asyncio.sleep(0.5)

    async def load(self, seconds: float, phase: str) -> None:
        """``concurrency`` clients for ``seconds`` (less if the engine dies), then the drain: requests in flight
        get ``drain`` seconds (3 s once the engine is down); the rest are cut and counted."""
        self.phase_end = asyncio.Event()
        started = time.monotonic()
        workers = [asyncio.ensure_future(self.worker(i, phase)) for i in range(self.concurrency)]
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.stop.wait(), seconds)
        self.phase_end.set()
        self.figures.load_s += time.monotonic() - started
        drain_end = time.monotonic() + self.drain
        pending = set(workers)
        while pending and time.monotonic() < drain_end:
            _, pending = await asyncio.wait(pending, timeout=0.5)
            if self.engine_down_since is not None and time.monotonic() - self.engine_down_since > 3.0:
                break
        if pending:
            self.error("unfinished at the drain's end", f"{phase}: {self.in_flight} requests still in flight")
            self.errors["unfinished at the drain's end"] += max(0, self.in_flight - 1)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def run(self) -> None:
        fig = self.figures
        models = await asyncio.wait_for(exchange(self.port, "GET", "/v1/models"), 10.0)
        self.model = json.loads(models.body)["data"][0]["id"]
        fig.model = self.model
        monitor = asyncio.ensure_future(self.monitor())
        try:
            # 1. the reference answers (alone), then the warm-up: the same mix, so that the allocator's and the
            #    batch buffers' high-water marks are reached before the first memory reading (idle, drained)
            self.reference = await self.solo_round("reference")
            if any(answer is None for answer in self.reference):
                fig.stopped_early = "a reference request failed"
                return
            await self.load(self.warmup, "warm-up")
            if self.stop.is_set():
                return
            await self.kv_after_drain(5.0)
            await asyncio.sleep(0.5)
            fig.rss_start_mib = self.server.rss_mib()

            # 2. the load, 3. the drain, then KV blocks and memory at rest
            await self.load(self.duration - self.warmup, "load")
            if self.server.exit_code is None:
                fig.kv_blocks_in_use_after_drain = await self.kv_after_drain(10.0)
                await asyncio.sleep(0.5)
                fig.rss_end_mib = self.server.rss_mib()
            if self.engine_ok and self.server.exit_code is None:
                again = await self.solo_round("after the run")
                fig.greedy_alone_after_run = sum(answer is not None for answer in again)
                fig.greedy_alone_after_run_mismatches = sum(a != r for a, r in zip(again, self.reference, strict=True)
                                                            if a is not None)
                for index, (a, r) in enumerate(zip(again, self.reference, strict=True)):
                    if a is not None and a != r and len(fig.greedy_samples) < 5:
                        fig.greedy_samples.append(f"greedy {index} alone after the run: {a!r} != before {r!r}")
        finally:
            monitor.cancel()
            await asyncio.gather(monitor, return_exceptions=True)
            if self.server.exit_code is not None and fig.server_exit_code is None:
                fig.server_exit_code = self.server.exit_code
                self.engine_down(f"the server process exited with status {fig.server_exit_code}")
            fig.errors = dict(self.errors)
            fig.bad_inputs_4xx = {name: dict(statuses) for name, statuses in sorted(self.bad_statuses.items())}


# ---------------------------------------------------------------------------------------------------
# Verdict and output
# ---------------------------------------------------------------------------------------------------


def judge(fig: Figures, max_rss_growth_mib: float) -> None:
    if fig.rss_start_mib is not None and fig.rss_end_mib is not None:
        fig.rss_growth_mib = fig.rss_end_mib - fig.rss_start_mib
    greedy_alone_ok = (fig.greedy_alone_after_run is not None and fig.greedy_alone_after_run > 0
                       and fig.greedy_alone_after_run_mismatches == 0)
    fig.criteria = {
        "requests served": fig.completed > 0,
        "no unexpected errors": fig.num_errors == 0,
        "no engine deaths or restarts": (fig.engine_deaths == 0 and fig.engine_restarts == 0
                                         and fig.server_exit_code is None),
        "0 KV blocks in use after the drain": fig.kv_blocks_in_use_after_drain == 0,
        f"resident memory growth <= {max_rss_growth_mib:g} MiB": (fig.rss_growth_mib is not None
                                                                  and fig.rss_growth_mib <= max_rss_growth_mib),
        "greedy answers equal the answer alone": (fig.greedy_compared > 0 and fig.greedy_mismatches == 0
                                                  and greedy_alone_ok),
    }
    fig.passed = all(fig.criteria.values())


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def report(fig: Figures) -> None:
    s, h = fig.settings, fig.host
    print(f"chaos check: {fig.model or s['model']}, {s['concurrency']} concurrent clients for {s['duration_s']:g} s "
          f"(ran {fig.load_s:.1f} s, warm-up included), drop share {s['drop_share']:g}, seed {s['seed']}, loopback")
    print(f"host: {h['cpu_model']} | {h['cpus']} CPUs | flags: {' '.join(h['flags']) or 'none'} | "
          f"avx512_bf16 {'yes' if h['avx512_bf16'] else 'no'}, avx2 {'yes' if h['avx2'] else 'no'}")
    if fig.stopped_early:
        print(f"  STOPPED EARLY: {fig.stopped_early}")
    print(f"  requests started       {fig.requests_started}")
    print(f"  served (completed)     {fig.completed}   (greedy {fig.completed_greedy}; "
          f"{fig.completed_per_min:.0f}/min)")
    drops = ", ".join(f"{kind} {n}" for kind, n in fig.dropped.items())
    print(f"  streams dropped        {sum(fig.dropped.values())}   ({drops}; by RST {fig.dropped_by_reset})")
    bad = ", ".join(f"{name} " + "/".join(f"{status}x{n}" for status, n in statuses.items())
                    for name, statuses in fig.bad_inputs_4xx.items())
    print(f"  bad inputs -> 4xx      {sum(sum(v.values()) for v in fig.bad_inputs_4xx.values())}   ({bad or 'none'})")
    print(f"  /metrics scrapes       {fig.metrics_scrapes}")
    kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(fig.errors.items()))
    print(f"  unexpected errors      {fig.num_errors}   (target 0{'; ' + kinds if kinds else ''})")
    for sample in fig.error_samples[:5]:
        print(f"    error: {sample}")
    print(f"  engine deaths/restarts {fig.engine_deaths} / {fig.engine_restarts}   (target 0; server "
          f"{'exited with ' + str(fig.server_exit_code) if fig.server_exit_code is not None else 'still running'}"
          f"; {fig.server_log_tracebacks} tracebacks in its log)")
    for signal in fig.engine_signals[:3]:
        print(f"    seen: {signal}")
    if (fig.engine_deaths or fig.server_exit_code is not None) and fig.server_log_tail:
        print("    server log, last lines:")
        for line in fig.server_log_tail[-8:]:
            print(f"      {line}")
    print(f"  KV blocks in use       {_mib(fig.kv_blocks_in_use_after_drain)} after the drain   (target 0; peak "
          f"{_mib(fig.kv_blocks_in_use_peak)} of {_mib(fig.kv_blocks_total)})")
    growth = "n/a" if fig.rss_growth_mib is None else f"{fig.rss_growth_mib:+.1f}"
    print(f"  resident memory (MiB)  {_mib(fig.rss_start_mib)} after {fig.warmup_s:g} s of warm-up -> "
          f"{_mib(fig.rss_end_mib)} after the drain ({growth}; peak {_mib(fig.rss_peak_mib)}; "
          f"limit +{s['max_rss_growth_mib']:g})")
    timeline = fig.rss_timeline_mib[::max(1, -(-len(fig.rss_timeline_mib) // 12))]
    print(f"    every {10 * max(1, -(-len(fig.rss_timeline_mib) // 12))} s: "
          + " ".join(f"{mib:.0f}" for _, mib in timeline))
    after = ("not asked" if fig.greedy_alone_after_run is None else
             f"{fig.greedy_alone_after_run - (fig.greedy_alone_after_run_mismatches or 0)}/{s['distinct']} equal")
    print(f"  greedy == alone        {fig.greedy_compared - fig.greedy_mismatches}/{fig.greedy_compared} during the "
          f"run; alone again after the run: {after}")
    for sample in fig.greedy_samples[:3]:
        print(f"    differs: {sample}")
    verdict = "; ".join(f"{name}: {'met' if ok else 'NOT MET'}" for name, ok in fig.criteria.items())
    print(f"verdict: {'PASS' if fig.passed else 'FAIL'} -- {verdict}")


def run_chaos(model: Path | None, *, duration: float, concurrency: int = 64, drop_share: float = 0.5,
              greedy_share: float = 0.5, bad_share: float = 0.1, scrape_share: float = 0.03, distinct: int = 8,
              max_tokens: tuple[int, int] = (16, 48), seed: int = 0, request_timeout: float = 60.0,
              drain: float = 30.0, max_rss_growth_mib: float = 128.0) -> Figures:
    """Start the server, run the chaos for ``duration`` seconds, stop the server; returns the judged figures."""
    settings = {"model": str(model) if model else "--demo", "duration_s": duration, "concurrency": concurrency,
                "drop_share": drop_share, "greedy_share": greedy_share, "bad_share": bad_share,
                "scrape_share": scrape_share, "distinct": distinct, "max_tokens": list(max_tokens), "seed": seed,
                "request_timeout_s": request_timeout, "drain_s": drain, "max_rss_growth_mib": max_rss_growth_mib}
    fig = Figures(host=host_record(), settings=settings)
    hard_limit = duration + 2 * drain + HARD_MARGIN_S    # the warm-up's drain and the load's
    started = time.monotonic()
    server = ServerProcess(model, concurrency=concurrency, max_tokens=max_tokens[1])
    settings["server_args"] = server.args
    # last resort, should the event loop itself wedge: kill the server and leave
    watchdog = threading.Timer(hard_limit + 30.0, _hard_exit, args=(server,))
    watchdog.daemon = True
    watchdog.start()
    try:
        chaos = Chaos(server, fig, duration=duration, concurrency=concurrency, drop_share=drop_share,
                      greedy_share=greedy_share, bad_share=bad_share, scrape_share=scrape_share, distinct=distinct,
                      max_tokens=max_tokens, seed=seed, request_timeout=request_timeout, drain=drain)
        try:
            asyncio.run(_started_then(chaos, server, budget=60.0, hard_limit=hard_limit))
        except asyncio.TimeoutError:
            fig.stopped_early = f"the hard deadline of {hard_limit:g} s was reached"
            fig.errors["hard deadline"] = fig.errors.get("hard deadline", 0) + 1
        except _StartFailed as exc:
            fig.stopped_early = str(exc)
            fig.errors["server did not start"] = 1
            fig.server_exit_code = server.exit_code
        except Exception as exc:  # noqa: BLE001 - e.g. /v1/models unanswered: a failed run, still reported
            fig.stopped_early = f"the run failed: {type(exc).__name__}: {exc}"
            fig.errors[f"run failed ({type(exc).__name__})"] = 1
    finally:
        log = server.log_text()
        fig.server_log_tracebacks = log.count("Traceback (most recent call last)")
        fig.server_log_tail = log.splitlines()[-30:]
        server.stop()
        watchdog.cancel()
    fig.wall_s = time.monotonic() - started
    fig.completed_per_min = 60.0 * fig.completed / fig.load_s if fig.load_s else 0.0
    judge(fig, max_rss_growth_mib)
    return fig


class _StartFailed(RuntimeError):
    pass


async def _started_then(chaos: Chaos, server: ServerProcess, *, budget: float, hard_limit: float) -> None:
    async def everything() -> None:
        deadline = time.monotonic() + budget
        while True:
            if server.exit_code is not None:
                raise _StartFailed(f"the server exited with status {server.exit_code} while starting")
            if time.monotonic() > deadline:
                raise _StartFailed(f"/health not 200 within {budget:g} s of starting the server")
            with contextlib.suppress(asyncio.TimeoutError, OSError, asyncio.IncompleteReadError, ValueError):
                if (await asyncio.wait_for(exchange(server.port, "GET", "/health"), 5.0)).status == 200:
                    break
            await asyncio.sleep(0.25)
        await chaos.run()

    await asyncio.wait_for(everything(), hard_limit)


def _hard_exit(server: ServerProcess) -> None:
    with contextlib.suppress(OSError):
        server.proc.kill()
    print("chaos check: the hard deadline passed and the event loop did not stop; killed the server", flush=True)
    os._exit(3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint folder (default: --demo's random-weight model)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, default=None, help="length of the load (default: 10)")
    length.add_argument("--seconds", type=float, default=None, help="length of the load in seconds (short runs)")
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent clients (default: 64)")
    parser.add_argument("--drop-share", type=float, default=0.5,
                        help="share of streaming requests whose client leaves early (default: 0.5)")
    parser.add_argument("--greedy-share", type=float, default=0.5,
                        help="share of the completed streams that are greedy, from the fixed prompts (default: 0.5)")
    parser.add_argument("--bad-share", type=float, default=0.1, help="share of bad inputs (default: 0.1)")
    parser.add_argument("--scrape-share", type=float, default=0.03, help="share of /metrics scrapes (default: 0.03)")
    parser.add_argument("--distinct", type=int, default=8, help="fixed greedy prompts (default: 8)")
    parser.add_argument("--max-tokens", type=int, nargs=2, default=(16, 48), metavar=("LOW", "HIGH"),
                        help="max_tokens per request, drawn from LOW..HIGH (default: 16 48)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the clients' choices (default: 0)")
    parser.add_argument("--request-timeout", type=float, default=60.0, help="seconds per request (default: 60)")
    parser.add_argument("--drain", type=float, default=30.0,
                        help="seconds requests in flight get to finish after the load (default: 30)")
    parser.add_argument("--max-rss-growth-mib", type=float, default=128.0,
                        help="resident-memory growth allowed from after the warm-up to after the drain, both idle, "
                             "MiB (default: 128; the idle reading itself moves by tens of MiB as malloc returns "
                             "memory or not)")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the figures as JSON to PATH")
    args = parser.parse_args(argv)
    duration = args.seconds if args.seconds is not None else 60.0 * (10.0 if args.minutes is None else args.minutes)
    if duration <= 0 or args.concurrency < 1 or args.distinct < 1:
        parser.error("the duration, --concurrency and --distinct must be positive")
    for name in ("drop_share", "greedy_share", "bad_share", "scrape_share"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            parser.error(f"--{name.replace('_', '-')} must be within 0..1")
    if args.bad_share + args.scrape_share > 1.0:
        parser.error("--bad-share + --scrape-share must be at most 1")
    low, high = args.max_tokens
    if not 2 <= low <= high:
        parser.error("--max-tokens: 2 <= LOW <= HIGH")

    fig = run_chaos(Path(args.model) if args.model else None, duration=duration, concurrency=args.concurrency,
                    drop_share=args.drop_share, greedy_share=args.greedy_share, bad_share=args.bad_share,
                    scrape_share=args.scrape_share, distinct=args.distinct, max_tokens=(low, high), seed=args.seed,
                    request_timeout=args.request_timeout, drain=args.drain,
                    max_rss_growth_mib=args.max_rss_growth_mib)
    report(fig)
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(fig), indent=1) + "\n")
    return 0 if fig.passed else 1


if __name__ == "__main__":
    sys.exit(main())
