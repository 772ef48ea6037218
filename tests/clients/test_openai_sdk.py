"""The openai SDK as applications use it, beyond plain text: a history built from ``model_dump()``, the
fields the SDK's users set (``metadata``, ``store``, penalties, explicit nulls), ``responses.create``,
structured output (``json_object``, ``chat.completions.parse`` with a pydantic model) and tool calls
(required, named, streamed, and a ``tool`` message carrying the result back)."""

from __future__ import annotations

import json
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from serving.helpers import data_url, png_bytes

from .conftest import API_KEY

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
ASK = [{"role": "user", "content": "Hello, who are you?"}]

# Random weights: a schema's own bounds (enums, integer ranges, string lengths) are what keep an answer short.
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The local time in a time zone.",
        "parameters": {
            "type": "object",
            "properties": {"utc_offset": {"type": "integer", "minimum": -12, "maximum": 14}},
            "required": ["utc_offset"],
            "additionalProperties": False,
        },
    },
}
TOOLS = {t["function"]["name"]: t for t in (WEATHER, CLOCK)}


class Pet(BaseModel):
    """A structured answer whose every field is bounded, so even random weights finish it."""

    kind: Literal["cat", "dog", "bird"]
    legs: int = Field(ge=0, le=8)
    name: str = Field(max_length=8)


class Alarm(BaseModel):
    """The arguments of a strict function tool (``openai.pydantic_function_tool``)."""

    hour: int = Field(ge=0, le=23)
    label: Literal["wake", "meeting", "tea"]


def check_tool_calls(message, allowed: dict[str, dict]) -> None:
    """Each call is a function call with an id, a known name, and arguments that validate against its
    parameters schema."""
    assert message.tool_calls, f"no tool calls in {message!r}"
    for call in message.tool_calls:
        assert call.type == "function" and call.id
        assert call.function.name in allowed, call.function.name
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, allowed[call.function.name]["function"]["parameters"])


# -- history, common fields, nulls ----------------------------------------------------------------


@pytest.mark.parametrize("tool_calls", ["as-answered", None], ids=["as-answered", "null"])
def test_history_from_model_dump(client, model, tool_calls):
    """``model_dump()`` of an answer carries every field of the message, nulls included; an answer of
    OpenAI's own API dumps ``tool_calls: None`` (the ``null`` case), whatever this server sends."""
    first = client.chat.completions.create(model=model, messages=ASK, max_tokens=6)
    dumped = first.choices[0].message.model_dump()
    assert {"tool_calls", "function_call", "refusal", "audio"} <= dumped.keys()
    if tool_calls is None:
        dumped["tool_calls"] = None
    history = [*ASK, dumped, {"role": "user", "content": "And then?"}]
    second = client.chat.completions.create(model=model, messages=history, max_tokens=6)
    assert isinstance(second.choices[0].message.content, str)
    assert second.usage.prompt_tokens > first.usage.prompt_tokens


def test_metadata_and_store(client, model):
    answer = client.chat.completions.create(model=model, messages=ASK, max_tokens=4,
                                            metadata={"project": "tests"}, store=False, user="someone")
    assert answer.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("penalty", [{"presence_penalty": 0.5}, {"frequency_penalty": 0.5},
                                     {"presence_penalty": -0.5, "frequency_penalty": 1.5}])
def test_presence_and_frequency_penalty(client, model, penalty):
    answer = client.chat.completions.create(model=model, messages=ASK, max_tokens=4, **penalty)
    assert answer.choices[0].finish_reason in ("stop", "length")


