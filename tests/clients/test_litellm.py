"""litellm's OpenAI-compatible provider (``model="openai/<name>"`` with ``api_base``): text, stream, and a
``json_schema`` response format whose answer validates."""

from __future__ import annotations

import json

import jsonschema
import litellm
import pytest

from .conftest import API_KEY

# litellm's lazily imported GitHub Copilot provider defines a TypedDict pydantic warns about (not ours).
pytestmark = pytest.mark.filterwarnings("ignore:Item.* using the `ReadOnly` qualifier:UserWarning")

ASK = [{"role": "user", "content": "Hello, who are you?"}]
# Every field bounded, so even random weights finish the object well within max_tokens.
SCHEMA = {
    "type": "object",
    "properties": {
        "mood": {"type": "string", "enum": ["happy", "sad", "calm"]},
        "score": {"type": "integer", "minimum": 1, "maximum": 5},
    },
    "required": ["mood", "score"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def options(base_url, model) -> dict:
    return {"model": f"openai/{model}", "api_base": base_url, "api_key": API_KEY, "num_retries": 0, "timeout": 120}


def test_completion_text(options):
    response = litellm.completion(messages=ASK, max_tokens=6, **options)
    choice = response.choices[0]
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert response.usage.prompt_tokens > 0 and 0 < response.usage.completion_tokens <= 6


def test_completion_stream(options):
    chunks = list(litellm.completion(messages=ASK, max_tokens=6, stream=True, **options))
    assert chunks
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert isinstance(text, str)
    assert any(chunk.choices and chunk.choices[0].finish_reason in ("stop", "length") for chunk in chunks)


def test_completion_json_schema(options):
    response = litellm.completion(
        messages=[{"role": "user", "content": "How do you feel, as JSON?"}], max_tokens=100,
        response_format={"type": "json_schema", "json_schema": {"name": "feeling", "schema": SCHEMA, "strict": True}},
        **options)
    jsonschema.validate(json.loads(response.choices[0].message.content), SCHEMA)
