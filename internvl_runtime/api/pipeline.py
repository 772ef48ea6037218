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

LMDeploy's code runs unchanged but for its import (``api.lmdeploy_config`` maps its configs)::

    from internvl_runtime import pipeline, TurbomindEngineConfig, GenerationConfig
    from internvl_runtime.vl import load_image
    with pipeline("pretrained/InternVL2-1B", backend_config=TurbomindEngineConfig(session_len=8192)) as pipe:
        sess = pipe.session()
        for piece in pipe.chat(("describe this image", load_image("cat.jpg")), session=sess,
                               gen_config=GenerationConfig(top_k=1), stream_response=True):
            print(piece.text, end="")
        print(pipe.get_ppl(pipe.engine.tokenizer.encode("a cat on a mat")))

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
from dataclasses import dataclass, field, fields
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
from ..errors import InvalidRequest, UnsupportedFeature
from ..hardware import default_device
from ..processing.chat_messages import PipelineMessage
from ..processing.data_url import decode_data_url, is_data_url
from ..processing.image import DEFAULT_MAX_DOWNLOAD_BYTES
from ..processing.inputs import ImageWithTiles, Message, PreparedRequest
from ..processing.tool_calls import parse_tool_call
from ..processing.video import FrameRule, sample_frames
from ..processing.video_io import VideoSource
from .generation_config import GenerationConfig
from .lmdeploy_config import (
    ChatTemplateConfig,
    PytorchEngineConfig,
    TurbomindEngineConfig,
    VisionConfig,
    engine_settings,
    set_log_level,
)
from .scoring import answer_logits, check_ids, mean_cross_entropy

__all__ = ["GenerationConfig", "Pipeline", "Response", "Session", "Video", "pipeline", "to_messages"]


@dataclass
class Video:
    """A video for a prompt: a path (frames sampled as the official ``load_video``, or as transformers' video
    processor for an HF-format folder: the pipeline passes its processor's ``video_frame_rule``) or a list of
    frames."""

    source: VideoSource | list[Image.Image] | tuple[Image.Image, ...]
    num_segments: int = 8
    bound: tuple[float, float] | None = None

    def frames(self, rule: FrameRule | None = None) -> list[Image.Image]:
        if isinstance(self.source, (list, tuple)):
            return list(self.source)
        return list(sample_frames(self.source, bound=self.bound, num_segments=self.num_segments, rule=rule).frames)


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
    cached_tokens: int = 0
    logits: torch.Tensor | None = None      # GenerationConfig.output_logits, on the finished response

    def extend(self, other: Response) -> Response:
        """Append a streamed piece to this response (LMDeploy's ``Response.extend``); returns self."""
        self.text += other.text
        self.generate_token_len = other.generate_token_len
        self.input_token_len = other.input_token_len
        self.finish_reason = other.finish_reason
        self.index = other.index
        self.cached_tokens = other.cached_tokens
        self.token_ids = self.token_ids + other.token_ids
        if other.logprobs is not None:
            self.logprobs = (self.logprobs or []) + other.logprobs
        if other.logits is not None:
            self.logits = other.logits
        return self


_session_ids = itertools.count()


@dataclass
class Session:
    """A multi-turn conversation for ``Pipeline.chat`` (``Pipeline.session()`` makes one, as LMDeploy's).
    ``response`` is the last answer; ``prompt`` the last prompt given to ``chat``."""

    messages: list[Message] = field(default_factory=list)
    response: Response | None = None
    session_id: int = field(default_factory=lambda: next(_session_ids))
    prompt: Any = None

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


def _from_chat_message(raw: dict[str, Any], rule: FrameRule | None = None) -> Message:
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
        frames = Video(_image(video.url), num_segments=video.num_segments or 8).frames(rule)
        return Message(role, message.text(), frames, is_video=True)
    images: list[Any] = [_image(image) for image in message.images()]
    images = [img if limit is None else ImageWithTiles(img, limit)
              for img, limit in zip(images, limits or [None] * len(images), strict=True)]
    return Message(role, message.text(), images, tool_calls=tool_calls)


