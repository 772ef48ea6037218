"""Weight-only int8 / int4: the quantized linear layers against a plain float product (awkward shapes,
every dtype, the 151655x896 LM head), ``quantize_model`` on the tiny checkpoint, and the loading
keywords (``load_in_8bit`` / ``load_in_4bit`` / ``quantization=``) with their errors."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from internvl_runtime import AutoModel, AutoTokenizer, InvalidRequest, UnsupportedFeature, loading
from internvl_runtime.engine.model_runner import ModelRunner, SequenceStep
from internvl_runtime.quantization import (
    Int4Linear,
    Int8Linear,
    QuantizationConfig,
    int4_backend,
    model_bytes,
    quantize_model,
    resolve_quantization,
)
from internvl_runtime.quantization import linear as qlinear
from internvl_runtime.quantization.linear import dequantize_int4, dequantize_int8, quantize_int4
from paths import FIXTURES

CKPT = FIXTURES / "ckpt" / "tiny-1B"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def make_linear(n: int, k: int, bias: bool, dtype: torch.dtype, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0, 0.05)
        if bias:
            lin.bias.normal_(0, 0.5)
    return lin.to(dtype).requires_grad_(False)


def int4_codes(layer: Int4Linear, lin: nn.Linear) -> torch.Tensor:
    """The (N, K) codes of the layer (recomputed: the packed layout is the kernel's business)."""
    q, sz = quantize_int4(lin.weight, layer.group_size)
    assert torch.equal(sz, layer.group_scales_and_zeros())
    return q


# ---- the layers against plain float products ---------------------------------------------------
# (rows, out, in): 1 row; sizes that are not multiples of 8/16/32; more rows than the GEMV kernel takes;
# K % 32 != 0 (the dequantizing path; torch's bf16 int8 kernel is wrong there).
INT8_SHAPES = [(1, 1, 32), (1, 7, 13), (3, 17, 33), (1, 64, 80), (2, 48, 96), (20, 33, 96), (0, 5, 32)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "n", "k"), INT8_SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_matches_float_product(rows: int, n: int, k: int, dtype: torch.dtype, bias: bool) -> None:
    lin = make_linear(n, k, bias, dtype)
    layer = Int8Linear.from_linear(lin)
    x = torch.randn(rows, k, dtype=dtype)
    y = layer(x)
    assert y.shape == (rows, n) and y.dtype == dtype
    if rows == 0:
        return
    exact = x.float() @ dequantize_int8(layer.weight, layer.scales).t() + (lin.bias.float() if bias else 0)
    # activation/output rounding; the native kernels quantize x to int8 per 32 columns (kernels.linear_int8:
    # ~0.5% on many outputs), which a single output of a 32-term dot product can show at a few %
    assert rel(y, exact) < (4e-2 if n == 1 else 1e-2)
    assert rel(dequantize_int8(layer.weight, layer.scales), lin.weight) < 1e-2   # int8 vs the float weights
    assert layer.weight.dtype == torch.int8 and layer.weight.shape == (n, k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "n", "k", "group"), [(1, 1, 32, 32), (3, 17, 96, 32), (5, 40, 192, 64),
                                                       (2, 24, 256, 128), (19, 7, 256, 256), (0, 3, 64, 32)])
