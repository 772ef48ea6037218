"""BlockManager: allocation, ref counts, prefix caching (image-aware), eviction, invariants."""

from __future__ import annotations

import random
from collections import Counter

from internvl_runtime.engine.block_manager import BlockManager, hash_block
from internvl_runtime.engine.sequence import Sequence
from internvl_runtime.processing.spans import MultiModalSpan

BS = 4


def check_invariants(bm: BlockManager, live: list[Sequence]) -> None:
    """Ref counts match the block tables; a block is either free or in use, never both or twice."""
    in_use = Counter(b for s in live for b in s.block_table)
    for s in live:
        assert len(set(s.block_table)) == len(s.block_table), "a block twice in one table"
    assert all(bm._ref_counts[b] == in_use[b] for b in range(bm.num_blocks))
    free = list(bm._free_fresh) + list(bm._free_cached)
    assert len(free) == len(set(free)) == bm.num_free_blocks
    assert set(free).isdisjoint(in_use)
    assert len(free) + len(in_use) == bm.num_blocks
    for block_hash, block in bm._cached.items():
        assert bm._hashes[block] == block_hash
    assert all(bm._hashes[b] is None for b in bm._free_fresh)


def compute(bm: BlockManager, seq: Sequence, upto: int | None = None) -> None:
    """Pretend the model wrote KV up to ``upto`` (default: all but the last token)."""
    seq.num_computed_tokens = seq.num_tokens - 1 if upto is None else upto
    bm.cache_computed_blocks(seq)


