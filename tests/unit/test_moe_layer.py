"""The mixture-of-experts layer against a plain per-expert loop written as transformers' Qwen3MoeSparseMoeBlock
computes it (softmax in float32 over all experts, top-k, renormalised, cast to the activations' dtype; experts
ascending, each over its tokens, ``index_add_`` into an accumulator of the activations' dtype), and the tiny
Qwen3-MoE checkpoint's experts as the loader stacks them.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from internvl_runtime.config import InternVLConfig, LLMConfig
from internvl_runtime.kernels.moe import grouped_experts, grouped_experts_reference
from internvl_runtime.models.layers.moe import SparseMoE
from internvl_runtime.placement import estimate_unit_bytes
from paths import FIXTURES

CKPT = FIXTURES / "ckpt" / "tiny-3_5-30B-A3B"


def _config(num_experts: int = 8, top_k: int = 2, hidden: int = 48, width: int = 24, norm: bool = True) -> LLMConfig:
    return LLMConfig.from_dict({
        "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": hidden, "intermediate_size": 4 * hidden,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 1, "vocab_size": 32,
        "rms_norm_eps": 1e-6, "rope_theta": 1e6, "max_position_embeddings": 128, "num_experts": num_experts,
        "num_experts_per_tok": top_k, "moe_intermediate_size": width, "norm_topk_prob": norm,
        "decoder_sparse_step": 1, "mlp_only_layers": []}, "llm_config")


def _random_moe(config: LLMConfig, dtype: torch.dtype, seed: int = 0) -> SparseMoE:
    torch.manual_seed(seed)
    moe = SparseMoE(config, routing="softmax_topk")
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return moe.to(dtype)


def _official_loop(moe: SparseMoE, x: torch.Tensor) -> torch.Tensor:
    """Qwen3MoeSparseMoeBlock.forward (transformers 4.55), its experts read from our stacked weights."""
    E, k, width = moe.num_experts, moe.top_k, moe.experts_gate_up.out_features // 2
    w13, w2 = moe.experts_gate_up.stacked_weight(), moe.experts_down.stacked_weight()
    router_logits = F.linear(x, moe.gate.weight)
    routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
    routing_weights, selected = torch.topk(routing_weights, k, dim=-1)
    if moe.norm_topk_prob:
        routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
    routing_weights = routing_weights.to(x.dtype)
    final = torch.zeros_like(x)
    mask = F.one_hot(selected, num_classes=E).permute(2, 1, 0)
    for e in torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero():
        idx, top_x = torch.where(mask[e].squeeze(0))
        state = x[None, top_x].reshape(-1, x.shape[-1])
        gate, up = F.linear(state, w13[e[0], :width]), F.linear(state, w13[e[0], width:])
        out = F.linear(F.silu(gate) * up, w2[e[0]]) * routing_weights[top_x, idx, None]
        final.index_add_(0, top_x, out.to(x.dtype))
    return final


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 3, 64])
def test_sparse_moe_equals_the_official_per_expert_loop(dtype: torch.dtype, tokens: int) -> None:
    moe = _random_moe(_config(), dtype)
    x = torch.randn(tokens, 48, generator=torch.Generator().manual_seed(tokens)).to(dtype)
    _weights, ids = moe.route(x)
    hit = set(ids.flatten().tolist())
    if tokens == 64:
        assert hit == set(range(8)), "64 tokens should reach every expert"
    else:
        assert len(hit) < 8, "a few tokens leave experts unhit"
    ours, official = moe(x), _official_loop(moe, x)
    assert ours.dtype == dtype
    if dtype == torch.bfloat16:
        # the same sums in the same order (experts ascending, each rounded into a bf16 accumulator): bit-equal
        assert torch.equal(ours, official)
    else:
        # float32: gate|up as one product vs two may block the GEMM differently (last-bit differences)
        torch.testing.assert_close(ours, official, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("norm", [True, False])
def test_routing_is_qwen3_moe_softmax_topk(norm: bool) -> None:
    moe = _random_moe(_config(norm=norm), torch.bfloat16)
    x = torch.randn(16, 48).to(torch.bfloat16)
    weights, ids = moe.route(x)
    probs = torch.softmax(F.linear(x, moe.gate.weight).float(), dim=-1)
    top, top_ids = torch.topk(probs, 2, dim=-1)
    if norm:
        top = top / top.sum(-1, keepdim=True)
    assert torch.equal(ids, top_ids)
    assert weights.dtype == torch.bfloat16 and torch.equal(weights, top.to(torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_experts_equals_the_token_by_token_reference(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    E, H, width, T, k = 6, 32, 16, 20, 3
    x = torch.randn(T, H, generator=g).to(dtype)
    w13 = (torch.randn(E, 2 * width, H, generator=g) / H ** 0.5).to(dtype)
    w2 = (torch.randn(E, H, width, generator=g) / width ** 0.5).to(dtype)
    ids = torch.stack([torch.randperm(E - 1, generator=g)[:k] for _ in range(T)])   # expert E-1 never hit
    weights = torch.softmax(torch.randn(T, k, generator=g), -1).to(dtype)
    ours = grouped_experts(x, ids, weights, w13, w2)
    reference = grouped_experts_reference(x, ids, weights, w13, w2)
    tol = {"rtol": 1.6e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(ours, reference, **tol)


def test_tiny_checkpoint_experts_stack_as_stored() -> None:
    """The loader puts expert e's gate / up / down rows at e's offsets of the stacked weights."""
    from internvl_runtime import AutoModel
    model = AutoModel.from_pretrained(CKPT, torch_dtype=torch.float32)
    stored = load_file(str(CKPT / "model.safetensors"))
    layers = model.language_model.model.layers
    config = json.loads((CKPT / "config.json").read_text())["llm_config"]
    assert config["num_experts"] == 6 and config["num_experts_per_tok"] == 2 and config["mlp_only_layers"] == []
    for i, layer in enumerate(layers):
        moe = layer.mlp
        assert isinstance(moe, SparseMoE)
        w13, w2 = moe.experts_gate_up.stacked_weight(), moe.experts_down.stacked_weight()
        prefix = f"language_model.model.layers.{i}.mlp."
        assert torch.equal(moe.gate.weight, stored[prefix + "gate.weight"])
        for e in range(6):
            gate, up = stored[f"{prefix}experts.{e}.gate_proj.weight"], stored[f"{prefix}experts.{e}.up_proj.weight"]
            assert torch.equal(w13[e], torch.cat([gate, up]))
            assert torch.equal(w2[e], stored[f"{prefix}experts.{e}.down_proj.weight"])


def test_memory_estimate_counts_every_expert() -> None:
    """The placement / KV plan's weight bytes are all parameters, every expert included (not the active ones)."""
    from internvl_runtime.models.internvl import InternVLModel
    with torch.device("meta"):
        skeleton = InternVLModel(InternVLConfig.from_pretrained(CKPT))
    sizes = estimate_unit_bytes(skeleton, torch.float32)
    stored = load_file(str(CKPT / "model.safetensors"))
    assert sum(sizes.values()) == sum(t.numel() * 4 for t in stored.values())
    layer0 = sum(t.numel() * 4 for n, t in stored.items() if n.startswith("language_model.model.layers.0."))
    assert sizes["language_model.model.layers.0"] == layer0


def test_experts_compute_through_the_compute_plan() -> None:
    """Under a CPU compute plan the experts' products go through its small-row kernel (decode) like every
    Linear, and give what F.linear gives; prefill-sized groups stay on F.linear."""
    from internvl_runtime.models.layers.linear import LinearPlan, set_linear_plan
    calls: list[tuple[int, tuple[int, ...]]] = []

    def kernel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        calls.append((x.shape[0], tuple(weight.shape)))
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)

    moe = _random_moe(_config(), torch.bfloat16)
    x = torch.randn(2, 48).to(torch.bfloat16)
    plain = moe(x)
    set_linear_plan(moe, LinearPlan(small_row_kernel=kernel, max_kernel_rows=4))
    planned = moe(x)
    expert_calls = [c for c in calls if c[1] in ((48, 48), (48, 24))]
    assert len(expert_calls) == 2 * len(set(moe.route(x)[1].flatten().tolist()))   # two products per expert hit
    torch.testing.assert_close(planned, plain, rtol=1.6e-2, atol=1e-2)
    calls.clear()
    moe(torch.randn(64, 48).to(torch.bfloat16))
    assert all(rows <= 4 for rows, _ in calls)
