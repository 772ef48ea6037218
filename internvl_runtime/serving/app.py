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
- **error handlers**: every error, wherever raised, becomes OpenAI's ``{"error": {...}}`` with the status of
  ``protocol.error_status`` (which defers to ``errors.http_status``): the one mapping.
- **the web chat page** at ``/`` (``static/index.html``, no build step, nothing from a CDN).

Example::

    engine = AsyncEngine(LLMEngine.from_pretrained("pretrained/InternVL2-1B"))
    config = ServerConfig(model="pretrained/InternVL2-1B")
    app = create_app(engine, config)
    uvicorn.Server(uvicorn_config(app, config)).run()
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import time
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..engine.async_engine import AsyncEngine
from ..engine.engine import EngineConfig, LLMEngine
from ..errors import (
    EngineDead,
    InternVLError,
    InvalidRequest,
    MethodNotAllowed,
    ModelLoading,
    RequestShapeError,
    RouteNotFound,
    TooManyRequests,
)
from ..processing.prompt_encoder import PromptEncoder
from ..version import __version__
from . import routes
from .config import DEMO_LABEL, ServerConfig
from .http_guard import HTTPGuard, deadline_protocol, error_response
from .media import MediaFetcher

logger = logging.getLogger(__name__)

_ENGINE_WATCH_S = 0.5
_LARGE_PROMPTS_IN_FLIGHT = 4      # prompts over PromptEncoder.large_bytes being tokenized at once
_PAGE_HEADERS = {
    # The page must work offline: nothing may come from elsewhere, and the CSP says so to the browser.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'unsafe-inline'; "
                               "script-src 'unsafe-inline'; connect-src 'self'; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


_SLOT_LOCK = threading.Lock()


class _Slot:
    """One admitted generation request; ``release`` is idempotent."""

    def __init__(self, state: ServingState) -> None:
        self._state: ServingState | None = state

    def release(self) -> None:
        with _SLOT_LOCK:      # also called from a GC finalizer, on whatever thread collects the stream
            state, self._state = self._state, None
            if state is not None:
                state.active -= 1


class ServingState:
    """What the routes share: config, the engine (None while loading), the media fetcher, the worker
    threads that prepare requests, admission counting, token texts for logprobs, HTTP counters for /metrics."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.engine: Any = None
        self.load_error: str | None = None
        self.fetcher = MediaFetcher.from_config(config)
        self.video_fetcher = MediaFetcher.from_config(config, max_image_bytes=config.max_video_bytes,
                                                     media_kind="video")
        self.active = 0
        self.http_responses: Counter[int] = Counter()
        self.processor: Any = None
        self.prompt_encoder: PromptEncoder | None = None
        self.tokenizer: Any = None
        self.max_model_len: int | None = None
        self.closed = False
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._token_texts: dict[int, str] = {}
        self.fingerprint = "demo-random-weights" if config.demo else f"internvl-runtime-{__version__}"

    # -- engine ----------------------------------------------------------------------------------
    def set_engine(self, engine: Any) -> None:
        self.prompt_encoder = PromptEncoder(engine.tokenizer, max_tokens=engine.max_model_len,
                                            max_large=_LARGE_PROMPTS_IN_FLIGHT)
        self.processor = engine.processor.with_encoder(self.prompt_encoder.encode)
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.engine = engine

    def load(self, loader: Callable[[], Any], on_error: Callable[[BaseException], None] | None) -> None:
        """Run ``loader`` (on a background thread) and install the engine it returns."""
        try:
            engine = loader()
        except BaseException as exc:  # reported on /health and to the caller
            logger.error("loading the model failed: %s", exc, exc_info=not isinstance(exc, InternVLError))
            self.load_error = f"{type(exc).__name__}: {exc}"
            if on_error is not None:
                on_error(exc)
            return
        if self.closed:          # the server stopped while the weights loaded
            engine.shutdown()
            return
        self.set_engine(engine)
        logger.info("model %r ready", self.config.model_name)

    def require_engine(self) -> Any:
        engine = self.engine
        if engine is None or not engine.is_running:
            if engine is not None:
                raise EngineDead(f"the engine loop stopped ({engine.death or 'shut down'}); the server is exiting "
                                 "so that its supervisor restarts it")
            if self.load_error:
                raise ModelLoading(f"the model failed to load: {self.load_error}")
            raise ModelLoading("the model is still loading; retry in a moment (GET /health says when it is ready)")
        return engine

    # -- admission -------------------------------------------------------------------------------
    def admit(self) -> _Slot:
        with _SLOT_LOCK:
            if self.active >= self.config.max_concurrent_requests:
                raise TooManyRequests(f"the server already handles {self.active} generation requests (limit "
                                      f"{self.config.max_concurrent_requests}); retry later")
            self.active += 1
        return _Slot(self)

    @staticmethod
    def release_on_collect(owner: object, slot: _Slot) -> None:
        """Release ``slot`` when ``owner`` (a stream that may never start) is garbage-collected."""
        weakref.finalize(owner, slot.release)

    # -- worker threads --------------------------------------------------------------------------
    @property
    def executor(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._executor is None:
            # Threads that wait on the tokenizer process for a large prompt are added on top: small requests
            # always find a free thread.
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=max(2, min(8, os.cpu_count() or 2)) + _LARGE_PROMPTS_IN_FLIGHT,
                thread_name_prefix="internvl-prepare")
        return self._executor

    async def run_in_worker(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn)

    def close(self) -> None:
        self.closed = True
        if self.prompt_encoder is not None:
            self.prompt_encoder.close()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    # -- answers ---------------------------------------------------------------------------------
    def label(self, text: str) -> str:
        """Answers of a random-weight (--demo) checkpoint say so."""
        return DEMO_LABEL + text if self.config.demo else text

    def token_text(self, token_id: int) -> str:
        text = self._token_texts.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id])
            if len(self._token_texts) < 200_000:
                self._token_texts[token_id] = text
        return text


def _page() -> str:
    return resources.files("internvl_runtime.serving").joinpath("static/index.html").read_text(encoding="utf-8")


def create_app(engine: Any, config: ServerConfig, *, own_engine: bool = True,
               on_fatal: Callable[[BaseException], None] | None = None) -> FastAPI:
    """Build the server.

    ``engine`` is an ``AsyncEngine`` (anything with its interface), or a zero-argument callable returning
    one: the weights then load on a background thread at start-up while ``/health`` answers 503. With
    ``own_engine`` the engine loop is stopped when the app shuts down. ``on_fatal`` is called once if the
    server cannot go on: the loader raised (on the loading thread), or the engine loop died (on the event
    loop; ``/health`` then answers 503 with the cause). The CLI stops the server and exits non-zero.
    """
    state = ServingState(config)
    loader = None
    if hasattr(engine, "generate"):
        state.set_engine(engine)
    elif callable(engine):
        loader = engine
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
        try:
            yield
        finally:
            watcher.cancel()
            state.close()
            if own_engine and state.engine is not None:
                await asyncio.to_thread(state.engine.shutdown)

    app = FastAPI(title="internvl-runtime", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serving = state
    app.state.started = time.time()

    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        return error_response(exc)

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 404:
            return error_response(RouteNotFound(f"no route {request.method} {request.url.path}"))
        if exc.status_code == 405:
            return error_response(MethodNotAllowed(f"method {request.method} is not allowed on {request.url.path}"))
        # The router raises only 404 and 405; anything else is a 400 or a 500.
        return error_response(InvalidRequest(str(exc.detail)) if exc.status_code < 500 else exc)

    app.add_exception_handler(InternVLError, on_error)
    app.add_exception_handler(ValidationError, on_error)

    async def on_request_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        message = "; ".join(str(e.get("msg")) for e in exc.errors()) or "invalid request"
        return error_response(RequestShapeError(message))

    app.add_exception_handler(RequestValidationError, on_request_validation)
    app.add_exception_handler(StarletteHTTPException, on_http_error)

    async def on_client_gone(request: Request, exc: Exception) -> Response:
        return Response(status_code=499)      # the client left while sending its body: nobody to tell

    app.add_exception_handler(ClientDisconnect, on_client_gone)
    app.add_exception_handler(Exception, on_error)
    for router in routes.ROUTERS:
        app.include_router(router)

    page = _page()

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers=_PAGE_HEADERS)

    app.add_middleware(HTTPGuard, config=config, counts=state.http_responses)
    return app


def uvicorn_config(app: Any, config: ServerConfig) -> Any:
    """The ``uvicorn.Config`` that runs ``app`` (``internvl serve`` and the tests both use it): address and
    log level from ``config``, the h11 protocol with the request-head deadline, and the connection cap
    (uvicorn answers 503 once ``limit_concurrency`` connections, this one included, are open)."""
    import uvicorn

    return uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level, lifespan="on",
                          http=deadline_protocol(config.header_timeout_s),
                          limit_concurrency=config.max_connections + 1)


# ---------------------------------------------------------------------------------------------------
# Loading (`internvl serve`)
# ---------------------------------------------------------------------------------------------------


def load_async_engine(config: ServerConfig, *, progress: bool = False) -> Any:
    """Load ``config.model`` (``LLMEngine.from_pretrained``; a tqdm bar over the weights when ``progress``)
    and start its engine loop."""
    llm = LLMEngine.from_pretrained(Path(config.model), dtype=config.dtype, device=config.device, progress=progress,
                                    config=EngineConfig(**config.engine_kwargs()))
    return AsyncEngine(llm, max_queue_len=config.max_queue_len)
