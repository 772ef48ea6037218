"""GEMV throughput on the InternVL2-1B decode shapes: torch vs the native kernels (internvl_runtime.kernels).

Prints, for M=1 and M=8 rows, the GB/s of weights streamed by torch's F.linear (bf16 and fp32 weights),
each native bf16 path this CPU can run, and (with --int8 / --int4) the int8 / int4 kernels on every path,
with 8-bit activations (the default: integer dot products, "int8 avx2") and on exact activations (the
kernels before them: "int8 avx2 exact", fp32 / bf16 arithmetic), int8 also against torch's
``_weight_int8pack_mm`` -- next to the DRAM read bandwidth measured in the same run (a large float32 sum)
and the host line. Weights are rotated over enough copies (--footprint-mb) that every call reads them
from DRAM, as a decode step does. Every method is timed once per round, rounds interleaved, best kept:
other processes on the machine then slow all columns alike. On a loaded host, ``--cpu-time`` times one thread on
its own CPU clock, and the shapes ``hot`` / ``hot_down`` (cache-resident slices) give the compute rate alone.

    python benchmarks/gemv.py                  # all shapes, M=1 and 8
    python benchmarks/gemv.py --rows 1 --int8 --rounds 7
    python benchmarks/gemv.py --rows 1 16 --int8 --int4 --no-fp32 --shapes gate_up down
    python benchmarks/gemv.py --rows 1 --no-fp32 --prefetch 0 256 512 1024   # the AVX2 tile's prefetch distance

--pass-rows R ... adds, for every kernel the run times, "... Rr" columns: the same kernel reading R weight rows
side by side per pass (1: one row at a time, the default; 2 or 4; ``_set_rows_per_pass``), and (unless
--no-fp32) "f32 PATH Rr": the fp32 GEMV (float32 models' decode, ``kernels.linear_f32``) on its two tiles
(avx2; avx512, which both AVX-512 paths run). ``python benchmarks/gemv.py --rows 1 --no-bf16 --pass-rows 1 2 4``;
``python benchmarks/gemv.py --rows 1 --no-fp32 --int4 --pass-rows 2`` (bf16 and int4, 1 and 2 rows per pass).

--prefetch adds "avx2 pfN" columns: the AVX2 bf16 tile with a software prefetch N bytes ahead in each weight
row (0: the hardware prefetcher alone, the default). On Zen 4 (04:05 UTC 2026-12-05, quiet) 256 B was within 2%
of none and 512-2048 B 3-15% slower, so the default is none; an AVX2-only host (Zen 3) may differ.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from internvl_runtime import kernels
from internvl_runtime.hardware import describe_host

SHAPES = {  # name: (N, K) = (out_features, in_features) of Qwen2-0.5B in InternVL2-1B
    "qkv": (1152, 896),
    "o": (896, 896),
    "gate_up": (9728, 896),
    "down": (896, 4864),
    "lm_head": (151655, 896),
    # cache-resident slices (the same weights every call, 0.9-3.7 MB: L2 / L3): the kernels' compute rate with
    # little DRAM in it, calls long enough (~0.1 ms) that the per-call overhead stays small
    "hot": (2048, 896),
    "hot_down": (384, 4864),
}
HOT = ("hot", "hot_down")
CLOCK = time.perf_counter


def best_time(fn: Callable[[], object], inner: int) -> float:
    fn()
    start = CLOCK()
    for _ in range(inner):
        fn()
    return (CLOCK() - start) / inner


def exact(call: Callable[[], object]) -> object:
    """``call()`` with the integer dot-product kernels switched off (exact activations, the older kernels)."""
    previous = torch.ops.internvl_kernels._set_int8_activations(False)
    try:
        return call()
    finally:
        torch.ops.internvl_kernels._set_int8_activations(previous)


def prefetched(distance: int, call: Callable[[], object]) -> object:
    """``call()`` with the AVX2 bf16 tile prefetching ``distance`` bytes ahead in each weight row."""
    previous = torch.ops.internvl_kernels._set_prefetch_bytes(distance)
    try:
        return call()
    finally:
        torch.ops.internvl_kernels._set_prefetch_bytes(previous)


def pass_rows(weights: str, rows: int, call: Callable[[], object]) -> object:
    """``call()`` with the products over ``weights`` (bf16, f32, int8, int4) reading ``rows`` rows per pass."""
    previous = torch.ops.internvl_kernels._set_rows_per_pass(weights, rows)
    try:
        return call()
    finally:
        torch.ops.internvl_kernels._set_rows_per_pass(weights, previous)


def read_bandwidth(mib: int = 512) -> Callable[[], float]:
    big = torch.ones(mib * 1024 * 1024 // 4)

    def measure() -> float:
        return big.numel() * 4 / best_time(big.sum, 3) / 1e9
    return measure


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8], help="M values (default 1 8)")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the best is kept")
    ap.add_argument("--footprint-mb", type=int, default=256, help="weight copies rotated per timing")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cpu-time", action="store_true",
                    help="one thread, timed on its CPU clock: time descheduled by a loaded host does not count")
    ap.add_argument("--no-fp32", action="store_true", help="skip torch fp32 (needs 2x the memory)")
    ap.add_argument("--int8", action="store_true", help="also time linear_int8 vs torch _weight_int8pack_mm")
    ap.add_argument("--int4", action="store_true", help="also time linear_int4 (group 128)")
    ap.add_argument("--no-bf16", action="store_true", help="skip the native bf16 columns")
    ap.add_argument("--pass-rows", type=int, nargs="*", default=[], choices=[1, 2, 4],
                    help="also time each kernel reading this many weight rows per pass (and the fp32 GEMV)")
    ap.add_argument("--prefetch", type=int, nargs="*", default=[],
                    help="also time the AVX2 bf16 tile with these software prefetch distances (bytes)")
    args = ap.parse_args()
    global CLOCK
    if args.cpu_time:
        args.threads = 1
        CLOCK = time.thread_time
    if args.threads:
        torch.set_num_threads(args.threads)

    paths = list(reversed(kernels.supported_paths())) if kernels.available() else []
    print(f"host: {describe_host()}")
    print(f"kernels: {kernels.describe()}")
    try:
        load = os.getloadavg()
        print(f"load average: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (on {os.cpu_count()} CPUs)")
    except OSError:
        pass
    bandwidth = read_bandwidth()
    read_bw = [bandwidth()]

    columns = ["torch bf16"] + ([] if args.no_fp32 else ["torch fp32"]) + ([] if args.no_bf16 else list(paths))
    if "avx2" in paths:
        columns += [f"avx2 pf{d}" for d in args.prefetch]
    f32_paths = [p for p in paths if p in ("avx2", "avx512")] if not args.no_fp32 else []
    columns += [f"f32 {p} {r}r" for p in f32_paths for r in args.pass_rows]
    if args.int8:
        columns += ["torch int8pack"] + [f"int8 {p}{v}" for p in paths for v in ("", " exact")]
    if args.int4:
        columns += [f"int4 {p}{v}" for p in paths for v in ("", " exact")]
    native = [c for c in columns if not c.startswith(("torch", "f32", "avx2 pf")) and not c.endswith("exact")]
    columns += [f"{c} {r}r" for c in native for r in args.pass_rows if r != 1]
    results: dict[tuple[str, int], dict[str, float]] = {}

    for name in args.shapes:
        n, k = SHAPES[name]
        nbytes = n * k * 2
        copies = 1 if name in HOT else max(1, math.ceil(args.footprint_mb * 2 ** 20 / nbytes))
        gen = torch.Generator().manual_seed(0)
        ws = [(torch.randn(n, k, generator=gen) / k ** 0.5).to(torch.bfloat16) for _ in range(copies)]
        w32 = [w.float() for w in ws] if not args.no_fp32 else []
        if args.int8:
            qs = [torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8) for _ in range(copies)]
            scales = torch.rand(n, generator=gen).to(torch.bfloat16) / 127
        if args.int4:
            packed = [kernels.pack_int4(torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8))
                      for _ in range(2 * copies)]
            sz = (torch.rand(n, k // 128, 2, generator=gen) / 100).to(torch.bfloat16)   # groups of 128
        for m in args.rows:
            x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
            x32 = x.float()
            methods: dict[str, tuple[Callable[[torch.Tensor], object], list[torch.Tensor], int]] = {
                "torch bf16": (lambda w, x=x: F.linear(x, w), ws, 2)}
            if w32:
                methods["torch fp32"] = (lambda w, x32=x32: F.linear(x32, w), w32, 4)
            for p in ([] if args.no_bf16 else paths):
                methods[p] = (lambda w, p=p, x=x: kernels.linear_bf16(x, w, path=p), ws, 2)
            for p in f32_paths:
                for r in args.pass_rows:
                    methods[f"f32 {p} {r}r"] = (
                        lambda w, p=p, r=r, x32=x32: pass_rows("f32", r, lambda: kernels.linear_f32(x32, w, path=p)),
                        w32, 4)
            for d in args.prefetch if "avx2" in paths else []:
                methods[f"avx2 pf{d}"] = (
                    lambda w, x=x, d=d: prefetched(d, lambda: kernels.linear_bf16(x, w, path="avx2")), ws, 2)
            if args.int8:
                methods["torch int8pack"] = (lambda q, x=x, s=scales: torch.ops.aten._weight_int8pack_mm(x, q, s),
                                             qs, 1)
                for p in paths:
                    methods[f"int8 {p}"] = (lambda q, p=p, x=x, s=scales: kernels.linear_int8(x, q, s, path=p), qs, 1)
                    methods[f"int8 {p} exact"] = (
                        lambda q, p=p, x=x, s=scales: exact(lambda: kernels.linear_int8(x, q, s, path=p)), qs, 1)
            if args.int4:
                for p in paths:
                    methods[f"int4 {p}"] = (
                        lambda q, p=p, x=x, sz=sz: kernels.linear_int4(x, q, sz, 128, path=p), packed, 0.5)
                    methods[f"int4 {p} exact"] = (
                        lambda q, p=p, x=x, sz=sz: exact(lambda: kernels.linear_int4(x, q, sz, 128, path=p)),
                        packed, 0.5)
            for label in [c for c in native if c in methods]:
                fn, weights, size = methods[label]
                kind = label.split()[0] if label.startswith(("int8", "int4")) else "bf16"
                for r in args.pass_rows:
                    if r != 1:
                        methods[f"{label} {r}r"] = (
                            lambda w, fn=fn, kind=kind, r=r: pass_rows(kind, r, lambda: fn(w)), weights, size)
            best: dict[str, float] = {}
            for _ in range(args.rounds):
                for label, (fn, weights, _) in methods.items():
                    repeat = 8 if name in HOT else 1

                    def run_all(fn=fn, weights=weights, repeat=repeat) -> None:
                        for _ in range(repeat):
                            for w in weights:
                                fn(w)
                    seconds = best_time(run_all, 1) / len(weights) / repeat
                    best[label] = min(best.get(label, math.inf), seconds)
                read_bw.append(bandwidth())
            results[(name, m)] = {label: n * k * methods[label][2] / best[label] / 1e9 for label in best}
            results[(name, m)]["_ms_torch"] = best["torch bf16"] * 1e3
            if paths and paths[-1] in best:
                results[(name, m)]["_ms_best"] = best[paths[-1]] * 1e3
        del ws, w32
        if args.int8:
            del qs
        if args.int4:
            del packed

    dram = max(read_bw)
    print(f"DRAM read bandwidth (float32 sum of 512 MiB, best of {len(read_bw)}): {dram:.1f} GB/s "
          f"(worst {min(read_bw):.1f})")
    print("GB/s of weights streamed (bf16: 2 B/weight, fp32: 4, int8: 1, int4: 0.5 + scales); % = of the read "
          "bandwidth")
    header = ["shape", "N x K", "M", *columns, "ms torch bf16", "ms best native"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for (name, m), row in results.items():
        n, k = SHAPES[name]
        cells = [name, f"{n}x{k}", str(m)]
        for c in columns:
            v = row.get(c)
            cells.append("-" if v is None else f"{v:.1f} ({100 * v / dram:.0f}%)")
        cells.append(f"{row['_ms_torch']:.3f}")
        cells.append(f"{row['_ms_best']:.3f}" if "_ms_best" in row else "-")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
