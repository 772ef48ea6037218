"""Where the time of bench_engine's part (c) goes: N concurrent requests through ``LLMEngine.step``, profiled.

The same requests as ``bench_engine.py --parts c`` (after the same warm-up: its prompts share the system
prompt, so the prefix cache holds it and each request prefills only its own ~30 tokens): N requests of 32
sampled tokens (temperature 1) are added at once and stepped to the end. It prints the CPU time of the whole
run and of each step (the first one is the prefill of all N), the output tokens per CPU second, and cProfile's
functions by own time (``--sort``), measured in CPU time (``time.process_time``; ``--clock wall``: wall time,
which with ``--threads 2`` shows the part of a step that runs on one thread). With ``--threads 1`` (the default) CPU
time is the work done whatever else runs on the host, which is what makes the figures usable on a shared one;
the wall-clock ratio bench_engine reports also depends on how 2 threads scale at 1 and at N rows.

    python benchmarks/batched_decode_profile.py --checkpoint /tmp/bench/InternVL2-1B --concurrency 16
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from internvl_runtime import AutoModel, AutoTokenizer  # noqa: E402
from internvl_runtime.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from internvl_runtime.engine.sampling_params import SamplingParams  # noqa: E402
from internvl_runtime.hardware import describe_host  # noqa: E402
from internvl_runtime.processing.inputs import Message  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=Path.home() / ".cache/internvl_runtime/bench/InternVL2-1B")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--top", type=int, default=20, help="functions listed")
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                        help="cpu: time.process_time (usable on a shared host); wall: time.perf_counter (what "
                             "bench_engine measures: with --threads 2 it shows the serial part of a step)")
    parser.add_argument("--sort", default="tottime", help="pstats order: tottime (own CPU time), cumulative, ...")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    print(describe_host(), f"| load average {os.getloadavg()[0]:.1f}", flush=True)
    model = AutoModel.from_pretrained(args.checkpoint, torch_dtype=torch.bfloat16)
    print(model.compute_plan.describe(), flush=True)
    engine = LLMEngine(model, AutoTokenizer.from_pretrained(args.checkpoint),
                       EngineConfig(num_blocks=2048, max_num_seqs=max(16, args.concurrency)))
    warm = [engine.processor.prepare([Message("user", f"Warm-up {i}.")]) for i in range(16)]
    engine.generate(warm, SamplingParams(max_new_tokens=4, ignore_eos=True))
    n = args.concurrency
    params = SamplingParams(max_new_tokens=args.tokens, ignore_eos=True)
    for i in range(n):
        request = engine.processor.prepare([Message("user", f"Request {i}: tell me a story about number {i}.")])
        engine.add_request(f"r{i}", request, params)
    profile = cProfile.Profile(clock)
    steps: list[float] = []
    start = clock()
    profile.enable()
    while engine.has_unfinished_requests():
        begin = clock()
        engine.step()
        steps.append(clock() - begin)
    profile.disable()
    total = clock() - start
    print(f"{n} requests x {args.tokens} tokens, {args.threads} thread(s): {total:.2f} s {args.clock}, "
          f"{n * args.tokens / total:.1f} output tokens per {args.clock} second; "
          f"first step (prefill) {steps[0] * 1e3:.0f} ms, "
          f"decode steps median {statistics.median(steps[1:]) * 1e3:.1f} ms "
          f"(load average now {os.getloadavg()[0]:.1f})")
    pstats.Stats(profile).sort_stats(args.sort).print_stats(args.top)


if __name__ == "__main__":
    main()