def to_messages(prompt: Any, rule: FrameRule | None = None) -> list[Message]:
    """Normalise any accepted prompt form into messages (``rule``: the checkpoint's choice of a video's frames;
    default the official one)."""
    if isinstance(prompt, str):
        return [Message("user", prompt)]
    if isinstance(prompt, tuple):
        if len(prompt) != 2 or not (isinstance(prompt[0], str) or isinstance(prompt[1], str)):
            raise InvalidRequest("a tuple prompt must be (text, image), (text, [images]) or (image(s), text)")
        # LMDeploy also takes (image or [images], text): as LMDeploy, a first string is the image only when it is
        # an http(s) or data:image URL
        first, second = prompt
        image_first = not isinstance(first, str) or (first.startswith(("http", "data:image"))
                                                     and isinstance(second, str))
        text, images = (second, first) if image_first else (first, second)
        if not isinstance(text, str):
            raise InvalidRequest("a tuple prompt must be (text, image), (text, [images]) or (image(s), text)")
        if isinstance(images, Video):
            return [Message("user", text, images.frames(rule), is_video=True)]
        if not isinstance(images, (list, tuple)):
            images = [images]
        return [Message("user", text, list(images))]
    if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
        return [_from_chat_message(m, rule) for m in prompt]
    raise InvalidRequest(f"unsupported prompt type {type(prompt).__name__}: use a string, (text, image) or messages")


@dataclass
class _Submitted:
    """One request the pipeline added: its id, the prompt's index and its session (if any)."""

    request_id: str
    index: int
    session: Session | None = None
    request: PreparedRequest | None = None        # kept when its logits are asked for
    output_logits: str | None = None


@dataclass
class _Work:
    """One prompt ready to add: its prepared request, the params of its ``n`` answers, its session."""

    request: PreparedRequest
    params: list[SamplingParams]
    session: Session | None
    output_logits: str | None


