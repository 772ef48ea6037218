"""The native vision attention kernel (``kernels.vision_attention``, csrc/vision_attention.cpp).

Checked against float64 softmax attention on awkward shapes (one token, token counts that are not a
multiple of the 16/64-key tiles or the 48-query blocks, batches, 1 to 16 heads, head dims from 1 to 128),
read from the fused qkv layout in place and from separate tensors; its errors on bad input; the torch
fallback; and the vision encoders of the tiny fixtures with the kernel on and off.

Tolerance (relative Frobenius error against float64, REL_TOL = 3e-3): both the kernel and torch's float32
path round the output to bf16, which alone costs ~1.6e-3 (a relative rounding error uniform within half
an ulp, 2^-8 .. 2^-9 of the value: rms ~2^-8 / sqrt(3)). The kernel's one extra rounding, the softmax
probabilities to bf16 (<= 2^-9 relative each, unbiased, normalised by the sum of the rounded values), adds
~5% to that on these inputs (spread attention averages it over many keys; a dominant key is exact after
the normalisation). So the kernel must also stay within 1.25x of torch's float32-then-bf16 error.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from internvl_runtime import AutoModel, kernels
from internvl_runtime.config import VisionConfig
from internvl_runtime.kernels import extension
from internvl_runtime.models.layers.linear import LinearPlan, set_linear_plan
from internvl_runtime.models.vision import intern_vit
from internvl_runtime.models.vision.intern_vit import VisionAttention, fused_linear
from paths import FIXTURES

CKPT = FIXTURES / "ckpt"
REL_TOL = 3e-3


@pytest.fixture(scope="module")
def native() -> None:
    """The avx512bf16 path built and loaded; skipped where the CPU lacks it or no toolchain is installed."""
    if kernels.missing_flags("avx512bf16"):
        pytest.skip(f"CPU lacks {', '.join(kernels.missing_flags('avx512bf16'))}: no native vision attention")
    if extension._load() is None:
        if shutil.which("c++") and shutil.which("ninja"):
            pytest.fail(f"a compiler and ninja are installed but the kernels did not build: {kernels.describe()}")
        pytest.skip(f"no toolchain to build the kernels: {kernels.describe()}")


@pytest.fixture(autouse=True)
def _auto_path(monkeypatch):
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    yield
    intern_vit.set_vision_fast_path(True)


def _op():
    return extension._State.ops.vision_attention


def _qkv(n: int, length: int, heads: int, dim: int, fused: bool, seed: int = 0, spread: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    if fused:   # views of one (N, L, 3, heads, D) tensor, as the qkv projection gives them
        return (spread * torch.randn(n, length, 3, heads, dim, generator=g)).bfloat16().unbind(2)
    return tuple((spread * torch.randn(n, length, heads, dim, generator=g)).bfloat16() for _ in range(3))


def _reference(q, k, v, scale, dtype=torch.float64) -> torch.Tensor:
    """Softmax attention over all keys in ``dtype`` from the same bf16 inputs, as (N, L, heads * D)."""
    out = F.scaled_dot_product_attention(*(t.to(dtype).transpose(1, 2) for t in (q, k, v)), scale=scale)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[1], -1)


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref.double()).norm() / ref.double().norm())


SHAPES = [  # (N, L, heads, D)
    (1, 1, 1, 64),
    (1, 17, 16, 64),
    (1, 1025, 16, 64),     # InternViT-300M, one 448 tile
    (1, 1100, 1, 64),
    (3, 17, 16, 64),
    (3, 65, 5, 64),
    (2, 257, 3, 128),      # InternViT-6B head dim
    (1, 1025, 2, 128),
    (2, 49, 4, 16),        # the tiny fixtures' head dims
    (1, 50, 5, 8),
    (1, 40, 2, 7),         # odd head dim (padded pairs)
    (1, 33, 3, 80),        # head dim over one 64-column group
    (1, 5, 1, 1),
]


@pytest.mark.parametrize("fused", [True, False], ids=["qkv-views", "separate"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64_attention(native, shape, fused) -> None:
    n, length, heads, dim = shape
    q, k, v = _qkv(n, length, heads, dim, fused)
    scale = dim ** -0.5
    with torch.inference_mode():
        out = _op()(q, k, v, scale, 2)
    ref = _reference(q, k, v, scale)
    assert out.shape == (n, length, heads * dim) and out.dtype == torch.bfloat16 and out.is_contiguous()
    assert torch.isfinite(out).all()
    if length == 1:   # one key: weight exactly 1, the output is v
        assert torch.equal(out, v.reshape(n, 1, heads * dim))
        return
    torch_f32 = _rel(_reference(q, k, v, scale, torch.float32).bfloat16(), ref)   # torch's float32 path
    assert _rel(out, ref) <= REL_TOL
    assert _rel(out, ref) <= 1.25 * torch_f32


@pytest.mark.parametrize("spread", [0.05, 8.0], ids=["flat", "peaked"])
def test_score_ranges(native, spread: float) -> None:
    """Nearly uniform weights, and scores in the hundreds (the row max keeps exp in range)."""
    q, k, v = _qkv(2, 300, 4, 64, True, seed=3, spread=spread)
    v = v / spread                             # keep the values O(1) in both cases
    with torch.inference_mode():
        out = _op()(q, k, v.contiguous(), 0.125, 2)
    ref = _reference(q, k, v, 0.125)
    assert torch.isfinite(out).all() and _rel(out, ref) <= REL_TOL


def test_fewer_keys_than_queries_and_scale(native) -> None:
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 70, 3, 64, generator=g).bfloat16()
    k, v = (torch.randn(2, 19, 3, 64, generator=g).bfloat16() for _ in range(2))
    with torch.inference_mode():
        out = _op()(q, k, v, 0.3, 2)
    assert _rel(out, _reference(q, k, v, 0.3)) <= REL_TOL


def test_threads_agree(native) -> None:
    """Work items are shared out dynamically; every item is computed the same way on any thread."""
    q, k, v = _qkv(2, 200, 8, 64, True, seed=5)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _op()(q, k, v, 0.125, 2)
        torch.set_num_threads(max(2, before))
        many = _op()(q, k, v, 0.125, 2)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, many)


def test_wrapper_uses_the_kernel(native, monkeypatch) -> None:
    q, k, v = _qkv(1, 100, 4, 64, True, seed=6)
    with torch.inference_mode():
        out = kernels.vision_attention(q, k, v)
        assert torch.equal(out, _op()(q, k, v, 0.125, 2))
        # a non-contiguous head dim is copied, not refused
        q2 = torch.randn(1, 100, 4, 128).bfloat16()[..., ::2]
        assert torch.equal(kernels.vision_attention(q2, k, v), _op()(q2.contiguous(), k, v, 0.125, 2))


# ---------------------------------------------------------------------------------------------- errors

def test_bad_input_is_refused(native) -> None:
    q, k, v = _qkv(1, 10, 2, 64, False)
    op = _op()
    cases = {
        "must be bfloat16": lambda: op(q.float(), k, v, 0.125, 2),
        "(N, tokens, heads, head_dim)": lambda: op(q.reshape(10, 2, 64), k, v, 0.125, 2),
        "contiguous last": lambda: op(q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3), 0.125, 2),
        "same shape": lambda: op(q, k, v[:, :5], 0.125, 2),
        "differ in heads": lambda: op(q[:, :, :1], k, v, 0.125, 2),
        "differ in batch or head_dim": lambda: op(q[..., :32], k, v, 0.125, 2),
        "scale must be finite": lambda: op(q, k, v, float("nan"), 2),
        "only the AVX-512 BF16 path": lambda: op(q, k, v, 0.125, 1),
        "no keys": lambda: op(q, k[:, :0], v[:, :0], 0.125, 2),
    }
    for message, call in cases.items():
        with pytest.raises(RuntimeError, match=message.replace("(", r"\(").replace(")", r"\)")):
            call()


def test_wrapper_checks_shapes() -> None:
    q, k, v = _qkv(1, 10, 2, 64, False)
    with pytest.raises(ValueError, match="vision_attention"):
        kernels.vision_attention(q, k, v[:, :, :1])
    with pytest.raises(ValueError, match="vision_attention"):
        kernels.vision_attention(q.reshape(10, 2, 64), k, v)


# -------------------------------------------------------------------------------------------- fallback

def _sdpa32(q, k, v, scale):
    """What the fallback computes: torch's SDPA on float32 copies, rounded to q's dtype."""
    return _reference(q, k, v, scale, torch.float32).to(q.dtype)


def test_forced_torch_is_sdpa_in_float32(monkeypatch) -> None:
    monkeypatch.setenv(kernels.ENV_VAR, "torch")
    q, k, v = _qkv(2, 37, 3, 64, True, seed=7)
    with torch.inference_mode():
        assert torch.equal(kernels.vision_attention(q, k, v), _sdpa32(q, k, v, 0.125))
        # other dtypes and autograd take the fallback on every path
    monkeypatch.delenv(kernels.ENV_VAR)
    q16, k16, v16 = (t.half() for t in (q, k, v))
    assert torch.equal(kernels.vision_attention(q16, k16, v16, 0.2), _sdpa32(q16, k16, v16, 0.2))
    qg = q.detach().clone().requires_grad_(True)
    out = kernels.vision_attention(qg, k, v)
    out.float().sum().backward()
    assert qg.grad is not None and qg.grad.shape == q.shape


def _config(six_b: bool) -> VisionConfig:
    if six_b:
        return VisionConfig(hidden_size=256, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1,
                            image_size=56, patch_size=14, norm_type="rms_norm", qk_normalization=True,
                            qkv_bias=False)
    return VisionConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=1,
                        image_size=56, patch_size=14, norm_type="layer_norm")


def _attention(six_b: bool) -> VisionAttention:
    attn = VisionAttention(_config(six_b))
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for name, p in attn.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return attn.to(torch.bfloat16).eval()


def _todays_attention(attn: VisionAttention, x: torch.Tensor) -> torch.Tensor:
    """The fast path without the kernel: float32 SDPA from the 16-bit q/k/v (intern_vit docstring)."""
    n, length, dim = x.shape
    qkv = fused_linear(attn.qkv, x)
    heads = (n, length, attn.num_heads, attn.head_dim)
    if attn.qk_normalization:
        q, k, v = qkv.view(n, length, 3, dim).unbind(2)
        q, k = attn.q_norm(q), attn.k_norm(k)
        q, k, v = (t.float().view(heads).transpose(1, 2) for t in (q, k, v))
    else:
        q, k, v = qkv.float().view(n, length, 3, *heads[2:]).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, length, dim).to(x.dtype)
    return fused_linear(attn.proj, out)


@pytest.mark.parametrize("six_b", [False, True], ids=["300M", "6B-qk-norm-d128"])
def test_vision_attention_module(six_b: bool, monkeypatch) -> None:
    """Forced to torch, or under the upcast plan, the module computes exactly what it did before the
    kernel; with the kernel (where it runs) it is as close to float64 as REL_TOL says."""
    attn = _attention(six_b)
    x = torch.randn(2, 50, attn.qkv.in_features, generator=torch.Generator().manual_seed(9)).bfloat16()
    with torch.inference_mode():
        expected = _todays_attention(attn, x)
        monkeypatch.setenv(kernels.ENV_VAR, "torch")
        assert not intern_vit.native_attention(attn, x)
        assert torch.equal(attn(x), expected)
        monkeypatch.delenv(kernels.ENV_VAR)
        if kernels.missing_flags("avx512bf16") or kernels.selected_path() != "avx512bf16":
            return
        assert intern_vit.native_attention(attn, x)
        out = attn(x)
        # the attention output before proj, against float64
        n, length, dim = x.shape
        qkv = fused_linear(attn.qkv, x)
        heads = (n, length, attn.num_heads, attn.head_dim)
        if six_b:
            q, k, v = qkv.view(n, length, 3, dim).unbind(2)
            q, k, v = attn.q_norm(q).view(heads), attn.k_norm(k).view(heads), v.view(heads)
        else:
            q, k, v = qkv.view(n, length, 3, *heads[2:]).unbind(2)
        inner = kernels.vision_attention(q, k, v)
        assert _rel(inner, _reference(q, k, v, attn.head_dim ** -0.5)) <= REL_TOL
        assert torch.equal(out, fused_linear(attn.proj, inner))


def test_upcast_plan_keeps_float32_attention(monkeypatch) -> None:
    attn = _attention(False)
    set_linear_plan(attn, LinearPlan(upcast=True))
    x = torch.randn(1, 30, 64, generator=torch.Generator().manual_seed(10)).bfloat16()
    calls = []
    monkeypatch.setattr(kernels, "vision_attention", lambda *a, **k: calls.append(1))
    with torch.inference_mode():
        assert torch.equal(attn(x), _todays_attention(attn, x))
    assert not calls


# ----------------------------------------------------------------------------------- tiny fixtures

@pytest.mark.parametrize("variant", ["tiny-1B", "tiny-26B"])   # head dim 16 (4 heads); 8 (5 heads, q/k norm)
def test_tiny_vision_encoder_kernel_on_and_off(variant: str, monkeypatch) -> None:
    """The whole vision encoder of a fixture in bf16: kernel on vs off within the tolerance of
    test_vision_speed_paths.py (fast path vs plain path), against the float32 model as reference."""
    folder = CKPT / variant
    if not folder.is_dir():
        pytest.skip(f"fixture checkpoint missing: {folder}")
    model16 = AutoModel.from_pretrained(folder, torch_dtype=torch.bfloat16).eval()
    model32 = AutoModel.from_pretrained(folder, torch_dtype=torch.float32).eval()
    size = model16.config.vision.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(11))
    calls = []
    real = kernels.vision_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "vision_attention", counted)
    with torch.inference_mode():
        ref = model32.vision_model(pixels)
        on = model16.vision_model(pixels.bfloat16())
        ran = len(calls)
        monkeypatch.setenv(kernels.ENV_VAR, "torch")
        off = model16.vision_model(pixels.bfloat16())
    layers = model16.config.vision.num_hidden_layers
    if model16.compute_plan.upcast_16bit or kernels.missing_flags("avx512bf16") or extension._load() is None:
        assert ran == 0 and torch.equal(on, off)   # the kernel never runs there: nothing changes
        return
    assert ran == layers and len(calls) == layers
    assert on.dtype == torch.bfloat16 and on.shape == ref.shape
    assert _rel(on, ref) <= max(1.25 * _rel(off, ref), 1e-2)
    assert _rel(on, off.float()) <= 2e-2
