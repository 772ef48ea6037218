#!/usr/bin/env python3
# ruff: noqa
# The shared smoke script (../shared/tools/gpu_check.py) kept as written there, so the two stay comparable;
# changes for running it from the repository: the golden fixtures are found in tests/fixtures; the feature
# split per row is a local function (_split_features) and the runner is given the image token id.
"""GPU smoke test and benchmark for internvl-runtime (one GPU, < ~8 minutes on an H200).

Run from the repository root (or pass --repo):

    python gpu_check.py                                # cuda, real 1B + 8B shapes, tiny-fixture fidelity
    python gpu_check.py --skip 8B --budget-s 240       # quicker
    python gpu_check.py --device cpu --scale tiny --quick   # CPU dry run of the whole script (API check)

Every stage is wrapped: a failure prints its traceback, is recorded in the summary and the next stage runs.
A global deadline (--budget-s) skips the stages that would start after it. The last line printed is the
JSON summary (also written to --out, default $OUT/gpu_check_summary.json or ./gpu_check_summary.json).

Stages, in order (cheap and diagnostic first, the 16 GB 8B checkpoint last):
  env            torch/CUDA/GPU facts, which int4/int8 CUDA kernels this torch has, TF32 flags
  sdpa_probe     which SDPA backends accept the exact calls the runtime makes (vision, fresh prefill with
                 enable_gqa, prefix/chunked prefill with attn_mask + enable_gqa)
  attn_decode    the runtime's torch paged decode attention (gather + 2 matmuls) and its Triton paged kernel vs an ideal contiguous SDPA at
                 InternVL2-8B shapes, batch 64 x 4k context and batch 1, one layer, x32 for the model
  quant_layers   Int4Linear (tinygemm layout on CUDA) and Int8Linear against their dequantized reference
  fixtures       tiny golden checkpoints (tests/fixtures): greedy ids on the device (fp32, TF32 off)
                 vs the official CPU goldens and vs our CPU fp32; bf16 agreement (informational);
                 official `.eval().cuda()` load path; engine greedy tokens device vs CPU
  split          a real cuda:0 / cpu split (device_map dict and the auto_device_map algorithm) on a tiny
                 checkpoint, tokens vs single-device CPU
  sampling       seeded sampling on the device (engine makes CPU generators: expected to fail on CUDA)
  syncs          host<->device synchronisations per decode step (torch.cuda.set_sync_debug_mode)
  graphs         greedy tokens with CUDA graphs vs eager triton steps vs the torch backend (tiny-1B/4B/2B), the
                 buckets captured, ms per decode step of 8 sequences each way
  real-1B        write a random InternVL2-1B-shaped checkpoint; load (time, host peak, GPU memory);
                 official chat with one 448x448 image; engine: KV budget, TTFT (1 image), decode tok/s at
                 batch 1, throughput and TTFT at 64 concurrent requests, steady decode step at 64
  quant-1B       load_in_8bit / load_in_4bit on the device: load time, decode tok/s, token agreement
  real-8B        as real-1B with InternVL2-8B shapes (16 GB bf16 checkpoint written first)
  tp             tensor parallel 2 (NCCL) on a tiny checkpoint; skipped with fewer than 2 GPUs
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

T0 = time.monotonic()


# ------------------------------------------------------------------------------------------ plumbing
def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", default=None, help="repository root (default: cwd if it holds internvl_runtime)")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (cpu = dry run of the script)")
    p.add_argument("--scale", default="real", choices=["real", "tiny"], help="shapes of the benchmark checkpoints")
    p.add_argument("--fixtures", default=None, help="golden fixtures dir (default tests/fixtures, ../shared/fixtures or ./shared/fixtures)")
    p.add_argument("--workdir", default=None, help="where checkpoints are written (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the written checkpoints")
    p.add_argument("--budget-s", type=float, default=450.0, help="skip stages that would start after this")
    p.add_argument("--skip", default="", help="comma list of stages to skip (env,sdpa_probe,...,1B,8B,quant,tp)")
    p.add_argument("--only", default="", help="comma list: run only these stages")
    p.add_argument("--quick", action="store_true", help="fewer tokens/requests (dry runs)")
    p.add_argument("--all-cases", action="store_true", help="every golden case, not the default subset")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--long-context", action="store_true", help="real-8B: also 16 requests x 4k context")
    p.add_argument("--out", default=None)
    return p.parse_args()


ARGS = parse_args()
if ARGS.device == "cpu":      # the dry run: the Triton kernels run under triton's interpreter (read at their import)
    os.environ.setdefault("TRITON_INTERPRET", "1")
REPO = Path(ARGS.repo) if ARGS.repo else Path.cwd()
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

SUMMARY: dict = {"stages": {}, "notes": []}


def elapsed() -> float:
    return time.monotonic() - T0


def log(msg: str) -> None:
    print(f"[{elapsed():7.1f}s] {msg}", flush=True)


def wanted(name: str, *aliases: str) -> bool:
    names = {name, *aliases}
    skip = {s.strip() for s in ARGS.skip.split(",") if s.strip()}
    only = {s.strip() for s in ARGS.only.split(",") if s.strip()}
    if names & skip:
        return False
    return not only or bool(names & only)


def stage(name: str, *aliases: str, min_left_s: float = 0.0):
    """Decorator: run now, record the result or the traceback, never raise."""
    def run(fn):
        if not wanted(name, *aliases):
            SUMMARY["stages"][name] = {"skipped": "by --skip/--only"}
            return fn
        left = ARGS.budget_s - elapsed()
        if left < min_left_s:
            SUMMARY["stages"][name] = {"skipped": f"budget: {left:.0f}s left, stage needs ~{min_left_s:.0f}s"}
            log(f"== {name}: skipped (budget)")
            return fn
        log(f"== {name}")
        start = time.monotonic()
        record: dict = {}
        try:
            result = fn(record)
            if isinstance(result, dict):
                record.update(result)
            record.setdefault("ok", None if "skipped" in record else True)
        except Exception as exc:  # noqa: BLE001 - the point is to go on
            traceback.print_exc()
            record.update(ok=False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        finally:
            record["seconds"] = round(time.monotonic() - start, 2)
            SUMMARY["stages"][name] = record
            cleanup()
            status = "skipped" if record.get("ok") is None else ("ok" if record.get("ok") else "FAILED")
            log(f"== {name}: {status} ({record['seconds']}s)")
        return fn
    return run


def cleanup() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


DEVICE = torch.device(ARGS.device)
if DEVICE.type == "cuda" and DEVICE.index is None:
    DEVICE = torch.device("cuda", 0)
ON_GPU = DEVICE.type == "cuda"
if ON_GPU and not torch.cuda.is_available():
    print("CUDA is not available here; use --device cpu for a dry run", file=sys.stderr)
    sys.exit(2)
QUICK = ARGS.quick or not ON_GPU


def sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize(DEVICE)


def timed(fn, repeat: int = 3, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    sync()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


_TF32_SAVED: tuple | None = None


def set_strict_fp32(strict: bool) -> None:
    """TF32 off for fp32 fidelity checks (cuDNN convs default to TF32: the ViT patch embedding), and back.
    torch >= 2.9 has the fp32_precision API, and mixing it with the legacy allow_tf32 flags can raise,
    so only one of the two is used."""
    global _TF32_SAVED
    if not ON_GPU:
        return
    new_api = hasattr(torch.backends.cuda.matmul, "fp32_precision") and hasattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision")
    if strict:
        if new_api:
            _TF32_SAVED = ("new", torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
            torch.backends.cuda.matmul.fp32_precision = "ieee"
            torch.backends.cudnn.conv.fp32_precision = "ieee"
        else:
            _TF32_SAVED = ("old", torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
    elif _TF32_SAVED is not None:
        kind, a, b = _TF32_SAVED
        if kind == "new":
            torch.backends.cuda.matmul.fp32_precision = a
            torch.backends.cudnn.conv.fp32_precision = b
        else:
            torch.backends.cuda.matmul.allow_tf32 = a
            torch.backends.cudnn.allow_tf32 = b
        _TF32_SAVED = None


def host_peak_reset() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def host_peak_gib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 2**20, 2)
    except OSError:
        pass
    return None


def gpu_mem() -> dict:
    if not ON_GPU:
        return {}
    free, total = torch.cuda.mem_get_info(DEVICE)
    return {"free_gib": round(free / 2**30, 2), "total_gib": round(total / 2**30, 2),
            "allocated_gib": round(torch.cuda.memory_allocated(DEVICE) / 2**30, 2),
            "peak_allocated_gib": round(torch.cuda.max_memory_allocated(DEVICE) / 2**30, 2)}


def fixtures_dir() -> Path | None:
    for cand in ([Path(ARGS.fixtures)] if ARGS.fixtures else []) + [REPO / "tests" / "fixtures",
                                                                     REPO.parent / "shared" / "fixtures",
                                                                     REPO / "shared" / "fixtures"]:
        if (cand / "cases.json").is_file():
            return cand
    return None


WORK = Path(ARGS.workdir) if ARGS.workdir else Path(tempfile.mkdtemp(prefix="internvl_gpu_check_"))
WORK.mkdir(parents=True, exist_ok=True)

# Imports of the project (after sys.path). A failure here is fatal and printed as such.
from internvl_runtime import AutoModel, AutoTokenizer, load_image  # noqa: E402
from internvl_runtime.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from internvl_runtime.engine.model_runner import ModelRunner, SequenceStep  # noqa: E402
from internvl_runtime.engine.sampling_params import SamplingParams  # noqa: E402
from internvl_runtime.kernels.triton_attention import triton_available, unified_attention  # noqa: E402
from internvl_runtime.models.layers.attention import AttentionMetadata, paged_attention  # noqa: E402
from internvl_runtime.processing.inputs import Message  # noqa: E402
from internvl_runtime.testing import checkpoints as ckpt_mod  # noqa: E402

SUMMARY["device"] = str(DEVICE)
SUMMARY["repo"] = str(REPO)


def make_image(w: int, h: int, seed: int):
    from PIL import Image
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())


def free_model(*objs) -> None:
    for o in objs:
        del o
    cleanup()


# ------------------------------------------------------------------------------------------ stages
@stage("env")
def _env(rec):
    rec["torch"] = torch.__version__
    rec["cuda_available"] = torch.cuda.is_available()
    rec["python"] = sys.version.split()[0]
    if ON_GPU:
        props = torch.cuda.get_device_properties(DEVICE)
        rec.update(gpu=props.name, capability=list(torch.cuda.get_device_capability(DEVICE)),
                   gpu_mem_gib=round(props.total_memory / 2**30, 1), device_count=torch.cuda.device_count(),
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   flash_sdp=torch.backends.cuda.flash_sdp_enabled(),
                   mem_efficient_sdp=torch.backends.cuda.mem_efficient_sdp_enabled(),
                   cudnn_sdp=getattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: None)(),
                   fp32_precision={k: getattr(o, "fp32_precision", None) for k, o in
                                   (("matmul", torch.backends.cuda.matmul),
                                    ("cudnn_conv", getattr(torch.backends.cudnn, "conv", None)))})
        # HBM copy bandwidth: the decode floors below are weight bytes / this
        x = torch.empty(2**30, dtype=torch.uint8, device=DEVICE)
        y = torch.empty_like(x)
        t = timed(lambda: y.copy_(x), repeat=5)
        rec["hbm_copy_gbps"] = round(2 * x.numel() / t / 1e9, 1)   # read + write
        SUMMARY["hbm_gbps"] = rec["hbm_copy_gbps"]
        del x, y
    from internvl_runtime.quantization.linear import _has_kernel
    rec["kernels"] = {op: {k: _has_kernel(op, k) for k in ("CPU", "CUDA")}
                      for op in ("_weight_int4pack_mm", "_convert_weight_to_int4pack", "_weight_int8pack_mm",
                                 "_weight_int4pack_mm_for_cpu")}
    rec["fixtures"] = str(fixtures_dir())
    rec["workdir"] = str(WORK)


@stage("sdpa_probe")
def _sdpa_probe(rec):
    """Which backend serves each SDPA call shape the runtime makes (bf16; MATH always works)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    dt = torch.bfloat16 if ON_GPU else torch.float32
    H, KV, D, L, S = (32, 8, 128, 2048, 4096) if ON_GPU else (4, 2, 16, 32, 64)   # InternVL2-8B LLM on GPU
    vis_shape = (13, 16, 1025, 64) if ON_GPU else (2, 2, 65, 16)                  # InternViT-300M, 13 tiles

    def peak_mib(base):
        return (torch.cuda.max_memory_allocated(DEVICE) - base) / 2**20 if ON_GPU else 0.0

    def reset():
        if ON_GPU:
            torch.cuda.reset_peak_memory_stats(DEVICE)
            return torch.cuda.memory_allocated(DEVICE)
        return 0

    q = torch.randn(1, H, L, D, device=DEVICE, dtype=dt)
    k = torch.randn(1, KV, S, D, device=DEVICE, dtype=dt)
    v = torch.randn_like(k)
    mask = (torch.arange(S, device=DEVICE)[None, :] <= torch.arange(L, device=DEVICE)[:, None] + (S - L))
    vis_q = torch.randn(*vis_shape, device=DEVICE, dtype=dt)
    q_full = torch.randn(1, H, S, D, device=DEVICE, dtype=dt)
    calls = {
        "vision (N,heads,1025,64) no mask": lambda: F.scaled_dot_product_attention(vis_q, vis_q, vis_q),
        "fresh prefill is_causal + enable_gqa (L=S)": lambda: F.scaled_dot_product_attention(
            q_full, k, v, is_causal=True, enable_gqa=True),
        "prefix/chunked prefill attn_mask + enable_gqa (L<S)": lambda: F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=True),
    }
    out = {}
    for label, call in calls.items():
        row = {}
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.MATH):
            try:
                with sdpa_kernel([backend]):
                    base = reset()
                    t = timed(call, repeat=2)
                    row[backend.name] = f"ok {t * 1e3:.2f} ms, +{peak_mib(base):.0f} MiB"
            except Exception as exc:  # noqa: BLE001
                row[backend.name] = f"no ({str(exc).splitlines()[0][:80]})"
        try:   # what the default dispatcher does
            base = reset()
            t = timed(call, repeat=2)
            row["default"] = f"{t * 1e3:.2f} ms, +{peak_mib(base):.0f} MiB"
        except Exception as exc:  # noqa: BLE001
            row["default"] = f"FAILED {exc}"
        out[label] = row
    rec["calls"] = out
    # Cold calls at new shapes (every prompt length is a new shape; cuDNN builds a graph per shape)
    cold = {}
    for n in ((1000, 1001, 1002, 1003) if ON_GPU else (40, 41)):
        qs = torch.randn(1, H, n, D, device=DEVICE, dtype=dt)
        ks = torch.randn(1, KV, n + 17, D, device=DEVICE, dtype=dt)
        m = torch.arange(n + 17, device=DEVICE)[None, :] <= torch.arange(n, device=DEVICE)[:, None] + 17
        for lab, fn in (("is_causal", lambda: F.scaled_dot_product_attention(qs, ks[:, :, :n], ks[:, :, :n],
                                                                             is_causal=True, enable_gqa=True)),
                        ("attn_mask", lambda: F.scaled_dot_product_attention(qs, ks, ks, attn_mask=m, enable_gqa=True))):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            t1 = time.perf_counter()
            fn()
            sync()
            cold[f"L={n} {lab}"] = f"first {1e3 * (t1 - t0):.2f} ms, second {1e3 * (time.perf_counter() - t1):.2f} ms"
    rec["new_shape_cost"] = cold


