"""int8 / int4 loads of InternVL3.5-GPT-OSS (tiny-3_5-20B-A4B): its experts layer (router and expert biases,
the clamped SwiGLU, top-k then softmax routing) with quantized stacks against its float experts, and the whole
model loaded with ``load_in_8bit`` / ``load_in_4bit`` against the same model unquantized in bf16 (the dtype it
quantizes from). What stays 16-bit: the router (``mlp.gate``, a ``Router``), the per-head sinks, the expert
biases, the norms and embeddings; o_proj keeps its bias beside its int8 / int4 weight.

Tolerances (relative norms) are those of ``test_moe_quantization.py`` for the layer (int8: 1e-2 against the
product with its own dequantized weights, 3e-2 against the float layer; int4: 0.3). For the whole model int4
keeps its 0.4 (measured 0.34); int8 is 8e-2 (measured 5.4e-2), not 3e-2: this tiny random GPT-OSS is more
sensitive than the tiny Qwen3-MoE (bf16 alone is 2.7e-2 from float32 here, and int8 flips 2 of the 172
token x layer routing choices of the prompt, each flip swapping an expert's whole output); any single part
quantized alone (attention, experts, head) already moves it by ~3e-2. The greedy token of each step agrees.
int4 on the tiny checkpoint: only the down stacks (input 32 wide) and the layers whose input is a multiple of
32 take int4; gate/up, q/k/v and the head read the 48-wide hidden state and fall back to int8 (logged), as on
any model whose width no group size divides.
"""

from __future__ import annotations

import pytest
import torch

from internvl_runtime import AutoModel
from internvl_runtime.config import InternVLConfig
from internvl_runtime.engine.engine import EngineConfig, LLMEngine
from internvl_runtime.engine.model_runner import ModelRunner, SequenceStep
from internvl_runtime.engine.sampling_params import SamplingParams
from internvl_runtime.kernels.moe import grouped_experts_reference
from internvl_runtime.models.decoders.gpt_oss import GptOssForCausalLM
from internvl_runtime.models.layers.moe import Router, SparseMoE
from internvl_runtime.processing.inputs import Message
from internvl_runtime.quantization import QuantizedExperts
from internvl_runtime.quantization.linear import Int4Linear, Int8Linear
from paths import FIXTURES

