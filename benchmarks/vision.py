"""Vision encoder + mlp1 throughput per 448 tile, against the matmul rate at the encoder's own shapes.

Builds the model from a random-weight checkpoint with the real InternVL2-1B shapes (InternViT-300M:
24 layers, hidden 1024, 16 heads, 1025 tokens, MLP 4096; then pixel shuffle + mlp1 to 896) and prints:

- the host line (CPU model, flags, torch capability, threads) and the compute plan;
- ``extract_feature`` seconds per tile for one tile and for a batch of --batch tiles (best of --rounds);
- the bf16 matmul rate (plain ``a @ w.T``) at each linear shape of the encoder, their FLOP-weighted
  rate, the achieved GFLOP/s and its % of that rate, and the floor (every FLOP at that rate);
- with --compare, the same per-tile time with the vision fast path off (the plain eager path) and, where
  the native attention kernel runs (``kernels.vision_attention``: avx512_bf16, bf16, not the upcast plan),
  with the fast path but torch's SDPA for attention ($INTERNVL_CPU_KERNEL=torch), so before/after ratios
  come from one process;
- with --profile, a torch.profiler breakdown by op and by kind of work for one tile.

Every measure is taken once per round and rounds are interleaved (best kept), so other processes on a
shared machine slow all columns alike; compare ratios, not absolute seconds, across runs.

    python benchmarks/vision.py [--checkpoint DIR] [--dtype bfloat16] [--rounds 5] [--batch 7]
                                [--compare] [--profile]

The checkpoint is written on the fly (never committed) when DIR has no config.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from internvl_runtime import AutoModel, kernels  # noqa: E402
from internvl_runtime.hardware import cpu_flags, describe_host  # noqa: E402
from internvl_runtime.models.vision import intern_vit  # noqa: E402
from internvl_runtime.testing.checkpoints import write_checkpoint  # noqa: E402


def once(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def gemm_shapes(model) -> dict[str, tuple[int, int, int, int]]:
    """name: (M, K, N, count per tile) of every linear layer of the encoder and mlp1."""
    v = model.config.vision
    tokens = (v.image_size // v.patch_size) ** 2 + 1
    d, ff, layers = v.hidden_size, v.intermediate_size, v.num_hidden_layers
    rows = (tokens - 1) // 4
    llm = model.config.llm.hidden_size
    qkv_out = 3 * d
    return {
        "qkv": (tokens, d, qkv_out, layers),
        "proj": (tokens, d, d, layers),
        "fc1": (tokens, d, ff, layers),
        "fc2": (tokens, ff, d, layers),
        "mlp1.1": (rows, 4 * d, llm, 1),
        "mlp1.3": (rows, llm, llm, 1),
    }


def flops_per_tile(model) -> dict[str, float]:
    v = model.config.vision
    tokens = (v.image_size // v.patch_size) ** 2 + 1
    out = {name: 2.0 * m * k * n * c for name, (m, k, n, c) in gemm_shapes(model).items()}
    out["attention"] = 2 * 2.0 * tokens * tokens * v.hidden_size * v.num_hidden_layers
    out["patch"] = 2.0 * (tokens - 1) * v.num_channels * v.patch_size ** 2 * v.hidden_size
    return out


class Matmul:
    """``a @ w.T`` in the model's dtype at one shape (F.linear without bias, as torch computes it)."""

    def __init__(self, m: int, k: int, n: int, dtype: torch.dtype) -> None:
        self.a = torch.randn(m, k).to(dtype)
        self.w = (torch.randn(n, k) / k ** 0.5).to(dtype)
        self.flops = 2.0 * m * k * n

    def __call__(self) -> torch.Tensor:
        return F.linear(self.a, self.w)


