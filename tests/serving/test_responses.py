"""``POST /v1/responses`` with the real ``openai`` client (``client.responses.create``) against a uvicorn server
on 127.0.0.1 with the tiny random-weight InternVL2-1B checkpoint. A response runs as a one-choice chat
completion, so greedy answers and token counts are compared with ``/v1/chat/completions``'s."""

from __future__ import annotations

import json
import time

import httpx
import jsonschema
import openai
import pytest

from internvl_runtime.processing.structured_output import StructuredOutput
from internvl_runtime.serving.config import DEMO_LABEL, ServerConfig
from internvl_runtime.serving.responses_protocol import ResponsesRequest

from .helpers import MODEL, data_url, png_bytes, run_server

RED = png_bytes(64, 48, (220, 20, 20))


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


def chat(client, messages, **kwargs):
    return client.chat.completions.create(model=MODEL, messages=messages, temperature=0, **kwargs)


def answer_text(response) -> str:
    [message] = response.output
    assert message.type == "message" and message.role == "assistant"
    [part] = message.content
    assert part.type == "output_text"
    return part.text


# ---------------------------------------------------------------------------------------------------


def test_text_input_answers_as_chat_does(client):
    response = client.responses.create(model=MODEL, input="Hello, who are you?", max_output_tokens=5, temperature=0)
    reference = chat(client, [{"role": "user", "content": "Hello, who are you?"}], max_tokens=5)
    assert response.object == "response" and response.id.startswith("resp_") and response.model == MODEL
    assert response.output[0].id.startswith("msg_")
    text = answer_text(response)
    assert text == response.output_text == reference.choices[0].message.content
    assert response.usage.input_tokens == reference.usage.prompt_tokens
    assert response.usage.output_tokens == reference.usage.completion_tokens >= 1
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    if reference.choices[0].finish_reason == "length":
        assert response.status == "incomplete" and response.output[0].status == "incomplete"
        assert response.incomplete_details.reason == "max_output_tokens"
    else:
        assert response.status == "completed" and response.incomplete_details is None
    assert response.max_output_tokens == 5 and response.temperature == 0


def test_max_output_tokens_makes_an_incomplete_response(client):
    response = client.responses.create(model=MODEL, input="Count to one hundred.", max_output_tokens=1,
                                       temperature=0)
    reference = chat(client, [{"role": "user", "content": "Count to one hundred."}], max_tokens=1)
    assert response.usage.output_tokens == 1
    if reference.choices[0].finish_reason == "length":       # not when the one token is the stop token
        assert response.status == "incomplete"
        assert response.incomplete_details.reason == "max_output_tokens"


def test_instructions_are_the_system_message(client):
    response = client.responses.create(model=MODEL, input="Hi", instructions="You are a pirate.",
                                       max_output_tokens=2, temperature=0)
    reference = chat(client, [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hi"}],
                     max_tokens=2)
    plain = chat(client, [{"role": "user", "content": "Hi"}], max_tokens=1)
    assert response.usage.input_tokens == reference.usage.prompt_tokens != plain.usage.prompt_tokens
    assert response.output_text == reference.choices[0].message.content
    assert response.instructions == "You are a pirate."


def test_image_part_counts_its_image_tokens(client):
    content = [{"type": "input_text", "text": "What color is this?"},
               {"type": "input_image", "image_url": data_url(RED), "detail": "auto"}]
    response = client.responses.create(model=MODEL, input=[{"role": "user", "content": content}],
                                       max_output_tokens=3, temperature=0)
    reference = chat(client, [{"role": "user", "content": [
        {"type": "text", "text": "What color is this?"},
        {"type": "image_url", "image_url": {"url": data_url(RED)}}]}], max_tokens=3)
    text_only = chat(client, [{"role": "user", "content": "What color is this?"}], max_tokens=1)
    assert response.usage.input_tokens == reference.usage.prompt_tokens > text_only.usage.prompt_tokens + 256
    assert response.output_text == reference.choices[0].message.content


def test_history_from_model_dump_of_an_earlier_output(client):
    first = client.responses.create(model=MODEL, input="Name a color.", max_output_tokens=3, temperature=0)
    history = [{"role": "user", "content": "Name a color."}, *[item.model_dump() for item in first.output],
               {"role": "developer", "content": "Answer briefly."},
               {"role": "user", "content": [{"type": "input_text", "text": "Another one?"}]}]
    second = client.responses.create(model=MODEL, input=history, max_output_tokens=3, temperature=0)
    reference = chat(client, [{"role": "user", "content": "Name a color."},
                              {"role": "assistant", "content": first.output_text},
                              {"role": "developer", "content": "Answer briefly."},
                              {"role": "user", "content": "Another one?"}], max_tokens=3)
    assert second.usage.input_tokens == reference.usage.prompt_tokens
    assert second.output_text == reference.choices[0].message.content


def test_stream_events_in_order_and_deltas_make_the_text(client):
    stream = client.responses.create(model=MODEL, input="Tell me a story.", max_output_tokens=8, temperature=0,
                                     stream=True)
    events = list(stream)
    whole = client.responses.create(model=MODEL, input="Tell me a story.", max_output_tokens=8, temperature=0)
    kinds = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = "response.incomplete" if whole.status == "incomplete" else "response.completed"
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          final]
    assert set(kinds[4:-4]) <= {"response.output_text.delta"}
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    done = events[-1].response
    assert deltas == events[-4].text == done.output_text == whole.output_text
    assert events[0].response.status == "in_progress" and done.status == whole.status
    assert done.id == events[0].response.id and done.output[0].id == events[2].item.id
    assert done.usage.input_tokens == whole.usage.input_tokens
    assert done.usage.output_tokens == whole.usage.output_tokens