def test_nulls_mean_the_default(server, model):
    body = {"model": model, "messages": ASK, "max_tokens": 4, "n": None, "stream": None,
            "stream_options": None, "temperature": None, "top_p": None, "stop": None, "seed": None}
    response = httpx.post(server.base_url + "/v1/chat/completions", json=body, headers=HEADERS, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["object"] == "chat.completion" and len(response.json()["choices"]) == 1


def test_null_include_usage_streams_without_usage(client, model):
    chunks = list(client.chat.completions.create(model=model, messages=ASK, max_tokens=4, stream=True,
                                                 stream_options={"include_usage": None}))
    assert chunks and all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert all(chunk.usage is None for chunk in chunks)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_n_null_through_the_sdk(client, model):
    answer = client.chat.completions.create(model=model, messages=ASK, max_tokens=4, n=None)
    assert len(answer.choices) == 1


# -- /v1/responses -------------------------------------------------------------------------------


def test_responses_create_text(client, model):
    response = client.responses.create(model=model, input="Say hello.", max_output_tokens=8,
                                       instructions="Answer briefly.")
    assert response.object == "response" and response.model == model
    assert response.status in ("completed", "incomplete")
    assert isinstance(response.output_text, str)
    messages = [item for item in response.output if item.type == "message"]
    assert messages and messages[0].role == "assistant"
    assert response.usage.input_tokens > 0 and 0 < response.usage.output_tokens <= 8


def test_responses_create_with_an_image(client, model):
    image = data_url(png_bytes(64, 64, (20, 160, 40)))
    response = client.responses.create(model=model, max_output_tokens=4, input=[{
        "role": "user", "content": [{"type": "input_text", "text": "What colour is this?"},
                                    {"type": "input_image", "image_url": image}]}])
    assert isinstance(response.output_text, str)
    assert response.usage.input_tokens > 256          # one tile is 256 image tokens: the image was seen


def test_responses_create_stream(client, model):
    events = list(client.responses.create(model=model, input="Say hello.", max_output_tokens=8, stream=True))
    kinds = [event.type for event in events]
    assert kinds[0] == "response.created"
    assert kinds[-1] in ("response.completed", "response.incomplete")
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert "response.output_text.delta" in kinds
    assert text == events[-1].response.output_text


# -- structured output ---------------------------------------------------------------------------


def test_response_format_json_object(client, model):
    answer = client.chat.completions.create(model=model, max_tokens=400, response_format={"type": "json_object"},
                                            messages=[{"role": "user", "content": "Describe a cat as JSON."}])
    assert isinstance(json.loads(answer.choices[0].message.content), dict)
    assert answer.choices[0].finish_reason == "stop"


def test_response_format_json_schema(client, model):
    schema = Pet.model_json_schema()
    answer = client.chat.completions.create(
        model=model, max_tokens=200, messages=[{"role": "user", "content": "A pet, please."}],
        response_format={"type": "json_schema", "json_schema": {"name": "pet", "schema": schema, "strict": True}})
    jsonschema.validate(json.loads(answer.choices[0].message.content), schema)


def test_parse_with_a_pydantic_model(client, model):
    completion = client.chat.completions.parse(model=model, response_format=Pet, max_tokens=200,
                                               messages=[{"role": "user", "content": "Describe a pet."}])
    message = completion.choices[0].message
    assert isinstance(message.parsed, Pet), message.content
    assert message.refusal is None


# -- tool calls ----------------------------------------------------------------------------------


def test_tool_choice_required(client, model):
    answer = client.chat.completions.create(
        model=model, max_tokens=200, tools=[WEATHER, CLOCK], tool_choice="required",
        messages=[{"role": "user", "content": "What is the weather in Paris?"}])
    choice = answer.choices[0]
    check_tool_calls(choice.message, TOOLS)
    assert choice.finish_reason == "tool_calls"


def test_tool_choice_named_function(client, model):
    answer = client.chat.completions.create(
        model=model, max_tokens=200, tools=[WEATHER, CLOCK],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        messages=[{"role": "user", "content": "What time is it in Tokyo?"}])
    choice = answer.choices[0]
    check_tool_calls(choice.message, {"get_time": CLOCK})
    assert [call.function.name for call in choice.message.tool_calls] == ["get_time"]
    assert choice.finish_reason == "tool_calls"


def test_tool_choice_none_answers_in_text(client, model):
    answer = client.chat.completions.create(model=model, max_tokens=6, tools=[WEATHER], tool_choice="none",
                                            messages=[{"role": "user", "content": "Weather in Oslo?"}])
    choice = answer.choices[0]
    assert not choice.message.tool_calls and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")


def test_streamed_tool_calls_with_the_sdk_helper(client, model):
    tool = openai.pydantic_function_tool(Alarm, name="set_alarm")
    with client.chat.completions.stream(
            model=model, max_tokens=200, tools=[tool],
            tool_choice={"type": "function", "function": {"name": "set_alarm"}},
            messages=[{"role": "user", "content": "Wake me at seven."}]) as stream:
        events = list(stream)
        final = stream.get_final_completion()
    assert any(event.type == "tool_calls.function.arguments.delta" for event in events)
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.id and call.function.name == "set_alarm"
    assert isinstance(call.function.parsed_arguments, Alarm)


def test_streamed_tool_call_deltas_as_openai_sends_them(client, model):
    chunks = list(client.chat.completions.create(
        model=model, max_tokens=200, stream=True, tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        messages=[{"role": "user", "content": "Weather in Rome?"}]))
    calls: dict[int, dict] = {}
    finish = None
    for chunk in chunks:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                if delta.index not in calls:    # the first delta of a call names it and carries its id
                    assert delta.id and delta.type == "function" and delta.function.name == "get_weather"
                    calls[delta.index] = {"name": delta.function.name, "arguments": ""}
                else:
                    assert delta.id is None and not (delta.function and delta.function.name)
                calls[delta.index]["arguments"] += (delta.function and delta.function.arguments) or ""
    assert finish == "tool_calls"
    assert list(calls) == [0]
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER["function"]["parameters"])


def tool_round_trip(client, model, result: str):
    """Ask, get a forced call, send the call's result back in a ``tool`` message, ask for the answer."""
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(model=model, max_tokens=200, tools=[WEATHER], temperature=0,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                           messages=messages)
    message = first.choices[0].message
    check_tool_calls(message, TOOLS)
    messages.append(message.model_dump())
    messages += [{"role": "tool", "tool_call_id": call.id, "content": result} for call in message.tool_calls]
    return client.chat.completions.create(model=model, max_tokens=6, tools=[WEATHER], messages=messages)


def test_tool_result_in_the_history(client, model):
    short = tool_round_trip(client, model, '{"temperature": 21}')
    choice = short.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    # The result is rendered into the prompt: a longer result makes a longer prompt.
    longer = tool_round_trip(client, model, '{"temperature": 21, "sky": "clear", "wind": "light breeze"}')
    assert longer.usage.prompt_tokens > short.usage.prompt_tokens
