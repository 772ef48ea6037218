"""An LMDeploy-style offline pipeline on the engine.

Example::

    from internvl_runtime import pipeline, GenerationConfig, load_image
    pipe = pipeline("pretrained/InternVL2-1B")
    print(pipe(("describe this image", "cat.jpg")).text)
    print([r.text for r in pipe([("what is it?", "a.png"), "hello"])])
    sess = pipe.chat(("describe this image", "cat.jpg"))
    sess = pipe.chat("what colour is it?", session=sess)
    for piece in pipe.stream_infer(("describe this image", "cat.jpg")):
        print(piece.text, end="")

A prompt is a string, a ``(text, image)`` or ``(text, [images])`` tuple (images: paths, URLs, bytes,
PIL images, or ``Video(...)`` for frames), or an OpenAI-style message list. As in LMDeploy, ``<IMAGE_TOKEN>``
(or ``<image>``) in the text places the images there instead of before the text, and an ``image_url`` part
may carry its own tile limit::

    pipe([{"role": "user", "content": [
        {"type": "text", "text": "Compare <IMAGE_TOKEN> with <IMAGE_TOKEN>"},
        {"type": "image_url", "image_url": {"url": "a.png", "max_dynamic_patch": 1}},
        {"type": "image_url", "image_url": {"url": "b.png"}}]}])

Message lists may also hold assistant ``tool_calls`` and ``tool`` results (rendered in the model's tool format).
"""

from __future__ import annotations

import atexit
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from pydantic import ValidationError

from ..distributed.launch import tensor_parallel_engine
from ..engine.engine import EngineConfig, LLMEngine, RequestOutput
from ..engine.sampler import TokenLogprobs
from ..engine.sampling_params import SamplingParams
from ..errors import InvalidRequest
from ..processing.chat_messages import PipelineMessage
from ..processing.data_url import decode_data_url, is_data_url
from ..processing.image import DEFAULT_MAX_DOWNLOAD_BYTES
from ..processing.inputs import ImageWithTiles, Message, PreparedRequest
from ..processing.structured_output import StructuredOutput
from ..processing.tool_calls import parse_tool_call
from ..processing.video import sample_frames
from ..processing.video_io import VideoSource


@dataclass
class GenerationConfig:
    """LMDeploy's generation options (``do_sample=False`` means greedy, whatever the temperature)."""

    max_new_tokens: int = 512
    do_sample: bool = False
    top_p: float = 1.0
    top_k: int = 50
    temperature: float = 0.8
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    random_seed: int | None = None
    stop_words: list[str] | None = None
    min_new_tokens: int | None = None
    logprobs: int | None = None
    max_dynamic_patch: int | None = None
    # LMDeploy's: {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}},
    # {"type": "regex_schema", "regex_schema": "..."} or {"type": "json_object"}; enforced by token masks.
    response_format: dict[str, Any] | None = None

    def to_sampling_params(self) -> SamplingParams:
        return SamplingParams(max_new_tokens=self.max_new_tokens, min_new_tokens=self.min_new_tokens or 0,
                              do_sample=self.do_sample, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, repetition_penalty=self.repetition_penalty,
                              ignore_eos=self.ignore_eos, seed=self.random_seed, stop=list(self.stop_words or []),
                              logprobs=self.logprobs,
                              structured_output=StructuredOutput.from_response_format(self.response_format))


@dataclass
class Video:
    """A video for a prompt: a path (frames sampled as the official ``load_video``) or a list of frames."""

    source: VideoSource | list[Image.Image] | tuple[Image.Image, ...]
    num_segments: int = 8
    bound: tuple[float, float] | None = None

    def frames(self) -> list[Image.Image]:
        if isinstance(self.source, (list, tuple)):
            return list(self.source)
        return list(sample_frames(self.source, bound=self.bound, num_segments=self.num_segments).frames)


@dataclass
class Response:
    """One answer (or, from ``stream_infer``, one piece of it: ``text`` is then the new text)."""

    text: str
    generate_token_len: int
    input_token_len: int
    finish_reason: str | None = None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    index: int = 0


@dataclass
class Session:
    """A multi-turn conversation for ``Pipeline.chat``."""

    messages: list[Message] = field(default_factory=list)
    response: Response | None = None

    @property
    def history(self) -> list[tuple[str, str]]:
        turns = [m for m in self.messages if m.role in ("user", "assistant")]
        # strict=False: a last question may have no answer yet
        return [(u.text, a.text) for u, a in zip(turns[::2], turns[1::2], strict=False)]


def _image(source: Any) -> Any:
    """An image as a message gives it: a data URL decoded to its bytes, anything else as it is."""
    if isinstance(source, str) and is_data_url(source):
        return decode_data_url(source, max_bytes=DEFAULT_MAX_DOWNLOAD_BYTES, what="image_url data URL").data
    return source


