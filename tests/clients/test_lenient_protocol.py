"""Lenient like vLLM, strict where it matters: fields a client adds that this server does not know are
accepted by default (real clients send many: provider extras, newer OpenAI fields, ``cache_control``), the
message forms clients use are understood, and a value of the wrong type or out of range is still a 400 that
names the field."""

from __future__ import annotations

import httpx
import pytest

from serving.helpers import data_url, png_bytes

from .conftest import API_KEY

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
ASK = [{"role": "user", "content": "Hello, who are you?"}]
TILE_TOKENS = 256


def chat(server, body: dict) -> httpx.Response:
    return httpx.post(server.base_url + "/v1/chat/completions", json=body, headers=HEADERS, timeout=120)


def base(model: str, **fields) -> dict:
    return {"model": model, "messages": ASK, "max_tokens": 4, **fields}


@pytest.mark.parametrize("fields", [
    {"some_future_field": 1},
    {"vendor_options": {"a": [1, 2], "b": None}, "another_flag": True},
    {"reasoning_effort": "low", "verbosity": "low", "service_tier": "auto", "prompt_cache_key": "k",
     "safety_identifier": "u-1", "modalities": ["text"], "prediction": None, "audio": None},
    {"parallel_tool_calls": True, "logit_bias": {"15": 1.0}},
], ids=["scalar", "nested", "newer-openai-fields", "parallel_tool_calls-logit_bias"])
def test_unknown_and_common_fields_accepted(server, model, fields):
    response = chat(server, base(model, **fields))
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_unknown_fields_in_messages_and_parts(server, model):
    messages = [{"role": "system", "content": [{"type": "text", "text": "Be brief.",
                                                "cache_control": {"type": "ephemeral"}}]},
                {"role": "user", "name": "alice", "content": "Hello!", "some_extra": 1}]
    response = chat(server, {"model": model, "messages": messages, "max_tokens": 4})
    assert response.status_code == 200, response.text


def test_bare_string_image_url(server, model):
    content = [{"type": "text", "text": "What colour is this?"},
               {"type": "image_url", "image_url": data_url(png_bytes(64, 64, (20, 20, 220)))}]
    response = chat(server, {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 4})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] > TILE_TOKENS        # the image was seen


@pytest.mark.parametrize(("field", "value"), [
    ("max_tokens", "many"), ("temperature", "hot"), ("top_p", [0.5]), ("n", 1.5), ("stream", "yes"),
    ("top_k", "five"), ("min_p", "low"), ("ignore_eos", "sometimes"), ("stop_token_ids", "none"),
    ("presence_penalty", "high"),
])
def test_wrong_type_is_a_400_naming_the_field(server, model, field, value):
    response = chat(server, base(model, **{field: value}))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert field in (error.get("param") or "") or field in error["message"]


@pytest.mark.parametrize(("field", "value"), [
    ("temperature", 5), ("top_p", 1.5), ("n", 0), ("max_tokens", 0), ("presence_penalty", 3),
    ("frequency_penalty", -2.5), ("min_p", 1.5), ("repetition_penalty", 0),
])
def test_out_of_range_is_a_400_naming_the_field(server, model, field, value):
    response = chat(server, base(model, **{field: value}))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert field in (error.get("param") or "") or field in error["message"]
