"""``/v1/chat/completions``: parse, prepare (images, video, template, tokens), then stream the choices as
SSE chunks or answer once they are all done."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image

from ...engine.async_engine import AsyncEngine
from ...engine.engine import RequestOutput
from ...errors import InvalidRequest
from ...processing.chat_messages import ImageURL
from ...processing.grounding import parse_grounding
from ...processing.harmony import HarmonyStreamParser, parse_harmony
from ...processing.inputs import ImageInput, Message, PreparedRequest
from ...processing.tokenization import Tokenizer
from ...processing.tool_calls import ToolCallStreamParser, parse_tool_call
from ...processing.video import FrameRule
from ..config import ServerConfig
from ..media import decode_image, decode_video
from ..protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessageOut,
    ChoiceLogprobs,
    DeltaMessage,
    Usage,
    dump,
    new_id,
)
from ..state import ServingState
from .common import chat_logprobs, check_model, check_n, parse, sampling_params, serving_state
from .generation import generate
from .streaming import Jobs, merged, sse

T = TypeVar("T")

#: The ``grounding`` extension of a choice: an answer's token ids -> its regions as JSON (``Grounding.to_json``).
Grounder = Callable[[list[int]], list[dict[str, Any]]]

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    state = serving_state(request)
    req: ChatCompletionRequest = parse(state, ChatCompletionRequest, await request.body())
    check_model(state, req.model)
    check_n(state, req.n)
    engine = state.require_engine()
    # The byte bound before any work (images, template, tokens): the messages' text alone must fit.
    state.prompt_encoder.check_bytes(sum(len(m.text().encode("utf-8")) for m in req.messages))

    grounder: Grounder | None = None

    async def prepare() -> Jobs:
        nonlocal grounder
        prepared, image_sizes = await prepare_chat_with_sizes(state, req)
        grounder = _grounder(state.tokenizer, image_sizes) if req.grounding else None
        return [(prepared, p) for p in sampling_params(state, engine, req, prepared)]

    return await generate(request, state, engine, stream=req.stream, request_id=new_id("chatcmpl"), prepare=prepare,
                          full=lambda rid, jobs: _full(state, engine, rid, req, jobs, grounder),
                          events=lambda rid, jobs: _events(state, engine, rid, req, jobs, grounder))


async def prepare_chat(state: ServingState, req: ChatCompletionRequest) -> PreparedRequest:
    """Fetch, decode and tile the images, sample the video frames, render the template, tokenize."""
    return (await prepare_chat_with_sizes(state, req))[0]


def _grounder(tokenizer: Tokenizer, image_sizes: list[tuple[int, int]]) -> Grounder:
    """The ``grounding`` extension: the regions of an answer in pixels of the request's last image (the one the
    official demo draws them on), or in the model's 0-1000 coordinates with ``image_index`` null when the
    request has no image.

    The answer is read from its token ids with the special tokens kept: ``<ref>``, ``<box>``... are special
    tokens of the InternVL2 checkpoints, which the content drops under ``skip_special_tokens`` (the default,
    as the official ``chat``); the official demo keeps them to find the boxes."""
    size = image_sizes[-1] if image_sizes else None
    index = len(image_sizes) - 1 if image_sizes else None

    def grounding(token_ids: list[int]) -> list[dict[str, Any]]:
        text = tokenizer.decode(token_ids, skip_special_tokens=False, spaces_between_special_tokens=False)
        return [region.to_json() for region in parse_grounding(text, size, image_index=index)]
    return grounding


async def prepare_chat_with_sizes(state: ServingState, req: ChatCompletionRequest
                                  ) -> tuple[PreparedRequest, list[tuple[int, int]]]:
    """:func:`prepare_chat`, and the ``(width, height)`` of each image of the request as sent (before
    tiling), in the order of its ``image_url`` parts."""
    config, processor = state.config, state.processor
    images = [image for m in req.messages for image in m.image_parts()]
    if len(images) > config.max_images_per_request:
        raise InvalidRequest(f"{len(images)} images in one request; the limit is {config.max_images_per_request}")
    videos = [v for m in req.messages if (v := m.video()) is not None]
    default_frames = req.video_frames or 8
    for video in videos:
        if (video.num_segments or default_frames) > config.max_video_frames:
            raise InvalidRequest(f"num_segments: at most {config.max_video_frames} frames per video on this "
                                 f"server, got {video.num_segments or default_frames}")
    frames = sum(video.num_segments or default_frames for video in videos)
    tiles = image_tile_limits(images, req.max_dynamic_patch, processor.max_dynamic_patch, frames, config)
    datas = await _gather([state.fetcher.fetch(image.url) for image in images])
    video_datas = await _gather([state.video_fetcher.fetch(v.url) for v in videos])

    sizes: list[tuple[int, int]] = []

    def tile(data: bytes, limit: int) -> ImageInput:
        image = decode_image(data, max_pixels=config.max_image_pixels)
        sizes.append(image.size)
        return processor.image_input(image, max_num=limit)

    def work() -> PreparedRequest:
        tiled = iter([tile(d, limit) for d, limit in zip(datas, tiles, strict=True)])
        share = config.max_video_decoded_bytes // max(1, len(videos))     # the request's budget, shared
        clips = iter([video_frames(d, v.num_segments or default_frames, config, max_decoded_bytes=share,
                                   rule=processor.video_frame_rule)
                      for d, v in zip(video_datas, videos, strict=True)])
        messages = []
        for m in req.messages:
            role = "system" if m.role == "developer" else m.role
            calls = [parse_tool_call(call) for call in m.tool_calls or []]
            if m.video() is not None:
                messages.append(Message(role, m.text(), next(clips), is_video=True))
            else:
                messages.append(Message(role, m.text(), [next(tiled) for _ in m.image_parts()], tool_calls=calls,
                                        tool_call_id=m.tool_call_id, name=m.name))
        return processor.prepare(messages, tools=req.tools, tool_choice=req.effective_tool_choice,
                                 parallel_tool_calls=req.parallel_tool_calls,
                                 add_generation_prompt=req.add_generation_prompt,
                                 continue_final_message=req.continue_final_message,
                                 template_kwargs=req.chat_template_kwargs)

    return await state.run_in_worker(work), sizes


def image_tile_limits(images: list[ImageURL], request_max: int | None, model_max: int, frames: int,
                      config: ServerConfig) -> list[int]:
    """Each image's tile limit (``max_dynamic_patch``) within the request's tile budget.

    An image's own ``max_dynamic_patch`` wins, then the request's; both are refused above
    ``max_tiles_per_image``. The others share what the budget (``max_tiles_per_request``) leaves after the video
    frames (one tile each) and the explicit limits, capped by the model's default: 32 images get one tile each
    rather than a 400. A limit above 1 may add a thumbnail tile, which the budget counts."""
    for limit in [request_max, *(image.max_dynamic_patch for image in images)]:
        if limit is not None and limit > config.max_tiles_per_image:
            raise InvalidRequest(f"max_dynamic_patch: at most {config.max_tiles_per_image} tiles per image on this "
                                 f"server, got {limit}")
    explicit = [image.max_dynamic_patch or request_max for image in images]
    worst = sum(_with_thumbnail(limit) for limit in explicit if limit is not None)
    left = config.max_tiles_per_request - frames - worst
    shared = sum(limit is None for limit in explicit)
    if left < shared:
        raise InvalidRequest(f"this request needs up to {frames + worst + shared} tiles ({frames} video frames, "
                             f"{len(images)} images); the limit is {config.max_tiles_per_request} "
                             "(max_tiles_per_request): lower max_dynamic_patch or send fewer frames or images")
    share = left // shared if shared else 0
    fair = min(model_max, config.max_tiles_per_image, max(1, share - 1) if share > 1 else 1)
    return [fair if limit is None else limit for limit in explicit]


def _with_thumbnail(limit: int) -> int:
    """The most tiles an image limited to ``limit`` can make (a thumbnail is added to several tiles)."""
    return limit + 1 if limit > 1 else 1


def video_frames(data: bytes, num_segments: int, config: ServerConfig, *, max_decoded_bytes: int | None = None,
                 rule: FrameRule | None = None) -> list[Image.Image]:
    """Sample ``num_segments`` frames (``rule``: the checkpoint's choice, default the official one) within the
    server's video limits (``max_decoded_bytes``: this video's share of the request's decoding budget)."""
    budget = config.max_video_decoded_bytes if max_decoded_bytes is None else max_decoded_bytes
    return decode_video(data, num_segments=num_segments, max_pixels=config.max_image_pixels,
                        max_seconds=config.max_video_seconds, max_decoded_bytes=budget, rule=rule)


async def _gather(coroutines: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Run coroutines concurrently; the first failure cancels the others and is raised."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _full(state: ServingState, engine: AsyncEngine, request_id: str, req: ChatCompletionRequest, jobs: Jobs,
                grounder: Grounder | None) -> JSONResponse:
    finals: dict[int, RequestOutput] = {}
    async for index, out in merged(engine, request_id, jobs):
        if out.finished:
            finals[index] = out
    choices, completion_tokens = [], 0
    plan = jobs[0][0].tool_plan
    harmony = state.processor.harmony_answers
    for index in range(len(jobs)):
        out = finals[index]
        completion_tokens += len(out.token_ids)
        logprobs = ChoiceLogprobs(content=chat_logprobs(out.logprobs, state.token_text)) if req.logprobs else None
        message, finish_reason = ChatMessageOut(content=state.label(out.text)), out.finish_reason
        if harmony:                   # the channels and, when tools are offered, the calls (processing.harmony)
            answer = parse_harmony(out.text, tool_calls=plan is not None)
            content = state.label(answer.content) if answer.content is not None else None
            message = ChatMessageOut(content=content, reasoning_content=answer.reasoning_content,
                                     tool_calls=[call.to_openai() for call in answer.tool_calls])
            if answer.tool_calls:
                finish_reason = _tool_finish(finish_reason)
        elif plan is not None:
            parsed = plan.parse(out.text)
            if parsed.tool_calls:
                message = ChatMessageOut(content=state.label(parsed.content) if parsed.content else None,
                                         tool_calls=[call.to_openai() for call in parsed.tool_calls])
                finish_reason = _tool_finish(finish_reason)
        extension = {"grounding": grounder(out.token_ids)} if grounder is not None else {}
        choices.append(ChatChoice(index=index, message=message, finish_reason=finish_reason, logprobs=logprobs,
                                  **extension))
    prompt_tokens = len(jobs[0][0].prompt_token_ids)
    usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                  total_tokens=prompt_tokens + completion_tokens)
    result = ChatCompletion(id=request_id, model=req.model, choices=choices, usage=usage,
                            system_fingerprint=state.fingerprint)
    return JSONResponse(dump(result))


