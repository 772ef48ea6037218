"""The OpenAI request/response models, the error mapping (one place), and ServerConfig."""

from __future__ import annotations

import json
import logging
import re

import pytest
from pydantic import ValidationError

from internvl_runtime import errors
from internvl_runtime.errors import (
    CheckpointError,
    ContextLengthExceeded,
    EngineDead,
    EngineOverloaded,
    HostNotAllowed,
    ImageDecodeError,
    InvalidGenerationConfig,
    InvalidRequest,
    MediaFetchError,
    MethodNotAllowed,
    ModelLoading,
    ModelNotFound,
    PayloadTooLarge,
    RequestFailed,
    RequestShapeError,
    RequestTimeout,
    RouteNotFound,
    TensorParallelError,
    TooManyRequests,
    Unauthorized,
    UnsupportedFeature,
    UnsupportedMediaType,
    http_status,
)
from internvl_runtime.processing.chat_messages import ImagePart, TextPart
from internvl_runtime.processing.lenient_model import reset_logged_unknown_fields
from internvl_runtime.processing.structured_output import StructuredOutput
from internvl_runtime.serving.config import ServerConfig
from internvl_runtime.serving.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    CompletionRequest,
    dump,
    error_payload,
    error_status,
)


def parse(body: dict) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate_json(json.dumps(body))


def base(**extra) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}


def test_minimal_request_defaults():
    req = parse(base())
    assert req.n == 1 and req.stream is False and req.max_tokens is None and req.stop_list == []
    assert req.messages[0].text() == "hi" and req.messages[0].image_urls() == []
    assert req.num_logprobs is None and req.include_usage is False


def test_content_parts():
    req = parse(base(messages=[{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "data:x", "detail": "low"}},
        {"type": "text", "text": "b"}, {"type": "image_url", "image_url": {"url": "http://h/i.png"}}]}]))
    message = req.messages[0]
    assert isinstance(message.content[0], TextPart) and isinstance(message.content[1], ImagePart)
    assert message.text() == "a\nb"
    assert message.image_urls() == ["data:x", "http://h/i.png"]


def test_roles():
    req = parse(base(messages=[{"role": "developer", "content": "sys"}, {"role": "user", "content": "u"},
                               {"role": "assistant", "content": None}, {"role": "user", "content": "v"}]))
    assert [m.role for m in req.messages] == ["developer", "user", "assistant", "user"]
    for role in ("function", "robot", ""):
        with pytest.raises(ValidationError):
            parse(base(messages=[{"role": role, "content": "x"}]))
    with pytest.raises(ValidationError, match="needs content"):
        parse(base(messages=[{"role": "tool", "tool_call_id": "c1"}]))
    with pytest.raises(ValidationError, match="only assistant messages may carry tool_calls"):
        parse(base(messages=[{"role": "user", "content": "x", "tool_calls": [{"function": {"name": "f"}}]}]))
    with pytest.raises(ValidationError, match="needs content"):
        parse(base(messages=[{"role": "user", "content": None}]))
    with pytest.raises(ValidationError, match="only user messages"):
        parse(base(messages=[{"role": "assistant", "content": [
            {"type": "image_url", "image_url": {"url": "x"}}]}]))


@pytest.mark.parametrize("field, value", [
    ("max_tokens", "5"), ("max_tokens", 5.0), ("max_tokens", True), ("max_tokens", 0), ("n", 0),
    ("temperature", "0.5"), ("temperature", 2.5), ("temperature", -1), ("top_p", 0), ("top_p", 1.01),
    ("top_k", -2), ("repetition_penalty", 0), ("seed", -1), ("stream", 1), ("stream", "true"),
    ("logprobs", "yes"), ("top_logprobs", 21), ("stop", 5), ("stop", [""]), ("stop", ["a"] * 17),
    ("presence_penalty", 2.5), ("frequency_penalty", -3), ("logit_bias", {"x": 2.0}), ("logit_bias", {"1": 101}),
    ("response_format", {"type": "xml"}), ("response_format", {"type": "json_schema"}), ("max_dynamic_patch", 0),
    ("min_p", 1.5), ("ignore_eos", "yes"), ("stop_token_ids", [-1]), ("skip_special_tokens", 0),
    ("tool_choice", "sometimes"), ("tools", [{"type": "function", "function": {"name": "has space"}}]),
    ("chat_template_kwargs", [1]), ("min_tokens", 2.5), ("structured_outputs", {"regex": 5}),
])
def test_strict_types_and_ranges(field, value):
    with pytest.raises(ValidationError):
        parse(base(**{field: value}))


