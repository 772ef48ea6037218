"""Which tokens of which sequences the next model step computes (pure Python, no torch).

The engine loop is ``batch = scheduler.schedule()`` -> the runner computes ``batch`` and samples one
token for each entry with ``batch.samples[i]`` -> ``finished = scheduler.update(batch, sampled)``. Stop
strings are the detokenizer's business; the engine then calls :meth:`Scheduler.finish`.

Example::

    scheduler = Scheduler(SchedulerConfig(num_blocks=256))
    scheduler.add(Sequence("r0", prompt_ids, SamplingParams(max_new_tokens=32), eos_token_ids=[2]))
    while scheduler.has_unfinished():
        batch = scheduler.schedule()
        sampled = run_model(batch)                  # {request_id: token_id} for entries that sample
        for seq in scheduler.update(batch, sampled):
            print(seq.request_id, seq.finish_reason, seq.output_token_ids)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from internvl_runtime.engine.block_manager import BlockManager
from internvl_runtime.engine.kv_groups import FULL_ATTENTION, KVCacheGroup
from internvl_runtime.engine.sequence import FINISH_STATUS, Sequence, SequenceStatus
from internvl_runtime.errors import ConfigError, ContextLengthExceeded, InvalidRequest


@dataclass
class SchedulerConfig:
    """Limits of one scheduling step and of the KV pool.

    Attributes:
        max_num_seqs: most sequences running (holding KV blocks) at once.
        max_num_batched_tokens: token budget of one step (a step exceeds it only to keep an image span
            whole, see ``Scheduler.schedule``); must be >= max_num_seqs so every decode fits.
        block_size: token slots per KV block.
        num_blocks: KV blocks in the pool (the engine sizes it from free accelerator memory).
        enable_prefix_caching: reuse computed blocks of identical prefixes (image-content aware).
        max_model_len: the model's context length; a request whose prompt plus max_new_tokens exceeds
            it is refused (None = only the pool size limits it).
        kv_groups: the model's KV groups (``engine.kv_groups``): one of every layer unless sliding-window
            layers free their blocks past the window.
    """

    max_num_seqs: int = 16
    max_num_batched_tokens: int = 4096
    block_size: int = 16
    num_blocks: int = 1024
    enable_prefix_caching: bool = True
    max_model_len: int | None = None
    kv_groups: tuple[KVCacheGroup, ...] = FULL_ATTENTION

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "num_blocks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"SchedulerConfig.{name} must be an integer >= 1, got {value!r}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ConfigError(
                f"SchedulerConfig.max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                f"max_num_seqs ({self.max_num_seqs}) so that every running sequence can decode each step"
            )
        if not isinstance(self.enable_prefix_caching, bool):
            raise ConfigError(
                f"SchedulerConfig.enable_prefix_caching must be a bool, got {self.enable_prefix_caching!r}"
            )
        if self.max_model_len is not None and (
            isinstance(self.max_model_len, bool) or not isinstance(self.max_model_len, int) or self.max_model_len < 2
        ):
            raise ConfigError(
                f"SchedulerConfig.max_model_len must be an integer >= 2 or None, got {self.max_model_len!r}"
            )


@dataclass
class ScheduledBatch:
    """What one step computes, in order (a plain data object handed to the model runner).

    Entry ``i`` computes positions ``[seq.num_computed_tokens, seq.num_computed_tokens + n)`` of
    ``seq.token_ids`` (``seq.num_computed_tokens`` is advanced only by ``Scheduler.update``), with
    their KV slots already in ``seq.block_table``. Its image features for those positions are given by
    ``seq.mm_spans_in(start, start + n)``.

    Attributes:
        scheduled: ``(seq, num_new_tokens)`` per entry.
        is_prefill: False for a decode (one new token at the end of a sequence that has outputs).
        samples: True when the entry reaches the sequence's last token, so its last logits are sampled;
            False for an intermediate prefill chunk.
        preempted: sequences preempted this step (their KV was freed; they will be recomputed).
    """

    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)
    is_prefill: list[bool] = field(default_factory=list)
    samples: list[bool] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    def _add(self, seq: Sequence, num_new_tokens: int) -> None:
        samples = seq.num_computed_tokens + num_new_tokens == seq.num_tokens
        self.scheduled.append((seq, num_new_tokens))
        self.samples.append(samples)
        self.is_prefill.append(not (samples and num_new_tokens == 1 and seq.num_output_tokens > 0))

    def __len__(self) -> int:
        return len(self.scheduled)

    @property
    def num_batched_tokens(self) -> int:
        """Tokens computed this step."""
        return sum(n for _, n in self.scheduled)

    @property
    def prefills(self) -> list[tuple[Sequence, int]]:
        """The prefill entries."""
        return [entry for entry, prefill in zip(self.scheduled, self.is_prefill, strict=True) if prefill]

    @property
    def decodes(self) -> list[tuple[Sequence, int]]:
        """The decode entries."""
        return [entry for entry, prefill in zip(self.scheduled, self.is_prefill, strict=True) if not prefill]


class Scheduler:
    """Admission, chunked prefill, preemption and stop checks over a :class:`BlockManager`."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.block_manager = BlockManager(
            config.num_blocks, config.block_size, enable_prefix_caching=config.enable_prefix_caching,
            kv_groups=config.kv_groups,
        )
        self._kv_capacity = self.block_manager.max_sequence_tokens(config.max_num_batched_tokens)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self._live: dict[str, Sequence] = {}

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence.

        Raises:
            ContextLengthExceeded: prompt + max_new_tokens exceeds ``max_model_len`` or the whole KV pool.
            InvalidRequest: the request id is already live.
        """
        if seq.request_id in self._live:
            raise InvalidRequest(f"request id {seq.request_id!r} is already in use")
        assert seq.status is SequenceStatus.WAITING and not seq.block_table, seq
        self.max_new_tokens_for(seq.num_tokens, seq.sampling_params.max_new_tokens)
        self._live[seq.request_id] = seq
        self.waiting.append(seq)

    @property
    def kv_capacity(self) -> int:
        """The longest sequence (KV positions) the whole pool holds: its token slots, or with sliding-window
        groups, what the full-attention groups hold beside the windows' blocks."""
        return self._kv_capacity

    def max_new_tokens_for(self, num_prompt_tokens: int, max_new_tokens: int | None = None, *,
                           default: int | None = None, name: str = "max_new_tokens") -> int:
        """The context rule, in one place: how many tokens a request of ``num_prompt_tokens`` generates.

        ``max_new_tokens`` (what the caller asked for) must fit as asked; without it, ``default`` is cut to
        what the context leaves. :meth:`add` applies it to every sequence; the server (through
        ``AsyncEngine``) and the CLI call it first, so a request is refused before anything streams. It reads
        only the fixed configuration, so any thread may call it.

        Raises:
            ContextLengthExceeded: the prompt leaves no room in ``max_model_len``, the prompt plus the
                tokens asked for exceeds it, or they need more KV slots than the whole pool holds. ``name``
                is what the message calls the asked-for count (the server says ``max_tokens``).
        """
        limit = self.config.max_model_len
        if limit is not None and num_prompt_tokens >= limit:
            raise ContextLengthExceeded(f"the prompt is {num_prompt_tokens} tokens; the model's context is {limit} "
                                        "tokens, which leaves no room for an answer")
        if max_new_tokens is None:
            assert default is not None, "max_new_tokens_for needs max_new_tokens or a default"
            max_new_tokens = default if limit is None else min(default, limit - num_prompt_tokens)
        total = num_prompt_tokens + max_new_tokens
        if limit is not None and total > limit:
            raise ContextLengthExceeded(f"the prompt ({num_prompt_tokens} tokens) plus {name} ({max_new_tokens}) is "
                                        f"{total} tokens, more than the model's context of {limit} tokens")
        # KV is written for every position except the last generated token's.
        capacity = self._kv_capacity
        if total - 1 > capacity:
            raise ContextLengthExceeded(f"the prompt ({num_prompt_tokens} tokens) plus {name} ({max_new_tokens}) "
                                        f"needs {total - 1} KV slots, more than the whole cache ({capacity} slots)")
        return max_new_tokens

    def get(self, request_id: str) -> Sequence | None:
        """The live (unfinished) sequence with this id, if any."""
        return self._live.get(request_id)

    def has_unfinished(self) -> bool:
        """Whether any sequence is waiting or running."""
        return bool(self.waiting or self.running)

    def abort(self, request_id: str) -> Sequence | None:
        """Finish a live request as aborted and free its blocks now; None if it is not live."""
        seq = self._live.get(request_id)
        if seq is not None:
            self.finish(seq, "abort")
        return seq

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """Finish a sequence with ``reason`` ``'stop' | 'length' | 'abort'`` and free its blocks.

        The engine calls this when the detokenizer finds a stop string (``stop_reason`` = the string).
        On a sequence already finished by ``update`` for length, ``'stop'`` replaces ``'length'`` (a
        stop string in the last token wins); otherwise finishing twice changes nothing.
        """
        status = FINISH_STATUS[reason]
        if seq.is_finished:
            if seq.status is SequenceStatus.FINISHED_LENGTH and status is SequenceStatus.FINISHED_STOPPED:
                seq.status, seq.stop_reason = status, stop_reason
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status, seq.stop_reason = status, stop_reason
        del self._live[seq.request_id]

    # ---- one step ---------------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        """Choose the work of the next step."""
        # THE scheduling rule (no separate prefill and decode phases): every sequence has
        # num_computed_tokens of num_tokens in the KV cache, and a step moves each sequence toward
        # num_tokens. Running sequences, in admission order, get num_tokens - num_computed_tokens new
        # tokens (1 when decoding) while the step's token budget lasts; then waiting sequences are
        # admitted in arrival order while there is room (max_num_seqs, budget, and KV blocks for the whole
        # sequence -- a sliding-window group's for its first chunk only -- plus one spare block per running
        # sequence), their cached prefix counting as computed.
        # A prompt longer than the remaining budget is prefilled in chunks over several steps, but a
        # chunk never ends inside an image span: it stops before the span, or, when the span starts the
        # chunk, runs to its end (an over-budget chunk, allowed only in a step with no other prefill
        # chunk). When a running sequence needs a block and none is free, the most recently admitted
        # running sequence is preempted by recompute: its blocks are freed and it goes back to the front
        # of the waiting queue with num_computed_tokens = 0, its outputs kept as tokens to recompute. No
        # sequence is admitted in a step that preempted.
        budget = self.config.max_num_batched_tokens
        batch = ScheduledBatch()
        prefill_chunked = False  # whether a prefill chunk already runs this step

        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            n = self._num_new_tokens(seq, budget, allow_over_budget=not prefill_chunked)
            if n == 0:
                index += 1
                continue
            if not self._make_room(seq, n, batch):
                break  # seq itself was preempted, and with it every sequence after it
            self.block_manager.append_slots(seq, n)
            prefill_chunked |= n > 1
            batch._add(seq, n)
            budget -= n
            index += 1

        while not batch.preempted and self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            # Keep one free block per running sequence so that admissions rarely force a preemption.
            reserve = len(self.running)
            needed = self.block_manager.num_blocks_to_allocate(seq, chunk=budget)
            if needed + reserve > self.block_manager.num_free_blocks:
                break
            self.waiting.popleft()
            self.block_manager.allocate(seq, chunk=budget)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            n = self._num_new_tokens(seq, budget, allow_over_budget=not prefill_chunked)
            # (an over-budget image span may need more sliding-window blocks than its allocation)
            if n == 0 or not self.block_manager.can_append(seq, n):
                break  # admitted; its first chunk waits for a step with room
            self.block_manager.append_slots(seq, n)  # registers nothing new
            prefill_chunked |= n > 1
            batch._add(seq, n)
            budget -= n
        return batch

    def _num_new_tokens(self, seq: Sequence, budget: int, *, allow_over_budget: bool) -> int:
        """This step's chunk of a sequence: the rest of its tokens, cut to the budget at a span edge."""
        start = seq.num_computed_tokens
        remaining = seq.num_tokens - start
        if remaining <= budget:
            return remaining
        end = start + budget
        for span in seq.mm_spans:
            if span.offset >= end:
                break
            if span.offset < end < span.end:
                if span.offset > start:
                    return span.offset - start  # stop before the span
                return span.end - start if allow_over_budget else 0  # the span starts the chunk: take it whole
        return budget

    def _make_room(self, seq: Sequence, num_new_tokens: int, batch: ScheduledBatch) -> bool:
        """Preempt from the tail of ``running`` until ``seq`` can append; False if ``seq`` was preempted."""
        while not self.block_manager.can_append(seq, num_new_tokens):
            victim = self.running.pop()
            self.block_manager.free(victim)
            victim.num_computed_tokens = victim.num_cached_tokens = 0
            victim.status = SequenceStatus.PREEMPTED
            self.waiting.appendleft(victim)
            batch.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def update(self, batch: ScheduledBatch, sampled: Mapping[str, int]) -> list[Sequence]:
        """Apply a computed step: advance the counters, append sampled tokens, check stop conditions.

        Args:
            batch: the batch returned by the last :meth:`schedule`.
            sampled: the sampled token id for every entry with ``batch.samples[i]`` (keyed by request id).

        Returns:
            The sequences that finished this step (stop token / EOS, or max_new_tokens / max_model_len);
            their blocks are already freed. Entries finished meanwhile (aborted) are skipped.
        """
        finished = []
        for (seq, n), samples in zip(batch.scheduled, batch.samples, strict=True):
            if seq.is_finished:
                continue
            seq.num_computed_tokens += n
            if samples:
                token = sampled[seq.request_id]
                seq.append_token(token)
                reason = self._stop_reason(seq, token)
                if reason is not None:
                    self.finish(seq, reason, token if reason == "stop" else None)
                    finished.append(seq)
                    continue
            self.block_manager.cache_computed_blocks(seq)
            self.block_manager.free_skipped_blocks(seq)
        return finished

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        params = seq.sampling_params
        # min_new_tokens counts the tokens before this one, as transformers' MinNewTokens processor does.
        if seq.num_output_tokens > params.min_new_tokens and (
            token in params.stop_token_ids or (not params.ignore_eos and token in seq.eos_token_ids)
        ):
            return "stop"
        if seq.num_output_tokens >= params.max_new_tokens:
            return "length"
        if self.config.max_model_len is not None and seq.num_tokens >= self.config.max_model_len:
            return "length"
        return None

    @property
    def num_waiting(self) -> int:
        """Sequences waiting (new or preempted)."""
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        """Sequences holding KV blocks."""
        return len(self.running)
