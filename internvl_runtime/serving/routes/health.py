"""``/health`` (is the model loaded and the engine loop running) and ``/metrics`` (Prometheus text)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from ..state import ServingState
from .common import serving_state

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """200 ``{"status": "ok"}`` once the weights are loaded and the engine loop runs; 503 ``loading`` before,
    503 ``error`` with the cause if loading failed or the engine loop stopped."""
    state = serving_state(request)
    engine = state.engine
    if engine is not None and engine.is_running:
        return JSONResponse({"status": "ok", "model": state.config.model_name, "demo": state.config.demo})
    error: str | None
    if engine is not None:          # it ran and stopped: never a silent "loading"
        error = f"the engine loop stopped: {engine.death}" if engine.death else "the engine was shut down"
    else:
        error = state.load_error
    body = {"status": "error" if error else "loading", "model": state.config.model_name, "demo": state.config.demo}
    if error:
        body["error"] = error
    return JSONResponse(body, status_code=503)


@router.get("/metrics")
async def metrics(request: Request) -> PlainTextResponse:
    """Prometheus text format: requests, tokens in and out, time to first token, queue, KV blocks."""
    return PlainTextResponse(metrics_text(serving_state(request)), media_type="text/plain; version=0.0.4")


def metrics_text(state: ServingState) -> str:
    """The HTTP layer's counters, then the engine's (``AsyncEngine.stats``: ``LLMEngine``'s counters) and
    the KV block counts its thread publishes after each step: a scrape never waits for the engine."""
    engine = state.engine
    out: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        out.append(f"# HELP internvl_{name} {help_text}")
        out.append(f"# TYPE internvl_{name} {kind}")
        for labels, value in samples:
            out.append(f"internvl_{name}{labels} {value:.10g}")

    metric("model_ready", "gauge", "1 once the weights are loaded and the engine loop runs.",
           [("", float(engine is not None and engine.is_running))])
    metric("http_responses_total", "counter", "HTTP responses sent, by status code.",
           [(f'{{code="{code}"}}', float(n)) for code, n in sorted(state.http_responses.items())])
    metric("http_requests_in_progress", "gauge", "Generation requests the HTTP layer is handling.",
           [("", float(state.active))])
    if engine is None:
        return "\n".join(out) + "\n"
    stats = engine.stats
    metric("requests_total", "counter", "Requests accepted by the engine.", [("", stats["requests_added"])])
    metric("requests_failed_total", "counter", "Requests the engine refused or failed.",
           [("", stats["requests_refused"] + stats["requests_failed"])])
    metric("requests_aborted_total", "counter", "Requests cancelled before they finished (client gone).",
           [("", stats["requests_aborted"])])
    metric("prompt_tokens_total", "counter", "Prompt tokens processed.", [("", stats["prompt_tokens"])])
    metric("generation_tokens_total", "counter", "Tokens generated.", [("", stats["generated_tokens"])])
    ttft = sorted(engine.ttft_seconds)
    samples = []
    for q in (0.5, 0.9, 0.99):
        value = ttft[min(len(ttft) - 1, int(q * len(ttft)))] if ttft else float("nan")
        samples.append((f'{{quantile="{q}"}}', value))
    samples += [("_sum", sum(ttft)), ("_count", float(len(ttft)))]
    metric("time_to_first_token_seconds", "summary",
           "Seconds from arrival to the first token (over the last 1000 requests).", samples)
    metric("queue_length", "gauge", "Requests in the engine (running and waiting).",
           [("", float(engine.num_pending))])
    total, free = engine.kv_blocks_total, engine.kv_blocks_free
    metric("kv_blocks_total", "gauge", "KV-cache blocks.", [("", float(total))])
    metric("kv_blocks_in_use", "gauge", "KV-cache blocks in use.", [("", float(total - free))])
    return "\n".join(out) + "\n"
