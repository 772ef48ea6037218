"""Tool calls in the format each template's LLM was trained on: offering tools in the prompt, rendering calls
and results back into the history, parsing an answer into (content, calls), streaming OpenAI-shaped deltas,
and the constraint that forces calls (``tool_choice`` "required" or a named function).

Formats, by the checkpoint's ``template`` (config.json):

- **Hermes-2** (InternVL2-1B's Qwen2, 40B's Nous-Hermes-2-Yi, 76B's Hermes-2-Theta-Llama-3), the Hermes-2-Pro
  function-calling format: the tools, one ``{"type": "function", "function": {...}}`` JSON per line inside
  ``<tools>...</tools>``, are described at the end of the system message; a call is
  ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` (several calls: one block each, separated
  by a newline, after the answer's text if any); results are a ``tool`` turn
  (``<|im_start|>tool\\n``) holding one ``<tool_response>\\n...\\n</tool_response>`` per result (consecutive
  results share the turn, newline-separated).
- **internlm2-chat** (2B, 8B, 26B), InternLM2's action format (as LMDeploy's internlm2 template and tool
  parser): the tools, a JSON list of the ``function`` objects, are a second system turn
  ``<|im_start|>system name=<|plugin|>\\n[...]<|im_end|>`` after the system message; a call is
  ``<|action_start|><|plugin|>\\n{"name": ..., "parameters": {...}}<|action_end|>`` right after the answer's
  text; each result is a turn ``<|im_start|>environment name=<|plugin|>\\n...<|im_end|>``. Its tags are special
  tokens: decode the answer with ``skip_special_tokens=False`` (:attr:`ToolPlan.skip_special_tokens`).
  Parsing also accepts ``"arguments"`` for ``"parameters"``.
- **phi3-chat** (4B): Phi-3 has no trained tool format, so it gets the Hermes one (tools in the system
  message, ``<tool_call>`` blocks) with results as a *user* turn (Phi-3 knows only system, user and
  assistant) holding the ``<tool_response>`` blocks.

- **internvl3_5_gpt_oss** (InternVL3.5-GPT-OSS), harmony (``harmony_tools.py`` writes it, ``harmony.py`` parses
  it): the functions are a ``developer`` message of TypeScript-like declarations, the system message's channel
  line becomes harmony's; a call is a message to ``functions.NAME`` on the commentary channel whose body is the
  arguments (``<|call|>`` ends it); a result is a message from ``functions.NAME`` to the assistant. One call per
  turn: ``<|call|>`` stops the answer (the client sends the result, the model goes on).

``internvl_zh`` has no tool format (:func:`tool_call_format` refuses it).

Parsing (the streaming parser lives in ``tool_call_stream.py``): text outside the call blocks is the content
(whitespace next to a block dropped); a block whose JSON is not ``{"name": str, "arguments": {...}}`` makes
:meth:`ToolCallFormat.parse` give the whole answer back as content with no calls (as vLLM's parsers do).
Arguments are the model's own JSON text of the object, byte for byte, so the streamed fragments add up to
exactly the parsed string. Names are not checked against the offered tools (as vLLM); a forced call
(:attr:`ToolPlan.constraint`) can only name offered ones.

Example::

    plan = plan_tools(tool_call_format("Hermes-2"), tools=[{"type": "function", "function": {
        "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}])
    parsed = plan.parse('<tool_call>\\n{"name": "get_weather", "arguments": {"city": "Paris"}}\\n</tool_call>')
    parsed.tool_calls[0].name, parsed.tool_calls[0].arguments    # 'get_weather', '{"city": "Paris"}'
    parser = plan.stream_parser()
    for text in pieces:                  # the detokenizer's new text
        delta = parser.feed(text)        # delta.content, delta.tool_calls (OpenAI-shaped, see to_openai)
    last = parser.finish()
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidRequest
from . import harmony_tools
from .harmony import parse_harmony
from .structured_output import StructuredOutput, TaggedJSON
from .tool_call_stream import (
    ParsedOutput,
    StreamDelta,
    ToolCall,
    ToolCallDelta,
    ToolCallStreamParser,
    assemble_tool_calls,
    new_tool_call_id,
)

__all__ = ["FORMATS", "HARMONY", "HarmonyToolCallFormat", "ParsedOutput", "StreamDelta", "Tool", "ToolCall",
           "ToolCallDelta", "ToolCallFormat", "ToolCallStreamParser", "ToolPlan", "ToolResult", "assemble_tool_calls",
           "new_tool_call_id", "parse_tool_call", "parse_tools", "plan_tools", "tool_call_format"]


def parse_tool_call(raw: Any) -> ToolCall:
    """One entry of an assistant message's ``tool_calls`` (OpenAI's ``{"id", "type": "function", "function":
    {"name", "arguments"}}``, a dict or an object with ``model_dump()``); arguments given as an object are
    accepted and written as JSON."""
    item = raw.model_dump(exclude_none=True) if hasattr(raw, "model_dump") else raw
    if isinstance(item, ToolCall):
        return item
    fn = item.get("function") if isinstance(item, Mapping) else None
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) \
            or item.get("type", "function") != "function":
        raise InvalidRequest(f"a tool call must be {{'id': ..., 'type': 'function', 'function': {{'name': ..., "
                             f"'arguments': '...'}}}}, got {raw!r}")
    arguments = fn.get("arguments", "{}")
    if isinstance(arguments, Mapping):
        arguments = json.dumps(arguments, ensure_ascii=False)
    if not isinstance(arguments, str):
        raise InvalidRequest(f"tool call {fn['name']!r}: arguments must be a JSON string")
    call_id = item.get("id")
    if call_id is not None and not isinstance(call_id, str):
        raise InvalidRequest(f"tool call {fn['name']!r}: id must be a string")
    call = ToolCall(call_id or new_tool_call_id(), fn["name"], arguments)
    call.arguments_object()          # refuse arguments that are no JSON object now, with the call named
    return call


@dataclass(frozen=True)
class ToolResult:
    """A ``tool`` message's content, for rendering (``name``: the function, when the client gives it)."""

    content: str
    tool_call_id: str | None = None
    name: str | None = None


