"""Tool conversations and assistant prefill through the server (tiny random-weight InternVL2-1B, Hermes-2
format): the history's calls and results reach the prompt in the model's format, a prefill continues the
assistant's text, and the answer's calls come back in OpenAI's shape."""

from __future__ import annotations

import httpx
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
