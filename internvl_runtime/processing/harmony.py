"""OpenAI's harmony answer format (InternVL3.5-GPT-OSS): which text of an answer is the user's answer
(``content``) and which is the model's reasoning (``reasoning_content``), as vLLM serves gpt-oss.

A harmony answer is a run of messages, each a header and a body::

    <|channel|>analysis<|message|>thinking...<|end|><|start|>assistant<|channel|>final<|message|>Paris<|return|>

(the prompt ends with ``<|start|>assistant``, so the first header starts at ``<|channel|>``). The text of
the ``final`` channel is the content; the text of every other channel (``analysis``, ``commentary``) is the
reasoning. Text outside any header (a model that writes no markup) is content, so nothing is lost. Two
messages routed to the same field are joined by a newline (vLLM joins its reasoning messages so).

This module works on the answer's text decoded with the special tokens KEPT (the server decodes so for
these templates): the tags are special tokens of the GPT-OSS tokenizer. One parser serves both ways: a
whole answer is :func:`parse_harmony`, a streamed one :class:`HarmonyStreamParser`, and the concatenation
of the streamed deltas is the whole answer's fields.

Tool calls: a message whose header names a recipient ``functions.NAME`` (``to=functions.get_weather``, before or
after the channel, as harmony renders it and as the model writes it) is a call of NAME whose body is the
arguments' JSON text, given byte for byte (the streamed pieces add up to the whole answer's string). The
parser reads them as calls only when asked (``tool_calls=True``: the request offered tools, as vLLM's
gpt-oss tool parser runs only then); otherwise a call's body is reasoning, like any non-final channel.
Streamed as vLLM streams gpt-oss calls: the first piece of a call carries its id and name (arguments ""),
the next ones pieces of its arguments.

Example::

    parser = HarmonyStreamParser(tool_calls=True)
    deltas = [parser.feed(piece) for piece in pieces] + [parser.finish()]
    calls = assemble_tool_calls([c for d in deltas for c in d.tool_calls])
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from .tool_call_stream import ToolCall, ToolCallDelta, assemble_tool_calls, new_tool_call_id

__all__ = ["ACTION_STOP_TOKENS", "FUNCTIONS_PREFIX", "HARMONY_ARCHITECTURES", "HARMONY_TEMPLATES", "HarmonyAnswer",
           "HarmonyDelta", "HarmonyStreamParser", "answers_in_harmony", "parse_harmony", "uses_harmony"]

#: The official conversation templates whose models answer in harmony.
HARMONY_TEMPLATES = frozenset({"internvl3_5_gpt_oss"})
#: Tokens that end an assistant's turn besides the template's stop (``<|return|>``): a tool call's
#: ``<|call|>`` waits for the tool's result (vLLM stops gpt-oss at both, its "assistant actions").
ACTION_STOP_TOKENS = ("<|call|>",)

_START, _CHANNEL, _MESSAGE = "<|start|>", "<|channel|>", "<|message|>"
_END, _RETURN, _CALL = "<|end|>", "<|return|>", "<|call|>"
#: What may begin a header: a new message, its channel, or its recipient (`` to=functions.x``).
_HEADER_OPENERS = (_START, _CHANNEL, " to=")
#: The recipient of a message, in its header (``to=functions.get_weather``).
_RECIPIENT = re.compile(r"to=([^\s<]+)")
#: The recipients that are the client's functions (``tools``), as harmony names their namespace.
FUNCTIONS_PREFIX = "functions."
#: What ends a message body (``<|start|>``: a next message whose ``<|end|>`` the model left out).
_BODY_ENDS = (_END, _RETURN, _CALL, _START)


#: LLM architectures whose answers are harmony messages whatever renders the prompt (an HF-format folder's
#: Jinja template has no official template name).
HARMONY_ARCHITECTURES = frozenset({"GptOssForCausalLM"})


def uses_harmony(template: str | None) -> bool:
    """Whether the official template is a harmony one (its prompts, tool declarations and history are written
    by ``harmony_tools``)."""
    return template in HARMONY_TEMPLATES


def answers_in_harmony(template: str | None, llm_architecture: str | None) -> bool:
    """Whether the checkpoint's answers are harmony messages (channels, recipients) for the server to parse:
    its official template is a harmony one, or its decoder is GPT-OSS (either format)."""
    return uses_harmony(template) or llm_architecture in HARMONY_ARCHITECTURES


@dataclass(frozen=True)
class HarmonyDelta:
    """What a piece of the answer adds to each field (all may be empty)."""

    content: str = ""
    reasoning: str = ""
    tool_calls: tuple[ToolCallDelta, ...] = ()


@dataclass(frozen=True)
class HarmonyAnswer:
    """A whole answer's fields; None where no message went to the field (OpenAI's ``null``)."""

    content: str | None
    reasoning_content: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)


def _held(text: str, tags: tuple[str, ...]) -> int:
    """How many characters at the end of ``text`` may be the start of one of ``tags`` (held back)."""
    for n in range(min(len(text), max(len(t) for t in tags) - 1), 0, -1):
        if any(t.startswith(text[-n:]) for t in tags):
            return n
    return 0


def _function(header: str) -> str | None:
    """The function a header's recipient names (``to=functions.get_weather`` -> ``get_weather``), or None."""
    match = _RECIPIENT.search(header)
    if match is None or not match.group(1).startswith(FUNCTIONS_PREFIX):
        return None
    return match.group(1)[len(FUNCTIONS_PREFIX):]


