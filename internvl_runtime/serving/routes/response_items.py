"""The output items of a Response, built as the answer arrives: what each piece of text adds (reasoning, the
message's text, a function call's arguments) opens, extends or closes an item, and each change is an SSE event
of OpenAI's Responses stream. The same builder makes the non-streamed Response (its events unused).

Items, in the order the answer writes them (as vLLM's Responses API gives gpt-oss's answers):

- ``reasoning`` (harmony's analysis): ``response.output_item.added``, ``response.content_part.added`` (a
  ``reasoning_text`` part), ``response.reasoning_text.delta`` x N, ``response.reasoning_text.done``,
  ``response.content_part.done``, ``response.output_item.done``;
- ``message`` (the final channel, or the whole text of another model): the same with an ``output_text`` part and
  ``response.output_text.delta`` / ``.done``;
- ``function_call``: ``response.output_item.added`` (arguments ""), ``response.function_call_arguments.delta``
  x N, ``response.function_call_arguments.done``, ``response.output_item.done``.

An answer with no item at all gets an empty message, so a Response always says what the model answered.
"""

from __future__ import annotations

from typing import Any

from ...processing.tool_call_stream import ToolCallDelta
from ..responses_protocol import (
    OutputFunctionCall,
    OutputItem,
    OutputMessage,
    OutputReasoning,
    OutputTextPart,
    ReasoningTextPart,
    new_response_id,
)

#: One event: its type and its fields (``sequence_number`` is the stream's).
Event = tuple[str, dict[str, Any]]


class OutputItems:
    """The items of one answer; ``reasoning`` / ``text`` / ``calls`` add pieces and return the events."""

    def __init__(self) -> None:
        self.items: list[OutputItem] = []
        self._open: str | None = None        # the kind of the last item while it is open
        self._text = ""                      # the open item's text (or arguments) so far

    # -- pieces ------------------------------------------------------------------------------------
    def reasoning(self, text: str) -> list[Event]:
        if not text:
            return []
        events = self._switch("reasoning")
        self._text += text
        return [*events, ("response.reasoning_text.delta", {**self._where(), "delta": text})]

    def text(self, text: str, *, open_empty: bool = False) -> list[Event]:
        """The message's text (``open_empty``: open the message even without text)."""
        if not text and not (open_empty and self._open != "message"):
            return []
        events = self._switch("message")
        if text:
            self._text += text
            events.append(("response.output_text.delta", {**self._where(), "delta": text, "logprobs": []}))
        return events

    def calls(self, deltas: tuple[ToolCallDelta, ...] | list[ToolCallDelta]) -> list[Event]:
        events: list[Event] = []
        for delta in deltas:
            if delta.name is not None:                 # a new call
                events += self._close()
                call_id = delta.id or ""
                self.items.append(OutputFunctionCall(id=new_response_id("fc"), call_id=call_id, name=delta.name,
                                                     arguments="", status="in_progress"))
                self._open, self._text = "function_call", ""
                events.append(("response.output_item.added", {"output_index": len(self.items) - 1,
                                                              "item": self.items[-1].model_dump(mode="json")}))
            if delta.arguments and self._open == "function_call":
                self._text += delta.arguments
                events.append(("response.function_call_arguments.delta",
                               {"item_id": self.items[-1].id, "output_index": len(self.items) - 1,
                                "delta": delta.arguments}))
        return events

    def finish(self, *, incomplete: bool) -> list[Event]:
        """The answer ended (``incomplete``: cut at the token limit): close the last item."""
        events = [] if self.items else self.text("", open_empty=True)
        return events + self._close(incomplete=incomplete)

    @property
    def output_text(self) -> str:
        return "".join(part.text for item in self.items if isinstance(item, OutputMessage) for part in item.content)

    # -- items -------------------------------------------------------------------------------------
    def _where(self) -> dict[str, Any]:
        return {"item_id": self.items[-1].id, "output_index": len(self.items) - 1, "content_index": 0}

    def _switch(self, kind: str) -> list[Event]:
        """Make an open item of ``kind`` the last one (closing another)."""
        if self._open == kind:
            return []
        events = self._close()
        item: OutputItem
        part: ReasoningTextPart | OutputTextPart
        if kind == "reasoning":
            item, part = OutputReasoning(id=new_response_id("rs"), status="in_progress"), ReasoningTextPart(text="")
        else:
            item, part = OutputMessage(id=new_response_id("msg"), status="in_progress"), OutputTextPart(text="")
        self.items.append(item)
        self._open, self._text = kind, ""
        events.append(("response.output_item.added", {"output_index": len(self.items) - 1,
                                                      "item": item.model_dump(mode="json")}))
        events.append(("response.content_part.added", {**self._where(), "part": part.model_dump(mode="json")}))
        return events

    def _close(self, *, incomplete: bool = False) -> list[Event]:
        if self._open is None:
            return []
        item, text, index = self.items[-1], self._text, len(self.items) - 1
        status = "incomplete" if incomplete else "completed"
        events: list[Event] = []
        done: OutputItem
        if isinstance(item, OutputFunctionCall):
            done = item.model_copy(update={"arguments": text, "status": status})
            events.append(("response.function_call_arguments.done",
                           {"item_id": item.id, "output_index": index, "arguments": text}))
        else:
            part: ReasoningTextPart | OutputTextPart
            if isinstance(item, OutputReasoning):
                part = ReasoningTextPart(text=text)
                done = item.model_copy(update={"content": [part], "status": status})
                events.append(("response.reasoning_text.done", {**self._where(), "text": text}))
            else:
                part = OutputTextPart(text=text)
                done = item.model_copy(update={"content": [part], "status": status})
                events.append(("response.output_text.done", {**self._where(), "text": text, "logprobs": []}))
            events.append(("response.content_part.done", {**self._where(), "part": part.model_dump(mode="json")}))
        self.items[-1] = done
        events.append(("response.output_item.done", {"output_index": index, "item": done.model_dump(mode="json")}))
        self._open, self._text = None, ""
        return events
