"""The server's Prometheus metrics (``/metrics``), one ``CollectorRegistry`` per app, named as vLLM's where they
mean the same, so that vLLM's dashboards and alerts work unchanged (label ``model_name``: the first served name).

Two sources, neither of which waits for the engine thread (ARCHITECTURE.md, "Threading rule"):

- **what the engine publishes**, read at scrape time (``_Published``, a collector): its counters
  (``AsyncEngine.stats``: prompt and generated tokens, prefix-cache queries and hits, requests added, failed,
  aborted), the scheduler's queue sizes and the KV blocks in use, which the engine thread publishes after
  each step; and the HTTP layer's response counts;
- **per request, as its outputs reach its handler** (``ServerMetrics`` is the ``AsyncEngine``'s
  ``OutputObserver``): time to first token, inter-token latency, end-to-end latency, prompt and generated
  tokens per request, finished requests by reason. These are prometheus_client histograms and counters:
  they only ever go up.

vLLM's names served here: ``vllm:num_requests_running``, ``vllm:num_requests_waiting``,
``vllm:kv_cache_usage_perc``, ``vllm:prompt_tokens_total``, ``vllm:generation_tokens_total``,
``vllm:prefix_cache_queries_total``, ``vllm:prefix_cache_hits_total``, ``vllm:request_success_total``
(``finished_reason``: stop, length, abort, error), ``vllm:time_to_first_token_seconds``,
``vllm:inter_token_latency_seconds``, ``vllm:e2e_request_latency_seconds``, ``vllm:request_prompt_tokens``,
``vllm:request_generation_tokens`` (and ``vllm:num_preemptions_total`` once the engine counts preemptions).
Ours, kept from before: ``internvl_model_ready``, ``internvl_http_responses_total{code}``,
``internvl_http_requests_in_progress``, ``internvl_requests_total``, ``internvl_requests_failed_total``,
``internvl_requests_aborted_total``, ``internvl_prompt_tokens_total``, ``internvl_generation_tokens_total``,
``internvl_queue_length``, ``internvl_kv_blocks_total``, ``internvl_kv_blocks_in_use``.

Example::

    metrics = ServerMetrics(state)
    engine.add_observer(metrics)
    text = metrics.render()          # the Prometheus text format
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import cast

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..engine.engine import RequestOutput
from .state import ServingState

#: The content type of the Prometheus text format (what ``generate_latest`` writes).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Finish reasons every scrape shows (at 0 before any): vLLM's three, and ours for a request that failed.
FINISHED_REASONS = ("stop", "length", "abort", "error")

# Bucket bounds in seconds; wide enough for a CPU-served 76B model (minutes) and fine enough for a GPU (ms).
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                480.0, 960.0, 1920.0, 7680.0)


def token_buckets(max_value: int) -> tuple[float, ...]:
    """1, 2, 5, 10, 20, 50, ... up to ``max_value`` (token counts per request; vLLM's 1-2-5 series)."""
    bounds: list[float] = []
    scale = 1
    while True:
        for step in (1, 2, 5):
            if step * scale > max_value:
                return tuple(bounds) or (1.0,)
            bounds.append(float(step * scale))
        scale *= 10


@dataclass
class _Timing:
    """A running request's clock, as its handler sees it."""

    last_output: float


class _Published(Collector):
    """At each scrape: the counters and gauges the engine thread and the HTTP layer publish (no waiting)."""

    def __init__(self, state: ServingState, labels: dict[str, str]) -> None:
        self.state = state
        self.labels = labels

    def collect(self) -> Iterator[Metric]:
        state = self.state
        engine = state.engine
        names, values = list(self.labels), list(self.labels.values())

        def gauge(name: str, doc: str, value: float, *, labelled: bool = True) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=names if labelled else [])
            family.add_metric(values if labelled else [], value)
            return family

        def counter(name: str, doc: str, value: float, *, labelled: bool = True) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=names if labelled else [])
            family.add_metric(values if labelled else [], value)
            return family

        yield gauge("internvl_model_ready", "1 once the weights are loaded and the engine loop runs.",
                    float(engine is not None and engine.is_running), labelled=False)
        responses = CounterMetricFamily("internvl_http_responses", "HTTP responses sent, by status code.",
                                        labels=["code"])
        for code, n in sorted(state.http_responses.items()):
            responses.add_metric([str(code)], float(n))
        yield responses
        yield gauge("internvl_http_requests_in_progress", "Generation requests the HTTP layer is handling.",
                    float(state.active), labelled=False)
        if engine is None:
            return
        stats = engine.stats
        running, waiting = engine.num_running, engine.num_waiting
        total, free = engine.kv_blocks_total, engine.kv_blocks_free
        # vLLM's names
        yield gauge("vllm:num_requests_running", "Number of requests in model execution batches.", running)
        yield gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", waiting)
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                    (total - free) / total if total else 0.0)
        yield counter("vllm:prompt_tokens", "Number of prefill tokens processed.", stats["prompt_tokens"])
        yield counter("vllm:generation_tokens", "Number of generation tokens processed.", stats["generated_tokens"])
        yield counter("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
                      stats["prompt_tokens"])
        yield counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
                      stats["cached_prompt_tokens"])
        preemptions = cast(Mapping[str, int], stats).get("preemptions")     # when the engine counts them
        if preemptions is not None:
            yield counter("vllm:num_preemptions", "Cumulative number of preemptions from the engine.", preemptions)
        # ours, as before
        yield counter("internvl_requests", "Requests accepted by the engine.", stats["requests_added"],
                      labelled=False)
        yield counter("internvl_requests_failed", "Requests the engine refused or failed.",
                      stats["requests_refused"] + stats["requests_failed"], labelled=False)
        yield counter("internvl_requests_aborted", "Requests cancelled before they finished (client gone).",
                      stats["requests_aborted"], labelled=False)
        yield counter("internvl_prompt_tokens", "Prompt tokens processed.", stats["prompt_tokens"], labelled=False)
        yield counter("internvl_generation_tokens", "Tokens generated.", stats["generated_tokens"], labelled=False)
        yield gauge("internvl_queue_length", "Requests in the engine (running and waiting).",
                    float(engine.num_pending), labelled=False)
        yield gauge("internvl_kv_blocks_total", "KV-cache blocks.", float(total), labelled=False)
        yield gauge("internvl_kv_blocks_in_use", "KV-cache blocks in use.", float(total - free), labelled=False)


