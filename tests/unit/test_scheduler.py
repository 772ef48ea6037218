"""Scheduler: the one scheduling rule, chunked prefill with image spans, preemption, stops, aborts."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable
from typing import Any

import pytest

from internvl_runtime.engine.sampling_params import SamplingParams
from internvl_runtime.engine.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from internvl_runtime.engine.sequence import MultiModalSpan, Sequence, SequenceStatus
from internvl_runtime.errors import ConfigError, ContextLengthExceeded, InvalidRequest

EOS = 2


def fake_token(seq: Sequence) -> int:
    """A deterministic 'model': the next token depends only on the request and its length."""
    return 10 + zlib.crc32(f"{seq.request_id}:{seq.num_tokens}".encode()) % 90


def step(scheduler: Scheduler, model: Callable[[Sequence], int] = fake_token) -> tuple[ScheduledBatch, list[Sequence]]:
    batch = scheduler.schedule()
    sampled = {seq.request_id: model(seq) for (seq, _), s in zip(batch.scheduled, batch.samples, strict=True) if s}
    return batch, scheduler.update(batch, sampled)


def run_to_end(scheduler: Scheduler, max_steps: int = 10_000) -> list[ScheduledBatch]:
    batches: list[ScheduledBatch] = []
    for _ in range(max_steps):
        if not scheduler.has_unfinished():
            return batches
        batches.append(step(scheduler)[0])
    raise AssertionError("scheduler did not finish")


def make(
    rid: str, n: int, max_new: int = 4, base: int = 100, mm_spans: Iterable[MultiModalSpan] = (), **kw: Any
) -> Sequence:
    params = SamplingParams(max_new_tokens=max_new, **kw)
    return Sequence(rid, [base + i for i in range(n)], params, mm_spans=mm_spans, eos_token_ids=[EOS])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_num_seqs": 0},
        {"block_size": 0},
        {"num_blocks": -1},
        {"max_num_batched_tokens": 1.5},
        {"max_num_seqs": 8, "max_num_batched_tokens": 4},
        {"enable_prefix_caching": "yes"},
        {"max_model_len": 1},
        {"max_num_seqs": True},
    ],
)
def test_config_validation(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match="SchedulerConfig"):
        SchedulerConfig(**kwargs)  # type: ignore[arg-type]


def test_single_request_to_length() -> None:
    sch = Scheduler(SchedulerConfig(num_blocks=8, block_size=4))
    seq = make("a", 6, max_new=5)
    sch.add(seq)
    batches = run_to_end(sch)
    assert [b.scheduled[0][1] for b in batches] == [6, 1, 1, 1, 1]
    assert batches[0].is_prefill == [True] and batches[1].is_prefill == [False]
    assert seq.finish_reason == "length" and seq.num_output_tokens == 5
    assert seq.num_computed_tokens == seq.num_tokens - 1
    assert sch.block_manager.num_free_blocks == 8 and seq.block_table == []
    assert sch.get("a") is None and not sch.has_unfinished()


def test_eos_stop_tokens_min_tokens_and_ignore_eos() -> None:
    def eos_model(seq: Sequence) -> int:
        return EOS

    def stop_model(seq: Sequence) -> int:
        return 7

    cases = [
        (make("eos", 3, max_new=5), eos_model, "stop", 1, EOS),
        (make("min", 3, max_new=5, min_new_tokens=2), eos_model, "stop", 3, EOS),
        (make("ign", 3, max_new=5, ignore_eos=True), eos_model, "length", 5, None),
        (make("ids", 3, max_new=5, ignore_eos=True, stop_token_ids=[7]), stop_model, "stop", 1, 7),
    ]
    for seq, model, reason, n_out, stop_reason in cases:
        sch = Scheduler(SchedulerConfig(num_blocks=8, block_size=4))
        sch.add(seq)
        while sch.has_unfinished():
            step(sch, model)
        assert (seq.finish_reason, seq.num_output_tokens, seq.stop_reason) == (reason, n_out, stop_reason), (
            seq.request_id
        )


def test_continuous_admission_while_others_decode() -> None:
    sch = Scheduler(SchedulerConfig(num_blocks=32, block_size=4))
    a = make("a", 5, max_new=10)
    sch.add(a)
    step(sch)
    step(sch)
    b = make("b", 7, max_new=3, base=300)
    sch.add(b)
    batch, _ = step(sch)
    assert batch.scheduled == [(a, 1), (b, 7)]
    assert batch.is_prefill == [False, True] and batch.samples == [True, True]
    assert [s for s, _ in batch.decodes] == [a] and [s for s, _ in batch.prefills] == [b]
    batch, _ = step(sch)
    assert batch.scheduled == [(a, 1), (b, 1)]
    run_to_end(sch)
    assert a.num_output_tokens == 10 and b.num_output_tokens == 3


def test_token_budget_and_max_num_seqs_respected() -> None:
    cfg = SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=20, num_blocks=200, block_size=4)
    sch = Scheduler(cfg)
    seqs = [make(f"r{i}", 7 + 3 * i, max_new=6, base=1000 * i) for i in range(8)]
    for seq in seqs:
        sch.add(seq)
    for batch in run_to_end(sch):
        assert 0 < batch.num_batched_tokens <= 20
        assert len(batch) <= 3
        assert len({s.request_id for s, _ in batch.scheduled}) == len(batch)
    assert all(s.finish_reason == "length" and s.num_output_tokens == 6 for s in seqs)
    assert sch.block_manager.num_free_blocks == 200


def test_chunked_prefill() -> None:
    sch = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=16, num_blocks=32, block_size=4))
    seq = make("long", 50, max_new=2)
    sch.add(seq)
    chunks = []
    while sch.has_unfinished():
        batch, _ = step(sch)
        chunks.append((batch.scheduled[0][1], batch.samples[0]))
    assert chunks == [(16, False), (16, False), (16, False), (2, True), (1, True)]
    assert seq.num_output_tokens == 2


def test_chunk_never_splits_an_image_span() -> None:
    span = MultiModalSpan(10, 20, "img")  # positions 10..29
    sch = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=16, num_blocks=32, block_size=4))
    seq = make("img", 40, max_new=1, mm_spans=[span])
    sch.add(seq)
    chunks = []
    while sch.has_unfinished():
        batch, _ = step(sch)
        for s, n in batch.scheduled:
            start = s.num_computed_tokens - n  # update() advanced it already
            assert not any(sp.offset < start < sp.end or sp.offset < start + n < sp.end for sp in s.mm_spans)
            chunks.append(n)
    assert chunks == [10, 20, 10]  # stop before the span; then the span whole (over budget); the rest


def test_over_budget_span_waits_for_a_step_without_other_prefill() -> None:
    sch = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16, num_blocks=64, block_size=4))
    first = make("txt", 12, max_new=2)
    second = make("img", 30, max_new=1, base=500, mm_spans=[MultiModalSpan(0, 20, "img")])
    sch.add(first)
    sch.add(second)
    batch, _ = step(sch)
    assert [(s.request_id, n) for s, n in batch.scheduled] == [("txt", 12)]  # img admitted, its span waits
    assert second.status is SequenceStatus.RUNNING
    batch, _ = step(sch)
    assert [(s.request_id, n) for s, n in batch.scheduled] == [("txt", 1), ("img", 20)]
    run_to_end(sch)
    assert second.num_output_tokens == 1


def test_preemption_and_resumption_give_the_same_tokens() -> None:
    def run(num_blocks: int) -> tuple[dict[str, list[int]], int]:
        sch = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, num_blocks=num_blocks, block_size=4))
        seqs = [make(f"r{i}", 6, max_new=12, base=100 * i) for i in range(3)]
        for seq in seqs:
            sch.add(seq)
        preempted = 0
        while sch.has_unfinished():
            batch, _ = step(sch)
            for victim in batch.preempted:
                preempted += 1
                assert victim.status is SequenceStatus.PREEMPTED and victim.block_table == []
                assert victim.num_computed_tokens == 0 and sch.waiting[0] is batch.preempted[-1]
        assert sch.block_manager.num_free_blocks == num_blocks
        assert all(s.finish_reason == "length" for s in seqs)
        return {s.request_id: s.output_token_ids for s in seqs}, preempted

    roomy, none = run(64)
    tight, some = run(9)  # each sequence needs up to 5 blocks: three cannot all decode
    assert none == 0 and some > 0
    assert tight == roomy


def test_preempted_sequence_recomputes_prompt_and_outputs() -> None:
    sch = Scheduler(
        SchedulerConfig(
            max_num_seqs=2, max_num_batched_tokens=64, num_blocks=4, block_size=4, enable_prefix_caching=False
        )
    )
    a, b = make("a", 4, max_new=8), make("b", 3, max_new=8, base=200)
    sch.add(a)
    sch.add(b)
    while b.status is not SequenceStatus.PREEMPTED:
        batch, _ = step(sch)
    assert batch.preempted == [b] and sch.waiting[0] is b
    outputs = list(b.output_token_ids)
    assert outputs, "b had generated tokens before it was preempted"
    # Once admitted again, b prefills prompt + outputs and samples the next token.
    while True:
        batch, _ = step(sch)
        entry = [(n, s) for (seq, n), s in zip(batch.scheduled, batch.samples, strict=True) if seq is b]
        if entry:
            break
    assert entry == [(3 + len(outputs), True)]
    assert b.output_token_ids[: len(outputs)] == outputs


def test_prefix_cache_hit_counts_as_computed() -> None:
    sch = Scheduler(SchedulerConfig(num_blocks=32, block_size=4))
    first = make("a", 14, max_new=2)
    sch.add(first)
    run_to_end(sch)
    again = make("b", 14, max_new=2)
    sch.add(again)
    batch, _ = step(sch)
    assert again.num_cached_tokens == 12 and batch.scheduled == [(again, 2)]


def test_abort_frees_blocks_at_once() -> None:
    sch = Scheduler(SchedulerConfig(max_num_seqs=1, num_blocks=16, block_size=4))
    running, waiting = make("run", 9, max_new=20), make("wait", 5)
    sch.add(running)
    sch.add(waiting)
    step(sch)
    assert running.status is SequenceStatus.RUNNING and waiting.status is SequenceStatus.WAITING
    assert sch.abort("run") is running
    assert running.finish_reason == "abort" and running.block_table == []
    assert sch.block_manager.num_free_blocks == 16
    assert sch.abort("wait") is waiting and waiting.finish_reason == "abort"
    assert sch.abort("wait") is None and sch.abort("never") is None
    assert not sch.has_unfinished()


def test_abort_between_schedule_and_update() -> None:
    sch = Scheduler(SchedulerConfig(num_blocks=16, block_size=4))
    a, b = make("a", 5), make("b", 6, base=300)
    sch.add(a)
    sch.add(b)
    batch = sch.schedule()
    sch.abort("a")
    finished = sch.update(batch, {"a": 11, "b": 12})
    assert finished == [] and a.output_token_ids == [] and b.output_token_ids == [12]


def test_many_cancelled_requests_leave_the_pool_as_it_started() -> None:
    sch = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=32, num_blocks=24, block_size=4))
    start = sch.block_manager.num_free_blocks
    for i in range(60):
        sch.add(make(f"r{i}", 5 + i % 13, max_new=30, base=(i % 3) * 100))
        step(sch)
        if i % 2:
            sch.abort(f"r{i - 1}")
        if i % 5 == 0:
            sch.abort(f"r{i}")
    for seq in list(sch.running) + list(sch.waiting):
        sch.abort(seq.request_id)
    assert not sch.has_unfinished() and sch.block_manager.num_free_blocks == start


def test_finish_from_the_engine_for_a_stop_string() -> None:
    sch = Scheduler(SchedulerConfig(num_blocks=16, block_size=4))
    seq = make("a", 5, max_new=10)
    sch.add(seq)
    step(sch)
    sch.finish(seq, "stop", "###")
    assert (seq.finish_reason, seq.stop_reason, sch.block_manager.num_free_blocks) == ("stop", "###", 16)
    sch.finish(seq, "abort")  # finishing twice changes nothing
    assert seq.finish_reason == "stop"

    last = make("b", 5, max_new=1)
    sch.add(last)
    _, finished = step(sch)
    assert finished == [last] and last.finish_reason == "length"
    sch.finish(last, "stop", "\n")  # the stop string in the last token wins
    assert (last.finish_reason, last.stop_reason) == ("stop", "\n")


def test_add_refuses_what_can_never_fit() -> None:
    sch = Scheduler(SchedulerConfig(num_blocks=4, block_size=4, max_model_len=40))
    sch.add(make("fits", 10, max_new=7))  # 16 KV slots: exactly the pool
    with pytest.raises(ContextLengthExceeded, match="KV"):
        sch.add(make("big", 10, max_new=8))
    with pytest.raises(ContextLengthExceeded, match="context of 40"):
        sch.add(make("ctx", 30, max_new=11))
    with pytest.raises(InvalidRequest, match="already in use"):
        sch.add(make("fits", 3))
    run_to_end(sch)


def test_a_request_that_fills_the_whole_pool_completes() -> None:
    sch = Scheduler(SchedulerConfig(num_blocks=4, block_size=4, max_num_batched_tokens=16))
    other, seq = make("other", 3, max_new=3, base=900), make("fits", 10, max_new=7)
    sch.add(other)
    sch.add(seq)
    run_to_end(sch)
    assert seq.num_output_tokens == 7 and other.num_output_tokens == 3
    assert sch.block_manager.num_free_blocks == 4
