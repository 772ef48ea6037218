"""Streaming a tool-calling answer: content outside the call blocks and OpenAI-shaped call deltas, as the
text arrives (the formats of ``tool_calls.py`` give the tags).

Example::

    parser = ToolCallStreamParser("<tool_call>", "</tool_call>")
    deltas = [parser.feed(piece) for piece in pieces] + [parser.finish()]
    calls = assemble_tool_calls([d for delta in deltas for d in delta.tool_calls])
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidRequest

__all__ = ["ParsedOutput", "StreamDelta", "ToolCall", "ToolCallDelta", "ToolCallStreamParser",
           "assemble_tool_calls", "new_tool_call_id"]


def new_tool_call_id() -> str:
    """An id as OpenAI's (``call_`` + 24 hex digits)."""
    return "call_" + uuid.uuid4().hex[:24]


@dataclass(frozen=True)
class ToolCall:
    """One function call of an assistant message, as OpenAI's: ``arguments`` is a JSON object's text."""

    id: str
    name: str
    arguments: str

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}

    def arguments_object(self) -> dict[str, Any]:
        """The arguments parsed; a call in the history whose arguments are no JSON object is the caller's error."""
        try:
            value = json.loads(self.arguments) if self.arguments.strip() else {}
        except json.JSONDecodeError as exc:
            raise InvalidRequest(f"tool call {self.id!r} ({self.name}): arguments are not JSON: {exc}") from None
        if not isinstance(value, dict):
            raise InvalidRequest(f"tool call {self.id!r} ({self.name}): arguments must be a JSON object")
        return value


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of one call, as OpenAI streams it: the first piece of a call carries ``id`` and ``name``
    (``type`` "function"), the next ones fragments of ``arguments``."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def to_openai(self) -> dict[str, Any]:
        function: dict[str, Any] = {"arguments": self.arguments}
        out: dict[str, Any] = {"index": self.index}
        if self.id is not None:
            out["id"] = self.id
            out["type"] = "function"
        if self.name is not None:
            function = {"name": self.name, "arguments": self.arguments}
        out["function"] = function
        return out


@dataclass(frozen=True)
class StreamDelta:
    """What one piece of the answer adds: content text and/or call pieces (both may be empty)."""

    content: str = ""
    tool_calls: tuple[ToolCallDelta, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.content or self.tool_calls)


@dataclass(frozen=True)
class ParsedOutput:
    """A finished answer split into its content (None when there is none) and its calls."""

    content: str | None
    tool_calls: list[ToolCall]


def assemble_tool_calls(deltas: Sequence[ToolCallDelta]) -> list[ToolCall]:
    """Streamed call pieces -> the calls they make up (what a client does with them)."""
    calls: dict[int, list[str]] = {}
    for d in deltas:
        entry = calls.setdefault(d.index, ["", "", ""])
        if d.id is not None:
            entry[0] = d.id
        if d.name is not None:
            entry[1] = d.name
        entry[2] += d.arguments
    return [ToolCall(i, n, a) for _, (i, n, a) in sorted(calls.items())]