def _decode_meta(B: int, S: int, bs: int, interleaved: bool, device) -> tuple[AttentionMetadata, int, list]:
    per = -(-S // bs)
    num_blocks = B * per
    ctx_slots, ranges, new, tables = [], [], [], []
    for i in range(B):
        table = [j * B + i for j in range(per)] if interleaved else list(range(i * per, (i + 1) * per))
        tables.append(table)
        if interleaved and B > 1:
            slots = (torch.tensor(table)[:, None] * bs + torch.arange(bs)).flatten()[:S]
            ctx_slots.append(slots.to(device))
            ranges.append(None)
            new.append(int(slots[-1]))
        else:
            ctx_slots.append(None)
            ranges.append((table[0] * bs, S))
            new.append(table[0] * bs + S - 1)
    meta = AttentionMetadata(query_lens=[1] * B, seq_lens=[S] * B, slot_mapping=torch.tensor(new, device=device),
                             context_slots=ctx_slots, context_ranges=ranges)
    return meta, num_blocks * bs, tables


@stage("attn_decode", min_left_s=20)
def _attn_decode(rec):
    """One layer of decode attention at InternVL2-8B shapes: the runtime's paged path vs ideal SDPA."""
    import torch.nn.functional as F
    H, KV, D, layers = 32, 8, 128, 32
    dt = torch.bfloat16 if ON_GPU else torch.float32
    cases = [(64, 4096, True), (64, 4096, False), (1, 4096, False)] if not QUICK else [(4, 256, True), (1, 256, False)]
    results = {}
    for B, S, interleaved in cases:
        meta, slots, tables = _decode_meta(B, S, 16, interleaved, DEVICE)
        kc = torch.randn(slots, KV, D, device=DEVICE, dtype=dt)
        vc = torch.randn_like(kc)
        q = torch.randn(B, H, D, device=DEVICE, dtype=dt)
        k = torch.randn(B, KV, D, device=DEVICE, dtype=dt)
        v = torch.randn_like(k)
        first = timed(lambda: paged_attention(q, k, v, key_cache=kc, value_cache=vc, meta=meta), repeat=1, warmup=0)
        if ON_GPU:
            torch.cuda.reset_peak_memory_stats(DEVICE)
        base = torch.cuda.memory_allocated(DEVICE) if ON_GPU else 0
        per_layer = timed(lambda: paged_attention(q, k, v, key_cache=kc, value_cache=vc, meta=meta), repeat=3)
        transient = (torch.cuda.max_memory_allocated(DEVICE) - base) / 2**30 if ON_GPU else None
        # ideal: the same KV read once, contiguous (B, KV, S, D), fused kernel with GQA
        kk = torch.randn(B, KV, S, D, device=DEVICE, dtype=dt)
        vv = torch.randn_like(kk)
        qq = q[:, :, None, :]
        ideal = timed(lambda: F.scaled_dot_product_attention(qq, kk, vv, enable_gqa=True), repeat=3)
        kv_bytes = 2 * B * S * KV * D * kc.element_size()
        triton_ms = None
        if ON_GPU and triton_available():
            # the Triton paged kernel the GPU path runs (block tables read on the device, no gather)
            bt = torch.tensor(tables, dtype=torch.int32, device=DEVICE)
            lens = torch.full((B,), S, dtype=torch.int32, device=DEVICE)
            qsl = torch.arange(B + 1, dtype=torch.int32, device=DEVICE)
            out = torch.empty_like(q)
            run = lambda: unified_attention(q, kc, vc, out, block_tables=bt, seq_lens=lens,  # noqa: E731
                                            query_start_loc=qsl, max_query_len=1, block_size=16, scale=D ** -0.5)
            triton_ms = timed(run, repeat=3) * 1e3
        results[f"B={B} S={S} {'interleaved' if interleaved else 'contiguous'} tables"] = {
            "runtime_ms_per_layer": round(per_layer * 1e3, 3),
            "runtime_first_call_ms (builds the gather)": round(first * 1e3, 3),
            "ideal_sdpa_ms_per_layer": round(ideal * 1e3, 3),
            "x_slower": round(per_layer / ideal, 1) if ideal > 0 else None,
            "triton_paged_ms_per_layer": None if triton_ms is None else round(triton_ms, 3),
            "effective_gbps_triton": None if not triton_ms else round(kv_bytes / triton_ms / 1e6, 1),
            "runtime_ms_per_step_all_layers": round(per_layer * layers * 1e3, 1),
            "kv_read_gib_per_layer": round(kv_bytes / 2**30, 3),
            "effective_gbps_runtime": round(kv_bytes / per_layer / 1e9, 1),
            "transient_gib": None if transient is None else round(transient, 2),
        }
        del kc, vc, kk, vv, meta
        cleanup()
    rec["cases"] = results


@stage("quant_layers")
@torch.inference_mode()
def _quant_layers(rec):
    """Int4 (tinygemm layout on CUDA, native/torch layout on CPU) and int8 layers vs dequantized reference."""
    from torch import nn
    from internvl_runtime.quantization.linear import (Int4Linear, Int8Linear, dequantize_int4, dequantize_int8,
                                                      int4_backend, quantize_int4, quantize_int8)
    out = {}
    for n, k in [(896, 896), (4864, 896), (896, 4864), (151655 if not QUICK else 1000, 896), (4096, 4096), (100, 256)]:
        lin = nn.Linear(k, n, bias=False).to(torch.bfloat16)
        x = torch.randn(5, k, dtype=torch.bfloat16)
        row = {}
        try:
            int4_backend(DEVICE)
            layer = Int4Linear.from_linear(lin, 128 if k % 128 == 0 else 64, device=DEVICE)
            pad = -(-n // 16) * 16
            w = torch.cat([lin.weight.float(), torch.zeros(pad - n, k)]) if pad != n else lin.weight.float()
            qq, sz = quantize_int4(w, layer.group_size)
            ref = x.float() @ dequantize_int4(qq, sz, layer.group_size)[:n].t()
            for rows in (1, 5):
                y = layer(x[:rows].to(DEVICE)).float().cpu()
                err = float((y - ref[:rows]).norm() / ref[:rows].norm())
                row[f"int4 rel_err rows={rows}"] = round(err, 5)
            row["int4 backend"] = layer.backend
        except Exception as exc:  # noqa: BLE001
            row["int4"] = f"{type(exc).__name__}: {exc}"
        try:
            layer8 = Int8Linear.from_linear(lin, device=DEVICE)
            q8, s8 = quantize_int8(lin.weight.detach(), layer8.scales.dtype)
            ref8 = x.float() @ dequantize_int8(q8, s8).t()
            y8 = layer8(x.to(DEVICE)).float().cpu()
            row["int8 rel_err"] = round(float((y8 - ref8).norm() / ref8.norm()), 5)
        except Exception as exc:  # noqa: BLE001
            row["int8"] = f"{type(exc).__name__}: {exc}"
        out[f"{n}x{k}"] = row
    bad = [key for key, row in out.items() if any(isinstance(v, float) and v > 0.02 for v in row.values())
           or any(isinstance(v, str) and "Error" in v for v in row.values())]
    rec["layers"] = out
    rec["ok"] = not bad
    if bad:
        rec["bad"] = bad


# ---- tiny golden fixtures ------------------------------------------------------------------------------
FIX = fixtures_dir()
VARIANTS = ["tiny-1B", "tiny-2B", "tiny-4B", "tiny-8B", "tiny-26B", "tiny-40B", "tiny-76B"]
DEFAULT_CASES = {"text_chat", "text_two_round", "img_448x448_max12", "two_images_separate", "batch_chat_3",
                 "long_context_26_tiles"}


def _golden_cases():
    cases = json.loads((FIX / "cases.json").read_text(encoding="utf-8"))["cases"]
    return [c for c in cases if ARGS.all_cases or c["id"] in DEFAULT_CASES]


def _fix_image(ref: str, max_num: int, size: int):
    file = FIX / "data" / (f"frame_{int(ref.split(':')[1]):03d}.png" if ref.startswith("frame:") else f"{ref}.png")
    return load_image(file, input_size=size, max_num=max_num)


def _rel(a: torch.Tensor, b) -> float:
    import numpy as np
    ref = torch.from_numpy(np.asarray(b, dtype=np.float32)).reshape(a.shape)
    return float((a.float().cpu() - ref).norm() / ref.norm())


def _split_features(rows, feats, img_id):
    """Each row's feature rows (its <IMG_CONTEXT> count, in order); None for a row without any (repo copy:
    the model no longer has the _split_features this script called)."""
    out, start = [], 0
    for row in rows:
        n = sum(1 for t in row if t == img_id)
        out.append(None if feats is None or n == 0 else feats[start:start + n])
        start += n
    return out


def _run_case(model, tokenizer, variant: str, case: dict, dtype: torch.dtype, device: torch.device) -> dict:
    """Greedy ids of every round of a golden case (history from the golden record), and logits0 error."""
    import numpy as np
    gdir = FIX / "goldens" / variant
    golden = json.loads((gdir / f"{case['id']}.json").read_text(encoding="utf-8"))
    size = golden["input_size"]
    gen = dict(golden["generation_config"])
    model.img_context_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    res = {"ids": [], "golden": [], "logits_rel_err": None}
    if case["type"] == "batch_chat":
        images = [_fix_image(it["ref"], it["max_num"], size) for it in case["items"]]
        pv = torch.cat(images).to(device=device, dtype=dtype)
        tokenizer.padding_side = "left"
        inputs = tokenizer(golden["prompts"], return_tensors="pt", padding=True)
        tokenizer.padding_side = "right"
        out = model.generate(pixel_values=pv, input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                             eos_token_id=golden["eos_token_id"], **gen)
        res["ids"].append(out.tolist())
        res["golden"].append(golden["generated_ids"])
        return res
    pv, npl = None, None
    if case.get("images"):
        images = [_fix_image(im["ref"], im["max_num"], size) for im in case["images"]]
        pv = torch.cat(images).to(device=device, dtype=dtype)
        if case.get("num_patches_list") == "per_image":
            npl = [im.shape[0] for im in images]
    history = None
    for i, record in enumerate(golden["rounds"]):
        _, query = model.build_chat_query(pv, record["question"], history, npl)
        inputs = tokenizer(query, return_tensors="pt")
        if i == 0:
            rows = inputs["input_ids"].tolist()
            feats = None if pv is None else model.extract_feature(pv).reshape(-1, model.config.llm.hidden_size)
            img_id = model.img_context_token_id
            runner = ModelRunner(model, num_blocks=sum(-(-len(r) // 16) for r in rows) + 1, image_token_id=img_id)
            steps, nb = [], 0
            for row, f in zip(rows, _split_features(rows, feats, img_id)):
                n = -(-len(row) // 16)
                steps.append(SequenceStep(row, 0, list(range(nb, nb + n)), f))
                nb += n
            logits = runner.execute(steps)
            res["logits_rel_err"] = _rel(logits, np.load(gdir / record["logits0_file"]))
            del runner
        out = model.generate(pixel_values=pv, input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                             eos_token_id=record["eos_token_id"], **gen)
        res["ids"].append(out.tolist())
        res["golden"].append(record["generated_ids"])
        history = [tuple(h) for h in record["history"]]
    return res


def _engine_tokens(model, tokenizer, fix_variant: str) -> list[list[int]]:
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=4, num_blocks=256))
    size = model.config.image_size
    img = make_image(size, size, 3)
    wide = make_image(2 * size, size, 4)        # 2 tiles + thumbnail
    reqs = [engine.processor.prepare([Message("user", "Hello, who are you?")]),
            engine.processor.prepare([Message("user", "Describe the image.", [img])], max_num=1),
            engine.processor.prepare([Message("user", "Describe the image in detail, please.", [wide])], max_num=6)]
    outs = engine.generate(reqs, SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True))
    return [o.token_ids for o in outs]


if FIX is not None:
    @stage("sampling")
    def _sampling(rec):
        path = FIX / "ckpt" / "tiny-1B"
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True, use_fast=False)
        m = AutoModel.from_pretrained(path, torch_dtype=torch.float32, device_map=str(DEVICE)).eval()
        engine = LLMEngine(m, tok, EngineConfig(max_num_seqs=4, num_blocks=64))
        req = engine.processor.prepare([Message("user", "Hello")])
        res = {}
        for label, params in {"unseeded top_p/top_k": SamplingParams(max_new_tokens=8, temperature=0.8, top_p=0.9, top_k=20),
                              "seeded (OpenAI seed=)": SamplingParams(max_new_tokens=8, temperature=0.8, seed=1),
                              "repetition_penalty 1.1": SamplingParams(max_new_tokens=8, temperature=0, repetition_penalty=1.1),
                              "logprobs 5": SamplingParams(max_new_tokens=8, temperature=0, logprobs=5)}.items():
            try:
                outs = engine.generate([req, req], params)
                res[label] = {"ok": True, "tokens": [o.token_ids for o in outs]}
                if params.seed is not None:
                    res[label]["same_seed_same_tokens"] = outs[0].token_ids == outs[1].token_ids
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc()
                res[label] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
                engine = LLMEngine(m, tok, EngineConfig(max_num_seqs=4, num_blocks=64))   # its state is broken
        rec["cases"] = res
        rec["ok"] = all(r["ok"] for r in res.values())

    @stage("syncs")
    def _syncs(rec):
        """Synchronising CUDA calls during one decode step of 8 sequences (Phi-3 = tiny-4B has .item())."""
        if not ON_GPU:
            return {"skipped": "cpu"}
        out = {}
        for variant in ("tiny-1B", "tiny-8B", "tiny-4B"):
            path = FIX / "ckpt" / variant
            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True, use_fast=False)
            m = AutoModel.from_pretrained(path, torch_dtype=torch.bfloat16, device_map=str(DEVICE)).eval()
            engine = LLMEngine(m, tok, EngineConfig(max_num_seqs=8, num_blocks=512))
            for i in range(8):
                engine.add_request(f"r{i}", engine.processor.prepare([Message("user", f"Hello {i} " * (20 + 7 * i))]),
                                   SamplingParams(max_new_tokens=64, temperature=0, ignore_eos=True))
            for _ in range(20):        # prefill + enough decode for block tables to interleave
                engine.step()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    engine.step()
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            msgs = [str(w.message).splitlines()[0][:60] for w in caught if "synchroniz" in str(w.message)]
            out[variant] = {"syncs_per_decode_step_B8": len(msgs)}
            del engine, m
            cleanup()
        rec["variants"] = out

    @stage("graphs")
    def _graphs(rec):
        """The decode step as served on the device: greedy tokens with CUDA graphs (the default on CUDA, the
        triton backend) against eager triton steps and the torch backend, per rope variant; the buckets
        captured; ms per decode step with and without graphs (8 sequences). On the CPU: the graph emulation under
        triton's interpreter (an API check; its times mean nothing)."""
        out = {}
        # the CPU dry run interprets every kernel launch in Python: a few tokens of two sequences of one variant
        small = not ON_GPU
        greedy = SamplingParams(max_new_tokens=3 if small else 24, temperature=0, ignore_eos=True)
        for variant in ("tiny-1B",) if small else ("tiny-1B", "tiny-4B", "tiny-2B"):
            path = FIX / "ckpt" / variant
            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True, use_fast=False)
            m = AutoModel.from_pretrained(path, torch_dtype=torch.float32, device_map=str(DEVICE)).eval()
            prompts = [f"Hello {i} " * (2 if small else 5 + 9 * i) for i in range(2 if small else 8)]
            runs = {}
            for label, kwargs in {"graphs": {"attention_backend": "triton"},
                                  "eager": {"attention_backend": "triton", "enforce_eager": True},
                                  "torch": {"attention_backend": "torch"}}.items():
                try:
                    engine = LLMEngine(m, tok, EngineConfig(max_num_seqs=8, num_blocks=512, **kwargs))
                    reqs = [engine.processor.prepare([Message("user", p)]) for p in prompts]
                    engine.generate(reqs, SamplingParams(max_new_tokens=2, temperature=0))      # warm-up, capture
                    sync()
                    t0 = time.perf_counter()
                    outs = engine.generate(reqs, greedy)
                    sync()
                    graphs = engine.runner.graphs
                    runs[label] = {"tokens": [o.token_ids for o in outs],
                                   "ms_per_step": round(1e3 * (time.perf_counter() - t0) / greedy.max_new_tokens, 2),
                                   "backend": engine.runner.attention_backend,
                                   "captured_buckets": sorted(graphs._graphs) if graphs is not None else None}
                    del engine
                except Exception as exc:  # noqa: BLE001
                    traceback.print_exc()
                    runs[label] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
            ref = runs.get("torch", {}).get("tokens")
            out[variant] = {label: {k: v for k, v in r.items() if k != "tokens"}
                            | ({"same_tokens_as_torch": r["tokens"] == ref} if "tokens" in r and ref else {})
                            for label, r in runs.items()}
            del m
            cleanup()
        rec["variants"] = out
        rec["ok"] = all(r.get("same_tokens_as_torch", False) for v in out.values() for k, r in v.items()
                        if k != "torch")



