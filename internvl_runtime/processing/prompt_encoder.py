"""Prompt tokenization that no prompt can stall: a byte bound first, then a bounded worker process.

Tokenizing is the one step of a request whose cost the client picks freely: a few MB of text take
seconds, and the ``tokenizers`` and ``sentencepiece`` calls hold the GIL while they run, so on the
server's threads one huge prompt would stall the event loop, the engine thread and every other request.
:class:`PromptEncoder` therefore

1. refuses, before any tokenization, a prompt of more bytes than the context could hold: no token covers
   more bytes of text than the longest token of the vocabulary (as UTF-8, an upper bound for byte-level
   BPE and SentencePiece pieces alike), so more than ``max_tokens x longest`` bytes is more than
   ``max_tokens`` tokens (only a normalizer that drops text, such as SentencePiece collapsing runs of
   spaces, could fit more; such prompts are refused too, which the message says);
2. tokenizes prompts of up to ``large_bytes`` on the calling thread (milliseconds);
3. sends larger ones to one worker process holding a copy of the tokenizer, at most ``max_large`` at once
   (one more is refused with :class:`EngineOverloaded`, a 503 to retry), so the server's own threads
   keep running while it works.

Example::

    encoder = PromptEncoder(tokenizer, max_tokens=32768)
    encoder.check_bytes(len(text.encode()))    # cheap, before fetching images or rendering
    ids = encoder.encode(text)                 # blocking: call it from a worker thread
"""

from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import pickle
import threading
from concurrent.futures.process import BrokenProcessPool

from ..errors import ContextLengthExceeded, EngineOverloaded, RequestFailed
from .tokenization import Tokenizer

logger = logging.getLogger(__name__)

__all__ = ["PromptEncoder", "longest_token_bytes"]


def longest_token_bytes(tokenizer: Tokenizer) -> int:
    """The most bytes of text one token can stand for (its vocabulary entry's UTF-8 length, at least 1)."""
    return max([1, *(len(token.encode("utf-8")) for token in tokenizer.get_vocab())])


class PromptEncoder:
    def __init__(self, tokenizer: Tokenizer, *, max_tokens: int, large_bytes: int = 64 * 2**10,
                 max_large: int = 4) -> None:
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.token_bytes = longest_token_bytes(tokenizer)
        self.max_bytes = max_tokens * self.token_bytes
        self.large_bytes = large_bytes
        self.max_large = max_large
        self._slots = threading.BoundedSemaphore(max_large)
        self._lock = threading.Lock()
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._closed = False

    def check_bytes(self, num_bytes: int) -> None:
        """Raise ContextLengthExceeded if a prompt of ``num_bytes`` UTF-8 bytes cannot fit in the context."""
        if num_bytes > self.max_bytes:
            raise ContextLengthExceeded(
                f"the prompt is {num_bytes} bytes; the model's context of {self.max_tokens} tokens holds at most "
                f"{self.max_bytes} bytes (no token of this vocabulary is longer than {self.token_bytes} bytes)")

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """The token ids of ``text``, after the byte bound; blocks (call it from a worker thread).
        ``add_special_tokens``: the tokenizer's own (bos/eos as the checkpoint's flags say), as ``encode``."""
        num_bytes = len(text.encode("utf-8"))
        self.check_bytes(num_bytes)
        if num_bytes <= self.large_bytes:
            return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))
        if not self._slots.acquire(blocking=False):
            raise EngineOverloaded(f"{self.max_large} prompts of more than {self.large_bytes // 1024} KiB are being "
                                   "tokenized; retry later")
        try:
            return self._encode_in_worker(text, add_special_tokens)
        finally:
            self._slots.release()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    # -- the worker process --------------------------------------------------------------------------
    def _worker_pool(self) -> concurrent.futures.ProcessPoolExecutor:
        with self._lock:
            if self._closed:
                raise RequestFailed("the server is shutting down")
            if self._pool is None:
                # spawn, not fork: the server has threads (engine, event loop) a forked child would inherit
                self._pool = concurrent.futures.ProcessPoolExecutor(
                    max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                    initializer=_load_tokenizer, initargs=(pickle.dumps(self.tokenizer),))
            return self._pool

    def _encode_in_worker(self, text: str, add_special_tokens: bool) -> list[int]:
        pool = self._worker_pool()
        try:
            return pool.submit(_encode, text, self.max_tokens, add_special_tokens).result()
        except BrokenProcessPool:
            with self._lock:                 # the worker died (killed, out of memory): the next call starts one
                if self._pool is pool:
                    self._pool = None
            raise RequestFailed("the tokenizer process stopped while tokenizing this prompt") from None


_tokenizer: Tokenizer | None = None      # the worker process's copy (_load_tokenizer)


def _load_tokenizer(data: bytes) -> None:
    global _tokenizer
    _tokenizer = pickle.loads(data)


def _encode(text: str, max_tokens: int, add_special_tokens: bool = True) -> list[int]:
    assert _tokenizer is not None, "the worker process loads its tokenizer first"
    ids = list(_tokenizer.encode(text, add_special_tokens=add_special_tokens))
    if len(ids) > max_tokens:       # no use sending back what cannot be served
        raise ContextLengthExceeded(f"the prompt is {len(ids)} tokens; the model's context is {max_tokens} tokens")
    return ids
