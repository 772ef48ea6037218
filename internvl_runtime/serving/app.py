"""The app factory: ``create_app(async_engine, ServerConfig)`` -> a FastAPI app.

What lives here (and nowhere else):

- **lifespan**: when given a loader instead of an engine, loads the weights on a background thread so the
  server answers at once (``/health`` says 503 ``loading`` until the engine runs, then 200); at shutdown,
  stops the engine loop and the worker threads.
- **the guard's wiring** (``http_guard.HTTPGuard``, one ASGI middleware): Host check (400), CORS when
  configured, the API key on ``/v1/*`` and ``/metrics`` (401), JSON-only bodies (415), the body size limit
  and read deadline (413, 408; the body is never buffered there), and the per-status response counters.
- **uvicorn_config**: the uvicorn settings the server runs with (request-head deadline, connection cap).
- **the routes** (``routes/``, one module per endpoint), included as routers.
- **metrics and stats lines**: the app's ``ServerMetrics`` (``serving/metrics.py``, at ``app.state.metrics``)
  observes every engine output; ``StatsLogger`` logs throughput, queues and KV use every
  ``stats_log_interval_s`` while the server is busy, from what the engine publishes.
- **error handlers**: every error, wherever raised, becomes OpenAI's ``{"error": {...}}`` with the status of
  ``protocol.error_status`` (which defers to ``errors.http_status``): the one mapping.
- **the web chat page** at ``/`` and its files at ``/static/`` (``routes/page.py``: no build step, nothing from a
  CDN, the page's Content-Security-Policy).

Example::

    engine = AsyncEngine(LLMEngine.from_pretrained("pretrained/InternVL2-1B"))
    config = ServerConfig(model="pretrained/InternVL2-1B")
    app = create_app(engine, config)
    uvicorn.Server(uvicorn_config(app, config)).run()
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..engine.async_engine import AsyncEngine
from ..engine.engine import EngineConfig, LLMEngine
from ..errors import EngineDead, InternVLError, InvalidRequest, MethodNotAllowed, RequestShapeError, RouteNotFound
from ..hub import HubOptions
from ..version import __version__
from . import routes
from .config import ServerConfig
from .http_guard import HTTPGuard, deadline_protocol, error_response
from .metrics import ServerMetrics
from .routes.page import page_router
from .state import ServingState

logger = logging.getLogger(__name__)

_ENGINE_WATCH_S = 0.5
_TOKEN_BUCKETS_UP_TO = 32768       # token-count histogram buckets without --max-model-len (1, 2, 5, ... 20000)
def create_app(engine: AsyncEngine | Callable[[], AsyncEngine], config: ServerConfig, *, own_engine: bool = True,
               on_fatal: Callable[[BaseException], None] | None = None) -> FastAPI:
    """Build the server.

    ``engine`` is an ``AsyncEngine``, or a zero-argument callable returning one: the weights then load on a
    background thread at start-up while ``/health`` answers 503. With ``own_engine`` the engine loop is stopped
    when the app shuts down. ``on_fatal`` is called once if the server cannot go on: the loader raised (on the
    loading thread), or the engine loop died (on the event loop; ``/health`` then answers 503 with the cause).
    The CLI stops the server and exits non-zero.
    """
    state = ServingState(config)
    metrics = ServerMetrics(state, max_model_len=config.max_model_len or _TOKEN_BUCKETS_UP_TO)
    loader: Callable[[], AsyncEngine] | None = None
    if isinstance(engine, AsyncEngine):
        engine.add_observer(metrics)
        state.set_engine(engine)
    elif callable(engine):
        load_engine = engine

        def loader() -> AsyncEngine:
            loaded = load_engine()
            loaded.add_observer(metrics)
            return loaded
    else:
        raise TypeError(f"create_app needs an AsyncEngine or a callable returning one, got {type(engine).__name__}")

    async def watch_engine() -> None:
        """Report the engine loop's death (polling: a death is rare, half a second is soon enough)."""
        while True:
            await asyncio.sleep(_ENGINE_WATCH_S)
            engine = state.engine
            if engine is not None and engine.death is not None:
                logger.critical("the engine loop died (%s); stopping the server", engine.death)
                if on_fatal is not None:
                    on_fatal(EngineDead(f"the engine loop died: {engine.death}"))
                return

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if loader is not None and state.engine is None and state.load_error is None:
            threading.Thread(target=state.load, args=(loader, on_fatal), name="internvl-load",
                             daemon=True).start()
        watcher = asyncio.ensure_future(watch_engine())
        stats = (asyncio.ensure_future(StatsLogger(state).run(config.stats_log_interval_s))
                 if config.stats_log_interval_s > 0 else None)
        try:
            yield
        finally:
            watcher.cancel()
            if stats is not None:
                stats.cancel()
            state.close()
            if state.engine is not None:
                state.engine.remove_observer(metrics)
            if own_engine and state.engine is not None:
                await asyncio.to_thread(state.engine.shutdown)

    app = FastAPI(title="internvl-runtime", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serving = state
    app.state.metrics = metrics
    app.state.started = time.time()

    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        return error_response(exc, where=f"{request.method} {request.url.path}")

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        where = f"{request.method} {request.url.path}"
        if exc.status_code == 404:
            return error_response(RouteNotFound(f"no route {request.method} {request.url.path}"), where=where)
        if exc.status_code == 405:
            return error_response(MethodNotAllowed(f"method {request.method} is not allowed on {request.url.path}"),
                                  where=where)
        # The router raises only 404 and 405; anything else is a 400 or a 500.
        return error_response(InvalidRequest(str(exc.detail)) if exc.status_code < 500 else exc, where=where)

    app.add_exception_handler(InternVLError, on_error)
    app.add_exception_handler(ValidationError, on_error)

    async def on_request_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        message = "; ".join(str(e.get("msg")) for e in exc.errors()) or "invalid request"
        return error_response(RequestShapeError(message), where=f"{request.method} {request.url.path}")

    app.add_exception_handler(RequestValidationError, on_request_validation)
    app.add_exception_handler(StarletteHTTPException, on_http_error)

    async def on_client_gone(request: Request, exc: Exception) -> Response:
        return Response(status_code=499)      # the client left while sending its body: nobody to tell

    app.add_exception_handler(ClientDisconnect, on_client_gone)
    app.add_exception_handler(Exception, on_error)
    for router in routes.ROUTERS:
        app.include_router(router)

    app.include_router(page_router())
    app.add_middleware(HTTPGuard, config=config, counts=state.http_responses)
    return app


def uvicorn_config(app: FastAPI, config: ServerConfig, *,
                   log_config: dict[str, Any] | None = None) -> uvicorn.Config:
    """The ``uvicorn.Config`` that runs ``app`` (``internvl serve`` and the tests both use it): address and
    log level from ``config``, the h11 protocol with the request-head deadline, and the connection cap
    (uvicorn answers 503 once ``limit_concurrency`` connections, this one included, are open).
    ``log_config``: a ``logging.config.dictConfig`` for uvicorn to apply (``internvl serve``'s own); without
    it, uvicorn's default."""
    extra: dict[str, Any] = {} if log_config is None else {"log_config": log_config}
    return uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level, lifespan="on",
                          http=deadline_protocol(config.header_timeout_s),
                          limit_concurrency=config.max_connections + 1, **extra)


