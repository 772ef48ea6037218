"""AsyncEngine: one background thread owns the model, the scheduler and the KV cache.

Threading rule (see ARCHITECTURE.md): request handlers (asyncio) parse JSON, fetch and decode images,
render templates and tokenize (``InputProcessor``), then hand a ``PreparedRequest`` to ``generate``. Only
the engine thread calls ``LLMEngine`` methods; handlers talk to it through a command queue, and it
answers through each request's asyncio queue (``loop.call_soon_threadsafe``).

Example::

    engine = AsyncEngine(LLMEngine(model, tokenizer))
    async for out in engine.generate("r1", prepared, SamplingParams(max_new_tokens=32)):
        print(out.delta, end="")
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol, TypeAlias

from ..errors import EngineDead, EngineOverloaded, InternVLError, InvalidRequest, RequestFailed
from ..processing.inputs import InputProcessor, PreparedRequest
from ..processing.tokenization import Tokenizer
from .engine import EngineStats, LLMEngine, RequestOutput
from .sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class _Accepted:
    """The engine thread's answer to an "add": the request is in the engine."""


_ACCEPTED = _Accepted()


@dataclass(frozen=True)
class _Add:
    request_id: str
    request: PreparedRequest
    params: SamplingParams
    arrival: float


@dataclass(frozen=True)
class _Abort:
    request_id: str


@dataclass(frozen=True)
class _Stop:
    pass


class OutputObserver(Protocol):
    """Told of each request's outputs as its handler receives them, on the handler's event loop (the server's
    metrics: latencies are measured where the client is served). Must be quick and must not raise."""

    def output(self, output: RequestOutput) -> None:
        """An output of a running request (the last one has ``finished``)."""

    def ended(self, request_id: str, reason: str) -> None:
        """The request ended without a finished output: ``"abort"`` (its handler left) or ``"error"``."""


_Command: TypeAlias = _Add | _Abort | _Stop
#: What the engine thread hands a request's handler: accepted, an output, or the error that ends it.
_Answer: TypeAlias = _Accepted | RequestOutput | BaseException