if FIX is None:
    SUMMARY["stages"]["fixtures"] = {"skipped": "no fixtures dir (pass --fixtures)"}
else:
    @stage("fixtures", min_left_s=30)
    def _fixtures(rec):
        set_strict_fp32(True)
        per_variant = {}
        all_ok = True
        stage_deadline = time.monotonic() + (120 if ON_GPU else 600)
        for variant in VARIANTS:
            path = FIX / "ckpt" / variant
            if not path.is_dir():
                continue
            if time.monotonic() > stage_deadline:
                per_variant[variant] = {"skipped": "stage deadline"}
                continue
            with_cpu = variant in ("tiny-1B", "tiny-4B", "tiny-8B", "tiny-26B")
            row: dict = {}
            try:
                tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True, use_fast=False)
                cases = [c for c in _golden_cases() if variant in c.get("only", VARIANTS)]
                cpu = AutoModel.from_pretrained(path, torch_dtype=torch.float32).eval() if with_cpu else None
                dev32 = AutoModel.from_pretrained(path, torch_dtype=torch.float32, device_map=str(DEVICE)).eval()
                n_match_golden = n_match_cpu = n_total = 0
                max_err, mismatches = 0.0, []
                for case in cases:
                    r_dev = _run_case(dev32, tok, variant, case, torch.float32, DEVICE)
                    r_cpu = _run_case(cpu, tok, variant, case, torch.float32, torch.device("cpu")) if with_cpu else None
                    for j, (a, g) in enumerate(zip(r_dev["ids"], r_dev["golden"])):
                        n_total += 1
                        n_match_golden += a == g
                        n_match_cpu += bool(r_cpu) and a == r_cpu["ids"][j]
                        if a != g:
                            mismatches.append(case["id"])
                    if r_dev["logits_rel_err"] is not None:
                        max_err = max(max_err, r_dev["logits_rel_err"])
                row.update(rounds=n_total, device_fp32_eq_golden=n_match_golden,
                           device_fp32_eq_cpu=n_match_cpu if with_cpu else "not run",
                           logits0_max_rel_err=f"{max_err:.2e}", mismatched_cases=sorted(set(mismatches)))
                all_ok &= n_match_golden == n_total and max_err <= 1e-4
                # bf16 on the device: informational (random tiny weights have small margins)
                dev16 = AutoModel.from_pretrained(path, torch_dtype=torch.bfloat16, device_map=str(DEVICE)).eval()
                eq = tot = 0
                for case in cases[:2]:
                    r16 = _run_case(dev16, tok, variant, case, torch.bfloat16, DEVICE)
                    for a, g in zip(r16["ids"], r16["golden"]):
                        tot += 1
                        eq += a == g
                row["device_bf16_eq_golden"] = f"{eq}/{tot}"
                # engine greedy tokens: device fp32 vs CPU fp32
                if with_cpu:
                    a, b = _engine_tokens(dev32, tok, variant), _engine_tokens(cpu, tok, variant)
                    row["engine_device_eq_cpu"] = a == b
                    all_ok &= a == b
                del cpu, dev32, dev16
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc()
                row["error"] = f"{type(exc).__name__}: {exc}"
                all_ok = False
            per_variant[variant] = row
            cleanup()
        # the official snippet's loading: .eval().cuda() after a CPU load (compute plan chosen for the CPU)
        try:
            path = FIX / "ckpt" / "tiny-1B"
            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True, use_fast=False)
            m = AutoModel.from_pretrained(path, torch_dtype=torch.float32, low_cpu_mem_usage=True, use_flash_attn=True,
                                          trust_remote_code=True).eval()
            m = m.cuda(DEVICE) if ON_GPU else m.to(DEVICE)      # the model card's `.eval().cuda()`
            case = next(c for c in _golden_cases() if c["id"] == "img_448x448_max12")
            r = _run_case(m, tok, "tiny-1B", case, torch.float32, DEVICE)
            per_variant["official .eval().cuda() path (tiny-1B)"] = {"eq_golden": r["ids"] == r["golden"]}
            all_ok &= r["ids"] == r["golden"]
            del m
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            per_variant["official .eval().cuda() path (tiny-1B)"] = {"error": f"{type(exc).__name__}: {exc}"}
            all_ok = False
        set_strict_fp32(False)
        rec["variants"] = per_variant
        rec["ok"] = all_ok


