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
of the streamed deltas is the whole answer's fields. Tool calls (``commentary`` to ``functions.x``) are
not parsed into ``tool_calls``: their text is reasoning.

Example::

    parser = HarmonyStreamParser()
    deltas = [parser.feed(piece) for piece in pieces] + [parser.finish()]
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ACTION_STOP_TOKENS", "HARMONY_TEMPLATES", "HarmonyAnswer", "HarmonyDelta", "HarmonyStreamParser",
           "parse_harmony", "uses_harmony"]

#: The official conversation templates whose models answer in harmony.
HARMONY_TEMPLATES = frozenset({"internvl3_5_gpt_oss"})
#: Tokens that end an assistant's turn besides the template's stop (``<|return|>``): a tool call's
#: ``<|call|>`` waits for the tool's result (vLLM stops gpt-oss at both, its "assistant actions").
ACTION_STOP_TOKENS = ("<|call|>",)

_START, _CHANNEL, _MESSAGE = "<|start|>", "<|channel|>", "<|message|>"
_END, _RETURN, _CALL = "<|end|>", "<|return|>", "<|call|>"
#: What may begin a header: a new message, its channel, or its recipient (`` to=functions.x``).
_HEADER_OPENERS = (_START, _CHANNEL, " to=")
#: What ends a message body (``<|start|>``: a next message whose ``<|end|>`` the model left out).
_BODY_ENDS = (_END, _RETURN, _CALL, _START)


def uses_harmony(template: str | None) -> bool:
    """Whether answers of the checkpoint with this official template are harmony messages."""
    return template in HARMONY_TEMPLATES


@dataclass(frozen=True)
class HarmonyDelta:
    """What a piece of the answer adds to each field (both may be empty)."""

    content: str = ""
    reasoning: str = ""


@dataclass(frozen=True)
class HarmonyAnswer:
    """A whole answer's fields; None where no message went to the field (OpenAI's ``null``)."""

    content: str | None
    reasoning_content: str | None


def _held(text: str, tags: tuple[str, ...]) -> int:
    """How many characters at the end of ``text`` may be the start of one of ``tags`` (held back)."""
    for n in range(min(len(text), max(len(t) for t in tags) - 1), 0, -1):
        if any(t.startswith(text[-n:]) for t in tags):
            return n
    return 0


def _channel(header: str) -> str | None:
    """The channel a header names (``<|channel|>final``, ``<|channel|>commentary json``), or None."""
    if _CHANNEL not in header:
        return None
    words = header.split(_CHANNEL, 1)[1].split("<|", 1)[0].split()
    return words[0] if words else ""


class HarmonyStreamParser:
    """Harmony answer text in, in pieces of any size; content and reasoning deltas out.

    States: reading a header (until ``<|message|>``; text that cannot be a header is content), or a body of
    a channel (until ``<|end|>`` / ``<|return|>`` / ``<|call|>``). Text that may be the start of a tag is
    held back until the next piece (or :meth:`finish`) decides."""

    def __init__(self) -> None:
        self._buffer = ""
        self._in_body = False
        self._to_content = True       # the current body's field
        self._started = {True: False, False: False}   # whether a message went to content / reasoning

    def feed(self, text: str, *, finished: bool = False) -> HarmonyDelta:
        """Add a piece of the answer; return what it adds to each field (``finished``: the answer ends with
        this piece, :meth:`finish` included)."""
        self._buffer += text
        content: list[str] = []
        reasoning: list[str] = []
        while self._step(content, reasoning, final=False):
            pass
        if finished:
            last = self.finish()
            content.append(last.content)
            reasoning.append(last.reasoning)
        return HarmonyDelta("".join(content), "".join(reasoning))

    def finish(self) -> HarmonyDelta:
        """The answer ended: release what was held back (an unfinished header is markup: dropped)."""
        content: list[str] = []
        reasoning: list[str] = []
        while self._step(content, reasoning, final=True):
            pass
        if self._in_body and self._buffer:
            (content if self._to_content else reasoning).append(self._buffer)
        self._buffer = ""
        return HarmonyDelta("".join(content), "".join(reasoning))

    @property
    def started(self) -> tuple[bool, bool]:
        """Whether a message went to (content, reasoning) so far."""
        return self._started[True], self._started[False]

    def _open_body(self, to_content: bool, out: list[str]) -> None:
        if self._started[to_content]:
            out.append("\n")
        self._started[to_content] = True
        self._in_body, self._to_content = True, to_content

    def _step(self, content: list[str], reasoning: list[str], *, final: bool) -> bool:
        """Consume what can be decided now; True when the state changed (step again)."""
        if not self._buffer:
            return False
        if not self._in_body:
            opener = any(self._buffer.startswith(t) or t.startswith(self._buffer) for t in _HEADER_OPENERS)
            if not opener:                        # no markup: plain text is content
                self._open_body(True, content)
                return True
            at = self._buffer.find(_MESSAGE)
            cut = [i + len(t) for t in (_END, _RETURN, _CALL) if 0 <= (i := self._buffer.find(t)) < (
                at if at >= 0 else len(self._buffer))]
            if cut:                               # a header that ended without a body: markup, dropped
                self._buffer = self._buffer[min(cut):]
                return True
            if at < 0:
                return False                      # the header goes on (dropped if the answer ends here)
            channel = _channel(self._buffer[:at])
            self._buffer = self._buffer[at + len(_MESSAGE):]
            self._open_body(channel in (None, "final"), content if channel in (None, "final") else reasoning)
            return True
        out = content if self._to_content else reasoning
        ends = [(i, t) for t in _BODY_ENDS if (i := self._buffer.find(t)) >= 0]
        if ends:
            at, tag = min(ends)
            out.append(self._buffer[:at])
            self._buffer = self._buffer[at + (0 if tag == _START else len(tag)):]
            self._in_body = False
            return True
        keep = 0 if final else _held(self._buffer, _BODY_ENDS)
        out.append(self._buffer[:len(self._buffer) - keep])
        self._buffer = self._buffer[len(self._buffer) - keep:]
        return False


def parse_harmony(text: str) -> HarmonyAnswer:
    """A whole answer's content and reasoning (the concatenation of :class:`HarmonyStreamParser`'s deltas)."""
    parser = HarmonyStreamParser()
    delta = parser.feed(text, finished=True)
    has_content, has_reasoning = parser.started
    return HarmonyAnswer(delta.content if has_content else None, delta.reasoning if has_reasoning else None)