async def _events(state: ServingState, engine: AsyncEngine, request_id: str, req: ChatCompletionRequest, jobs: Jobs,
                  grounder: Grounder | None) -> AsyncIterator[str]:
    include_usage = req.include_usage

    def chunk(choices: list[ChatChunkChoice]) -> str:
        payload = dump(ChatCompletionChunk(id=request_id, model=req.model, choices=choices,
                                           system_fingerprint=state.fingerprint))
        for choice in payload["choices"]:     # as OpenAI: a delta names only what it carries
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
        if not include_usage:
            payload.pop("usage", None)
        return sse(payload)

    for index in range(len(jobs)):
        yield chunk([ChatChunkChoice(index=index, delta=DeltaMessage(role="assistant", content=""))])
    sent_logprobs = [0] * len(jobs)
    labelled = [False] * len(jobs)
    plan = jobs[0][0].tool_plan
    harmony = [HarmonyStreamParser(tool_calls=plan is not None) for _ in jobs] \
        if state.processor.harmony_answers else None
    parsers = [_StreamedCalls(plan.stream_parser()) if plan is not None and harmony is None else None for _ in jobs]
    completion_tokens = 0
    async for index, out in merged(engine, request_id, jobs):
        text, reasoning = out.delta, ""
        calls: list[dict[str, Any]] = []
        parser = parsers[index]
        if harmony is not None:
            fields = harmony[index].feed(text, finished=out.finished)     # the markup never leaves
            text, reasoning = fields.content, fields.reasoning
            calls = [call.to_openai() for call in fields.tool_calls]
        elif parser is not None:
            text, calls = parser.feed(text, finished=out.finished)
        if (text or out.finished) and not labelled[index]:     # a demo answer says so, even an empty one
            text, labelled[index] = state.label(text), True
        logprobs = None
        if req.logprobs:
            new = out.logprobs[sent_logprobs[index]:]
            sent_logprobs[index] = len(out.logprobs)
            logprobs = ChoiceLogprobs(content=chat_logprobs(new, state.token_text))
        if out.finished:
            completion_tokens += len(out.token_ids)
        if not text and not reasoning and not calls and not out.finished and not (logprobs and logprobs.content):
            continue           # the detokenizer holds text back (a possible stop string, a partial character)
        finish_reason = out.finish_reason if out.finished else None
        called = harmony[index].num_calls > 0 if harmony is not None else parser is not None and parser.called
        if finish_reason is not None and called:
            finish_reason = _tool_finish(finish_reason)
        extension = {"grounding": grounder(out.token_ids)} if grounder is not None and out.finished else {}
        delta = DeltaMessage(content=text or None, reasoning_content=reasoning or None, tool_calls=calls or None)
        yield chunk([ChatChunkChoice(index=index, delta=delta,
                                     finish_reason=finish_reason, logprobs=logprobs, **extension)])
    if include_usage:
        prompt_tokens = len(jobs[0][0].prompt_token_ids)
        payload = dump(ChatCompletionChunk(id=request_id, model=req.model, choices=[],
                                           system_fingerprint=state.fingerprint,
                                           usage=Usage(prompt_tokens=prompt_tokens,
                                                       completion_tokens=completion_tokens,
                                                       total_tokens=prompt_tokens + completion_tokens)))
        yield sse(payload)


def _tool_finish(finish_reason: str | None) -> str | None:
    """An answer that made calls ends with "tool_calls" (as OpenAI), unless it was cut off ("length")."""
    return "tool_calls" if finish_reason == "stop" else finish_reason


class _StreamedCalls:
    """One choice's tool-call parser in a stream: text in, (content, OpenAI call deltas) out."""

    def __init__(self, parser: ToolCallStreamParser) -> None:
        self.parser = parser
        self.called = False

    def feed(self, text: str, *, finished: bool) -> tuple[str, list[dict[str, Any]]]:
        pieces = [self.parser.feed(text)] if text else []
        if finished:
            pieces.append(self.parser.finish())
        content = "".join(piece.content for piece in pieces)
        calls = [call.to_openai() for piece in pieces for call in piece.tool_calls]
        self.called = self.called or bool(calls)
        return content, calls
