"""Tensor parallelism: decode tokens/s and first-token time with 1 and N ranks, and what it costs on the wire.

    python benchmarks/tensor_parallel.py                 # InternVL2-1B shapes, random weights, 1 vs 2 ranks
    python benchmarks/tensor_parallel.py --table         # only the shape tables (no weights, instant)

The checkpoint is a random-weight one with the real InternVL2-1B shapes (written once to
``--checkpoint``, ~1.9 GB in bfloat16). Text-only prompts: the vision encoder runs on rank 0 alone and is
the same with or without tensor parallelism. Results go to stdout as a table and to ``--json``.

Communication per generated token (computed from the shapes, not measured): each decoder layer does two
all-reduces of the token's hidden vector (after o_proj and down_proj), the embedding one more, and the
logits one all-gather of the padded vocabulary. A ring all-reduce moves 2(N-1)/N of the buffer through
each rank's link, an all-gather (N-1)/N.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from internvl_runtime.testing.checkpoints import (  # noqa: E402 - runs from a checkout: the root goes on sys.path first
    VARIANTS,
    make_config,
    official_tensor_shapes,
)

DTYPE_BYTES = {"bfloat16": 2, "float32": 4, "int8": 1, "int4": 0.5}


def comm_per_token(variant: str, tp: int, act_bytes: int = 2) -> dict[str, float]:
    llm = make_config(variant, "real")["llm_config"]
    hidden, layers, vocab = llm["hidden_size"], llm["num_hidden_layers"], llm["vocab_size"]
    padded = math.ceil(vocab / tp) * tp
    reduce_payload = (2 * layers + 1) * hidden * act_bytes
    gather_payload = padded * act_bytes
    wire = reduce_payload * 2 * (tp - 1) / tp + gather_payload * (tp - 1) / tp
    return {"all_reduces": 2 * layers + 1, "payload_bytes": reduce_payload + gather_payload,
            "wire_bytes_per_rank": wire}


def param_bytes(variant: str) -> tuple[int, int]:
    """(vision + mlp1 params, LLM params) of the released shapes."""
    shapes = official_tensor_shapes(make_config(variant, "real"))
    llm = sum(math.prod(s) for n, s in shapes.items() if n.startswith("language_model."))
    return sum(math.prod(s) for s in shapes.values()) - llm, llm


def gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def print_tables() -> None:
    print("| model | vision+mlp1 params | LLM params | bf16 total | bf16 LLM per rank, TP=2 / 4 / 8 | "
          "int8 total | comm/token TP=2 (bf16, wire per rank) |")
    print("|---|---|---|---|---|---|---|")
    for v in VARIANTS:
        vis, llm = param_bytes(v)
        per_rank = " / ".join(gb(llm * 2 / tp) for tp in (2, 4, 8))
        comm = comm_per_token(v, 2)
        print(f"| {v} | {vis / 1e9:.2f} B | {llm / 1e9:.2f} B | {gb((vis + llm) * 2)} | {per_rank} | "
              f"{gb(vis * 2 + llm)} | {comm['wire_bytes_per_rank'] / 1024:.0f} KiB "
              f"({comm['all_reduces']} all-reduces) |")


def _measure(engine, prompt_ids: list[int], new_tokens: int, repeats: int) -> dict[str, float]:
    from internvl_runtime.engine.sampling_params import SamplingParams
    from internvl_runtime.processing.inputs import PreparedRequest

    ttfts, rates = [], []
    for r in range(repeats + 1):                       # the first round warms up
        request = PreparedRequest(prompt="", prompt_token_ids=list(prompt_ids), images=[], mm_spans=[])
        engine.add_request(f"bench-{r}", request, SamplingParams(max_new_tokens=new_tokens, temperature=0,
                                                                 ignore_eos=True))
        start = time.perf_counter()
        first = None
        while engine.has_unfinished_requests():
            engine.step()
            if first is None:
                first = time.perf_counter()
        end = time.perf_counter()
        if r:
            ttfts.append(first - start)
            rates.append((new_tokens - 1) / (end - first))
    return {"ttft_s": min(ttfts), "decode_tok_s": max(rates)}


def run(checkpoint: Path, ranks: list[int], prompt_len: int, new_tokens: int, repeats: int, dtype: str,
        single_threads: int | None = None) -> list[dict]:
    from internvl_runtime.distributed.launch import tensor_parallel_engine
    from internvl_runtime.engine.engine import EngineConfig, LLMEngine

    results = []
    prompt = [(i * 7919) % 600 + 10 for i in range(prompt_len)]
    for tp in ranks:
        config = EngineConfig(num_blocks=-(-(prompt_len + new_tokens) // 16) + 8, max_num_seqs=1)
        t0 = time.perf_counter()
        if tp == 1:
            torch.set_num_threads(single_threads or os.cpu_count() or 1)
            engine, close = LLMEngine.from_pretrained(checkpoint, dtype=dtype, config=config), (lambda: None)
        else:
            group = tensor_parallel_engine(checkpoint, tp, dtype=dtype, engine_config=config)
            engine, close = group.engine, group.close
        load_s = time.perf_counter() - t0
        try:
            numbers = _measure(engine, prompt, new_tokens, repeats)
        finally:
            close()
        numbers.update(ranks=tp, load_s=load_s, threads_per_rank=torch.get_num_threads())
        results.append(numbers)
        print(f"ranks={tp}: first token {numbers['ttft_s'] * 1000:.0f} ms ({prompt_len}-token prompt), "
              f"decode {numbers['decode_tok_s']:.1f} tok/s, load {load_s:.1f} s", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "internvl-bench-1B")
    parser.add_argument("--ranks", default="1,2", help="comma-separated rank counts (default: 1,2)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--single-threads", type=int, default=None,
                        help="torch threads of the 1-rank run (default: all cores)")
    parser.add_argument("--table", action="store_true", help="print the shape tables only")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    print_tables()
    if args.table:
        return
    if not (args.checkpoint / "config.json").is_file():
        from internvl_runtime.testing.checkpoints import write_checkpoint

        print(f"writing a random-weight InternVL2-1B-shaped checkpoint to {args.checkpoint} ...", flush=True)
        write_checkpoint(args.checkpoint, "1B", scale="real")
    comm = comm_per_token("1B", 2, DTYPE_BYTES[args.dtype])
    print(f"InternVL2-1B, TP=2, {args.dtype}: {comm['all_reduces']} all-reduces + 1 all-gather per step; "
          f"{comm['payload_bytes'] / 1024:.0f} KiB payload, {comm['wire_bytes_per_rank'] / 1024:.0f} KiB per rank "
          "on the wire per decoded token", flush=True)
    results = run(args.checkpoint, [int(r) for r in args.ranks.split(",")], args.prompt_len, args.new_tokens,
                  args.repeats, args.dtype, args.single_threads)
    if args.json:
        args.json.write_text(json.dumps({"results": results, "comm_per_token_tp2": comm}, indent=2))


if __name__ == "__main__":
    main()