def test_null_means_default_and_unknown_fields_are_accepted(caplog):
    reset_logged_unknown_fields()
    with caplog.at_level(logging.WARNING, logger="internvl_runtime.processing.lenient_model"):
        req = parse(base(n=None, stream=None, stream_options=None, top_logprobs=None, min_new_tokens=None,
                         frobnicate=1, messages=[{"role": "user", "content": [
                             {"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]}]))
        parse(base(frobnicate=2))
    assert req.n == 1 and req.stream is False and req.requested_min_tokens == 0
    logged = [r.getMessage() for r in caplog.records]
    assert sum("frobnicate" in line for line in logged) == 1, logged       # once per name
    assert any("cache_control" in line for line in logged)


def test_strict_protocol_refuses_unknown_fields():
    strict = {"strict_protocol": True}
    with pytest.raises(ValidationError, match="frobnicate"):
        ChatCompletionRequest.model_validate(base(frobnicate=1), context=strict)
    with pytest.raises(ValidationError, match="cache_control"):
        ChatCompletionRequest.model_validate(base(messages=[{"role": "user", "content": [
            {"type": "text", "text": "hi", "cache_control": {}}]}]), context=strict)
    assert ChatCompletionRequest.model_validate(base(n=None), context=strict).n == 1      # null is still the default


def test_openai_sdk_history_and_extensions():
    answer = {"content": "yes", "refusal": None, "role": "assistant", "annotations": None, "audio": None,
              "function_call": None, "tool_calls": None}
    req = parse(base(messages=[{"role": "user", "content": "a"}, answer, {"role": "user", "content": "b"}],
                     presence_penalty=0.5, frequency_penalty=-0.5, logit_bias={"5": -100}, metadata={"k": "v"},
                     store=False, user="u", ignore_eos=True, skip_special_tokens=False, min_p=0.1,
                     spaces_between_special_tokens=False, include_stop_str_in_output=True, stop_token_ids=[2],
                     top_logprobs=0, min_new_tokens=3))
    assert req.messages[1].text() == "yes" and req.logit_bias_ids == {5: -100.0} and req.requested_min_tokens == 3
    calls = parse(base(messages=[
        {"role": "user", "content": "w?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]))
    assert calls.messages[1].tool_calls[0].function.arguments == '{"x": 1}'
    bare = parse(base(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": "http://h/i.png"},
                                                              {"type": "image_url", "image_url": {
                                                                  "url": "http://h/j.png", "max_dynamic_patch": 2}}]}]))
    assert [(i.url, i.max_dynamic_patch) for i in bare.messages[0].image_parts()] == [("http://h/i.png", None),
                                                                                       ("http://h/j.png", 2)]


def test_structured_output_fields():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert parse(base(response_format={"type": "json_object"})).structured_output() == \
        StructuredOutput(json_object=True)
    assert parse(base(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema,
                                                                              "strict": True}})
                 ).structured_output() == StructuredOutput(json_schema=schema)
    assert parse(base(guided_json=json.dumps(schema))).structured_output() == StructuredOutput(json_schema=schema)
    assert parse(base(guided_choice=["a", "b"])).structured_output() == StructuredOutput(choice=("a", "b"))
    assert parse(base(structured_outputs={"regex": "[0-9]+"})).structured_output() == StructuredOutput(regex="[0-9]+")
    assert parse(base(response_format={"type": "text"})).structured_output() is None
    with pytest.raises(InvalidRequest, match="both constrain"):
        parse(base(guided_regex="a", guided_choice=["a"])).structured_output()
    with pytest.raises(InvalidRequest, match="not a JSON schema"):
        parse(base(guided_json="{not json")).structured_output()


def test_tool_fields():
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    req = parse(base(tools=tools))
    assert req.effective_tool_choice == "auto" and parse(base()).effective_tool_choice == "none"
    named = parse(base(tools=tools, tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    assert named.effective_tool_choice.function.name == "get_weather"
    with pytest.raises(ValidationError, match="does not define"):
        parse(base(tools=tools, tool_choice={"type": "function", "function": {"name": "other"}}))
    with pytest.raises(ValidationError, match="needs tools"):
        parse(base(tool_choice="required"))


def test_prefill_fields():
    prefill = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "The answer is"}]
    req = parse(base(messages=prefill, continue_final_message=True))
    assert req.add_generation_prompt is False
    with pytest.raises(ValidationError, match="cannot both be true"):
        parse(base(messages=prefill, continue_final_message=True, add_generation_prompt=True))
    with pytest.raises(ValidationError, match="final assistant message"):
        parse(base(continue_final_message=True))


def test_accepted_neutral_values():
    req = parse(base(presence_penalty=0, frequency_penalty=0.0, logit_bias={}, response_format={"type": "text"},
                     user="u", temperature=0, top_p=1, stop="x", max_completion_tokens=3))
    assert req.stop_list == ["x"] and req.requested_max_tokens == 3 and req.temperature == 0.0


def test_cross_field_rules():
    with pytest.raises(ValidationError, match="top_logprobs needs logprobs"):
        parse(base(top_logprobs=2))
    assert parse(base(logprobs=True, top_logprobs=2)).num_logprobs == 2
    assert parse(base(logprobs=True)).num_logprobs == 0
    assert not parse(base(stream_options={"include_usage": True})).include_usage     # ignored without stream
    assert parse(base(stream=True, stream_options={"include_usage": True})).include_usage
    with pytest.raises(ValidationError, match="disagree"):
        parse(base(max_tokens=3, max_completion_tokens=4))


def test_completion_request():
    req = CompletionRequest.model_validate_json(json.dumps({"model": "m", "prompt": ["a", "b"], "logprobs": 2}))
    assert req.prompts == ["a", "b"] and req.num_logprobs == 2
    for bad in ({"model": "m", "prompt": ""}, {"model": "m", "prompt": []}, {"model": "m", "prompt": 3},
                {"model": "m", "prompt": "x", "echo": True}, {"model": "m", "prompt": "x", "suffix": "y"},
                {"model": "m", "prompt": "x", "best_of": 2}):
        with pytest.raises(ValidationError):
            CompletionRequest.model_validate_json(json.dumps(bad))


# ---------------------------------------------------------------------------------------------------
# Errors: one mapping
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("error, status, code", [
    (InvalidRequest("x"), 400, None),
    (ImageDecodeError("x"), 400, None),
    (InvalidGenerationConfig("x"), 400, None),
    (ContextLengthExceeded("x"), 400, "context_length_exceeded"),
    (UnsupportedFeature("x"), 400, "unsupported"),
    (Unauthorized("x"), 401, "invalid_api_key"),
    (ModelNotFound("x"), 404, "model_not_found"),
    (PayloadTooLarge("x"), 413, "request_too_large"),
    (TooManyRequests("x"), 429, "too_many_requests"),
    (EngineOverloaded("x"), 503, "engine_overloaded"),
    (ModelLoading("x"), 503, "model_not_ready"),
    (EngineDead("x"), 503, "engine_overloaded"),
    (CheckpointError("x"), 500, None),
    (RequestFailed("x"), 500, None),
    (TensorParallelError("x"), 500, None),
    (RequestShapeError("x"), 400, None),
    (MediaFetchError("x"), 400, None),
    (RouteNotFound("x"), 404, None),
    (MethodNotAllowed("x"), 405, None),
    # the HTTP guard's refusals
    (HostNotAllowed("x"), 400, "host_not_allowed"),
    (RequestTimeout("x"), 408, "request_timeout"),
    (UnsupportedMediaType("x"), 415, "unsupported_media_type"),
])
def test_error_mapping(error, status, code):
    got_status, payload = error_payload(error)
    assert got_status == error_status(error) == status
    assert payload["error"]["code"] == code
    assert payload["error"]["message"] == "x"
    assert set(payload["error"]) == {"message", "type", "param", "code"}


def _tree() -> list[tuple[int, str, int | None]]:
    """(depth, class name, status drawn or None) for each line of the tree in errors.py's docstring."""
    rows = []
    for line in (errors.__doc__ or "").splitlines():
        match = re.match(r"^( {4}[│├└─ ]*)([A-Z]\w+)", line)
        if match and ("──" in line or match.group(2) == "InternVLError"):
            status = re.search(r"\((\d{3})\)\s*$", line)
            rows.append(((len(match.group(1)) - 4) // 4, match.group(2), int(status.group(1)) if status else None))
    return rows


def test_the_tree_in_errors_docstring_is_the_tree_and_its_statuses():
    """Every error class is drawn under its parent, and the status drawn (else its parent's) is the one
    ``http_status`` gives: the drawing cannot drift from the one mapping."""
    rows = _tree()
    classes = {name: cls for name, cls in vars(errors).items()
               if isinstance(cls, type) and issubclass(cls, errors.InternVLError)}
    assert sorted(name for _, name, _ in rows) == sorted(classes)
    parents: list[tuple[str, int]] = []          # the drawn ancestors: (name, status)
    for depth, name, status in rows:
        del parents[depth:]
        if parents:
            assert classes[name].__bases__[0] is classes[parents[-1][0]], name
        expected = status if status is not None else parents[-1][1]
        assert http_status(classes[name]("x")) == expected, name
        parents.append((name, expected))


def test_no_error_class_carries_its_own_status():
    for cls in vars(errors).values():
        if isinstance(cls, type) and issubclass(cls, BaseException):
            assert "http_status" not in vars(cls), cls


def test_validation_error_mapping_names_the_field():
    with pytest.raises(ValidationError) as info:
        parse(base(messages=[{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]))
    status, payload = error_payload(info.value)
    assert status == 400
    assert payload["error"]["param"] == "messages.1.role"
    assert payload["error"]["message"].startswith("messages.1.role: ")
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate_json(b"{nope")
    status, payload = error_payload(info.value)
    assert status == 400 and "not valid JSON" in payload["error"]["message"]


def test_unexpected_errors_do_not_leak_details():
    status, payload = error_payload(RuntimeError("secret path /root/x"))
    assert status == 500
    assert payload["error"]["message"] == "internal server error"


def test_chunk_dump_shape():
    chunk = ChatCompletionChunk(id="c", model="m", choices=[])
    payload = dump(chunk)
    assert payload["object"] == "chat.completion.chunk" and payload["usage"] is None


# ---------------------------------------------------------------------------------------------------
# ServerConfig
# ---------------------------------------------------------------------------------------------------


def test_server_config_defaults_are_safe(monkeypatch):
    monkeypatch.delenv("INTERNVL_API_KEY", raising=False)
    config = ServerConfig(model="/x/InternVL2-1B")
    assert config.host == "127.0.0.1" and config.port == 23333 and config.api_key == []
    assert config.allow_private_media_urls is False and config.allowed_local_media_path is None
    assert config.model_name == "InternVL2-1B"
    assert config.max_body_bytes <= 64 * 2**20 and config.max_image_pixels <= 50_000_000
    assert ServerConfig(model="/x/y", served_model_name="z").model_name == "z"


def test_server_config_api_key_from_env(monkeypatch):
    monkeypatch.setenv("INTERNVL_API_KEY", "from-env")
    assert ServerConfig().api_key == ["from-env"]
    assert ServerConfig(api_key="given").api_key == ["given"]


@pytest.mark.parametrize("field, value", [
    ("port", 70000), ("max_body_bytes", 0), ("max_n", -1), ("max_num_seqs", True), ("dtype", "int8"),
    ("media_fetch_timeout_s", 0), ("max_redirects", -1), ("max_model_len", 0), ("allowed_local_media_path",
                                                                                "/definitely/not/here"),
])
def test_server_config_validation(field, value):
    with pytest.raises(InvalidRequest, match=field):
        ServerConfig(**{field: value})


def test_server_config_engine_kwargs(tmp_path):
    config = ServerConfig(model="m", max_model_len=100, num_blocks=7, allowed_local_media_path=str(tmp_path))
    assert config.engine_kwargs()["max_model_len"] == 100 and config.engine_kwargs()["num_blocks"] == 7
    assert config.allowed_local_media_path == str(tmp_path.resolve())


@pytest.mark.parametrize("field, value", [("use_beam_search", True), ("prompt_logprobs", 1), ("best_of", 2)])
def test_vllm_options_that_would_change_the_answer_are_refused_not_ignored(field, value):
    with pytest.raises(ValidationError, match=field):
        parse(base(**{field: value}))
    assert parse(base(use_beam_search=False, best_of=1)).n == 1
