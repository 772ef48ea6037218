"""The language model's prefill attention (``kernels.causal_attention``; native in csrc/vision_attention.cpp).

Checked against float64 causal attention on awkward shapes (one token, token counts that are not a multiple of
the 16/64-key tiles or the 48-query blocks, a cached prefix before the queries, grouped-query heads, head dims
from 1 to 128), read in place from a fused qkv output and from a paged pool's strided context; the mask itself
(keys a query must not see change nothing, bit for bit); its errors; and the torch fallback, which is the SDPA
call the attention layer made before the kernel.

Tolerance as tests/unit/test_vision_attention.py explains: REL_TOL (relative Frobenius error against float64)
and at most 1.25x the error of torch's float32 path rounded to bf16 (the kernel's one extra rounding is the
bf16 probabilities).
"""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from internvl_runtime import kernels
from internvl_runtime.kernels import extension

REL_TOL = 3e-3


@pytest.fixture(scope="module")
def native() -> None:
    """The avx512bf16 path built and loaded; skipped where the CPU lacks it or no toolchain is installed."""
    if kernels.missing_flags("avx512bf16"):
        pytest.skip(f"CPU lacks {', '.join(kernels.missing_flags('avx512bf16'))}: no native causal attention")
    if extension._load() is None:
        if shutil.which("c++") and shutil.which("ninja"):
            pytest.fail(f"a compiler and ninja are installed but the kernels did not build: {kernels.describe()}")
        pytest.skip(f"no toolchain to build the kernels: {kernels.describe()}")


@pytest.fixture(autouse=True)
def _auto_path(monkeypatch):
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)


def _op():
    return extension._State.ops.causal_attention