def test_allocate_free_and_slots() -> None:
    bm = BlockManager(8, BS)
    seq = Sequence("a", range(10))
    assert bm.can_allocate(seq) and bm.num_blocks_to_allocate(seq) == 3
    bm.allocate(seq)
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 5
    assert seq.num_cached_tokens == seq.num_computed_tokens == 0
    for pos in range(10):
        assert bm.slot(seq, pos) == seq.block_table[pos // BS] * BS + pos % BS
    assert bm.slot_mapping(seq, 3, 6) == [bm.slot(seq, p) for p in (3, 4, 5)]
    check_invariants(bm, [seq])
    bm.free(seq)
    assert bm.num_free_blocks == 8 and seq.block_table == [] and seq.block_hashes == []
    check_invariants(bm, [])


def test_can_allocate_limits() -> None:
    bm = BlockManager(3, BS)
    assert not bm.can_allocate(Sequence("big", range(13)))
    assert bm.can_allocate(Sequence("fits", range(12)))
    assert bm.can_allocate(Sequence("part", range(13)), num_tokens=12)


def test_append_slots_grows_at_block_boundary_and_registers_full_blocks() -> None:
    bm = BlockManager(8, BS)
    seq = Sequence("a", range(7))
    bm.allocate(seq)
    compute(bm, seq, 7)
    seq.append_token(100)  # 8 tokens, position 7 still fits block 1
    assert bm.can_append(seq, 1)
    bm.append_slots(seq, 1)
    assert len(seq.block_table) == 2 and len(seq.block_hashes) == 1
    compute(bm, seq, 8)
    seq.append_token(101)
    bm.append_slots(seq, 1)  # position 8 needs a third block; block 1 is now full and computed
    assert len(seq.block_table) == 3 and len(seq.block_hashes) == 2
    assert bm.num_cached_blocks == 2
    check_invariants(bm, [seq])


def test_can_append_false_when_pool_exhausted() -> None:
    bm = BlockManager(2, BS)
    seq = Sequence("a", range(8))
    bm.allocate(seq)
    compute(bm, seq, 8)
    seq.append_token(1)
    assert not bm.can_append(seq, 1)
    assert bm.can_append(seq, 0)


def test_shared_prefix_is_reused() -> None:
    bm = BlockManager(16, BS)
    first = Sequence("a", [*list(range(10)), 50, 51])
    bm.allocate(first)
    compute(bm, first)
    second = Sequence("b", [*list(range(10)), 60, 61, 62])
    free_before = bm.num_free_blocks
    assert bm.num_blocks_to_allocate(second) == 4 - 2  # two shared blocks are in use already
    bm.allocate(second)
    assert second.num_cached_tokens == second.num_computed_tokens == 8
    assert second.block_table[:2] == first.block_table[:2]
    assert second.block_table[2:] != first.block_table[2:]
    assert bm.num_free_blocks == free_before - 2
    check_invariants(bm, [first, second])
    bm.free(first)
    bm.free(second)
    check_invariants(bm, [])
    assert bm.num_free_blocks == 16


def test_cached_blocks_survive_free_and_are_reused() -> None:
    bm = BlockManager(8, BS)
    first = Sequence("a", range(13))
    bm.allocate(first)
    compute(bm, first)
    bm.free(first)
    assert bm.num_free_blocks == 8 and bm.num_cached_blocks == 3
    again = Sequence("b", range(13))
    bm.allocate(again)
    assert again.num_cached_tokens == 12
    check_invariants(bm, [again])


def test_last_token_is_never_cached() -> None:
    bm = BlockManager(8, BS)
    first = Sequence("a", range(9))
    bm.allocate(first)
    compute(bm, first, 9)
    bm.free(first)
    same = Sequence("b", range(8))  # exactly two full cached blocks
    bm.allocate(same)
    assert same.num_cached_tokens == 4  # the block of the last token is computed again


def test_different_images_with_identical_ids_are_not_reused() -> None:
    prompt = [1, 2] + [9] * 8 + [3, 4, 5]
    bm = BlockManager(16, BS)
    cat = Sequence("cat", prompt, mm_spans=[MultiModalSpan(2, 8, "cat")])
    bm.allocate(cat)
    compute(bm, cat)
    dog = Sequence("dog", prompt, mm_spans=[MultiModalSpan(2, 8, "dog")])
    bm.allocate(dog)
    assert dog.num_cached_tokens == 0
    cat_again = Sequence("cat2", prompt, mm_spans=[MultiModalSpan(2, 8, "cat")])
    bm.allocate(cat_again)
    assert cat_again.num_cached_tokens == 12
    text_only = Sequence("txt", prompt)
    bm.allocate(text_only)
    assert text_only.num_cached_tokens == 0
    check_invariants(bm, [cat, dog, cat_again, text_only])


def test_image_span_offset_is_part_of_the_hash() -> None:
    assert hash_block(None, [9] * 4, [("img", 0)]) != hash_block(None, [9] * 4, [("img", -4)])
    assert hash_block(None, [9] * 4, [("img", 0)]) == hash_block(None, [9] * 4, [("img", 0)])
    assert hash_block(1, [9] * 4) != hash_block(2, [9] * 4) != hash_block(None, [9] * 4)


def test_eviction_is_least_recently_freed_and_fresh_blocks_go_first() -> None:
    bm = BlockManager(6, BS)
    old = Sequence("old", [1] * 9)  # 3 blocks, 2 cacheable
    new = Sequence("new", [2] * 9)
    for seq in (old, new):
        bm.allocate(seq)
        compute(bm, seq)
    bm.free(old)
    bm.free(new)
    assert bm.num_cached_blocks == 4 and bm.num_free_blocks == 6
    # 2 fresh blocks are handed out before any cached block is evicted.
    filler = Sequence("filler", [3] * 8)
    bm.allocate(filler)
    assert bm.num_cached_blocks == 4
    bm.free(filler)
    # Now 4 more blocks are needed: the 2 fresh ones, then old's 2 cached blocks, tail first.
    big = Sequence("big", [4] * 16)
    bm.allocate(big)
    assert bm.num_cached_blocks == 2
    probe_old, probe_new = Sequence("p1", [1] * 9), Sequence("p2", [2] * 9)
    assert bm.num_blocks_to_allocate(probe_old) == 3  # evicted
    bm.free(big)
    bm.allocate(probe_new)
    assert probe_new.num_cached_tokens == 8  # kept
    check_invariants(bm, [probe_new])


def test_tail_of_a_prefix_is_evicted_before_its_head() -> None:
    bm = BlockManager(4, BS)
    seq = Sequence("a", range(13))
    bm.allocate(seq)
    compute(bm, seq)
    bm.free(seq)
    taker = Sequence("t", [99] * 4)  # needs one block: the fresh one
    bm.allocate(taker)
    taker2 = Sequence("t2", [98] * 4)  # evicts the tail (block 2) of "a"
    bm.allocate(taker2)
    bm.free(taker)
    bm.free(taker2)
    probe = Sequence("p", range(13))
    bm.allocate(probe)
    assert probe.num_cached_tokens == 8
    check_invariants(bm, [probe])


def test_duplicate_blocks_computed_concurrently() -> None:
    bm = BlockManager(8, BS)
    a, b = Sequence("a", range(9)), Sequence("b", range(9))
    bm.allocate(a)
    bm.allocate(b)  # nothing registered yet: no sharing
    assert set(a.block_table).isdisjoint(b.block_table)
    compute(bm, a)
    compute(bm, b)
    assert bm.num_cached_blocks == 2  # b's copies are not registered: a's came first
    registered = a.block_table[:2]
    bm.free(b)
    bm.free(a)
    check_invariants(bm, [])
    c = Sequence("c", range(9))
    bm.allocate(c)
    assert c.num_cached_tokens == 8 and c.block_table[:2] == registered
    check_invariants(bm, [c])


def test_prefix_caching_disabled() -> None:
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    a = Sequence("a", range(9))
    bm.allocate(a)
    compute(bm, a)
    b = Sequence("b", range(9))
    bm.allocate(b)
    assert b.num_cached_tokens == 0 and bm.num_cached_blocks == 0


def test_random_cycles_keep_the_pool_consistent() -> None:
    rng = random.Random(0)
    bm = BlockManager(40, BS)
    start = bm.num_free_blocks
    live: list[Sequence] = []
    prefixes = [[rng.randrange(50) for _ in range(rng.randrange(4, 20))] for _ in range(4)]
    for step in range(600):
        action = rng.random()
        if action < 0.4:
            prompt = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(1, 10))]
            spans = [MultiModalSpan(0, 2, rng.choice("xy"))] if rng.random() < 0.3 else []
            seq = Sequence(f"r{step}", prompt, mm_spans=spans)
            if bm.can_allocate(seq):
                bm.allocate(seq)
                assert seq.num_computed_tokens < seq.num_tokens
                live.append(seq)
        elif action < 0.8 and live:
            seq = rng.choice(live)  # one step: finish the prompt or decode one token
            n = seq.num_tokens - seq.num_computed_tokens
            if bm.can_append(seq, n):
                bm.append_slots(seq, n)
                compute(bm, seq, seq.num_tokens)
                seq.append_token(rng.randrange(50))
        elif live:
            bm.free(live.pop(rng.randrange(len(live))))  # finish or abort
        check_invariants(bm, live)
    for seq in live:
        bm.free(seq)
    check_invariants(bm, [])
    assert bm.num_free_blocks == start
    assert bm.num_cached_blocks > 0