@dataclass(frozen=True)
class Tool:
    """One offered function: OpenAI's ``{"type": "function", "function": {"name", "description", "parameters"}}``."""

    name: str
    description: str | None = None
    parameters: Mapping[str, Any] | None = None

    def function(self) -> dict[str, Any]:
        """The ``function`` object (what InternLM2 is shown)."""
        out: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            out["description"] = self.description
        out["parameters"] = dict(self.parameters) if self.parameters is not None else {"type": "object",
                                                                                       "properties": {}}
        return out

    def to_openai(self) -> dict[str, Any]:
        return {"type": "function", "function": self.function()}


_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


def parse_tools(raw: Sequence[Any]) -> tuple[Tool, ...]:
    """OpenAI's ``tools`` list (dicts, or objects with ``model_dump()``) -> :class:`Tool`\\ s; a clear error
    naming the entry otherwise."""
    if not isinstance(raw, (list, tuple)):
        raise InvalidRequest("tools must be a list of {'type': 'function', 'function': {...}}")
    tools: list[Tool] = []
    for i, entry in enumerate(raw):
        item = entry.model_dump(exclude_none=True) if hasattr(entry, "model_dump") else entry
        if isinstance(item, Tool):
            tools.append(item)
            continue
        if not isinstance(item, Mapping) or item.get("type", "function") != "function" \
                or not isinstance(item.get("function"), Mapping):
            raise InvalidRequest(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}")
        fn = item["function"]
        name, description, parameters = fn.get("name"), fn.get("description"), fn.get("parameters")
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidRequest(f"tools[{i}].function.name must be 1-64 letters, digits, '_', '-', '.' or ':', "
                                 f"got {name!r}")
        if description is not None and not isinstance(description, str):
            raise InvalidRequest(f"tools[{i}].function.description must be a string")
        if parameters is not None and not isinstance(parameters, Mapping):
            raise InvalidRequest(f"tools[{i}].function.parameters must be a JSON schema object")
        tools.append(Tool(name, description, dict(parameters) if parameters is not None else None))
    names = [t.name for t in tools]
    if len(set(names)) != len(names):
        raise InvalidRequest(f"tools: function names must be unique, got {names}")
    return tuple(tools)


# -- formats ---------------------------------------------------------------------------------------

_HERMES_TOOLS_PROMPT = (
    "You are a function calling AI model. You are provided with function signatures within <tools></tools> XML "
    "tags. You may call one or more functions to assist with the user query. Don't make assumptions about what "
    "values to plug into functions. Here are the available tools: <tools>\n{tools}\n</tools>\n"
    "For each function call return a json object with function name and arguments within <tool_call></tool_call> "
    "XML tags as follows:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-dict>}}\n</tool_call>")


