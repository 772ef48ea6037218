"""``/v1/responses``: OpenAI's Responses API, run exactly as a chat completion with one choice.

The request becomes the equivalent chat completion request (``responses_protocol``), which goes through the
chat route's own steps: ``chat.prepare_chat`` (media, template, tiles, tokens), ``common.sampling_params`` (the
engine's context rule), the admission slot, ``streaming.merged`` (client disconnects abort the engine
request) and the same error shapes. Only the answer's shape differs: a Response object, or the SSE event
sequence the openai SDK parses::

    response.created, response.in_progress, response.output_item.added, response.content_part.added,
    response.output_text.delta x N, response.output_text.done, response.content_part.done,
    response.output_item.done, response.completed (or response.incomplete at max_output_tokens)

each event as OpenAI sends it: an ``event:`` line naming its type, then ``data:`` with ``type`` and a
``sequence_number`` counting from 0. A failure once the stream has begun is reported as the chat route
does (an ``{"error": ...}`` event, which the SDK raises as ``APIError``), and every stream ends with
``data: [DONE]`` (the SDK stops reading there).

A harmony answer (GPT-OSS) gives its reasoning as ``reasoning`` items before the message (streamed as
``response.reasoning_text.delta``), its ``final`` channel as the message and, when the request offers
functions, its calls as ``function_call`` items, as vLLM's Responses API serves gpt-oss (``response_items``).
Tools are served for these models only (``ResponsesRequest.check_tools``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ...engine.async_engine import AsyncEngine
from ...engine.engine import RequestOutput
from ...processing.harmony import HarmonyStreamParser, uses_harmony
from ...processing.tool_call_stream import ToolCallDelta
from ..protocol import ChatCompletionRequest
from ..responses_protocol import (
    IncompleteDetails,
    InputTokensDetails,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
    new_response_id,
)
from ..state import ServingState
from .chat import prepare_chat
from .common import check_model, parse, sampling_params, serving_state
from .generation import generate
from .response_items import Event, OutputItems
from .streaming import Jobs, merged

router = APIRouter()


@router.post("/v1/responses")
async def create_response(request: Request) -> Response:
    state = serving_state(request)
    req: ResponsesRequest = parse(state, ResponsesRequest, await request.body())
    check_model(state, req.model)
    req.check_tools(served=uses_harmony(state.processor.template))
    constraint = req.structured_output()            # text.format: json_schema / json_object
    chat_req: ChatCompletionRequest = parse(state, ChatCompletionRequest, json.dumps(req.chat_body()).encode())
    engine = state.require_engine()
    state.prompt_encoder.check_bytes(sum(len(m.text().encode("utf-8")) for m in chat_req.messages))

    async def prepare() -> Jobs:
        prepared = await prepare_chat(state, chat_req)
        num_prompt_tokens = len(prepared.prompt_token_ids)
        # The context rule under this API's name for the limit (sampling_params asks it again, as max_tokens).
        engine.max_new_tokens_for(num_prompt_tokens, req.max_output_tokens, default=state.config.default_max_tokens,
                                  name="max_output_tokens")
        [params] = sampling_params(state, engine, chat_req, prepared)
        if constraint is not None:
            params = dataclasses.replace(params, structured_output=constraint)
        return [(prepared, params)]

    start = partial(ResponseObject.start, req=req)
    return await generate(request, state, engine, stream=bool(req.stream), request_id=new_response_id("resp"),
                          prepare=prepare, full=lambda rid, jobs: _full(state, engine, start(rid), jobs),
                          events=lambda rid, jobs: _events(state, engine, start(rid), jobs))


def _finished(start: ResponseObject, items: OutputItems, out: RequestOutput, num_prompt_tokens: int
              ) -> ResponseObject:
    """The final Response: ``incomplete`` when the answer hit ``max_output_tokens`` (or the context), else
    ``completed``; usage counts the prompt once (its cached part in ``cached_tokens``)."""
    usage = ResponseUsage(input_tokens=num_prompt_tokens,
                          input_tokens_details=InputTokensDetails(cached_tokens=out.num_cached_tokens),
                          output_tokens=len(out.token_ids), total_tokens=num_prompt_tokens + len(out.token_ids))
    incomplete = out.finish_reason == "length"
    return start.model_copy(update={
        "status": "incomplete" if incomplete else "completed", "output": list(items.items), "usage": usage,
        "incomplete_details": IncompleteDetails(reason="max_output_tokens") if incomplete else None})


class _Answer:
    """One answer's pieces into its output items: a harmony answer split by channel (and calls, when the
    request offers functions), another model's text as the message; a demo answer labelled once."""

    def __init__(self, state: ServingState, jobs: Jobs) -> None:
        self.state = state
        self.items = OutputItems()
        tools = jobs[0][0].tool_plan is not None
        self.harmony = HarmonyStreamParser(tool_calls=tools) if state.processor.harmony_answers else None
        self.labelled = False
        if self.harmony is None:
            self.opening = self.items.text("", open_empty=True)    # the message item from the start, as before
        else:
            self.opening = []

    def feed(self, out: RequestOutput) -> list[Event]:
        calls: tuple[ToolCallDelta, ...] = ()
        if self.harmony is None:
            text, reasoning = out.delta, ""
        else:
            fields = self.harmony.feed(out.delta, finished=out.finished)
            text, reasoning, calls = fields.content, fields.reasoning, fields.tool_calls
        if (text or out.finished) and not self.labelled:     # a demo answer says so, even an empty one
            text, self.labelled = self.state.label(text), True
        events = self.items.reasoning(reasoning) + self.items.calls(calls) + self.items.text(text)
        if out.finished:
            events += self.items.finish(incomplete=out.finish_reason == "length")
        return events


async def _full(state: ServingState, engine: AsyncEngine, start: ResponseObject, jobs: Jobs) -> JSONResponse:
    answer = _Answer(state, jobs)
    final: RequestOutput | None = None
    async for _, out in merged(engine, start.id, jobs):
        answer.feed(out)
        if out.finished:
            final = out
    assert final is not None, "the engine ends every request with a finished output"
    response = _finished(start, answer.items, final, len(jobs[0][0].prompt_token_ids))
    return JSONResponse(response.model_dump(mode="json"))


def _event(sequence_number: int, kind: str, **fields: Any) -> str:
    """One SSE event as OpenAI sends it: ``event: <type>`` and the JSON data with ``type`` and
    ``sequence_number``."""
    payload = {"type": kind, "sequence_number": sequence_number, **fields}
    return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _events(state: ServingState, engine: AsyncEngine, start: ResponseObject, jobs: Jobs
                  ) -> AsyncIterator[str]:
    sequence = 0

    def event(kind: str, **fields: Any) -> str:
        nonlocal sequence
        sequence += 1
        return _event(sequence - 1, kind, **fields)

    yield event("response.created", response=start.model_dump(mode="json"))
    yield event("response.in_progress", response=start.model_dump(mode="json"))
    answer = _Answer(state, jobs)
    for kind, fields in answer.opening:
        yield event(kind, **fields)
    final: RequestOutput | None = None
    async for _, out in merged(engine, start.id, jobs):
        for kind, fields in answer.feed(out):
            yield event(kind, **fields)
        if out.finished:
            final = out
    assert final is not None, "the engine ends every request with a finished output"
    response = _finished(start, answer.items, final, len(jobs[0][0].prompt_token_ids))
    kind = "response.incomplete" if response.status == "incomplete" else "response.completed"
    yield event(kind, response=response.model_dump(mode="json"))