class Pipeline:
    """LMDeploy's ``Pipeline`` on this runtime's engine: ``infer`` (also ``pipe(...)``, ``batch_infer``),
    ``stream_infer``, ``chat``, ``session``, ``get_ppl``, ``close`` and ``with pipeline(...) as pipe``.

    Unlike LMDeploy, a request that fails raises its error (LMDeploy returns a Response with
    ``finish_reason="error"``); the other requests of the call are aborted."""

    def __init__(self, engine: LLMEngine, *, closer: Callable[[], None] | None = None,
                 tp_workers: Sequence[BaseProcess] = (), system_message: str | None = None) -> None:
        """``closer``: called once by ``close()`` after the requests are aborted (tensor parallelism: it
        stops the worker ranks); ``tp_workers``: the worker processes this process spawned for them;
        ``system_message``: the system message of conversations that have none (``ChatTemplateConfig``)."""
        self.engine = engine
        self.tp_workers = list(tp_workers)
        self.system_message = system_message
        self._closer = closer
        self._ids = itertools.count()

    # -- LMDeploy's context manager ----------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        """The checkpoint's tokenizer (LMDeploy's ``pipe.tokenizer``)."""
        return self.engine.tokenizer
    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _prepare(self, messages: list[Message], config: GenerationConfig) -> PreparedRequest:
        if self.system_message is not None and not any(m.role == "system" for m in messages):
            messages = [Message("system", self.system_message), *messages]
        return self.engine.processor.prepare(messages, max_num=config.max_dynamic_patch)

    @staticmethod
    def _configs(count: int, gen_config: GenerationConfig | Sequence[GenerationConfig] | None
                 ) -> list[GenerationConfig]:
        if isinstance(gen_config, (list, tuple)):
            configs = list(gen_config)
        else:
            configs = [gen_config or GenerationConfig()] * count
        if len(configs) != count:
            raise InvalidRequest(f"{count} prompts but {len(configs)} generation configs")
        if not all(isinstance(c, GenerationConfig) for c in configs):
            raise InvalidRequest("gen_config must be a GenerationConfig or a list of them")
        return configs

    def _prepare_all(self, prompts: Sequence[Any], gen_config: GenerationConfig | Sequence[GenerationConfig] | None,
                     sessions: Sequence[Session | None] | None = None) -> list[_Work]:
        """Check and prepare every prompt (rendered, tiled, tokenized) and its ``n`` params; nothing is added."""
        configs = self._configs(len(prompts), gen_config)
        sessions = list(sessions) if sessions is not None else [None] * len(prompts)
        rule = self.engine.processor.video_frame_rule
        messages = [p if isinstance(p, list) and p and isinstance(p[0], Message) else to_messages(p, rule)
                    for p in prompts]
        tokenizer = self.engine.tokenizer
        if any(c.output_logits for c in configs) and (self.tp_workers or self._closer is not None):
            raise UnsupportedFeature("output_logits is not supported with tensor parallelism")
        return [_Work(self._prepare(m, c), [c.to_sampling_params(tokenizer, copy=k) for k in range(c.n)], session,
                      c.output_logits)
                for m, c, session in zip(messages, configs, sessions, strict=True)]

    def _add(self, work: list[_Work]) -> list[_Submitted]:
        """Add the prepared requests to the engine (all or, when one is refused, none)."""
        submitted: list[_Submitted] = []
        try:
            for index, item in enumerate(work):
                for param in item.params:
                    rid = f"pipe-{next(self._ids)}"
                    self.engine.add_request(rid, item.request, param)
                    submitted.append(_Submitted(rid, index, item.session,
                                                item.request if item.output_logits else None, item.output_logits))
        except BaseException:
            for added in submitted:
                self.engine.abort_request(added.request_id)
            raise
        return submitted

    @staticmethod
    def _response(out: RequestOutput, index: int, text: str | None = None,
                  token_ids: Sequence[int] | None = None) -> Response:
        return Response(text=out.text if text is None else text, generate_token_len=len(out.token_ids),
                        input_token_len=out.num_prompt_tokens, finish_reason=out.finish_reason,
                        token_ids=list(out.token_ids if token_ids is None else token_ids),
                        logprobs=out.logprobs or None, index=index, cached_tokens=out.num_cached_tokens)

    @staticmethod
    def _is_batch(prompts: Any) -> bool:
        return isinstance(prompts, list) and not (prompts and isinstance(prompts[0], dict))

    def _run(self, submitted: list[_Submitted], *, stream: bool) -> Iterator[tuple[_Submitted, Response]]:
        """Step the engine until every submitted request is done; yield (request, piece) for each step's new
        text when ``stream``, else (request, whole response) once it finishes. Unfinished requests are
        aborted when the caller stops early or a request fails."""
        by_id = {item.request_id: item for item in submitted}
        done: set[str] = set()
        try:
            while len(done) < len(submitted):
                for out in self.engine.step():
                    item = by_id.get(out.request_id)
                    if item is None:
                        continue
                    if out.error is not None:
                        raise out.error
                    if out.finished:
                        done.add(out.request_id)
                    if stream:
                        # new_token_ids: pieces add up to the answer (a piece's log-probs are its tokens')
                        response = self._response(out, item.index, text=out.delta, token_ids=out.new_token_ids)
                        if out.logprobs:
                            response.logprobs = out.logprobs[-len(out.new_token_ids):]
                    elif out.finished:
                        response = self._response(out, item.index)
                    else:
                        continue
                    if out.finished and item.request is not None and item.output_logits is not None:
                        response.logits = answer_logits(self.engine.model, item.request, out.token_ids,
                                                        item.output_logits, self.engine.processor.img_context_id)
                    yield item, response
        finally:
            for rid in by_id:
                if rid not in done:
                    self.engine.abort_request(rid)

    # -- LMDeploy's inference methods -------------------------------------------------------------
    def infer(self, prompts: Any, gen_config: GenerationConfig | Sequence[GenerationConfig] | None = None,
              do_preprocess: bool = True, adapter_name: str | None = None, use_tqdm: bool = False
              ) -> Response | list[Response]:
        """Answer one prompt (a Response) or a list of prompts (a list, in prompt order). With ``n > 1`` a
        prompt has ``n`` answers, next to each other, each with the prompt's ``index`` (a single prompt then
        gives a list too)."""
        _check_lmdeploy_options(do_preprocess, adapter_name)
        batch = self._is_batch(prompts)
        items = prompts if batch else [prompts]
        submitted = self._add(self._prepare_all(items, gen_config))
        order = {item.request_id: i for i, item in enumerate(submitted)}
        final: list[Response | None] = [None] * len(submitted)
        progress = None
        if use_tqdm:
            from tqdm.auto import tqdm

            progress = tqdm(total=len(submitted))
        try:
            for item, response in self._run(submitted, stream=False):
                final[order[item.request_id]] = response
                if progress is not None:
                    progress.update(1)
        finally:
            if progress is not None:
                progress.close()
        responses = [r for r in final if r is not None]
        return responses if batch or len(responses) != 1 else responses[0]

    def __call__(self, prompts: Any, gen_config: GenerationConfig | Sequence[GenerationConfig] | None = None,
                 **kwargs: Any) -> Response | list[Response]:
        return self.infer(prompts, gen_config, **kwargs)

    def batch_infer(self, prompts: Any, gen_config: GenerationConfig | Sequence[GenerationConfig] | None = None,
                    **kwargs: Any) -> Response | list[Response]:
        """LMDeploy's older name of ``infer``."""
        return self.infer(prompts, gen_config, **kwargs)

    def stream_infer(self, prompts: Any, sessions: Session | Sequence[Session] | None = None,
                     gen_config: GenerationConfig | Sequence[GenerationConfig] | None = None,
                     do_preprocess: bool = True, adapter_name: str | None = None, stream_response: bool = True
                     ) -> Iterator[Response]:
        """Yield pieces as they are generated (LMDeploy's order of arguments); ``piece.index`` says which
        prompt, ``piece.text`` the new text. ``sessions`` (one per prompt) receive their prompt's whole answer
        as ``session.response`` when it finishes; as in LMDeploy they name the requests and carry no
        history (``chat`` prepends it). ``stream_response=False`` yields each answer once, whole."""
        _check_lmdeploy_options(do_preprocess, adapter_name)
        items = prompts if self._is_batch(prompts) else [prompts]
        if sessions is not None:
            sessions = [sessions] if isinstance(sessions, Session) else sessions
            if not isinstance(sessions, (list, tuple)) or not all(isinstance(s, Session) for s in sessions):
                raise InvalidRequest("sessions must be Session objects (Pipeline.session()); pass the generation "
                                     "config as gen_config=")
            if len(sessions) != len(items):
                raise InvalidRequest(f"{len(items)} prompts but {len(sessions)} sessions")
        return self._stream(self._prepare_all(items, gen_config, sessions), stream_response)

    def _stream(self, work: list[_Work], stream_response: bool) -> Iterator[Response]:
        """The requests are added at the first ``next()`` (an iterator never started leaves none behind)."""
        whole: dict[str, Response] = {}
        for item, piece in self._run(self._add(work), stream=stream_response):
            if item.session is not None:
                so_far = whole.get(item.request_id)
                whole[item.request_id] = so_far.extend(piece) if so_far else _copy(piece)
                if piece.finish_reason is not None:
                    item.session.response = whole[item.request_id]
            yield piece

    def chat(self, prompt: Any, session: Session | None = None, gen_config: GenerationConfig | None = None,
             stream_response: bool = False) -> Session | Iterator[Response]:
        """One turn of a multi-turn conversation; earlier turns' KV blocks are reused (prefix cache). Returns
        the session, or with ``stream_response=True`` (as LMDeploy) an iterator of the answer's pieces, after
        which the session holds the turn."""
        session = session or Session()
        if gen_config is not None and gen_config.n != 1:
            raise InvalidRequest("chat answers one turn: n must be 1")
        messages = session.messages + to_messages(prompt, self.engine.processor.video_frame_rule)
        work = self._prepare_all([messages], gen_config, [session])
        session.prompt = prompt
        pieces = self._stream(work, stream_response=True)

        def turn() -> Iterator[Response]:
            yield from pieces
            answer = session.response
            assert answer is not None           # set by _stream when the request finished
            session.messages = [*messages, Message("assistant", answer.text)]

        if stream_response:
            return turn()
        for _ in turn():
            pass
        return session

    def session(self) -> Session:
        """A new conversation for ``chat`` / ``stream_infer``."""
        return Session()

    def get_ppl(self, input_ids: list[int] | list[list[int]]) -> list[float]:
        """LMDeploy's ``get_ppl``: for each token sequence (one list, or a list of lists) the mean
        cross-entropy loss of its next-token predictions (``api.perplexity``)."""
        if self.tp_workers or self._closer is not None:
            raise UnsupportedFeature("get_ppl is not supported with tensor parallelism")
        if not isinstance(input_ids, list) or not input_ids:
            raise InvalidRequest("get_ppl takes a list of token ids or a list of such lists")
        batch = input_ids if isinstance(input_ids[0], list) else [input_ids]
        vocab = self.engine.vocab_size
        return [mean_cross_entropy(self.engine.model, check_ids(ids, vocab)) for ids in batch]

    def close(self) -> None:
        self.engine.abort_all()
        closer, self._closer = self._closer, None
        if closer is not None:          # tensor parallel: stop the worker ranks
            closer()


