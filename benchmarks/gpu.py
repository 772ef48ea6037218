"""GPU serving benchmark (issue #17): InternVL2-1B and 8B shapes with random weights, one GPU, < 8 min on an H200.

    python benchmarks/gpu.py                                   # cuda, 1B and 8B real shapes
    python benchmarks/gpu.py --models 1B --concurrency 32      # quicker
    python benchmarks/gpu.py --device cpu --scale tiny         # dry run of the whole script (the tests run it)

For each model (the checkpoint written first by ``testing/checkpoints.py``, its values drawn on the device):

- ``load``: seconds to load it through ``LLMEngine.from_pretrained`` (the engine: model, tokenizer, KV cache);
- ``decode b1``: output tok/s of one request (~270-token prompt) once its prefill is done, against the
  **HBM floor** measured in the same run: the LLM's weight bytes (embeddings excluded) / the GB/s of a large
  device copy (read + write counted, as the roofline of a decode step that streams every weight once);
- ``ttft 1 tile``: first token of a request with one 448x448 image (1 tile), after a warm-up request;
- ``C concurrent``: output tok/s of C requests with one 448 image each (distinct images), 128 new tokens
  each, all queued at once; and their median first-token time;
- ``preprocess / encode``: images/s the host prepares those requests at (8 threads, as the server's
  workers; the exact path) beside images/s the vision encoder takes (one 448 tile per image, batches of 32);
- ``peak GPU memory``: ``torch.cuda.max_memory_allocated`` over the model's runs;
- ``official``: the reference implementation on the same device (transformers 4.37.2 with the official
  ``*.py`` files of ``--official-code``): its first token with one tile and its decode tok/s. Skipped, with a
  line saying why, when transformers 4.37.2 is not importable or no official code is given (a random-weight
  checkpoint carries none).

The last line printed is the JSON summary (also written to ``--out``, default ``$OUT/gpu_bench.json`` when
``$OUT`` is set).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from internvl_runtime.engine.engine import LLMEngine  # noqa: E402
from internvl_runtime.engine.sampling_params import SamplingParams  # noqa: E402
from internvl_runtime.processing.inputs import Message, PreparedRequest  # noqa: E402
from internvl_runtime.testing.checkpoints import write_checkpoint  # noqa: E402

T0 = time.monotonic()


def log(message: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {message}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (cpu: a dry run)")
    p.add_argument("--scale", default="real", choices=["real", "tiny"], help="checkpoint shapes")
    p.add_argument("--models", default="1B,8B", help="comma list of InternVL2 variants")
    p.add_argument("--concurrency", type=int, default=None, help="concurrent requests (default 64; 4 on the CPU)")
    p.add_argument("--decode-steps", type=int, default=None, help="timed decode steps (default 64; 4 on the CPU)")
    p.add_argument("--out-tokens", type=int, default=None, help="new tokens per concurrent request (128; 4 on CPU)")
    p.add_argument("--official-code", type=Path, default=None,
                   help="folder with the official modeling/configuration *.py files of each variant's checkpoint "
                        "(DIR/<variant>/*.py, or DIR/*.py for all)")
    p.add_argument("--workdir", type=Path, default=None, help="where checkpoints are written (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the written checkpoints")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_of(fn: Callable[[], object], device: torch.device, repeat: int = 5) -> float:
    fn()
    sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def copy_gbps(device: torch.device) -> float:
    """GB/s of a large device copy, read + write counted (the decode floor's bandwidth)."""
    numel = 2**30 if device.type == "cuda" else 2**26
    source = torch.empty(numel, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    return 2 * numel / best_of(lambda: target.copy_(source), device) / 1e9


def image(seed: int, size: int = 448) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def run_until_done(engine: LLMEngine) -> None:
    while engine.has_unfinished_requests():
        engine.step()


def bench_engine(engine: LLMEngine, device: torch.device, gbps: float, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    model, processor = engine.model, engine.processor
    greedy = dict(temperature=0.0, ignore_eos=True)

    # first token with one 448x448 image (one tile), after a warm-up request
    def first_token(seed: int) -> float:
        request = processor.prepare([Message("user", "Please describe the image shortly.", [image(seed)])], max_num=1)
        sync(device)
        start = time.perf_counter()
        engine.add_request(f"ttft{seed}", request, SamplingParams(max_new_tokens=1, **greedy))
        run_until_done(engine)
        sync(device)
        return time.perf_counter() - start

    first_token(1)
    out["ttft_one_tile_s"] = round(first_token(2), 4)

    # decode at batch 1
    steps = args.decode_steps
    prompt = processor.prepare([Message("user", "hello " * 250)])
    engine.add_request("b1", prompt, SamplingParams(max_new_tokens=steps + 8, **greedy))
    for _ in range(4):                    # prefill and the first decode steps
        engine.step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync(device)
    per_token = (time.perf_counter() - start) / steps
    run_until_done(engine)
    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.language_model.named_parameters()
                       if "embed_tokens" not in n and "tok_embeddings" not in n)
    floor = weight_bytes / (gbps * 1e9)
    out.update(decode_b1_tok_s=round(1 / per_token, 1), decode_b1_ms=round(per_token * 1e3, 3),
               llm_weight_gib=round(weight_bytes / 2**30, 3), hbm_floor_ms=round(floor * 1e3, 3),
               decode_b1_x_floor=round(per_token / floor, 2))

    # C concurrent requests with one 448 image each: the host prepares them (8 threads), then all are queued
    concurrency = args.concurrency
    with concurrent.futures.ThreadPoolExecutor(8) as workers:
        start = time.perf_counter()
        requests: list[PreparedRequest] = list(workers.map(
            lambda i: processor.prepare([Message("user", f"Request {i}: describe the image in detail.",
                                                 [image(100 + i)])], max_num=1), range(concurrency)))
        prepared_s = time.perf_counter() - start
    pixels = torch.cat([requests[i % concurrency].images[0].pixel_values for i in range(32)])
    with torch.inference_mode():
        encode_s = best_of(lambda: model.extract_feature(pixels), device, repeat=3) / pixels.shape[0]
    out["images_per_s_preprocessed_8_threads"] = round(concurrency / prepared_s, 1)
    out["images_per_s_encoded"] = round(1 / encode_s, 1)
    sync(device)
    start = time.perf_counter()
    finals = engine.generate(requests, SamplingParams(max_new_tokens=args.out_tokens, **greedy))
    sync(device)
    wall = time.perf_counter() - start
    tokens = sum(len(f.token_ids) for f in finals)
    ttfts = [f.first_token_time - f.arrival_time for f in finals if f.first_token_time is not None]
    out[f"concurrent_{concurrency}"] = {
        "output_tok_s": round(tokens / wall, 1), "wall_s": round(wall, 2), "output_tokens": tokens,
        "ttft_p50_s": round(statistics.median(ttfts), 3) if ttfts else None,
        "x_batch1": round(tokens / wall * per_token, 1)}
    return out


def official_path(folder: Path, variant: str, device: torch.device, dtype: torch.dtype, steps: int,
                  code: Path | None) -> dict[str, Any]:
    """The reference implementation (transformers 4.37.2 + the official remote code) on the same device."""
    try:
        import transformers
    except ImportError:
        return {"skipped": "transformers is not importable (pip install transformers==4.37.2)"}
    if transformers.__version__ != "4.37.2":
        return {"skipped": f"transformers {transformers.__version__} is installed, the reference is 4.37.2"}
    files = (sorted((code / variant).glob("*.py")) or sorted(code.glob("*.py"))) if code else []
    if not files:
        return {"skipped": "no official modeling files (--official-code DIR: a random checkpoint carries none)"}
    for file in files:
        shutil.copyfile(file, folder / file.name)
    from internvl_runtime import load_image

    model = transformers.AutoModel.from_pretrained(folder, torch_dtype=dtype, low_cpu_mem_usage=True,
                                                   trust_remote_code=True).eval().to(device)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=True, use_fast=False)
    with torch.no_grad():   # random real-size LM head, tiny tokenizer: keep answers decodable
        model.language_model.get_output_embeddings().weight[len(tokenizer):].zero_()
    image(3).save(folder / "image.png")
    pixels = load_image(folder / "image.png", max_num=1).to(dtype).to(device)

    def chat(new_tokens: int) -> float:
        sync(device)
        start = time.perf_counter()
        model.chat(tokenizer, pixels, "<image>\nPlease describe the image shortly.",
                   dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False))
        sync(device)
        return time.perf_counter() - start

    chat(2)
    ttft = min(chat(1) for _ in range(2))
    decode = (chat(steps + 1) - chat(1)) / steps
    return {"ttft_one_tile_s": round(ttft, 4), "decode_b1_tok_s": round(1 / decode, 1)}