def profile_tile(model, pixels: torch.Tensor) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        model.extract_feature(pixels)
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=56))
    print(prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=40, max_shapes_column_width=70))
    kinds = {
        "matmul (addmm/mm/linear, oneDNN linear)": ("addmm", "aten::mm", "_linear_pointwise", "mkldnn_linear"),
        "attention (SDPA)": ("scaled_dot_product", "flash_attention", "_efficient_attention"),
        "patch conv": ("convolution",),
        "layer/rms norm": ("layer_norm", "rms_norm"),
        "gelu": ("gelu",),
        "copies / dtype conversions": ("copy_", "aten::to", "_to_copy", "clone", "contiguous"),
        "elementwise (add/mul/addcmul)": ("aten::add", "aten::mul", "addcmul", "aten::div"),
        "cat / interpolate": ("aten::cat", "upsample", "interpolate"),
    }
    total = sum(e.self_cpu_time_total for e in events)
    found = dict.fromkeys(kinds, 0.0)
    other = 0.0
    for e in events:
        for kind, keys in kinds.items():
            if any(key in e.key for key in keys):
                found[kind] += e.self_cpu_time_total
                break
        else:
            other += e.self_cpu_time_total
    print("\nself CPU time by kind of work (one tile):")
    for kind, us in [*found.items(), ("other", other)]:
        print(f"  {kind:42s} {us / 1e3:9.1f} ms  {us / total:6.1%}")
    print(f"  {'total':42s} {total / 1e3:9.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/bench/InternVL2-1B"))
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds for one tile; best kept")
    parser.add_argument("--batch", type=int, default=7, help="tiles in the batched measure (0: skip)")
    parser.add_argument("--batch-rounds", type=int, default=2)
    parser.add_argument("--compare", action="store_true",
                        help="also time the plain eager path (fast path off), interleaved")
    parser.add_argument("--profile", action="store_true", help="torch.profiler breakdown of one tile")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if not (args.checkpoint / "config.json").is_file():
        print(f"writing a random-weight InternVL2-1B-shaped checkpoint to {args.checkpoint} ...", flush=True)
        write_checkpoint(args.checkpoint, "1B", scale="real")

    print(describe_host())
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
              "amx_tile", "amx_bf16")
    print("CPU flags:", " ".join(f for f in wanted if f in cpu_flags()) or "none")
    model = AutoModel.from_pretrained(args.checkpoint, torch_dtype=dtype).eval()
    print(model.compute_plan.describe())
    v = model.config.vision

    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(1, 3, v.image_size, v.image_size, generator=g).to(dtype)
    flops = flops_per_tile(model)
    total_flops = sum(flops.values())
    shapes = gemm_shapes(model)
    # the rate of the dtype the encoder computes in: float32 under the upcast plan (CPUs without bf16 instructions)
    rate_dtype = torch.float32 if model.compute_plan.upcast_16bit else dtype
    probes = {name: Matmul(m, k, n, rate_dtype) for name, (m, k, n, _) in shapes.items()}

    first_attention = model.vision_model.encoder.layers[0].attn
    native = dtype == torch.bfloat16 and intern_vit.native_attention(first_attention, pixels.new_empty(1))
    print(f"vision attention: {'native kernel (kernels.vision_attention)' if native else 'torch SDPA'}")
    # modes: "fast" (the default path), "plain" (fast path off), "sdpa" (fast path, torch attention)
    modes = ["fast", "plain", "sdpa"] if args.compare and native else ["fast", "plain"] if args.compare else ["fast"]
    suffix = {"fast": "", "plain": " (plain path)", "sdpa": " (torch attention)"}

    def run(mode: str, fn: Callable[[], object]) -> float:
        intern_vit.set_vision_fast_path(mode != "plain")
        saved = os.environ.get(kernels.ENV_VAR)
        if mode == "sdpa":
            os.environ[kernels.ENV_VAR] = "torch"
        try:
            return once(fn)
        finally:
            intern_vit.set_vision_fast_path(True)
            if saved is None:
                os.environ.pop(kernels.ENV_VAR, None)
            else:
                os.environ[kernels.ENV_VAR] = saved

    def tile(mode: str) -> float:
        return run(mode, lambda: model.extract_feature(pixels))

    with torch.inference_mode():
        for mode in modes:                  # warm-up (oneDNN primitives, packing)
            tile(mode)
            tile(mode)
        for probe in probes.values():
            probe()
        best: dict[str, float] = {}

        def keep(name: str, seconds: float) -> None:
            best[name] = min(best.get(name, float("inf")), seconds)

        for _ in range(args.rounds):
            for mode in modes:
                keep("tile" + suffix[mode], tile(mode))
            for name, probe in probes.items():
                keep(name, min(once(probe) for _ in range(2)))
        if args.batch:
            batch = torch.randn(args.batch, 3, v.image_size, v.image_size, generator=g).to(dtype)
            model.extract_feature(batch)
            for _ in range(args.batch_rounds):
                for mode in modes:
                    keep("batch" + suffix[mode], run(mode, lambda: model.extract_feature(batch)))

        rates = {name: probes[name].flops / best[name] for name in probes}
        gemm_flops = {name: flops[name] for name in probes}
        gemm_time = sum(gemm_flops[name] / rates[name] for name in probes)
        rate = sum(gemm_flops.values()) / gemm_time           # FLOP-weighted rate at the encoder's shapes
        print(f"\nmatmul rate at the encoder's shapes ({str(rate_dtype).removeprefix('torch.')}, a @ w.T, "
              f"best of {args.rounds}):")
        for name, (m, k, n, count) in shapes.items():
            print(f"  {name:7s} {m:5d}x{k:<5d} @ {k:5d}x{n:<5d} x{count:<3d} {rates[name] / 1e9:7.1f} GFLOP/s")
        print(f"  FLOP-weighted: {rate / 1e9:.1f} GFLOP/s")
        print(f"\nFLOPs per tile: {total_flops / 1e9:.1f} G (linear {sum(gemm_flops.values()) / 1e9:.1f}, "
              f"attention {flops['attention'] / 1e9:.1f}, patch conv {flops['patch'] / 1e9:.1f})")
        floor = total_flops / rate
        rows = [("tile" + suffix[mode], 1) for mode in modes]
        if args.batch:
            rows += [("batch" + suffix[mode], args.batch) for mode in modes]
        print(f"floor (every FLOP at {rate / 1e9:.0f} GFLOP/s): {floor:.3f} s per tile\n")
        for name, tiles in rows:
            per_tile = best[name] / tiles
            variant = name.partition(" ")[2]
            label = f"vision + mlp1, {tiles} tile{'s' if tiles > 1 else ''}{' ' + variant if variant else ''}"
            print(f"  {label:45s} {per_tile:7.3f} s/tile  {total_flops / per_tile / 1e9:6.1f} GFLOP/s  "
                  f"{total_flops / per_tile / rate:6.1%} of the matmul rate  ({per_tile / floor:.2f}x floor)")
        if args.compare:
            print(f"\n  fast path vs plain path, 1 tile: {best['tile (plain path)'] / best['tile']:.3f}x faster")
            if args.batch:
                print(f"  fast path vs plain path, {args.batch} tiles: "
                      f"{best['batch (plain path)'] / best['batch']:.3f}x faster")
            if "sdpa" in modes:
                print(f"  native attention vs torch SDPA (both fast path), 1 tile: "
                      f"{best['tile (torch attention)'] / best['tile']:.3f}x faster "
                      f"({best['tile (torch attention)']:.3f} -> {best['tile']:.3f} s)")
                if args.batch:
                    print(f"  native attention vs torch SDPA, {args.batch} tiles: "
                          f"{best['batch (torch attention)'] / best['batch']:.3f}x faster "
                          f"({best['batch (torch attention)'] / args.batch:.3f} -> {best['batch'] / args.batch:.3f}"
                          f" s/tile)")
        if args.profile:
            print()
            profile_tile(model, pixels)


if __name__ == "__main__":
    main()
