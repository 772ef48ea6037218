"""Causal self-attention over a paged KV cache (the native kernel or ``scaled_dot_product_attention``).

A step's tokens from B sequences are flattened to T rows (no padding). Each layer owns one KV pool of
shape (num_slots, num_kv_heads, head_dim) for keys and one for values, where num_slots = num_blocks *
block_size; a token's slot is block_table[pos // block_size] * block_size + pos % block_size.
The engine's block manager decides the slots; the model only reads and writes them.

Two shapes of step:
- decode (every sequence adds one token): keys/values of all B sequences are gathered from the pool
  into a (B, kv_heads, S_max, D) view with a padding mask, and one SDPA call serves the whole batch.
- prefill / mixed: per sequence, over its new tokens (``kernels.causal_attention``: native on the
  avx512bf16 path, else SDPA); when nothing is cached yet the fresh k/v are used directly, else the
  sequence's context is read from the pool, the cached prefix before the new tokens.
GQA is handled by the kernel's head mapping or SDPA's ``enable_gqa`` (no repeated copies of k/v).

That is the "torch" attention backend. The "triton" backend (``kernels.triton_attention``) serves every
shape of step in one call from device tensors only (block tables, lengths, query starts), which is what
a CUDA graph can capture. The model runner chooses the backend once and names it in the metadata.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ... import kernels
from .lazy_zeros import lazy_zeros


@dataclass
class KVCache:
    """One (keys, values) pool per decoder layer. Shapes: (num_slots, num_kv_heads, head_dim).

    KV groups (the engine's ``kv_groups``: layers that share one block table per sequence; a model with
    sliding-window layers has several): ``layer_groups[i]`` is layer i's group, whose block tables and slots
    its attention reads (``AttentionMetadata.for_group``); layers of different groups may share one pool
    tensor (``keys[i] is keys[j]``), each writing the blocks its own group's tables give it. Empty: one group.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    block_size: int
    #: Blocks past ``num_blocks`` that no sequence gets: padded rows of a CUDA-graph batch write there.
    scratch_blocks: int = 0
    layer_groups: tuple[int, ...] = ()

    @classmethod
    def allocate(cls, *, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype,
                 device: torch.device | str | Sequence[torch.device | str], scratch_blocks: int = 0,
                 layer_groups: Sequence[int] = (), layer_pools: Sequence[int] | None = None) -> KVCache:
        """``device``: one for all layers, or one per layer (a model split over devices). ``layer_pools``:
        the pool of each layer (layers with the same pool on the same device share one tensor; None: a pool
        per layer); ``layer_groups``: each layer's KV group."""
        shape = ((num_blocks + scratch_blocks) * block_size, num_kv_heads, head_dim)
        devices = [device] * num_layers if isinstance(device, (str, torch.device)) else list(device)
        assert len(devices) == num_layers, (len(devices), num_layers)
        pools = list(range(num_layers)) if layer_pools is None else list(layer_pools)
        keys: dict[tuple[int, str], torch.Tensor] = {}
        values: dict[tuple[int, str], torch.Tensor] = {}
        for pool, d in zip(pools, devices, strict=True):
            key = (pool, str(d))
            if key not in keys:
                # zeros either way; on the CPU a page is resident only once a token is stored in it
                keys[key] = lazy_zeros(shape, dtype=dtype, device=d)
                values[key] = lazy_zeros(shape, dtype=dtype, device=d)
        return cls(keys=[keys[p, str(d)] for p, d in zip(pools, devices, strict=True)],
                   values=[values[p, str(d)] for p, d in zip(pools, devices, strict=True)],
                   block_size=block_size, scratch_blocks=scratch_blocks, layer_groups=tuple(layer_groups))

    @property
    def num_blocks(self) -> int:
        """Blocks sequences may use (the scratch blocks not counted)."""
        return self.keys[0].shape[0] // self.block_size - self.scratch_blocks if self.keys else 0

    @property
    def num_groups(self) -> int:
        """KV groups (1 without ``layer_groups``)."""
        return max(self.layer_groups, default=0) + 1

    def group_of(self, layer: int) -> int:
        """Layer ``layer``'s KV group."""
        return self.layer_groups[layer] if self.layer_groups else 0

    def bytes_per_block(self) -> int:
        k = self.keys[0]
        pools = len({id(t) for t in self.keys})
        return 2 * pools * self.block_size * k.shape[1] * k.shape[2] * k.element_size()