# ---- a real cuda:0 / cpu split --------------------------------------------------------------------------
if FIX is not None:
    @stage("split", min_left_s=20)
    def _split(rec):
        from internvl_runtime.placement import auto_device_map, estimate_unit_bytes, placement_units
        from internvl_runtime.models.internvl import meta_model
        from internvl_runtime.config import InternVLConfig
        set_strict_fp32(True)
        other = "cpu" if ON_GPU else "cpu:1"
        main = str(DEVICE)
        out = {}
        for variant in ("tiny-8B", "tiny-26B", "tiny-1B"):
            path = FIX / "ckpt" / variant
            cfg = InternVLConfig.from_pretrained(path)
            n = cfg.llm.num_hidden_layers
            maps = {
                # layer 0 on the other device, everything else (vision, mlp1, embeddings, last layer) on main
                "dict": {"": main, "language_model.model.layers.0": other},
                # vision on the other device, the LLM on main (features cross devices)
                "vision_elsewhere": {"": main, "vision_model": other, "mlp1": other},
            }
            sizes = estimate_unit_bytes(meta_model(cfg, torch.float32), torch.float32)
            budget0 = sum(v for u, v in sizes.items() if not u.startswith("language_model.model.layers.")) + sizes[
                f"language_model.model.layers.{n - 1}"] + 1
            maps["auto_device_map"] = {u: str(d) for u, d in auto_device_map(
                sizes, [(torch.device(main), budget0), (torch.device("cpu"), 1 << 40)]).items()}
            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True, use_fast=False)
            cpu = AutoModel.from_pretrained(path, torch_dtype=torch.float32).eval()
            want = _engine_tokens(cpu, tok, variant)
            case = next(c for c in _golden_cases() if c["id"] == "img_448x448_max12")
            want_chat = _run_case(cpu, tok, variant, case, torch.float32, torch.device("cpu"))["ids"]
            for label, dmap in maps.items():
                try:
                    m = AutoModel.from_pretrained(path, torch_dtype=torch.float32, device_map=dmap).eval()
                    got = _engine_tokens(m, tok, variant)
                    got_chat = _run_case(m, tok, variant, case, torch.float32, torch.device(main))["ids"]
                    kv_devs = sorted({str(t.device) for t in ModelRunner(m, num_blocks=8).kv_cache.keys})
                    out[f"{variant} {label}"] = {"engine_eq_cpu": got == want, "chat_eq_cpu": got_chat == want_chat,
                                                 "kv_devices": kv_devs,
                                                 "devices": sorted(set(getattr(m, "hf_device_map", {}).values()))}
                    del m
                except Exception as exc:  # noqa: BLE001
                    traceback.print_exc()
                    out[f"{variant} {label}"] = {"error": f"{type(exc).__name__}: {exc}"}
            del cpu
            cleanup()
        set_strict_fp32(False)
        rec["runs"] = out
        rec["ok"] = all(r.get("engine_eq_cpu") and r.get("chat_eq_cpu") for r in out.values())

