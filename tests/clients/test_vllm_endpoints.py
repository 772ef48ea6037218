"""The endpoints vLLM's clients and tooling call besides the OpenAI API, with vLLM's request and answer shapes:
``POST /tokenize`` (a prompt, or chat messages rendered as the chat route renders them), ``POST /detokenize``,
``GET /version``, and ``/metrics`` read with ``prometheus_client``'s own parser (what Prometheus scrapes)."""

from __future__ import annotations

from types import SimpleNamespace

import httpx
import pytest

import internvl_runtime
from internvl_runtime.config import InternVLConfig
from internvl_runtime.processing.inputs import InputProcessor, Message
from internvl_runtime.processing.tokenization import AutoTokenizer
from serving.helpers import TINY_1B

from .conftest import API_KEY, BASE_OPTIONS

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
QUESTION = "Hello, who are you?"


@pytest.fixture(scope="module")
def processor():
    config = InternVLConfig.from_pretrained(TINY_1B)
    return InputProcessor.for_model(SimpleNamespace(config=config), AutoTokenizer.from_pretrained(TINY_1B))


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.base_url + path, json=body, headers=HEADERS, timeout=60)


def test_tokenize_a_prompt(server, model, processor):
    response = post(server, "/tokenize", {"model": model, "prompt": "The quick brown fox"})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["tokens"] == processor.encode("The quick brown fox")
    assert answer["count"] == len(answer["tokens"])
    assert answer["max_model_len"] == BASE_OPTIONS["max_model_len"]


def test_tokenize_messages_counts_what_chat_sends(server, model, client, processor):
    messages = [{"role": "user", "content": QUESTION}]
    response = post(server, "/tokenize", {"model": model, "messages": messages, "add_generation_prompt": True})
    assert response.status_code == 200, response.text
    tokens = response.json()["tokens"]
    assert tokens == processor.prepare([Message("user", QUESTION)]).prompt_token_ids
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=2)
    assert response.json()["count"] == chat.usage.prompt_tokens


def test_detokenize_round_trip(server, model, processor):
    ids = processor.encode("The quick brown fox")
    response = post(server, "/detokenize", {"model": model, "tokens": ids})
    assert response.status_code == 200, response.text
    assert response.json()["prompt"] == "The quick brown fox"


def test_tokenize_unknown_model_is_a_404(server):
    response = post(server, "/tokenize", {"model": "no-such-model", "prompt": "x"})
    assert response.status_code == 404, response.text
    assert "no-such-model" in response.json()["error"]["message"]


def test_version(server):
    response = httpx.get(server.base_url + "/version", timeout=10)
    assert response.status_code == 200, response.text
    assert response.json()["version"] == internvl_runtime.__version__


def scrape(server) -> dict:
    """/metrics through prometheus_client's parser: {family name: family}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.base_url + "/metrics", headers=HEADERS, timeout=10).text
    return {family.name: family for family in text_string_to_metric_families(text)}


def sample(families: dict, name: str, kind: str, sample_suffix: str) -> float:
    """The sum over labels of vLLM's metric ``vllm:<name>`` (a ``kind`` family), over its samples named
    ``<family><sample_suffix>``: vLLM's dashboards read these names."""
    family = families["vllm:" + name]
    assert family.type == kind, family
    return sum(s.value for s in family.samples if s.name == family.name + sample_suffix)


def test_metrics_count_a_request(server, model, client):
    before = scrape(server)
    answer = client.chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTION}],
                                            max_tokens=4, stream=True, stream_options={"include_usage": True})
    usage = [chunk.usage for chunk in answer if chunk.usage][-1]
    after = scrape(server)
    assert (sample(after, "prompt_tokens", "counter", "_total")
            - sample(before, "prompt_tokens", "counter", "_total")) == usage.prompt_tokens
    assert (sample(after, "generation_tokens", "counter", "_total")
            - sample(before, "generation_tokens", "counter", "_total")) == usage.completion_tokens
    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds"):
        assert (sample(after, histogram, "histogram", "_count")
                - sample(before, histogram, "histogram", "_count")) == 1


def test_models_list_the_context_length(client, model):
    [entry] = client.models.list().data
    assert entry.id == model
    assert entry.model_extra["max_model_len"] == BASE_OPTIONS["max_model_len"]


def test_head_health(server):
    assert httpx.head(server.base_url + "/health", timeout=10).status_code == 200
