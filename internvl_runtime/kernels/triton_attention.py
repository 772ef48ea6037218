"""Paged attention for a whole step in one call (the "triton" attention backend).

Placeholder until the Triton kernel lands: ``unified_attention`` runs the torch reference. The signature
is the kernel's: q (T, H, D) for the step's flattened new tokens; key/value caches (slots, KV, D) holding
this step's keys and values already (written at the slot mapping); block_tables (B, max_blocks) int32;
seq_lens (B,) int32 total lengths; query_start_loc (B + 1,) int32; causal attention with GQA. A
sequence with seq_len 0 (a padded row of a CUDA-graph batch) gets zeros.
"""

from __future__ import annotations

import importlib.util

import torch


def triton_available() -> bool:
    """Whether triton can be imported here (it is optional: the package works without it)."""
    return importlib.util.find_spec("triton") is not None


def unified_attention_reference(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                                out: torch.Tensor, *, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                                query_start_loc: torch.Tensor, max_query_len: int, block_size: int,
                                scale: float) -> torch.Tensor:
    """Torch loops over the sequences (reads the lengths on the host): the oracle and the fallback."""
    del max_query_len
    lens = seq_lens.tolist()
    starts = query_start_loc.tolist()
    heads, kv_heads = q.shape[1], key_cache.shape[1]
    group = heads // kv_heads
    for i, seq_len in enumerate(lens):
        start, end = starts[i], starts[i + 1]
        qlen = end - start
        if qlen == 0:
            continue
        if seq_len == 0:
            out[start:end] = 0
            continue
        blocks = block_tables[i, : -(-seq_len // block_size)].to(torch.long)
        slots = (blocks[:, None] * block_size + torch.arange(block_size, device=q.device)).flatten()[:seq_len]
        keys = key_cache.index_select(0, slots).repeat_interleave(group, dim=1)       # (S, H, D)
        values = value_cache.index_select(0, slots).repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[start:end].float(), keys.float()) * scale
        rows = torch.arange(qlen, device=q.device)[:, None] + (seq_len - qlen)
        allowed = torch.arange(seq_len, device=q.device)[None, :] <= rows                # (L, S)
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[start:end] = torch.einsum("hqk,khd->qhd", probs, values.float()).to(out.dtype)
    return out


def unified_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, out: torch.Tensor, *,
                      block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                      max_query_len: int, block_size: int, scale: float) -> torch.Tensor:
    """Attention of every new token of the step over its sequence's paged context, into ``out``."""
    return unified_attention_reference(q, key_cache, value_cache, out, block_tables=block_tables,
                                       seq_lens=seq_lens, query_start_loc=query_start_loc,
                                       max_query_len=max_query_len, block_size=block_size, scale=scale)