# ---- real shapes --------------------------------------------------------------------------------------
def _fast_random_tensor(name, shape, generator, dtype):
    """The checkpoint module's distribution, drawn on the GPU (8B params in seconds instead of minutes)."""
    if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "layernorm.weight", "mlp1.0.weight",
                      "attention_norm.weight", "ffn_norm.weight")):
        mean, std = 1.0, 0.1
    elif name.endswith(("ls1", "ls2")):
        mean, std = 0.1, 0.05
    else:
        mean, std = 0.0, (0.02 if len(shape) < 2 else min(0.5, 1.0 / (shape[-1] ** 0.5)))
        if "embed" in name or "position_embedding" in name or "class_embedding" in name:
            std = 0.5
    t = torch.empty(shape, device=DEVICE, dtype=torch.float32).normal_(mean, std)
    return t.to(dtype).cpu()


def write_real(variant: str) -> Path:
    folder = WORK / f"InternVL2-{variant}-{ARGS.scale}"
    if (folder / "config.json").is_file():
        return folder
    shards = {"1B": 1, "8B": 4}.get(variant, 2) if ARGS.scale == "real" else 1
    original = ckpt_mod._random_tensor
    if ON_GPU:
        ckpt_mod._random_tensor = _fast_random_tensor
    try:
        start = time.monotonic()
        ckpt_mod.write_checkpoint(folder, variant, scale=ARGS.scale, num_shards=shards)
        log(f"wrote {folder} in {time.monotonic() - start:.1f}s "
            f"({sum(f.stat().st_size for f in folder.glob('*.safetensors')) / 2**30:.2f} GiB)")
    finally:
        ckpt_mod._random_tensor = original
    return folder