def _text_content(content: Any, what: str) -> str:
    """A tool message's content: a string or text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "\n".join(p["text"] for p in content)
    raise InvalidRequest(f"invalid message: {what} content must be a string or text parts")


def _tool_message(raw: dict[str, Any]) -> Message:
    unknown = set(raw) - {"role", "content", "tool_call_id", "name"}
    if unknown:
        raise InvalidRequest(f"invalid message: tool messages take content, tool_call_id and name, not "
                             f"{', '.join(sorted(unknown))}")
    call_id, name = raw.get("tool_call_id"), raw.get("name")
    if (call_id is not None and not isinstance(call_id, str)) or (name is not None and not isinstance(name, str)):
        raise InvalidRequest("invalid message: a tool message's tool_call_id and name must be strings")
    return Message("tool", _text_content(raw.get("content"), "a tool message's"), tool_call_id=call_id, name=name)


def _pop_tile_limits(raw: dict[str, Any]) -> tuple[dict[str, Any], list[int | None]]:
    """LMDeploy's per-image ``image_url.max_dynamic_patch``, taken out of a copy of the message (read here
    whether or not the message models know the field), one entry per image in order."""
    content = raw.get("content")
    if not isinstance(content, list):
        return raw, []
    parts, limits = [], []
    for part in content:
        if isinstance(part, dict) and part.get("type") == "image_url" and isinstance(part.get("image_url"), dict):
            image_url = dict(part["image_url"])
            limit = image_url.pop("max_dynamic_patch", None)
            if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
                raise InvalidRequest(f"invalid message: image_url.max_dynamic_patch must be an integer >= 1, "
                                     f"got {limit!r}")
            part = {**part, "image_url": image_url}
            limits.append(limit)
        elif isinstance(part, dict) and part.get("type") == "image":
            limits.append(None)
        parts.append(part)
    return {**raw, "content": parts}, limits


def _from_chat_message(raw: dict[str, Any]) -> Message:
    """One OpenAI-style message dict, parsed by the server's models (``processing.chat_messages``); tool
    results, assistant tool calls and per-image tile limits are read here."""
    if raw.get("role") == "tool":
        return _tool_message(raw)
    raw = dict(raw)
    raw_calls = raw.pop("tool_calls", None) if raw.get("role") == "assistant" else None
    if raw_calls is not None and not isinstance(raw_calls, list):
        raise InvalidRequest("invalid message: tool_calls must be a list")
    tool_calls = [parse_tool_call(c) for c in raw_calls or []]
    raw, limits = _pop_tile_limits(raw)
    try:
        message = PipelineMessage.model_validate(raw)
    except ValidationError as exc:
        details = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'message'}: {e['msg']}" for e in exc.errors())
        raise InvalidRequest(f"invalid message: {details}") from None
    role = "system" if message.role == "developer" else message.role
    video = message.video()
    if video is not None:
        frames = Video(_image(video.url), num_segments=video.num_segments or 8).frames()
        return Message(role, message.text(), frames, is_video=True)
    images: list[Any] = [_image(image) for image in message.images()]
    images = [img if limit is None else ImageWithTiles(img, limit)
              for img, limit in zip(images, limits or [None] * len(images), strict=True)]
    return Message(role, message.text(), images, tool_calls=tool_calls)


def to_messages(prompt: Any) -> list[Message]:
    """Normalise any accepted prompt form into messages."""
    if isinstance(prompt, str):
        return [Message("user", prompt)]
    if isinstance(prompt, tuple):
        if len(prompt) != 2 or not isinstance(prompt[0], str):
            raise InvalidRequest("a tuple prompt must be (text, image) or (text, [images])")
        text, images = prompt
        if isinstance(images, Video):
            return [Message("user", text, images.frames(), is_video=True)]
        if not isinstance(images, (list, tuple)):
            images = [images]
        return [Message("user", text, list(images))]
    if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
        return [_from_chat_message(m) for m in prompt]
    raise InvalidRequest(f"unsupported prompt type {type(prompt).__name__}: use a string, (text, image) or messages")


class Pipeline:
    def __init__(self, engine: LLMEngine, *, closer: Callable[[], None] | None = None,
                 tp_workers: Sequence[BaseProcess] = ()) -> None:
        """``closer``: called once by ``close()`` after the requests are aborted (tensor parallelism: it
        stops the worker ranks); ``tp_workers``: the worker processes this process spawned for them."""
        self.engine = engine
        self.tp_workers = list(tp_workers)
        self._closer = closer
        self._ids = itertools.count()

    def _prepare(self, messages: list[Message], config: GenerationConfig) -> PreparedRequest:
        return self.engine.processor.prepare(messages, max_num=config.max_dynamic_patch)

    def _submit(self, prompts: Sequence[Any], gen_config: GenerationConfig | Sequence[GenerationConfig] | None
                ) -> list[str]:
        if isinstance(gen_config, (list, tuple)):
            configs = list(gen_config)
        else:
            configs = [gen_config or GenerationConfig()] * len(prompts)
        if len(configs) != len(prompts):
            raise InvalidRequest(f"{len(prompts)} prompts but {len(configs)} generation configs")
        messages = [p if isinstance(p, list) and p and isinstance(p[0], Message) else to_messages(p) for p in prompts]
        prepared = [(self._prepare(m, c), c) for m, c in zip(messages, configs, strict=True)]
        ids = []
        for request, config in prepared:
            rid = f"pipe-{next(self._ids)}"
            self.engine.add_request(rid, request, config.to_sampling_params())
            ids.append(rid)
        return ids

    @staticmethod
    def _response(out: RequestOutput, index: int, text: str | None = None) -> Response:
        return Response(text=out.text if text is None else text, generate_token_len=len(out.token_ids),
                        input_token_len=out.num_prompt_tokens, finish_reason=out.finish_reason,
                        token_ids=list(out.token_ids), logprobs=out.logprobs or None, index=index)

    def _is_batch(self, prompts: Any) -> bool:
        return isinstance(prompts, list) and not (prompts and isinstance(prompts[0], dict))

    def __call__(self, prompts: Any, gen_config: GenerationConfig | Sequence[GenerationConfig] | None = None
                 ) -> Response | list[Response]:
        batch = self._is_batch(prompts)
        items = prompts if batch else [prompts]
        ids = self._submit(items, gen_config)
        index = {rid: i for i, rid in enumerate(ids)}
        final: dict[str, Response] = {}
        try:
            while len(final) < len(ids):
                for out in self.engine.step():
                    if out.error is not None and out.request_id in index:
                        raise out.error
                    if out.finished and out.request_id in index:
                        final[out.request_id] = self._response(out, index[out.request_id])
        finally:
            for rid in ids:
                if rid not in final:
                    self.engine.abort_request(rid)
        responses = [final[rid] for rid in ids]
        return responses if batch else responses[0]

    def stream_infer(self, prompts: Any, gen_config: GenerationConfig | Sequence[GenerationConfig] | None = None
                     ) -> Iterator[Response]:
        """Yield pieces as they are generated; ``piece.index`` says which prompt, ``piece.text`` the new text."""
        items = prompts if self._is_batch(prompts) else [prompts]
        ids = self._submit(items, gen_config)
        index = {rid: i for i, rid in enumerate(ids)}
        done: set[str] = set()
        try:
            while len(done) < len(ids):
                for out in self.engine.step():
                    if out.request_id not in index:
                        continue
                    if out.error is not None:
                        raise out.error
                    if out.finished:
                        done.add(out.request_id)
                    yield self._response(out, index[out.request_id], text=out.delta)
        finally:
            for rid in ids:
                if rid not in done:
                    self.engine.abort_request(rid)

    def chat(self, prompt: Any, session: Session | None = None, gen_config: GenerationConfig | None = None,
             stream_response: bool = False) -> Session:
        """One turn of a multi-turn conversation; earlier turns' KV blocks are reused (prefix cache)."""
        session = session or Session()
        new = to_messages(prompt)
        messages = session.messages + new
        responses = self([messages], gen_config)
        assert isinstance(responses, list)        # a list of prompts gives a list
        response = responses[0]
        session.messages = [*messages, Message("assistant", response.text)]
        session.response = response
        return session

    def close(self) -> None:
        self.engine.abort_all()
        closer, self._closer = self._closer, None
        if closer is not None:          # tensor parallel: stop the worker ranks
            closer()


def pipeline(model_path: str | Path, *, dtype: torch.dtype | str | None = "auto", device: str = "cpu",
             backend_config: EngineConfig | None = None, tensor_parallel_size: int = 1,
             **engine_kwargs: Any) -> Pipeline:
    """Load a checkpoint folder and return a :class:`Pipeline` (``dtype='auto'`` uses the checkpoint's,
    except on a CPU without native bf16, where float32 is chosen).

    ``tensor_parallel_size=N`` splits the decoder over N ranks (``internvl_runtime.distributed``): under
    torchrun this process is one of them (the workers never return from this call); otherwise N-1
    worker processes are spawned. ``close()`` (or the end of the program) stops them."""
    if tensor_parallel_size != 1:
        group = tensor_parallel_engine(model_path, tensor_parallel_size, dtype=dtype, device=device,
                                       engine_config=backend_config or EngineConfig(**engine_kwargs))
        pipe = Pipeline(group.engine, closer=group.close, tp_workers=group.workers)
        atexit.register(pipe.close)
        return pipe
    engine = LLMEngine.from_pretrained(model_path, dtype=dtype, device=device, config=backend_config, **engine_kwargs)
    return Pipeline(engine)
