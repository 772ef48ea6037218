"""Batch-1 decode of a float32 model: the native stack (fp32 GEMV kernels) against the Python layers, in turns.

A script, never a test. Loads the random-weight InternVL2-1B checkpoint in float32 once (the official
path's dtype), then alternates decode rounds through ``LLMEngine.step()`` (greedy, ~280-token context, as
``llamacpp_side_by_side.py``) between two ways of computing:

- ``native``: the compute plan as loaded: every decode step in one native call over the float32 layers,
  the LM head on the fp32 GEMV (``kernels.linear_f32``);
- ``python``: the plan a float32 model had before the fp32 kernels: the Python layer loop and torch's
  ``F.linear`` everywhere (``set_decode_stack(None)``, no Linear plan).

Rounds alternate (native, python, native, ...) so that other work on a shared host falls on both alike;
each prints wall ms/token and CPU ms/token (all threads: on a shared host the wall time includes waiting
for a CPU), the median and best of each side, and the floor: the fp32 bytes read per token (LLM layers and
LM head, the embedding excepted) over the DRAM read bandwidth (``gemv.read_bandwidth``: a float32 sum of
512 MiB), sampled before, between and after, best kept.

    python benchmarks/decode_fp32.py                              # the ISA path the host's plan picks
    INTERNVL_CPU_KERNEL=avx2 python benchmarks/decode_fp32.py     # the AVX2+FMA tile (an AVX2-only host's)
    python benchmarks/decode_fp32.py --rounds 5 --steps 32 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

CONTEXT = 280


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("/tmp/bench/InternVL2-1B"))
    ap.add_argument("--steps", type=int, default=16, help="decode tokens per round")
    ap.add_argument("--rounds", type=int, default=4, help="rounds per side (alternating)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    from gemv import read_bandwidth
    from internvl_runtime import AutoModel, AutoTokenizer
    from internvl_runtime.engine.engine import EngineConfig, LLMEngine
    from internvl_runtime.engine.sampling_params import SamplingParams
    from internvl_runtime.hardware import describe_host
    from internvl_runtime.models.layers.linear import set_linear_plan
    from internvl_runtime.processing.inputs import PreparedRequest
    from internvl_runtime.quantization import model_bytes

    torch.set_num_threads(args.threads)
    if not (args.model / "config.json").is_file():
        from internvl_runtime.testing.checkpoints import write_checkpoint
        write_checkpoint(args.model, "1B", scale="real")
    bandwidth = read_bandwidth(512)
    bw = [bandwidth()]
    model = AutoModel.from_pretrained(args.model, torch_dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    lm = model.language_model
    per_token = model_bytes(lm)
    if not lm.config.tie_word_embeddings:     # the embedding matrix is read one row per token
        embed = lm.get_input_embeddings().weight
        per_token -= embed.numel() * embed.element_size()
    native_stack, native_rows = lm.decode_stack, lm.decode_stack_rows
    native_plan = lm.lm_head.plan
    print(f"host: {describe_host()}")
    print(model.compute_plan.describe())
    ids: list[int] = []
    while len(ids) < CONTEXT:
        ids += tokenizer.encode("hello world, tell me a story about the number seven. ")
    request = PreparedRequest("", ids[:CONTEXT], [], [])
    engine = LLMEngine(model, tokenizer, EngineConfig(num_blocks=(CONTEXT + args.steps + 8) // 16 + 4,
                                                      max_num_seqs=1))
    figures: dict[str, list[tuple[float, float]]] = {"native": [], "python": []}
    for r in range(2 * args.rounds):
        side = "native" if r % 2 == 0 else "python"
        if side == "native":
            set_linear_plan(model, native_plan)
            lm.set_decode_stack(native_stack, native_rows)
        else:
            set_linear_plan(model, None)
            lm.set_decode_stack(None)
        engine.add_request(f"decode-{r}", request, SamplingParams(max_new_tokens=args.steps + 4, ignore_eos=True,
                                                                  temperature=0))
        for _ in range(3):                        # prefill (later rounds: from the prefix cache) + 2 tokens
            engine.step()
        begin, cpu = time.perf_counter(), time.process_time()
        for _ in range(args.steps):
            engine.step()
        wall_ms = (time.perf_counter() - begin) / args.steps * 1e3
        cpu_ms = (time.process_time() - cpu) / args.steps * 1e3
        engine.abort_request(f"decode-{r}")
        figures[side].append((wall_ms, cpu_ms))
        print(f"round {r // 2} {side}: {wall_ms:.1f} ms/token wall, {cpu_ms:.1f} ms/token CPU", flush=True)
        if side == "python":
            bw.append(bandwidth())
    best_bw = max(bw)
    floor = per_token / best_bw / 1e6
    print(f"fp32 bytes per token {per_token / 1e9:.3f} GB; DRAM read {best_bw:.1f} GB/s best of {len(bw)} "
          f"(worst {min(bw):.1f}); floor {floor:.1f} ms/token")
    for side, rows in figures.items():
        wall = [w for w, _ in rows]
        cpu = [c for _, c in rows]
        print(f"{side}: wall median {statistics.median(wall):.1f} / best {min(wall):.1f} ms/token "
              f"({100 * floor / min(wall):.0f}% of the floor at best); CPU median {statistics.median(cpu):.1f} / "
              f"best {min(cpu):.1f} ms/token")
    ratio = [p[0] / n[0] for n, p in zip(figures["native"], figures["python"], strict=True)]
    print(f"python / native wall time per pair: {', '.join(f'{x:.2f}' for x in ratio)} "
          f"(median {statistics.median(ratio):.2f})")


if __name__ == "__main__":
    main()
