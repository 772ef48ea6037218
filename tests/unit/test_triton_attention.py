"""The Triton paged attention kernel (``kernels.triton_attention.unified_attention``), run on CPU tensors by
triton's interpreter, against its torch reference and against the model's own attention
(``models.layers.attention.paged_attention``, the numerics the decoder has today).

Cases: decode batches over shuffled, non-contiguous block tables of different lengths; a fresh prefill;
a prefill over a cached prefix (a chunk); a mixed decode + prefill batch; GQA groups of 1, 2 and 7 (the
1B's 14 heads over 2 KV heads); head dims 8 and 16 (the tiny fixtures), 64 and 128 (the real models);
a padded row with seq_len 0 (a CUDA-graph bucket); q read in place from a fused qkv view. Small decode
batches run the split-context path (16 segments and a merge), larger ones and prefills the direct one.

Every slot of the pool that holds no token of a sequence (spare blocks, the tail of a sequence's last
block, the block the tables are padded with) is NaN: a read of any of them that reached the output
would show as NaN, so the comparisons also check that the kernel reads only its sequences' slots.

Tolerances: float32 1e-5 absolute (the kernel's online softmax only reorders fp32 sums). bfloat16 3e-2
absolute (outputs are O(1): averages of unit-normal values): the kernel rounds the probabilities and the
output to bf16 (the interpreter rounds toward zero: up to one bf16 ulp, 1/64 on [2, 4)), and the model's
attention computes its scores in bf16 before the fp32 softmax (score errors of ~1e-2 on scores of ~3).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernel is defined: before it is imported

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from internvl_runtime.kernels.triton_attention import (
    kernel_runs_on,
    launch_config,
    unified_attention,
    unified_attention_reference,
)
from internvl_runtime.models.layers.attention import AttentionMetadata, paged_attention

ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


@dataclass
class Step:
    """One step's tensors: the pools (this step's K/V not yet written), this step's q/k/v, the tables."""

    q: torch.Tensor                # (T, H, D)
    k: torch.Tensor                # (T, KV, D)
    v: torch.Tensor
    key_cache: torch.Tensor        # (num_slots, KV, D), NaN where no sequence has a token
    value_cache: torch.Tensor
    block_tables: torch.Tensor     # (B, max_blocks) int32, padded with a NaN block
    seq_lens: list[int]
    query_lens: list[int]
    block_size: int

    @property
    def query_start_loc(self) -> torch.Tensor:
        starts = [0]
        for n in self.query_lens:
            starts.append(starts[-1] + n)
        return torch.tensor(starts, dtype=torch.int32)

    def slots(self, i: int) -> torch.Tensor:
        """All slots of sequence i, in position order."""
        positions = torch.arange(self.seq_lens[i])
        return self.block_tables[i, positions // self.block_size].long() * self.block_size \
            + positions % self.block_size

    def slot_mapping(self) -> torch.Tensor:
        """The slots of this step's tokens (the last query_lens[i] positions of each sequence)."""
        return torch.cat([self.slots(i)[self.seq_lens[i] - n:] for i, n in enumerate(self.query_lens)])

    def written_caches(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The pools with this step's k/v written, as the caller of the kernel leaves them."""
        keys, values = self.key_cache.clone(), self.value_cache.clone()
        start = 0
        for i, n in enumerate(self.query_lens):
            if self.seq_lens[i] >= n:          # a padded row (seq_len 0, one dummy query) writes nothing
                slots = self.slots(i)[self.seq_lens[i] - n:]
                keys[slots] = self.k[start:start + n]
                values[slots] = self.v[start:start + n]
            start += n
        return keys, values


def make_step(seq_lens: list[int], query_lens: list[int], *, heads: int, kv_heads: int, head_dim: int,
              block_size: int = 4, dtype: torch.dtype = torch.float32, seed: int = 0) -> Step:
    """Sequences with their blocks spread over a shuffled pool (with spare NaN blocks between them)."""
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-s // block_size) for s in seq_lens]
    num_blocks = 2 * sum(blocks_per_seq) + 2
    order = torch.randperm(num_blocks - 1, generator=g).tolist()      # the last block pads the tables
    pad_block = num_blocks - 1
    tables = torch.full((len(seq_lens), max([*blocks_per_seq, 1]) + 2), pad_block, dtype=torch.int32)
    shape = (num_blocks * block_size, kv_heads, head_dim)
    key_cache = torch.full(shape, float("nan"))
    value_cache = torch.full(shape, float("nan"))
    taken = 0
    for i, (seq_len, qlen) in enumerate(zip(seq_lens, query_lens, strict=True)):
        n = blocks_per_seq[i]
        tables[i, :n] = torch.tensor(order[taken:taken + n], dtype=torch.int32)
        taken += n
        positions = torch.arange(max(seq_len - qlen, 0))              # the cached prefix
        cached = tables[i, positions // block_size].long() * block_size + positions % block_size
        key_cache[cached] = torch.randn(len(cached), kv_heads, head_dim, generator=g)
        value_cache[cached] = torch.randn(len(cached), kv_heads, head_dim, generator=g)
    t = sum(query_lens)
    return Step(q=torch.randn(t, heads, head_dim, generator=g).to(dtype),
                k=torch.randn(t, kv_heads, head_dim, generator=g).to(dtype),
                v=torch.randn(t, kv_heads, head_dim, generator=g).to(dtype),
                key_cache=key_cache.to(dtype), value_cache=value_cache.to(dtype), block_tables=tables,
                seq_lens=list(seq_lens), query_lens=list(query_lens), block_size=block_size)


def run(step: Step, fn=unified_attention, *, q: torch.Tensor | None = None,
        max_query_len: int | None = None) -> torch.Tensor:
    """``fn`` (the kernel or its reference) on the step, with this step's K/V written into the pools first."""
    q = step.q if q is None else q
    keys, values = step.written_caches()
    out = torch.full(q.shape, float("nan"), dtype=q.dtype)
    result = fn(q, keys, values, out, block_tables=step.block_tables,
                seq_lens=torch.tensor(step.seq_lens, dtype=torch.int32), query_start_loc=step.query_start_loc,
                max_query_len=max(step.query_lens) if max_query_len is None else max_query_len,
                block_size=step.block_size, scale=q.shape[-1] ** -0.5)
    assert result is out
    return out


def model_attention(step: Step) -> torch.Tensor:
    """The decoder's attention today, over the same pools and slots. Its pools get zeros for the NaN: its
    batched decode pads every context with slot 0 under a -inf mask, which relies on the pool's zeros."""
    meta = AttentionMetadata(query_lens=step.query_lens, seq_lens=step.seq_lens, slot_mapping=step.slot_mapping(),
                             context_slots=[step.slots(i) for i in range(len(step.seq_lens))])
    return paged_attention(step.q, step.k, step.v, key_cache=step.key_cache.nan_to_num(0.0),
                           value_cache=step.value_cache.nan_to_num(0.0), meta=meta)


def check(step: Step) -> torch.Tensor:
    """The kernel's output against the reference and the model's attention; returns it."""
    assert kernel_runs_on(step.q.device), "the kernel must run here, not the reference it is compared with"
    out = run(step)
    assert not out.isnan().any()
    atol = TOLERANCE[step.q.dtype]
    torch.testing.assert_close(out.float(), run(step, unified_attention_reference).float(), atol=atol, rtol=0)
    torch.testing.assert_close(out.float(), model_attention(step).float(), atol=atol, rtol=0)
    return out


DTYPES = [torch.float32, torch.bfloat16]
GQA = [(2, 2), (4, 2), (14, 2)]                     # groups of 1, 2 and 7 (InternVL2-1B: 14 heads / 2 KV)


def test_the_kernel_runs_under_the_interpreter() -> None:
    assert kernel_runs_on(torch.device("cpu"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("heads", "kv_heads"), GQA)
def test_decode_batch_over_shuffled_block_tables(dtype: torch.dtype, heads: int, kv_heads: int) -> None:
    # lengths across 1 to 3 of the kernel's 32-position decode tiles; one of a single token
    check(make_step([1, 7, 33, 70], [1, 1, 1, 1], heads=heads, kv_heads=kv_heads, head_dim=16, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("heads", "kv_heads"), GQA)
def test_fresh_prefill(dtype: torch.dtype, heads: int, kv_heads: int) -> None:
    # 70 tokens: more than one query block (64 rows) and one 64-position tile
    check(make_step([70], [70], heads=heads, kv_heads=kv_heads, head_dim=16, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("heads", "kv_heads"), GQA)
def test_prefill_over_a_cached_prefix(dtype: torch.dtype, heads: int, kv_heads: int) -> None:
    # a 21-token chunk after 50 cached tokens (a prefix-cache hit, or chunked prefill)
    check(make_step([71], [21], heads=heads, kv_heads=kv_heads, head_dim=16, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("heads", "kv_heads"), GQA)
def test_mixed_decode_and_prefill_batch(dtype: torch.dtype, heads: int, kv_heads: int) -> None:
    check(make_step([9, 30, 40, 5], [1, 30, 12, 1], heads=heads, kv_heads=kv_heads, head_dim=16, dtype=dtype))


@pytest.mark.parametrize("head_dim", [8, 64, 128])
def test_head_dims_of_the_fixtures_and_the_real_models(head_dim: int) -> None:
    check(make_step([6, 20], [1, 8], heads=14, kv_heads=2, head_dim=head_dim, dtype=torch.bfloat16))


@pytest.mark.parametrize("block_size", [1, 3, 16])
def test_block_sizes(block_size: int) -> None:
    check(make_step([5, 40], [1, 17], heads=4, kv_heads=2, head_dim=16, block_size=block_size))


def test_a_padded_row_with_seq_len_zero_is_zeros_and_reads_nothing() -> None:
    # A CUDA-graph bucket pads the batch: a row with one dummy query token and nothing to attend to, and
    # one with no query token at all; its block table row is all padding (NaN blocks).
    step = make_step([12, 0, 0, 7], [1, 1, 0, 1], heads=4, kv_heads=2, head_dim=16)
    out = run(step)
    assert not out.isnan().any()
    assert (out[1] == 0).all()
    torch.testing.assert_close(out, run(step, unified_attention_reference), atol=1e-5, rtol=0)
    real = make_step([12, 7], [1, 1], heads=4, kv_heads=2, head_dim=16)
    real.q, real.k, real.v = step.q[[0, 2]], step.k[[0, 2]], step.v[[0, 2]]
    real.key_cache, real.value_cache = step.key_cache, step.value_cache
    real.block_tables = step.block_tables[[0, 3]]
    torch.testing.assert_close(out[[0, 2]], model_attention(real), atol=1e-5, rtol=0)


def test_grid_sized_for_a_longer_bucket_than_the_batch() -> None:
    # A captured graph launches for its bucket's max_query_len: the programs past each query return.
    step = make_step([9, 30], [1, 6], heads=4, kv_heads=2, head_dim=16)
    torch.testing.assert_close(run(step, max_query_len=40), run(step), atol=0, rtol=0)


def test_q_read_in_place_from_a_fused_qkv_view() -> None:
    step = make_step([9, 30], [1, 6], heads=4, kv_heads=2, head_dim=16)
    fused = torch.cat([step.q, step.k, step.v], dim=1)                 # (T, H + 2 KV, D)
    q_view = fused[:, :4]
    assert not q_view.is_contiguous()
    torch.testing.assert_close(run(step, q=q_view), run(step), atol=0, rtol=0)


def test_a_decode_batch_too_large_to_split() -> None:
    # 16 sequences x 8 KV heads: programs enough, one segment (the other decode tests split in 16)
    lengths = [1 + (7 * i) % 40 for i in range(16)]
    step = make_step(lengths, [1] * 16, heads=8, kv_heads=8, head_dim=16)
    assert launch_config(num_queries_per_kv=1, max_query_len=1, head_dim=16, num_seqs=16,
                         num_kv_heads=8).num_segments == 1
    check(step)


@pytest.mark.parametrize(("group", "max_query_len", "head_dim", "num_seqs", "expected"), [
    (1, 1, 16, 200, (16, 16, 32, 16, 1)),     # decode: the smallest row block, 16 tokens of one head
    (7, 1, 64, 1, (16, 2, 32, 64, 16)),       # 1B decode, one sequence: 2 tokens x 7 heads in 16 rows; split
    (7, 1, 64, 63, (16, 2, 32, 64, 16)),      # 63 x 2 programs: still split
    (7, 1, 64, 64, (16, 2, 32, 64, 1)),       # 64 x 2: programs enough
    (32, 1, 128, 4, (32, 1, 32, 128, 16)),    # a group wider than 16 rows
    (2, 500, 8, 1, (64, 32, 64, 16, 1)),      # prefill: 64 rows, never split; head dim 8 padded to 16
    (7, 3, 16, 1, (32, 4, 64, 16, 1)),        # a short chunk: rows for 3 tokens x 7 heads
])
def test_launch_config(group: int, max_query_len: int, head_dim: int, num_seqs: int,
                       expected: tuple[int, int, int, int, int]) -> None:
    config = launch_config(num_queries_per_kv=group, max_query_len=max_query_len, head_dim=head_dim,
                           num_seqs=num_seqs, num_kv_heads=2)
    assert (config.block_m, config.block_q, config.tile_n, config.head_dim_padded, config.num_segments) == expected
    assert config.block_q * group <= config.block_m


_WITHOUT_TRITON = """
import sys
sys.modules["triton"] = None          # as if triton were not installed
import torch
from internvl_runtime.kernels import triton_attention as ta
assert not ta.triton_available()
assert not ta.kernel_runs_on(torch.device("cpu"))
q = torch.randn(3, 4, 16)
keys, values = torch.randn(8, 2, 16), torch.randn(8, 2, 16)
args = dict(block_tables=torch.tensor([[1, 0], [0, 1]], dtype=torch.int32),
            seq_lens=torch.tensor([5, 2], dtype=torch.int32),
            query_start_loc=torch.tensor([0, 1, 3], dtype=torch.int32), max_query_len=2, block_size=4,
            scale=0.25)
out = ta.unified_attention(q, keys, values, torch.empty_like(q), **args)
torch.testing.assert_close(out, ta.unified_attention_reference(q, keys, values, torch.empty_like(q), **args))
print("ok")
"""


def test_without_triton_the_module_imports_and_falls_back_to_the_reference() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run([sys.executable, "-c", _WITHOUT_TRITON], capture_output=True, text=True, env=env,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
