"""The vision encoder's CPU 16-bit fast path (intern_vit module docstring) against the plain eager path.

The fast path only moves bf16 rounding points (float32 attention, bias/GELU fused into oneDNN matmuls,
one ``addcmul`` for layer scale + residual), so in bf16 it must stay as close to a float32 reference as
the plain path is; in float32 nothing changes at all.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from internvl_runtime.config import VisionConfig
from internvl_runtime.models.layers.linear import Linear, LinearPlan, set_linear_plan
from internvl_runtime.models.projector import Projector
from internvl_runtime.models.vision import intern_vit
from internvl_runtime.models.vision.intern_vit import InternVisionModel, fused_linear


def _config(six_b: bool) -> VisionConfig:
    if six_b:   # InternViT-6B layout: RMSNorm, q/k norm, no qkv bias, heads of odd count
        return VisionConfig(hidden_size=40, intermediate_size=160, num_attention_heads=5, num_hidden_layers=2,
                            image_size=56, patch_size=14, norm_type="rms_norm", qk_normalization=True,
                            qkv_bias=False)
    return VisionConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2,
                        image_size=56, patch_size=14, norm_type="layer_norm")


def _random_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight", "q_norm.weight", "k_norm.weight", "0.weight")):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(("ls1", "ls2")):
                p.copy_(0.5 + 0.5 * torch.rand(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / max(p.shape[-1], 1) ** 0.5)
    return module.eval().requires_grad_(False)


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.float() - ref).norm() / ref.norm())


@pytest.fixture(autouse=True)
def _restore_switch():
    yield
    intern_vit.set_vision_fast_path(True)


@pytest.mark.parametrize("six_b", [False, True])
@pytest.mark.parametrize("tiles", [1, 3])
def test_bf16_fast_path_as_close_to_float32_as_the_plain_path(six_b: bool, tiles: int) -> None:
    config = _config(six_b)
    model32 = _random_(InternVisionModel(config))
    model16 = _random_(InternVisionModel(config)).to(torch.bfloat16)
    pixels = torch.randn(tiles, 3, config.image_size, config.image_size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = model32(pixels)
        intern_vit.set_vision_fast_path(False)
        plain = model16(pixels.bfloat16())
        intern_vit.set_vision_fast_path(True)
        fast = model16(pixels.bfloat16())
    assert fast.dtype == torch.bfloat16 and fast.shape == ref.shape
    assert _rel(fast, ref) <= max(1.25 * _rel(plain, ref), 1e-2)
    assert _rel(fast, plain.float()) <= 2e-2


@pytest.mark.parametrize("six_b", [False, True])
def test_float32_is_unchanged_by_the_fast_path(six_b: bool) -> None:
    config = _config(six_b)
    model = _random_(InternVisionModel(config))
    pixels = torch.randn(2, 3, config.image_size, config.image_size, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        intern_vit.set_vision_fast_path(False)
        plain = model(pixels)
        intern_vit.set_vision_fast_path(True)
        fast = model(pixels)
    assert torch.equal(plain, fast)


def test_switch_turns_the_fast_path_off() -> None:
    x = torch.zeros(2, 3, dtype=torch.bfloat16)
    assert intern_vit.fast_16bit(x)
    intern_vit.set_vision_fast_path(False)
    assert not intern_vit.fast_16bit(x) and not intern_vit.vision_fast_path_enabled()
    assert not intern_vit.fast_16bit(torch.zeros(2, 3))       # float32 never takes it


@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_linear_matches_linear(gelu: bool, bias: bool) -> None:
    linear = _random_(Linear(96, 80, bias=bias))
    x = torch.randn(2, 37, 96, generator=torch.Generator().manual_seed(3))
    ref = F.linear(x, linear.weight, linear.bias)
    ref = F.gelu(ref) if gelu else ref
    linear16 = linear.to(torch.bfloat16)
    with torch.inference_mode():
        out = fused_linear(linear16, x.bfloat16(), gelu=gelu)
        plain = linear16(x.bfloat16())
        plain = F.gelu(plain) if gelu else plain
    assert out.shape == ref.shape and out.dtype == torch.bfloat16
    assert _rel(out, ref) <= max(1.25 * _rel(plain, ref), 5e-3)


def test_fused_linear_follows_the_upcast_plan() -> None:
    """Under the upcast plan (CPUs without bf16 instructions) the layer's own float32 compute is used."""
    linear = _random_(Linear(64, 48)).to(torch.bfloat16)
    set_linear_plan(linear, LinearPlan(upcast=True))
    x = torch.randn(20, 64).bfloat16()
    with torch.inference_mode():
        out = fused_linear(linear, x, gelu=True)
    expected = F.gelu(F.linear(x.float(), linear.weight.float(), linear.bias.float()).to(torch.bfloat16))
    assert torch.equal(out, expected)