class AsyncEngine:
    """The engine loop on its own thread, and the asyncio side that talks to it.

    Hand-offs never block the engine thread and tolerate a handler that is gone: the thread answers every
    request (accepted, refused, outputs) through that request's asyncio queue, looked up under a lock, and
    drops what nobody waits for. A failure in a step ends the requests it belongs to (``LLMEngine.step``
    isolates them); anything else that escapes the loop ends it: every waiting request gets
    :class:`EngineDead` with the cause, ``is_running`` turns false and ``death`` says why, so the server
    can report 503 and exit for its supervisor to restart it.

    It owns the queue limit (``max_queue_len`` requests in flight: :meth:`check_room`, which ``generate``
    applies too), and answers for the engine what other threads may ask without waiting for its thread:
    the context rule (:meth:`max_new_tokens_for`), the tokenizer, processor and limits, the counters
    (:attr:`stats`), the KV block counts and the scheduler's queue sizes the engine thread publishes after
    each step. ``observers`` (:class:`OutputObserver`, more with :meth:`add_observer`) hear of every output
    as its handler receives it."""

    def __init__(self, engine: LLMEngine, *, max_queue_len: int = 256,
                 observers: tuple[OutputObserver, ...] = ()) -> None:
        self.engine = engine
        self.max_queue_len = max_queue_len
        self._observers: list[OutputObserver] = list(observers)
        self._commands: queue.Queue[_Command] = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[_Answer]]] = {}
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._death: str | None = None
        # Published by the engine thread after each step (read by anyone, never waited for).
        self.kv_blocks_free = engine.num_free_blocks
        self.num_running = 0          # sequences the scheduler runs
        self.num_waiting = 0          # sequences the scheduler has not admitted yet (new or preempted)
        self._thread = threading.Thread(target=self._run, name="internvl-engine", daemon=True)
        self._thread.start()

    # -- public ----------------------------------------------------------------------------------
    @property
    def num_pending(self) -> int:
        with self._lock:
            return len(self._streams)

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._stopped.is_set() and self._death is None

    @property
    def death(self) -> str | None:
        """Why the engine loop stopped, if it died (None while it runs or after a clean shutdown)."""
        return self._death

    # What other threads may ask without waiting for the engine thread: fixed after construction.
    @property
    def tokenizer(self) -> Tokenizer:
        tokenizer: Tokenizer = self.engine.tokenizer
        return tokenizer

    @property
    def processor(self) -> InputProcessor:
        """The engine's ``InputProcessor`` (template, tiling, tokenization: run by the request handlers)."""
        return self.engine.processor

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def kv_blocks_total(self) -> int:
        return self.engine.num_blocks

    @property
    def kv_capacity(self) -> int:
        """Token slots in the whole KV pool."""
        return self.engine.kv_capacity

    def max_new_tokens_for(self, num_prompt_tokens: int, max_new_tokens: int | None = None, *,
                           default: int | None = None, name: str = "max_new_tokens") -> int:
        """The engine's context rule (``Scheduler.max_new_tokens_for``), answered on the caller's thread:
        the tokens to generate, or ContextLengthExceeded before anything is queued or streamed."""
        return self.engine.max_new_tokens_for(num_prompt_tokens, max_new_tokens, default=default, name=name)

    @property
    def stats(self) -> EngineStats:
        """A copy of the engine's counters (``LLMEngine.stats``)."""
        return self.engine.stats.copy()

    def add_observer(self, observer: OutputObserver) -> None:
        """Tell ``observer`` of every output from now on (the server's metrics, wired by the app)."""
        self._observers.append(observer)

    def remove_observer(self, observer: OutputObserver) -> None:
        if observer in self._observers:
            self._observers.remove(observer)

    def check_room(self, count: int = 1) -> None:
        """Raise EngineOverloaded unless ``count`` more requests fit under ``max_queue_len`` now (EngineDead
        if the loop stopped). The server asks for all of a request's choices before it answers, so a stream
        is refused with a 503 and not inside its body; ``generate`` applies the same rule to each request."""
        with self._lock:
            self._check_room(count)

    def _check_room(self, count: int) -> None:
        """``check_room`` with ``_lock`` held."""
        if self._death is not None:
            raise EngineDead(f"the engine loop stopped ({self._death}); the server is restarting")
        if len(self._streams) + count > self.max_queue_len:
            raise EngineOverloaded(f"the engine has {len(self._streams)} requests in flight "
                                   f"(limit {self.max_queue_len}); retry later")

    async def generate(self, request_id: str, request: PreparedRequest, params: SamplingParams
                       ) -> AsyncIterator[RequestOutput]:
        """Stream the outputs of one request. Leaving the iteration early (client gone) aborts it."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[_Answer] = asyncio.Queue()
        with self._lock:
            self._check_room(1)
            if request_id in self._streams:
                raise InvalidRequest(f"request id {request_id!r} is already in use")
            self._streams[request_id] = (loop, outputs)
        self._commands.put(_Add(request_id, request, params, time.monotonic()))
        finished = started = False
        try:
            accepted = await outputs.get()      # _ACCEPTED, or the engine's validation error
            if isinstance(accepted, BaseException):
                finished = True
                raise accepted
            started = True
            while True:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    finished = True
                    self._tell_ended(request_id, "error")
                    raise item
                assert isinstance(item, RequestOutput), item        # accepted comes once, first
                self._tell_output(item)
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished:
                self._commands.put(_Abort(request_id))
                if started:
                    self._tell_ended(request_id, "abort")

    def _tell_output(self, output: RequestOutput) -> None:
        for observer in self._observers:
            try:
                observer.output(output)
            except Exception:  # an observer's bug must not end the request
                logger.exception("output observer %r failed", observer)

    def _tell_ended(self, request_id: str, reason: str) -> None:
        for observer in self._observers:
            try:
                observer.ended(request_id, reason)
            except Exception:  # an observer's bug must not end the request
                logger.exception("output observer %r failed", observer)

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopped.set()
        self._commands.put(_Stop())
        self._thread.join(timeout)

    # -- engine thread ---------------------------------------------------------------------------
    def _emit(self, request_id: str, item: _Answer) -> bool:
        """Hand ``item`` to the request's handler; False (and the request aborted) if nobody waits."""
        with self._lock:
            target = self._streams.get(request_id)
        if target is None:
            return False
        loop, outputs = target
        try:
            loop.call_soon_threadsafe(outputs.put_nowait, item)
        except RuntimeError:  # the handler's loop is closed
            self._commands.put(_Abort(request_id))
            return False
        return True

    def _handle(self, command: _Command) -> None:
        if isinstance(command, _Add):
            with self._lock:
                alive = command.request_id in self._streams
            if not alive:                        # the handler left before the engine saw the request
                return
            try:
                self.engine.add_request(command.request_id, command.request, command.params,
                                        arrival_time=command.arrival)
            except Exception as exc:  # noqa: BLE001 - reported to the caller, engine keeps serving
                self._emit(command.request_id, exc)
                return
            if not self._emit(command.request_id, _ACCEPTED):
                self.engine.abort_request(command.request_id)
        elif isinstance(command, _Abort):
            self.engine.abort_request(command.request_id)

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # the loop is gone: say why, fail every waiter
            with self._lock:
                self._death = f"{type(exc).__name__}: {exc}"
            logger.critical("the engine loop died: %s", self._death, exc_info=exc)
            self._fail_all(EngineDead(f"the engine loop stopped ({self._death}); the server is restarting"))

    def _loop(self) -> None:
        while not self._stopped.is_set():
            idle = not self.engine.has_unfinished_requests()
            try:
                command: _Command | None = self._commands.get(timeout=None if idle else 0)
            except queue.Empty:
                command = None
            while command is not None:
                if isinstance(command, _Stop):
                    self._fail_all(EngineDead("the engine was shut down"))
                    return
                self._handle(command)
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    command = None
            if self.engine.has_unfinished_requests():
                self._step()
            self._publish()

    def _publish(self) -> None:
        """What other threads read without waiting for this one: KV blocks free, the scheduler's queues."""
        scheduler = self.engine.scheduler
        self.kv_blocks_free = self.engine.num_free_blocks
        self.num_running = scheduler.num_running
        self.num_waiting = scheduler.num_waiting

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:  # outside any one request (the scheduler): end them all
            logger.exception("engine step failed outside any request")
            self._fail_all(exc if isinstance(exc, InternVLError)
                           else RequestFailed(f"the engine step failed: {type(exc).__name__}: {exc}"))
            return
        for out in outputs:
            self._emit(out.request_id, out.error if out.error is not None else out)

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            ids = list(self._streams)
        for request_id in ids:
            try:
                self.engine.abort_request(request_id)
            except Exception:  # the engine may be what broke; the waiter must still hear
                logger.exception("aborting %s failed", request_id)
            self._emit(request_id, exc)
