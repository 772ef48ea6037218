"""The Triton program behind ``triton_attention.unified_attention`` (imported only when triton is).

Kept apart from ``triton_attention.py`` so that importing that module (and so the package) never imports
triton: this module is loaded on the first kernel launch. ``INTERPRETED`` records whether triton compiled
the kernel for the device or wrapped it in its CPU interpreter (``TRITON_INTERPRET=1``, read by
``triton.jit`` when the kernel below is defined, i.e. when this module is imported).

The interpreter multiplies bf16 tensors by their raw 16-bit patterns in ``tl.dot`` (triton 3.9 stores
bf16 as uint16 in numpy): under it, ``DOT_IN_FP32`` widens bf16 operands first. That is the GPU's
arithmetic too (bf16 x bf16 products are exact in fp32, summed in fp32), so the tests check the same
numbers the device computes, up to summation order.

One program computes BLOCK_Q query tokens of one sequence against one KV head, for the
NUM_QUERIES_PER_KV query heads that share that KV head (GQA): its BLOCK_M rows are
(query token, head in group) pairs, row m = token m // NUM_QUERIES_PER_KV, head m % NUM_QUERIES_PER_KV,
so one K/V tile read from the pool serves the whole group. The program walks the sequence's context in
tiles of TILE_N positions, looking each position's slot up in the block table on the device, and keeps
an online softmax (running max, running sum, fp32 accumulator) as flash attention does.

Split context (flash-decoding), for decode batches too small to fill the GPU (B x KV programs, e.g. 2 for
one sequence of the 1B model): with NUM_SEGMENTS > 1 each program takes one of NUM_SEGMENTS equal runs of
its sequence's tiles and writes its unnormalised partial result (max, sum, accumulator; fp32) instead of
the output; ``reduce_segments_kernel`` then merges the segments of each (token, head) into the output.

Attention sinks and sliding windows (GPT-OSS), each behind a constexpr flag so that the plain causal
kernel compiles to the same code without them: a sink is one logit per query head that joins the
softmax's denominator (exp(sink - max)) and adds nothing to the numerator; it starts the online softmax
(running max = the sink, running sum = 1) or, with the context split, enters once in the merge. A window
of W keeps key j for the query at position i only when i - W < j <= i; the loop starts at the tile of
the first key the block's first query sees, so the keys before the window are never read.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton import knobs

#: True when ``triton.jit`` below made an interpreted (CPU, numpy) function rather than a device kernel.
INTERPRETED: bool = bool(knobs.runtime.interpret)


@triton.jit
def unified_attention_kernel(
    out_ptr,                      # (T, H, D)
    segment_max_ptr,              # (T, H, NUM_SEGMENTS) fp32, when NUM_SEGMENTS > 1 (else unused)
    segment_sum_ptr,              # (T, H, NUM_SEGMENTS) fp32
    segment_acc_ptr,              # (T, H, NUM_SEGMENTS, HEAD_DIM_PAD) fp32
    q_ptr,                        # (T, H, D)
    key_cache_ptr,                # (num_slots, KV, D)
    value_cache_ptr,              # (num_slots, KV, D)
    block_tables_ptr,             # (B, max_blocks) int32
    seq_lens_ptr,                 # (B,) int32
    query_start_loc_ptr,          # (B + 1,) int32
    sinks_ptr,                    # (H,) per-head sink logits, when USE_SINKS (else unused)
    window,                       # sliding window in positions, when USE_WINDOW (else unused)
    scale_log2,                   # softmax scale * log2(e): the kernel exponentiates with exp2
    stride_q_t, stride_q_h,
    stride_o_t, stride_o_h,
    stride_k_s, stride_k_h,
    stride_v_s, stride_v_h,
    stride_bt,
    block_size,
    num_heads,
    NUM_SEGMENTS: tl.constexpr,   # 1: write the output; > 1 (a power of two): write partials per segment
    NUM_QUERIES_PER_KV: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,   # power of two >= 16 (tl.dot's smallest K); columns >= HEAD_DIM masked
    USE_SINKS: tl.constexpr,      # the sink enters here with one segment; in the merge when split
    USE_WINDOW: tl.constexpr,
    BLOCK_M: tl.constexpr,        # power of two >= 16; BLOCK_Q * NUM_QUERIES_PER_KV <= BLOCK_M
    BLOCK_Q: tl.constexpr,
    TILE_N: tl.constexpr,         # power of two >= 16
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 inputs (no tf32 rounding), else None (the default)
    DOT_IN_FP32: tl.constexpr,    # widen bf16 operands before tl.dot: the interpreter's bf16 dot is wrong
):
    seq = tl.program_id(0)
    q_block = tl.program_id(1)
    kv_head = tl.program_id(2) // NUM_SEGMENTS
    segment = tl.program_id(2) % NUM_SEGMENTS

    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if q_block * BLOCK_Q >= q_len:            # the grid is sized for the longest query of the batch
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len             # tokens cached before this step

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    q_index = q_block * BLOCK_Q + offs_m // NUM_QUERIES_PER_KV           # query token within the sequence
    head = kv_head * NUM_QUERIES_PER_KV + offs_m % NUM_QUERIES_PER_KV
    row_ok = (offs_m < BLOCK_Q * NUM_QUERIES_PER_KV) & (q_index < q_len)
    d_ok = offs_d < HEAD_DIM
    q_pos = context_len + q_index                                         # absolute position of each row

    token = (q_start + q_index).to(tl.int64)
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + token[:, None] * stride_q_t + head[:, None] * stride_q_h + offs_d[None, :],
                mask=q_mask, other=0.0)                                   # (BLOCK_M, HEAD_DIM_PAD)
    if DOT_IN_FP32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if USE_SINKS and NUM_SEGMENTS == 1:
        # the sink's column in the online softmax: max = the sink (log2 units), sum = 2^0, no value
        m_i = tl.load(sinks_ptr + head).to(tl.float32) * 1.4426950408889634
        l_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)

    # Causal: the last query of this block sees positions < kv_end; no tile past it is read. kv_end <=
    # seq_len always, and <= 0 for a padded row (seq_len 0): then no tile is read and the row is zeros.
    kv_end = context_len + tl.minimum(q_len, (q_block + 1) * BLOCK_Q)
    num_tiles = tl.cdiv(tl.maximum(kv_end, 0), TILE_N)
    start_tile = 0
    if USE_WINDOW:
        # the block's first query (the lowest position) sees keys from q_lo - window + 1: skip the tiles before
        q_lo = context_len + q_block * BLOCK_Q
        start_tile = tl.maximum(q_lo - window + 1, 0) // TILE_N
    tiles_per_segment = tl.cdiv(num_tiles - start_tile, NUM_SEGMENTS)
    first_tile = start_tile + segment * tiles_per_segment
    for tile in range(first_tile, tl.minimum(first_tile + tiles_per_segment, num_tiles)):
        offs_n = tile * TILE_N + tl.arange(0, TILE_N)
        n_ok = offs_n < kv_end
        block = tl.load(block_tables_ptr + seq * stride_bt + offs_n // block_size, mask=n_ok, other=0)
        slot = block.to(tl.int64) * block_size + offs_n % block_size
        k = tl.load(key_cache_ptr + slot[None, :] * stride_k_s + kv_head * stride_k_h + offs_d[:, None],
                    mask=n_ok[None, :] & d_ok[:, None], other=0.0)        # (HEAD_DIM_PAD, TILE_N)
        v = tl.load(value_cache_ptr + slot[:, None] * stride_v_s + kv_head * stride_v_h + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)        # (TILE_N, HEAD_DIM_PAD)

        if DOT_IN_FP32:
            k = k.to(tl.float32)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * scale_log2      # (BLOCK_M, TILE_N) fp32
        visible = n_ok[None, :] & (offs_n[None, :] <= q_pos[:, None])
        if USE_WINDOW:
            visible = visible & (offs_n[None, :] > q_pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row that has seen no visible key yet keeps max -inf: subtract 0 instead (no inf - inf NaN).
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        p = p.to(v.dtype)                     # probabilities meet V in its dtype, as the torch decode does
        if DOT_IN_FP32:
            p = p.to(tl.float32)
            v = v.to(tl.float32)
        acc += tl.dot(p, v, input_precision=DOT_PRECISION)
        m_i = m_new

    if NUM_SEGMENTS == 1:
        acc = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        tl.store(out_ptr + token[:, None] * stride_o_t + head[:, None] * stride_o_h + offs_d[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=q_mask)
    else:
        # every segment writes, an empty one too (max -inf, sum 0): the merge reads them all
        partial = (token * num_heads + head) * NUM_SEGMENTS + segment                   # (BLOCK_M,)
        tl.store(segment_max_ptr + partial, m_i, mask=row_ok)
        tl.store(segment_sum_ptr + partial, l_i, mask=row_ok)
        tl.store(segment_acc_ptr + partial[:, None] * HEAD_DIM_PAD + offs_d[None, :], acc,
                 mask=row_ok[:, None])


@triton.jit
def reduce_segments_kernel(
    out_ptr,                      # (T, H, D)
    segment_max_ptr,              # (T, H, NUM_SEGMENTS) fp32, in the kernel's log2 units
    segment_sum_ptr,              # (T, H, NUM_SEGMENTS) fp32
    segment_acc_ptr,              # (T, H, NUM_SEGMENTS, HEAD_DIM_PAD) fp32
    query_start_loc_ptr,          # (B + 1,) int32: rows past query_start_loc[B] belong to no sequence
    sinks_ptr,                    # (H,) per-head sink logits, when USE_SINKS
    num_seqs,
    num_heads,
    stride_o_t, stride_o_h,
    NUM_SEGMENTS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    USE_SINKS: tl.constexpr,
):
    """One (token, head) per program: out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s, M = max_s m_s.
    With a sink (log2 units: sink * log2(e)), M also covers it and the denominator gains 2^(sink - M) once."""
    token = tl.program_id(0)
    head = tl.program_id(1)
    if token >= tl.load(query_start_loc_ptr + num_seqs):     # partials never written: leave the row alone
        return
    offs_s = tl.arange(0, NUM_SEGMENTS)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    partial = (token.to(tl.int64) * num_heads + head) * NUM_SEGMENTS + offs_s
    m = tl.load(segment_max_ptr + partial)
    m_all = tl.max(m, axis=0)
    if USE_SINKS:
        sink = tl.load(sinks_ptr + head).to(tl.float32) * 1.4426950408889634
        m_all = tl.maximum(m_all, sink)
    weight = tl.math.exp2(m - tl.where(m_all > float("-inf"), m_all, 0.0))       # empty segments: 0
    total = tl.sum(weight * tl.load(segment_sum_ptr + partial), axis=0)
    if USE_SINKS:
        total += tl.math.exp2(sink - m_all)
    acc = tl.load(segment_acc_ptr + partial[:, None] * HEAD_DIM_PAD + offs_d[None, :])
    o = tl.sum(acc * weight[:, None], axis=0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + token.to(tl.int64) * stride_o_t + head * stride_o_h + offs_d,
             o.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


__all__ = ["INTERPRETED", "reduce_segments_kernel", "unified_attention_kernel"]
