"""The OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions, /health, /metrics.

Threading rule (ARCHITECTURE.md, STYLE C.14): everything here runs in the HTTP layer. A handler parses
the JSON into typed models (``protocol``), fetches image bytes (``media``), decodes, tiles, renders the
template and tokenizes (``InputProcessor``, on a worker thread so the event loop stays responsive), checks
the context and the queue, and only then hands a ``PreparedRequest`` to the ``AsyncEngine``. The engine
thread owns the model and the KV cache; a stream the client leaves is closed, which aborts its engine
requests and frees their KV blocks at once.

Trace of one streamed chat request::

    POST /v1/chat/completions  -> ChatCompletionRequest (strict pydantic; 400 names the field)
      -> MediaFetcher.fetch(url) for each image (data:, http(s) with address checks, allowed files)
      -> worker thread: decode_image (pixel limit) -> InputProcessor.prepare (template, tiles, tokens)
      -> SamplingParams (context and KV capacity checked here: 400 before any streaming)
      -> n x AsyncEngine.generate(...) merged -> SSE chunks ... data: [DONE]
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel

from ..engine.sampling_params import SamplingParams
from ..errors import ContextLengthExceeded, EngineOverloaded, InvalidRequest, ModelNotFound
from ..processing.inputs import Message, PreparedRequest
from .media import decode_image
from .protocol import (ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest,
                       ChatMessageOut, ChoiceLogprobs, Completion, CompletionChoice, CompletionLogprobs,
                       CompletionRequest, DeltaMessage, ModelCard, ModelList, TokenLogprob, TopLogprob, Usage,
                       dump, error_payload, new_id)

logger = logging.getLogger(__name__)
router = APIRouter()

_DISCONNECT_POLL_S = 0.25


def _state(request: Request) -> Any:
    return request.app.state.serving


def _parse(model: type[BaseModel], body: bytes) -> Any:
    if not body:
        raise InvalidRequest("the request body is empty; send a JSON object")
    return model.model_validate_json(body)


# ---------------------------------------------------------------------------------------------------
# Plain routes
# ---------------------------------------------------------------------------------------------------


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """200 ``{"status": "ok"}`` once the weights are loaded and the engine loop runs; 503 ``loading`` before,
    503 ``error`` with the cause if loading failed or the engine loop stopped."""
    state = _state(request)
    engine = state.engine
    if engine is not None and engine.is_running:
        return JSONResponse({"status": "ok", "model": state.config.model_name, "demo": state.config.demo})
    if engine is not None:          # it ran and stopped: never a silent "loading"
        error = f"the engine loop stopped: {engine.death}" if engine.death else "the engine was shut down"
    else:
        error = state.load_error
    body = {"status": "error" if error else "loading", "model": state.config.model_name, "demo": state.config.demo}
    if error:
        body["error"] = error
    return JSONResponse(body, status_code=503)


@router.get("/v1/models")
async def list_models(request: Request) -> JSONResponse:
    state = _state(request)
    card = ModelCard(id=state.config.model_name, max_model_len=state.max_model_len)
    return JSONResponse(dump(ModelList(data=[card])))


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> JSONResponse:
    state = _state(request)
    _check_model(state, model_id)
    return JSONResponse(dump(ModelCard(id=state.config.model_name, max_model_len=state.max_model_len)))


@router.get("/metrics")
async def metrics(request: Request) -> PlainTextResponse:
    """Prometheus text format: requests, tokens in and out, time to first token, queue, KV blocks."""
    state = _state(request)
    return PlainTextResponse(await state.metrics_text(), media_type="text/plain; version=0.0.4")


# ---------------------------------------------------------------------------------------------------
# Shared steps
# ---------------------------------------------------------------------------------------------------


def _check_model(state: Any, model: str) -> None:
    if model != state.config.model_name:
        raise ModelNotFound(f"the model {model!r} does not exist; this server serves {state.config.model_name!r}")


def _check_n(state: Any, n: int) -> None:
    if n > state.config.max_n:
        raise InvalidRequest(f"n: at most {state.config.max_n} choices per request, got {n}")


def _sampling_params(state: Any, req: ChatCompletionRequest | CompletionRequest, num_prompt_tokens: int
                     ) -> list[SamplingParams]:
    """One SamplingParams per choice, after checking the request fits the context and the KV cache."""
    limit = state.max_model_len
    room = limit - num_prompt_tokens
    if room < 1:
        raise ContextLengthExceeded(f"the prompt is {num_prompt_tokens} tokens; the model's context is {limit} "
                                    "tokens, which leaves no room for an answer")
    max_tokens = req.requested_max_tokens
    if max_tokens is None:
        max_tokens = min(state.config.default_max_tokens, room)
    elif max_tokens > room:
        raise ContextLengthExceeded(f"the prompt ({num_prompt_tokens} tokens) plus max_tokens ({max_tokens}) is "
                                    f"{num_prompt_tokens + max_tokens} tokens, more than the model's context of "
                                    f"{limit} tokens")
    capacity = state.kv_capacity
    if capacity is not None and num_prompt_tokens + max_tokens - 1 > capacity:
        raise ContextLengthExceeded(f"the prompt ({num_prompt_tokens} tokens) plus max_tokens ({max_tokens}) "
                                    f"needs more KV slots than the whole cache holds ({capacity})")
    params = []
    for i in range(req.n):
        params.append(SamplingParams(
            max_new_tokens=max_tokens,
            min_new_tokens=req.min_tokens or 0,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=0 if req.top_k is None else req.top_k,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            stop=req.stop_list,
            seed=None if req.seed is None else (req.seed + i) % 2**64,   # choice i: seed + i, reproducible
            logprobs=req.num_logprobs,
        ))
    return params


def _check_queue(state: Any, engine: Any, count: int) -> None:
    if engine.num_pending + count > engine.max_queue_len:
        raise EngineOverloaded(f"the engine has {engine.num_pending} requests in flight (limit "
                               f"{engine.max_queue_len}); retry later")


async def _prepare_chat(state: Any, req: ChatCompletionRequest) -> PreparedRequest:
    """Fetch, decode and tile the images, render the template, tokenize."""
    config, processor = state.config, state.processor
    urls = [url for m in req.messages for url in m.image_urls()]
    if len(urls) > config.max_images_per_request:
        raise InvalidRequest(f"{len(urls)} images in one request; the limit is {config.max_images_per_request}")
    if req.max_dynamic_patch is not None and req.max_dynamic_patch > config.max_tiles_per_image:
        raise InvalidRequest(f"max_dynamic_patch: at most {config.max_tiles_per_image} tiles per image on this "
                             f"server, got {req.max_dynamic_patch}")
    max_num = req.max_dynamic_patch or min(processor.max_dynamic_patch, config.max_tiles_per_image)
    videos = [v for m in req.messages if (v := m.video()) is not None]
    for video in videos:
        if (video.num_segments or 8) > config.max_video_frames:
            raise InvalidRequest(f"num_segments: at most {config.max_video_frames} frames per video on this "
                                 f"server, got {video.num_segments}")
    datas = await _gather([state.fetcher.fetch(url) for url in urls])
    video_datas = await _gather([state.video_fetcher.fetch(v.url) for v in videos])

    def work() -> PreparedRequest:
        images = iter([decode_image(d, max_pixels=config.max_image_pixels) for d in datas])
        share = config.max_video_decoded_bytes // max(1, len(videos))     # the request's budget, shared
        clips = iter([video_frames(d, v.num_segments or 8, config, max_decoded_bytes=share)
                      for d, v in zip(video_datas, videos)])
        messages = []
        for m in req.messages:
            role = "system" if m.role == "developer" else m.role
            if m.video() is not None:
                messages.append(Message(role, m.text(), next(clips), is_video=True))
            else:
                messages.append(Message(role, m.text(), [next(images) for _ in m.image_urls()]))
        return processor.prepare(messages, max_num=max_num)

    return await state.run_in_worker(work)


def video_frames(data: bytes, num_segments: int, config: Any, *, max_decoded_bytes: int | None = None) -> list[Any]:
    """Sample ``num_segments`` frames (the official choice) within the server's video limits
    (``max_decoded_bytes``: this video's share of the request's decoding budget)."""
    from .media import decode_video

    budget = config.max_video_decoded_bytes if max_decoded_bytes is None else max_decoded_bytes
    return decode_video(data, num_segments=num_segments, max_pixels=config.max_image_pixels,
                        max_seconds=config.max_video_seconds, max_decoded_bytes=budget)


async def _gather(coroutines: list[Any]) -> list[Any]:
    """Run coroutines concurrently; the first failure cancels the others and is raised."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _merged(engine: Any, base_id: str, jobs: list[tuple[PreparedRequest, SamplingParams]]
                  ) -> AsyncIterator[tuple[int, Any]]:
    """Run several engine requests at once; yield ``(index, RequestOutput)`` as they come. Leaving the
    iteration cancels the others (each aborts its engine request and frees its KV blocks)."""
    queue: asyncio.Queue = asyncio.Queue()

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