@pytest.mark.parametrize("bias", [False, True])
def test_int4_linear_matches_float_product(rows: int, n: int, k: int, group: int, dtype: torch.dtype,
                                           bias: bool) -> None:
    lin = make_linear(n, k, bias, dtype)
    layer = Int4Linear.from_linear(lin, group)
    x = torch.randn(rows, k, dtype=dtype)
    y = layer(x)
    assert y.shape == (rows, n) and y.dtype == dtype
    if rows == 0:
        return
    codes = int4_codes(layer, lin)
    sz = layer.group_scales_and_zeros()
    exact = x.float() @ dequantize_int4(codes, sz, group).t() + (lin.bias.float() if bias else 0)
    assert rel(y, exact) < (4e-2 if n == 1 else 1e-2)   # 8-bit activations on the native kernels, as int8's
    assert rel(dequantize_int4(codes, sz, group), lin.weight) < 0.12
    rows = n if layer.backend == "native" else -(-n // 16) * 16     # torch's packers pad N to 16
    assert layer.weight.dtype == torch.uint8 and layer.weight.numel() == rows * k // 2


def test_three_dimensional_input() -> None:
    lin = make_linear(24, 64, True, torch.bfloat16)
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    for layer in (Int8Linear.from_linear(lin), Int4Linear.from_linear(lin, 32)):
        y = layer(x)
        assert y.shape == (2, 5, 24)
        assert torch.allclose(y.float(), layer(x.reshape(10, 64)).reshape(2, 5, 24).float())


def test_int8_kernel_and_dequant_paths_agree(monkeypatch) -> None:
    lin = make_linear(40, 96, False, torch.bfloat16)
    layer = Int8Linear.from_linear(lin)
    x = torch.randn(3, 96, dtype=torch.bfloat16)
    kernel = layer(x)
    monkeypatch.setattr(Int8Linear, "KERNEL_MAX_ROWS", 0)
    assert rel(kernel, layer(x)) < 1e-2


def test_int4_chunked_packing_equals_whole(monkeypatch) -> None:
    lin = make_linear(528, 64, False, torch.bfloat16)      # 528 rows: chunks of 256 + a 16-row tail
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    whole = Int4Linear.from_linear(lin, 32)
    monkeypatch.setattr(qlinear, "_ROW_CHUNK_ELEMS", 64 * 256)
    chunked = Int4Linear.from_linear(lin, 32)
    assert torch.equal(whole.weight, chunked.weight)
    assert torch.equal(whole(x), chunked(x))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_lm_head_shape(mode: str) -> None:
    """The real LM head, 151655 x 896 (N not a multiple of 16: int4 pads to 151664 rows)."""
    lin = make_linear(151655, 896, False, torch.bfloat16)
    layer = Int8Linear.from_linear(lin) if mode == "int8" else Int4Linear.from_linear(lin, 128)
    x = torch.randn(1, 896, dtype=torch.bfloat16)
    y = layer(x)
    assert y.shape == (1, 151655)
    for rows in (slice(0, 2048), slice(151655 - 2048, 151655)):    # first rows and the padded tail
        sub = nn.Linear(896, 2048, bias=False).to(torch.bfloat16).requires_grad_(False)
        sub.weight.copy_(lin.weight[rows])
        if mode == "int8":
            w = dequantize_int8(layer.weight[rows], layer.scales[rows])
        else:
            q, sz = quantize_int4(sub.weight, 128)
            w = dequantize_int4(q, sz, 128)
        assert rel(y[:, rows], x.float() @ w.t()) < 1e-2
    assert rel(y, lin(x)) < (2e-2 if mode == "int8" else 0.12)
    del lin


# ---- quantize_model on the tiny checkpoint -------------------------------------------------------
def first_logits(model, ids: list[int]) -> torch.Tensor:
    runner = ModelRunner(model, num_blocks=8)
    prefill = runner.execute([SequenceStep(ids, 0, [0, 1, 2, 3])])
    decode = runner.execute([SequenceStep([7], len(ids), [0, 1, 2, 3])])
    return torch.cat([prefill, decode])


@pytest.fixture(scope="module")
def reference_logits() -> torch.Tensor:
    return first_logits(AutoModel.from_pretrained(CKPT, torch_dtype=torch.float32), list(range(3, 45)))


@pytest.mark.parametrize(("mode", "tolerance"), [("int8", 3e-2), ("int4", 0.3)])
def test_quantize_model_swaps_llm_linears(mode: str, tolerance: float, reference_logits) -> None:
    model = AutoModel.from_pretrained(CKPT, torch_dtype=torch.bfloat16)
    before = model_bytes(model)
    done = quantize_model(model, mode)
    kind = Int8Linear if mode == "int8" else Int4Linear
    lm = model.language_model
    assert isinstance(lm.lm_head, kind)
    for layer in lm.model.layers:
        for linear in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
            assert isinstance(linear, kind)
    assert isinstance(lm.model.embed_tokens, nn.Embedding) and lm.model.embed_tokens.weight.dtype == torch.bfloat16
    vision = (*model.vision_model.modules(), *model.mlp1.modules())
    assert not any(isinstance(m, (Int8Linear, Int4Linear)) for m in vision)
    assert len(done) == 4 * len(lm.model.layers) + 1
    assert model_bytes(model) < before
    assert rel(first_logits(model, list(range(3, 45))), reference_logits) < tolerance


def test_include_vision_warns_and_quantizes_vision() -> None:
    model = AutoModel.from_pretrained(CKPT, torch_dtype=torch.float32)
    with pytest.warns(UserWarning, match="vision encoder"):
        quantize_model(model, "int8", include_vision=True)
    assert isinstance(model.vision_model.encoder.layers[0].attn.qkv, Int8Linear)
    assert isinstance(model.mlp1[1], Int8Linear)
    features = model.extract_feature(torch.randn(1, 3, 448, 448))
    assert features.shape == (1, model.num_image_token, model.config.llm.hidden_size)


def test_include_vision_under_the_upcast_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 weights on a CPU without bf16 instructions (the upcast plan) with a quantized encoder and mlp1:
    the encoder keeps 16-bit activations (float32 ones are for our plain Linear only) and the features come
    back in bf16."""
    monkeypatch.setenv("INTERNVL_COMPUTE", "upcast")
    model = AutoModel.from_pretrained(CKPT, torch_dtype=torch.bfloat16)
    with pytest.warns(UserWarning, match="vision encoder"):
        quantize_model(model, "int8", include_vision=True)
    features = model.extract_feature(torch.randn(1, 3, 448, 448).bfloat16())
    assert features.dtype == torch.bfloat16 and bool(features.isfinite().all())
    assert features.shape == (1, model.num_image_token, model.config.llm.hidden_size)


def test_int4_group_fallbacks(caplog) -> None:
    """A group size that does not divide K: the largest smaller one that does, else int8 (logged)."""
    model = nn.Module()
    model.language_model = nn.Sequential(nn.Linear(96, 16), nn.Linear(13, 16), nn.Linear(256, 16))
    with caplog.at_level(logging.WARNING, logger="internvl_runtime.quantization.apply"):
        done = quantize_model(model, QuantizationConfig("int4", group_size=128))
    assert done == {"language_model.0": "int4 g32", "language_model.1": "int8", "language_model.2": "int4 g128"}
    assert "language_model.1" in caplog.text


def test_quantized_chat_runs() -> None:
    model = AutoModel.from_pretrained(CKPT, torch_dtype=torch.bfloat16, load_in_8bit=True)
    tokenizer = AutoTokenizer.from_pretrained(CKPT)
    pixel_values = torch.randn(1, 3, 448, 448, dtype=torch.bfloat16)
    response = model.chat(tokenizer, pixel_values, "<image>\nDescribe.", dict(max_new_tokens=4, do_sample=False))
    assert isinstance(response, str)


# ---- loading keywords and errors -----------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "kind"), [(dict(load_in_8bit=True), Int8Linear),
                                              (dict(load_in_4bit=True), Int4Linear),
                                              (dict(quantization="int4:g32"), Int4Linear),
                                              (dict(quantization={"mode": "int8"}), Int8Linear),
                                              (dict(quantization="int8", load_in_8bit=True), Int8Linear)])
def test_from_pretrained_quantizes(kwargs: dict, kind: type) -> None:
    model = AutoModel.from_pretrained(CKPT, torch_dtype=torch.bfloat16, **kwargs)
    assert isinstance(model.language_model.lm_head, kind)
    assert model.quantization.mode == ("int8" if kind is Int8Linear else "int4")


@pytest.mark.parametrize("kwargs", [dict(load_in_8bit=True, load_in_4bit=True),
                                    dict(quantization="int8", load_in_4bit=True),
                                    dict(quantization="int3"), dict(quantization="int4:g48"),
                                    dict(quantization="int4:gx"),
                                    dict(quantization={"bits": 4}), dict(quantization={"mode": "int4", "size": 1}),
                                    dict(quantization=8)])
def test_bad_quantization_requests(kwargs: dict) -> None:
    with pytest.raises(InvalidRequest):
        AutoModel.from_pretrained(CKPT, **kwargs)


def test_resolve_quantization() -> None:
    assert resolve_quantization() is None
    assert resolve_quantization(load_in_4bit=True) == QuantizationConfig("int4", 128)
    assert resolve_quantization("int4:g64") == QuantizationConfig("int4", 64)
    assert resolve_quantization({"mode": "int8", "include_vision": True}).include_vision


def test_int4_without_kernel_fails_before_loading(monkeypatch) -> None:
    monkeypatch.setattr(qlinear, "_has_kernel", lambda op, key: False)
    monkeypatch.setattr(loading, "load_weights", lambda *a, **k: pytest.fail("weights were read"))
    with pytest.raises(UnsupportedFeature, match="4-bit"):
        AutoModel.from_pretrained(CKPT, load_in_4bit=True)


@pytest.mark.parametrize("device", ["mps", "meta"])
def test_int4_backend_unknown_devices(device: str) -> None:
    with pytest.raises(UnsupportedFeature, match="4-bit"):
        int4_backend(torch.device(device))


def test_int4_layer_refuses_another_device_type() -> None:
    layer = Int4Linear.from_linear(make_linear(16, 32, False, torch.bfloat16), 32)
    layer.backend = "cuda"                               # as if packed for CUDA and then moved to the CPU
    with pytest.raises(UnsupportedFeature, match="packed for cuda"):
        layer(torch.randn(1, 32, dtype=torch.bfloat16))
