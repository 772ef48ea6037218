"""KV groups and the block manager's sliding-window rule (engine.kv_groups, engine.block_manager): layers
grouped by attention kind, a window's passed blocks given back (null entries keep the table aligned),
admission counting what each group holds, preemption freeing both groups, and vLLM's prefix-hit rule."""

from __future__ import annotations

import pytest

from internvl_runtime.engine.block_manager import BlockManager
from internvl_runtime.engine.kv_groups import (
    KVCacheGroup,
    kv_cache_groups,
    layer_slots,
    max_blocks_per_sequence,
    max_sequence_tokens,
)
from internvl_runtime.engine.sampling_params import SamplingParams
from internvl_runtime.engine.scheduler import Scheduler, SchedulerConfig
from internvl_runtime.engine.sequence import Sequence

BS = 4
WINDOW = 8
GROUPS = (KVCacheGroup((1, 3), None), KVCacheGroup((0, 2), WINDOW))
FULL, SLIDING = 0, 1


def test_gpt_oss_layers_form_a_full_and_a_sliding_group() -> None:
    windows = [128 if i % 2 == 0 else None for i in range(24)]
    full, sliding = kv_cache_groups(windows)
    assert full == KVCacheGroup(tuple(range(1, 24, 2)), None)
    assert sliding == KVCacheGroup(tuple(range(0, 24, 2)), 128)
    group_of, pool_of = layer_slots((full, sliding), 24)
    assert group_of[:4] == [1, 0, 1, 0] and pool_of[:4] == [0, 0, 1, 1] and max(pool_of) == 11


def test_one_kind_is_one_group_and_uneven_kinds_split_evenly() -> None:
    assert kv_cache_groups([None] * 5) == (KVCacheGroup((0, 1, 2, 3, 4), None),)
    assert kv_cache_groups([None, 4, 4, 4, 4]) == (
        KVCacheGroup((0,), None), *(KVCacheGroup((i,), 4) for i in range(1, 5)))


def test_window_rule_bounds_a_sequence() -> None:
    full, sliding = GROUPS
    assert sliding.first_needed_position(20) == 13 and full.first_needed_position(20) == 0
    assert sliding.num_skipped_blocks(20, BS) == 3 and sliding.hit_run(BS) == 2
    # 1000 tokens in decode-sized steps: the window's 7 keys plus the token: at most 3 blocks
    assert sliding.max_blocks(1000, BS, chunk=1) == 3 and full.max_blocks(1000, BS, chunk=1) == 250
    assert max_blocks_per_sequence(GROUPS, 1000, BS, chunk=16) == 250 + 7
    assert max_sequence_tokens(GROUPS, 100, BS, chunk=16) == 4 * (100 - 7)
    assert max_sequence_tokens((KVCacheGroup(),), 100, BS, chunk=16) == 400


def _decode_to(bm: BlockManager, seq: Sequence, num_tokens: int, held: list[int]) -> None:
    """Computes the sequence token by token (as decode steps do) up to ``num_tokens``, recording the sliding
    group's held blocks at each step."""
    while seq.num_computed_tokens < num_tokens:
        if seq.num_computed_tokens == seq.num_tokens:
            seq.append_token(7)
        assert bm.can_append(seq, 1)
        bm.append_slots(seq, 1)
        held.append(bm.num_held_blocks(seq, len(seq.block_tables) - 1))
        seq.num_computed_tokens += 1
        bm.cache_computed_blocks(seq)
        bm.free_skipped_blocks(seq)


def test_sliding_blocks_are_freed_past_the_window_and_the_table_stays_aligned() -> None:
    bm = BlockManager(64, BS, kv_groups=GROUPS)
    seq = Sequence("a", range(1, 6))
    bm.allocate(seq)
    held: list[int] = []
    _decode_to(bm, seq, 60, held)
    assert max(held) == 3 and held[-1] <= 3
    full, sliding = seq.block_tables
    assert len(full) == len(sliding) == 15 and bm.num_held_blocks(seq, FULL) == 15
    null = bm.null_block
    assert null == 64 and sliding[:12] == [null] * 12 and null not in sliding[13:]
    assert bm.num_free_blocks == 64 - 15 - bm.num_held_blocks(seq, SLIDING)
    # a freed position is never handed out again to this sequence: live blocks are distinct over both groups
    live = [b for table in seq.block_tables for b in table if b != null]
    assert len(live) == len(set(live))
    bm.free(seq)
    assert bm.num_free_blocks == 64 and seq.block_tables == [[], []]


