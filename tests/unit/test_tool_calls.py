"""Tool calls in each template family's format: tools offered in the prompt, calls and results rendered into the
history (exact strings), answers parsed (whole and one character at a time), forced calls as TaggedJSON."""

from __future__ import annotations

import itertools
import json

import jsonschema
import pytest

from internvl_runtime.errors import InvalidRequest
from internvl_runtime.processing.inputs import InputProcessor, Message
from internvl_runtime.processing.template import INTERNVL2_SYSTEM_MESSAGE as SYSTEM
from internvl_runtime.processing.tokenization import AutoTokenizer
from internvl_runtime.processing.tool_calls import (
    FORMATS,
    ToolCall,
    ToolCallStreamParser,
    assemble_tool_calls,
    parse_tool_call,
    parse_tools,
    plan_tools,
    tool_call_format,
)
from paths import FIXTURES

CKPT = FIXTURES / "ckpt"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
TOOLS = [WEATHER, CLOCK]
TEMPLATES = ["Hermes-2", "internlm2-chat", "phi3-chat"]


def _id_maker():
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def _answer(template: str, content: str, calls: list[tuple[str, dict]]) -> str:
    """An answer as the model writes it, from the format's own rendering."""
    fmt = tool_call_format(template)
    return fmt.assistant_text(content, [ToolCall(f"c{i}", name, json.dumps(args))
                                        for i, (name, args) in enumerate(calls)])


# -- answers -----------------------------------------------------------------------------------------


def test_exact_answer_strings() -> None:
    calls = [("get_weather", {"city": "Paris"})]
    assert _answer("Hermes-2", "Let me check.", calls) == (
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')
    assert _answer("phi3-chat", "", calls) == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')
    assert _answer("internlm2-chat", "Let me check.", calls) == (
        'Let me check.<|action_start|><|plugin|>\n{"name": "get_weather", "parameters": {"city": "Paris"}}'
        '<|action_end|>')


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("content", ["", "Let me look that up.", "两个城市"])
def test_render_parse_round_trip(template: str, content: str) -> None:
    calls = [("get_weather", {"city": "Zürich", "days": 3}), ("get_time", {})]
    text = _answer(template, content, calls)
    parsed = tool_call_format(template).parse(text, make_id=_id_maker())
    assert parsed.content == (content or None)
    assert [(c.id, c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [
        ("call_0", "get_weather", {"city": "Zürich", "days": 3}), ("call_1", "get_time", {})]


@pytest.mark.parametrize("template", TEMPLATES)
def test_streaming_one_character_at_a_time_gives_the_same_calls(template: str) -> None:
    fmt = tool_call_format(template)
    text = _answer(template, "Sure <b>now</b>.", [("get_weather", {"city": "A \"quoted\" {city}", "days": 2}),
                                                 ("get_time", {})])
    whole = fmt.parse(text, make_id=_id_maker())
    parser = fmt.stream_parser(make_id=_id_maker())
    deltas = [parser.feed(ch) for ch in text] + [parser.finish()]
    assert "".join(d.content for d in deltas) == whole.content == "Sure <b>now</b>."
    call_deltas = [c for d in deltas for c in d.tool_calls]
    assert assemble_tool_calls(call_deltas) == whole.tool_calls
    # no tag ever leaks into the content, even a partial one
    for d in deltas:
        assert not any(tag in d.content for tag in ("<tool", "</tool", "<|action", "<|plugin", "<|"))
    # OpenAI's shape: per call, the first delta has id, type and name; then argument fragments only
    first = [c for c in call_deltas if c.id is not None]
    assert [c.to_openai() for c in first] == [
        {"index": 0, "id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": ""}},
        {"index": 1, "id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": ""}}]
    fragments = [c for c in call_deltas if c.id is None]
    assert len([c for c in fragments if c.index == 0]) > 5          # the arguments really stream
    assert all(c.to_openai().keys() == {"index", "function"} and c.name is None for c in fragments)
    # the name of a call comes before any of its arguments
    assert call_deltas.index(first[1]) > max(i for i, c in enumerate(call_deltas) if c.index == 0)


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 1000])
def test_streaming_in_chunks_of_any_size(chunk: int) -> None:
    fmt = FORMATS["Hermes-2"]
    text = _answer("Hermes-2", "x", [("get_weather", {"city": "Rome"})])
    parser = fmt.stream_parser(make_id=_id_maker())
    deltas = [parser.feed(text[i:i + chunk]) for i in range(0, len(text), chunk)] + [parser.finish()]
    assert "".join(d.content for d in deltas) == "x"
    assert assemble_tool_calls([c for d in deltas for c in d.tool_calls]) == [
        ToolCall("call_0", "get_weather", '{"city": "Rome"}')]


