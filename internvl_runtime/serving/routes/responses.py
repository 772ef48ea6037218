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

A harmony answer (GPT-OSS) gives its ``final`` channel as the output text; its reasoning is not sent
(no reasoning output items yet).
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
from ...processing.harmony import HarmonyStreamParser, parse_harmony, uses_harmony
from ..protocol import ChatCompletionRequest
from ..responses_protocol import (
    IncompleteDetails,
    InputTokensDetails,
    OutputMessage,
    OutputTextPart,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
    new_response_id,
)
from ..state import ServingState
from .chat import prepare_chat
from .common import check_model, parse, sampling_params, serving_state
from .generation import generate
from .streaming import Jobs, merged

router = APIRouter()


@router.post("/v1/responses")
async def create_response(request: Request) -> Response:
    state = serving_state(request)
    req: ResponsesRequest = parse(state, ResponsesRequest, await request.body())
    check_model(state, req.model)
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


def _finished(start: ResponseObject, message: OutputMessage, out: RequestOutput, num_prompt_tokens: int
              ) -> ResponseObject:
    """The final Response: ``incomplete`` when the answer hit ``max_output_tokens`` (or the context), else
    ``completed``; usage counts the prompt once (its cached part in ``cached_tokens``)."""
    usage = ResponseUsage(input_tokens=num_prompt_tokens,
                          input_tokens_details=InputTokensDetails(cached_tokens=out.num_cached_tokens),
                          output_tokens=len(out.token_ids), total_tokens=num_prompt_tokens + len(out.token_ids))
    incomplete = out.finish_reason == "length"
    return start.model_copy(update={
        "status": "incomplete" if incomplete else "completed", "output": [message], "usage": usage,
        "incomplete_details": IncompleteDetails(reason="max_output_tokens") if incomplete else None})


def _message(item_id: str, text: str, out: RequestOutput | None) -> OutputMessage:
    """The output message item: in progress while ``out`` (the final output) is None."""
    if out is None:
        return OutputMessage(id=item_id, status="in_progress")
    return OutputMessage(id=item_id, status="incomplete" if out.finish_reason == "length" else "completed",
                         content=[OutputTextPart(text=text)])


async def _full(state: ServingState, engine: AsyncEngine, start: ResponseObject, jobs: Jobs) -> JSONResponse:
    final: RequestOutput | None = None
    async for _, out in merged(engine, start.id, jobs):
        if out.finished:
            final = out
    assert final is not None, "the engine ends every request with a finished output"
    text = final.text
    if uses_harmony(state.processor.template):       # the answer is the final channel (processing.harmony)
        text = parse_harmony(text).content or ""
    message = _message(new_response_id("msg"), state.label(text), final)
    return JSONResponse(_finished(start, message, final, len(jobs[0][0].prompt_token_ids)).model_dump(mode="json"))


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

    item_id = new_response_id("msg")
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    yield event("response.created", response=start.model_dump(mode="json"))
    yield event("response.in_progress", response=start.model_dump(mode="json"))
    yield event("response.output_item.added", output_index=0,
                item=_message(item_id, "", None).model_dump(mode="json"))
    yield event("response.content_part.added", **where, part=OutputTextPart(text="").model_dump(mode="json"))
    text, labelled = "", False
    final: RequestOutput | None = None
    harmony = HarmonyStreamParser() if uses_harmony(state.processor.template) else None
    async for _, out in merged(engine, start.id, jobs):
        delta = out.delta if harmony is None else harmony.feed(out.delta, finished=out.finished).content
        if (delta or out.finished) and not labelled:     # a demo answer says so, even an empty one
            delta, labelled = state.label(delta), True
        if delta:
            text += delta
            yield event("response.output_text.delta", **where, delta=delta, logprobs=[])
        if out.finished:
            final = out
    assert final is not None, "the engine ends every request with a finished output"
    message = _message(item_id, text, final)
    yield event("response.output_text.done", **where, text=text, logprobs=[])
    yield event("response.content_part.done", **where, part=message.content[0].model_dump(mode="json"))
    yield event("response.output_item.done", output_index=0, item=message.model_dump(mode="json"))
    response = _finished(start, message, final, len(jobs[0][0].prompt_token_ids))
    kind = "response.incomplete" if response.status == "incomplete" else "response.completed"
    yield event(kind, response=response.model_dump(mode="json"))
