"""GPT-OSS tool calls on /v1/chat/completions, as vLLM serves gpt-oss with its ``openai`` tool parser: a harmony
message to ``functions.NAME`` becomes ``message.tool_calls`` (finish_reason "tool_calls"), streamed as a first
delta with the call's id and name then pieces of its arguments; the client's calls and results go back into the
prompt as harmony messages, so a two-turn loop with the openai SDK works; ``tool_choice`` "none" hides the tools,
"required" and a named function force a call.

The tiny model writes no harmony, so its sampler is scripted (as in test_harmony_server.py): a prompt without a
tool result gets the call, a prompt that holds one (a ``<|call|>`` in the history) gets the final answer."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

import openai
import pytest

from internvl_runtime import AutoTokenizer
from internvl_runtime.engine.sampler import Sampler, SamplerOutput, SamplingRow
from paths import FIXTURES

from .helpers import client_with_sampler

CKPT = FIXTURES / "ckpt" / "tiny-3_5-20B-A4B"
MODEL = "tiny-3_5-20B-A4B"
REASONING = "I need the weather in Paris."
ARGUMENTS = '{"city":"Paris"}'
CALL = (f"<|channel|>analysis<|message|>{REASONING}<|end|><|start|>assistant<|channel|>commentary "
        f"to=functions.get_weather <|constrain|>json<|message|>{ARGUMENTS}")
FORCED = f"<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{ARGUMENTS}"
FINAL = "It is sunny in Paris."
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


class _ToolLoopSampler(Sampler):
    """Samples as usual, then replaces each token by the next one of a script: ``call`` until the prompt holds a
    call (``<|call|>``), ``answer`` after."""

    def __init__(self, call: list[int], answer: list[int], call_id: int) -> None:
        self.call, self.answer, self.call_id = call, answer, call_id

    def __call__(self, logits, rows: list[SamplingRow]) -> SamplerOutput:  # type: ignore[override]
        out = super().__call__(logits, rows)
        for i, row in enumerate(rows):
            prompt = list(row.token_ids)[:len(row.token_ids) - row.num_output_tokens]
            script = self.answer if self.call_id in prompt else self.call
            out.token_ids[i] = script[min(row.num_output_tokens, len(script) - 1)]
        return out


@contextlib.contextmanager
def _client(call_text: str) -> Iterator[openai.OpenAI]:
    tokenizer = AutoTokenizer.from_pretrained(CKPT)
    call_id = tokenizer.convert_tokens_to_ids("<|call|>")
    call = [*tokenizer.encode(call_text, add_special_tokens=False), call_id]
    answer = [*tokenizer.encode(f"<|channel|>final<|message|>{FINAL}", add_special_tokens=False),
              tokenizer.convert_tokens_to_ids("<|return|>")]
    with client_with_sampler(CKPT, _ToolLoopSampler(call, answer, call_id)) as c:
        yield c


@pytest.fixture(scope="module")
def client() -> Iterator[openai.OpenAI]:
    with _client(CALL) as c:
        yield c


def test_a_call_is_a_tool_call(client) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=200, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.reasoning_content == REASONING      # type: ignore[attr-defined]
    [call] = choice.message.tool_calls
    assert (call.type, call.function.name, call.function.arguments) == ("function", "get_weather", ARGUMENTS)
    assert call.id.startswith("call_")


def test_a_call_streams_its_name_then_its_arguments(client) -> None:
    deltas, finishes, reasoning = [], [], ""
    for chunk in client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=200,
                                                temperature=0, stream=True):
        for choice in chunk.choices:
            deltas.extend(choice.delta.tool_calls or [])
            reasoning += getattr(choice.delta, "reasoning_content", None) or ""
            finishes.append(choice.finish_reason)
            assert not choice.delta.content
    assert reasoning == REASONING and finishes[-1] == "tool_calls"
    first, rest = deltas[0], deltas[1:]
    assert (first.index, first.type, first.function.name, first.function.arguments) == (0, "function",
                                                                                       "get_weather", "")
    assert first.id.startswith("call_")
    assert rest and all(d.id is None and d.function.name is None and d.index == 0 for d in rest)
    assert "".join(d.function.arguments for d in rest) == ARGUMENTS


def test_two_turn_tool_loop(client) -> None:
    """The call goes back as the assistant's message and the result as a ``tool`` message: the prompt then holds
    the call (``<|call|>``), so the scripted model answers, in the final channel."""
    first = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=200, temperature=0)
    call = first.choices[0].message.tool_calls[0]
    history = [*ASK, first.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"sky": "sunny"})}]
    second = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=200,
                                            temperature=0)
    assert second.choices[0].message.content == FINAL
    assert second.choices[0].finish_reason == "stop" and not second.choices[0].message.tool_calls
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + first.usage.completion_tokens


def test_tool_choice_none_hides_the_tools_and_parses_no_call(client) -> None:
    offered = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=200,
                                             temperature=0)
    hidden = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none",
                                            max_tokens=200, temperature=0)
    bare = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=200, temperature=0)
    assert hidden.usage.prompt_tokens == bare.usage.prompt_tokens < offered.usage.prompt_tokens
    choice = hidden.choices[0]
    assert choice.finish_reason == "stop" and not choice.message.tool_calls
    assert choice.message.reasoning_content == f"{REASONING}\n{ARGUMENTS}"     # type: ignore[attr-defined]


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_calls(tool_choice) -> None:
    """"required" and a named function constrain the answer to one call in harmony (the header naming one of
    the functions, the arguments valid against its parameters, ``<|call|>``): the scripted call passes it."""
    with _client(FORCED) as c:
        reply = c.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=tool_choice,
                                          max_tokens=200, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert (call.function.name, call.function.arguments) == ("get_weather", ARGUMENTS)


# -- /v1/responses ------------------------------------------------------------------------------------

RESPONSES_TOOLS = [{"type": "function", "name": "get_weather", "description": "The weather in a city.",
                    "parameters": TOOLS[0]["function"]["parameters"]}]


def test_responses_reasoning_item_then_function_call_item(client) -> None:
    response = client.responses.create(model=MODEL, input="What is the weather in Paris?", tools=RESPONSES_TOOLS,
                                       max_output_tokens=200)
    assert response.status == "completed"
    assert [item.type for item in response.output] == ["reasoning", "function_call"]
    reasoning, call = response.output
    assert [(part.type, part.text) for part in reasoning.content] == [("reasoning_text", REASONING)]
    assert (call.name, call.arguments, call.status) == ("get_weather", ARGUMENTS, "completed")
    assert call.call_id.startswith("call_") and call.id.startswith("fc_")
    assert response.output_text == ""


def test_responses_tool_loop_and_streamed_items(client) -> None:
    """The call and its output go back as input items; the answer is then the final channel, after no reasoning
    (the scripted final answer has none). Streamed, the first turn's events build the same items."""
    events = list(client.responses.create(model=MODEL, input="What is the weather in Paris?", tools=RESPONSES_TOOLS,
                                          max_output_tokens=200, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert kinds.index("response.reasoning_text.delta") < kinds.index("response.function_call_arguments.delta")
    reasoning = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert (reasoning, arguments) == (REASONING, ARGUMENTS)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    done = [e.item for e in events if e.type == "response.output_item.done"]
    final = events[-1].response
    assert [item.type for item in done] == [item.type for item in final.output] == ["reasoning", "function_call"]
    call = final.output[1]
    follow_up = [{"role": "user", "content": "What is the weather in Paris?"},
                 *(item.model_dump(exclude_none=True) for item in final.output),
                 {"type": "function_call_output", "call_id": call.call_id, "output": '{"sky": "sunny"}'}]
    second = client.responses.create(model=MODEL, input=follow_up, tools=RESPONSES_TOOLS, max_output_tokens=200)
    assert second.output_text == FINAL and [item.type for item in second.output] == ["message"]
