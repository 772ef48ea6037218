"""What every generation route does around its own parts: an admission slot held until the answer ends,
the jobs prepared inside it, room checked in the engine, then an SSE stream or a whole answer cancelled when
its client goes away. The routes (chat, completions, responses) give their own preparation and answer
shapes.

Example::

    return await generate(request, state, engine, stream=req.stream, request_id=new_id("cmpl"),
                          prepare=lambda: my_jobs(...), full=my_full, events=my_events)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from ...engine.async_engine import AsyncEngine
from ..state import ServingState
from .streaming import Jobs, streaming_response, until_disconnected

#: ``full(request_id, jobs)``: the whole answer; ``events(request_id, jobs)``: its SSE events.
FullAnswer = Callable[[str, Jobs], Coroutine[Any, Any, Response]]
StreamedAnswer = Callable[[str, Jobs], AsyncIterator[str]]


async def generate(request: Request, state: ServingState, engine: AsyncEngine, *, stream: bool, request_id: str,
                   prepare: Callable[[], Awaitable[Jobs]], full: FullAnswer, events: StreamedAnswer) -> Response:
    """Admit the request, ``prepare`` its jobs (one per choice), check the engine has room for them, and
    answer: ``events`` as SSE when ``stream``, else ``full``. The admission slot is freed when the answer
    ends (a stream: when it closes), or at once if anything before fails."""
    slot = state.admit()
    handed_over = False
    try:
        jobs = await prepare()
        engine.check_room(len(jobs))
        if stream:
            handed_over = True
            return streaming_response(state, slot, events(request_id, jobs))
        return await until_disconnected(request, full(request_id, jobs))
    finally:
        if not handed_over:
            slot.release()
