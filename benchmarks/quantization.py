"""Weight-only int8 / int4 against bf16 on the InternVL2-1B shapes (random weights): memory, logits error,
prefill and decode speed, side by side in one process.

    python benchmarks/quantization.py [--model /tmp/bench/InternVL2-1B] [--steps 32] [--rounds 5] [--append]

- memory: bytes held by the weights (all, and the LLM alone), and each mode's peak resident memory while
  loading, measured in a child process per mode;
- logits: relative error (||q - bf16|| / ||bf16||) over the last-token logits of a 282-token prompt (one
  448 tile = 256 image tokens + text; the image features come from the bf16 vision encoder, which every
  mode keeps in 16-bit) and of the following decode steps, teacher-forced on bf16's greedy tokens; and
  how often the greedy token agrees with bf16;
- speed: prefill of the 282 tokens (best of 2) and decode ms/token (best and median round; in each round
  every mode decodes ``--steps`` tokens, so noise from other work on the host hits all modes alike).
With ``--append`` the table is appended to benchmarks/RESULTS.md (created with a header if missing).
Writes the real-shape checkpoint (1.8 GB) into a temporary folder when ``--model`` does not exist.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from internvl_runtime import AutoModel, AutoTokenizer
from internvl_runtime.engine.model_runner import ModelRunner, SequenceStep
from internvl_runtime.hardware import describe_host
from internvl_runtime.loading import load_model
from internvl_runtime.quantization import model_bytes
from internvl_runtime.quantization.apply import _int4_group
from internvl_runtime.quantization.linear import dequantize_int4, quantize_int4

MODES = {"bf16": None, "int8": "int8", "int4": "int4", "int4 g32": "int4:g32"}
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
BLOCK = 16


def rss_mib(field: str = "VmRSS") -> float:
    """Resident memory of this process (VmHWM: its peak so far), MiB."""
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


#: modes of the same bf16 weights stored otherwise (not a quantization): "bf16-packed" (``pack_bf16=True``)
PACKED = {"bf16-packed": "bf16"}


def load(path: Path, mode: str):
    if mode in PACKED:
        return load_model(path, dtype=torch.bfloat16, pack_bf16=True).eval()
    return AutoModel.from_pretrained(path, torch_dtype=torch.bfloat16, quantization=MODES[mode]).eval()


def child_load(path: Path, mode: str) -> None:
    """Child process: load one mode, print its peak resident memory and weight bytes as JSON."""
    start = time.perf_counter()
    model = load(path, mode)
    seconds = time.perf_counter() - start
    gc.collect()
    print(json.dumps({"peak_mib": rss_mib("VmHWM"), "rss_mib": rss_mib(), "bytes": model_bytes(model),
                      "llm_bytes": model_bytes(model.language_model), "load_s": seconds}))


def prompt(model, path: Path, generator: torch.Generator) -> tuple[list[int], torch.Tensor]:
    """282 token ids: 13 text, 256 <IMG_CONTEXT>, 13 text; and the features of one random tile."""
    img = AutoTokenizer.from_pretrained(path).convert_tokens_to_ids("<IMG_CONTEXT>")
    model.img_context_token_id = img
    text = [t for t in torch.randint(0, model.config.llm.vocab_size, (40,), generator=generator).tolist() if t != img]
    ids = text[:13] + [img] * 256 + text[13:26]
    pixel_values = torch.randn(1, 3, 448, 448, generator=generator).to(torch.bfloat16)
    with torch.inference_mode():
        features = model.extract_feature(pixel_values).reshape(-1, model.config.llm.hidden_size)
    return ids, features


def fake_int4_logits(path: Path, ids: list[int], features: torch.Tensor, tokens: list[int],
                     max_tokens: int) -> torch.Tensor:
    """The same logits from a bf16 model whose LLM linear weights hold their int4 values (default group): the
    error of the format alone, computed by bf16 kernels (tells kernel error from format error)."""
    model = load(path, "bf16")
    model.img_context_token_id = AutoTokenizer.from_pretrained(path).convert_tokens_to_ids("<IMG_CONTEXT>")
    with torch.no_grad():
        for module in model.language_model.modules():
            group = _int4_group(module.in_features, 128) if isinstance(module, torch.nn.Linear) else None
            if group is not None:                            # the group quantize_model picks for the layer
                q, sz = quantize_int4(module.weight, group)
                module.weight.copy_(dequantize_int4(q, sz, group).to(module.weight.dtype))
    session = Session(model, ids, features, max_tokens)
    out = [session.prefill()[0]]
    out += [session.decode(token, len(ids) + step) for step, token in enumerate(tokens)]
    return torch.stack(out)


class Session:
    """One model with its KV cache, fed the same tokens as the others."""

    def __init__(self, model, ids: list[int], features: torch.Tensor, max_tokens: int) -> None:
        self.model = model
        self.runner = ModelRunner(model, num_blocks=-(-max_tokens // BLOCK) + 1, block_size=BLOCK,
                                  image_token_id=model.img_context_token_id)
        self.blocks = list(range(self.runner.kv_cache.num_blocks))
        self.ids, self.features = ids, features

    def prefill(self) -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        logits = self.runner.execute([SequenceStep(self.ids, 0, self.blocks, self.features)])
        return logits[0], time.perf_counter() - start

    def decode(self, token: int, position: int) -> torch.Tensor:
        return self.runner.execute([SequenceStep([token], position, self.blocks)])[0]


def measure(path: Path, steps: int, rounds: int) -> dict:
    loads = {}
    for mode in MODES:   # peak memory of loading each mode, each in a fresh process
        out = subprocess.run([sys.executable, __file__, "--model", str(path), "--child-load", mode],
                             capture_output=True, text=True, check=True)
        loads[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"load {mode}: {loads[mode]}", flush=True)

    models = {mode: load(path, mode) for mode in MODES}
    ids, features = prompt(models["bf16"], path, torch.Generator().manual_seed(0))
    for model in models.values():
        model.img_context_token_id = models["bf16"].img_context_token_id
    max_tokens = len(ids) + 1 + rounds * steps + steps
    # logits error: prefill + `steps` decode steps teacher-forced on bf16's greedy tokens
    sessions = {mode: Session(m, ids, features, max_tokens) for mode, m in models.items()}
    logits = {mode: [] for mode in MODES}
    for mode, session in sessions.items():
        logits[mode].append(session.prefill()[0])
    tokens = []
    for step in range(steps):
        token = int(logits["bf16"][-1].argmax())
        tokens.append(token)
        for mode, session in sessions.items():
            logits[mode].append(session.decode(token, len(ids) + step))
    reference = torch.stack(logits["bf16"])
    errors, agree = {}, {}
    fake = fake_int4_logits(path, ids, features, tokens, max_tokens)
    errors["fake int4"] = float((fake - reference).norm() / reference.norm())
    for mode in MODES:
        stacked = torch.stack(logits[mode])
        errors[mode] = float((stacked - reference).norm() / reference.norm())
        agree[mode] = float((stacked.argmax(-1) == reference.argmax(-1)).float().mean())
    # prefill timing again, now that everything is warm: fresh sessions, modes interleaved, best of 3
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(3):
        for mode, model in models.items():
            times[mode].append(Session(model, ids, features, len(ids) + 1).prefill()[1])
    prefill_s = {mode: min(t) for mode, t in times.items()}
    # decode speed, interleaved
    per_token = {mode: [] for mode in MODES}
    position = len(ids) + steps
    for _ in range(rounds):
        for mode, session in sessions.items():
            start = time.perf_counter()
            for step in range(steps):
                session.decode(tokens[step % len(tokens)], position + step)
            per_token[mode].append((time.perf_counter() - start) / steps * 1e3)
        position += steps
    return {"loads": loads, "errors": errors, "agree": agree, "prefill_s": prefill_s,
            "decode_ms": {m: min(v) for m, v in per_token.items()},
            "decode_median": {m: statistics.median(v) for m, v in per_token.items()},
            "decode_all": per_token, "steps": steps, "rounds": rounds, "prompt_tokens": len(ids)}


def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.0f} MiB" if n >= 10 * 2**20 else f"{n / 2**10:.0f} KiB"


def fmt_seconds(t: float) -> str:
    return f"{t:.2f} s" if t >= 0.1 else f"{t * 1e3:.0f} ms"


def table(result: dict) -> str:
    bf16 = result["loads"]["bf16"]
    header = ("| mode | weights (all) | LLM weights | RSS after load | peak RSS while loading "
              "| logits rel. err vs bf16 | greedy agreement | prefill 282 tok "
              "| decode ms/token, best round (median) | decode vs bf16 |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|"]
    for mode in MODES:
        load = result["loads"][mode]
        ms = result["decode_ms"][mode]
        lines.append(
            f"| {mode} | {fmt_bytes(load['bytes'])} ({load['bytes'] / bf16['bytes']:.2f}x) "
            f"| {fmt_bytes(load['llm_bytes'])} ({load['llm_bytes'] / bf16['llm_bytes']:.2f}x) "
            f"| {load['rss_mib']:.0f} MiB | {load['peak_mib']:.0f} MiB | {result['errors'][mode]:.4f} "
            f"| {result['agree'][mode] * 100:.0f}% "
            f"| {fmt_seconds(result['prefill_s'][mode])} | {ms:.1f} ({result['decode_median'][mode]:.1f}) "
            f"| {result['decode_ms']['bf16'] / ms:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="/tmp/bench/InternVL2-1B", help="real-shape InternVL2-1B checkpoint folder")
    parser.add_argument("--steps", type=int, default=32, help="decode steps per mode per round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved decode rounds")
    parser.add_argument("--append", action="store_true", help="append the results to benchmarks/RESULTS.md")
    parser.add_argument("--child-load", choices=list(MODES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    path = Path(args.model)
    if args.child_load:
        child_load(path, args.child_load)
        return
    tmp = None
    if not (path / "config.json").is_file():
        from internvl_runtime.testing.checkpoints import write_checkpoint
        tmp = tempfile.TemporaryDirectory()
        path = write_checkpoint(Path(tmp.name) / "InternVL2-1B", "1B", scale="real")
    host = describe_host()
    print(host, flush=True)
    load_before = os.getloadavg()[0]
    result = measure(path, args.steps, args.rounds)
    load_after = os.getloadavg()[0]
    text = table(result)
    print(text)
    print("decode ms/token per round:", {m: [round(v, 1) for v in vs] for m, vs in result["decode_all"].items()})
    if args.append:
        if not RESULTS.exists():
            RESULTS.write_text("# Benchmark results\n\nEach section: what was measured, on which host, and how to "
                               "rerun it. Sections are appended; none is rewritten.\n", encoding="utf-8")
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        llm = json.loads((path / "config.json").read_text(encoding="utf-8"))["llm_config"]
        shape = (f"{path.name}: LLM {llm['num_hidden_layers']} layers x {llm['hidden_size']}, "
                 f"vocab {llm['vocab_size']}, random weights")
        section = (f"\n## Weight-only int8 / int4 vs bf16 ({shape}), {stamp}\n\n"
                   f"Host: {host}\n\n"
                   f"`python benchmarks/quantization.py --model {args.model} --steps {args.steps} "
                   f"--rounds {args.rounds}`. Vision encoder kept "
                   f"in bf16 in every mode; int8: per-output-channel scales; int4: group 128 (default) or 32, bf16 "
                   f"scale + zero per group. "
                   f"Logits error over the last prompt token ({result['prompt_tokens']} tokens, one tile) and "
                   f"{args.steps} teacher-forced decode steps. Decode: ms per token over {args.rounds} interleaved "
                   f"rounds of {args.steps} tokens (best round: other work on this shared host slows whole rounds; "
                   f"load average {load_before:.1f} before, {load_after:.1f} after, on {os.cpu_count()} CPUs). "
                   f"Peak RSS: a fresh process loading that mode; it is the loader's "
                   f"peak (checkpoint pages mapped + 16-bit parameters), the same in every mode: the 16-bit model is "
                   f"read, then quantized layer by layer, which adds nothing to it. RSS after load: the same process "
                   f"once loading is done. Random weights amplify quantization error from layer to layer: "
                   f"the bf16 model with its LLM weights replaced by their int4 values (default group; fake "
                   f"quantization, bf16 kernels) gives logits rel. err {result['errors']['fake int4']:.4f}, "
                   f"so the int4 error is "
                   f"the format's on these weights, not the kernels'; trained checkpoints are expected to fare "
                   f"better (not measurable here).\n\n{text}\n")
        with RESULTS.open("a", encoding="utf-8") as f:
            f.write(section)
        print(f"appended to {RESULTS}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
