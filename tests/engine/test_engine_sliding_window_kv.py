"""The engine on the GPT-OSS tiny variant (tiny-3_5-20B-A4B: layers 0 and 2 slide over 8 positions, 1 and 3
attend fully) with its KV cache in two groups whose sliding one frees blocks past the window (engine.kv_groups):
long greedy generations equal the same engine's with every block kept (``disable_hybrid_kv_cache_manager``),
on the torch backend and on the Triton kernel (interpreted), while the sliding group's blocks per sequence stay
bounded; in the same bytes, more long sequences run at once; preemption and abort free both groups; a
prefix-cache hit on a shared prompt is exact."""

from __future__ import annotations

from dataclasses import replace

import pytest
from test_engine import _loaded

from internvl_runtime.engine.engine import EngineConfig, LLMEngine
from internvl_runtime.engine.kv_groups import KVCacheGroup
from internvl_runtime.engine.sampling_params import SamplingParams
from internvl_runtime.engine.sequence import SequenceStatus
from internvl_runtime.kernels.triton_attention import triton_available

VARIANT = "tiny-3_5-20B-A4B"
BS = 4                               # block size: the window of 8 spans two blocks
LONG = SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True)
FULL, SLIDING = 0, 1


def _engine(**kwargs) -> LLMEngine:
    model, tokenizer = _loaded(VARIANT)
    kwargs.setdefault("num_blocks", 512)
    return LLMEngine(model, tokenizer, EngineConfig(block_size=BS, max_num_batched_tokens=16, **kwargs))


def _prompts(engine: LLMEngine, n: int) -> list:
    return [engine.processor.prepare_prompt(f"Tell me story number {i} about the sea, the ships and the wind.", [])
            for i in range(n)]


def _generate(engine: LLMEngine, prompts: list, params: SamplingParams = LONG) -> tuple[list[list[int]], list[int]]:
    """Greedy ids per prompt, run step by step, and the most sliding-group blocks any sequence held."""
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    bm = engine.scheduler.block_manager
    ids: dict[str, list[int]] = {}
    most: list[int] = []
    while engine.has_unfinished_requests():
        outputs = engine.step()
        if len(bm.kv_groups) > 1:
            most += [bm.num_held_blocks(seq, SLIDING) for seq in engine.scheduler.running]
        ids.update({o.request_id: o.token_ids for o in outputs if o.finished})
    return [ids[str(i)] for i in range(len(prompts))], most


def test_the_engine_groups_gpt_oss_layers() -> None:
    engine = _engine()
    assert engine.kv_groups == (KVCacheGroup((1, 3), None), KVCacheGroup((0, 2), 8))
    kv = engine.runner.kv_cache
    assert kv.keys[0] is kv.keys[1] and kv.keys[2] is kv.keys[3] and kv.keys[0] is not kv.keys[2]
    kept = _engine(disable_hybrid_kv_cache_manager=True)
    assert len(kept.kv_groups) == 1 and len({id(k) for k in kept.runner.kv_cache.keys}) == 4


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not triton_available(), reason="triton is not installed"))])
def test_long_greedy_equals_keeping_every_block_with_bounded_sliding_blocks(backend: str) -> None:
    extra = {"attention_backend": backend} | ({"enforce_eager": True} if backend == "triton" else {})
    freeing = _engine(**extra)
    prompts = _prompts(freeing, 3 if backend == "torch" else 2)
    tokens, held = _generate(freeing, prompts)
    expected, _ = _generate(_engine(disable_hybrid_kv_cache_manager=True, **extra), prompts)
    assert tokens == expected
    assert all(len(t) == LONG.max_new_tokens for t in tokens)
    # prompts of ~20 tokens + 40 new: ~15 blocks each without freeing; a chunk of <= 16 tokens and the
    # window's 7 keys before it: at most ceil((7 + 16) / 4) + 1 = 7, and 3 once decoding
    assert max(held) <= 7 and held[-1] <= 3
    assert freeing.num_free_blocks == freeing.num_blocks


def test_decode_graph_buckets_read_both_groups() -> None:
    # the padded batch-bucket path (emulated without a GPU) with per-group static tables
    if not triton_available():
        pytest.skip("triton is not installed")
    engine = _engine(attention_backend="triton", max_num_seqs=4)
    assert engine.runner.graphs is not None and engine.runner.graphs.num_groups == 2
    prompts = _prompts(engine, 3)
    params = replace(LONG, max_new_tokens=24)
    tokens, _ = _generate(engine, prompts, params)
    expected, _ = _generate(_engine(disable_hybrid_kv_cache_manager=True), prompts, params)
    assert tokens == expected
    assert sum(engine.runner.graphs.runs.values()) > 0


def test_in_the_same_bytes_more_long_sequences_run_at_once() -> None:
    # float32 KV, 2 heads x 16 dims: 256 bytes per layer and position for keys and values; a block id of
    # 4 positions costs 4 KiB with every layer its own pool, 2 KiB with the two groups sharing 2 pools. 400 KiB:
    # 100 or 200 ids. 8 sequences of ~60 tokens: 8 x 15 ids > 100 kept; 8 x (15 + at most 7) <= 200 freeing.
    def run(**kwargs) -> tuple[int, int, int]:
        engine = _engine(max_num_seqs=8, kv_cache_bytes=200 * 2048, num_blocks=None, **kwargs)
        for i, prompt in enumerate(_prompts(engine, 8)):
            engine.add_request(str(i), prompt, LONG)
        most, preempted = 0, set()
        while engine.has_unfinished_requests():
            engine.step()
            most = max(most, engine.scheduler.num_running)
            preempted |= {s.request_id for s in engine.scheduler.waiting if s.status is SequenceStatus.PREEMPTED}
        assert engine.num_free_blocks == engine.num_blocks
        return engine.num_blocks, most, len(preempted)

    blocks_kept, _, preempted_kept = run(disable_hybrid_kv_cache_manager=True)
    blocks_freeing, most, preempted = run()
    assert (blocks_kept, blocks_freeing) == (100, 200)
    assert preempted_kept > 0                     # keeping every block, running sequences had to give way
    assert (most, preempted) == (8, 0)            # freeing, all eight ran together to the end


def test_preemption_and_abort_free_both_groups() -> None:
    engine = _engine(num_blocks=40, max_num_seqs=4)
    prompts = _prompts(engine, 4)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, LONG)
    preempted = False
    while not preempted and engine.has_unfinished_requests():
        engine.step()
        preempted = any(s.status is SequenceStatus.PREEMPTED for s in engine.scheduler.waiting)
    assert preempted, "4 sequences of ~60 tokens (15 + up to 7 blocks each) cannot all fit 40 blocks"
    engine.step()
    engine.abort_request("0")
    engine.abort_all()
    assert engine.num_free_blocks == engine.num_blocks and not engine.has_unfinished_requests()


def test_prefix_cache_hit_on_a_shared_prompt_is_exact() -> None:
    engine = _engine()
    prompt = _prompts(engine, 1)[0]
    params = replace(LONG, max_new_tokens=16)
    first = engine.generate([prompt], params)[0]
    again = engine.generate([prompt], params)[0]
    assert again.num_cached_tokens >= BS * ((len(prompt.prompt_token_ids) - 1) // BS) > 8
    assert again.token_ids == first.token_ids
    cold = _engine(enable_prefix_caching=False).generate([prompt], params)[0]
    assert again.token_ids == cold.token_ids
