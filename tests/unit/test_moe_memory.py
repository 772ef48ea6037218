"""Memory figures of mixture-of-experts decoders (``engine.memory.decoder_weight_counts`` /
``active_bytes_per_token``; ``placement.estimate_unit_bytes``): every expert is resident and counted, a
token goes through its k experts only.

Against the model cards, on decoders built on the meta device from the released shapes (Qwen3-30B-A3B:
"30.5B total, 3.3B activated"; Qwen3-235B-A22B: "235B total, 22B activated"; the shapes as in the
released config.json, checked against slime's Megatron scripts for them: 48 / 94 layers, hidden 2048 /
4096, 32 / 64 query heads of 128, 4 KV heads, 128 experts of 768 / 1536, 8 per token, vocab 151936,
untied head); and exactly against the tiny Qwen3-MoE's own tensors, float and int8.
"""

from __future__ import annotations

import pytest
import torch

from internvl_runtime import AutoModel
from internvl_runtime.config import LLMConfig
from internvl_runtime.engine.memory import active_bytes_per_token, decoder_weight_counts
from internvl_runtime.models.decoders.qwen3_moe import Qwen3MoeForCausalLM
from internvl_runtime.models.internvl import InternVLModel
from internvl_runtime.placement import estimate_unit_bytes
from internvl_runtime.quantization import model_bytes
from moe_checkpoint import write_tiny_qwen3_moe


def qwen3_moe(hidden: int, layers: int, heads: int, expert_width: int) -> Qwen3MoeForCausalLM:
    config = LLMConfig.from_dict({
        "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": hidden, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": 4, "head_dim": 128, "intermediate_size": 3 * hidden,
        "moe_intermediate_size": expert_width, "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "vocab_size": 151936, "tie_word_embeddings": False,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 40960}, "llm_config")
    with torch.device("meta"):
        return Qwen3MoeForCausalLM(config).to(torch.bfloat16)


@pytest.mark.parametrize(("shape", "total", "active"), [((2048, 48, 32, 768), 30.5e9, 3.3e9),
                                                        ((4096, 94, 64, 1536), 235e9, 22e9)])
def test_the_model_cards_counts(shape: tuple[int, int, int, int], total: float, active: float) -> None:
    lm = qwen3_moe(*shape)
    counts = decoder_weight_counts(lm)
    assert counts.total == pytest.approx(total, rel=0.01)
    assert counts.active == pytest.approx(active, rel=0.02)
    assert counts.total_bytes == 2 * counts.total and counts.embedding == 151936 * shape[0]
    # a decode step reads the active weights but the embedding table (one row of it)
    assert active_bytes_per_token(lm) == 2 * (counts.active - counts.embedding + shape[0])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_qwen3_moe(tmp_path_factory.mktemp("qwen3moe"))


def test_the_tiny_models_tensors_float_and_int8(checkpoint) -> None:
    model = AutoModel.from_pretrained(checkpoint, torch_dtype=torch.bfloat16)
    lm = model.language_model
    counts = decoder_weight_counts(lm)
    assert counts.total == sum(p.numel() for p in lm.parameters())
    experts_per_layer = 8 * 3 * 64 * 32
    assert counts.total - counts.active == 2 * experts_per_layer * 6 // 8        # 2 sparse layers, 2 of 8 experts
    quantized = AutoModel.from_pretrained(checkpoint, torch_dtype=torch.bfloat16, load_in_8bit=True).language_model
    q = decoder_weight_counts(quantized)
    assert q.total_bytes == model_bytes(quantized) < counts.total_bytes
    assert active_bytes_per_token(quantized) < active_bytes_per_token(lm) < counts.total_bytes


@pytest.mark.parametrize("bits", [None, 8])
def test_placement_counts_every_expert_and_keeps_the_router_16_bit(checkpoint, bits: int | None) -> None:
    from internvl_runtime.config import InternVLConfig

    with torch.device("meta"):
        skeleton = InternVLModel(InternVLConfig.from_pretrained(checkpoint))
    estimate = estimate_unit_bytes(skeleton, torch.bfloat16, bits)
    kwargs = {"load_in_8bit": True} if bits else {}
    layer = AutoModel.from_pretrained(checkpoint, torch_dtype=torch.bfloat16, **kwargs).language_model.model.layers[0]
    actual = model_bytes(layer)
    assert estimate["language_model.model.layers.0"] == pytest.approx(actual, rel=0.04)
