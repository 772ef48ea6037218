"""KV-cache groups: which decoder layers share a block table, and what a sliding window still needs (pure Python).

vLLM's hybrid KV cache manager, reduced to what our decoders have. The layers are grouped by attention
kind (full attention, or a sliding window of W positions); a model with one kind has ONE group of every
layer, and everything is as without groups. With several kinds (GPT-OSS alternates "sliding_attention",
window 128, and "full_attention"), each kind's layers are cut into groups of equal size (the smallest
kind's layer count), full-attention groups first, and:

- every group has its own block table per sequence, its block ids drawn from ONE shared pool;
- the KV memory is ``pools`` tensors (per keys and values), ``pools`` = the group size: the i-th layer of
  every group writes the i-th tensor, each at the blocks its own group's tables give it, so a block id
  holds one group's KV for ``pools`` layers and a sliding group's block, once freed, can serve the full
  group (vLLM's uniform page size);
- in a sliding group, a block whose every slot lies before the window of the sequence's next token is
  given back to the pool as decode and chunked prefill advance; its table entry becomes the null block
  (block ``num_blocks``, one past the pool: allocated by the runner, never handed out nor written) so that
  table indices stay position-aligned.

THE window rule, in one place (``KVCacheGroup.first_needed_position``): the token at position p attends
to keys p - W < j <= p (``models.layers.attention.sink_window_attention``), so once ``num_computed``
tokens are in the cache the next token (position ``num_computed``) and every later one read nothing
before ``num_computed - W + 1``. Freeing (``num_skipped_blocks``), admission (``BlockManager``), prefix
hits (``hit_run``) and the memory plan (``max_blocks_per_sequence``) all derive from it.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class KVCacheGroup:
    """Decoder layers that share one block table per sequence: their indices and their window (None: full)."""

    layers: tuple[int, ...] = ()
    window: int | None = None

    def __post_init__(self) -> None:
        assert self.window is None or self.window >= 1, self.window

    def first_needed_position(self, num_computed: int) -> int:
        """The first position whose KV the tokens from ``num_computed`` on still read (0 for full attention)."""
        return 0 if self.window is None else max(0, num_computed - self.window + 1)

    def num_skipped_blocks(self, num_computed: int, block_size: int) -> int:
        """Leading blocks no token from ``num_computed`` on reads (each slot before the window): freeable."""
        return self.first_needed_position(num_computed) // block_size

    def hit_run(self, block_size: int) -> int:
        """Contiguous cached blocks a prefix-cache hit of a sliding group must end with: the window's keys
        before the first token computed after the hit (vLLM's ``sliding_window_contiguous_blocks``)."""
        return 0 if self.window is None else _cdiv(self.window - 1, block_size)

    def max_blocks(self, num_tokens: int, block_size: int, chunk: int) -> int:
        """The most blocks a sequence of ``num_tokens`` positions holds in this group at once, computed in
        steps of at most ``chunk`` tokens: all of them for full attention; for a window W, a step computing
        [c, c + k) holds the blocks from (c - W + 1) // bs to (c + k - 1) // bs."""
        blocks = _cdiv(num_tokens, block_size)
        if self.window is None:
            return blocks
        return min(blocks, _cdiv(self.window - 1 + min(chunk, num_tokens), block_size) + 1)


#: The one group of a model whose layers all attend fully (the block manager's default).
FULL_ATTENTION = (KVCacheGroup(),)


def kv_cache_groups(layer_windows: Sequence[int | None]) -> tuple[KVCacheGroup, ...]:
    """Group layers by window (``layer_windows[i]``: layer i's window, None for full attention).

    One kind: one group of every layer. Several: each kind's layers, in order, cut into groups of the
    smallest kind's layer count (a kind's last group may be shorter), full attention first, then windows
    ascending. GPT-OSS's 24 alternating layers -> (full: 1, 3, ..., 23), (window 128: 0, 2, ..., 22).
    """
    kinds: dict[int | None, list[int]] = {}
    for index, window in enumerate(layer_windows):
        kinds.setdefault(window, []).append(index)
    if len(kinds) <= 1:
        window = next(iter(kinds), None)
        return (KVCacheGroup(tuple(range(len(layer_windows))), window),)
    size = min(len(layers) for layers in kinds.values())
    groups = []
    for window in sorted(kinds, key=lambda w: (w is not None, w or 0)):
        layers = kinds[window]
        groups += [KVCacheGroup(tuple(layers[i:i + size]), window) for i in range(0, len(layers), size)]
    return tuple(groups)


def layer_slots(groups: Sequence[KVCacheGroup], num_layers: int) -> tuple[list[int], list[int]]:
    """(group of each layer, pool of each layer): layer i of a group writes pool i. Every layer must be in
    exactly one group."""
    group_of, pool_of = [-1] * num_layers, [-1] * num_layers
    for g, group in enumerate(groups):
        for i, layer in enumerate(group.layers):
            assert group_of[layer] == -1, f"layer {layer} is in two KV groups"
            group_of[layer], pool_of[layer] = g, i
    assert -1 not in group_of, f"layers without a KV group: {[i for i, g in enumerate(group_of) if g == -1]}"
    return group_of, pool_of


def distinct_pools(pool_of: Sequence[int], devices: Sequence[Hashable]) -> list[tuple[int, Hashable]]:
    """The KV tensors to allocate: one per (pool, device) pair, in layer order (two layers sharing a pool
    but placed on different devices get one tensor each)."""
    return list(dict.fromkeys(zip(pool_of, devices, strict=True)))


def max_blocks_per_sequence(groups: Sequence[KVCacheGroup], num_tokens: int, block_size: int, chunk: int) -> int:
    """Blocks of the shared pool one sequence of ``num_tokens`` positions holds at most (every group)."""
    return sum(group.max_blocks(num_tokens, block_size, chunk) for group in groups)


def max_sequence_tokens(groups: Sequence[KVCacheGroup], num_blocks: int, block_size: int, chunk: int) -> int:
    """The longest sequence (in KV positions) whose blocks fit in ``num_blocks`` (0 if not even one does)."""
    lo, hi = 0, num_blocks * block_size        # every group needs at least ceil(n / bs) / groups blocks
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if max_blocks_per_sequence(groups, mid, block_size, chunk) <= num_blocks:
            lo = mid
        else:
            hi = mid - 1
    return lo
