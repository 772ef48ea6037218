"""Harmony tools (GPT-OSS): the functions' declarations as openai-harmony renders them, the prompt of a tool loop
(calls and results of the history as harmony messages), and the answer's calls parsed whole and streamed.

The expected declarations are openai-harmony 0.0.8's rendering of its own ``test_render_functions_with_parameters``
case (its ``test-data`` file of that name): the package cannot be the oracle at test time, since its tokenizer
data is downloaded on first use."""

from __future__ import annotations

import itertools

import pytest

from internvl_runtime import AutoTokenizer, InvalidRequest
from internvl_runtime.processing.harmony import HarmonyStreamParser, parse_harmony
from internvl_runtime.processing.harmony_tools import system_with_functions, tools_section
from internvl_runtime.processing.inputs import InputProcessor, Message
from internvl_runtime.processing.template import INTERNVL3_5_GPT_OSS_SYSTEM_MESSAGE
from internvl_runtime.processing.tool_calls import HARMONY, ToolCall, assemble_tool_calls, plan_tools
from paths import FIXTURES

_FORMAT = {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"}
HARMONY_CASE = [
    ("get_location", "Gets the location of the user.", None),
    ("get_current_weather", "Gets the current weather in the provided location.", {
        "type": "object", "properties": {
            "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
            "format": _FORMAT},
        "required": ["location"]}),
    ("get_multiple_weathers", "Gets the current weather in the provided list of locations.", {
        "type": "object", "properties": {
            "locations": {"type": "array", "items": {"type": "string"},
                          "description": 'List of city and state, e.g. ["San Francisco, CA", "New York, NY"]'},
            "format": _FORMAT},
        "required": ["locations"]}),
    ("kitchensink", "A function with various complex schemas.", {
        "description": "params object", "type": "object", "properties": {
            "string": {"type": "string", "title": "STRING", "description": "A string", "examples": ["hello", "world"]},
            "string_nullable": {"type": "string", "nullable": True, "description": "A nullable string",
                                "default": "the default"},
            "string_enum": {"type": "string", "enum": ["a", "b", "c"]},
            "oneof_string_or_number": {"oneOf": [{"type": "string", "default": "default_string_in_oneof"},
                                                 {"type": "number", "description": "numbers can happen too"}],
                                       "description": "a oneof", "default": 20}}}),
]
HARMONY_TOOLS_TEXT = """# Tools

## functions

namespace functions {

// Gets the location of the user.
type get_location = () => any;

// Gets the current weather in the provided location.
type get_current_weather = (_: {
// The city and state, e.g. San Francisco, CA
location: string,
format?: "celsius" | "fahrenheit", // default: celsius
}) => any;

// Gets the current weather in the provided list of locations.
type get_multiple_weathers = (_: {
// List of city and state, e.g. ["San Francisco, CA", "New York, NY"]
locations: string[],
format?: "celsius" | "fahrenheit", // default: celsius
}) => any;

// A function with various complex schemas.
type kitchensink = (_: // params object
{
// STRING
//
// A string
// Examples:
// - "hello"
// - "world"
string?: string,
// A nullable string
string_nullable?: string | null, // default: "the default"
string_enum?: "a" | "b" | "c",
// a oneof
// default: 20
oneof_string_or_number?:
 | string // default: "default_string_in_oneof"
 | number // numbers can happen too
,
}) => any;

} // namespace functions"""
WITH_FUNCTIONS = ("# Valid channels: analysis, commentary, final. Channel must be included for every message.\n"
                  "Calls to these tools must go to the commentary channel: 'functions'.")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Gets the weather.\nIn one city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}


def test_declarations_are_openai_harmonys() -> None:
    assert tools_section(HARMONY_CASE) == HARMONY_TOOLS_TEXT


def test_the_system_message_gets_harmonys_channels_for_functions() -> None:
    assert system_with_functions(INTERNVL3_5_GPT_OSS_SYSTEM_MESSAGE) == (
        INTERNVL3_5_GPT_OSS_SYSTEM_MESSAGE.replace(
            "# Valid channels: final. Channel must be included for every message.", WITH_FUNCTIONS))
    assert system_with_functions("Be brief.") == "Be brief.\n\n" + WITH_FUNCTIONS
    assert system_with_functions(system_with_functions("Be brief.")) == "Be brief.\n\n" + WITH_FUNCTIONS


@pytest.fixture(scope="module")
def processor() -> InputProcessor:
    tokenizer = AutoTokenizer.from_pretrained(FIXTURES / "ckpt" / "tiny-3_5-20B-A4B")
    return InputProcessor(tokenizer, template="internvl3_5_gpt_oss", image_size=448, num_image_token=256)