def test_plain_answers_stream_unchanged() -> None:
    """Without calls the content is the text exactly, trailing whitespace and tag-like text included."""
    for text in ["Hello world.  \n", "a < b and <tool is not a tag", "<tool_call", "  spaces  "]:
        parser = ToolCallStreamParser("<tool_call>", "</tool_call>")
        deltas = [parser.feed(ch) for ch in text] + [parser.finish()]
        assert "".join(d.content for d in deltas) == text
        assert FORMATS["Hermes-2"].parse(text).content == text
        assert FORMATS["Hermes-2"].parse(text).tool_calls == []


def test_malformed_and_unusual_calls() -> None:
    hermes, internlm2 = FORMATS["Hermes-2"], FORMATS["internlm2-chat"]
    broken = 'ok <tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call>'
    assert hermes.parse(broken).content == broken and hermes.parse(broken).tool_calls == []
    not_a_call = "<tool_call>\nhello\n</tool_call>"
    assert hermes.parse(not_a_call).content == not_a_call
    # arguments before the name: given whole at the end tag
    swapped = '<tool_call>\n{"arguments": {"city": "Oslo"}, "name": "get_weather"}\n</tool_call>'
    calls = hermes.parse(swapped, make_id=_id_maker()).tool_calls
    assert calls == [ToolCall("call_0", "get_weather", '{"city": "Oslo"}')]
    # InternLM2 also accepts "arguments"
    text = '<|action_start|><|plugin|>\n{"name": "get_time", "arguments": {}}<|action_end|>'
    assert [c.name for c in internlm2.parse(text).tool_calls] == ["get_time"]
    # an answer cut off inside a call: what was streamed stays, the parser says so
    parser = hermes.stream_parser(make_id=_id_maker())
    parser.feed('<tool_call>\n{"name": "get_weather", "arguments": {"ci')
    parser.finish()
    assert parser.malformed and hermes.parse('<tool_call>\n{"name": "get_weather"').tool_calls == []


# -- tools and tool_choice ---------------------------------------------------------------------------


def test_tools_and_tool_choice() -> None:
    fmt = FORMATS["Hermes-2"]
    assert plan_tools(fmt, None) is None
    assert plan_tools(fmt, TOOLS, "none") is None                       # not offered, nothing parsed
    auto = plan_tools(fmt, TOOLS)
    assert auto is not None and auto.choice == "auto" and auto.constraint is None
    assert [t.name for t in auto.tools] == ["get_weather", "get_time"]
    for bad_tools in ([{"type": "function"}], [{"type": "function", "function": {"name": "a b"}}], [WEATHER, WEATHER],
                      "nope"):
        with pytest.raises(InvalidRequest):
            plan_tools(fmt, bad_tools)
    for bad_choice in ("sometimes", {"type": "function", "function": {"name": "missing"}}, {"type": "function"}):
        with pytest.raises(InvalidRequest):
            plan_tools(fmt, TOOLS, bad_choice)
    with pytest.raises(InvalidRequest, match="needs tools"):
        plan_tools(fmt, None, "required")
    with pytest.raises(InvalidRequest, match="no tool-call format"):
        tool_call_format("internvl_zh")
    assert parse_tools([WEATHER])[0].to_openai() == WEATHER


