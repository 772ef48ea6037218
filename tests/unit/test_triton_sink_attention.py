"""The Triton paged attention kernel with GPT-OSS's attention sinks and sliding windows, run on CPU tensors
by triton's interpreter, against its torch reference (``unified_attention_reference``, fp32) and against
the model's torch backend (``models.layers.attention.paged_sink_attention`` / ``sink_window_attention``,
transformers' eager GPT-OSS arithmetic).

Cases: decode batches (split in 16 segments: the sink enters once, in the merge; and one too large to
split), a fresh prefill, a prefill over a cached prefix, a mixed batch; windows that end inside a block,
on a block boundary and inside the kernel's tiles (so whole tiles before the window are skipped), and
windows wider than every sequence; GQA groups of 1, 2 and 7; shuffled block tables with NaN in every slot
no sequence holds (a read of a skipped or foreign slot would show as NaN); sinks alone, a window alone,
both. Tolerances are the plain kernel's (``test_triton_attention``): fp32 1e-5; bf16 3e-2 (the model's
torch path also computes its scores and softmax in bf16).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernel is defined: before it is imported

import pytest
import torch

pytest.importorskip("triton")

from test_triton_attention import DTYPES, GQA, TOLERANCE, Step, make_step

from internvl_runtime.kernels.triton_attention import (
    kernel_runs_on,
    launch_config,
    unified_attention,
    unified_attention_reference,
)
from internvl_runtime.models.layers.attention import AttentionMetadata, paged_sink_attention


def sinks_for(heads: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    """Sink logits of the scores' size (a few units), so that they take a real share of each row."""
    return (2.0 * torch.randn(heads, generator=torch.Generator().manual_seed(seed))).to(dtype)


def run(step: Step, fn=unified_attention, *, sinks: torch.Tensor | None,
        window: int | None) -> torch.Tensor:
    keys, values = step.written_caches()
    out = torch.full(step.q.shape, float("nan"), dtype=step.q.dtype)
    result = fn(step.q, keys, values, out, block_tables=step.block_tables,
                seq_lens=torch.tensor(step.seq_lens, dtype=torch.int32), query_start_loc=step.query_start_loc,
                max_query_len=max(step.query_lens), block_size=step.block_size, scale=step.q.shape[-1] ** -0.5,
                sinks=sinks, window=window)
    assert result is out
    return out


def model_attention(step: Step, *, sinks: torch.Tensor | None, window: int | None) -> torch.Tensor:
    """The decoder's torch backend for GPT-OSS layers over the same pools and slots (zeros for the NaN)."""
    meta = AttentionMetadata(query_lens=step.query_lens, seq_lens=step.seq_lens, slot_mapping=step.slot_mapping(),
                             context_slots=[step.slots(i) for i in range(len(step.seq_lens))])
    return paged_sink_attention(step.q, step.k, step.v, key_cache=step.key_cache.nan_to_num(0.0),
                                value_cache=step.value_cache.nan_to_num(0.0), meta=meta, sinks=sinks,
                                window=window)


def check(step: Step, *, sinks: bool = True, window: int | None) -> torch.Tensor:
    assert kernel_runs_on(step.q.device), "the kernel must run here, not the reference it is compared with"
    sink_logits = sinks_for(step.q.shape[1], step.q.dtype) if sinks else None
    out = run(step, sinks=sink_logits, window=window)
    assert not out.isnan().any()
    atol = TOLERANCE[step.q.dtype]
    reference = run(step, unified_attention_reference, sinks=sink_logits, window=window)
    torch.testing.assert_close(out.float(), reference.float(), atol=atol, rtol=0)
    torch.testing.assert_close(out.float(), model_attention(step, sinks=sink_logits, window=window).float(),
                               atol=atol, rtol=0)
    return out