@dataclass(frozen=True)
class ToolCallFormat:
    """How one template family writes tools, calls and results (see the module docstring).

    Rendering works on turns ``(role header, text)`` of the conversation template (``Template.roles``, or the
    extra headers here)."""

    name: str
    call_begin: str                  # opens a call block (parsing)
    call_end: str                    # closes it
    arguments_key: str               # "arguments" (Hermes) or "parameters" (InternLM2)
    forced_begin: str                # what a forced call starts with (the begin tag and what follows it)
    forced_end: str
    call_separator: str              # between two calls (and after the answer's text)
    tools_in_system: bool            # tools appended to the system message (else a turn of their own)
    tools_role: str = ""             # the tools' own turn header (tools_in_system False)
    result_role: str | None = None   # the results' turn header (None: the user's)
    group_results: bool = True       # consecutive results share one turn
    wrap_results: bool = True        # each result inside <tool_response>\n...\n</tool_response>
    skip_special_tokens: bool = True  # False: the tags are special tokens the detokenizer must keep

    # -- prompt ------------------------------------------------------------------------------------
    def system_message(self, system: str, tools: Sequence[Tool]) -> str:
        """The system message with the tools described (unchanged when they get a turn of their own)."""
        if not self.tools_in_system or not tools:
            return system
        listing = "\n".join(json.dumps(t.to_openai(), ensure_ascii=False) for t in tools)
        prompt = _HERMES_TOOLS_PROMPT.format(tools=listing)
        return f"{system}\n\n{prompt}" if system else prompt

    def tool_turns(self, tools: Sequence[Tool]) -> list[tuple[str, str]]:
        """Turns right after the system message that offer the tools (InternLM2's plugin system turn)."""
        if self.tools_in_system or not tools:
            return []
        return [(self.tools_role, json.dumps([t.function() for t in tools], ensure_ascii=False))]

    def call_text(self, call: ToolCall) -> str:
        body = json.dumps({"name": call.name, self.arguments_key: call.arguments_object()}, ensure_ascii=False)
        return self.forced_begin + body + self.forced_end

    def assistant_text(self, content: str | None, calls: Sequence[ToolCall]) -> str:
        """An assistant message of the history with its calls, as the model writes them."""
        blocks = [self.call_text(c) for c in calls]
        parts = ([content] if content else []) + blocks
        return self.call_separator.join(parts)

    def assistant_turns(self, role: str, content: str | None, calls: Sequence[ToolCall]
                        ) -> list[tuple[str, str | None]]:
        """The turns of an assistant message of the history with calls (a text of None: the header is the
        whole turn, written as it is)."""
        return [(role, self.assistant_text(content, calls))]

    def result_turns(self, results: Sequence[ToolResult], user_role: str) -> list[tuple[str, str | None]]:
        """Turns for consecutive tool results (a text of None: the header is the whole turn)."""
        role = self.result_role if self.result_role is not None else user_role
        blocks = [f"<tool_response>\n{r.content}\n</tool_response>" if self.wrap_results else r.content
                  for r in results]
        if self.group_results:
            return [(role, "\n".join(blocks))]
        return [(role, b) for b in blocks]

    # -- answer ------------------------------------------------------------------------------------
    def stream_parser(self, *, make_id: Callable[[], str] = new_tool_call_id) -> ToolCallStreamParser:
        return ToolCallStreamParser(self.call_begin, self.call_end, make_id=make_id)

    def parse(self, text: str, *, make_id: Callable[[], str] = new_tool_call_id) -> ParsedOutput:
        """A finished answer -> content and calls (a malformed block: all content, no calls)."""
        parser = self.stream_parser(make_id=make_id)
        pieces = [parser.feed(text), parser.finish()]
        if parser.malformed:
            return ParsedOutput(text if text else None, [])
        content = "".join(p.content for p in pieces)
        calls = assemble_tool_calls([d for p in pieces for d in p.tool_calls])
        return ParsedOutput(content or None, calls)

    # -- forcing -----------------------------------------------------------------------------------
    def call_schema(self, tool: Tool) -> dict[str, Any]:
        """The JSON schema of one call of ``tool`` in this format (the name first, so it streams first)."""
        parameters = dict(tool.parameters) if tool.parameters is not None else {"type": "object"}
        # "#/$defs/..." references (pydantic's nested models) resolve against the root: the definitions move there
        definitions = {key: parameters.pop(key) for key in ("$defs", "definitions") if key in parameters}
        return {"type": "object",
                "properties": {"name": {"type": "string", "const": tool.name}, self.arguments_key: parameters},
                "required": ["name", self.arguments_key], "additionalProperties": False, **definitions}

    def forced_calls(self, tools: Sequence[Tool], *, max_items: int | None) -> StructuredOutput:
        """One or more calls (at most ``max_items``) of the given tools, in this format."""
        return StructuredOutput(tagged_json=TaggedJSON(
            begin=self.forced_begin, end=self.forced_end, schemas=tuple(self.call_schema(t) for t in tools),
            min_items=1, max_items=max_items, separator=self.call_separator))