async def _until_disconnected(request: Request, work: Any) -> Any:
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


def _sse(payload: dict[str, Any]) -> str:
    import json

    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _stream(state: Any, slot: Any, body: AsyncIterator[str]) -> AsyncIterator[str]:
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
        yield _sse(payload)
        yield "data: [DONE]\n\n"
    finally:
        slot.release()


class _SSEResponse(StreamingResponse):
    """A StreamingResponse that always closes its body: a client that leaves mid-stream aborts the engine
    requests (freeing their KV blocks) now, not when the generator is garbage-collected."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


def _streaming_response(state: Any, slot: Any, body: AsyncIterator[str]) -> StreamingResponse:
    generator = _stream(state, slot, body)
    state.release_on_collect(generator, slot)
    return _SSEResponse(generator, media_type="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ---------------------------------------------------------------------------------------------------
# /v1/chat/completions
# ---------------------------------------------------------------------------------------------------


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    state = _state(request)
    req: ChatCompletionRequest = _parse(ChatCompletionRequest, await request.body())
    _check_model(state, req.model)
    _check_n(state, req.n)
    engine = state.require_engine()
    # The byte bound before any work (images, template, tokens): the messages' text alone must fit.
    state.prompt_encoder.check_bytes(sum(len(m.text().encode("utf-8")) for m in req.messages))
    slot = state.admit()
    handed_over = False
    try:
        prepared = await _prepare_chat(state, req)
        params = _sampling_params(state, req, len(prepared.prompt_token_ids))
        _check_queue(state, engine, req.n)
        request_id = new_id("chatcmpl")
        jobs = [(prepared, p) for p in params]
        if req.stream:
            handed_over = True
            return _streaming_response(state, slot, _chat_events(state, engine, request_id, req, jobs))
        return await _until_disconnected(request, _chat_full(state, engine, request_id, req, jobs))
    finally:
        if not handed_over:
            slot.release()


async def _chat_full(state: Any, engine: Any, request_id: str, req: ChatCompletionRequest,
                     jobs: list[tuple[PreparedRequest, SamplingParams]]) -> JSONResponse:
    finals: dict[int, Any] = {}
    async for index, out in _merged(engine, request_id, jobs):
        if out.finished:
            finals[index] = out
    choices, completion_tokens = [], 0
    for index in range(len(jobs)):
        out = finals[index]
        completion_tokens += len(out.token_ids)
        logprobs = ChoiceLogprobs(content=state.chat_logprobs(out.logprobs)) if req.logprobs else None
        choices.append(ChatChoice(index=index, message=ChatMessageOut(content=state.label(out.text)),
                                  finish_reason=out.finish_reason, logprobs=logprobs))
    prompt_tokens = len(jobs[0][0].prompt_token_ids)
    usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                  total_tokens=prompt_tokens + completion_tokens)
    result = ChatCompletion(id=request_id, model=req.model, choices=choices, usage=usage,
                            system_fingerprint=state.fingerprint)
    return JSONResponse(dump(result))


async def _chat_events(state: Any, engine: Any, request_id: str, req: ChatCompletionRequest,
                       jobs: list[tuple[PreparedRequest, SamplingParams]]) -> AsyncIterator[str]:
    include_usage = req.include_usage

    def chunk(choices: list[ChatChunkChoice]) -> str:
        payload = dump(ChatCompletionChunk(id=request_id, model=req.model, choices=choices,
                                           system_fingerprint=state.fingerprint))
        for choice in payload["choices"]:     # as OpenAI: a delta names only what it carries
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
        if not include_usage:
            payload.pop("usage", None)
        return _sse(payload)

    for index in range(len(jobs)):
        yield chunk([ChatChunkChoice(index=index, delta=DeltaMessage(role="assistant", content=""))])
    sent_logprobs = [0] * len(jobs)
    labelled = [False] * len(jobs)
    completion_tokens = 0
    async for index, out in _merged(engine, request_id, jobs):
        text = out.delta
        if (text or out.finished) and not labelled[index]:     # a demo answer says so, even an empty one
            text, labelled[index] = state.label(text), True
        logprobs = None
        if req.logprobs:
            new = out.logprobs[sent_logprobs[index]:]
            sent_logprobs[index] = len(out.logprobs)
            logprobs = ChoiceLogprobs(content=state.chat_logprobs(new))
        if out.finished:
            completion_tokens += len(out.token_ids)
        if not text and not out.finished and not (logprobs and logprobs.content):
            continue           # the detokenizer holds text back (a possible stop string, a partial character)
        yield chunk([ChatChunkChoice(index=index, delta=DeltaMessage(content=text or None),
                                     finish_reason=out.finish_reason if out.finished else None,
                                     logprobs=logprobs)])
    if include_usage:
        prompt_tokens = len(jobs[0][0].prompt_token_ids)
        payload = dump(ChatCompletionChunk(id=request_id, model=req.model, choices=[],
                                           system_fingerprint=state.fingerprint,
                                           usage=Usage(prompt_tokens=prompt_tokens,
                                                       completion_tokens=completion_tokens,
                                                       total_tokens=prompt_tokens + completion_tokens)))
        yield _sse(payload)


# ---------------------------------------------------------------------------------------------------
# /v1/completions
# ---------------------------------------------------------------------------------------------------


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    state = _state(request)
    req: CompletionRequest = _parse(CompletionRequest, await request.body())
    _check_model(state, req.model)
    _check_n(state, req.n * len(req.prompts))
    engine = state.require_engine()
    for prompt in req.prompts:
        state.prompt_encoder.check_bytes(len(prompt.encode("utf-8")))
    slot = state.admit()
    handed_over = False
    try:
        processor = state.processor
        prompts = req.prompts
        prepared = await state.run_in_worker(lambda: [processor.prepare_prompt(p, []) for p in prompts])
        jobs = []
        for p in prepared:
            jobs.extend((p, params) for params in _sampling_params(state, req, len(p.prompt_token_ids)))
        _check_queue(state, engine, len(jobs))
        request_id = new_id("cmpl")
        if req.stream:
            handed_over = True
            return _streaming_response(state, slot, _completion_events(state, engine, request_id, req, jobs))
        return await _until_disconnected(request, _completion_full(state, engine, request_id, req, jobs))
    finally:
        if not handed_over:
            slot.release()


def _usage_for(jobs: list[tuple[PreparedRequest, SamplingParams]], n: int, completion_tokens: int) -> Usage:
    prompt_tokens = sum(len(jobs[i][0].prompt_token_ids) for i in range(0, len(jobs), n))
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)


async def _completion_full(state: Any, engine: Any, request_id: str, req: CompletionRequest,
                           jobs: list[tuple[PreparedRequest, SamplingParams]]) -> JSONResponse:
    finals: dict[int, Any] = {}
    async for index, out in _merged(engine, request_id, jobs):
        if out.finished:
            finals[index] = out
    choices = []
    for index in range(len(jobs)):
        out = finals[index]
        logprobs = state.completion_logprobs(out.logprobs) if req.logprobs is not None else None
        choices.append(CompletionChoice(index=index, text=state.label(out.text), finish_reason=out.finish_reason,
                                        logprobs=logprobs))
    usage = _usage_for(jobs, req.n, sum(len(finals[i].token_ids) for i in finals))
    return JSONResponse(dump(Completion(id=request_id, model=req.model, choices=choices, usage=usage,
                                        system_fingerprint=state.fingerprint)))


async def _completion_events(state: Any, engine: Any, request_id: str, req: CompletionRequest,
                             jobs: list[tuple[PreparedRequest, SamplingParams]]) -> AsyncIterator[str]:
    include_usage = req.include_usage
    sent_logprobs = [0] * len(jobs)
    labelled = [False] * len(jobs)
    completion_tokens = 0

    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        payload = dump(Completion(id=request_id, model=req.model, choices=choices, usage=usage,
                                  system_fingerprint=state.fingerprint))
        if not include_usage:
            payload.pop("usage", None)
        return _sse(payload)

    async for index, out in _merged(engine, request_id, jobs):
        text = out.delta
        if (text or out.finished) and not labelled[index]:     # a demo answer says so, even an empty one
            text, labelled[index] = state.label(text), True
        logprobs = None
        if req.logprobs is not None:
            logprobs = state.completion_logprobs(out.logprobs[sent_logprobs[index]:])
            sent_logprobs[index] = len(out.logprobs)
        if out.finished:
            completion_tokens += len(out.token_ids)
        if not text and not out.finished and not (logprobs and logprobs.tokens):
            continue
        yield chunk([CompletionChoice(index=index, text=text, logprobs=logprobs,
                                      finish_reason=out.finish_reason if out.finished else None)])
    if include_usage:
        yield chunk([], _usage_for(jobs, req.n, completion_tokens))


# ---------------------------------------------------------------------------------------------------
# Helpers used by ServingState (app.py)
# ---------------------------------------------------------------------------------------------------


def chat_logprobs(records: list[Any], token_text: Callable[[int], str]) -> list[TokenLogprob]:
    """Engine ``TokenLogprobs`` -> OpenAI chat logprobs content entries."""
    entries = []
    for record in records:
        token = token_text(record.token_id)
        top = [TopLogprob(token=token_text(t), logprob=_finite(lp), bytes=list(token_text(t).encode()))
               for t, lp in record.top]
        entries.append(TokenLogprob(token=token, logprob=_finite(record.logprob), bytes=list(token.encode()),
                                    top_logprobs=top))
    return entries


def completion_logprobs(records: list[Any], token_text: Callable[[int], str]) -> CompletionLogprobs:
    """Engine ``TokenLogprobs`` -> the legacy completions logprobs shape."""
    result = CompletionLogprobs()
    offset = 0
    for record in records:
        token = token_text(record.token_id)
        result.tokens.append(token)
        result.token_logprobs.append(_finite(record.logprob))
        result.top_logprobs.append({token_text(t): _finite(lp) for t, lp in record.top})
        result.text_offset.append(offset)
        offset += len(token)
    return result


def _finite(value: float) -> float:
    """JSON has no -inf: clamp to the most negative float (as OpenAI's -9999.0-style floor)."""
    return value if math.isfinite(value) else -9999.0