CKPT = FIXTURES / "ckpt" / "tiny-3_5-20B-A4B"
PROMPT = list(range(3, 45))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def gpt_oss_layer(dtype: torch.dtype, hidden: int = 64) -> SparseMoE:
    """The family's experts layer (as ``GptOssForCausalLM.make_mlp`` builds it) on the tiny config, widened to a
    hidden size int4 groups divide, random weights and biases."""
    llm = InternVLConfig.from_pretrained(CKPT).llm
    llm = type(llm)(**{**llm.__dict__, "hidden_size": hidden})
    torch.manual_seed(0)
    layer = GptOssForCausalLM(llm).model.layers[0].mlp
    assert isinstance(layer, SparseMoE) and layer.activation == "gpt_oss" and layer.router_bias
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=p.shape[-1] ** -0.5 if p.dim() > 1 else 0.1)
    return layer.to(dtype).requires_grad_(False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_int8_gpt_oss_experts_against_the_float_layer(dtype: torch.dtype, rows: int) -> None:
    layer = gpt_oss_layer(dtype)
    x = torch.randn(rows, 64).to(dtype)
    expected = layer(x)
    up, down = layer.experts_gate_up, layer.experts_down
    q_up, q_down = QuantizedExperts.from_stacked(up), QuantizedExperts.from_stacked(down)
    assert q_up.bias is not None and torch.equal(q_up.bias.view(-1), up.bias)      # biases kept as they are
    layer.experts["gate_up_proj"], layer.experts["down_proj"] = q_up, q_down
    out = layer(x)
    assert out.dtype == dtype
    weights, ids = layer.route(x)
    w13 = q_up.weight.float() * q_up.scales.float()[..., None]
    w2 = q_down.weight.float() * q_down.scales.float()[..., None]
    assert q_down.bias is not None
    exact = grouped_experts_reference(x.float(), ids, weights.float(), w13, w2, q_up.bias.float(),
                                      q_down.bias.float(), activation="gpt_oss", limit=7.0, alpha=1.702)
    assert rel(out, exact) < 1e-2
    assert rel(out, expected) < 3e-2


@pytest.mark.parametrize("rows", [1, 20])
def test_int4_gpt_oss_experts_against_the_float_layer(rows: int) -> None:
    layer = gpt_oss_layer(torch.bfloat16)
    x = torch.randn(rows, 64).to(torch.bfloat16)
    expected = layer(x)
    layer.experts["gate_up_proj"] = QuantizedExperts.from_stacked(layer.experts_gate_up, group_size=32)
    layer.experts["down_proj"] = QuantizedExperts.from_stacked(layer.experts_down, group_size=32)
    assert 0 < rel(layer(x), expected) < 0.3


def first_logits(model) -> torch.Tensor:
    """Prefill of ``PROMPT`` (past the sliding layers' window of 8) and one decode step."""
    runner = ModelRunner(model, num_blocks=8)
    prefill = runner.execute([SequenceStep(PROMPT, 0, [0, 1, 2, 3])])
    decode = runner.execute([SequenceStep([7], len(PROMPT), [0, 1, 2, 3])])
    return torch.cat([prefill, decode])


@pytest.fixture(scope="module")
def reference_logits() -> torch.Tensor:
    return first_logits(AutoModel.from_pretrained(CKPT, torch_dtype=torch.bfloat16))


@pytest.mark.parametrize(("kwargs", "kind", "tolerance"), [({"load_in_8bit": True}, "int8", 8e-2),
                                                           ({"load_in_4bit": True}, "int4", 0.4)])
def test_loading_quantizes_gpt_oss_and_keeps_router_and_sinks(reference_logits, kwargs: dict, kind: str,
                                                             tolerance: float) -> None:
    model = AutoModel.from_pretrained(CKPT, torch_dtype=torch.bfloat16, **kwargs)
    for layer in model.language_model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        assert isinstance(attn.sinks, torch.nn.Parameter) and attn.sinks.dtype == torch.bfloat16
        assert isinstance(attn.o_proj, Int8Linear if kind == "int8" else Int4Linear)        # o_proj: 32 wide in
        assert attn.o_proj.bias is not None and attn.o_proj.bias.dtype == torch.bfloat16
        assert isinstance(mlp.gate, Router) and mlp.gate.weight.dtype == torch.bfloat16
        assert mlp.gate.bias is not None and mlp.gate.bias.dtype == torch.bfloat16
        up, down = mlp.experts["gate_up_proj"], mlp.experts["down_proj"]
        assert isinstance(up, QuantizedExperts) and isinstance(down, QuantizedExperts)
        assert up.group_size == 0                                                 # 48 wide: int8 in both modes
        assert down.group_size == (0 if kind == "int8" else 32)
        assert up.bias is not None and up.bias.dtype == torch.bfloat16
    logits = first_logits(model)
    assert rel(logits, reference_logits) < tolerance
    if kind == "int8":
        assert torch.equal(logits.argmax(-1), reference_logits.argmax(-1))


def _greedy(quantization: str | None) -> list[int]:
    engine = LLMEngine.from_pretrained(CKPT, dtype=torch.bfloat16, quantization=quantization,
                                       config=EngineConfig(num_blocks=32))
    request = engine.processor.prepare([Message("user", "Hello, who are you?")])
    out = engine.generate([request], SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True))
    return list(out[0].token_ids)


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_gpt_oss_generates(quantization: str) -> None:
    """The engine loads the model quantized and answers a text request with the tokens asked for; with int8 the
    first greedy token is the unquantized model's (later ones drift: the tiny random model's distributions are
    flat, so one flip changes the rest)."""
    ours = _greedy(quantization)
    assert len(ours) == 6
    if quantization == "int8":
        assert ours[0] == _greedy(None)[0]