@pytest.mark.parametrize("template", TEMPLATES)
def test_required_and_named_calls_are_forced_in_the_models_format(template: str) -> None:
    fmt = tool_call_format(template)
    required = plan_tools(fmt, TOOLS, "required")
    assert required is not None and required.constraint is not None
    tagged = required.constraint.tagged_json
    assert tagged is not None and tagged.min_items == 1 and tagged.max_items is None
    assert tagged.begin == fmt.forced_begin and tagged.end == fmt.forced_end
    assert [s["properties"]["name"]["const"] for s in tagged.schemas] == ["get_weather", "get_time"]
    one = plan_tools(fmt, TOOLS, "required", parallel_tool_calls=False)
    assert one is not None and one.constraint is not None and one.constraint.tagged_json is not None
    assert one.constraint.tagged_json.max_items == 1
    named = plan_tools(fmt, TOOLS, {"type": "function", "function": {"name": "get_weather"}})
    assert named is not None and named.constraint is not None
    schemas = named.constraint.tagged_json.schemas if named.constraint.tagged_json else ()
    assert len(schemas) == 1 and named.constraint.tagged_json is not None
    assert named.constraint.tagged_json.max_items == 1
    # what the constraint allows is what the parser reads, and its arguments follow the function's schema
    key = fmt.arguments_key
    good = {"name": "get_weather", key: {"city": "Lyon", "days": 1}}
    jsonschema.validate(good, schemas[0])
    for bad in ({"name": "get_time", key: {}}, {"name": "get_weather", key: {"days": 1}},
                {"name": "get_weather", key: {"city": 5}}, {"name": "get_weather"}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schemas[0])
    forced_text = tagged.begin + json.dumps(good) + tagged.end
    parsed = required.parse(forced_text)
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [("get_weather", {"city": "Lyon",
                                                                                                "days": 1})]
    assert required.skip_special_tokens is (template != "internlm2-chat")


def test_forced_call_schema_keeps_nested_definitions() -> None:
    """Pydantic-made parameters (langchain's bind_tools) refer to "#/$defs/...": still valid in the call schema."""
    parameters = {"type": "object", "properties": {"place": {"$ref": "#/$defs/Place"}}, "required": ["place"],
                  "$defs": {"Place": {"type": "object", "properties": {"city": {"type": "string"}},
                                      "required": ["city"]}}}
    tool = {"type": "function", "function": {"name": "visit", "parameters": parameters}}
    plan = plan_tools(FORMATS["Hermes-2"], [tool], "required")
    assert plan is not None and plan.constraint is not None and plan.constraint.tagged_json is not None
    schema = plan.constraint.tagged_json.schemas[0]
    jsonschema.validate({"name": "visit", "arguments": {"place": {"city": "Kyoto"}}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "visit", "arguments": {"place": {"town": "Kyoto"}}}, schema)
    assert "$defs" in parameters                 # the caller's tool is not changed


def test_parse_tool_call_from_openai_shapes() -> None:
    call = parse_tool_call({"id": "c9", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}})
    assert call == ToolCall("c9", "f", '{"a": 1}')
    assert parse_tool_call({"function": {"name": "f", "arguments": {"a": 1}}}).arguments == '{"a": 1}'
    for bad in ({"function": {"name": "f", "arguments": "[1]"}}, {"function": {"name": "f", "arguments": "{"}},
                {"id": "x"}, {"type": "other", "function": {"name": "f"}}):
        with pytest.raises(InvalidRequest):
            parse_tool_call(bad)


# -- the prompt --------------------------------------------------------------------------------------


def _processor(variant: str, template: str) -> InputProcessor:
    return InputProcessor(AutoTokenizer.from_pretrained(CKPT / variant), template=template, image_size=448,
                          num_image_token=256)


HISTORY = [
    Message("user", "Weather in Paris and the time?"),
    Message("assistant", "Checking.", tool_calls=[ToolCall("c1", "get_weather", '{"city":"Paris"}'),
                                                  ToolCall("c2", "get_time", "{}")]),
    Message("tool", "18C, sunny", tool_call_id="c1", name="get_weather"),
    Message("tool", "12:00", tool_call_id="c2"),
]


