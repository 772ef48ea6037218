"""Helpers for the serving tests: a real uvicorn server on a free loopback port, in a background thread,
with the tiny random-weight InternVL2-1B checkpoint from ``tests/fixtures``."""

from __future__ import annotations

import base64
import dataclasses
import io
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
from PIL import Image

from internvl_runtime.serving.app import create_app, load_async_engine, uvicorn_config
from internvl_runtime.serving.config import ServerConfig
from paths import FIXTURES

TINY_1B = FIXTURES / "ckpt" / "tiny-1B"
MODEL = "tiny-1B"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RunningServer:
    base_url: str
    app: Any
    config: ServerConfig

    @property
    def engine(self) -> Any:
        return self.app.state.serving.engine

    def metrics(self) -> dict[str, float]:
        """The /metrics samples without labels, as floats."""
        headers = {"Authorization": f"Bearer {self.config.api_key[0]}"} if self.config.api_key else {}
        text = httpx.get(self.base_url + "/metrics", headers=headers, timeout=10).text
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values


@contextmanager
def run_server(config: ServerConfig, *, loader: Any = None, wait_ready: bool = True) -> Iterator[RunningServer]:
    """Start the server as ``internvl serve`` does (``uvicorn_config``), with ``config`` on a free port and
    uvicorn's log level at warning (weights loading in the app's lifespan, by ``loader`` if given); wait until
    /health is 200 (or only until it answers), yield, then shut down (engine included)."""
    import uvicorn

    config = dataclasses.replace(config, port=free_port(), log_level="warning")
    app = create_app(loader or (lambda: load_async_engine(config)), config)
    server = uvicorn.Server(uvicorn_config(app, config))
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    host = "127.0.0.1" if config.host in ("0.0.0.0", "") else config.host
    base = f"http://{f'[{host}]' if ':' in host else host}:{config.port}"
    try:
        deadline = time.monotonic() + 60
        with httpx.Client(timeout=5) as client:
            while True:
                try:
                    if client.get(base + "/health").status_code == 200 or not wait_ready:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or not thread.is_alive():
                    raise RuntimeError("the test server did not become ready")
                time.sleep(0.05)
        yield RunningServer(base, app, config)
    finally:
        server.should_exit = True
        thread.join(30)


def png_bytes(width: int = 64, height: int = 48, color: tuple[int, int, int] = (200, 30, 30), *,
              noise: bool = False) -> bytes:
    if noise:
        import random
        rng = random.Random(width * 1000 + height)
        image = Image.frombytes("RGB", (width, height), bytes(rng.randrange(256) for _ in range(width * height * 3)))
    else:
        image = Image.new("RGB", (width, height), color)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width x height`` pixels (a decompression-bomb probe), with no real data."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
            + chunk(b"IEND", b""))


@contextmanager
def client_with_sampler(ckpt: Any, sampler: Any) -> Iterator[Any]:
    """The openai client of a server on ``ckpt`` whose engine samples with ``sampler`` (a scripted answer: a
    random-weight model writes no markup); everything else (routes, engine, detokenizer) runs as served."""
    import openai

    from internvl_runtime import AutoTokenizer
    from internvl_runtime.engine.async_engine import AsyncEngine
    from internvl_runtime.engine.engine import EngineConfig, LLMEngine
    from internvl_runtime.loading import load_model

    config = ServerConfig(model=str(ckpt), max_model_len=4096, num_blocks=256, max_num_seqs=2)

    def loader() -> AsyncEngine:
        return AsyncEngine(LLMEngine(load_model(ckpt), AutoTokenizer.from_pretrained(ckpt),
                                     EngineConfig(**config.engine_kwargs()), sampler=sampler))

    with run_server(config, loader=loader) as server, openai.OpenAI(
            base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120) as client:
        yield client
