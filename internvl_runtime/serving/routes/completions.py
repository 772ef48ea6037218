"""``/v1/completions``: plain text in (no chat template), one engine request per prompt and choice."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ...engine.async_engine import AsyncEngine
from ...engine.engine import RequestOutput
from ..protocol import Completion, CompletionChoice, CompletionRequest, Usage, dump, new_id
from ..state import ServingState
from .common import check_model, check_n, completion_logprobs, parse, sampling_params, serving_state
from .generation import generate
from .streaming import Jobs, merged, sse

router = APIRouter()


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    state = serving_state(request)
    req: CompletionRequest = parse(state, CompletionRequest, await request.body())
    check_model(state, req.model)
    check_n(state, req.n * len(req.prompts))
    engine = state.require_engine()
    for prompt in req.prompts:
        state.prompt_encoder.check_bytes(len(prompt.encode("utf-8")))

    async def prepare() -> Jobs:
        processor, prompts = state.processor, req.prompts
        prepared = await state.run_in_worker(lambda: [processor.prepare_prompt(p, []) for p in prompts])
        return [(p, params) for p in prepared
                for params in sampling_params(state, engine, req, p)]

    return await generate(request, state, engine, stream=req.stream, request_id=new_id("cmpl"), prepare=prepare,
                          full=lambda rid, jobs: _full(state, engine, rid, req, jobs),
                          events=lambda rid, jobs: _events(state, engine, rid, req, jobs))


def _usage(jobs: Jobs, n: int, completion_tokens: int) -> Usage:
    """Usage of a request whose jobs are ``n`` choices per prompt: each prompt counted once."""
    prompt_tokens = sum(len(jobs[i][0].prompt_token_ids) for i in range(0, len(jobs), n))
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)


async def _full(state: ServingState, engine: AsyncEngine, request_id: str, req: CompletionRequest, jobs: Jobs
                ) -> JSONResponse:
    finals: dict[int, RequestOutput] = {}
    async for index, out in merged(engine, request_id, jobs):
        if out.finished:
            finals[index] = out
    choices = []
    for index in range(len(jobs)):
        out = finals[index]
        logprobs = completion_logprobs(out.logprobs, state.token_text) if req.logprobs is not None else None
        choices.append(CompletionChoice(index=index, text=state.label(out.text), finish_reason=out.finish_reason,
                                        logprobs=logprobs))
    usage = _usage(jobs, req.n, sum(len(finals[i].token_ids) for i in finals))
    return JSONResponse(dump(Completion(id=request_id, model=req.model, choices=choices, usage=usage,
                                        system_fingerprint=state.fingerprint)))


async def _events(state: ServingState, engine: AsyncEngine, request_id: str, req: CompletionRequest, jobs: Jobs
                  ) -> AsyncIterator[str]:
    include_usage = req.include_usage
    sent_logprobs = [0] * len(jobs)
    labelled = [False] * len(jobs)
    completion_tokens = 0

    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        payload = dump(Completion(id=request_id, model=req.model, choices=choices, usage=usage,
                                  system_fingerprint=state.fingerprint))
        if not include_usage:
            payload.pop("usage", None)
        return sse(payload)

    async for index, out in merged(engine, request_id, jobs):
        text = out.delta
        if (text or out.finished) and not labelled[index]:     # a demo answer says so, even an empty one
            text, labelled[index] = state.label(text), True
        logprobs = None
        if req.logprobs is not None:
            logprobs = completion_logprobs(out.logprobs[sent_logprobs[index]:], state.token_text)
            sent_logprobs[index] = len(out.logprobs)
        if out.finished:
            completion_tokens += len(out.token_ids)
        if not text and not out.finished and not (logprobs and logprobs.tokens):
            continue
        yield chunk([CompletionChoice(index=index, text=text, logprobs=logprobs,
                                      finish_reason=out.finish_reason if out.finished else None)])
    if include_usage:
        yield chunk([], _usage(jobs, req.n, completion_tokens))
