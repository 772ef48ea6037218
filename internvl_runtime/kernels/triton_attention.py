"""Causal attention over the paged KV cache in one Triton kernel, reading the block table on the device.

Why: the decoder's torch attention (``models.layers.attention.paged_attention``) gathers every sequence's
keys and values into a padded tensor for decode, and runs SDPA with an explicit mask (the math backend on
a GPU) for a prefill over a cached prefix. This kernel does both, and mixed batches, in one launch: each
program looks its sequence's slots up in the block table itself, so nothing is gathered, nothing is
padded, and the host computes no per-step index tensors. A decode batch too small to fill the GPU splits
each context in segments and merges them in a second, small kernel (flash-decoding). The design follows
vLLM's "unified" Triton attention (``triton_unified_attention.py``, its 2D and 3D kernels); the code is
ours.

Layout (the one ``models.layers.attention`` documents)::

    q, out                  (T, H, D)   this step's tokens, sequence i at rows query_start_loc[i]:query_start_loc[i+1]
    key_cache, value_cache  (num_slots, KV, D), num_slots = num_blocks * block_size
    slot of position p of sequence i = block_tables[i, p // block_size] * block_size + p % block_size

The launches read only host integers (tensor shapes, ``max_query_len``, ``block_size``): no ``.item()``,
no host sync, so they can be captured in a CUDA graph for fixed shapes and ``max_query_len`` (run the
call once before capturing: triton compiles a kernel on its first launch with new constants).

Triton is optional: importing this module never imports it. ``unified_attention`` runs the kernel where
it can (a CUDA tensor, or any tensor under ``TRITON_INTERPRET=1``, which is how the tests run it on the
CPU) and ``unified_attention_reference`` (torch, same signature, same results up to rounding) elsewhere.

Use::

    from internvl_runtime.kernels.triton_attention import unified_attention
    unified_attention(q, key_cache, value_cache, out, block_tables=bt, seq_lens=lens,
                      query_start_loc=starts, max_query_len=1, block_size=16, scale=d ** -0.5)

GPT-OSS's layers add ``sinks=`` (one logit per query head, in the softmax's denominator only) and, on its
sliding layers, ``window=`` (the query at position i sees keys i - window < j <= i), as transformers'
eager GPT-OSS attention (``models.layers.attention.sink_window_attention``) computes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import _triton_support
from ._triton_support import KernelCall, triton_available

_KERNELS = "_triton_attention_kernel"
_LOG2_E = math.log2(math.e)                             # exp(x) == exp2(x * log2(e))


def kernel_runs_on(device: torch.device) -> bool:
    """Whether ``unified_attention`` runs the Triton kernel for tensors on ``device`` (else the reference):
    triton is installed and either ``device`` is a GPU or triton interprets kernels (``TRITON_INTERPRET=1``
    when the kernel was first loaded)."""
    return _triton_support.runs_on(device, _KERNELS)


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@dataclass(frozen=True)
class LaunchConfig:
    """Block sizes of one launch (all powers of two, as ``tl.arange`` and ``tl.dot`` want).

    ``block_m`` rows per program = ``block_q`` query tokens x the query heads sharing one KV head (rows
    past ``block_q * group`` are masked, e.g. for a group of 7); ``tile_n`` context positions per step of
    the online softmax; ``head_dim_padded`` >= 16 (``tl.dot``'s smallest inner size) with the columns past
    the head dimension masked; ``num_segments`` runs of the context computed by separate programs and
    merged by a second kernel (1: none).
    """

    block_m: int
    block_q: int
    tile_n: int
    head_dim_padded: int
    num_segments: int


#: A decode launch of fewer programs (sequences x KV heads) than this splits each context in
#: ``SPLIT_SEGMENTS`` runs: one program per KV head leaves most of a GPU idle (an H100 has 132 SMs).
SPLIT_BELOW_PROGRAMS = 128
SPLIT_SEGMENTS = 16


def launch_config(*, num_queries_per_kv: int, max_query_len: int, head_dim: int, num_seqs: int,
                  num_kv_heads: int) -> LaunchConfig:
    """Block sizes from host integers only. Decode (one query per sequence) takes the smallest tile of
    rows (16: the group, padded); a prefill up to 64 rows, so that a long prompt is not split into
    thousands of programs nor a short chunk padded to a large one. Small decode batches split their
    contexts (flash-decoding); prefills have programs enough."""
    group_rows = _next_power_of_2(num_queries_per_kv)
    block_m = max(16, group_rows, min(64, _next_power_of_2(max(max_query_len, 1) * num_queries_per_kv)))
    split = max_query_len <= 1 and num_seqs * num_kv_heads < SPLIT_BELOW_PROGRAMS
    return LaunchConfig(block_m=block_m, block_q=block_m // num_queries_per_kv,
                        tile_n=32 if max_query_len <= 1 else 64,
                        head_dim_padded=max(16, _next_power_of_2(head_dim)),
                        num_segments=SPLIT_SEGMENTS if split else 1)


def _check_shapes(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, out: torch.Tensor,
                  block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                  sinks: torch.Tensor | None = None, window: int | None = None) -> None:
    """Shapes and dtypes only (metadata, no device read): the caller is the runner, so these are invariants."""
    assert sinks is None or (sinks.shape == (q.shape[1],) and sinks.is_contiguous()), (None if sinks is None
                                                                                         else sinks.shape)
    assert window is None or window >= 1, window
    assert q.dim() == 3 and out.shape == q.shape and out.dtype == q.dtype, (q.shape, out.shape)
    assert key_cache.dim() == 3 and value_cache.shape == key_cache.shape, (key_cache.shape, value_cache.shape)
    assert key_cache.shape[2] == q.shape[2] and q.shape[1] % key_cache.shape[1] == 0, (q.shape, key_cache.shape)
    assert key_cache.dtype == value_cache.dtype == q.dtype, (q.dtype, key_cache.dtype, value_cache.dtype)
    assert q.stride(2) == out.stride(2) == key_cache.stride(2) == value_cache.stride(2) == 1, "head_dim not contiguous"
    num_seqs = seq_lens.shape[0]
    assert block_tables.dim() == 2 and block_tables.shape[0] == num_seqs, (block_tables.shape, num_seqs)
    assert query_start_loc.shape == (num_seqs + 1,), (query_start_loc.shape, num_seqs)
    for t in (block_tables, seq_lens, query_start_loc):
        assert t.dtype == torch.int32, t.dtype
    assert block_tables.stride(1) == 1 and seq_lens.is_contiguous() and query_start_loc.is_contiguous()


def unified_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, out: torch.Tensor, *,
                      block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                      max_query_len: int, block_size: int, scale: float, sinks: torch.Tensor | None = None,
                      window: int | None = None) -> torch.Tensor:
    """Causal paged attention of this step's queries over their sequences' cached keys and values; -> ``out``.

    q/out (T, H, D) with a contiguous last dimension (views of a fused qkv are fine); key_cache/value_cache
    (num_slots, KV, D) already holding this step's keys and values; block_tables (B, max_blocks) int32
    (padding never read); seq_lens (B,) int32, each sequence's length after this step; query_start_loc
    (B + 1,) int32; ``max_query_len`` >= every query length (a host int: it sizes the grid). Query j of
    sequence i sits at position seq_len - query_len + j and sees positions up to its own. H % KV == 0
    (query head h reads KV head h // (H // KV)); any D (padded to a power of two >= 16 in the kernel).
    Scores, softmax and the sum are fp32; probabilities meet V in its dtype; ``out`` gets q's dtype. A
    row that sees no position (a padded row with seq_len 0) is written as zeros; a sequence with no
    query rows writes nothing.

    ``sinks`` (H,) (any float dtype, read as fp32): head h's logit joins each of its rows' softmax as one
    more column, unscaled, that carries no value (the weights of a row sum to less than one). ``window``:
    query position i sees only keys j with i - window < j <= i (None: every earlier key).
    """
    _check_shapes(q, key_cache, value_cache, out, block_tables, seq_lens, query_start_loc, sinks, window)
    if not kernel_runs_on(q.device):
        return unified_attention_reference(q, key_cache, value_cache, out, block_tables=block_tables,
                                           seq_lens=seq_lens, query_start_loc=query_start_loc,
                                           max_query_len=max_query_len, block_size=block_size, scale=scale,
                                           sinks=sinks, window=window)
    if seq_lens.shape[0] == 0 or q.shape[0] == 0 or max_query_len <= 0:      # nothing to launch
        return out
    kernel = _triton_support.load(_KERNELS)
    for call in attention_kernel_calls(q, key_cache, value_cache, out, block_tables=block_tables,
                                       seq_lens=seq_lens, query_start_loc=query_start_loc,
                                       max_query_len=max_query_len, block_size=block_size, scale=scale,
                                       sinks=sinks, window=window, interpreted=kernel.INTERPRETED):
        call.launch(kernel)
    return out


def attention_kernel_calls(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                           out: torch.Tensor, *, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                           query_start_loc: torch.Tensor, max_query_len: int, block_size: int, scale: float,
                           interpreted: bool, sinks: torch.Tensor | None = None,
                           window: int | None = None) -> list[KernelCall]:
    """The kernel launches ``unified_attention`` makes (same arguments; ``max_query_len`` >= 1), as data:
    the attention kernel, then, where the context is split, the merge of the segments (with its fp32
    scratch tensors allocated here, on q's device). ``interpreted``: for triton's interpreter, whose bf16
    ``tl.dot`` needs its operands widened. ``sinks``/``window``: see ``unified_attention`` (without them the
    launches are the plain causal kernel's: the constexpr flags compile their code out)."""
    num_seqs, (num_tokens, num_heads, head_dim), num_kv_heads = seq_lens.shape[0], q.shape, key_cache.shape[1]
    group = num_heads // num_kv_heads
    config = launch_config(num_queries_per_kv=group, max_query_len=max_query_len, head_dim=head_dim,
                           num_seqs=num_seqs, num_kv_heads=num_kv_heads)
    segments = config.num_segments
    if segments > 1:
        partial_shape = (num_tokens, num_heads, segments)
        segment_max = torch.empty(partial_shape, dtype=torch.float32, device=q.device)
        segment_sum = torch.empty(partial_shape, dtype=torch.float32, device=q.device)
        segment_acc = torch.empty((*partial_shape, config.head_dim_padded), dtype=torch.float32, device=q.device)
    else:
        segment_max = segment_sum = segment_acc = out                      # not read by the kernel
    widen = interpreted and q.dtype == torch.bfloat16
    sinks_arg = q if sinks is None else sinks                              # not read without USE_SINKS
    calls = [KernelCall(
        kernel="unified_attention_kernel",
        grid=(num_seqs, -(-max_query_len // config.block_q), num_kv_heads * segments),
        args=(out, segment_max, segment_sum, segment_acc, q, key_cache, value_cache, block_tables, seq_lens,
              query_start_loc,
              sinks_arg,
              0 if window is None else window,
              scale * _LOG2_E,                            # the kernel exponentiates with exp2
              q.stride(0), q.stride(1),
              out.stride(0), out.stride(1),
              key_cache.stride(0), key_cache.stride(1),
              value_cache.stride(0), value_cache.stride(1),
              block_tables.stride(0),
              block_size,
              num_heads),
        constants=dict(NUM_SEGMENTS=segments,
                       NUM_QUERIES_PER_KV=group,
                       HEAD_DIM=head_dim,
                       HEAD_DIM_PAD=config.head_dim_padded,
                       USE_SINKS=sinks is not None,
                       USE_WINDOW=window is not None,
                       BLOCK_M=config.block_m,
                       BLOCK_Q=config.block_q,
                       TILE_N=config.tile_n,
                       DOT_PRECISION="ieee" if q.dtype == torch.float32 or widen else None,
                       DOT_IN_FP32=widen))]
    if segments > 1:
        calls.append(KernelCall(
            kernel="reduce_segments_kernel",
            grid=(num_tokens, num_heads),
            args=(out, segment_max, segment_sum, segment_acc, query_start_loc, sinks_arg, num_seqs, num_heads,
                  out.stride(0), out.stride(1)),
            constants=dict(NUM_SEGMENTS=segments, HEAD_DIM=head_dim, HEAD_DIM_PAD=config.head_dim_padded,
                           USE_SINKS=sinks is not None)))
    return calls


def unified_attention_reference(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                                out: torch.Tensor, *, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                                query_start_loc: torch.Tensor, max_query_len: int, block_size: int,
                                scale: float, sinks: torch.Tensor | None = None,
                                window: int | None = None) -> torch.Tensor:
    """``unified_attention`` in torch, one sequence at a time, all in fp32 (host syncs: tests and the
    fallback where the kernel cannot run). Same arguments, same result up to rounding."""
    _check_shapes(q, key_cache, value_cache, out, block_tables, seq_lens, query_start_loc, sinks, window)
    group = q.shape[1] // key_cache.shape[1]
    starts = query_start_loc.tolist()
    for i, seq_len in enumerate(seq_lens.tolist()):
        start, end = starts[i], starts[i + 1]
        if end <= start:
            continue
        assert end - start <= max_query_len, (end - start, max_query_len)
        positions = torch.arange(seq_len, device=q.device)
        blocks = block_tables[i, positions // block_size].long()
        slots = blocks * block_size + positions % block_size
        keys = key_cache[slots].float().repeat_interleave(group, dim=1)           # (S, H, D)
        values = value_cache[slots].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("lhd,shd->hls", q[start:end].float(), keys) * scale  # (H, L, S)
        query_pos = seq_len - (end - start) + torch.arange(end - start, device=q.device)
        visible = positions[None, :] <= query_pos[:, None]                        # (L, S)
        if window is not None:
            visible &= positions[None, :] > query_pos[:, None] - window
        scores = scores.masked_fill(~visible, float("-inf"))
        if sinks is not None:                     # one more column per head, dropped after the softmax
            column = sinks.float()[:, None, None].expand(-1, end - start, 1)
            probs = torch.softmax(torch.cat([scores, column], dim=-1), dim=-1)[..., :-1]
        else:
            probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        out[start:end] = torch.einsum("hls,shd->lhd", probs, values).to(out.dtype)
    return out


__all__ = [
    "KernelCall",
    "LaunchConfig",
    "SPLIT_BELOW_PROGRAMS",
    "SPLIT_SEGMENTS",
    "attention_kernel_calls",
    "kernel_runs_on",
    "launch_config",
    "triton_available",
    "unified_attention",
    "unified_attention_reference",
]
