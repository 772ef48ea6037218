"""Answers that take time: several engine requests merged into one stream of choices, Server-Sent Events
that always end (``[DONE]``, after an error event if the body failed) and always close, and whole answers
cancelled when their client goes away."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Coroutine
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from ...engine.async_engine import AsyncEngine
from ...engine.engine import RequestOutput
from ...engine.sampling_params import SamplingParams
from ...processing.inputs import PreparedRequest
from ..protocol import error_payload
from ..state import ServingState, Slot

logger = logging.getLogger(__name__)

_DISCONNECT_POLL_S = 0.25

#: ``(prepared request, sampling params)`` per engine request: one per choice (and per prompt).
Jobs = list[tuple[PreparedRequest, SamplingParams]]


def sse(payload: dict[str, Any]) -> str:
    """One SSE event holding ``payload`` as compact JSON."""
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def merged(engine: AsyncEngine, base_id: str, jobs: Jobs) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Run several engine requests at once; yield ``(index, RequestOutput)`` as they come. Leaving the
    iteration cancels the others (each aborts its engine request and frees its KV blocks)."""
    # (index, an output, the failure that ended the job, or None: the job is done)
    queue: asyncio.Queue[tuple[int, RequestOutput | Exception | None]] = asyncio.Queue()

    async def pump(index: int, prepared: PreparedRequest, params: SamplingParams) -> None:
        try:
            async for out in engine.generate(f"{base_id}-{index}", prepared, params):
                queue.put_nowait((index, out))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            queue.put_nowait((index, exc))
            return
        queue.put_nowait((index, None))

    tasks = [asyncio.ensure_future(pump(i, p, s)) for i, (p, s) in enumerate(jobs)]
    remaining = len(tasks)
    try:
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
                continue
            if isinstance(item, BaseException):
                raise item
            yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def until_disconnected(request: Request, work: Coroutine[Any, Any, Response]) -> Response:
    """Await ``work`` (a coroutine); cancel it if the client goes away first (non-streaming requests)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                return Response(status_code=499)
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def _stream(slot: Slot, body: AsyncIterator[str]) -> AsyncIterator[str]:
    """SSE body: the events of ``body``, an error event if it fails, then ``[DONE]``; frees ``slot``."""
    try:
        async for event in body:
            yield event
        yield "data: [DONE]\n\n"
    except (asyncio.CancelledError, GeneratorExit):
        raise
    except Exception as exc:  # headers are sent: report the error in the stream, as OpenAI does
        status, payload = error_payload(exc)
        if status >= 500:
            logger.exception("stream failed")
        yield sse(payload)
        yield "data: [DONE]\n\n"
    finally:
        slot.release()


class _SSEResponse(StreamingResponse):
    """A StreamingResponse that always closes its body: a client that leaves mid-stream aborts the engine
    requests (freeing their KV blocks) now, not when the generator is garbage-collected."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


def streaming_response(state: ServingState, slot: Slot, body: AsyncIterator[str]) -> StreamingResponse:
    """The SSE response of ``body``; ``slot`` (the request's admission) is freed when the stream ends, or
    when it is garbage-collected without ever starting."""
    generator = _stream(slot, body)
    state.release_on_collect(generator, slot)
    return _SSEResponse(generator, media_type="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
