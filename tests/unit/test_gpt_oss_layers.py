"""GPT-OSS's own parts against direct formulas: attention with sinks and a sliding window (one sequence
at once, chunked, decoded token by token from the paged KV cache), YaRN rope, the expert layout
transforms, and the internvl3_5_gpt_oss template."""

from __future__ import annotations

import math

import pytest
import torch

from internvl_runtime.api.official_rules import INTERNVL3_5_ARCHITECTURES, INTERNVL3_5_CHAT
from internvl_runtime.config import LLMConfig
from internvl_runtime.kernels.moe import grouped_experts_reference
from internvl_runtime.models.decoders.gpt_oss import down_weight, gate_up_bias, gate_up_weight
from internvl_runtime.models.layers.attention import AttentionMetadata, paged_sink_attention, sink_window_attention
from internvl_runtime.models.layers.rotary import RotaryEmbedding
from internvl_runtime.processing.template import build_prompt, get_template


def direct_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor | None,
                     window: int | None) -> torch.Tensor:
    """Row by row: weights exp(s_j) / (sum_j exp(s_j) + exp(sink)) over the visible keys, float64."""
    L, H, D = q.shape
    group = H // k.shape[1]
    out = torch.zeros(L, H, D, dtype=torch.float64)
    for i in range(L):
        for h in range(H):
            lo = 0 if window is None else max(0, i - window + 1)
            keys, values = k[lo:i + 1, h // group].double(), v[lo:i + 1, h // group].double()
            scores = keys @ q[i, h].double() / math.sqrt(D)
            denominator = scores.exp().sum() + (sinks[h].double().exp() if sinks is not None else 0.0)
            out[i, h] = (scores.exp() / denominator) @ values
    return out


@pytest.mark.parametrize("window", [None, 1, 4])
@pytest.mark.parametrize("with_sinks", [True, False])
def test_sink_window_attention_equals_the_formula(window: int | None, with_sinks: bool) -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(11, n, 8, generator=g) for n in (4, 2, 2))
    sinks = 2 * torch.randn(4, generator=g) if with_sinks else None
    ours = sink_window_attention(q, k, v, scale=8 ** -0.5, first_position=0, sinks=sinks, window=window)
    torch.testing.assert_close(ours.double(), direct_attention(q, k, v, sinks, window), rtol=1e-5, atol=1e-6)


def test_sinks_take_weight() -> None:
    """A large sink logit pulls the output towards zero (the weights no longer sum to one)."""
    q, k, v = torch.ones(1, 1, 4), torch.ones(3, 1, 4), torch.ones(3, 1, 4)
    without = sink_window_attention(q, k[:1], v[:1], scale=0.5, first_position=0)
    with_sink = sink_window_attention(q, k[:1], v[:1], scale=0.5, first_position=0, sinks=torch.tensor([1.0]))
    assert torch.allclose(without, torch.ones(1, 1, 4))
    assert torch.allclose(with_sink, torch.full((1, 1, 4), math.exp(2) / (math.exp(2) + math.e)))  # score q.k * 0.5 = 2