HERMES = ToolCallFormat(
    name="Hermes-2", call_begin="<tool_call>", call_end="</tool_call>", arguments_key="arguments",
    forced_begin="<tool_call>\n", forced_end="\n</tool_call>", call_separator="\n", tools_in_system=True,
    result_role="<|im_start|>tool\n")

INTERNLM2 = ToolCallFormat(
    name="internlm2-chat", call_begin="<|action_start|><|plugin|>", call_end="<|action_end|>",
    arguments_key="parameters", forced_begin="<|action_start|><|plugin|>\n", forced_end="<|action_end|>",
    call_separator="", tools_in_system=False, tools_role="<|im_start|>system name=<|plugin|>\n",
    result_role="<|im_start|>environment name=<|plugin|>\n", group_results=False, wrap_results=False,
    skip_special_tokens=False)

PHI3 = ToolCallFormat(
    name="phi3-chat", call_begin="<tool_call>", call_end="</tool_call>", arguments_key="arguments",
    forced_begin="<tool_call>\n", forced_end="\n</tool_call>", call_separator="\n", tools_in_system=True,
    result_role=None)



@dataclass(frozen=True)
class HarmonyToolCallFormat(ToolCallFormat):
    """Harmony's tools (see the module docstring): calls are messages, not tagged JSON, so the prompt's pieces
    come from ``harmony_tools`` and an answer is read by ``harmony.parse_harmony`` (the chat route streams it
    with ``harmony.HarmonyStreamParser``)."""

    def system_message(self, system: str, tools: Sequence[Tool]) -> str:
        return harmony_tools.system_with_functions(system) if tools else system

    def tool_turns(self, tools: Sequence[Tool]) -> list[tuple[str, str]]:
        if not tools:
            return []
        return [(harmony_tools.DEVELOPER_HEADER,
                 harmony_tools.tools_section([(t.name, t.description, t.parameters) for t in tools]))]

    def assistant_turns(self, role: str, content: str | None, calls: Sequence[ToolCall]
                        ) -> list[tuple[str, str | None]]:
        """One message per call; the content beside calls is not shown (as vLLM renders gpt-oss history)."""
        return [(harmony_tools.call_turn(call.name, call.arguments), None) for call in calls]

    def result_turns(self, results: Sequence[ToolResult], user_role: str) -> list[tuple[str, str | None]]:
        """Each result a whole message from its function (an empty result too), named by the client's ``name``
        or by the call it answers."""
        turns: list[tuple[str, str | None]] = []
        for result in results:
            if not result.name:
                raise InvalidRequest("a tool message needs the function's name: give name, or the tool_call_id of "
                                     "an earlier assistant tool call")
            turns.append((harmony_tools.result_header(result.name) + result.content + "<|end|>", None))
        return turns

    def parse(self, text: str, *, make_id: Callable[[], str] = new_tool_call_id) -> ParsedOutput:
        """The final channel and the calls (the reasoning: ``harmony.parse_harmony``)."""
        answer = parse_harmony(text, tool_calls=True, make_id=make_id)
        return ParsedOutput(answer.content, answer.tool_calls)

    def stream_parser(self, *, make_id: Callable[[], str] = new_tool_call_id) -> ToolCallStreamParser:
        raise NotImplementedError("harmony answers stream through harmony.HarmonyStreamParser(tool_calls=True)")

    def call_schema(self, tool: Tool) -> dict[str, Any]:
        """A call's body is its arguments: the function's parameters."""
        return dict(tool.parameters) if tool.parameters is not None else {"type": "object"}

    def forced_calls(self, tools: Sequence[Tool], *, max_items: int | None) -> StructuredOutput:
        """One call (``<|call|>`` ends the turn) of one of ``tools``, its header naming it."""
        return StructuredOutput(tagged_json=TaggedJSON(
            begin="", end=self.forced_end, schemas=tuple(self.call_schema(t) for t in tools),
            begins=tuple(self.forced_begin.format(name=t.name) for t in tools), min_items=1, max_items=1))


