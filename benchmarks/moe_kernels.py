"""The grouped expert GEMM on a GPU: the Triton path (``kernels.triton_moe``) against the per-expert torch path
(``kernels.moe.grouped_experts``) at InternVL3.5-30B-A3B's expert shapes (Qwen3-30B-A3B: 128 experts of 768,
hidden 2048, 8 per token), one layer, random weights and routing.

    python benchmarks/moe_kernels.py                    # CUDA: the checks and the timings (~1 min on an H100)
    TRITON_INTERPRET=1 python benchmarks/moe_kernels.py --device cpu    # a dry run at tiny shapes

Per dtype (bf16, and int8 experts with bf16 activations) and tokens T = 1, 8, 64, 512: the relative error of
each path against the float32 product (int8: with the dequantized weights), and the ms per layer of each
(CUDA events, median of 20 after 3 warm-ups). Then: that ``triton_grouped_experts`` makes no host sync
(``torch.cuda.set_sync_debug_mode("error")``) and can be captured in a CUDA graph and replayed with the same
result. Prints one JSON line at the end. Nothing is asserted beyond exiting non-zero when an error exceeds
2e-2 or a check fails: what ran on which GPU goes in the commit that records it.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys

import torch


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu under TRITON_INTERPRET=1 for a dry run")
        return 0
    from internvl_runtime.kernels.moe import grouped_experts
    from internvl_runtime.kernels.triton_moe import triton_grouped_experts
    from internvl_runtime.quantization.linear import quantize_int8

    gpu = device.type == "cuda"
    experts, hidden, inter, k = (128, 2048, 768, 8) if gpu else (8, 64, 48, 2)
    token_counts = (1, 8, 64, 512) if gpu else (1, 9)
    g = torch.Generator(device=device).manual_seed(0)
    w13 = torch.randn(experts, 2 * inter, hidden, device=device, generator=g) / hidden ** 0.5
    w2 = torch.randn(experts, hidden, inter, device=device, generator=g) / inter ** 0.5
    q13, s13 = quantize_int8(w13.reshape(-1, hidden), torch.bfloat16)
    q2, s2 = quantize_int8(w2.reshape(-1, inter), torch.bfloat16)
    q13, s13, q2, s2 = q13.view(w13.shape), s13.view(experts, -1), q2.view(w2.shape), s2.view(experts, -1)
    dq13, dq2 = q13.float() * s13.float()[..., None], q2.float() * s2.float()[..., None]

    def ms(fn) -> float:
        if not gpu:
            fn()
            return float("nan")
        for _ in range(3):
            fn()
        times = []
        for _ in range(20):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.float() - b).norm() / b.norm())

    results, ok = [], True
    for t in token_counts:
        x = torch.randn(t, hidden, device=device, generator=g)
        ids = torch.stack([torch.randperm(experts, device=device, generator=g)[:k] for _ in range(t)])
        weights = torch.softmax(torch.randn(t, k, device=device, generator=g), dim=-1)
        xb, wb = x.bfloat16(), weights.bfloat16()
        for kind in ("bf16", "int8"):
            if kind == "bf16":
                ref = grouped_experts(x, ids, weights, w13, w2)
                stacks: tuple = (w13.bfloat16(), w2.bfloat16())
                scales: dict = {}
            else:
                ref = grouped_experts(x, ids, weights, dq13, dq2)
                stacks, scales = (q13, q2), {"s13": s13, "s2": s2}
            triton_fn = functools.partial(triton_grouped_experts, xb, ids, wb, *stacks, **scales)
            torch_fn = functools.partial(grouped_experts, xb, ids, wb, *stacks, **scales)
            row = {"tokens": t, "kind": kind, "triton_rel_err": rel(triton_fn(), ref),
                   "torch_rel_err": rel(torch_fn(), ref), "triton_ms": ms(triton_fn), "torch_ms": ms(torch_fn)}
            ok &= row["triton_rel_err"] < 2e-2 and row["torch_rel_err"] < 2e-2
            results.append(row)
            print(json.dumps(row), flush=True)
    summary: dict = {"device": torch.cuda.get_device_name(device) if gpu else "cpu (interpreter)",
                     "shapes": dict(experts=experts, hidden=hidden, inter=inter, k=k), "rows": results}
    if gpu:
        x = torch.randn(8, hidden, device=device, generator=g).bfloat16()
        ids = torch.stack([torch.randperm(experts, device=device, generator=g)[:k] for _ in range(8)])
        weights = torch.softmax(torch.randn(8, k, device=device, generator=g), dim=-1).bfloat16()
        b13, b2 = w13.bfloat16(), w2.bfloat16()
        eager = triton_grouped_experts(x, ids, weights, b13, b2)
        torch.cuda.synchronize()
        try:
            torch.cuda.set_sync_debug_mode("error")
            triton_grouped_experts(x, ids, weights, b13, b2)
            summary["no_sync"] = True
        except RuntimeError as exc:
            summary["no_sync"], ok = f"{exc}".splitlines()[0], False
        finally:
            torch.cuda.set_sync_debug_mode("default")
        try:
            graph = torch.cuda.CUDAGraph()
            stream = torch.cuda.Stream()
            with torch.cuda.stream(stream):
                triton_grouped_experts(x, ids, weights, b13, b2)          # warm-up on the capture stream
            torch.cuda.synchronize()
            with torch.cuda.graph(graph):
                captured = triton_grouped_experts(x, ids, weights, b13, b2)
            graph.replay()
            torch.cuda.synchronize()
            summary["graph_replay_equal"] = bool(torch.equal(captured, eager))
            ok &= summary["graph_replay_equal"]
        except RuntimeError as exc:
            summary["graph_replay_equal"], ok = f"{exc}".splitlines()[0], False
    summary["ok"] = bool(ok)
    print(json.dumps(summary))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