@dataclass
class AttentionMetadata:
    """What one forward step needs to know about its sequences (built once per step, shared by layers).

    Host lists (the torch backend's per-sequence plan): query_lens[i] new tokens of sequence i are rows
    query_starts[i]:query_starts[i]+query_lens[i] of the flattened batch; seq_lens[i] is its total length
    once they are added. context_slots[i] (seq_lens[i],) holds the slots of all its tokens in order, or
    None where ``context_ranges[i]`` gives them as one contiguous (start, length) run of the pool (the
    common case: then attention reads a view, no gather), or where both are None, ``block_tables`` does.

    Device tensors (built by the model runner from one host->device copy per step): slot_mapping (T,)
    long, the pool slot of every new token; block_tables (B, W) int32 (W: enough blocks for the longest
    sequence); seq_lens_tensor (B,) int32; query_start_loc (B + 1,) int32; rope_rows (T,) long, each
    token's inv_freq row (``rotary.RotaryEmbedding.plan``; None: derived in the forward) with
    ``rope_extra_bases`` completing that table. The triton backend reads only these (and
    ``max_query_len``, ``block_size``): under a CUDA graph the host lists are the captured step's, not
    the replayed one's.

    KV groups: this object is group 0's; ``group_metadata`` holds one per later group (the same step, that
    group's slots and block tables), which ``for_group`` hands to the layers of that group.
    """

    query_lens: list[int]
    seq_lens: list[int]
    slot_mapping: torch.Tensor
    context_slots: list[torch.Tensor | None] = field(default_factory=list)
    context_ranges: list[tuple[int, int] | None] = field(default_factory=list)
    attention_backend: str = "torch"
    block_tables: torch.Tensor | None = None
    seq_lens_tensor: torch.Tensor | None = None
    query_start_loc: torch.Tensor | None = None
    block_size: int = 0
    rope_rows: torch.Tensor | None = None
    rope_extra_bases: tuple[float, ...] = ()
    group_metadata: tuple[AttentionMetadata, ...] = ()
    query_starts: list[int] = field(init=False)
    is_decode: bool = field(init=False)
    max_query_len: int = field(init=False)
    _decode_gather: torch.Tensor | None = field(default=None, init=False, repr=False)
    _decode_mask: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        starts, total = [], 0
        for n in self.query_lens:
            starts.append(total)
            total += n
        self.query_starts = starts
        self.max_query_len = max(self.query_lens, default=0)
        self.is_decode = all(n == 1 for n in self.query_lens)
        if not self.context_ranges:
            self.context_ranges = [None] * len(self.query_lens)
        if not self.context_slots:
            self.context_slots = [None] * len(self.query_lens)
        if self.attention_backend == "triton":
            assert self.block_tables is not None and self.seq_lens_tensor is not None
            assert self.query_start_loc is not None and self.block_size > 0

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    def for_group(self, group: int) -> AttentionMetadata:
        """The metadata of KV group ``group`` (this object for group 0)."""
        return self if group == 0 else self.group_metadata[group - 1]

    def _block_slots(self, i: int) -> torch.Tensor:
        """Sequence i's slots in order, from its block table row (device ops only)."""
        assert self.block_tables is not None, "no context slots, range or block table for a sequence"
        bs, n = self.block_size, self.seq_lens[i]
        blocks = self.block_tables[i, : -(-n // bs)].to(torch.long)
        return (blocks[:, None] * bs + torch.arange(bs, device=blocks.device)).flatten()[:n]

    def context(self, cache: torch.Tensor, i: int, start: int = 0) -> torch.Tensor:
        """Sequence i's keys or values from a pool from position ``start`` on: (seq_len - start, KV, D), a
        view when contiguous (a sliding window reads only its positions: the ones before may be freed)."""
        run = self.context_ranges[i]
        if run is not None:
            return cache.narrow(0, run[0] + start, run[1] - start)
        slots = self.context_slots[i]
        slots = slots if slots is not None else self._block_slots(i)
        return cache.index_select(0, slots[start:])

    def decode_gather(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S_max) slot indices and a (B, 1, 1, S_max) additive float mask (-inf past each length)."""
        if self._decode_gather is None:
            s_max = max(self.seq_lens)
            device = self.slot_mapping.device
            if self.block_tables is not None and self.seq_lens_tensor is not None:
                bs = self.block_size
                cols = torch.arange(s_max, device=device)
                blocks = self.block_tables.to(torch.long)[:, cols // bs]          # (B, S_max)
                gather = blocks * bs + cols % bs
                lens = self.seq_lens_tensor
            else:
                gather = torch.zeros((self.num_seqs, s_max), dtype=torch.long, device=device)
                for i in range(self.num_seqs):
                    run = self.context_ranges[i]
                    if run is not None:
                        gather[i, : run[1]] = torch.arange(run[0], run[0] + run[1], device=device)
                    else:
                        slots = self.context_slots[i]
                        assert slots is not None
                        gather[i, : slots.shape[0]] = slots
                lens = torch.tensor(self.seq_lens, device=device)
            valid = torch.arange(s_max, device=device)[None, :] < lens[:, None]
            mask = torch.zeros((self.num_seqs, s_max), dtype=torch.float32, device=device)
            self._decode_mask = mask.masked_fill_(~valid, float("-inf"))[:, None, None, :]
            self._decode_gather = gather
        assert self._decode_mask is not None
        return self._decode_gather, self._decode_mask


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """One query per sequence, grouped-query attention as two small matmuls.

    q: (B, H, D); keys/values: (B, S, KV, D) (views allowed) -> (B, H, D). Scores are computed in the
    activation dtype and soft-maxed in float32, as the reference eager attention does. Cheaper than
    SDPA's kernel for a single query, and no repeated copies of the KV heads.
    """
    b, h, d = q.shape
    kv = keys.shape[2]
    q = q.view(b, kv, h // kv, d)                                   # (B, KV, G, D)
    scores = torch.matmul(q, keys.permute(0, 2, 3, 1)) * scale      # (B, KV, G, S)
    scores = scores.float()
    if mask is not None:
        scores = scores + mask
    probs = torch.softmax(scores, dim=-1).to(values.dtype)
    out = torch.matmul(probs, values.permute(0, 2, 1, 3))           # (B, KV, G, D)
    return out.reshape(b, h, d)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, key_cache: torch.Tensor,
                    value_cache: torch.Tensor, meta: AttentionMetadata, scale: float | None = None) -> torch.Tensor:
    """q: (T, H, D), k/v: (T, KV, D) for this step's tokens -> (T, H, D).

    Writes k/v into the pools at meta.slot_mapping, then attends causally over each sequence's context.
    """
    key_cache.index_copy_(0, meta.slot_mapping, k)
    value_cache.index_copy_(0, meta.slot_mapping, v)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if meta.attention_backend == "triton":
        # imported here: the kernel module may import triton, which the package does not require
        from ...kernels.triton_attention import unified_attention
        assert meta.block_tables is not None and meta.seq_lens_tensor is not None
        assert meta.query_start_loc is not None
        return unified_attention(q, key_cache, value_cache, torch.empty_like(q), block_tables=meta.block_tables,
                                 seq_lens=meta.seq_lens_tensor, query_start_loc=meta.query_start_loc,
                                 max_query_len=meta.max_query_len, block_size=meta.block_size, scale=scale)

    if meta.is_decode:
        if meta.num_seqs == 1:
            keys = meta.context(key_cache, 0).unsqueeze(0)          # (1, S, KV, D)
            values = meta.context(value_cache, 0).unsqueeze(0)
            return decode_attention(q, keys, values, scale)
        gather, mask = meta.decode_gather()
        return decode_attention(q, key_cache[gather], value_cache[gather], scale, mask)

    outputs = []
    for i, (start, qlen, slen) in enumerate(zip(meta.query_starts, meta.query_lens, meta.seq_lens, strict=True)):
        if qlen == slen:                                                    # nothing cached before
            keys, values = k[start:start + qlen], v[start:start + qlen]     # (L, KV, D)
        elif qlen == 1:
            outputs.append(decode_attention(q[start:start + 1], meta.context(key_cache, i).unsqueeze(0),
                                            meta.context(value_cache, i).unsqueeze(0), scale))
            continue
        else:
            keys, values = meta.context(key_cache, i), meta.context(value_cache, i)   # (S, KV, D)
        outputs.append(kernels.causal_attention(q[start:start + qlen], keys, values, scale))   # (L, H, D)
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)


def sink_window_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, *, scale: float,
                          first_position: int, key_start: int = 0, sinks: torch.Tensor | None = None,
                          window: int | None = None) -> torch.Tensor:
    """Causal attention of one sequence's queries with attention sinks and a sliding window, eagerly, as
    transformers' GPT-OSS ``eager_attention_forward`` computes it.

    q: (L, H, D), the queries at positions ``first_position`` .. + L - 1; keys/values: (S, KV, D), the keys
    at positions ``key_start`` .. + S - 1 (the caller may leave out keys no query sees). Query i sees key j
    when j <= i and, with a ``window``, j > i - window (transformers' sliding-window overlay). ``sinks``
    (H,): one learned logit per head joins each row's softmax as an extra column and is dropped after it,
    so the weights of a row sum to less than one. Scores and the softmax are in the activations' dtype
    (the reference softmax runs in the logits' dtype), max-subtracted first.
    """
    L, H, D = q.shape
    S, KV = keys.shape[0], keys.shape[1]
    G = H // KV
    query = q.reshape(L, KV, G, D).permute(1, 2, 0, 3)                       # (KV, G, L, D)
    scores = torch.matmul(query, keys.permute(1, 2, 0).unsqueeze(1)) * scale  # (KV, G, L, S)
    rows = torch.arange(L, device=q.device)[:, None] + first_position
    cols = torch.arange(S, device=q.device)[None, :] + key_start
    visible = cols <= rows
    if window is not None:
        visible &= cols > rows - window
    scores = scores.masked_fill(~visible, float("-inf"))
    if sinks is not None:
        column = sinks.to(scores.dtype).reshape(KV, G, 1, 1).expand(KV, G, L, 1)
        scores = torch.cat([scores, column], dim=-1)
    scores = scores - scores.max(dim=-1, keepdim=True).values
    probs = torch.softmax(scores, dim=-1, dtype=scores.dtype)
    if sinks is not None:
        probs = probs[..., :-1]
    out = torch.matmul(probs.to(values.dtype), values.permute(1, 0, 2).unsqueeze(1))  # (KV, G, L, D)
    return out.permute(2, 0, 1, 3).reshape(L, H, D)


def paged_sink_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, key_cache: torch.Tensor,
                         value_cache: torch.Tensor, meta: AttentionMetadata, sinks: torch.Tensor | None,
                         window: int | None, scale: float | None = None) -> torch.Tensor:
    """``paged_attention`` for a layer with attention sinks and/or a sliding window (GPT-OSS).

    Writes k/v into the pools, then, on the torch backend, per sequence attends over its context from the
    pool (a sliding layer reads only the last ``window - 1`` keys before its first new token: older ones
    are never visible); on the triton backend the kernel does the whole step, sinks and window included.
    """
    key_cache.index_copy_(0, meta.slot_mapping, k)
    value_cache.index_copy_(0, meta.slot_mapping, v)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if meta.attention_backend == "triton":
        from ...kernels.triton_attention import unified_attention
        assert meta.block_tables is not None and meta.seq_lens_tensor is not None
        assert meta.query_start_loc is not None
        return unified_attention(q, key_cache, value_cache, torch.empty_like(q), block_tables=meta.block_tables,
                                 seq_lens=meta.seq_lens_tensor, query_start_loc=meta.query_start_loc,
                                 max_query_len=meta.max_query_len, block_size=meta.block_size, scale=scale,
                                 sinks=sinks, window=window)
    outputs = []
    for i, (start, qlen, slen) in enumerate(zip(meta.query_starts, meta.query_lens, meta.seq_lens, strict=True)):
        first = slen - qlen
        key_start = max(0, first - window + 1) if window is not None else 0
        keys = meta.context(key_cache, i, key_start)
        values = meta.context(value_cache, i, key_start)
        outputs.append(sink_window_attention(q[start:start + qlen], keys, values, scale=scale,
                                             first_position=first, key_start=key_start, sinks=sinks,
                                             window=window))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)
