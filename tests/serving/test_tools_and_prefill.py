"""Tool conversations and assistant prefill through the server (tiny random-weight InternVL2-1B, Hermes-2
format): the history's calls and results reach the prompt in the model's format, a prefill continues the
assistant's text, and the answer's calls come back in OpenAI's shape."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

from internvl_runtime.serving.config import ServerConfig

from .helpers import MODEL, run_server

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
]


@pytest.fixture(scope="module")
def http(tiny_1b):
    config = ServerConfig(model=str(tiny_1b), max_model_len=2048, num_blocks=512, max_num_seqs=4)
    with run_server(config) as running, httpx.Client(base_url=running.base_url, timeout=60) as client:
        yield client


def prompt_of(http: httpx.Client, **body: object) -> str:
    tokens = http.post("/tokenize", json={"model": MODEL, **body})
    assert tokens.status_code == 200, tokens.text
    text = http.post("/detokenize", json={"model": MODEL, "tokens": tokens.json()["tokens"]})
    assert text.status_code == 200, text.text
    return str(text.json()["prompt"])


def test_tool_history_is_rendered_in_the_hermes_format(http):
    prompt = prompt_of(http, messages=HISTORY, tools=TOOLS)
    assert "<tools>" in prompt and '"get_weather"' in prompt
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert "<|im_start|>tool\n<tool_response>\nsunny, 21 C\n</tool_response><|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    answer = http.post("/v1/chat/completions", json={"model": MODEL, "messages": HISTORY, "tools": TOOLS,
                                                      "max_tokens": 3, "temperature": 0})
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["prompt_tokens"] == len(http.post("/tokenize", json={
        "model": MODEL, "messages": HISTORY, "tools": TOOLS}).json()["tokens"])


def test_tool_choice_none_offers_no_tools(http):
    assert "<tools>" not in prompt_of(http, messages=HISTORY[:1], tools=TOOLS, tool_choice="none")


def test_prefill_continues_the_assistant_text(http):
    messages = [{"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "One, two,"}]
    prompt = prompt_of(http, messages=messages, continue_final_message=True)
    assert prompt.endswith("<|im_start|>assistant\nOne, two,")
    plain = prompt_of(http, messages=messages[:1], add_generation_prompt=False)
    assert plain.endswith("Count to three.<|im_end|>\n") or plain.endswith("Count to three.<|im_end|>")
    answer = http.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 2,
                                                      "continue_final_message": True, "temperature": 0})
    assert answer.status_code == 200, answer.text


def test_a_named_function_that_is_not_offered_is_a_400(http):
    bad = http.post("/v1/chat/completions", json={"model": MODEL, "messages": HISTORY[:1], "tools": TOOLS,
                                                   "tool_choice": {"type": "function", "function": {"name": "nope"}}})
    assert bad.status_code == 400 and "nope" in bad.json()["error"]["message"]


BOUNDED_TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                     "unit": {"enum": ["C", "F"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}]


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_calls_always_parse_and_validate(http, tool_choice):
    body = {"model": MODEL, "messages": HISTORY[:1], "tools": BOUNDED_TOOLS, "tool_choice": tool_choice,
            "max_tokens": 200, "temperature": 1.0, "seed": 7, "parallel_tool_calls": False}
    answer = http.post("/v1/chat/completions", json=body)
    assert answer.status_code == 200, answer.text
    choice = answer.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    [call] = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather" and call["id"]
    jsonschema.validate(json.loads(call["function"]["arguments"]), BOUNDED_TOOLS[0]["function"]["parameters"])

    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as stream:
        events = [json.loads(line[6:]) for line in stream.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    deltas = [d for e in events for c in e["choices"] for d in c["delta"].get("tool_calls") or []]
    assert deltas and deltas[0]["id"] and deltas[0]["function"]["name"] == "get_weather"
    arguments = "".join(d["function"].get("arguments", "") for d in deltas)
    assert arguments == call["function"]["arguments"]       # the same seed: the same call, streamed
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_structured_output_fields_hold_through_the_server(http):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                                "maximum": 99}},
              "required": ["ok", "n"], "additionalProperties": False}
    for extra in ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}},
                  {"guided_json": schema}, {"structured_outputs": {"json": schema}}):
        answer = http.post("/v1/chat/completions", json={"model": MODEL, "messages": HISTORY[:1], "max_tokens": 64,
                                                          "temperature": 1.0, "seed": 3, **extra})
        assert answer.status_code == 200, answer.text
        jsonschema.validate(json.loads(answer.json()["choices"][0]["message"]["content"]), schema)
    choice = http.post("/v1/completions", json={"model": MODEL, "prompt": "Pick:", "max_tokens": 8,
                                                "guided_choice": ["red", "green"]})
    assert choice.status_code == 200 and choice.json()["choices"][0]["text"] in ("red", "green"), choice.text
    both = http.post("/v1/chat/completions", json={"model": MODEL, "messages": HISTORY[:1], "tools": BOUNDED_TOOLS,
                                                    "tool_choice": "required", "guided_regex": "a+"})
    assert both.status_code == 400 and "tool_choice" in both.json()["error"]["message"]


@pytest.mark.parametrize("variant", ["tiny-2B", "tiny-4B", "tiny-76B"])   # InternLM2 actions, Phi-3, Llama-3 Hermes
def test_forced_calls_in_every_tool_format(tiny_1b, variant):
    folder = tiny_1b.parent / variant
    body = {"model": variant, "messages": HISTORY[:1], "tools": BOUNDED_TOOLS, "tool_choice": "required",
            "max_tokens": 120, "seed": 1}
    with run_server(ServerConfig(model=str(folder), max_model_len=2048, num_blocks=256)) as running, \
            httpx.Client(base_url=running.base_url, timeout=120) as client:
        answer = client.post("/v1/chat/completions", json=body)
        assert answer.status_code == 200, answer.text
        choice = answer.json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls" and not choice["message"]["content"], choice
        [call] = choice["message"]["tool_calls"]
        jsonschema.validate(json.loads(call["function"]["arguments"]), BOUNDED_TOOLS[0]["function"]["parameters"])
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as stream:
            events = [json.loads(line[6:]) for line in stream.iter_lines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
    deltas = [d for e in events for c in e["choices"] for d in c["delta"].get("tool_calls") or []]
    assert "".join(d["function"].get("arguments", "") for d in deltas) == call["function"]["arguments"]
    assert not "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])   # no tag leaked


def test_reasoning_content_is_null_for_a_model_without_reasoning(http):
    """As vLLM's response model writes it: ``reasoning_content`` null in a message of a model that does not reason
    (only harmony answers fill it), and left out of the streamed deltas (vLLM sends only the fields set)."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
    message = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
    assert "reasoning_content" in message and message["reasoning_content"] is None
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    assert chunks and all("reasoning_content" not in c["delta"] for chunk in chunks for c in chunk["choices"])