def test_stream_sends_event_lines_as_openai(server):
    body = {"model": MODEL, "input": "Hi", "max_output_tokens": 3, "stream": True}
    with httpx.stream("POST", server.base_url + "/v1/responses", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    blocks = [b for b in raw.split("\n\n") if b.strip()]
    assert blocks[-1] == "data: [DONE]"
    for block in blocks[:-1]:
        event_line, data_line = block.split("\n")
        payload = json.loads(data_line.removeprefix("data: "))
        assert event_line == f"event: {payload['type']}"


@pytest.mark.parametrize(("extra", "needle"), [
    ({"previous_response_id": "resp_123"}, "previous_response_id"),
    ({"conversation": "conv_123"}, "conversation"),
    ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file-1", "detail": "auto"}]}]},
     "file_id"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "4"}]}, "function_call_output"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "file-1"}]}]}, "input_file"),
    ({"input": [{"role": "assistant", "content": [{"type": "input_image", "image_url": data_url(RED)}]}]},
     "only user messages"),
    ({"input": []}, "input is empty"),
    ({"input": 5}, "input"),
    ({"model": "other"}, "does not exist"),
    ({"max_output_tokens": 5000}, "max_output_tokens (5000)"),
])
def test_refused_with_a_clear_message(client, extra, needle):
    kwargs = {"model": MODEL, "input": "Hi", **extra}
    with pytest.raises((openai.BadRequestError, openai.NotFoundError)) as info:
        client.responses.create(**kwargs)
    assert needle in info.value.message


def test_bookkeeping_fields_are_accepted(client):
    response = client.responses.create(model=MODEL, input="Hi", max_output_tokens=1, store=False,
                                       metadata={"k": "v"}, user="u1", parallel_tool_calls=True,
                                       text={"format": {"type": "text"}}, top_p=0.9)
    assert response.metadata == {"k": "v"} and response.store is False and response.top_p == 0.9


def test_text_format_parses_to_the_engine_constraint():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    req = ResponsesRequest.model_validate_json(json.dumps({"model": "m", "input": "x", "text": {"format": {
        "type": "json_schema", "name": "thing", "schema": schema, "strict": True}}}))
    assert req.structured_output() == StructuredOutput(json_schema=schema)
    assert req.text_echo()["format"] == {"type": "json_schema", "name": "thing", "schema": schema, "strict": True}
    req = ResponsesRequest.model_validate_json(b'{"model": "m", "input": "x", "text": {"format": {"type": '
                                               b'"json_object"}}}')
    assert req.structured_output() == StructuredOutput(json_object=True)
    assert ResponsesRequest.model_validate_json(b'{"model": "m", "input": "x"}').structured_output() is None


def test_the_sdk_stream_helper_accumulates_the_events(client):
    whole = client.responses.create(model=MODEL, input="Say something.", max_output_tokens=6, temperature=0)
    with client.responses.stream(model=MODEL, input="Say something.", max_output_tokens=6, temperature=0) as stream:
        deltas = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        if whole.status == "completed":
            assert stream.get_final_response().output_text == whole.output_text
    assert deltas == whole.output_text


def test_a_stream_left_early_frees_its_slot_and_engine_request(server):
    state, engine = server.app.state.serving, server.engine
    stats = engine.engine.stats

    def ended() -> int:
        return stats["requests_aborted"] + stats["requests_finished"]

    before, aborted = ended(), stats["requests_aborted"]
    body = {"model": MODEL, "input": "Tell me a long story.", "max_output_tokens": 1500, "stream": True}
    with httpx.stream("POST", server.base_url + "/v1/responses", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("event: response.output_text.delta"):
                break
    deadline = time.monotonic() + 30
    while (state.active or engine.num_pending or ended() == before) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert state.active == 0 and engine.num_pending == 0
    # Aborted when the client left, unless the random model's answer had already ended (a sampled EOS; on a
    # loaded machine the whole answer can be out before the client reads its first delta).
    assert ended() == before + 1 and stats["requests_aborted"] in (aborted, aborted + 1)


def test_demo_answers_are_labelled_in_both_shapes(tiny_1b):
    config = ServerConfig(model=str(tiny_1b), max_model_len=1024, num_blocks=256, demo=True)
    with run_server(config) as demo, openai.OpenAI(base_url=demo.base_url + "/v1", api_key="unused",
                                                   max_retries=0, timeout=60) as c:
        whole = c.responses.create(model=MODEL, input="Hi", max_output_tokens=3, temperature=0)
        events = list(c.responses.create(model=MODEL, input="Hi", max_output_tokens=3, temperature=0, stream=True))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert whole.output_text.startswith(DEMO_LABEL)
    assert deltas == events[-1].response.output_text == whole.output_text


def test_text_format_json_schema_holds(client):
    schema = {"type": "object", "properties": {"color": {"enum": ["red", "blue"]}, "size": {"type": "integer",
                                                                                          "minimum": 1, "maximum": 9}},
              "required": ["color", "size"], "additionalProperties": False}
    response = client.responses.create(model=MODEL, input="Describe it as JSON.", max_output_tokens=64, temperature=1.0,
                                       text={"format": {"type": "json_schema", "name": "thing", "schema": schema,
                                                        "strict": True}})
    jsonschema.validate(json.loads(response.output_text), schema)
    anything = client.responses.create(model=MODEL, input="JSON please.", max_output_tokens=128,
                                       text={"format": {"type": "json_object"}})
    assert anything.status == "completed" and isinstance(json.loads(anything.output_text), dict)
