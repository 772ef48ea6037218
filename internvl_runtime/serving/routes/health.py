"""``/health`` (is the model loaded and the engine loop running; GET and HEAD) and ``/metrics`` (Prometheus text,
``serving/metrics.py``)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ..metrics import CONTENT_TYPE, ServerMetrics
from .common import serving_state

router = APIRouter()


@router.api_route("/health", methods=["GET", "HEAD"])
async def health(request: Request) -> Response:
    """200 ``{"status": "ok"}`` once the weights are loaded and the engine loop runs; 503 ``loading`` before,
    503 ``error`` with the cause if loading failed or the engine loop stopped. HEAD: the same status and
    headers, no body (load balancers' probes)."""
    state = serving_state(request)
    engine = state.engine
    body: dict[str, object] = {"status": "ok", "model": state.config.model_name, "demo": state.config.demo}
    status = 200
    if engine is None or not engine.is_running:
        error: str | None
        if engine is not None:          # it ran and stopped: never a silent "loading"
            error = f"the engine loop stopped: {engine.death}" if engine.death else "the engine was shut down"
        else:
            error = state.load_error
        body["status"] = "error" if error else "loading"
        if error:
            body["error"] = error
        status = 503
    response = JSONResponse(body, status_code=status)
    if request.method == "HEAD":        # as GET, without the body (its length stays in the headers)
        return Response(status_code=status, headers=dict(response.headers))
    return response


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus text format (``ServerMetrics``): read from what the engine publishes, never waiting for it."""
    registry = request.app.state.metrics
    assert isinstance(registry, ServerMetrics)
    return Response(registry.render(), media_type=CONTENT_TYPE)