# 5: inside a 4-slot block; 8: on a block boundary; 40: past the first 32-position decode tile (whole tiles
# skipped) and inside the 64-position prefill tile; 200: wider than every sequence (a full layer)
WINDOWS = [5, 8, 40, 200]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("heads", "kv_heads"), GQA)
@pytest.mark.parametrize("window", WINDOWS)
def test_decode_batch_split_in_segments(dtype: torch.dtype, heads: int, kv_heads: int, window: int) -> None:
    step = make_step([1, 7, 33, 70, 130], [1] * 5, heads=heads, kv_heads=kv_heads, head_dim=16, dtype=dtype)
    assert launch_config(num_queries_per_kv=heads // kv_heads, max_query_len=1, head_dim=16, num_seqs=5,
                         num_kv_heads=kv_heads).num_segments > 1
    check(step, window=window)


@pytest.mark.parametrize("window", [None, 8, 40])
def test_decode_batch_too_large_to_split(window: int | None) -> None:
    lengths = [1 + (11 * i) % 90 for i in range(16)]
    step = make_step(lengths, [1] * 16, heads=8, kv_heads=8, head_dim=16)
    assert launch_config(num_queries_per_kv=1, max_query_len=1, head_dim=16, num_seqs=16,
                         num_kv_heads=8).num_segments == 1
    check(step, window=window)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("heads", "kv_heads"), GQA)
@pytest.mark.parametrize("window", WINDOWS)
def test_fresh_prefill(dtype: torch.dtype, heads: int, kv_heads: int, window: int) -> None:
    # 140 tokens: several query blocks, the later ones starting past whole tiles outside their window
    check(make_step([140], [140], heads=heads, kv_heads=kv_heads, head_dim=16, dtype=dtype), window=window)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("heads", "kv_heads"), GQA)
@pytest.mark.parametrize("window", WINDOWS)
def test_prefill_over_a_cached_prefix(dtype: torch.dtype, heads: int, kv_heads: int, window: int) -> None:
    check(make_step([151], [21], heads=heads, kv_heads=kv_heads, head_dim=16, dtype=dtype), window=window)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", WINDOWS)
def test_mixed_decode_and_prefill_batch(dtype: torch.dtype, window: int) -> None:
    check(make_step([9, 100, 40, 75], [1, 30, 12, 1], heads=14, kv_heads=2, head_dim=16, dtype=dtype),
          window=window)


@pytest.mark.parametrize(("sinks", "window"), [(True, None), (False, 8), (False, None)])
def test_sinks_alone_and_window_alone(sinks: bool, window: int | None) -> None:
    for query_lens in ([1, 1, 1], [1, 30, 12]):               # split decode; a mixed batch
        check(make_step([9, 100, 40], query_lens, heads=4, kv_heads=2, head_dim=16), sinks=sinks, window=window)


@pytest.mark.parametrize("block_size", [1, 3, 16])
def test_block_sizes(block_size: int) -> None:
    check(make_step([5, 80], [1, 17], heads=4, kv_heads=2, head_dim=16, block_size=block_size), window=7)


def test_head_dim_of_gpt_oss() -> None:
    # the 20B's 64 query heads over 8 KV heads, head dim 64 (the tiny fixture keeps the group of 8)
    check(make_step([6, 50], [1, 8], heads=16, kv_heads=2, head_dim=64, dtype=torch.bfloat16), window=16)


def test_the_sink_takes_weight_and_a_window_of_one_sees_only_itself() -> None:
    # window 1: each query sees only its own key, so out = v_i * 1 / (1 + e^(sink - s_ii)), per head
    step = make_step([20], [20], heads=2, kv_heads=2, head_dim=16)
    sinks = sinks_for(2, torch.float32)
    out = run(step, sinks=sinks, window=1)
    scores = (step.q * step.k).sum(-1) * 16 ** -0.5                     # (T, H)
    weight = 1.0 / (1.0 + torch.exp(sinks[None, :] - scores))
    torch.testing.assert_close(out, step.v * weight[..., None], atol=1e-5, rtol=0)


def test_a_padded_row_with_seq_len_zero_is_zeros() -> None:
    step = make_step([12, 0, 7], [1, 1, 1], heads=4, kv_heads=2, head_dim=16)
    out = run(step, sinks=sinks_for(4, torch.float32), window=4)
    assert not out.isnan().any() and (out[1] == 0).all()
