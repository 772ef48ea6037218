"""Sequence: token bookkeeping, finish reasons, image spans."""

from __future__ import annotations

import pytest

from internvl_runtime.engine.sampling_params import SamplingParams
from internvl_runtime.engine.sequence import FINISH_STATUS, Sequence, SequenceStatus
from internvl_runtime.errors import InvalidRequest, PlaceholderMismatch
from internvl_runtime.processing.spans import MultiModalSpan


def test_counts_and_tokens() -> None:
    seq = Sequence("a", [5, 6, 7], SamplingParams(max_new_tokens=4), eos_token_ids=[2], arrival_time=3.0)
    assert (seq.num_tokens, seq.num_prompt_tokens, seq.num_output_tokens, seq.last_token) == (3, 3, 0, 7)
    seq.append_token(9)
    seq.append_token(10)
    assert seq.token_ids == [5, 6, 7, 9, 10]
    assert seq.output_token_ids == [9, 10] and seq.prompt_token_ids == [5, 6, 7]
    assert (seq.num_tokens, seq.num_output_tokens, seq.last_token) == (5, 2, 10)
    assert seq.eos_token_ids == (2,) and seq.arrival_time == 3.0
    assert seq.sampling_params.max_new_tokens == 4
    assert "a" in repr(seq)


def test_defaults() -> None:
    seq = Sequence("b", iter([1]))
    assert seq.status is SequenceStatus.WAITING and not seq.is_finished and seq.finish_reason is None
    assert seq.sampling_params == SamplingParams()
    assert (seq.num_computed_tokens, seq.num_cached_tokens, seq.block_table, seq.stop_reason) == (0, 0, [], None)
    assert seq.arrival_time > 0


def test_prompt_list_is_copied() -> None:
    prompt = [1, 2]
    seq = Sequence("c", prompt)
    seq.append_token(3)
    assert prompt == [1, 2]


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (SequenceStatus.FINISHED_STOPPED, "stop"),
        (SequenceStatus.FINISHED_LENGTH, "length"),
        (SequenceStatus.FINISHED_ABORTED, "abort"),
    ],
)
def test_finish_reason(status: SequenceStatus, reason: str) -> None:
    seq = Sequence("d", [1])
    seq.status = status
    assert seq.is_finished and seq.finish_reason == reason and FINISH_STATUS[reason] is status


def test_unfinished_states() -> None:
    for status in (SequenceStatus.WAITING, SequenceStatus.RUNNING, SequenceStatus.PREEMPTED):
        assert not status.is_finished


def test_empty_prompt_refused() -> None:
    with pytest.raises(InvalidRequest, match="empty"):
        Sequence("e", [])


def test_spans_sorted_and_checked() -> None:
    b, a = MultiModalSpan(6, 2, "img-b"), MultiModalSpan(1, 3, "img-a")
    seq = Sequence("f", list(range(10)), mm_spans=[b, a])
    assert seq.mm_spans == [a, b] and a.end == 4
    for bad in (
        [MultiModalSpan(8, 3, "x")],
        [MultiModalSpan(1, 3, "x"), MultiModalSpan(3, 2, "y")],
        [MultiModalSpan(2, 0, "x")],
    ):
        with pytest.raises(PlaceholderMismatch):
            Sequence("g", list(range(10)), mm_spans=bad)


def test_mm_spans_in() -> None:
    a, b = MultiModalSpan(2, 4, "a"), MultiModalSpan(8, 2, "b")
    seq = Sequence("h", list(range(12)), mm_spans=[a, b])
    assert seq.mm_spans_in(0, 2) == []
    assert seq.mm_spans_in(0, 12) == [(a, 0, 4), (b, 0, 2)]
    assert seq.mm_spans_in(4, 9) == [(a, 2, 4), (b, 0, 1)]
    assert seq.mm_spans_in(6, 8) == []
