"""int8 / int4 experts (``quantization.QuantizedExperts``): the layer against its float experts, and a tiny
Qwen3-MoE InternVL (``moe_checkpoint``) loaded with ``load_in_8bit`` / ``load_in_4bit`` / ``quantize_model``.

Tolerances are the int8 / int4 linear layers' (``test_quantization.py``): int8 within 1e-2 (relative norm)
of the product with its own dequantized weights and the dequantized weights within 1e-2 of the float ones;
the whole model's first logits within 3e-2 (int8) of the same model in bf16 (the dtype it quantizes from:
bf16 alone is already 4e-2 from float32 here, its rounding flipping a few routing choices). int4: 0.4
(``test_quantization``'s 0.3, plus the experts whose choice int4's larger error flips: 0.28 measured).
The router (``mlp.gate``) stays in the model dtype.
"""

from __future__ import annotations

import pytest
import torch

from internvl_runtime import AutoModel
from internvl_runtime.config import InternVLConfig
from internvl_runtime.engine.model_runner import ModelRunner, SequenceStep
from internvl_runtime.kernels.moe import grouped_experts_reference
from internvl_runtime.models.layers.moe import Router, SparseMoE, StackedExperts
from internvl_runtime.quantization import QuantizedExperts, model_bytes, quantize_model
from internvl_runtime.quantization.linear import dequantize_int8
from moe_checkpoint import write_tiny_qwen3_moe


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_qwen3_moe(tmp_path_factory.mktemp("qwen3moe"))


def float_layer(checkpoint, dtype: torch.dtype) -> SparseMoE:
    """The tiny model's first sparse layer shape, random weights."""
    torch.manual_seed(0)
    layer = SparseMoE(InternVLConfig.from_pretrained(checkpoint).llm, routing="softmax_topk")
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=p.shape[-1] ** -0.5)
    return layer.to(dtype).requires_grad_(False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_int8_experts_against_the_float_layer(checkpoint, dtype: torch.dtype, rows: int) -> None:
    layer = float_layer(checkpoint, dtype)
    x = torch.randn(rows, 64).to(dtype)
    expected = layer(x)
    up, down = layer.experts_gate_up, layer.experts_down
    q_up, q_down = QuantizedExperts.from_stacked(up), QuantizedExperts.from_stacked(down)
    assert q_up.weight.dtype == torch.int8 and q_up.weight.shape == (8, 64, 64) and q_up.scales.shape == (8, 64)
    # per expert, per output row: what Int8Linear does with each expert's rows
    assert rel(dequantize_int8(q_up.weight.view(-1, 64), q_up.scales.view(-1)), up.weight) < 1e-2
    layer.experts["gate_up_proj"], layer.experts["down_proj"] = q_up, q_down
    out = layer(x)
    assert out.dtype == dtype
    weights, ids = layer.route(x)
    w13 = q_up.weight.float() * q_up.scales.float()[..., None]
    w2 = q_down.weight.float() * q_down.scales.float()[..., None]
    exact = grouped_experts_reference(x.float(), ids, weights.float(), w13, w2)
    assert rel(out, exact) < 1e-2
    assert rel(out, expected) < 3e-2


@pytest.mark.parametrize("rows", [1, 20])
def test_int4_experts_against_the_float_layer(checkpoint, rows: int) -> None:
    layer = float_layer(checkpoint, torch.bfloat16)
    x = torch.randn(rows, 64).to(torch.bfloat16)
    expected = layer(x)
    q_up = QuantizedExperts.from_stacked(layer.experts_gate_up, group_size=32)
    q_down = QuantizedExperts.from_stacked(layer.experts_down, group_size=32)
    assert q_up.weight.dtype == torch.uint8 and q_up.weight.shape == (8, 64, 32)
    assert q_up.scales.shape == (8, 64, 2, 2) and q_down.scales.shape == (8, 64, 1, 2)
    layer.experts["gate_up_proj"], layer.experts["down_proj"] = q_up, q_down
    assert 0 < rel(layer(x), expected) < 0.3


def first_logits(model, ids: list[int]) -> torch.Tensor:
    runner = ModelRunner(model, num_blocks=8)
    prefill = runner.execute([SequenceStep(ids, 0, [0, 1, 2, 3])])
    decode = runner.execute([SequenceStep([7], len(ids), [0, 1, 2, 3])])
    return torch.cat([prefill, decode])


@pytest.fixture(scope="module")
def reference_logits(checkpoint) -> torch.Tensor:
    return first_logits(AutoModel.from_pretrained(checkpoint, torch_dtype=torch.bfloat16), list(range(3, 45)))


@pytest.mark.parametrize(("kwargs", "kind", "tolerance"), [({"load_in_8bit": True}, "int8", 3e-2),
                                                           ({"load_in_4bit": True}, "int4", 0.4)])
def test_loading_quantizes_the_experts_and_keeps_the_router(checkpoint, reference_logits, kwargs: dict, kind: str,
                                                            tolerance: float) -> None:
    model = AutoModel.from_pretrained(checkpoint, torch_dtype=torch.bfloat16, **kwargs)
    layers = model.language_model.model.layers
    for i in (0, 2):                                             # the sparse layers (layer 1 has no experts)
        mlp = layers[i].mlp
        assert isinstance(mlp.gate, Router) and mlp.gate.weight.dtype == torch.bfloat16
        for stack in mlp.experts.values():
            assert isinstance(stack, QuantizedExperts)
            # int4: the largest group size <= 128 dividing the stack's input width (64 for gate/up, 32 for down)
            assert stack.group_size == (0 if kind == "int8" else stack.in_features)
    assert rel(first_logits(model, list(range(3, 45))), reference_logits) < tolerance


def test_quantize_model_swaps_the_stacks(checkpoint, reference_logits) -> None:
    model = AutoModel.from_pretrained(checkpoint, torch_dtype=torch.bfloat16)
    before = model_bytes(model)
    done = quantize_model(model, "int8")
    assert done["language_model.model.layers.0.mlp.experts.gate_up_proj"] == "int8 experts"
    assert "language_model.model.layers.0.mlp.gate" not in done
    assert not any(isinstance(m, StackedExperts) for m in model.modules())
    assert model_bytes(model) < before
    assert rel(first_logits(model, list(range(3, 45))), reference_logits) < 3e-2


def test_only_the_triton_path_is_capturable(checkpoint) -> None:
    """CUDA graphs need a layer that reads nothing back: the Triton path (float or int8 experts on CUDA with
    triton), never the per-expert path (int4 experts); the CPU never captures."""
    pytest.importorskip("triton")
    layer = float_layer(checkpoint, torch.bfloat16)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert layer.capturable(cpu) and layer.capturable(cuda)
    layer.experts["gate_up_proj"] = QuantizedExperts.from_stacked(layer.experts_gate_up)
    layer.experts["down_proj"] = QuantizedExperts.from_stacked(layer.experts_down)
    assert layer.capturable(cuda)
    layer.experts["gate_up_proj"] = QuantizedExperts.from_stacked(float_layer(checkpoint, torch.bfloat16)
                                                                  .experts_gate_up, group_size=32)
    assert not layer.capturable(cuda) and layer.capturable(cpu)
