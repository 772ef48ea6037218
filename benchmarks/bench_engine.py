"""Engine benchmark on a random-weight checkpoint with the exact InternVL2-1B shapes and names.

Prints figures and ratios against ceilings measured in the same run (never a test):
  (a) decode ms/token at batch 1 (~280-token context, greedy) vs the floor  weight bytes / read bandwidth
  (b) time to first token for one 448 tile and for 6 tiles + thumbnail; vision-encoder FLOP/s vs
      the matmul rate measured at the encoder's shapes
  (c) output tokens/s with 1, 4, 8, 16 concurrent requests
  (d) time to first token of a second turn about the same image, with and without reuse
  (e) peak memory (RSS)

    python benchmarks/bench_engine.py [--checkpoint DIR] [--dtype bfloat16] [--record] [--parts ac]

The checkpoint is written on the fly (never committed) into ~/.cache/internvl_runtime/bench/ unless given.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import resource
import sys
import time
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from internvl_runtime import AutoModel, AutoTokenizer  # noqa: E402
from internvl_runtime.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from internvl_runtime.engine.sampling_params import SamplingParams  # noqa: E402
from internvl_runtime.hardware import describe_host  # noqa: E402
from internvl_runtime.processing.inputs import Message  # noqa: E402
from internvl_runtime.testing.checkpoints import write_checkpoint  # noqa: E402


def timed(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def read_bandwidth() -> float:
    """Bytes/s reading a 1 GiB float32 tensor (a sum: one pass, vectorised, all threads)."""
    x = torch.ones(2**28, dtype=torch.float32)
    seconds = timed(lambda: x.sum(), repeat=5)
    return x.numel() * 4 / seconds


def matmul_rate(m: int, k: int, n: int, dtype: torch.dtype) -> float:
    a = torch.randn(m, k).to(dtype)
    b = torch.randn(k, n).to(dtype)
    seconds = timed(lambda: a @ b, repeat=5)
    return 2 * m * k * n / seconds


def vision_matmul_dtype(model) -> torch.dtype:
    """The dtype the vision encoder's matmuls run in under the model's compute plan (``compute_plan.py``):
    float32 under the upcast plan (16-bit weights on a CPU without 16-bit instructions), else the weights'.
    The vision floor must use the matmul rate of THIS dtype: on an AVX2-only host torch's bf16 matmul is
    ~100x slower than the float32 one the plan actually runs."""
    plan = getattr(model, "compute_plan", None)
    if plan is not None and getattr(plan, "upcast_16bit", False):
        return torch.float32
    return next(model.vision_model.parameters()).dtype


def vision_matmul_rate(model) -> tuple[float, torch.dtype]:
    """(FLOP/s, dtype) of torch's matmul at the vision encoder's shapes, in the dtype the plan computes in."""
    v = model.config.vision
    dtype = vision_matmul_dtype(model)
    return matmul_rate((v.image_size // v.patch_size) ** 2 + 1, v.hidden_size, v.intermediate_size, dtype), dtype


def vit_flops_per_tile(model) -> float:
    v = model.config.vision
    tokens = (v.image_size // v.patch_size) ** 2 + 1
    d, ff = v.hidden_size, v.intermediate_size
    per_layer = 2 * tokens * d * (3 * d + d + 2 * ff) + 2 * 2 * tokens * tokens * d
    patch = 2 * (tokens - 1) * 3 * v.patch_size ** 2 * d
    proj_in = d * 4
    llm = model.config.llm.hidden_size
    mlp1 = 2 * (tokens - 1) // 4 * (proj_in * llm + llm * llm)
    return v.num_hidden_layers * per_layer + patch + mlp1


def decode_weight_bytes(model) -> int:
    """Bytes of weights one decode step reads: every LLM linear layer and the LM head."""
    lm = model.language_model
    total = sum(p.numel() * p.element_size() for n, p in lm.named_parameters() if "embed_tokens" not in n)
    if lm.config.tie_word_embeddings:
        total += lm.lm_head.weight.numel() * lm.lm_head.weight.element_size()
    return total


def make_image(width: int, height: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(height, width, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


def run_to_first_token(engine: LLMEngine, request, rid: str) -> float:
    start = time.perf_counter()
    engine.add_request(rid, request, SamplingParams(max_new_tokens=1, temperature=0))
    while engine.has_unfinished_requests():
        engine.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=Path.home() / ".cache/internvl_runtime/bench/InternVL2-1B")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    parser.add_argument("--parts", default="abcde", help="which measures to run (letters of a-e; default all)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16],
                        help="(c): concurrent request counts (the first is the baseline of the ratio)")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if not (args.checkpoint / "config.json").is_file():
        print(f"writing a random-weight InternVL2-1B-shaped checkpoint to {args.checkpoint} ...", flush=True)
        write_checkpoint(args.checkpoint, "1B", scale="real")

    host = describe_host()
    print(host, flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    bandwidth = read_bandwidth() if "a" in args.parts else 0.0
    model = AutoModel.from_pretrained(args.checkpoint, torch_dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    vit_rate, vit_dtype = vision_matmul_rate(model) if "b" in args.parts else (0.0, dtype)
    rows: list[tuple[str, str, str]] = []

    engine = LLMEngine(model, tokenizer, EngineConfig(num_blocks=2048, max_num_seqs=max(16, *args.concurrency)))
    # (a) decode at batch 1, ~280-token context
    if "a" in args.parts:
        prompt = engine.processor.prepare([Message("user", "hello " * 250)])
        # greedy, as llama.cpp's llama-bench (which samples nothing) is compared with; sampling at temperature
        # 1 adds a few vocabulary-sized passes (softmax, cumulative sum) per token
        engine.add_request("decode", prompt, SamplingParams(max_new_tokens=args.decode_steps + 4, ignore_eos=True,
                                                            temperature=0))
        engine.step()
        for _ in range(3):
            engine.step()
        start = time.perf_counter()
        for _ in range(args.decode_steps):
            engine.step()
        decode = (time.perf_counter() - start) / args.decode_steps
        engine.abort_request("decode")
        floor = decode_weight_bytes(model) / bandwidth
        rows.append(("(a) decode, batch 1, ~280 ctx", f"{decode * 1e3:.1f} ms/token",
                     f"floor {floor * 1e3:.1f} ms ({decode_weight_bytes(model) / 1e9:.2f} GB at "
                     f"{bandwidth / 1e9:.1f} GB/s)"
                     f" -> {floor / decode:.0%} of floor (target >= 70%)"))

    # (b) first token: 1 tile, 6 tiles + thumbnail; vision throughput
    if "b" in args.parts:
        one = engine.processor.prepare([Message("user", "Describe the image.", [make_image(448, 448, 1)])],
                                       max_num=1)
        ttft1 = run_to_first_token(engine, one, "one")
        seven = engine.processor.prepare([Message("user", "Describe the image.", [make_image(1344, 896, 2)])],
                                         max_num=6)
        ttft7 = run_to_first_token(engine, seven, "seven")
        pixels = one.images[0].pixel_values
        vision = timed(lambda: model.extract_feature(pixels), repeat=2)
        flops = vit_flops_per_tile(model)
        rows.append(("(b) first token, 1 tile", f"{ttft1:.2f} s", f"{len(one.prompt_token_ids)} prompt tokens"))
        rows.append((f"(b) first token, {seven.images[0].num_tiles} tiles", f"{ttft7:.2f} s",
                     f"{len(seven.prompt_token_ids)} prompt tokens"))
        rows.append(("(b) vision encoder + mlp1, 1 tile", f"{vision:.2f} s",
                     f"{flops / vision / 1e9:.0f} GFLOP/s vs {str(vit_dtype).removeprefix('torch.')} matmul "
                     f"{vit_rate / 1e9:.0f} GFLOP/s (the compute plan's) -> "
                     f"{flops / vision / vit_rate:.0%} (target >= 60%)"))

    # (c) throughput with concurrent requests (one untimed warm-up: oneDNN builds its GEMM kernels
    # for each new row count on first use, which would otherwise be charged to whichever n runs first)
    if "c" in args.parts:
        warm = [engine.processor.prepare([Message("user", f"Warm-up {i}.")]) for i in range(16)]
        engine.generate(warm, SamplingParams(max_new_tokens=4, ignore_eos=True))
        rates = {}
        for n in args.concurrency:
            requests = [engine.processor.prepare([Message("user", f"Request {i}: tell me a story about number {i}.")])
                        for i in range(n)]
            params = SamplingParams(max_new_tokens=32, ignore_eos=True)
            start = time.perf_counter()
            outs = engine.generate(requests, params)
            seconds = time.perf_counter() - start
            rates[n] = sum(len(o.token_ids) for o in outs) / seconds
        base, top = args.concurrency[0], args.concurrency[-1]
        rows.append((f"(c) output tokens/s, {'/'.join(map(str, args.concurrency))} concurrent",
                     " / ".join(f"{rates[n]:.1f}" for n in args.concurrency),
                     f"{top} vs {base}: {rates[top] / rates[base]:.1f}x (target >= 6x at 16 vs 1)"))

    # (d) second turn about the same image, with and without reuse
    if "d" in args.parts:
        image = make_image(800, 600, 3)
        first = [Message("user", "Describe the image.", [image])]
        out = engine.generate([engine.processor.prepare(first, max_num=6)], SamplingParams(max_new_tokens=16))[0]
        second = [*first, Message("assistant", out.text), Message("user", "What colour dominates?")]
        with_reuse = run_to_first_token(engine, engine.processor.prepare(second, max_num=6), "turn2")
        cold = LLMEngine(model, tokenizer,
                         EngineConfig(num_blocks=2048, enable_prefix_caching=False, image_cache_bytes=0))
        without = run_to_first_token(cold, cold.processor.prepare(second, max_num=6), "turn2-cold")
        rows.append(("(d) second turn first token, reuse / none", f"{with_reuse:.2f} s / {without:.2f} s",
                     f"{without / with_reuse:.0f}x faster (target >= 10x)"))

    # (e) peak memory
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    rows.append(("(e) peak RSS", f"{peak:.2f} GiB", f"weights {weights:.2f} GiB"))

    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    table = [f"### Engine, InternVL2-1B shapes, {args.dtype}, {stamp}", "", f"Host: {host}", "",
             "| measure | value | against |", "|---|---|---|"]
    table += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    print("\n".join(table))
    if args.record:
        results = ROOT / "benchmarks" / "RESULTS.md"
        existing = results.read_text(encoding="utf-8") if results.exists() else "# Benchmark results\n"
        results.write_text(existing.rstrip("\n") + "\n\n" + "\n".join(table) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
