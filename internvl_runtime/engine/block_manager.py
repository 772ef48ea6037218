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
from collections.abc import Sequence as SequenceABC

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
    """Fixed-size KV blocks: a free pool, reference counts and a prefix cache of full blocks."""

    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True) -> None:
        assert num_blocks >= 1 and block_size >= 1, (num_blocks, block_size)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        self._hashes: list[int | None] = [None] * num_blocks  # set once a block is full and computed
        self._free_fresh: deque[int] = deque(range(num_blocks))  # free, not registered
        self._free_cached: OrderedDict[int, None] = OrderedDict()  # free, registered; LRU first
        self._cached: dict[int, int] = {}  # hash -> the block registered under it

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

    def _take_block(self) -> int:
        if self._free_fresh:
            block = self._free_fresh.popleft()
        else:
            block, _ = self._free_cached.popitem(last=False)  # evict the least recently freed
            old_hash = self._hashes[block]
            assert old_hash is not None and self._cached[old_hash] == block
            del self._cached[old_hash]
            self._hashes[block] = None
        assert self._ref_counts[block] == 0, block
        self._ref_counts[block] = 1
        return block

    def _release_block(self, block: int) -> None:
        assert self._ref_counts[block] > 0, f"block {block} freed twice"
        self._ref_counts[block] -= 1
        if self._ref_counts[block]:
            return
        block_hash = self._hashes[block]
        if block_hash is not None and self._cached.get(block_hash) == block:
            self._free_cached[block] = None
        else:  # never registered, or a duplicate of a block registered first
            self._hashes[block] = None
            self._free_fresh.append(block)

    # ---- prefix cache -----------------------------------------------------------------------------
    def _block_hash(self, seq: Sequence, index: int, parent: int | None) -> int:
        start = index * self.block_size
        end = start + self.block_size
        return hash_block(parent, seq.token_ids[start:end], _mm_keys(seq.mm_spans, start, end))

    def _lookup(self, seq: Sequence, num_tokens: int) -> list[tuple[int, int]]:
        """``(block, hash)`` of the registered blocks matching the sequence's leading full blocks."""
        if not self.enable_prefix_caching:
            return []
        hits: list[tuple[int, int]] = []
        parent: int | None = None
        for index in range((num_tokens - 1) // self.block_size):  # never the block of the last token
            block_hash = self._block_hash(seq, index, parent)
            block = self._cached.get(block_hash)
            if block is None:
                break
            hits.append((block, block_hash))
            parent = block_hash
        return hits

    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Register the sequence's blocks that are now full and computed (idempotent)."""
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        for index in range(len(seq.block_hashes), num_full):
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            block_hash = self._block_hash(seq, index, parent)
            block = seq.block_table[index]
            assert self._hashes[block] is None, f"block {block} registered twice"
            self._hashes[block] = block_hash
            self._cached.setdefault(block_hash, block)
            seq.block_hashes.append(block_hash)

    # ---- sequences --------------------------------------------------------------------------------
    def num_blocks_to_allocate(self, seq: Sequence, num_tokens: int | None = None) -> int:
        """Free blocks ``allocate(seq, num_tokens)`` would consume (cache hits on blocks in use are free)."""
        num_tokens = seq.num_tokens if num_tokens is None else num_tokens
        hits_in_use = sum(1 for block, _ in self._lookup(seq, num_tokens) if self._ref_counts[block] > 0)
        return self.num_blocks_for(num_tokens) - hits_in_use

    def can_allocate(self, seq: Sequence, num_tokens: int | None = None) -> bool:
        """Whether blocks for the first ``num_tokens`` positions (default: all tokens) are available."""
        return self.num_blocks_to_allocate(seq, num_tokens) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_tokens: int | None = None) -> None:
        """Give a sequence without blocks its cached prefix plus fresh blocks up to ``num_tokens``.

        Sets ``seq.num_cached_tokens`` and ``seq.num_computed_tokens`` to the cache hit (a multiple of
        the block size, always < ``num_tokens``). Call :meth:`can_allocate` first.
        """
        assert not seq.block_table, f"{seq.request_id} already has blocks"
        num_tokens = seq.num_tokens if num_tokens is None else num_tokens
        assert 0 < num_tokens <= seq.num_tokens, (num_tokens, seq.num_tokens)
        hits = self._lookup(seq, num_tokens)
        needed = self.num_blocks_for(num_tokens) - sum(1 for b, _ in hits if self._ref_counts[b] > 0)
        assert needed <= self.num_free_blocks, "allocate() without can_allocate()"
        for block, block_hash in hits:
            if self._ref_counts[block] == 0:
                del self._free_cached[block]
            self._ref_counts[block] += 1
            seq.block_table.append(block)
            seq.block_hashes.append(block_hash)
        while len(seq.block_table) < self.num_blocks_for(num_tokens):
            seq.block_table.append(self._take_block())
        seq.num_cached_tokens = seq.num_computed_tokens = len(hits) * self.block_size

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Whether slots for ``num_new_tokens`` more positions after the computed ones are available."""
        needed = self.num_blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return needed <= self.num_free_blocks

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> None:
        """Make room for positions ``[num_computed_tokens, num_computed_tokens + num_new_tokens)``.

        Registers blocks that became full and computed since the last call, then adds fresh blocks as
        needed. Call :meth:`can_append` first.
        """
        self.cache_computed_blocks(seq)
        target = self.num_blocks_for(seq.num_computed_tokens + num_new_tokens)
        assert target - len(seq.block_table) <= self.num_free_blocks, "append_slots() without can_append()"
        while len(seq.block_table) < target:
            seq.block_table.append(self._take_block())

    def free(self, seq: Sequence) -> None:
        """Release a sequence's blocks (tail first); its computed full blocks stay in the prefix cache."""
        self.cache_computed_blocks(seq)
        for block in reversed(seq.block_table):
            self._release_block(block)
        seq.block_table.clear()
        seq.block_hashes.clear()

    def slot(self, seq: Sequence, position: int) -> int:
        """The KV-cache slot of a position of the sequence."""
        block_index, offset = divmod(position, self.block_size)
        return seq.block_table[block_index] * self.block_size + offset

    def slot_mapping(self, seq: Sequence, start: int, end: int) -> list[int]:
        """The slots of positions ``[start, end)``."""
        return [self.slot(seq, p) for p in range(start, end)]
