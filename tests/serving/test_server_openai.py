"""Black-box tests of the OpenAI-compatible server with the real ``openai`` client: a uvicorn server on
127.0.0.1 with the tiny random-weight InternVL2-1B checkpoint (weights loaded in the app's lifespan)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import httpx
import openai
import pytest

from internvl_runtime.config import InternVLConfig
from internvl_runtime.processing.inputs import InputProcessor, Message
from internvl_runtime.processing.tokenization import AutoTokenizer
from internvl_runtime.serving.config import ServerConfig

from .helpers import MODEL, data_url, png_bytes, run_server

RED = png_bytes(64, 48, (220, 20, 20))
BLUE = png_bytes(40, 80, (20, 20, 220))


@pytest.fixture(scope="module")
def server(tiny_1b):
    config = ServerConfig(model=str(tiny_1b), max_model_len=2048, num_blocks=1024, max_tiles_per_image=2,
                          max_num_seqs=8)
    with run_server(config) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def processor(tiny_1b):
    """An InputProcessor of our own, to count prompt tokens independently of the server."""
    config = InternVLConfig.from_pretrained(tiny_1b)
    tokenizer = AutoTokenizer.from_pretrained(tiny_1b)
    return InputProcessor.for_model(SimpleNamespace(config=config), tokenizer)


def image_part(data: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(data)}}


def greedy(client, messages, **kwargs):
    kwargs.setdefault("max_tokens", 8)
    return client.chat.completions.create(model=MODEL, messages=messages, temperature=0, **kwargs)


# ---------------------------------------------------------------------------------------------------


def test_models_and_health(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    health = httpx.get(server.base_url + "/health").json()
    assert health["status"] == "ok" and health["demo"] is False


def test_text_chat_usage_counts(client, processor):
    messages = [{"role": "user", "content": "Hello, who are you?"}]
    result = greedy(client, messages, max_tokens=6, logprobs=True)
    choice = result.choices[0]
    assert result.object == "chat.completion" and result.model == MODEL
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    expected_prompt = len(processor.prepare([Message("user", "Hello, who are you?")]).prompt_token_ids)
    assert result.usage.prompt_tokens == expected_prompt
    assert result.usage.completion_tokens == len(choice.logprobs.content) >= 1
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens
    if choice.finish_reason == "length":
        assert result.usage.completion_tokens == 6


def test_image_chat_counts_image_tokens(client, processor):
    wide = png_bytes(96, 48, (10, 200, 10))
    messages = [{"role": "user", "content": [{"type": "text", "text": "What color is this?"}, image_part(wide)]}]
    result = greedy(client, messages, extra_body={"max_dynamic_patch": 1})
    expected = processor.prepare([Message("user", "What color is this?", [wide])], max_num=1)
    assert result.usage.prompt_tokens == len(expected.prompt_token_ids)
    # One 448px tile (max_dynamic_patch 1: no thumbnail) = 256 image tokens in the prompt.
    text_only = len(processor.prepare([Message("user", "What color is this?")]).prompt_token_ids)
    assert result.usage.prompt_tokens > text_only + 256
    # More tiles -> more tokens: max_dynamic_patch is per request (2:1 image: 2 tiles + thumbnail).
    two = greedy(client, messages, max_tokens=1, extra_body={"max_dynamic_patch": 2})
    expected_two = processor.prepare([Message("user", "What color is this?", [wide])], max_num=2)
    assert two.usage.prompt_tokens == len(expected_two.prompt_token_ids) > result.usage.prompt_tokens


def test_several_images_and_multi_turn(client, processor):
    messages = [
        {"role": "user", "content": [image_part(RED), image_part(BLUE), {"type": "text", "text": "Compare them."}]},
        {"role": "assistant", "content": "They differ."},
        {"role": "user", "content": [{"type": "text", "text": "And this one?"}, image_part(RED)]},
    ]
    result = greedy(client, messages, max_tokens=4, extra_body={"max_dynamic_patch": 1})
    expected = processor.prepare([Message("user", "Compare them.", [RED, BLUE]),
                                  Message("assistant", "They differ."),
                                  Message("user", "And this one?", [RED])], max_num=1)
    assert result.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert expected.prompt.count("<img>") == 3
    assert result.choices[0].message.content is not None


def test_system_message_replaces_default(client, processor):
    user = {"role": "user", "content": "Hi"}
    default = greedy(client, [user], max_tokens=1)
    custom = greedy(client, [{"role": "system", "content": "You are a pirate."}, user], max_tokens=1)
    developer = greedy(client, [{"role": "developer", "content": "You are a pirate."}, user], max_tokens=1)
    expected = processor.prepare([Message("system", "You are a pirate."), Message("user", "Hi")])
    assert custom.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert developer.usage.prompt_tokens == custom.usage.prompt_tokens
    assert "You are a pirate." in expected.prompt
    assert default.usage.prompt_tokens == len(processor.prepare([Message("user", "Hi")]).prompt_token_ids)


def test_streaming_equals_non_streaming(client):
    messages = [{"role": "user", "content": [{"type": "text", "text": "Describe."}, image_part(BLUE)]}]
    whole = greedy(client, messages, max_tokens=12, extra_body={"max_dynamic_patch": 1})
    stream = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=12,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"max_dynamic_patch": 1})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == whole.choices[0].message.content
    assert finish == [whole.choices[0].finish_reason]
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


def test_streaming_without_usage_ends_with_done(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True,
            "temperature": 0}
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    assert '"usage"' not in "".join(events)


def test_n_choices(client):
    result = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell me"}],
                                            n=3, max_tokens=5, temperature=1.0, seed=7)
    assert [c.index for c in result.choices] == [0, 1, 2]
    total = 0
    for choice in result.choices:
        assert isinstance(choice.message.content, str)
        assert choice.finish_reason in ("stop", "length")
    total = result.usage.completion_tokens
    assert 3 <= total <= 15
    # streamed: every index shows up and finishes once
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell me"}],
                                            n=2, max_tokens=4, temperature=0, stream=True)
    finished = [c.choices[0].index for c in stream if c.choices and c.choices[0].finish_reason]
    assert sorted(finished) == [0, 1]


def test_stop_strings(client):
    messages = [{"role": "user", "content": [{"type": "text", "text": "Go on."}, image_part(RED)]}]
    base = greedy(client, messages, max_tokens=16, extra_body={"max_dynamic_patch": 1}).choices[0].message.content
    assert len(base) >= 6, base
    stop = base[3:6]
    cut = base.index(stop)
    stopped = greedy(client, messages, max_tokens=16, stop=[stop], extra_body={"max_dynamic_patch": 1})
    assert stopped.choices[0].message.content == base[:cut]
    assert stopped.choices[0].finish_reason == "stop"
    # streamed, the stop string never leaks out in a delta
    stream = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=16,
                                            stop=stop, stream=True, extra_body={"max_dynamic_patch": 1})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == base[:cut]


def test_seed_reproducibility(client):
    messages = [{"role": "user", "content": "Say something random."}]

    def sample(seed):
        result = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=1.0,
                                                seed=seed, logprobs=True)
        return [t.token for t in result.choices[0].logprobs.content]

    first = sample(1234)
    assert sample(1234) == first
    assert any(sample(seed) != first for seed in (1, 2, 3))


def test_logprobs(client):
    result = greedy(client, [{"role": "user", "content": "Count"}], max_tokens=5, logprobs=True, top_logprobs=3)
    content = result.choices[0].logprobs.content
    assert len(content) == result.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 3
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert entry.token == entry.top_logprobs[0].token      # greedy takes the most likely token
        assert entry.logprob == pytest.approx(values[0])
        assert entry.bytes == list(entry.token.encode())
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Count"}],
                                            temperature=0, max_tokens=5, logprobs=True, top_logprobs=3, stream=True)
    streamed = [e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    no_logprobs = greedy(client, [{"role": "user", "content": "Count"}], max_tokens=2)
    assert no_logprobs.choices[0].logprobs is None


def test_max_completion_tokens_and_length(client):
    result = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
        {"type": "text", "text": "Go"}, image_part(RED)]}], max_completion_tokens=3, temperature=0,
        extra_body={"max_dynamic_patch": 1, "min_tokens": 3})
    assert result.usage.completion_tokens == 3
    assert result.choices[0].finish_reason == "length"


def test_completions_endpoint(client, processor):
    result = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5,
                                       temperature=0, logprobs=2)
    choice = result.choices[0]
    assert result.object == "text_completion"
    assert result.usage.prompt_tokens == len(processor.tokenizer.encode("The capital of France is"))
    assert len(choice.logprobs.tokens) == result.usage.completion_tokens
    assert all(len(top) <= 2 for top in choice.logprobs.top_logprobs)
    stream = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5,
                                       temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == choice.text
    several = client.completions.create(model=MODEL, prompt=["a b c", "x y z"], max_tokens=2, n=2, temperature=0)
    assert [c.index for c in several.choices] == [0, 1, 2, 3]


def test_metrics(server, client):
    before = server.metrics()
    greedy(client, [{"role": "user", "content": "metrics please"}], max_tokens=3)
    after = server.metrics()
    assert after["internvl_requests_total"] == before["internvl_requests_total"] + 1
    assert after["internvl_prompt_tokens_total"] > before["internvl_prompt_tokens_total"]
    assert after["internvl_generation_tokens_total"] >= before["internvl_generation_tokens_total"] + 1
    ttft = f'vllm:time_to_first_token_seconds_count{{model_name="{MODEL}"}}'
    assert after[ttft] == before[ttft] + 1
    assert after["internvl_queue_length"] == 0
    assert after["internvl_http_requests_in_progress"] == 0
    assert after['internvl_http_responses_total{code="200"}'] > before['internvl_http_responses_total{code="200"}']
    assert after["internvl_kv_blocks_total"] == 1024
    assert "internvl_kv_blocks_in_use" in after
    text = httpx.get(server.base_url + "/metrics").text
    assert "# TYPE internvl_requests_total counter" in text


def test_client_disconnect_aborts_and_frees_kv_blocks(server):
    before = server.metrics()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Write a very long story."}],
            "max_tokens": 1500, "min_tokens": 1500, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        received = 0
        for line in lines:
            if line.startswith("data: ") and '"content"' in line:
                received += 1
            if received >= 5:
                break
        in_use = server.metrics()["internvl_kv_blocks_in_use"]
        assert in_use > 0                       # the long request holds KV blocks now
    deadline = time.monotonic() + 20
    while True:
        after = server.metrics()
        if after["internvl_queue_length"] == 0 and after["internvl_kv_blocks_in_use"] == 0:
            break
        assert time.monotonic() < deadline, after
        time.sleep(0.05)
    assert after["internvl_requests_aborted_total"] == before["internvl_requests_aborted_total"] + 1
    assert after["internvl_generation_tokens_total"] - before["internvl_generation_tokens_total"] < 1500


def test_non_streaming_client_disconnect_aborts(server):
    before = server.metrics()
    # 1800 forced tokens (the 184-token prompt fills the rest of max_model_len): ~1 s on the tiny model's native float32
    # decode stack (2026-12, Zen 4), four times the client's patience, so the client always leaves first.
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Write a very long story."}],
            "max_tokens": 1800, "min_tokens": 1800, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=0.25)
    deadline = time.monotonic() + 20
    while True:
        after = server.metrics()
        if after["internvl_queue_length"] == 0 and after["internvl_http_requests_in_progress"] == 0:
            break
        assert time.monotonic() < deadline, after
        time.sleep(0.05)
    assert after["internvl_requests_aborted_total"] == before["internvl_requests_aborted_total"] + 1
    assert after["internvl_kv_blocks_in_use"] == 0
    assert after["internvl_generation_tokens_total"] - before["internvl_generation_tokens_total"] < 1800
