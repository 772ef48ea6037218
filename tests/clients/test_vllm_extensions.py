"""The request fields vLLM's OpenAI server adds, sent as vLLM documents it (the openai SDK's ``extra_body``):
sampling extensions, stop handling, assistant prefill, ``chat_template_kwargs`` and the guided/structured
output fields, whose outputs must validate or match even with random weights.

Greedy answers of the tiny checkpoint are short (it emits its stop token after a few tokens), which is what
makes ``ignore_eos`` and ``min_tokens`` observable; the tests check that premise before relying on it.
"""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import jsonschema
import pytest

from internvl_runtime.config import InternVLConfig
from internvl_runtime.processing.inputs import InputProcessor, Message
from internvl_runtime.processing.tokenization import AutoTokenizer
from serving.helpers import TINY_1B

QUESTION = "Hello, who are you?"
ASK = [{"role": "user", "content": QUESTION}]
SCHEMA = {
    "type": "object",
    "properties": {
        "colour": {"type": "string", "enum": ["red", "green", "blue"]},
        "size": {"type": "integer", "minimum": 1, "maximum": 99},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["colour", "size", "tags"],
    "additionalProperties": False,
}
REGEX = r"[a-c]{3}-[0-9]{2}"
CHOICES = ["yes", "no", "maybe so"]


@pytest.fixture(scope="module")
def processor():
    config = InternVLConfig.from_pretrained(TINY_1B)
    return InputProcessor.for_model(SimpleNamespace(config=config), AutoTokenizer.from_pretrained(TINY_1B))


def greedy(client, model, messages=ASK, **fields):
    """A temperature-0 chat request; ``fields`` go in ``extra_body`` except the SDK's own parameters."""
    own = {k: fields.pop(k) for k in ("max_tokens", "stop", "logprobs", "top_logprobs") if k in fields}
    own.setdefault("max_tokens", 16)
    return client.chat.completions.create(model=model, messages=messages, temperature=0, extra_body=fields or None,
                                          **own)


@pytest.fixture(scope="module")
def baseline(client, model):
    """The greedy answer without extensions: it must stop on its own, before max_tokens."""
    answer = greedy(client, model)
    assert answer.choices[0].finish_reason == "stop" and answer.usage.completion_tokens < 8, answer
    return answer


# -- sampling extensions -------------------------------------------------------------------------


@pytest.mark.parametrize("fields", [
    {"top_k": 5}, {"top_k": -1}, {"min_p": 0.1}, {"repetition_penalty": 1.2}, {"top_k": 3, "min_p": 0.05},
    {"skip_special_tokens": False}, {"spaces_between_special_tokens": False},
    {"skip_special_tokens": True, "spaces_between_special_tokens": True},
], ids=lambda fields: ",".join(fields))
def test_sampling_extensions_accepted(client, model, fields):
    answer = client.chat.completions.create(model=model, messages=ASK, max_tokens=6, temperature=0.8,
                                            extra_body=fields)
    assert isinstance(answer.choices[0].message.content, str)
    assert answer.choices[0].finish_reason in ("stop", "length")


def test_ignore_eos_runs_to_max_tokens(client, model, baseline):
    answer = greedy(client, model, max_tokens=12, ignore_eos=True)
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == 12


def test_min_tokens(client, model, baseline):
    answer = greedy(client, model, max_tokens=16, min_tokens=10)
    assert answer.usage.completion_tokens >= 10


def test_stop_token_ids(client, model, baseline):
    """Every token of the vocabulary a stop token: the answer ends after its first token."""
    vocab = json.loads((TINY_1B / "config.json").read_text())["llm_config"]["vocab_size"]
    answer = greedy(client, model, max_tokens=8, stop_token_ids=list(range(vocab)))
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage.completion_tokens == 1


@pytest.mark.parametrize("include", [False, True])
def test_include_stop_str_in_output(client, model, baseline, include):
    text = baseline.choices[0].message.content
    words = text.split()
    assert len(words) >= 2, f"the greedy answer {text!r} is too short to pick a stop string from"
    stop = words[-1]
    answer = greedy(client, model, stop=[stop], include_stop_str_in_output=include)
    cut = text.find(stop) + (len(stop) if include else 0)
    assert answer.choices[0].message.content == text[:cut]
    assert answer.choices[0].finish_reason == "stop"


# -- prompt construction -------------------------------------------------------------------------


def test_continue_final_message(client, model, processor):
    """The answer continues the assistant prefill: the same tokens as a raw completion of the rendered
    conversation followed by the prefill text."""
    prefill = "My name is"
    messages = [*ASK, {"role": "assistant", "content": prefill}]
    answer = greedy(client, model, messages, max_tokens=6, continue_final_message=True, add_generation_prompt=False)
    rendered = processor.prepare([Message("user", QUESTION)]).prompt + prefill
    assert answer.usage.prompt_tokens == len(processor.encode(rendered))
    raw = client.completions.create(model=model, prompt=rendered, max_tokens=6, temperature=0)
    assert answer.choices[0].message.content == raw.choices[0].text


def test_chat_template_kwargs(client, model, baseline):
    answer = greedy(client, model, chat_template_kwargs={"enable_thinking": False})
    # The official templates take no such variable: the prompt and the greedy answer are unchanged.
    assert answer.usage.prompt_tokens == baseline.usage.prompt_tokens
    assert answer.choices[0].message.content == baseline.choices[0].message.content


# -- guided / structured output ------------------------------------------------------------------


def test_guided_json(client, model):
    answer = greedy(client, model, max_tokens=200, guided_json=SCHEMA)
    jsonschema.validate(json.loads(answer.choices[0].message.content), SCHEMA)


def test_guided_regex(client, model):
    answer = greedy(client, model, max_tokens=20, guided_regex=REGEX)
    assert re.fullmatch(REGEX, answer.choices[0].message.content)


def test_guided_choice(client, model):
    answer = greedy(client, model, max_tokens=20, guided_choice=CHOICES)
    assert answer.choices[0].message.content in CHOICES


def test_guided_choice_sampled(client, model):
    for _ in range(3):
        answer = client.chat.completions.create(model=model, messages=ASK, max_tokens=20, temperature=1.5,
                                                extra_body={"guided_choice": CHOICES})
        assert answer.choices[0].message.content in CHOICES


@pytest.mark.parametrize("constraint", [{"json": SCHEMA}, {"regex": REGEX}, {"choice": CHOICES}],
                         ids=["json", "regex", "choice"])
def test_structured_outputs(client, model, constraint):
    answer = greedy(client, model, max_tokens=200, structured_outputs=constraint)
    content = answer.choices[0].message.content
    if "json" in constraint:
        jsonschema.validate(json.loads(content), SCHEMA)
    elif "regex" in constraint:
        assert re.fullmatch(REGEX, content)
    else:
        assert content in CHOICES


def test_guided_json_in_a_stream(client, model):
    chunks = list(client.chat.completions.create(model=model, messages=ASK, max_tokens=200, temperature=0.8,
                                                 stream=True, extra_body={"guided_json": SCHEMA}))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    jsonschema.validate(json.loads(text), SCHEMA)


def test_guided_choice_on_completions(client, model):
    answer = client.completions.create(model=model, prompt="The answer is", max_tokens=20, temperature=0.8,
                                       extra_body={"guided_choice": CHOICES})
    assert answer.choices[0].text in CHOICES