class ServerMetrics:
    """The app's registry, and the ``OutputObserver`` that fills its per-request histograms (see the module
    docstring). ``max_model_len`` sizes the token-count buckets."""

    def __init__(self, state: ServingState, *, max_model_len: int = 32768) -> None:
        self.registry = CollectorRegistry()
        self.model_name = state.config.model_name
        labels = {"model_name": self.model_name}
        self.registry.register(_Published(state, labels))
        names = list(labels)
        tokens = token_buckets(max_model_len)

        def histogram(name: str, doc: str, buckets: Iterable[float]) -> Histogram:
            return Histogram(name, doc, names, buckets=tuple(buckets), registry=self.registry)

        self.success = Counter("vllm:request_success", "Count of successfully processed requests.",
                               [*names, "finished_reason"], registry=self.registry)
        for reason in FINISHED_REASONS:
            self.success.labels(self.model_name, reason)
        self.ttft = histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              _TTFT_BUCKETS).labels(self.model_name)
        self.itl = histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             _ITL_BUCKETS).labels(self.model_name)
        self.e2e = histogram("vllm:e2e_request_latency_seconds",
                             "Histogram of e2e request latency in seconds.", _E2E_BUCKETS).labels(self.model_name)
        self.prompt_tokens = histogram("vllm:request_prompt_tokens", "Number of prefill tokens processed.",
                                       tokens).labels(self.model_name)
        self.generation_tokens = histogram("vllm:request_generation_tokens",
                                           "Number of generation tokens processed.", tokens).labels(self.model_name)
        self._running: dict[str, _Timing] = {}

    # -- OutputObserver (on the event loop, as each output reaches its handler) --------------------------
    def output(self, output: RequestOutput) -> None:
        now = time.monotonic()
        timing = self._running.get(output.request_id)
        if timing is None:
            if output.first_token_time is not None and output.arrival_time:
                self.ttft.observe(max(0.0, output.first_token_time - output.arrival_time))
            timing = self._running[output.request_id] = _Timing(now)
        elif output.new_token_ids:
            self.itl.observe(max(0.0, now - timing.last_output))
            timing.last_output = now
        if output.finished:
            self._running.pop(output.request_id, None)
            if output.arrival_time:
                self.e2e.observe(max(0.0, now - output.arrival_time))
            self.prompt_tokens.observe(output.num_prompt_tokens)
            self.generation_tokens.observe(len(output.token_ids))
            self.success.labels(self.model_name, output.finish_reason or "stop").inc()

    def ended(self, request_id: str, reason: str) -> None:
        self._running.pop(request_id, None)
        self.success.labels(self.model_name, reason).inc()

    # -- the endpoint --------------------------------------------------------------------------------------
    def render(self) -> bytes:
        """Every metric in the Prometheus text format."""
        return generate_latest(self.registry)
