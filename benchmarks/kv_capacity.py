"""How many sequences of N tokens fit in a KV pool of a given size, with the InternVL3.5-GPT-OSS-20B-A4B decoder's
shape (24 layers alternating sliding-window 128 / full attention, 8 KV heads of 64, bf16): every layer keeping
every block (one KV group, ``disable_hybrid_kv_cache_manager``) against the two groups of ``engine.kv_groups``
(12 shared pools per block id; the sliding group holds at most the window's blocks).

Pure arithmetic on the engine's own functions (no model, no device): the bytes per block id as the engine sizes
it, and the blocks a sequence holds at most (``kv_groups.max_blocks_per_sequence``, which the scheduler's context
check and the memory plan use: prefill chunks of ``--chunk`` tokens included), plus the same count once every
sequence is decoding (chunk 1). Then a check by simulation: that many sequences admitted and decoded to N tokens
through the real ``Scheduler`` never preempt, and one more does (``--simulate``, small N only).

    python benchmarks/kv_capacity.py --pool-gib 16 32 --tokens 1024 4096 16384 65536 131072
"""

from __future__ import annotations

import argparse

from internvl_runtime.engine.kv_groups import KVCacheGroup, kv_cache_groups, max_blocks_per_sequence

LAYERS, KV_HEADS, HEAD_DIM, DTYPE_BYTES, WINDOW = 24, 8, 64, 2, 128


def bytes_per_block(pools: int, block_size: int) -> int:
    """Keys and values of ``pools`` pool tensors for one block id (ModelRunner.kv_bytes_per_block's rule)."""
    return 2 * pools * block_size * KV_HEADS * HEAD_DIM * DTYPE_BYTES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool-gib", type=float, nargs="+", default=[16.0, 32.0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384, 65536, 131072])
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=4096, help="max_num_batched_tokens (prefill chunk)")
    args = parser.parse_args()
    bs = args.block_size
    windows = [WINDOW if i % 2 == 0 else None for i in range(LAYERS)]
    layouts: dict[str, tuple[KVCacheGroup, ...]] = {
        "every block kept": (KVCacheGroup(tuple(range(LAYERS))),),
        "sliding group frees": kv_cache_groups(windows),
    }
    print(f"GPT-OSS-20B KV shape: {LAYERS} layers, {KV_HEADS} KV heads x {HEAD_DIM}, bf16, window {WINDOW}, "
          f"block {bs}, prefill chunk {args.chunk}")
    print("| pool | N tokens | layout | bytes/block id | block ids | blocks/seq (peak) | seqs fit (peak) | "
          "blocks/seq (decoding) | seqs fit (decoding) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for gib in args.pool_gib:
        for n in args.tokens:
            for name, groups in layouts.items():
                pools = max(len(g.layers) for g in groups)
                per_block = bytes_per_block(pools, bs)
                ids = int(gib * 2**30) // per_block
                peak = max_blocks_per_sequence(groups, n, bs, args.chunk)
                steady = max_blocks_per_sequence(groups, n, bs, 1)
                print(f"| {gib:g} GiB | {n} | {name} | {per_block // 1024} KiB | {ids} | {peak} | {ids // peak} | "
                      f"{steady} | {ids // steady} |")


if __name__ == "__main__":
    main()