def _copy(piece: Response) -> Response:
    return Response(**{**piece.__dict__, "token_ids": list(piece.token_ids),
                       "logprobs": list(piece.logprobs) if piece.logprobs is not None else None})


def _check_lmdeploy_options(do_preprocess: bool, adapter_name: str | None) -> None:
    if not do_preprocess:
        raise UnsupportedFeature("do_preprocess=False is not supported: prompts are always rendered with the "
                                 "checkpoint's chat template")
    if adapter_name is not None:
        raise UnsupportedFeature(f"adapter_name={adapter_name!r}: LoRA adapters are not supported")


def pipeline(model_path: str | Path, backend_config: EngineConfig | TurbomindEngineConfig | PytorchEngineConfig
             | None = None, chat_template_config: ChatTemplateConfig | None = None, log_level: str | None = None,
             max_log_len: int | None = None, trust_remote_code: bool = False, speculative_config: Any = None,
             allowed_media_domains: list[str] | None = None, *, vision_config: VisionConfig | None = None,
             session_len: int | None = None, dtype: torch.dtype | str | None = "auto", device: str | None = None,
             tensor_parallel_size: int = 1, **engine_kwargs: Any) -> Pipeline:
    """Load a checkpoint folder and return a :class:`Pipeline` (``dtype='auto'`` uses the checkpoint's,
    except on a CPU without native bf16, where float32 is chosen).

    LMDeploy's arguments are taken as LMDeploy's ``pipeline`` takes them: ``backend_config`` a
    ``TurbomindEngineConfig`` / ``PytorchEngineConfig`` (mapped by ``api.lmdeploy_config``: ``session_len``,
    ``tp``, ``max_batch_size``, ``cache_max_entry_count``, ``dtype``...; a field that cannot be honoured raises
    ``UnsupportedFeature``) or this runtime's ``EngineConfig``; ``chat_template_config`` (its
    ``meta_instruction`` is the system message), ``vision_config``, ``session_len``, ``log_level`` (this
    package's loggers). ``max_log_len`` and ``trust_remote_code`` are accepted: no prompt is logged and no
    remote code is ever run. ``speculative_config`` and ``allowed_media_domains`` cannot be honoured (an error).

    ``device``: default ``hardware.default_device``: CUDA when torch sees a GPU (as LMDeploy runs), else the CPU.
    Other keywords are ``EngineConfig`` fields (not with LMDeploy's configs, which set those) or
    ``LLMEngine.from_pretrained``'s (``hub``, ``quantization``...).

    ``tensor_parallel_size=N`` (or an LMDeploy config's ``tp=N``) splits the decoder over N ranks
    (``internvl_runtime.distributed``): under torchrun this process is one of them (the workers never return
    from this call); otherwise N-1 worker processes are spawned. ``close()`` (or the end of the program) stops
    them."""
    if speculative_config is not None:
        raise UnsupportedFeature("speculative_config: speculative decoding is not supported")
    if allowed_media_domains is not None:
        raise UnsupportedFeature("allowed_media_domains is not supported: the pipeline fetches any http(s) image "
                                 "URL it is given; fetch the images yourself to restrict them")
    if log_level is not None:
        set_log_level(log_level)
    if device is None:
        device = default_device(torch.cuda.is_available())
    settings = engine_settings(model_path, backend_config, device=device, vision_config=vision_config,
                               chat_template_config=chat_template_config, session_len=session_len)
    system_message = None
    if settings is not None:
        clash = sorted(set(engine_kwargs) & {f.name for f in fields(EngineConfig)})
        if clash:
            raise InvalidRequest(f"engine options {clash} cannot be combined with LMDeploy's configs: set them there")
        backend_config = settings.engine_config
        system_message = settings.system_message
        if settings.dtype != "auto":
            dtype = settings.dtype
        tensor_parallel_size = max(tensor_parallel_size, settings.tensor_parallel_size)
        if settings.hub is not None:
            engine_kwargs["hub"] = settings.hub
    assert backend_config is None or isinstance(backend_config, EngineConfig)
    if tensor_parallel_size != 1:
        if "hub" in engine_kwargs:
            raise UnsupportedFeature("download_dir / revision are not supported with tensor parallelism")
        group = tensor_parallel_engine(model_path, tensor_parallel_size, dtype=dtype, device=device,
                                       engine_config=backend_config or EngineConfig(**engine_kwargs))
        pipe = Pipeline(group.engine, closer=group.close, tp_workers=group.workers, system_message=system_message)
        atexit.register(pipe.close)
        return pipe
    engine = LLMEngine.from_pretrained(model_path, dtype=dtype, device=device, config=backend_config, **engine_kwargs)
    return Pipeline(engine, system_message=system_message)