def _channel(header: str) -> str | None:
    """The channel a header names (``<|channel|>final``, ``<|channel|>commentary json``), or None."""
    if _CHANNEL not in header:
        return None
    words = header.split(_CHANNEL, 1)[1].split("<|", 1)[0].split()
    return words[0] if words else ""


class HarmonyStreamParser:
    """Harmony answer text in, in pieces of any size; content, reasoning and tool-call deltas out.

    States: reading a header (until ``<|message|>``; text that cannot be a header is content), or a body of
    a channel (until ``<|end|>`` / ``<|return|>`` / ``<|call|>``). Text that may be the start of a tag is
    held back until the next piece (or :meth:`finish`) decides. ``tool_calls``: bodies sent to
    ``functions.NAME`` are calls (see the module docstring); ``make_id`` names each call."""

    def __init__(self, *, tool_calls: bool = False, make_id: Callable[[], str] = new_tool_call_id) -> None:
        self._buffer = ""
        self._in_body = False
        self._target = "content"      # the current body's field: "content", "reasoning" or "call"
        self._started = {"content": False, "reasoning": False}   # whether a message went to the field
        self._tool_calls = tool_calls
        self._make_id = make_id
        self.num_calls = 0

    def feed(self, text: str, *, finished: bool = False) -> HarmonyDelta:
        """Add a piece of the answer; return what it adds to each field (``finished``: the answer ends with
        this piece, :meth:`finish` included)."""
        self._buffer += text
        out = _Pieces()
        while self._step(out, final=False):
            pass
        if finished:
            self._finish(out)
        return out.delta()

    def finish(self) -> HarmonyDelta:
        """The answer ended: release what was held back (an unfinished header is markup: dropped)."""
        out = _Pieces()
        self._finish(out)
        return out.delta()

    @property
    def started(self) -> tuple[bool, bool]:
        """Whether a message went to (content, reasoning) so far."""
        return self._started["content"], self._started["reasoning"]

    def _finish(self, out: _Pieces) -> None:
        while self._step(out, final=True):
            pass
        if self._in_body and self._buffer:
            out.add(self._target, self._buffer, self.num_calls - 1)
        self._buffer = ""

    def _open_body(self, header: str, out: _Pieces) -> None:
        channel = _channel(header)
        function = _function(header) if self._tool_calls else None
        self._in_body = True
        if function is not None:
            self._target = "call"
            out.calls.append(ToolCallDelta(self.num_calls, id=self._make_id(), name=function))
            self.num_calls += 1
            return
        self._target = "content" if channel in (None, "final") else "reasoning"
        if self._started[self._target]:
            out.add(self._target, "\n", -1)
        self._started[self._target] = True

    def _step(self, out: _Pieces, *, final: bool) -> bool:
        """Consume what can be decided now; True when the state changed (step again)."""
        if not self._buffer:
            return False
        if not self._in_body:
            opener = any(self._buffer.startswith(t) or t.startswith(self._buffer) for t in _HEADER_OPENERS)
            if not opener:                        # no markup: plain text is content
                self._open_body("", out)
                return True
            at = self._buffer.find(_MESSAGE)
            cut = [i + len(t) for t in (_END, _RETURN, _CALL) if 0 <= (i := self._buffer.find(t)) < (
                at if at >= 0 else len(self._buffer))]
            if cut:                               # a header that ended without a body: markup, dropped
                self._buffer = self._buffer[min(cut):]
                return True
            if at < 0:
                return False                      # the header goes on (dropped if the answer ends here)
            header = self._buffer[:at]
            self._buffer = self._buffer[at + len(_MESSAGE):]
            self._open_body(header, out)
            return True
        ends = [(i, t) for t in _BODY_ENDS if (i := self._buffer.find(t)) >= 0]
        if ends:
            at, tag = min(ends)
            out.add(self._target, self._buffer[:at], self.num_calls - 1)
            self._buffer = self._buffer[at + (0 if tag == _START else len(tag)):]
            self._in_body = False
            return True
        keep = 0 if final else _held(self._buffer, _BODY_ENDS)
        out.add(self._target, self._buffer[:len(self._buffer) - keep], self.num_calls - 1)
        self._buffer = self._buffer[len(self._buffer) - keep:]
        return False


class _Pieces:
    """What one :meth:`HarmonyStreamParser.feed` gathers, field by field."""

    def __init__(self) -> None:
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.calls: list[ToolCallDelta] = []

    def add(self, target: str, text: str, call_index: int) -> None:
        if not text:
            return
        if target == "call":
            self.calls.append(ToolCallDelta(call_index, arguments=text))
        else:
            (self.content if target == "content" else self.reasoning).append(text)

    def delta(self) -> HarmonyDelta:
        return HarmonyDelta("".join(self.content), "".join(self.reasoning), tuple(self.calls))


def parse_harmony(text: str, *, tool_calls: bool = False, make_id: Callable[[], str] = new_tool_call_id
                  ) -> HarmonyAnswer:
    """A whole answer's content, reasoning and (``tool_calls``: the request offered tools) calls: the
    concatenation of :class:`HarmonyStreamParser`'s deltas."""
    parser = HarmonyStreamParser(tool_calls=tool_calls, make_id=make_id)
    delta = parser.feed(text, finished=True)
    has_content, has_reasoning = parser.started
    return HarmonyAnswer(delta.content if has_content else None, delta.reasoning if has_reasoning else None,
                         assemble_tool_calls(delta.tool_calls))