def test_fused_linear_falls_back_when_autograd_needs_it() -> None:
    linear = Linear(32, 16).to(torch.bfloat16)
    x = torch.randn(5, 32).bfloat16()
    out = fused_linear(linear, x, gelu=True)
    assert out.requires_grad and out.grad_fn is not None
    out.float().sum().backward()
    assert linear.weight.grad is not None


def test_projector_fast_path() -> None:
    projector32 = _random_(Projector(64, 48, 0.5))
    projector16 = _random_(Projector(64, 48, 0.5)).to(torch.bfloat16)
    x = torch.randn(2, 16, 256, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        ref = projector32(x)
        intern_vit.set_vision_fast_path(False)
        plain = projector16(x.bfloat16())
        intern_vit.set_vision_fast_path(True)
        fast = projector16(x.bfloat16())
        assert torch.equal(projector32(x), ref)                   # float32: the Sequential's own forward
    assert _rel(fast, ref) <= max(1.25 * _rel(plain, ref), 5e-3)


@pytest.mark.parametrize("size", [56, 84])
def test_embeddings_equal_the_concatenation(size: int) -> None:
    """The embeddings write cls + patches + positions straight into one tensor: bit-identical to the
    reference's cat-then-add, at the trained grid and at an interpolated one."""
    config = _config(False)
    model = _random_(InternVisionModel(config))
    emb = model.embeddings
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        out = emb(pixels)
        patches = emb.patch_embedding(pixels)
        n, _, h, w = patches.shape
        patches = patches.flatten(2).transpose(1, 2)
        pos = torch.cat([emb.position_embedding[:, :1, :], emb._patch_positions(h, w)], dim=1)
        expected = torch.cat([emb.class_embedding.expand(n, 1, -1), patches], dim=1) + pos
    assert torch.equal(out, expected)


def _upcast(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` in bf16 under the upcast plan (what ``compute_plan.apply_plan`` gives it on an AVX2 host)."""
    module = module.to(torch.bfloat16)
    set_linear_plan(module, LinearPlan(upcast=True))
    if isinstance(module, InternVisionModel):
        module.set_upcast_16bit(True)
    return module


@pytest.mark.parametrize("six_b", [False, True])
def test_upcast_fast_path_keeps_float32_activations(six_b: bool) -> None:
    """Under the upcast plan the fast path runs float32 activations over the bf16 weights: float32 out, and
    at least as close to the float32 model as the bf16-activation path (fast path off) is."""
    config = _config(six_b)
    model32 = _random_(InternVisionModel(config))
    model16 = _upcast(_random_(InternVisionModel(config)))
    pixels = torch.randn(2, 3, config.image_size, config.image_size, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        ref = model32(pixels)
        intern_vit.set_vision_fast_path(False)
        plain = model16(pixels.bfloat16())
        intern_vit.set_vision_fast_path(True)
        fast = model16(pixels.bfloat16())
    assert plain.dtype == torch.bfloat16 and fast.dtype == torch.float32 and fast.shape == ref.shape
    assert _rel(fast, ref) <= _rel(plain, ref)
    assert _rel(fast, ref) <= 1e-2                    # the bf16 weights' rounding only


def test_fused_linear_upcast_float32_activations_use_onednn_with_gelu() -> None:
    """float32 activations over bf16 weights under the upcast plan: the widened weights' product, bias and
    exact GELU in one call, equal (to float32 rounding) to computing them apart."""
    linear = _upcast(_random_(Linear(96, 80)))
    x = torch.randn(3, 41, 96, generator=torch.Generator().manual_seed(6))
    expected = F.gelu(F.linear(x, linear.weight.float(), linear.bias.float()))
    with torch.inference_mode():
        out = fused_linear(linear, x, gelu=True)
    assert out.dtype == torch.float32 and out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert intern_vit._onednn_fusable(linear, x) == (intern_vit._onednn_linear_op(torch.float32) is not None)


def test_projector_upcast_fast_path() -> None:
    projector32 = _random_(Projector(64, 48, 0.5))
    projector16 = _upcast(_random_(Projector(64, 48, 0.5)))
    x = torch.randn(2, 16, 256, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        ref = projector32(x)
        fast = projector16(x)                                     # float32 in, bf16 weights
        plain = projector16(x.bfloat16())
    assert fast.dtype == torch.float32
    assert _rel(fast, ref) <= min(_rel(plain, ref), 1e-2)