def _run_paged(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunks: list[int], sinks: torch.Tensor,
               window: int | None, block_size: int = 4) -> torch.Tensor:
    """Feed one sequence through paged_sink_attention in the given chunk sizes (1s: decode steps), its
    blocks scattered through the pool in reverse order, and return every token's output."""
    n = q.shape[0]
    blocks = -(-n // block_size)
    table = torch.arange(blocks - 1, -1, -1, dtype=torch.int32)[None]   # not contiguous in the pool
    key_cache = torch.zeros(blocks * block_size, k.shape[1], k.shape[2])
    value_cache = torch.zeros_like(key_cache)
    outs, done = [], 0
    for size in chunks:
        pos = torch.arange(done, done + size)
        slots = table[0, pos // block_size].long() * block_size + pos % block_size
        meta = AttentionMetadata(query_lens=[size], seq_lens=[done + size], slot_mapping=slots,
                                 block_tables=table, seq_lens_tensor=torch.tensor([done + size], dtype=torch.int32),
                                 query_start_loc=torch.tensor([0, size], dtype=torch.int32), block_size=block_size)
        outs.append(paged_sink_attention(q[done:done + size], k[done:done + size], v[done:done + size],
                                         key_cache=key_cache, value_cache=value_cache, meta=meta, sinks=sinks,
                                         window=window))
        done += size
    return torch.cat(outs)


@pytest.mark.parametrize("window", [None, 3, 8])
def test_paged_chunked_and_decoded_equal_the_formula(window: int | None) -> None:
    """Chunked prefill that crosses the window, then decode steps, from a scattered paged cache."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(20, n, 8, generator=g) for n in (4, 2, 2))
    sinks = torch.randn(4, generator=g)
    expected = direct_attention(q, k, v, sinks, window)
    for chunks in ([20], [7, 6, 4, 1, 1, 1], [1] * 20):
        got = _run_paged(q, k, v, chunks, sinks, window)
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_two_sequences_in_one_step() -> None:
    g = torch.Generator().manual_seed(2)
    qa, ka, va = (torch.randn(9, n, 8, generator=g) for n in (4, 2, 2))
    qb, kb, vb = (torch.randn(5, n, 8, generator=g) for n in (4, 2, 2))
    sinks = torch.randn(4, generator=g)
    key_cache, value_cache = torch.zeros(14, 2, 8), torch.zeros(14, 2, 8)
    meta = AttentionMetadata(query_lens=[9, 5], seq_lens=[9, 5], slot_mapping=torch.arange(14),
                             context_ranges=[(0, 9), (9, 5)])
    out = paged_sink_attention(torch.cat([qa, qb]), torch.cat([ka, kb]), torch.cat([va, vb]), key_cache=key_cache,
                               value_cache=value_cache, meta=meta, sinks=sinks, window=4)
    expected = torch.cat([direct_attention(qa, ka, va, sinks, 4), direct_attention(qb, kb, vb, sinks, 4)])
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


def _gpt_oss_llm(**scaling: object) -> LLMConfig:
    rope = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
            "original_max_position_embeddings": 4096, "truncate": False, **scaling}
    return LLMConfig.from_dict({"architectures": ["GptOssForCausalLM"], "hidden_size": 48, "intermediate_size": 32,
                                "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
                                "num_hidden_layers": 2, "vocab_size": 64, "rope_theta": 150000,
                                "max_position_embeddings": 131072, "rope_scaling": rope}, "test")


def test_yarn_as_the_paper_formula() -> None:
    """Fast dimensions keep their frequency, slow ones are divided by the factor, a linear ramp between the
    correction dimensions (not rounded: truncate false); cos/sin scaled by 0.1 ln(32) + 1."""
    rotary = RotaryEmbedding(_gpt_oss_llm())
    d, base, factor = 64, 150000.0, 32.0
    inv = rotary.table(torch.device("cpu"))[0].double()
    plain = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)

    def corr(rot: float) -> float:
        return d * math.log(4096 / (rot * 2 * math.pi)) / (2 * math.log(base))

    low, high = corr(32), corr(1)
    ramp = ((torch.arange(d // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    expected = plain / factor * ramp + plain * (1 - ramp)
    torch.testing.assert_close(inv, expected, rtol=1e-6, atol=0)
    assert inv[0] == plain[0].float() and inv[-1] != plain[-1].float()
    cos, sin = rotary.cos_sin(torch.tensor([0, 5]), None, torch.float32)
    scale = 0.1 * math.log(factor) + 1
    assert cos[0, 0].item() == pytest.approx(scale, rel=1e-6) and sin[0, 0].item() == 0.0
    assert cos[1, 3].item() == pytest.approx(math.cos(5 * inv[3].item()) * scale, rel=1e-5)


def test_yarn_truncate_and_attention_factor() -> None:
    truncated = RotaryEmbedding(_gpt_oss_llm(truncate=True)).table(torch.device("cpu"))[0]
    free = RotaryEmbedding(_gpt_oss_llm()).table(torch.device("cpu"))[0]
    assert not torch.equal(truncated, free)
    assert RotaryEmbedding(_gpt_oss_llm(attention_factor=1.25)).multiplier == 1.25


def test_expert_transforms_compute_as_the_reference_layout() -> None:
    """Our stacked experts from the checkpoint's (E, H, 2I) interleaved and (E, I, H) tensors give what
    transformers' GptOssExperts computes (x @ gate_up + b, gate = [::2], up = [1::2], clamp, (up + 1) * glu)."""
    g = torch.Generator().manual_seed(3)
    E, H, inter = 3, 6, 5
    gate_up = 3 * torch.randn(E, H, 2 * inter, generator=g)
    gate_up_b, down, down_b = torch.randn(E, 2 * inter, generator=g), torch.randn(E, inter, H, generator=g), \
        torch.randn(E, H, generator=g)
    x = torch.randn(4, H, generator=g)
    ids, weights = torch.tensor([[0, 2], [1, 0], [2, 1], [2, 0]]), torch.rand(4, 2, generator=g)
    config = _gpt_oss_llm()       # the transforms read nothing of it
    w13 = gate_up_weight(config, gate_up).view(E, 2 * inter, H)
    w2, b13 = down_weight(config, down).view(E, H, inter), gate_up_bias(config, gate_up_b).view(E, -1)
    ours = grouped_experts_reference(x, ids, weights, w13, w2, b13, down_b, activation="gpt_oss", limit=7.0,
                                     alpha=1.702)
    expected = torch.zeros_like(x)
    for t in range(4):
        for j in range(2):
            e = int(ids[t, j])
            h = x[t] @ gate_up[e] + gate_up_b[e]
            gate, up = h[::2].clamp(max=7.0), h[1::2].clamp(-7.0, 7.0)
            expected[t] += weights[t, j] * (((up + 1) * gate * torch.sigmoid(1.702 * gate)) @ down[e] + down_b[e])
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_gpt_oss_template_rounds() -> None:
    """internvl_chat_gpt_oss at 2410d1d: messages end with <|end|>, the answer is prompted by a bare
    '<|start|>assistant', answers stop at <|return|> and keep their special tokens."""
    template = get_template("internvl3_5_gpt_oss")
    assert template.stop_str == "<|return|>"
    rules = INTERNVL3_5_CHAT    # what api.official_rules gives GptOssForCausalLM
    assert "GptOssForCausalLM" in INTERNVL3_5_ARCHITECTURES
    assert rules.stop_text(template) == "<|return|>" and not rules.skip_special_tokens and not rules.leading_bos
    prompt = build_prompt("internvl3_5_gpt_oss", "Q2", [("Q1", "A1")], system_message="S")
    assert prompt == ("<|start|>system<|message|>S<|end|><|start|>user<|message|>Q1<|end|>"
                      "<|start|>assistant" "A1<|end|><|start|>user<|message|>Q2<|end|><|start|>assistant")
    template.system_message = "S"
    template.append_message(template.roles[0], "Q")
    template.append_message(template.roles[1], "A")
    assert template.get_prompt().endswith("<|start|>assistantA<|return|>")
