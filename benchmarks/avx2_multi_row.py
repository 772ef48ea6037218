"""The AVX2 multi-row products (path 0: AVX2-only hosts) against float32 F.linear (MKL / oneDNN capped at AVX2).

For each InternVL2-1B product shape and row count M it times, in CPU time of one thread (``time.thread_time``:
the work done, whatever else runs on a shared host), best of interleaved rounds:
  f32     F.linear on float32 weights (MKL at AVX2: the reference rate of this host's float32 GEMM)
  stream  kernels.linear_bf16, path avx2, with the panel tiles off (the stream tiles: one-row, then 4 x 2)
  panel   kernels.linear_bf16, path avx2, the panel tiles (4 weight rows widened once, 3 x 4 register tile)
  f32s / f32p  kernels.linear_f32, path avx2, on float32 weights: stream / panel tiles (with --f32)
and prints GFLOP/s and each result's relative error against fp32. "hot" shapes keep one weight copy in cache
(the compute rate); the model's shapes rotate copies worth 64 MB so that the weights come from DRAM, as in a
decode step (on a loaded host that measures the memory bandwidth left, not the tile).

The AVX2 proxy (llamacpp_side_by_side.AVX2_PROXY_ENV's GEMM caps) is set here before torch loads, so on an
AVX-512 host torch's float32 GEMM runs at AVX2 as on an AVX2-only one.

    taskset -c 0 python benchmarks/avx2_multi_row.py 1 4 8 16 [--shapes hot896 gate_up] [--f32]
"""

from __future__ import annotations

import os

for _name, _value in {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                      "ATEN_CPU_CAPABILITY": "avx2"}.items():
    os.environ.setdefault(_name, _value)

import argparse  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from internvl_runtime import kernels  # noqa: E402
from internvl_runtime.hardware import describe_host  # noqa: E402
from multi_row_tile import SHAPES, best  # noqa: E402  (benchmarks/: the script's own folder)

# (x, bf16 weight, fp32 weight) -> output
Product = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def bf16(panel_rows: int) -> Product:
    def product(x: torch.Tensor, w: torch.Tensor, wf: torch.Tensor) -> torch.Tensor:
        torch.ops.internvl_kernels._set_avx2_panel(panel_rows, 0)
        return kernels.linear_bf16(x, w, None, path="avx2")
    return product


def f32(panel_rows: int) -> Product:
    def product(x: torch.Tensor, w: torch.Tensor, wf: torch.Tensor) -> torch.Tensor:
        torch.ops.internvl_kernels._set_avx2_panel(panel_rows, 0)
        return kernels.linear_f32(x.float(), wf, None, path="avx2")
    return product


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rows", type=int, nargs="*", default=[1, 4, 8, 16])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--f32", action="store_true", help="also the fp32-weight kernels (linear_f32)")
    parser.add_argument("--kc", type=int, default=0, help="the panel tiles' K block (0: the default)")
    args = parser.parse_args()
    if kernels.missing_flags("avx2"):
        sys.exit(f"this CPU lacks {kernels.missing_flags('avx2')}")
    if not kernels.available():   # builds or loads the library, which registers the operators
        sys.exit(f"no native kernels: {kernels.describe()}")
    torch.set_num_threads(1)
    print(describe_host(), flush=True)
    products: dict[str, Product] = {"f32": lambda x, w, wf: F.linear(x.float(), wf), "stream": bf16(0),
                                    "panel": bf16(1)}
    if args.f32:
        products.update({"f32s": f32(0), "f32p": f32(1)})
    previous = torch.ops.internvl_kernels._set_avx2_panel(1, args.kc)
    try:
        for name in args.shapes:
            n, k = SHAPES[name]
            copies = 1 if name.startswith("hot") else max(1, int(64e6 // (n * k * 2)))
            weights = [torch.randn(n, k).to(torch.bfloat16) for _ in range(copies)]
            # fp32 weights: as many bytes as the bf16 copies (half the copies), so they too come from DRAM
            floats = [w.float() for w in weights[:max(1, copies // 2)]]
            for m in args.rows:
                x = torch.randn(m, k).to(torch.bfloat16)
                ref = F.linear(x.float(), weights[0].float())
                seconds: dict[str, float] = {}
                repeat = 3 if name == "lm_head" else 8
                for _ in range(args.rounds):
                    for label, product in products.items():
                        def run(product: Product = product, x: torch.Tensor = x, weights: list[torch.Tensor] = weights,
                                floats: list[torch.Tensor] = floats) -> None:
                            for i, w in enumerate(weights):
                                product(x, w, floats[i % len(floats)])
                        seconds[label] = min(seconds.get(label, float("inf")), best(run, repeat) / copies)
                flops = 2 * m * n * k
                cells = []
                for label, product in products.items():
                    err = float((product(x, weights[0], floats[0]).float() - ref).norm() / ref.norm())
                    cells.append(f"{label} {flops / seconds[label] / 1e9:6.1f} (err {err:.0e})")
                print(f"{name:8s} M={m:2d} GFLOP/s " + " | ".join(cells), flush=True)
    finally:
        torch.ops.internvl_kernels._set_avx2_panel(previous, 1024)


if __name__ == "__main__":
    main()
