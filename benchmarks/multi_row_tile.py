"""The AVX-512 BF16 multi-row bf16 tile (batched decode) against torch's bf16 GEMM (oneDNN) and the earlier tiles.

For each InternVL2-1B product shape and row count M it times, in CPU time of one thread (``time.thread_time``:
the work done, whatever else runs on a shared host), best of interleaved rounds:
  torch  F.linear in bf16 (oneDNN; what the plan used from 5 rows before the multi-row tile)
  old    kernels.linear_bf16 with the multi-row tile off (the 4 x 4 / one-row kBf16Dp tiles)
  w44    the multi-row tile, 4 activation rows x 4 weight rows
  w82    the multi-row tile, 8 activation rows x 2 weight rows
  w64    the multi-row tile, 6 activation rows x 4 weight rows (24 accumulators; row blocks as even as can be)
  w83    the multi-row tile, 8 activation rows x 3 weight rows (24 accumulators)
  auto   the multi-row tile in the shape the kernel picks by K and M (what linear_bf16 and decode_layers run)
(all prefetch 2 tiles ahead into L2; the earlier wL1 column, the next tile into L1, lost everywhere)
and prints GFLOP/s and each result's relative error against fp32. "hot" shapes keep one weight copy in cache
(the compute rate); the model's shapes rotate copies worth 64 MB so that the weights come from DRAM, as in a
decode step (on a loaded host that measures the memory bandwidth left, not the tile).

    python benchmarks/multi_row_tile.py 5 8 16 [--shapes hot896 hot4864 gate_up]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from internvl_runtime import kernels  # noqa: E402
from internvl_runtime.hardware import describe_host  # noqa: E402

SHAPES = {"hot896": (512, 896), "hot4864": (96, 4864), "qkv": (1152, 896), "o": (896, 896),
          "gate_up": (9728, 896), "down": (896, 4864), "lm_head": (151655, 896)}

Product = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def ours(rows: int, shape: int, prefetch: tuple[int, int] = (2, 2)) -> Product:
    def product(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        torch.ops.internvl_kernels._set_wide_bf16(rows, shape)
        torch.ops.internvl_kernels._set_wide_prefetch(*prefetch)
        return kernels.linear_bf16(x, w, None, path="avx512bf16")
    return product


def best(fn: Callable[[], object], repeat: int) -> float:
    fastest = float("inf")
    for _ in range(repeat):
        start = time.thread_time()
        fn()
        fastest = min(fastest, time.thread_time() - start)
    return fastest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rows", type=int, nargs="*", default=[5, 8, 16])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if kernels.missing_flags("avx512bf16"):
        sys.exit(f"this CPU lacks {kernels.missing_flags('avx512bf16')}: no multi-row tile to time")
    if not kernels.available():   # builds or loads the library, which registers the operators
        sys.exit(f"no native kernels: {kernels.describe()}")
    torch.set_num_threads(1)
    print(describe_host(), flush=True)
    products: dict[str, Product] = {"torch": lambda x, w: F.linear(x, w), "old": ours(0, 0),
                                    "w44": ours(1, 44), "w82": ours(1, 82), "w64": ours(1, 64), "w83": ours(1, 83),
                                    "auto": ours(1, 0)}
    try:
        for name in args.shapes:
            n, k = SHAPES[name]
            copies = 1 if name.startswith("hot") else max(1, int(64e6 // (n * k * 2)))
            weights = [torch.randn(n, k).to(torch.bfloat16) for _ in range(copies)]
            for m in args.rows:
                x = torch.randn(m, k).to(torch.bfloat16)
                ref = F.linear(x.float(), weights[0].float())
                seconds: dict[str, float] = {}
                repeat = 3 if name == "lm_head" else 8
                for _ in range(args.rounds):
                    for label, product in products.items():
                        def run(product: Product = product, x: torch.Tensor = x,
                                weights: list[torch.Tensor] = weights) -> None:
                            for w in weights:
                                product(x, w)
                        seconds[label] = min(seconds.get(label, float("inf")), best(run, repeat) / copies)
                flops = 2 * m * n * k
                cells = []
                for label, product in products.items():
                    err = float((product(x, weights[0]).float() - ref).norm() / ref.norm())
                    cells.append(f"{label} {flops / seconds[label] / 1e9:6.1f} GFLOP/s (err {err:.0e})")
                print(f"{name:8s} M={m:2d} " + " | ".join(cells), flush=True)
    finally:
        torch.ops.internvl_kernels._set_wide_bf16(5, 0)
        torch.ops.internvl_kernels._set_wide_prefetch(2, 2)


if __name__ == "__main__":
    main()
