"""KV-cache block allocator with prefix caching (pure Python: ints, lists, dicts; no torch).

The KV cache is ``num_blocks`` blocks of ``block_size`` token slots. A sequence owns the blocks of its
``block_table``; position ``p`` lives in slot ``block_table[p // block_size] * block_size + p % block_size``.

Prefix caching. Once every token of a block is *computed* (its KV written), the block gets a hash of
(parent block's hash, the block's token ids, the content hashes of the image spans overlapping it with
their offsets relative to the block start) and is registered under it. Identical placeholder ids of two
different images therefore hash differently. A new sequence reuses the longest chain of registered
blocks matching its leading full blocks (ref count + 1), always leaving at least its last token to be
computed so the model produces logits. A registered block whose ref count drops to 0 stays reusable in
the free pool; fresh (unregistered) free blocks are handed out first, then registered free blocks are
evicted least recently freed first. A sequence frees its blocks tail first, so the tail of a prefix is
evicted before its head.

KV groups (``engine.kv_groups``). A model with sliding-window layers has several groups; each sequence has
one block table per group (``seq.block_tables``), every group drawing from this one pool. A sliding group's
blocks that the window has passed are given back as the sequence advances (``free_skipped_blocks``, on
every ``append_slots`` and after every computed step), their table entries set to the null block
(one past the pool); admission and appends count what each group really holds. A hash names a block per group; a
prefix hit must hold in every group: a sliding group needs the last ``hit_run`` blocks before the hit
point still cached (vLLM's rule), and the hit is shortened until every group agrees.

Hashes are registered only for computed tokens (``num_computed_tokens``, advanced by the scheduler after
each step), so a sequence never reuses a block whose KV is not yet written.

Example::

    bm = BlockManager(num_blocks=64, block_size=16)
    if bm.can_allocate(seq):
        bm.allocate(seq)                 # seq.num_computed_tokens = seq.num_cached_tokens = cache hit
    if bm.can_append(seq, 1):
        bm.append_slots(seq, 1)          # room for the next decode token
    bm.free(seq)
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable
from collections.abc import Sequence as SequenceABC

from internvl_runtime.engine.kv_groups import FULL_ATTENTION, KVCacheGroup, max_sequence_tokens
from internvl_runtime.engine.sequence import Sequence
from internvl_runtime.processing.spans import MultiModalSpan

_NO_PARENT = bytes(16)


def hash_block(parent_hash: int | None, token_ids: SequenceABC[int], mm_keys: SequenceABC[tuple[str, int]] = ()) -> int:
    """The 128-bit prefix-cache hash of one full block.

    Args:
        parent_hash: the hash of the previous block of the sequence (None for the first block).
        token_ids: the block's token ids.
        mm_keys: ``(content_hash, span_offset - block_start)`` of each image span overlapping the block.
    """
    digest = hashlib.blake2b(digest_size=16)
    digest.update(_NO_PARENT if parent_hash is None else parent_hash.to_bytes(16, "little"))
    digest.update(array("q", token_ids).tobytes())
    for content_hash, relative_offset in mm_keys:
        digest.update(f"|{relative_offset}:{content_hash}".encode())
    return int.from_bytes(digest.digest(), "little")


def _mm_keys(spans: SequenceABC[MultiModalSpan], start: int, end: int) -> list[tuple[str, int]]:
    return [(s.content_hash, s.offset - start) for s in spans if s.offset < end and s.end > start]


class BlockManager:
    """Fixed-size KV blocks: a free pool, reference counts and a prefix cache of full blocks, shared by
    the KV groups (``engine.kv_groups``: one for most models) of which each sequence has one block table."""

    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True,
                 kv_groups: SequenceABC[KVCacheGroup] = FULL_ATTENTION) -> None:
        self.kv_groups = tuple(kv_groups)
        assert self.kv_groups, "no KV group"
        assert num_blocks >= 1 and block_size >= 1, (num_blocks, block_size)
        #: what a sliding group's freed positions point at: the first block past the pool, which the runner
        #: allocates beside it (``KVCache.scratch_blocks``), never handed out nor written (None: no window)
        self.null_block = num_blocks if any(g.window is not None for g in self.kv_groups) else None
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        # (group, hash) once a block is full and computed: a hash names a block per group (vLLM's group id)
        self._hashes: list[tuple[int, int] | None] = [None] * num_blocks
        self._free_fresh: deque[int] = deque(range(num_blocks))  # free, not registered
        self._free_cached: OrderedDict[int, None] = OrderedDict()  # free, registered; LRU first
        self._cached: dict[tuple[int, int], int] = {}  # (group, hash) -> the block registered under it

    # ---- pool -------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (fresh ones and evictable cached ones)."""
        return len(self._free_fresh) + len(self._free_cached)

    @property
    def num_cached_blocks(self) -> int:
        """Registered blocks (in use or free) a new sequence could reuse."""
        return len(self._cached)

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` positions."""
        return -(-num_tokens // self.block_size)

    def num_held_blocks(self, seq: Sequence, group: int = 0) -> int:
        """Blocks of the pool the sequence holds in one group (its table less the freed positions)."""
        return sum(1 for block in seq.block_tables[group] if block != self.null_block)

    def max_sequence_tokens(self, chunk: int) -> int:
        """The longest sequence (KV positions) the whole pool holds, computed in steps of ``chunk`` tokens."""
        return max_sequence_tokens(self.kv_groups, self.num_blocks, self.block_size, chunk)

    def _take_block(self) -> int:
        if self._free_fresh:
            block = self._free_fresh.popleft()
        else:
            block, _ = self._free_cached.popitem(last=False)  # evict the least recently freed
            old_key = self._hashes[block]
            assert old_key is not None and self._cached[old_key] == block
            del self._cached[old_key]
            self._hashes[block] = None
        assert self._ref_counts[block] == 0, block
        self._ref_counts[block] = 1
        return block

    def _release_block(self, block: int) -> None:
        assert block != self.null_block, "the null block is never freed"
        assert self._ref_counts[block] > 0, f"block {block} freed twice"
        self._ref_counts[block] -= 1
        if self._ref_counts[block]:
            return
        key = self._hashes[block]
        if key is not None and self._cached.get(key) == block:
            self._free_cached[block] = None
        else:  # never registered, or a duplicate of a block registered first
            self._hashes[block] = None
            self._free_fresh.append(block)

    # ---- prefix cache -----------------------------------------------------------------------------
    def _block_hash(self, seq: Sequence, index: int, parent: int | None) -> int:
        start = index * self.block_size
        end = start + self.block_size
        return hash_block(parent, seq.token_ids[start:end], _mm_keys(seq.mm_spans, start, end))

    def _group_hit(self, group: int, hash_at: Callable[[int], int], limit: int) -> list[int | None]:
        """Group ``group``'s cached blocks for the leading ``<= limit`` full blocks. Full attention: the
        longest run of hits from the start. A window: the rightmost run of ``hit_run`` hits (or a run from
        the start), everything before it None, as vLLM's ``SlidingWindowManager.find_longest_cache_hit``."""
        spec = self.kv_groups[group]
        if spec.window is None:
            hits: list[int | None] = []
            for index in range(limit):
                block = self._cached.get((group, hash_at(index)))
                if block is None:
                    break
                hits.append(block)
            return hits
        need = spec.hit_run(self.block_size)
        found: list[int | None] = [None] * limit
        run = 0
        for index in range(limit - 1, -1, -1):
            block = self._cached.get((group, hash_at(index)))
            if block is None:
                run = 0
                continue
            found[index] = block
            run += 1
            if run >= need:
                return found[:index + run]
        return found[:run]          # no long enough run: only a run from the very start (nothing before it)

    def _lookup(self, seq: Sequence, num_tokens: int) -> tuple[list[list[int | None]], list[int]]:
        """The prefix-cache hit of the sequence's first ``num_tokens`` positions: per group the blocks of
        the hit (None where a window needs none), all of one length, and the hashes of those blocks. Each
        group in turn may shorten the hit; repeated until every group agrees (vLLM's coordinator). Never
        the block of the last token, so the model produces logits."""
        groups = range(len(self.kv_groups))
        if not self.enable_prefix_caching:
            return [[] for _ in groups], []
        hashes: list[int] = []

        def hash_at(index: int) -> int:
            while len(hashes) <= index:
                hashes.append(self._block_hash(seq, len(hashes), hashes[-1] if hashes else None))
            return hashes[index]

        limit = (num_tokens - 1) // self.block_size
        while True:
            found = []
            for group in groups:
                found.append(self._group_hit(group, hash_at, limit))
                limit = len(found[-1])
            if all(len(hits) == limit for hits in found):
                return found, hashes[:limit]

    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Register the sequence's blocks that are now full and computed (idempotent)."""
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, *(len(t) for t in seq.block_tables))
        for index in range(len(seq.block_hashes), num_full):
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            block_hash = self._block_hash(seq, index, parent)
            for group, table in enumerate(seq.block_tables):
                block = table[index]
                if block == self.null_block:
                    continue
                assert self._hashes[block] is None, f"block {block} registered twice"
                self._hashes[block] = (group, block_hash)
                self._cached.setdefault((group, block_hash), block)
            seq.block_hashes.append(block_hash)

    # ---- sequences --------------------------------------------------------------------------------
    def _kept_hits(self, hits: list[list[int | None]], num_hit_tokens: int) -> list[list[int | None]]:
        """The hit blocks a sequence takes per group: none before a window's first needed block."""
        kept = []
        for spec, group_hits in zip(self.kv_groups, hits, strict=True):
            skipped = spec.num_skipped_blocks(num_hit_tokens, self.block_size)
            kept.append([None if index < skipped else block for index, block in enumerate(group_hits)])
        return kept

    def _allocation_end(self, group: int, num_tokens: int, num_hit_tokens: int, chunk: int | None) -> int:
        """Positions a new sequence gets slots for in a group: all ``num_tokens`` (full attention, or no
        ``chunk`` given); a window only up to its first chunk (later chunks append, freeing as they go)."""
        if chunk is None or self.kv_groups[group].window is None:
            return num_tokens
        return min(num_tokens, num_hit_tokens + chunk)

    def num_blocks_to_allocate(self, seq: Sequence, num_tokens: int | None = None, *, chunk: int | None = None) -> int:
        """Free blocks ``allocate(seq, num_tokens, chunk=chunk)`` would consume (hits on blocks in use are free)."""
        num_tokens = seq.num_tokens if num_tokens is None else num_tokens
        hits, hashes = self._lookup(seq, num_tokens)
        hit_tokens = len(hashes) * self.block_size
        needed = 0
        for group, (spec, kept) in enumerate(zip(self.kv_groups, self._kept_hits(hits, hit_tokens), strict=True)):
            end = self._allocation_end(group, num_tokens, hit_tokens, chunk)
            held = self.num_blocks_for(end) - spec.num_skipped_blocks(hit_tokens, self.block_size)
            needed += held - sum(1 for block in kept if block is not None and self._ref_counts[block] > 0)
        return needed

    def can_allocate(self, seq: Sequence, num_tokens: int | None = None, *, chunk: int | None = None) -> bool:
        """Whether blocks for the first ``num_tokens`` positions (default: all tokens) are available."""
        return self.num_blocks_to_allocate(seq, num_tokens, chunk=chunk) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_tokens: int | None = None, *, chunk: int | None = None) -> None:
        """Give a sequence without blocks its cached prefix plus fresh blocks up to ``num_tokens`` (in a
        sliding-window group, with ``chunk``, only up to the cache hit plus ``chunk``).

        Sets ``seq.num_cached_tokens`` and ``seq.num_computed_tokens`` to the cache hit (a multiple of
        the block size, always < ``num_tokens``). Call :meth:`can_allocate` first.
        """
        assert not any(seq.block_tables), f"{seq.request_id} already has blocks"
        num_tokens = seq.num_tokens if num_tokens is None else num_tokens
        assert 0 < num_tokens <= seq.num_tokens, (num_tokens, seq.num_tokens)
        assert self.num_blocks_to_allocate(seq, num_tokens, chunk=chunk) <= self.num_free_blocks, \
            "allocate() without can_allocate()"
        hits, hashes = self._lookup(seq, num_tokens)
        hit_tokens = len(hashes) * self.block_size
        seq.block_tables = [[] for _ in self.kv_groups]
        for group, (table, kept) in enumerate(zip(seq.block_tables, self._kept_hits(hits, hit_tokens), strict=True)):
            for block in kept:
                if block is None:
                    assert self.null_block is not None
                    table.append(self.null_block)
                    continue
                if self._ref_counts[block] == 0:
                    del self._free_cached[block]
                self._ref_counts[block] += 1
                table.append(block)
            while len(table) < self.num_blocks_for(self._allocation_end(group, num_tokens, hit_tokens, chunk)):
                table.append(self._take_block())
        seq.block_hashes.extend(hashes)
        seq.num_cached_tokens = seq.num_computed_tokens = hit_tokens

    def _skippable(self, seq: Sequence, group: int) -> list[int]:
        """Indices of the group's blocks the window has passed and the sequence still holds (newest first:
        everything before a freed position was freed with it)."""
        skipped = self.kv_groups[group].num_skipped_blocks(seq.num_computed_tokens, self.block_size)
        table = seq.block_tables[group]
        indices = []
        for index in range(min(skipped, len(table)) - 1, -1, -1):
            if table[index] == self.null_block:
                break
            indices.append(index)
        return indices

    def free_skipped_blocks(self, seq: Sequence) -> None:
        """Give back the sliding groups' blocks the window has passed (registered first, so that they stay
        in the prefix cache until evicted); their table entries become the null block."""
        if self.null_block is None:
            return
        self.cache_computed_blocks(seq)
        for group, table in enumerate(seq.block_tables):
            for index in self._skippable(seq, group):
                self._release_block(table[index])
                table[index] = self.null_block

    def num_blocks_to_append(self, seq: Sequence, num_new_tokens: int) -> int:
        """Free blocks ``append_slots(seq, num_new_tokens)`` would consume, less what it frees first."""
        end = seq.num_computed_tokens + num_new_tokens
        needed = 0
        for group, table in enumerate(seq.block_tables):
            needed += max(0, self.num_blocks_for(end) - len(table))
            needed -= sum(1 for index in self._skippable(seq, group) if self._ref_counts[table[index]] == 1)
        return needed

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Whether slots for ``num_new_tokens`` more positions after the computed ones are available."""
        return self.num_blocks_to_append(seq, num_new_tokens) <= self.num_free_blocks

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> None:
        """Make room for positions ``[num_computed_tokens, num_computed_tokens + num_new_tokens)``.

        Registers blocks that became full and computed since the last call, frees what a window has
        passed, then adds fresh blocks as needed. Call :meth:`can_append` first.
        """
        assert self.num_blocks_to_append(seq, num_new_tokens) <= self.num_free_blocks, \
            "append_slots() without can_append()"
        self.cache_computed_blocks(seq)
        self.free_skipped_blocks(seq)
        target = self.num_blocks_for(seq.num_computed_tokens + num_new_tokens)
        for table in seq.block_tables:
            while len(table) < target:
                table.append(self._take_block())

    def free(self, seq: Sequence) -> None:
        """Release a sequence's blocks (tail first); its computed full blocks stay in the prefix cache."""
        self.cache_computed_blocks(seq)
        for table in seq.block_tables:
            for block in reversed(table):
                if block != self.null_block:
                    self._release_block(block)
        seq.block_tables = [[] for _ in self.kv_groups]
        seq.block_hashes.clear()

    def slot(self, seq: Sequence, position: int, group: int = 0) -> int:
        """The KV-cache slot of a position of the sequence (in a group's table)."""
        block_index, offset = divmod(position, self.block_size)
        return seq.block_tables[group][block_index] * self.block_size + offset

    def slot_mapping(self, seq: Sequence, start: int, end: int, group: int = 0) -> list[int]:
        """The slots of positions ``[start, end)``."""
        return [self.slot(seq, p, group) for p in range(start, end)]