def bench_engine(model, tok, rec: dict, *, concurrency: int, decode_steps: int, out_tokens: int) -> None:
    dt = next(model.parameters()).dtype
    # KV budget as users get it (auto sizing), then the benchmarks
    before = gpu_mem()
    t = time.monotonic()
    engine = LLMEngine(model, tok, EngineConfig(max_num_seqs=concurrency, max_num_batched_tokens=max(4096, concurrency)))
    kv = engine.runner.kv_cache
    rec["kv_cache"] = {"num_blocks": kv.num_blocks, "gib": round(kv.num_blocks * kv.bytes_per_block() / 2**30, 2),
                       "tokens": kv.num_blocks * kv.block_size, "alloc_s": round(time.monotonic() - t, 2),
                       "gpu_before": before, "gpu_after": gpu_mem()}
    greedy = dict(temperature=0, ignore_eos=True)
    size = model.config.image_size

    # (1) first token with one 448x448 image (1 tile), warm-up on another image first
    def first_token(image, rid):
        req = engine.processor.prepare([Message("user", "Please describe the image shortly.", [image])], max_num=1)
        sync()
        start = time.perf_counter()
        engine.add_request(rid, req, SamplingParams(max_new_tokens=1, **greedy))
        while engine.has_unfinished_requests():
            engine.step()
        return time.perf_counter() - start, len(req.prompt_token_ids)
    first_token(make_image(size, size, 100), "warm")
    ttft, n_prompt = first_token(make_image(size, size, 101), "ttft")
    pixels = engine.processor.image_input(make_image(size, size, 102), max_num=1).pixel_values
    vision = timed(lambda: model.extract_feature(pixels), repeat=3)
    rec["ttft_one_448_image_s"] = round(ttft, 4)
    rec["ttft_prompt_tokens"] = n_prompt
    rec["vision_encoder_one_tile_ms"] = round(vision * 1e3, 2)

    # (2) decode at batch 1, ~280-token context
    prompt = engine.processor.prepare([Message("user", "hello " * 250)])
    engine.add_request("b1", prompt, SamplingParams(max_new_tokens=decode_steps + 8, **greedy))
    for _ in range(4):
        engine.step()
    sync()
    start = time.perf_counter()
    for _ in range(decode_steps):
        engine.step()
    per_token = (time.perf_counter() - start) / decode_steps
    engine.abort_request("b1")
    wbytes = sum(p.numel() * p.element_size() for n, p in model.language_model.named_parameters()
                 if "embed_tokens" not in n) + sum(b.numel() * b.element_size() for b in model.language_model.buffers())
    rec["decode_b1_tok_s"] = round(1 / per_token, 1)
    rec["decode_b1_ms"] = round(per_token * 1e3, 2)
    if SUMMARY.get("hbm_gbps"):
        floor = wbytes / (SUMMARY["hbm_gbps"] * 1e9)          # bytes moved per second by a device copy
        rec["decode_b1_weight_floor_ms"] = round(floor * 1e3, 2)
        rec["decode_b1_pct_of_floor"] = round(100 * floor / per_token, 1)

    # (3) concurrency: throughput + TTFT, then steady decode step time with all sequences decoding
    reqs = [engine.processor.prepare([Message("user", f"Request {i}: tell me a long story about the number {i}. "
                                                      + "Add details. " * (i % 16))]) for i in range(concurrency)]
    engine.generate(reqs[:min(8, concurrency)], SamplingParams(max_new_tokens=4, **greedy))      # warm-up
    sync()
    start = time.perf_counter()
    outs = engine.generate(reqs, SamplingParams(max_new_tokens=out_tokens, **greedy))
    wall = time.perf_counter() - start
    ttfts = sorted(o.first_token_time - o.arrival_time for o in outs if o.first_token_time is not None)
    total = sum(len(o.token_ids) for o in outs)
    rec[f"concurrent_{concurrency}"] = {
        "output_tok_s": round(total / wall, 1), "wall_s": round(wall, 2), "output_tokens": total,
        "ttft_p50_s": round(ttfts[len(ttfts) // 2], 3) if ttfts else None,
        "ttft_max_s": round(ttfts[-1], 3) if ttfts else None}
    for i, r in enumerate(reqs):
        engine.add_request(f"s{i}", r, SamplingParams(max_new_tokens=decode_steps + 64, **greedy))
    guard = time.monotonic() + 120
    while any(engine._states[f"s{i}"].seq.num_output_tokens == 0 for i in range(concurrency)):
        engine.step()
        if time.monotonic() > guard:
            raise RuntimeError("the concurrent requests were not all admitted within 120 s (KV pool too small?)")
    for _ in range(2):
        engine.step()
    sync()
    start = time.perf_counter()
    for _ in range(decode_steps):
        engine.step()
    step = (time.perf_counter() - start) / decode_steps
    rec[f"steady_decode_B{concurrency}"] = {"ms_per_step": round(step * 1e3, 2),
                                            "tok_s": round(concurrency / step, 1)}
    for i in range(concurrency):
        engine.abort_request(f"s{i}")

    # (4) optional long context
    if ARGS.long_context and ON_GPU:
        n, ctx = 16, 4000
        long_reqs = [engine.processor.prepare([Message("user", f"{i} " + "word " * ctx)]) for i in range(n)]
        for i, r in enumerate(long_reqs):
            engine.add_request(f"L{i}", r, SamplingParams(max_new_tokens=decode_steps + 16, **greedy))
        start = time.perf_counter()
        guard = time.monotonic() + 120
        while any(engine._states[f"L{i}"].seq.num_output_tokens == 0 for i in range(n)):
            engine.step()
            if time.monotonic() > guard:
                raise RuntimeError("long-context prefill did not finish within 120 s")
        sync()
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(decode_steps):
            engine.step()
        step = (time.perf_counter() - start) / decode_steps
        rec[f"long_context_{n}x{ctx}"] = {"prefill_s": round(prefill, 2), "decode_ms_per_step": round(step * 1e3, 2),
                                          "tok_s": round(n / step, 1)}
        for i in range(n):
            engine.abort_request(f"L{i}")
    rec["gpu_end"] = gpu_mem()
    rec["dtype"] = str(dt)
    del engine
    cleanup()


def official_chat(model, tok, folder: Path, rec: dict) -> None:
    size = model.config.image_size
    img_file = WORK / "image_448.png"
    make_image(448, 448, 7).save(img_file)
    dtype = next(model.parameters()).dtype
    pixel_values = load_image(img_file, input_size=size, max_num=12).to(dtype)
    if ON_GPU:
        pixel_values = pixel_values.cuda(DEVICE)
    cfg = dict(max_new_tokens=16 if QUICK else 64, do_sample=False)
    start = time.perf_counter()
    response = model.chat(tok, pixel_values, "<image>\nPlease describe the image shortly.", cfg)
    sync()
    rec["official_chat_s"] = round(time.perf_counter() - start, 3)
    rec["official_chat_response_chars"] = len(response)
    start = time.perf_counter()
    answers = model.batch_chat(tok, torch.cat([pixel_values, pixel_values]), ["Describe it.", "What is it?"], cfg,
                               num_patches_list=[pixel_values.shape[0]] * 2)
    sync()
    rec["official_batch_chat_s"] = round(time.perf_counter() - start, 3)
    rec["official_batch_chat_answers"] = len(answers)


def real_stage(variant: str, min_left: float):
    @stage(f"real-{variant}", variant, min_left_s=min_left)
    def _real(rec):
        folder = write_real(variant)
        rec["checkpoint_gib"] = round(sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**30, 2)
        host_peak_reset()
        if ON_GPU:
            torch.cuda.reset_peak_memory_stats(DEVICE)
        start = time.perf_counter()
        model = AutoModel.from_pretrained(folder, torch_dtype=torch.bfloat16 if ON_GPU else torch.float32,
                                          low_cpu_mem_usage=True, use_flash_attn=True, trust_remote_code=True,
                                          device_map=str(DEVICE)).eval()
        sync()
        load = time.perf_counter() - start
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True, use_fast=False)
        rec["load"] = {"seconds": round(load, 2), "gib_per_s": round(rec["checkpoint_gib"] / load, 2),
                       "host_peak_rss_gib": host_peak_gib(), "gpu": gpu_mem(),
                       "compute_plan": getattr(getattr(model, "compute_plan", None), "describe", lambda: None)()}
        # Random real-shape weights with the vendored tiny tokenizer: the LM head would pick ids the tokenizer
        # cannot decode (chat() decodes; the engine masks them itself). Zero those rows: their logits become 0,
        # below the largest in-vocabulary logit, so greedy answers stay decodable. No effect on speed.
        if model.config.llm.vocab_size > len(tok):
            with torch.no_grad():
                model.language_model.lm_head.weight[len(tok):].zero_()
            rec["note"] = f"lm_head rows >= {len(tok)} zeroed (tiny tokenizer on a {model.config.llm.vocab_size} vocab)"
        try:
            official_chat(model, tok, folder, rec)
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            rec["official_chat_error"] = f"{type(exc).__name__}: {exc}"
            rec["ok"] = False
        steps = 8 if QUICK else 48
        bench_engine(model, tok, rec, concurrency=4 if QUICK else ARGS.concurrency, decode_steps=steps,
                     out_tokens=8 if QUICK else 128)
        if rec.get("ok") is None:
            rec["ok"] = True
        del model
        cleanup()
    return _real


real_stage("1B", min_left=40)


@stage("quant-1B", "quant", min_left_s=40)
def _quant_1b(rec):
    folder = write_real("1B")
    tok = AutoTokenizer.from_pretrained(folder)
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    ref = AutoModel.from_pretrained(folder, torch_dtype=dtype, device_map=str(DEVICE)).eval()
    prompt_engine = LLMEngine(ref, tok, EngineConfig(max_num_seqs=2, num_blocks=128))
    prompt = prompt_engine.processor.prepare([Message("user", "hello " * 250)])
    steps = 8 if QUICK else 32
    params = SamplingParams(max_new_tokens=steps, temperature=0, ignore_eos=True)
    want = prompt_engine.generate([prompt], params)[0].token_ids
    del prompt_engine, ref
    cleanup()
    out = {}
    for label, kw in {"load_in_8bit": dict(load_in_8bit=True), "load_in_4bit (int4 g128)": dict(load_in_4bit=True)}.items():
        try:
            host_peak_reset()
            start = time.perf_counter()
            m = AutoModel.from_pretrained(folder, torch_dtype=dtype, device_map=str(DEVICE), **kw).eval()
            sync()
            load = time.perf_counter() - start
            engine = LLMEngine(m, tok, EngineConfig(max_num_seqs=2, num_blocks=128))
            got = engine.generate([prompt], params)[0].token_ids
            rid = "q"
            engine.add_request(rid, prompt, SamplingParams(max_new_tokens=steps + 8, temperature=0, ignore_eos=True))
            for _ in range(4):
                engine.step()
            sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                engine.step()
            per = (time.perf_counter() - t0) / steps
            engine.abort_request(rid)
            kinds = sorted({type(mod).__name__ + (f"[{getattr(mod, 'backend', '')}]" if hasattr(mod, "backend") else "")
                            for mod in m.language_model.modules() if "Int" in type(mod).__name__})
            out[label] = {"load_s": round(load, 2), "host_peak_rss_gib": host_peak_gib(), "gpu": gpu_mem(),
                          "decode_b1_tok_s": round(1 / per, 1), "layers": kinds,
                          "greedy_tokens_equal_bf16": sum(a == b for a, b in zip(got, want)), "of": len(want)}
            del engine, m
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            out[label] = {"error": f"{type(exc).__name__}: {exc}"}
        cleanup()
    rec["runs"] = out
    rec["ok"] = all("error" not in r for r in out.values())


real_stage("8B", min_left=150 if ARGS.scale == "real" else 20)


@stage("tp", min_left_s=40)
def _tp(rec):
    if not ON_GPU or torch.cuda.device_count() < 2:
        return {"skipped": "needs 2 CUDA devices"}
    if FIX is None:
        return {"skipped": "no fixtures"}
    from internvl_runtime import pipeline
    path = FIX / "ckpt" / "tiny-8B"
    single = pipeline(path, device=str(DEVICE), dtype="float32")
    want = single(("Describe the image.", str(FIX / "data" / "img_448x448.png"))).text
    single.close()
    pipe = pipeline(path, device="cuda", dtype="float32", tensor_parallel_size=2)
    try:
        got = pipe(("Describe the image.", str(FIX / "data" / "img_448x448.png"))).text
    finally:
        pipe.close()
    rec["equal"] = got == want
    rec["ok"] = got == want


# ------------------------------------------------------------------------------------------ summary
SUMMARY["total_seconds"] = round(elapsed(), 1)
if not ARGS.keep and not ARGS.workdir:
    import shutil
    shutil.rmtree(WORK, ignore_errors=True)
out_path = Path(ARGS.out) if ARGS.out else (Path(os.environ["OUT"]) / "gpu_check_summary.json" if os.environ.get("OUT")
                                             else Path("gpu_check_summary.json"))
try:
    out_path.write_text(json.dumps(SUMMARY, indent=2, default=str))
except OSError as exc:
    print(f"could not write {out_path}: {exc}", file=sys.stderr)
print(json.dumps(SUMMARY, default=str))
