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
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..engine.async_engine import AsyncEngine
from ..engine.engine import EngineConfig, LLMEngine
from ..errors import EngineDead, InternVLError, InvalidRequest, MethodNotAllowed, RequestShapeError, RouteNotFound
from ..version import __version__
from . import routes
from .config import ServerConfig
from .http_guard import HTTPGuard, deadline_protocol, error_response
from .state import ServingState

logger = logging.getLogger(__name__)

_ENGINE_WATCH_S = 0.5
_PAGE_HEADERS = {
    # The page must work offline: nothing may come from elsewhere, and the CSP says so to the browser.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'unsafe-inline'; "
                               "script-src 'unsafe-inline'; connect-src 'self'; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def _page() -> str:
    return resources.files("internvl_runtime.serving").joinpath("static/index.html").read_text(encoding="utf-8")


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
    loader = None
    if isinstance(engine, AsyncEngine):
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


def uvicorn_config(app: FastAPI, config: ServerConfig) -> uvicorn.Config:
    """The ``uvicorn.Config`` that runs ``app`` (``internvl serve`` and the tests both use it): address and
    log level from ``config``, the h11 protocol with the request-head deadline, and the connection cap
    (uvicorn answers 503 once ``limit_concurrency`` connections, this one included, are open)."""
    return uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level, lifespan="on",
                          http=deadline_protocol(config.header_timeout_s),
                          limit_concurrency=config.max_connections + 1)


# ---------------------------------------------------------------------------------------------------
# Loading (`internvl serve`)
# ---------------------------------------------------------------------------------------------------


def load_async_engine(config: ServerConfig, *, progress: bool = False) -> AsyncEngine:
    """Load ``config.model`` (``LLMEngine.from_pretrained``; a tqdm bar over the weights when ``progress``)
    and start its engine loop."""
    llm = LLMEngine.from_pretrained(Path(config.model), dtype=config.dtype, device=config.device, progress=progress,
                                    config=EngineConfig(**config.engine_kwargs()))
    return AsyncEngine(llm, max_queue_len=config.max_queue_len)
