"""Packed bf16 (``pack_bf16=True``) against plain bf16: the products of one decode step, and per shape.

Part "step": the GEMVs of one batch-1 decode step of InternVL2-1B's language model (24 layers of qkv, o,
gate_up, down, then the LM head; random normal weights, ~0.99 GB in bf16, ~0.75 GB packed), plain
(``kernels.linear_bf16``) and packed (``kernels.linear_bf16_packed``), rounds interleaved, best kept. Part
"rows": per shape and row count, the fused tiles (up to 8 rows; AVX2 4), the unpacked-rows path beyond, plain bf16.
``--cpu`` times one thread on its own CPU clock (a shared host: the work done, not the wall time);
``--path`` picks the ISA path (avx2, avx512, avx512bf16).

    python benchmarks/packed_bf16.py                 # wall clock, 2 threads, the host's path
    python benchmarks/packed_bf16.py --cpu --path avx2
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from internvl_runtime import kernels
from internvl_runtime.hardware import describe_host

LAYERS = 24
STEP_SHAPES = [(1152, 896), (896, 896), (9728, 896), (896, 4864)]   # qkv, o, gate_up, down (N, K)
HEAD = (151655, 896)
ROW_SHAPES = {"hot (in cache)": (2048, 896), "gate_up (from DRAM)": (9728, 896)}


def weights(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    return (torch.randn(n, k, generator=generator) * 0.02).to(torch.bfloat16)


def step_part(args: argparse.Namespace, clock) -> None:
    g = torch.Generator().manual_seed(0)
    plain = [[weights(n, k, g) for n, k in STEP_SHAPES] for _ in range(LAYERS)] + [[weights(*HEAD, g)]]
    start = time.perf_counter()
    packed = [[kernels.pack_bf16(w) for w in ws] for ws in plain]
    pack_s = time.perf_counter() - start
    bf16_bytes = sum(w.numel() * 2 for ws in plain for w in ws)
    packed_bytes = sum(p.numel() for ps in packed for p in ps)
    xs = {k: torch.randn(1, k, generator=g).to(torch.bfloat16) for k in (896, 4864)}

    def run(use_packed: bool) -> float:
        begin = clock()
        for ws, ps in zip(plain, packed, strict=True):
            for w, p in zip(ws, ps, strict=True):
                x = xs[w.shape[1]]
                if use_packed:
                    kernels.linear_bf16_packed(x, p, path=args.path)
                else:
                    kernels.linear_bf16(x, w, path=args.path)
        return clock() - begin

    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.rounds):
        for use_packed in (False, True):
            times[use_packed].append(run(use_packed))
    best = {k: min(v) for k, v in times.items()}
    print(f"one decode step's products ({LAYERS} layers + LM head), best of {args.rounds}:")
    for label, nbytes, seconds in (("bf16  ", bf16_bytes, best[False]), ("packed", packed_bytes, best[True])):
        print(f"  {label} {nbytes / 1e9:.3f} GB  {seconds * 1e3:7.2f} ms  {nbytes / seconds / 1e9:5.1f} GB/s")
    print(f"  -> packed {best[True] / best[False]:.2f}x the time of bf16; packing took {pack_s:.1f} s")


def rows_part(args: argparse.Namespace, clock) -> None:
    g = torch.Generator().manual_seed(1)
    print("per shape, ms per product (GFLOP/s), best of rounds; fused tiles to 8 rows (AVX2: 4), then unpacked rows:")
    for name, (n, k) in ROW_SHAPES.items():
        copies = 1 if "cache" in name else 8
        plain = [weights(n, k, g) for _ in range(copies)]
        packed = [kernels.pack_bf16(w) for w in plain]
        for m in args.rows:
            x = torch.randn(m, k, generator=g).to(torch.bfloat16)
            best = {"bf16": 1e9, "packed": 1e9}
            for _ in range(args.rounds):
                for mode in best:
                    begin = clock()
                    for i in range(20):
                        if mode == "bf16":
                            kernels.linear_bf16(x, plain[i % copies], path=args.path)
                        else:
                            kernels.linear_bf16_packed(x, packed[i % copies], path=args.path)
                    best[mode] = min(best[mode], (clock() - begin) / 20)
            flops = 2 * m * n * k
            cells = "  ".join(f"{mode} {t * 1e3:.3f} ({flops / t / 1e9:.0f})" for mode, t in best.items())
            print(f"  {name:20s} M={m:2d}: {cells}  -> {best['packed'] / best['bf16']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="step,rows")
    parser.add_argument("--path", default=None, choices=kernels.PATHS)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--cpu", action="store_true", help="one thread, timed on its CPU clock")
    args = parser.parse_args()
    if args.cpu:
        torch.set_num_threads(1)
    clock = time.thread_time if args.cpu else time.perf_counter
    print(describe_host())
    print(f"kernels: {kernels.describe()}; path {args.path or kernels.selected_path()}; "
          f"{'one thread, CPU time' if args.cpu else f'{torch.get_num_threads()} threads, wall time'}")
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if "step" in args.parts:
        step_part(args, clock)
    if "rows" in args.parts:
        rows_part(args, clock)


if __name__ == "__main__":
    main()