def _inputs(length: int, keys: int, heads: int, kv_heads: int, dim: int, layout: str, seed: int = 0,
            spread: float = 2.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (L, heads, D), k and v (S, kv_heads, D) bf16: separate tensors, views of one fused qkv output
    (S, heads + 2 kv_heads, D) whose last L rows are the queries' own, or k / v as a paged pool's context
    (every other slot of a larger pool: a stride of 2 rows)."""
    g = torch.Generator().manual_seed(seed)
    if layout == "fused":
        qkv = (spread * torch.randn(keys, heads + 2 * kv_heads, dim, generator=g)).bfloat16()
        q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=1)
        return q[keys - length:], k, v
    q = (spread * torch.randn(length, heads, dim, generator=g)).bfloat16()
    if layout == "pool":
        pool = (spread * torch.randn(2, 2 * keys, kv_heads, dim, generator=g)).bfloat16()
        return q, pool[0, ::2], pool[1, ::2]
    k, v = ((spread * torch.randn(keys, kv_heads, dim, generator=g)).bfloat16() for _ in range(2))
    return q, k, v


def _reference(q, k, v, scale, dtype=torch.float64) -> torch.Tensor:
    """Causal attention in ``dtype`` from the same bf16 inputs (query i at position S - L + i), (L, heads, D)."""
    length, keys = q.shape[0], k.shape[0]
    mask = torch.arange(keys)[None, :] <= torch.arange(length)[:, None] + (keys - length)
    out = F.scaled_dot_product_attention(*(t.to(dtype).transpose(0, 1)[None] for t in (q, k, v)), attn_mask=mask,
                                         scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref.double()).norm() / ref.double().norm())


SHAPES = [  # (L, S, heads, kv_heads, D)
    (1, 1, 1, 1, 64),
    (1, 40, 14, 2, 64),      # one query over a prefix (a prefix-cache hit's last token)
    (5, 5, 14, 2, 64),
    (276, 276, 14, 2, 64),   # InternVL2-1B (Qwen2-0.5B), a one-tile prompt
    (100, 300, 14, 2, 64),   # a cached prefix of 200
    (97, 97, 16, 16, 64),    # no grouping
    (49, 49, 2, 1, 8),       # the tiny fixtures' head dims
    (50, 130, 4, 2, 16),
    (40, 40, 4, 2, 7),       # odd head dim (padded pairs)
    (33, 65, 3, 1, 80),      # head dim over one 64-column group
    (65, 65, 8, 4, 128),
    (5, 5, 1, 1, 1),
]


@pytest.mark.parametrize("layout", ["separate", "fused", "pool"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64_attention(native, shape, layout) -> None:
    length, keys, heads, kv_heads, dim = shape
    q, k, v = _inputs(length, keys, heads, kv_heads, dim, layout)
    scale = dim ** -0.5
    with torch.inference_mode():
        out = kernels.causal_attention(q, k, v, scale)
        assert torch.equal(out.reshape(length, -1), _op()(*(t.contiguous()[None] for t in (q, k, v)), scale, 2)[0])
    ref = _reference(q, k, v, scale)
    assert out.shape == (length, heads, dim) and out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    if keys == 1:   # one key: weight exactly 1, the output is v
        assert torch.equal(out, v.expand(1, heads, dim))
        return
    torch_f32 = _rel(_reference(q, k, v, scale, torch.float32).bfloat16(), ref)
    assert _rel(out, ref) <= REL_TOL
    if out.numel() >= 256:   # a handful of values is no statistic (5 x 1 x 1: one rounding more or less)
        assert _rel(out, ref) <= 1.25 * torch_f32


def test_first_query_sees_only_the_prefix_and_itself(native) -> None:
    """The mask exactly: keys a query must not see (later positions) change none of its output bits, and
    the first query of a prompt without prefix is its own value."""
    q, k, v = _inputs(130, 200, 4, 2, 64, "separate", seed=1)
    with torch.inference_mode():
        out = kernels.causal_attention(q, k, v, 0.125)
        for cut in (0, 1, 30, 129):     # query `cut` is at position 70 + cut: it sees keys 0 .. 70 + cut
            k2, v2 = k.clone(), v.clone()
            k2[70 + cut + 1:] = 50.0
            v2[70 + cut + 1:] = -7.0
            other = kernels.causal_attention(q, k2, v2, 0.125)
            assert torch.equal(other[:cut + 1], out[:cut + 1])
            assert not torch.equal(other[cut + 1:], out[cut + 1:]) or cut == 129
        alone = kernels.causal_attention(q[:1], k[:1], v[:1], 0.125)
    assert torch.equal(alone[0], v[0].repeat_interleave(2, dim=0))


@pytest.mark.parametrize("spread", [0.05, 8.0], ids=["flat", "peaked"])
def test_score_ranges(native, spread: float) -> None:
    q, k, v = _inputs(300, 300, 4, 2, 64, "fused", seed=3, spread=spread)
    v = v / spread
    with torch.inference_mode():
        out = kernels.causal_attention(q, k, v, 0.125)
    assert torch.isfinite(out).all() and _rel(out, _reference(q, k, v, 0.125)) <= REL_TOL


def test_threads_agree(native) -> None:
    """Work items (the largest query blocks first) are shared out dynamically; any thread computes the same."""
    q, k, v = _inputs(200, 250, 8, 2, 64, "separate", seed=5)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.causal_attention(q, k, v, 0.125)
        torch.set_num_threads(max(2, before))
        many = kernels.causal_attention(q, k, v, 0.125)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, many)


def test_bad_input_is_refused(native) -> None:
    q, k, v = (t.contiguous()[None] for t in _inputs(10, 12, 4, 2, 64, "separate"))
    op = _op()
    cases = {
        "must be bfloat16": lambda: op(q.float(), k, v, 0.125, 2),
        "same shape": lambda: op(q, k, v[:, :5], 0.125, 2),
        "differ in batch or head_dim": lambda: op(q[..., :32], k, v, 0.125, 2),
        "multiple of the key heads": lambda: op(q[:, :, :3], k, v, 0.125, 2),
        "at least as many as the queries": lambda: op(q, k[:, :9], v[:, :9], 0.125, 2),
        "scale must be finite": lambda: op(q, k, v, float("inf"), 2),
        "only the AVX-512 BF16 path": lambda: op(q, k, v, 0.125, 0),
    }
    for message, call in cases.items():
        with pytest.raises(RuntimeError, match=message):
            call()


def test_wrapper_checks_shapes() -> None:
    q, k, v = _inputs(10, 12, 4, 2, 64, "separate")
    for bad in ((q, k[:9], v[:9]), (q[:, :3], k, v), (q, k, v[:, :, :8]), (q, k[None], v[None])):
        with pytest.raises(ValueError, match="causal_attention"):
            kernels.causal_attention(*bad, 0.125)


def _sdpa_in_dtype(q, k, v, scale):
    """What the attention layer computed before the kernel (and the fallback still does): SDPA in q's dtype,
    ``is_causal`` without a prefix, else the offset mask."""
    query, keys, values = (t.transpose(0, 1)[None] for t in (q, k, v))
    if k.shape[0] == q.shape[0]:
        out = F.scaled_dot_product_attention(query, keys, values, is_causal=True, scale=scale, enable_gqa=True)
    else:
        rows = torch.arange(q.shape[0])[:, None] + (k.shape[0] - q.shape[0])
        mask = torch.arange(k.shape[0])[None, :] <= rows
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)


@pytest.mark.parametrize("keys", [60, 90])
def test_forced_torch_is_the_layers_sdpa(monkeypatch, keys: int) -> None:
    monkeypatch.setenv(kernels.ENV_VAR, "torch")
    q, k, v = _inputs(60, keys, 4, 2, 64, "pool", seed=7)
    with torch.inference_mode():
        assert torch.equal(kernels.causal_attention(q, k, v, 0.125), _sdpa_in_dtype(q, k, v, 0.125))
    monkeypatch.delenv(kernels.ENV_VAR)
    # other dtypes and autograd take the fallback on every path
    q32, k32, v32 = (t.float() for t in (q, k, v))
    assert torch.equal(kernels.causal_attention(q32, k32, v32, 0.2), _sdpa_in_dtype(q32, k32, v32, 0.2))
    qg = q.detach().clone().requires_grad_(True)
    out = kernels.causal_attention(qg, k, v, 0.125)
    out.float().sum().backward()
    assert qg.grad is not None and qg.grad.shape == q.shape
