"""bfloat16 weights on a CPU without bf16 instructions: the upcast plan against plain float32.

Issue #8's target for such hosts (an AMD Zen 3 with AVX2 only): asked for bfloat16, keep the weights at 2
bytes and compute the heavy parts in float32 layer by layer; first token within 1.2x of the float32
path, decode at least as fast, peak memory near the bf16 size. Each mode runs in a fresh process
(peak RSS per mode), on a random-weight checkpoint with the InternVL2-1B shapes:

- ``float32``: weights loaded as float32 (what the official path needs on such a host);
- ``bf16-upcast``: bf16 weights, ``INTERNVL_COMPUTE=upcast``, decode on the AVX2 kernel
  (``INTERNVL_CPU_KERNEL=avx2``): on a host with bf16 instructions this reproduces the plan an AVX2
  host chooses by itself (the float32 GEMMs then run on this host's vector units in both modes alike).

    python benchmarks/upcast_plan.py [--checkpoint DIR] [--steps 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = {
    "float32": {"dtype": "float32", "env": {}},
    "bf16-upcast": {"dtype": "bfloat16", "env": {"INTERNVL_COMPUTE": "upcast", "INTERNVL_CPU_KERNEL": "avx2"}},
}


def child(checkpoint: Path, dtype_name: str, steps: int, rounds: int) -> dict:
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_engine import make_image, run_to_first_token
    from internvl_runtime import AutoModel, AutoTokenizer
    from internvl_runtime.engine.engine import EngineConfig, LLMEngine
    from internvl_runtime.engine.sampling_params import SamplingParams
    from internvl_runtime.processing.inputs import Message

    model = AutoModel.from_pretrained(checkpoint, torch_dtype=getattr(torch, dtype_name))
    engine = LLMEngine(model, AutoTokenizer.from_pretrained(checkpoint),
                       EngineConfig(num_blocks=512, enable_prefix_caching=False, image_cache_bytes=0))
    one = engine.processor.prepare([Message("user", "Describe the image.", [make_image(448, 448, 1)])], max_num=1)
    run_to_first_token(engine, one, "warm")
    ttft = min(run_to_first_token(engine, one, f"one-{i}") for i in range(rounds))
    prompt = engine.processor.prepare([Message("user", "hello " * 250)])
    decode = float("inf")
    for i in range(rounds):
        engine.add_request(f"d{i}", prompt, SamplingParams(max_new_tokens=steps + 4, ignore_eos=True, temperature=0))
        for _ in range(4):
            engine.step()
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        decode = min(decode, (time.perf_counter() - start) / steps)
        engine.abort_request(f"d{i}")
    with open("/proc/self/status", encoding="ascii") as f:
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    return {"ttft": ttft, "decode": decode, "peak": peak, "plan": model.compute_plan.describe()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=Path("/tmp/bench/InternVL2-1B"))
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", choices=list(MODES), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.checkpoint, MODES[args.child]["dtype"], args.steps, args.rounds)))
        return

    from internvl_runtime.hardware import describe_host

    if not (args.checkpoint / "config.json").is_file():
        from internvl_runtime.testing.checkpoints import write_checkpoint
        write_checkpoint(args.checkpoint, "1B", scale="real")
    print(f"host: {describe_host()}", flush=True)
    results = {}
    for mode, spec in MODES.items():
        env = {**os.environ, **spec["env"]}
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--checkpoint", str(args.checkpoint),
                              "--steps", str(args.steps), "--rounds", str(args.rounds)],
                             env=env, check=True, capture_output=True, text=True)
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{mode}: {results[mode]['plan']}", flush=True)
    f32, up = results["float32"], results["bf16-upcast"]
    print("\n| measure | float32 | bf16, upcast plan | ratio | target |")
    print("|---|---|---|---|---|")
    ttft_ratio = up["ttft"] / f32["ttft"]
    print(f"| first token, 1 tile | {f32['ttft']:.2f} s | {up['ttft']:.2f} s | {ttft_ratio:.2f}x | <= 1.2x: "
          f"{'met' if ttft_ratio <= 1.2 else 'NOT met'} |")
    dec_ratio = up["decode"] / f32["decode"]
    print(f"| decode, batch 1, ~280 ctx | {f32['decode'] * 1e3:.1f} ms | {up['decode'] * 1e3:.1f} ms | "
          f"{dec_ratio:.2f}x | <= 1.0x: {'met' if dec_ratio <= 1.0 else 'NOT met'} |")
    print(f"| peak RSS | {f32['peak'] / 2**30:.2f} GiB | {up['peak'] / 2**30:.2f} GiB | "
          f"{up['peak'] / f32['peak']:.2f}x | near the bf16 size |")


if __name__ == "__main__":
    main()
