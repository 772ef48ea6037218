"""The engine on the Qwen3-MoE variant (tiny-3_5-30B-A3B): several requests at once with chunked prefill equal
the official greedy ids, and the prefix cache (image features included) gives the same answer as a fresh engine."""

from __future__ import annotations

from engine.test_engine import _engine, _golden_requests
from internvl_runtime.engine.sampling_params import SamplingParams
from internvl_runtime.processing.inputs import Message
from paths import FIXTURES

VARIANT = "tiny-3_5-30B-A3B"
CASES = ["text_chat", "img_800x600_max12", "img_300x1200_max6_autoprefix", "multi_round_image", "two_images_separate",
         "img_448x448_max12"]
GREEDY = SamplingParams(max_new_tokens=12, temperature=0)


def test_concurrent_greedy_with_chunked_prefill_equals_official() -> None:
    engine = _engine(VARIANT, max_num_batched_tokens=96, max_num_seqs=4)
    requests = _golden_requests(engine, VARIANT, CASES)
    assert max(len(r.prompt_token_ids) for r, _ in requests) > 96          # prefill comes in chunks
    outputs = engine.generate([r for r, _ in requests], SamplingParams(max_new_tokens=20, temperature=0))
    for out, (_, golden) in zip(outputs, requests, strict=True):
        assert out.token_ids == golden
    assert engine.num_free_blocks == engine.scheduler.config.num_blocks


def test_prefix_cache_and_feature_reuse() -> None:
    engine = _engine(VARIANT)
    image = FIXTURES / "data" / "img_640x427.png"
    first = [Message("user", "Please describe the image shortly.", [image])]
    out1 = engine.generate([engine.processor.prepare(first)], GREEDY)[0]
    tiles_before = engine.stats["vision_tiles_encoded"]
    second = [*first, Message("assistant", out1.text), Message("user", "What is the red object?")]
    prepared = engine.processor.prepare(second)
    out2 = engine.generate([prepared], GREEDY)[0]
    assert engine.stats["vision_tiles_encoded"] == tiles_before          # features reused
    assert out2.num_cached_tokens > 0.8 * len(prepared.prompt_token_ids)
    fresh = _engine(VARIANT, enable_prefix_caching=False)
    assert fresh.generate([prepared], GREEDY)[0].token_ids == out2.token_ids
