"""One request's token state as the scheduler, block manager and runner see it (pure Python).

A :class:`Sequence` is the prompt token ids (image placeholders already expanded to
``<IMG_CONTEXT>`` ids), the generated ids, and the counters of the single scheduling rule:
``num_computed_tokens`` of ``num_tokens`` have their KV in the cache. Prompt positions whose embeddings
come from an image are marked by :class:`MultiModalSpan`; the span's ``content_hash`` makes two different
images with identical placeholder ids hash differently in the prefix cache.

Example::

    >>> seq = Sequence("req-0", [1, 2, 3, 9, 9, 9, 4], mm_spans=[MultiModalSpan(3, 3, "sha256:ab12")])
    >>> seq.num_tokens, seq.last_token, seq.status
    (7, 4, <SequenceStatus.WAITING: 1>)
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from enum import Enum

from internvl_runtime.engine.sampling_params import SamplingParams
from internvl_runtime.errors import InvalidRequest, PlaceholderMismatch
from internvl_runtime.processing.spans import MultiModalSpan


class SequenceStatus(Enum):
    """Where a sequence is in its life; the three FINISHED_* values are final."""

    WAITING = 1
    RUNNING = 2
    PREEMPTED = 3  # back in the waiting queue, its KV freed, to be recomputed
    FINISHED_STOPPED = 4
    FINISHED_LENGTH = 5
    FINISHED_ABORTED = 6

    @property
    def is_finished(self) -> bool:
        """True for the FINISHED_* states."""
        return self in _FINISH_REASONS


_FINISH_REASONS = {
    SequenceStatus.FINISHED_STOPPED: "stop",
    SequenceStatus.FINISHED_LENGTH: "length",
    SequenceStatus.FINISHED_ABORTED: "abort",
}

FINISH_STATUS = {reason: status for status, reason in _FINISH_REASONS.items()}
"""``'stop' | 'length' | 'abort'`` -> the matching FINISHED_* status."""


class Sequence:
    """The token state of one request.

    Attributes:
        request_id: unique per live request.
        prompt_token_ids: the prompt, image placeholders expanded.
        output_token_ids: the generated tokens so far.
        sampling_params: the request's options.
        mm_spans: image spans of the prompt, sorted and disjoint.
        eos_token_ids: the model/template's end tokens; they stop the sequence unless
            ``sampling_params.ignore_eos`` (``stop_token_ids`` stop it regardless).
        arrival_time: ``time.monotonic()`` when the request arrived.
        status: a :class:`SequenceStatus`.
        num_computed_tokens: leading tokens whose KV is in the cache (or being written this step).
        num_cached_tokens: of those, how many came from the prefix cache at the last admission.
        block_tables: per KV group (``engine.kv_groups``; one for most models) the KV block ids holding
            this sequence's positions, in order (a sliding-window group's passed positions: the null block).
        block_hashes: prefix-cache hashes of the leading full, computed blocks (owned by BlockManager).
        stop_reason: the stop token id or stop string that finished it, if any.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: Iterable[int],
        sampling_params: SamplingParams | None = None,
        *,
        mm_spans: Iterable[MultiModalSpan] = (),
        eos_token_ids: Iterable[int] = (),
        arrival_time: float | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids: list[int] = list(prompt_token_ids)
        if not self.prompt_token_ids:
            raise InvalidRequest(f"request {request_id!r}: the prompt is empty")
        self.output_token_ids: list[int] = []
        self._token_ids: list[int] = list(self.prompt_token_ids)  # prompt + outputs, kept in step
        self.sampling_params = sampling_params if sampling_params is not None else SamplingParams()
        self.mm_spans: list[MultiModalSpan] = sorted(mm_spans, key=lambda s: s.offset)
        self._check_spans()
        self.eos_token_ids: tuple[int, ...] = tuple(eos_token_ids)
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        self.block_tables: list[list[int]] = [[]]
        self.block_hashes: list[int] = []
        self.stop_reason: int | str | None = None

    def _check_spans(self) -> None:
        previous_end = 0
        for span in self.mm_spans:
            if span.length < 1 or span.offset < previous_end or span.end > len(self.prompt_token_ids):
                raise PlaceholderMismatch(
                    f"request {self.request_id!r}: image span {span} is empty, overlaps another or lies "
                    f"outside the {len(self.prompt_token_ids)}-token prompt"
                )
            previous_end = span.end

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, status={self.status.name}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={len(self.block_table)})"
        )

    @property
    def block_table(self) -> list[int]:
        """The first KV group's block table (the only one of a model without sliding-window layers)."""
        return self.block_tables[0]

    # ---- sizes -----------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self._token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        """Tokens of the prompt."""
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Tokens generated so far."""
        return len(self.output_token_ids)

    @property
    def token_ids(self) -> list[int]:
        """Prompt plus generated token ids (the internal list: read it, do not change it)."""
        return self._token_ids

    @property
    def last_token(self) -> int:
        """The newest token id (the last prompt token before anything is generated)."""
        return self._token_ids[-1]

    # ---- state ------------------------------------------------------------------------------------
    @property
    def is_finished(self) -> bool:
        """True once stopped, length-capped or aborted."""
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        """``'stop'``, ``'length'`` or ``'abort'`` once finished, else None."""
        return _FINISH_REASONS.get(self.status)

    def append_token(self, token_id: int) -> None:
        """Add one generated token."""
        self.output_token_ids.append(token_id)
        self._token_ids.append(token_id)

    def mm_spans_in(self, start: int, end: int) -> list[tuple[MultiModalSpan, int, int]]:
        """Image spans overlapping positions ``[start, end)``, each with the slice ``[lo, hi)`` of its
        features that falls inside (``lo > 0`` when the span's head was already computed, e.g. from
        the prefix cache). The runner embeds ``features[lo:hi]`` at positions ``offset+lo .. offset+hi``.
        """
        overlapping = []
        for span in self.mm_spans:
            if span.offset >= end:
                break
            if span.end > start:
                overlapping.append((span, max(start, span.offset) - span.offset, min(end, span.end) - span.offset))
        return overlapping
