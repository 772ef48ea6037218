"""Where a batched decode step's time goes: one ``kernels.decode_layers`` call at M rows against its products alone.

Builds InternVL2-1B's (or any checkpoint's) native decode stack, times (CPU time of one thread, best of
interleaved rounds) the whole ``decode_layers`` call for M sequences of ``--context`` tokens each, then each
product kind (qkv, o, gate_up, down) over all layers' weights in layer order with ``kernels.linear_bf16`` (the
kernels the call runs, weights from DRAM as in a step), and the LM head; "rest" is the call less its products
(attention over the M contexts, norms, rope, silu, residuals, KV writes).

    taskset -c 1 python benchmarks/decode_step_parts.py --checkpoint /tmp/bench/InternVL2-1B --rows 8 16
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from internvl_runtime import AutoModel, kernels  # noqa: E402
from internvl_runtime.decode_stack import DecodeStack  # noqa: E402
from internvl_runtime.hardware import describe_host  # noqa: E402
from multi_row_tile import best  # noqa: E402  (benchmarks/: the script's own folder)


def measure(stack: DecodeStack, lm_head: torch.Tensor, m: int, context: int, rounds: int) -> str:
    """One line: the decode_layers call for ``m`` sequences of ``context`` tokens, its products, the LM head."""
    p = stack.projections
    hidden = stack.ln1[0].numel()
    kv_heads, dim = stack.num_kv_heads, stack.head_dim
    pool = m * context
    keys = [torch.randn(pool, kv_heads, dim).to(torch.bfloat16) for _ in stack.ln1]
    values = [torch.randn(pool, kv_heads, dim).to(torch.bfloat16) for _ in stack.ln1]
    x = torch.randn(m, hidden).to(torch.bfloat16)
    cos = torch.randn(m, dim).to(torch.bfloat16)
    sin = torch.randn(m, dim).to(torch.bfloat16)
    slots = torch.arange(m) * context + context - 1
    ctx = torch.arange(pool)
    offsets = torch.arange(m + 1) * context

    def step() -> None:
        kernels.decode_layers(
            x, stack.ln1, stack.ln2, p["qkv"].weights, p["qkv"].scales, p["qkv"].biases,
            p["o"].weights, p["o"].scales, p["gate_up"].weights, p["gate_up"].scales,
            p["down"].weights, p["down"].scales, keys, values, cos, sin, slots, ctx, offsets,
            num_heads=stack.num_heads, num_kv_heads=kv_heads, eps=stack.eps, scale=stack.scale, path=stack.path)

    def product(name: str) -> Callable[[], None]:
        weights, biases = p[name].weights, p[name].biases
        xs = torch.randn(m, weights[0].shape[1]).to(torch.bfloat16)

        def run() -> None:
            for i, w in enumerate(weights):
                kernels.linear_bf16(xs, w, biases[i] if biases else None, path=stack.path)
        return run

    xh = torch.randn(m, hidden).to(torch.bfloat16)
    parts: dict[str, Callable[[], None]] = {
        "step": step, **{name: product(name) for name in ("qkv", "o", "gate_up", "down")},
        "lm_head": lambda: kernels.linear_bf16(xh, lm_head, path=stack.path)}
    seconds: dict[str, float] = {}
    for _ in range(rounds):
        for name, fn in parts.items():
            seconds[name] = min(seconds.get(name, float("inf")), best(fn, 2))
    products = sum(seconds[name] for name in ("qkv", "o", "gate_up", "down"))
    cells = []
    for name in ("qkv", "o", "gate_up", "down"):
        n, k = p[name].weights[0].shape
        flops = 2 * m * n * k * len(p[name].weights)
        cells.append(f"{name} {seconds[name] * 1e3:6.2f} ms ({flops / seconds[name] / 1e9:5.1f} GFLOP/s)")
    lm_flops = 2 * m * lm_head.numel()
    return (f"M={m:2d} decode_layers {seconds['step'] * 1e3:6.2f} ms = products {products * 1e3:6.2f} ms ["
            + ", ".join(cells) + f"] + rest {(seconds['step'] - products) * 1e3:6.2f} ms | LM head "
            f"{seconds['lm_head'] * 1e3:6.2f} ms ({lm_flops / seconds['lm_head'] / 1e9:5.1f} GFLOP/s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--rows", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(describe_host(), flush=True)
    model = AutoModel.from_pretrained(args.checkpoint, torch_dtype=torch.bfloat16)
    lm = model.language_model
    stack = DecodeStack.build(lm)
    if isinstance(stack, str):
        sys.exit(f"no native decode stack: {stack}")
    lm_head = lm.lm_head.weight.detach()
    for m in args.rows:
        print(measure(stack, lm_head, m, args.context, args.rounds), flush=True)


if __name__ == "__main__":
    main()
