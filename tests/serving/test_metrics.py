"""/metrics as Prometheus reads it (``prometheus_client.parser``): vLLM's names with ``model_name``, counters that
never go down, histograms that count each request served once, an aborted stream counted as an abort, one
registry per app."""

from __future__ import annotations

import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from internvl_runtime.serving.app import create_app
from internvl_runtime.serving.config import ServerConfig

from .helpers import MODEL, run_server

HISTOGRAMS = ("vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds", "vllm:request_prompt_tokens",
              "vllm:request_generation_tokens")


@pytest.fixture(scope="module")
def server(tiny_1b):
    config = ServerConfig(model=str(tiny_1b), max_model_len=1024, num_blocks=128)
    with run_server(config) as running:
        yield running


def scrape(server) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """``{sample name: {sorted labels: value}}`` of one scrape, parsed as Prometheus parses it."""
    response = httpx.get(server.base_url + "/metrics", timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def value(samples, name: str, **labels: str) -> float:
    return samples[name][tuple(sorted({"model_name": MODEL, **labels}.items()))]


def chat(client: httpx.Client, text: str, max_tokens: int, **extra) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 0, **extra}
    response = client.post("/v1/chat/completions", json=body)
    response.raise_for_status()
    return response.json()


def test_names_types_and_labels_are_vllms(server):
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        chat(client, "names", 2)
    text = httpx.get(server.base_url + "/metrics").text
    kinds = {family.name: family.type for family in text_string_to_metric_families(text)}
    for name in (*HISTOGRAMS, "vllm:inter_token_latency_seconds"):
        assert kinds[name] == "histogram", name
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert kinds[name] == "gauge", name
    for name in ("vllm:prompt_tokens", "vllm:generation_tokens", "vllm:request_success",
                 "vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "internvl_requests",
                 "internvl_http_responses"):
        assert kinds[name] == "counter", name
    assert "summary" not in kinds.values() and "quantile" not in text       # the windowed summary is gone
    samples = scrape(server)
    assert value(samples, "vllm:num_requests_running") == value(samples, "vllm:num_requests_waiting") == 0
    assert 0 <= value(samples, "vllm:kv_cache_usage_perc") <= 1
    assert value(samples, "vllm:generation_tokens_total") == samples["internvl_generation_tokens_total"][()] >= 2


def test_histograms_count_each_request_served_and_counters_only_go_up(server):
    before = scrape(server)
    tokens = []
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        for i, max_tokens in enumerate((3, 5, 4)):
            tokens.append(chat(client, f"request {i}", max_tokens, min_tokens=max_tokens)["usage"]["completion_tokens"])
        with client.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": "streamed", "max_tokens": 4,
                                                            "min_tokens": 4, "stream": True}) as stream:
            assert [line for line in stream.iter_lines() if line][-1] == "data: [DONE]"
        tokens.append(4)
    after = scrape(server)
    served = len(tokens)
    for name in HISTOGRAMS:
        assert value(after, name + "_count") - value(before, name + "_count") == served, name
    assert value(after, "vllm:request_generation_tokens_sum") - value(
        before, "vllm:request_generation_tokens_sum") == sum(tokens)
    # one inter-token gap per token after a request's first
    itl = "vllm:inter_token_latency_seconds_count"
    gaps = value(after, itl) - value(before, itl)
    assert gaps == sum(tokens) - served
    finished = sum(value(after, "vllm:request_success_total", finished_reason=r)
                   - value(before, "vllm:request_success_total", finished_reason=r) for r in ("stop", "length"))
    assert finished == served
    assert value(after, "vllm:generation_tokens_total") - value(before, "vllm:generation_tokens_total") == sum(tokens)
    assert value(after, "vllm:time_to_first_token_seconds_sum") > value(before, "vllm:time_to_first_token_seconds_sum")
    # monotonic: every counter sample and every histogram bucket, count and sum is at least what it was
    for name, series in before.items():
        if name.endswith(("_total", "_bucket", "_count", "_sum")):
            for labels, old in series.items():
                assert after[name][labels] >= old, (name, labels)


def test_a_stream_the_client_leaves_counts_as_an_abort(server):
    before = scrape(server)
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "long"}], "max_tokens": 400,
                "min_tokens": 400, "stream": True}
        with client.stream("POST", "/v1/chat/completions", json=body) as stream:
            for line in stream.iter_lines():
                if '"content"' in line and '"content":""' not in line:
                    break                   # leave after the first token
    deadline = time.monotonic() + 60            # the server notices the client left on its next write
    while True:
        after = scrape(server)
        if value(after, "vllm:request_success_total", finished_reason="abort") > value(
                before, "vllm:request_success_total", finished_reason="abort") or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert value(after, "vllm:request_success_total", finished_reason="abort") == value(
        before, "vllm:request_success_total", finished_reason="abort") + 1
    assert value(after, "vllm:e2e_request_latency_seconds_count") == value(before,
                                                                           "vllm:e2e_request_latency_seconds_count")


def test_each_app_has_its_own_registry(tiny_1b):
    config = ServerConfig(model=str(tiny_1b))

    def never_loaded():
        raise AssertionError("not started")

    first, second = create_app(never_loaded, config), create_app(never_loaded, config)
    assert first.state.metrics.registry is not second.state.metrics.registry
    assert b"internvl_model_ready 0.0" in first.state.metrics.render()
