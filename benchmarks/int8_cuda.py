"""int8 weight-only on CUDA: each backend against bf16, and a direct load onto the GPU. Needs a CUDA device.

    python benchmarks/int8_cuda.py [--model /tmp/bench/InternVL2-1B] [--append]

1. Layers of InternVL2-8B's shapes (qkv 6144x4096, o 4096x4096, gate_up 28672x4096, down 4096x14336, LM head
   92553x4096): time per call (CUDA events, median of 50 after 10 warm-ups) at M = 1, 16, 256 and 2048 rows for
   bf16 ``F.linear``, and ``Int8Linear`` on "triton", "torch_cuda" (torch's own kernel) and "dequant" (what
   CUDA did before); each int8 result checked against the dequantized product (relative error); and the HBM
   floor of the int8 weight read (bytes / the device's measured copy bandwidth) beside the M = 1 times.
2. If ``--model`` exists: ``load_model(..., device_map="cuda", quantization="int8")`` in a child process, its
   peak host RSS and peak GPU memory against the bf16 load's.
Nothing here runs without a GPU (it says so and exits 0); the CPU checks of the same code are
tests/unit/test_triton_int8.py and tests/unit/test_direct_load.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (92553, 4096)}
ROWS = (1, 16, 256, 2048)


def timed(fn, repeats: int = 50, warmup: int = 10) -> float:
    """Median milliseconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a device-to-device copy of 1 GiB (read + write counted)."""
    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src), repeats=10, warmup=2)
    return 2 * src.numel() / (ms / 1e3)


def layers(device: torch.device) -> list[str]:
    from internvl_runtime.kernels.triton_int8 import triton_available
    from internvl_runtime.quantization import Int8Linear
    from internvl_runtime.quantization.linear import _has_kernel, dequantize_int8, int8_backend

    bandwidth = copy_bandwidth(device)
    lines = [f"device {torch.cuda.get_device_name(device)}, copy bandwidth {bandwidth / 1e9:.0f} GB/s, "
             f"int8 backend chosen: {int8_backend('cuda')} (triton installed: {triton_available()})", "",
             "| layer (N x K) | rows | bf16 ms | int8 triton ms | int8 torch_cuda ms | int8 dequant ms | "
             "int8 HBM floor ms | triton rel. error |", "|---|---|---|---|---|---|---|---|"]
    for name, (n, k) in SHAPES.items():
        linear = torch.nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16).requires_grad_(False)
        present = {"triton": triton_available(), "torch_cuda": _has_kernel("_weight_int8pack_mm", "CUDA"),
                   "dequant": True}
        backends = {b: Int8Linear.from_linear(linear, backend=b) for b, ok in present.items() if ok}
        reference = next(iter(backends.values()))
        weight = dequantize_int8(reference.weight, reference.scales)
        floor = n * k / bandwidth * 2 * 1e3       # int8 bytes read once (the copy figure counts read + write)
        for rows in ROWS:
            x = torch.randn(rows, k, device=device, dtype=torch.bfloat16)
            cells = [f"{timed(lambda x=x, w=linear.weight: F.linear(x, w)):.3f}"]
            for b in ("triton", "torch_cuda", "dequant"):
                layer = backends.get(b)
                if b == "torch_cuda" and rows > 256:      # one thread per output: minutes at prefill sizes
                    cells.append("skipped")
                else:
                    cells.append("-" if layer is None else f"{timed(lambda layer=layer, x=x: layer(x)):.3f}")
            error = "-"
            if "triton" in backends:
                exact = x.float() @ weight.t()
                error = f"{float((backends['triton'](x).float() - exact).norm() / exact.norm()):.1e}"
            floor_cell = f"{floor:.3f}" if rows == 1 else ""
            lines.append(f"| {name} ({n} x {k}) | {rows} | {' | '.join(cells)} | {floor_cell} | {error} |")
        del backends, linear, weight
        torch.cuda.empty_cache()
    return lines


def child_load(path: Path, mode: str) -> None:
    from internvl_runtime import loading

    torch.cuda.reset_peak_memory_stats()
    loading.load_model(path, dtype=torch.bfloat16, device_map="cuda", quantization=None if mode == "bf16" else mode)
    with open("/proc/self/status", encoding="ascii") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    print(json.dumps({"mode": mode, "host_peak_mib": peak,
                      "gpu_peak_mib": torch.cuda.max_memory_allocated() / 2**20,
                      "gpu_now_mib": torch.cuda.memory_allocated() / 2**20}))


def loads(path: Path) -> list[str]:
    lines = ["", "| load onto cuda | host peak RSS MiB | GPU peak MiB | GPU after MiB |", "|---|---|---|---|"]
    for mode in ("bf16", "int8"):
        out = subprocess.run([sys.executable, __file__, "--model", str(path), "--child-load", mode],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        lines.append(f"| {mode} | {r['host_peak_mib']:.0f} | {r['gpu_peak_mib']:.0f} | {r['gpu_now_mib']:.0f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("/tmp/bench/InternVL2-1B"))
    parser.add_argument("--append", action="store_true")
    parser.add_argument("--child-load", choices=["bf16", "int8"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing measured (the CPU checks are tests/unit/test_triton_int8.py)")
        return
    if args.child_load:
        child_load(args.model, args.child_load)
        return
    lines = layers(torch.device("cuda", 0))
    if (args.model / "config.json").is_file():
        lines += loads(args.model)
    text = "\n".join(lines)
    print(text)
    if args.append:
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        with RESULTS.open("a", encoding="utf-8") as f:
            f.write(f"\n### int8 on CUDA, {stamp}\n\n{text}\n")


if __name__ == "__main__":
    main()