def test_tool_loop_prompt(processor) -> None:
    """The tools in a developer message, the history's call as the assistant's message to the function
    (``<|call|>``), the result from the function (named by the call it answers) to the assistant."""
    messages = [Message("system", "Be brief."), Message("user", "Weather in Paris?"),
                Message("assistant", "", tool_calls=[ToolCall("call_1", "get_weather", '{"city": "Paris"}')]),
                Message("tool", '{"sky": "sunny"}', tool_call_id="call_1")]
    prepared = processor.prepare(messages, tools=[WEATHER])
    assert prepared.prompt == (
        "<|start|>system<|message|>Be brief.\n\n" + WITH_FUNCTIONS + "<|end|>"
        "<|start|>developer<|message|># Tools\n\n## functions\n\nnamespace functions {\n\n"
        "// Gets the weather.\n// In one city.\ntype get_weather = (_: {\ncity: string,\ndays?: number,\n}) => any;\n\n"
        "} // namespace functions<|end|>"
        "<|start|>user<|message|>Weather in Paris?<|end|>"
        '<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Paris"}<|call|>'
        '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{"sky": "sunny"}<|end|>'
        "<|start|>assistant")
    assert prepared.tool_plan is not None and prepared.tool_plan.format is HARMONY
    named = processor.prepare([*messages[:3], Message("tool", "", name="get_weather")], tools=[WEATHER])
    assert named.prompt.endswith("<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>"
                                 "<|end|><|start|>assistant")
    with pytest.raises(InvalidRequest, match="name"):
        processor.prepare([messages[1], Message("tool", "4")], tools=[WEATHER])
    hidden = processor.prepare(messages[:2], tools=[WEATHER], tool_choice="none")
    assert "# Tools" not in hidden.prompt and "# Valid channels: analysis" not in hidden.prompt


def test_an_answer_sent_back_is_a_final_channel_message(processor) -> None:
    """What the server answered (the final channel's text) goes back into the prompt as a final-channel message;
    an answer that is harmony already (the official chat's history) as it is; a prefill continues the final
    channel."""
    ask = [Message("user", "Hi"), Message("assistant", "Hello!"), Message("user", "Bye")]
    assert "<|start|>user<|message|>Hi<|end|><|start|>assistant<|channel|>final<|message|>Hello!<|end|>" \
           "<|start|>user<|message|>Bye<|end|><|start|>assistant" in processor.prepare(ask).prompt
    raw = "<|channel|>analysis<|message|>Greet.<|end|><|start|>assistant<|channel|>final<|message|>Hello!"
    assert f"<|start|>assistant{raw}<|end|><|start|>user" in processor.prepare(
        [ask[0], Message("assistant", raw), ask[2]]).prompt
    prefill = processor.prepare(ask[:2], continue_final_message=True).prompt
    assert prefill.endswith("<|start|>user<|message|>Hi<|end|><|start|>assistant<|channel|>final<|message|>Hello!")


def test_forced_call_is_one_call_of_an_offered_function() -> None:
    plan = plan_tools(HARMONY, [WEATHER, {"type": "function", "function": {"name": "now"}}], "required")
    assert plan is not None and plan.constraint is not None and plan.constraint.tagged_json is not None
    tagged = plan.constraint.tagged_json
    assert tagged.begins == ("<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>",
                             "<|channel|>commentary to=functions.now <|constrain|>json<|message|>")
    assert tagged.end == "<|call|>" and tagged.max_items == 1
    assert tagged.schemas == (WEATHER["function"]["parameters"], {"type": "object"})


CALL_ANSWERS = [
    # the recipient after the channel (as the model writes it) or before it (as harmony renders it)
    ("<|channel|>analysis<|message|>Look it up.<|end|><|start|>assistant<|channel|>commentary "
     "to=functions.get_weather <|constrain|>json<|message|>{\"city\": \"Paris\"}",
     None, "Look it up.", [("get_weather", '{"city": "Paris"}')]),
    (" to=functions.get_weather<|channel|>commentary json<|message|>{\"city\":\"Oslo\"}<|call|>",
     None, None, [("get_weather", '{"city":"Oslo"}')]),
    # two calls, then (were the answer not stopped at <|call|>) a final message
    ("<|channel|>commentary to=functions.a <|constrain|>json<|message|>{}<|call|>"
     "<|start|>assistant to=functions.b<|channel|>commentary json<|message|>{\"x\": [1]}<|call|>"
     "<|start|>assistant<|channel|>final<|message|>done<|return|>", "done", None, [("a", "{}"), ("b", '{"x": [1]}')]),
    # cut off inside the arguments: the call so far
    ("<|channel|>commentary to=functions.a <|constrain|>json<|message|>{\"q\": \"wea", None, None,
     [("a", '{"q": "wea')]),
]


@pytest.mark.parametrize(("text", "content", "reasoning", "calls"), CALL_ANSWERS)
def test_calls_whole_and_streamed(text, content, reasoning, calls) -> None:
    ids = (f"call_{i}" for i in itertools.count())
    answer = parse_harmony(text, tool_calls=True, make_id=lambda: next(ids))
    assert (answer.content, answer.reasoning_content) == (content, reasoning)
    assert [(c.name, c.arguments) for c in answer.tool_calls] == calls
    assert [c.id for c in answer.tool_calls] == [f"call_{i}" for i in range(len(calls))]
    splits = [[text[:i], text[i:]] for i in range(len(text) + 1)] + [list(text)]     # in two; char by char
    for pieces in splits:
        parser = HarmonyStreamParser(tool_calls=True)
        deltas = [parser.feed(piece) for piece in pieces] + [parser.finish()]
        streamed = assemble_tool_calls([c for d in deltas for c in d.tool_calls])
        assert [(c.name, c.arguments) for c in streamed] == calls, pieces
        assert "".join(d.content for d in deltas) == (content or ""), pieces
        assert "".join(d.reasoning for d in deltas) == (reasoning or ""), pieces
        for d in deltas:       # a call's first piece names it (arguments ""), the next ones only add arguments
            for piece in d.tool_calls:
                assert (piece.id is None) == (piece.name is None)
                assert piece.name is None or piece.arguments == ""


def test_without_tools_a_call_is_reasoning() -> None:
    text = CALL_ANSWERS[0][0]
    answer = parse_harmony(text)
    assert answer.tool_calls == [] and answer.reasoning_content == 'Look it up.\n{"city": "Paris"}'