def test_without_freeing_the_same_decode_holds_every_block() -> None:
    bm = BlockManager(64, BS, kv_groups=(KVCacheGroup((0, 1, 2, 3), None),))
    seq = Sequence("a", range(1, 6))
    bm.allocate(seq)
    held: list[int] = []
    _decode_to(bm, seq, 60, held)
    assert bm.num_free_blocks == 64 - 15


def test_admission_counts_the_first_chunk_of_a_sliding_group() -> None:
    bm = BlockManager(64, BS, kv_groups=GROUPS)
    seq = Sequence("a", range(1, 101))          # 100 prompt tokens: 25 blocks
    assert bm.num_blocks_to_allocate(seq) == 50
    assert bm.num_blocks_to_allocate(seq, chunk=16) == 25 + 4
    bm.allocate(seq, chunk=16)
    assert [len(t) for t in seq.block_tables] == [25, 4]
    seq.num_computed_tokens = 16
    # the next chunk of 16: blocks 4..7 come, blocks 0 and 1 (positions < 16 - 8 + 1 = 9... only 0, 1) go
    assert bm.num_blocks_to_append(seq, 16) == 4 - 2
    bm.append_slots(seq, 16)
    assert seq.block_tables[SLIDING][:2] == [bm.null_block] * 2 and bm.num_held_blocks(seq, SLIDING) == 6


def test_scheduler_preemption_frees_both_groups_and_admits_more_long_sequences() -> None:
    def run(groups: tuple[KVCacheGroup, ...], num_blocks: int) -> tuple[int, int]:
        scheduler = Scheduler(SchedulerConfig(num_blocks=num_blocks, block_size=BS, max_num_seqs=8,
                                              max_num_batched_tokens=64, kv_groups=groups))
        for i in range(8):
            scheduler.add(Sequence(f"r{i}", [i + 1] * 10, SamplingParams(max_new_tokens=90, ignore_eos=True)))
        most, preempted = 0, 0
        while scheduler.has_unfinished():
            batch = scheduler.schedule()
            preempted += len(batch.preempted)
            most = max(most, scheduler.num_running)
            scheduler.update(batch, {seq.request_id: 5 for seq, _ in batch.scheduled})
            assert scheduler.block_manager.num_free_blocks + sum(
                scheduler.block_manager.num_held_blocks(s, g) for s in scheduler.running
                for g in range(len(groups))) <= num_blocks
        assert scheduler.block_manager.num_free_blocks == num_blocks
        return most, preempted

    # The same bytes: one group of 4 layers per block id, or 2 groups sharing 2 pools (twice the ids).
    # 8 sequences of 100 tokens: 25 blocks each without freeing (200 > 120), 25 + 3 with it (224 <= 240).
    one = run((KVCacheGroup((0, 1, 2, 3), None),), 120)
    two = run(GROUPS, 240)
    assert one[1] > 0                          # they did not fit: running ones were preempted and recomputed
    assert two == (8, 0)
    # a smaller pool preempts in the hybrid layout too, and still frees every block of both groups
    assert run(GROUPS, 100)[1] > 0


def test_sliding_prefix_hit_needs_the_window_blocks_before_the_hit() -> None:
    bm = BlockManager(64, BS, kv_groups=GROUPS)
    first = Sequence("a", range(1, 30))          # 29 tokens: 7 full blocks
    bm.allocate(first)
    first.num_computed_tokens = 29
    bm.free(first)                              # registered in both groups, then free (cached)
    second = Sequence("b", [*range(1, 30), 99])
    bm.allocate(second)
    # 7 full blocks hit; the sliding group takes only the last two (positions 21..27 >= 28 - 8 + 1)
    assert second.num_cached_tokens == 28
    assert second.block_tables[SLIDING][:5] == [bm.null_block] * 5
    assert bm.num_held_blocks(second, SLIDING) == 3 and bm.num_held_blocks(second, FULL) == 8
    bm.free(second)


@pytest.mark.parametrize("evict", [5, 6])
def test_a_hit_is_cut_where_the_window_blocks_are_gone(evict: int) -> None:
    bm = BlockManager(64, BS, kv_groups=GROUPS)
    first = Sequence("a", range(1, 30))
    bm.allocate(first)
    first.num_computed_tokens = 29
    sliding_blocks = list(first.block_tables[SLIDING])
    bm.free(first)
    # evict one cached sliding block (as a fresh allocation would): the hit must end before it
    bm._cached.pop((SLIDING, bm._hashes[sliding_blocks[evict]][1]))
    second = Sequence("b", [*range(1, 30), 99])
    bm.allocate(second)
    # a hit of n blocks needs blocks n-2, n-1 cached in the sliding group: n <= evict
    assert second.num_cached_tokens == BS * evict
    assert second.num_cached_tokens % BS == 0