HARMONY = HarmonyToolCallFormat(
    name="internvl3_5_gpt_oss", call_begin="", call_end="<|call|>", arguments_key="",
    forced_begin="<|channel|>commentary to=functions.{name} <|constrain|>json<|message|>", forced_end="<|call|>",
    call_separator="", tools_in_system=False, skip_special_tokens=False)

#: The tool-call format of each conversation template that has one.
FORMATS: dict[str, ToolCallFormat] = {HERMES.name: HERMES, INTERNLM2.name: INTERNLM2, PHI3.name: PHI3,
                                      HARMONY.name: HARMONY}


def tool_call_format(template: str) -> ToolCallFormat:
    """The format of the template named by config.json's ``template``."""
    try:
        return FORMATS[template]
    except KeyError:
        raise InvalidRequest(f"the {template!r} conversation template has no tool-call format; tools and "
                             f"tool messages work with {', '.join(FORMATS)}") from None


# -- a request's tools -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolPlan:
    """What a request's ``tools`` / ``tool_choice`` mean for this model: the format, the offered tools, and
    ``choice`` ("auto", "required", or "function" with ``function_name``)."""

    format: ToolCallFormat
    tools: tuple[Tool, ...]
    choice: str = "auto"
    function_name: str | None = None
    parallel_tool_calls: bool = True

    @property
    def constraint(self) -> StructuredOutput | None:
        """The output constraint forcing the calls ("required": one or more of any offered tool, one when
        ``parallel_tool_calls`` is false; a named function: exactly one call of it); None for "auto"."""
        if self.choice == "required":
            return self.format.forced_calls(self.tools, max_items=None if self.parallel_tool_calls else 1)
        if self.choice == "function":
            tool = next(t for t in self.tools if t.name == self.function_name)
            return self.format.forced_calls([tool], max_items=1)
        return None

    @property
    def skip_special_tokens(self) -> bool:
        """Whether the answer may be decoded without special tokens (False for InternLM2: its tags are)."""
        return self.format.skip_special_tokens

    def parse(self, text: str, *, make_id: Callable[[], str] = new_tool_call_id) -> ParsedOutput:
        return self.format.parse(text, make_id=make_id)

    def stream_parser(self, *, make_id: Callable[[], str] = new_tool_call_id) -> ToolCallStreamParser:
        return self.format.stream_parser(make_id=make_id)


def _choice(tool_choice: Any) -> tuple[str, str | None]:
    if hasattr(tool_choice, "model_dump"):
        tool_choice = tool_choice.model_dump(exclude_none=True)
    if tool_choice is None:
        return "auto", None
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise InvalidRequest(f"tool_choice must be 'none', 'auto', 'required' or {{'type': 'function', "
                                 f"'function': {{'name': ...}}}}, got {tool_choice!r}")
        return tool_choice, None
    if isinstance(tool_choice, Mapping) and tool_choice.get("type", "function") == "function" \
            and isinstance(tool_choice.get("function"), Mapping) \
            and isinstance(tool_choice["function"].get("name"), str):
        return "function", tool_choice["function"]["name"]
    raise InvalidRequest(f"tool_choice must be 'none', 'auto', 'required' or {{'type': 'function', 'function': "
                         f"{{'name': ...}}}}, got {tool_choice!r}")


def plan_tools(fmt: ToolCallFormat | None, tools: Sequence[Any] | None, tool_choice: Any = "auto", *,
               parallel_tool_calls: bool = True) -> ToolPlan | None:
    """A request's tools and tool_choice -> a :class:`ToolPlan`, or None when no tools are offered (none
    given, or ``tool_choice`` "none": then they are not shown to the model and nothing is parsed).

    ``fmt`` None: the template has no tool format; offering tools is then an error."""
    mode, name = _choice(tool_choice)
    parsed = parse_tools(tools) if tools is not None else ()
    if not parsed:
        if mode in ("required", "function"):
            raise InvalidRequest(f"tool_choice {tool_choice!r} needs tools")
        return None
    if mode == "none":
        return None
    if mode == "function" and name not in {t.name for t in parsed}:
        raise InvalidRequest(f"tool_choice names the function {name!r}, which is not among the tools "
                             f"({', '.join(t.name for t in parsed)})")
    if fmt is None:
        raise InvalidRequest("this model's conversation template has no tool-call format")
    return ToolPlan(fmt, parsed, mode, name, parallel_tool_calls)