def bench_model(variant: str, device: torch.device, gbps: float, work: Path, args: argparse.Namespace
                ) -> dict[str, Any]:
    folder = work / f"InternVL2-{variant}-{args.scale}"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if not (folder / "config.json").is_file():
        start = time.monotonic()
        shards = 4 if variant == "8B" and args.scale == "real" else 1
        write_checkpoint(folder, variant, scale=args.scale, num_shards=shards, dtype=dtype,
                         device=device if device.type == "cuda" else "cpu")
        log(f"{variant}: checkpoint written in {time.monotonic() - start:.1f}s")
    result: dict[str, Any] = {"checkpoint_gib": round(sum(f.stat().st_size for f in folder.glob("*.safetensors"))
                                                      / 2**30, 3)}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    per_request = 16 * ((300 + 256 + args.out_tokens) // 16 + 2)
    start = time.perf_counter()
    engine = LLMEngine.from_pretrained(folder, dtype=dtype, device=str(device), max_num_seqs=args.concurrency,
                                       max_model_len=4096,
                                       num_blocks=max(256, args.concurrency * per_request // 16 + 64))
    sync(device)
    result["load_s"] = round(time.perf_counter() - start, 2)
    log(f"{variant}: engine ready in {result['load_s']}s")
    result.update(bench_engine(engine, device, gbps, args))
    if device.type == "cuda":
        result["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    del engine
    if device.type == "cuda":
        torch.cuda.empty_cache()
    result["official"] = official_path(folder, variant, device, dtype, args.decode_steps, args.official_code)
    log(f"{variant}: official path: {result['official']}")
    return result


def print_table(summary: dict[str, Any]) -> None:
    c = summary["concurrency"]
    print(f"\nHBM floor bandwidth (device copy): {summary['copy_gbps']} GB/s on {summary['device_name']}")
    print(f"| model | decode b1 tok/s | HBM floor | b1 / floor | {c} x 1 image: out tok/s | vs b1 | TTFT 1 tile "
          "| images/s preprocessed / encoded | peak GPU | official decode, TTFT |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for variant, r in summary["models"].items():
        if "error" in r:
            print(f"| {variant} | failed: {r['error']} |")
            continue
        conc, off = r[f"concurrent_{c}"], r["official"]
        official = off.get("skipped") or f"{off['decode_b1_tok_s']} tok/s, {off['ttft_one_tile_s']} s"
        print(f"| {variant} | {r['decode_b1_tok_s']} | {r['hbm_floor_ms']} ms/token | {r['decode_b1_x_floor']}x "
              f"| {conc['output_tok_s']} | {conc['x_batch1']}x | {r['ttft_one_tile_s']} s "
              f"| {r['images_per_s_preprocessed_8_threads']} / {r['images_per_s_encoded']} "
              f"| {r.get('peak_gpu_gib', '-')} GiB | {official} |")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("CUDA is not available; use --device cpu --scale tiny for a dry run", file=sys.stderr)
            return 2
        device = torch.device("cuda", device.index or 0)
    on_cpu = device.type == "cpu"
    args.concurrency = args.concurrency or (4 if on_cpu else 64)
    args.decode_steps = args.decode_steps or (4 if on_cpu else 64)
    args.out_tokens = args.out_tokens or (4 if on_cpu else 128)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="internvl_gpu_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "device": str(device), "scale": args.scale, "torch": torch.__version__, "concurrency": args.concurrency,
        "device_name": torch.cuda.get_device_name(device) if not on_cpu else "cpu", "models": {}}
    summary["copy_gbps"] = round(copy_gbps(device), 1)
    log(f"device copy: {summary['copy_gbps']} GB/s")
    for variant in [v.strip() for v in args.models.split(",") if v.strip()]:
        try:
            summary["models"][variant] = bench_model(variant, device, summary["copy_gbps"], work, args)
        except Exception as exc:  # noqa: BLE001 - one model's failure is reported; the next one runs
            import traceback

            traceback.print_exc()
            summary["models"][variant] = {"error": f"{type(exc).__name__}: {exc}"}
        if not args.keep and args.workdir is None:
            shutil.rmtree(work / f"InternVL2-{variant}-{args.scale}", ignore_errors=True)
    if not args.keep and args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    summary["total_s"] = round(time.monotonic() - T0, 1)
    print_table(summary)
    out = args.out or (Path(os.environ["OUT"]) / "gpu_bench.json" if os.environ.get("OUT") else None)
    if out is not None:
        out.write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    return 1 if any("error" in r for r in summary["models"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