def test_hermes_prompt_with_tools_calls_and_results() -> None:
    prompt = _processor("tiny-1B", "Hermes-2").prepare(HISTORY, tools=[WEATHER]).prompt
    tools_line = json.dumps(WEATHER, ensure_ascii=False)
    assert prompt == (
        f"<|im_start|>system\n{SYSTEM}\n\nYou are a function calling AI model. You are provided with function "
        "signatures within <tools></tools> XML tags. You may call one or more functions to assist with the user "
        "query. Don't make assumptions about what values to plug into functions. Here are the available tools: "
        f"<tools>\n{tools_line}\n</tools>\nFor each function call return a json object with function name and "
        "arguments within <tool_call></tool_call> XML tags as follows:\n<tool_call>\n{\"name\": <function-name>, "
        "\"arguments\": <args-dict>}\n</tool_call><|im_end|>"
        "<|im_start|>user\nWeather in Paris and the time?<|im_end|>"
        "<|im_start|>assistant\nChecking.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": "
        "\"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call><|im_end|>"
        "<|im_start|>tool\n<tool_response>\n18C, sunny\n</tool_response>\n<tool_response>\n12:00\n"
        "</tool_response><|im_end|><|im_start|>assistant\n")


def test_internlm2_prompt_with_tools_calls_and_results() -> None:
    processor = _processor("tiny-2B", "internlm2-chat")
    prompt = processor.prepare([Message("system", "Be brief."), *HISTORY], tools=TOOLS).prompt
    functions = json.dumps([WEATHER["function"], {**CLOCK["function"]}], ensure_ascii=False)
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>"
        f"<|im_start|>system name=<|plugin|>\n{functions}<|im_end|>"
        "<|im_start|>user\nWeather in Paris and the time?<|im_end|>"
        "<|im_start|>assistant\nChecking.<|action_start|><|plugin|>\n{\"name\": \"get_weather\", \"parameters\": "
        "{\"city\": \"Paris\"}}<|action_end|><|action_start|><|plugin|>\n{\"name\": \"get_time\", \"parameters\": "
        "{}}<|action_end|><|im_end|>"
        "<|im_start|>environment name=<|plugin|>\n18C, sunny<|im_end|>"
        "<|im_start|>environment name=<|plugin|>\n12:00<|im_end|><|im_start|>assistant\n")
    # the tags are single special tokens of the InternLM2 tokenizer
    ids = processor.tokenizer.encode("<|action_start|><|plugin|>")
    assert ids[-2:] == [processor.tokenizer.convert_tokens_to_ids(t) for t in ("<|action_start|>", "<|plugin|>")]


def test_phi3_prompt_with_results_as_a_user_turn() -> None:
    prompt = _processor("tiny-4B", "phi3-chat").prepare(HISTORY).prompt       # history without offering tools
    assert prompt == (
        f"<|system|>\n{SYSTEM}<|end|><|user|>\nWeather in Paris and the time?<|end|>"
        "<|assistant|>\nChecking.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n"
        "</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call><|end|>"
        "<|user|>\n<tool_response>\n18C, sunny\n</tool_response>\n<tool_response>\n12:00\n</tool_response><|end|>"
        "<|assistant|>\n")


def test_tool_choice_none_offers_nothing_and_bad_histories_fail() -> None:
    processor = _processor("tiny-1B", "Hermes-2")
    plain = processor.prepare([Message("user", "hi")])
    none = processor.prepare([Message("user", "hi")], tools=TOOLS, tool_choice="none")
    assert none.prompt == plain.prompt and none.tool_plan is None and plain.tool_plan is None
    auto = processor.prepare([Message("user", "hi")], tools=TOOLS)
    assert auto.tool_plan is not None and "<tools>" in auto.prompt
    with pytest.raises(InvalidRequest):
        processor.prepare([Message("user", "hi", tool_calls=[ToolCall("a", "f", "{}")])])
    with pytest.raises(InvalidRequest):
        processor.prepare([Message("assistant", "x", tool_calls=[ToolCall("a", "f", "not json")]),
                           Message("tool", "r")])
    with pytest.raises(InvalidRequest, match="no tool-call format"):
        _processor("tiny-1B", "internvl_zh").prepare(HISTORY)