def _held_prefix(text: str, tag: str) -> int:
    """How many trailing characters of ``text`` could be the start of ``tag`` (kept until more text comes)."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ToolCallStreamParser:
    """Feeds on the answer's text as it comes and gives :class:`StreamDelta`\\ s: content outside the call
    blocks (never a partial tag, never the whitespace next to a block), and for each call its ``id`` and
    ``name`` as soon as the name is complete, then its arguments' JSON text as it arrives.

    A call whose ``name`` is not its first key is given whole at its end tag. A block that turns out not to
    be a call is given as content if nothing of it was sent yet; ``malformed`` says one was seen."""

    _NAME_FIRST = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:')

    def __init__(self, begin: str, end: str, *, make_id: Callable[[], str] = new_tool_call_id) -> None:
        self._begin = begin
        self._end = end
        self._make_id = make_id
        self._buf = ""
        self._in_call = False
        self._pending_ws = ""
        self._after_call = False
        self.num_calls = 0
        self.malformed = False
        self._reset_call()

    def _reset_call(self) -> None:
        self._body = ""
        self._name_sent = False
        self._pos = 0               # where the arguments' scan goes on in _body
        self._depth = 0
        self._in_str = False
        self._escape = False
        self._value_started = False
        self._value_done = False
        self._unstreamable = False  # arguments are not an object: given at the end tag, whole

    # -- public ------------------------------------------------------------------------------------
    def feed(self, text: str) -> StreamDelta:
        content: list[str] = []
        calls: list[ToolCallDelta] = []
        self._buf += text
        while True:
            if not self._in_call:
                i = self._buf.find(self._begin)
                if i >= 0:
                    content.append(self._content(self._buf[:i], before_tag=True))
                    self._buf = self._buf[i + len(self._begin):]
                    self._in_call = True
                    self._reset_call()
                    continue
                keep = _held_prefix(self._buf, self._begin)
                content.append(self._content(self._buf[:len(self._buf) - keep], before_tag=False))
                self._buf = self._buf[len(self._buf) - keep:]
                break
            j = self._buf.find(self._end)
            if j >= 0:
                self._body += self._buf[:j]
                self._buf = self._buf[j + len(self._end):]
                calls.extend(self._advance())
                closed = self._close_call()
                if isinstance(closed, str):
                    content.append(self._content(closed, before_tag=False))
                else:
                    calls.extend(closed)
                    self._after_call = True
                    self._pending_ws = ""
                self._in_call = False
                continue
            keep = _held_prefix(self._buf, self._end)
            self._body += self._buf[:len(self._buf) - keep]
            self._buf = self._buf[len(self._buf) - keep:]
            calls.extend(self._advance())
            break
        return StreamDelta("".join(content), tuple(calls))

    def finish(self) -> StreamDelta:
        """The end of the answer: what was held back (a tag's start that never completed, an unclosed block
        of which nothing was sent, trailing whitespace of an answer without calls) as content."""
        content = ""
        if self._in_call:
            self._body += self._buf
            self._buf = ""
            calls = self._advance()
            if not self._name_sent:
                self.malformed = True
                content = self._content(self._begin + self._body, before_tag=False)
            else:
                self.malformed = True        # cut off inside a call: its pieces so far were sent
            self._in_call = False
            tail = "" if self.num_calls else self._pending_ws
            self._pending_ws = ""
            return StreamDelta(content + tail, tuple(calls))
        content = self._content(self._buf, before_tag=False)
        self._buf = ""
        if not self.num_calls:
            content += self._pending_ws
        self._pending_ws = ""
        return StreamDelta(content)

    # -- content -----------------------------------------------------------------------------------
    def _content(self, text: str, *, before_tag: bool) -> str:
        text = self._pending_ws + text
        self._pending_ws = ""
        if self._after_call:
            text = text.lstrip()
            if not text:
                return ""
            self._after_call = False
        kept = text.rstrip()
        if not before_tag:
            self._pending_ws = text[len(kept):]
        return kept

    # -- a call ------------------------------------------------------------------------------------
    def _advance(self) -> list[ToolCallDelta]:
        """Name as soon as it is complete, then the arguments' characters scanned so far."""
        out: list[ToolCallDelta] = []
        if not self._name_sent:
            match = self._NAME_FIRST.match(self._body)
            if match is None:
                return out
            try:
                name = json.loads('"' + match.group(1) + '"')
            except json.JSONDecodeError:
                return out
            self._name_sent = True
            self._pos = match.end()
            out.append(ToolCallDelta(self.num_calls, id=self._make_id(), name=name))
            self.num_calls += 1
        if self._value_done or self._unstreamable:
            return out
        start = None
        i = self._pos
        body = self._body
        while i < len(body) and not self._value_done:
            c = body[i]
            if not self._value_started:
                if c.isspace():
                    self._pos = i + 1
                    i += 1
                    continue
                if c != "{":
                    self._unstreamable = True
                    return out
                self._value_started = True
                start = i
                self._depth = 1
            elif start is None:
                start = i
                self._step(c)
            else:
                self._step(c)
            i += 1
        if start is not None and i > start:
            out.append(ToolCallDelta(self.num_calls - 1, arguments=body[start:i]))
        self._pos = i
        return out

    def _step(self, c: str) -> None:
        if self._in_str:
            if self._escape:
                self._escape = False
            elif c == "\\":
                self._escape = True
            elif c == '"':
                self._in_str = False
        elif c == '"':
            self._in_str = True
        elif c in "{[":
            self._depth += 1
        elif c in "}]":
            self._depth -= 1
            if self._depth == 0:
                self._value_done = True

    def _close_call(self) -> list[ToolCallDelta] | str:
        """The block ended: check it; calls still to send, or the block's text when it is no call."""
        call = _decode_call(self._body)
        if call is None:
            self.malformed = True
            if self._name_sent:
                return []
            return self._begin + self._body + self._end
        name, arguments = call
        if not self._name_sent:
            delta = ToolCallDelta(self.num_calls, id=self._make_id(), name=name,
                                  arguments=json.dumps(arguments, ensure_ascii=False))
            self.num_calls += 1
            return [delta]
        if self._unstreamable or not self._value_done:
            self.malformed = True        # the name went out, the arguments were not an object
        return []


def _decode_call(body: str) -> tuple[str, dict[str, Any]] | None:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get("arguments", obj.get("parameters", {}))
    if not isinstance(arguments, dict):
        return None
    return obj["name"], arguments