# ---------------------------------------------------------------------------------------------------
# Loading (`internvl serve`)
# ---------------------------------------------------------------------------------------------------


def load_async_engine(config: ServerConfig, *, progress: bool = False) -> AsyncEngine:
    """Load ``config.model`` (``LLMEngine.from_pretrained`` with ``config``'s dtype, device and quantization;
    a tqdm bar over the weights when ``progress``), log what was loaded, and start its engine loop."""
    llm = LLMEngine.from_pretrained(Path(config.model), dtype=config.dtype, device=config.device, progress=progress,
                                    quantization=config.quantization, config=EngineConfig(**config.engine_kwargs()),
                                    hub=HubOptions(revision=config.revision), mmap=not config.no_mmap,
                                    vision=config.vision_load, pack_bf16=config.pack_bf16)
    log_loaded(llm)
    # The grammar engine's view of the vocabulary (~1 s on 151k tokens) is built here, not on the engine loop.
    logger.info("structured output: llguidance over %d tokens", llm.structured_output_backend.logits_width)
    return AsyncEngine(llm, max_queue_len=config.max_queue_len)


def log_loaded(llm: LLMEngine) -> None:
    """One line on what runs: dtype, device, quantization, context, KV cache (the loader logs the compute plan
    as it applies it: ``compute_plan.apply_plan``)."""
    model = llm.model
    weight = model.language_model.get_input_embeddings().weight
    quantization = getattr(model, "quantization", None)
    logger.info("engine: dtype %s, device %s, quantization %s, context %d tokens, KV cache %d blocks of %d tokens "
                "(%d tokens)", str(weight.dtype).removeprefix("torch."), weight.device,
                getattr(quantization, "mode", None) or "none", llm.max_model_len, llm.num_blocks,
                llm.config.block_size, llm.kv_capacity)


class StatsLogger:
    """Every ``interval`` seconds while the server is busy, one line as vLLM's: prompt and generation
    throughput over the interval, requests running and waiting, KV cache use, prefix cache hit rate. It reads
    only what the engine publishes (``AsyncEngine.stats``, the queue sizes, the free blocks), never waiting on
    the engine thread; an idle server stays quiet."""

    def __init__(self, state: ServingState) -> None:
        self.state = state
        # time, prompt tokens, generated tokens, cached prompt tokens, requests added: at the last line
        self._last: tuple[float, int, int, int, int] = (time.monotonic(), 0, 0, 0, 0)

    async def run(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            line = self.line()
            if line is not None:
                logger.info("%s", line)

    def line(self) -> str | None:
        """The line for the interval since the last call; None when nothing happened in it and nothing waits."""
        engine = self.state.engine
        if engine is None:
            return None
        stats = engine.stats
        now = time.monotonic()
        current = (now, stats["prompt_tokens"], stats["generated_tokens"], stats["cached_prompt_tokens"],
                   stats["requests_added"])
        last, self._last = self._last, current
        running, waiting = engine.num_running, engine.num_waiting
        if current[1:] == last[1:] and not running and not waiting:
            return None
        seconds = max(1e-9, now - last[0])
        prompt, generated = current[1] - last[1], current[2] - last[2]
        hits = (current[3] - last[3]) / prompt if prompt else 0.0
        total, free = engine.kv_blocks_total, engine.kv_blocks_free
        usage = (total - free) / total if total else 0.0
        return (f"Avg prompt throughput: {prompt / seconds:.1f} tokens/s, Avg generation throughput: "
                f"{generated / seconds:.1f} tokens/s, Running: {running} reqs, Waiting: {waiting} reqs, "
                f"KV cache usage: {usage:.1%}, Prefix cache hit rate: {hits:.1%}")
