"""What the routes share (``ServingState``, one per app, at ``app.state.serving``): the config, the engine (None
while the weights load), the media fetchers, the worker threads that prepare requests, admission counting
(``Slot``), token texts for logprobs and the HTTP counters for /metrics.

Its own module so that both ``app`` (which builds it) and the routes (which read it) import it downward.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import weakref
from collections import Counter
from collections.abc import Callable
from typing import TypeVar

from ..engine.async_engine import AsyncEngine
from ..errors import EngineDead, InternVLError, ModelLoading, TooManyRequests
from ..processing.chat_template import ChatTemplate
from ..processing.image_preprocessor import ImagePreprocessor
from ..processing.inputs import InputProcessor
from ..processing.prompt_encoder import PromptEncoder
from ..processing.tokenization import Tokenizer
from ..version import __version__
from .config import DEMO_LABEL, ServerConfig
from .media import MediaFetcher

logger = logging.getLogger(__name__)

T = TypeVar("T")

LARGE_PROMPTS_IN_FLIGHT = 4      # prompts over PromptEncoder.large_bytes being tokenized at once
IMAGE_THREADS = 8                # at most: threads resizing thumbnails and normalising tiles (--image-preprocess exact)

_SLOT_LOCK = threading.Lock()


class Slot:
    """One admitted generation request; ``release`` is idempotent."""

    def __init__(self, state: ServingState) -> None:
        self._state: ServingState | None = state

    def release(self) -> None:
        with _SLOT_LOCK:      # also called from a GC finalizer, on whatever thread collects the stream
            state, self._state = self._state, None
            if state is not None:
                state.active -= 1


class ServingState:
    """What the routes share: config, the engine (None while loading), the media fetcher, the worker
    threads that prepare requests, admission counting, token texts for logprobs, HTTP counters for /metrics.

    ``processor``, ``prompt_encoder`` and ``tokenizer`` come with the engine: a route reads them after
    ``require_engine()``."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.engine: AsyncEngine | None = None
        self.load_error: str | None = None
        self.fetcher = MediaFetcher.from_config(config)
        self.video_fetcher = MediaFetcher.from_config(config, max_image_bytes=config.max_video_bytes,
                                                     media_kind="video")
        self.active = 0
        self.http_responses: Counter[int] = Counter()
        self._processor: InputProcessor | None = None
        self._prompt_encoder: PromptEncoder | None = None
        self._tokenizer: Tokenizer | None = None
        self.max_model_len: int | None = None
        self.closed = False
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._image_executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._token_texts: dict[int, str] = {}
        self.fingerprint = "demo-random-weights" if config.demo else f"internvl-runtime-{__version__}"
        # --chat-template is read now, so that a bad file stops the server at start (ConfigError)
        self.chat_template = ChatTemplate.from_file(config.chat_template) if config.chat_template else None

    # -- engine ----------------------------------------------------------------------------------
    def set_engine(self, engine: AsyncEngine) -> None:
        self._prompt_encoder = PromptEncoder(engine.tokenizer, max_tokens=engine.max_model_len,
                                             max_large=LARGE_PROMPTS_IN_FLIGHT)
        self._processor = engine.processor.with_encoder(self._prompt_encoder.encode).with_images(
            self._image_preprocessor(engine.processor))
        if self.chat_template is not None:
            self._processor = self._processor.with_chat_template(self.chat_template)
        self._tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.engine = engine

    def _image_preprocessor(self, processor: InputProcessor) -> ImagePreprocessor:
        """--image-preprocess: exact, each image's thumbnail and tiles on a pool of its own (never the request
        workers' pool, whose threads wait on it), or on the model's device."""
        if self.config.image_preprocess == "device":
            return ImagePreprocessor(processor.image_size, use_thumbnail=processor.use_thumbnail, mode="device",
                                     device=self.config.device)
        threads = max(1, min(IMAGE_THREADS, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                             else os.cpu_count() or 1))
        if threads > 1 and self._image_executor is None:
            self._image_executor = concurrent.futures.ThreadPoolExecutor(max_workers=threads,
                                                                         thread_name_prefix="internvl-image")
        return ImagePreprocessor(processor.image_size, use_thumbnail=processor.use_thumbnail,
                                 executor=self._image_executor)

    @property
    def processor(self) -> InputProcessor:
        """The engine's ``InputProcessor``, tokenizing through ``prompt_encoder``."""
        assert self._processor is not None, "no engine yet: call require_engine() first"
        return self._processor

    @property
    def prompt_encoder(self) -> PromptEncoder:
        assert self._prompt_encoder is not None, "no engine yet: call require_engine() first"
        return self._prompt_encoder

    @property
    def tokenizer(self) -> Tokenizer:
        assert self._tokenizer is not None, "no engine yet: call require_engine() first"
        return self._tokenizer

    def load(self, loader: Callable[[], AsyncEngine], on_error: Callable[[BaseException], None] | None) -> None:
        """Run ``loader`` (on a background thread) and install the engine it returns."""
        try:
            engine = loader()
        except BaseException as exc:  # reported on /health and to the caller
            logger.error("loading the model failed: %s", exc, exc_info=not isinstance(exc, InternVLError))
            self.load_error = f"{type(exc).__name__}: {exc}"
            if on_error is not None:
                on_error(exc)
            return
        if self.closed:          # the server stopped while the weights loaded
            engine.shutdown()
            return
        self.set_engine(engine)
        logger.info("model %r ready", self.config.model_name)

    def require_engine(self) -> AsyncEngine:
        engine = self.engine
        if engine is None or not engine.is_running:
            if engine is not None:
                raise EngineDead(f"the engine loop stopped ({engine.death or 'shut down'}); the server is exiting "
                                 "so that its supervisor restarts it")
            if self.load_error:
                raise ModelLoading(f"the model failed to load: {self.load_error}")
            raise ModelLoading("the model is still loading; retry in a moment (GET /health says when it is ready)")
        return engine

    # -- admission -------------------------------------------------------------------------------
    def admit(self) -> Slot:
        with _SLOT_LOCK:
            if self.active >= self.config.max_concurrent_requests:
                raise TooManyRequests(f"the server already handles {self.active} generation requests (limit "
                                      f"{self.config.max_concurrent_requests}); retry later")
            self.active += 1
        return Slot(self)

    @staticmethod
    def release_on_collect(owner: object, slot: Slot) -> None:
        """Release ``slot`` when ``owner`` (a stream that may never start) is garbage-collected."""
        weakref.finalize(owner, slot.release)

    # -- worker threads --------------------------------------------------------------------------
    @property
    def executor(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._executor is None:
            # Threads that wait on the tokenizer process for a large prompt are added on top: small requests
            # always find a free thread.
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=max(2, min(8, os.cpu_count() or 2)) + LARGE_PROMPTS_IN_FLIGHT,
                thread_name_prefix="internvl-prepare")
        return self._executor

    async def run_in_worker(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn)

    def close(self) -> None:
        self.closed = True
        if self._prompt_encoder is not None:
            self._prompt_encoder.close()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        if self._image_executor is not None:
            self._image_executor.shutdown(wait=False, cancel_futures=True)
            self._image_executor = None

    # -- answers ---------------------------------------------------------------------------------
    def label(self, text: str) -> str:
        """Answers of a random-weight (--demo) checkpoint say so."""
        return DEMO_LABEL + text if self.config.demo else text

    def token_text(self, token_id: int) -> str:
        text = self._token_texts.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id])
            if len(self._token_texts) < 200_000:
                self._token_texts[token_id] = text
        return text
