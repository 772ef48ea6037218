"""Batch-1 decode of InternVL3.5-30B-A3B's LLM (Qwen3-MoE) on the CPU: ms per token and bytes read per token
against the active-parameter floor (active bytes / measured memory bandwidth).

The released shapes (hidden 2048, 48 layers, 32 query / 4 KV heads of 128, 128 experts of 768, top-8, vocab
151936, bfloat16) take ~61 GB in bf16: more than this host's memory. So the benchmark builds ``--layers`` decoder
layers (default 2) with random weights and times, per token, what a decode step runs per layer (the q/k/v/o
projections with q/k RMS norms, the router and the top-8 experts through ``models.layers.moe.SparseMoE``), plus
the final norm and the lm_head once; per-layer figures are scaled to 48 layers and said so. Attention over the
KV cache is left out (at a short context it reads a few hundred KB per layer, under 1% of the bytes).

    python benchmarks/moe_decode.py [--layers 2] [--tokens 32] [--threads N] [--plan kernel|torch]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from internvl_runtime import kernels
from internvl_runtime.config import LLMConfig
from internvl_runtime.models.layers.linear import Linear, LinearPlan, set_linear_plan
from internvl_runtime.models.layers.moe import SparseMoE

# InternVL3.5-30B-A3B's llm_config (internvl_runtime/testing/real_configs_3_5_moe.json)
REAL = {"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 2048, "intermediate_size": 6144,
        "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_hidden_layers": 48,
        "vocab_size": 151936, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "max_position_embeddings": 40960,
        "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768, "norm_topk_prob": True,
        "decoder_sparse_step": 1, "mlp_only_layers": []}
BF16 = 2


def host() -> dict:
    from internvl_runtime.hardware import INTERESTING_FLAGS, cpu_flags, cpu_model
    flags = cpu_flags()
    return {"cpu_model": cpu_model(), "flags": [f for f in INTERESTING_FLAGS if f in flags],
            "cpus": os.cpu_count(), "threads": torch.get_num_threads()}


def bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Read bandwidth in bytes/s: the best of ``repeats`` sums over a ``gib`` GiB float32 buffer (no cache reuse;
    torch's float32 sum is vectorised, its bf16 sum is not)."""
    x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best


def rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    v = x.float()
    return (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * w


class Layer(torch.nn.Module):
    """What a Qwen3-MoE decoder layer reads at batch-1 decode, less attention over the cache."""

    def __init__(self, config: LLMConfig) -> None:
        super().__init__()
        h, hd, q, kv = config.hidden_size, config.head_dim, config.num_attention_heads, config.num_key_value_heads
        self.q, self.k = Linear(h, q * hd, bias=False), Linear(h, kv * hd, bias=False)
        self.v, self.o = Linear(h, kv * hd, bias=False), Linear(q * hd, h, bias=False)
        self.norms = torch.nn.Parameter(torch.ones(2, h))
        self.qk_norm = torch.nn.Parameter(torch.ones(2, hd))
        self.moe = SparseMoE(config, routing="softmax_topk")
        self.hd = hd

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = rms(x, self.norms[0])
        q = rms(self.q(a).view(-1, self.hd), self.qk_norm[0])
        k = rms(self.k(a).view(-1, self.hd), self.qk_norm[1])
        v = self.v(a)
        attn = q.reshape(1, -1) + 0 * (k.sum() + v.sum())    # stands for attention over the cache (left out)
        x = x + self.o(attn)
        return x + self.moe(rms(x, self.norms[1]))


def fill(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 2:
                p.copy_((torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5).to(p.dtype))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2, help="decoder layers built (figures scaled to 48)")
    parser.add_argument("--tokens", type=int, default=32, help="decode steps timed")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--plan", choices=("kernel", "torch"), default="kernel",
                        help="kernel: the bf16 GEMV kernel for decode rows, as the CPU compute plan sets it "
                             "(experts included); torch: F.linear everywhere")
    parser.add_argument("--json", default=None, help="write the figures here too")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = LLMConfig.from_dict(REAL, "llm_config")
    moe = config.moe
    assert moe is not None
    h, vocab, n_real = config.hidden_size, config.vocab_size, config.num_hidden_layers

    with torch.device("meta"):
        layers = torch.nn.ModuleList(Layer(config) for _ in range(args.layers))
        head = Linear(h, vocab, bias=False)
    layers = layers.to_empty(device="cpu").to(torch.bfloat16)
    head = head.to_empty(device="cpu").to(torch.bfloat16)
    for i, layer in enumerate(layers):
        fill(layer, i)
        layer.norms.data.fill_(1)
        layer.qk_norm.data.fill_(1)
    fill(head, 99)
    if args.plan == "kernel":
        if not kernels.available():
            raise SystemExit("the native kernels are not built here; use --plan torch")
        plan = LinearPlan(small_row_kernel=kernels.linear_bf16, max_kernel_rows=4)
        set_linear_plan(layers, plan)
        set_linear_plan(head, plan)
    embed = torch.randn(vocab, h, dtype=torch.bfloat16)

    # parameter counts at the real depth (per layer from the built layer, times 48)
    per_layer = sum(p.numel() for p in layers[0].parameters())
    experts_per_layer = sum(p.numel() for p in layers[0].moe.experts.parameters())
    active_per_layer = per_layer - experts_per_layer * (moe.num_experts - moe.experts_per_token) // moe.num_experts
    total = n_real * per_layer + 2 * vocab * h + h
    active = n_real * active_per_layer + h + vocab * h + h          # + one embedding row, lm_head, final norm
    active_bytes = active * BF16

    final_norm = torch.ones(h, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        def step(token: int) -> int:
            x = embed[token].view(1, h)
            for layer in layers:
                x = layer(x)
            return int(head(rms(x, final_norm)).argmax())
        token = int(torch.randint(vocab, (1,), generator=g))
        for _ in range(3):
            token = step(token)                                 # warm-up
        layer_times, head_times = [], []
        for _ in range(args.tokens):
            x = embed[token].view(1, h)
            start = time.perf_counter()
            for layer in layers:
                x = layer(x)
            mid = time.perf_counter()
            token = int(head(rms(x, final_norm)).argmax())
            end = time.perf_counter()
            layer_times.append((mid - start) / args.layers)
            head_times.append(end - mid)
    layer_times.sort()
    head_times.sort()
    ms_layer = 1e3 * layer_times[len(layer_times) // 2]
    ms_head = 1e3 * head_times[len(head_times) // 2]
    ms_token = n_real * ms_layer + ms_head
    bw = bandwidth()
    floor_ms = 1e3 * active_bytes / bw
    out = {
        "host": host(), "plan": args.plan, "layers_built": args.layers, "layers_real": n_real, "tokens": args.tokens,
        "params_total": total, "params_active": active, "bytes_total_bf16": total * BF16,
        "bytes_read_per_token": active_bytes,
        "bytes_read_per_layer": active_per_layer * BF16, "bytes_lm_head": vocab * h * BF16,
        "ms_per_layer_median": ms_layer, "ms_lm_head_median": ms_head,
        "ms_per_token_scaled_to_48_layers": ms_token, "bandwidth_gbs": bw / 1e9, "floor_ms": floor_ms,
        "fraction_of_floor": floor_ms / ms_token,
    }
    print(f"host: {out['host']['cpu_model']} | {out['host']['cpus']} CPUs, {out['host']['threads']} threads | "
          f"flags: {' '.join(out['host']['flags'])}")
    print(f"InternVL3.5-30B-A3B LLM: {total / 1e9:.2f} B parameters, {active / 1e9:.2f} B active per token "
          f"({moe.experts_per_token} of {moe.num_experts} experts); {total * BF16 / 1e9:.1f} GB in bf16")
    print(f"plan: {args.plan}; built {args.layers} of {n_real} layers; per layer {ms_layer:.2f} ms "
          f"(median of {args.tokens}), "
          f"lm_head {ms_head:.2f} ms -> {ms_token:.1f} ms/token scaled to {n_real} layers "
          f"({1e3 / ms_token:.2f} tok/s)")
    print(f"bytes read per token: {active_bytes / 1e9:.2f} GB (per layer {active_per_layer * BF16 / 1e6:.1f} MB: "
          f"8 experts + router + attention projections; lm_head {vocab * h * BF16 / 1e6:.0f} MB; one embedding row)")
    print(f"bandwidth {bw / 1e9:.1f} GB/s -> active-parameter floor {floor_ms:.1f} ms/token; "
          f"measured is {100 * floor_ms / ms_token:.0f}% of the floor's speed")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
