"""The engine on the Qwen3-MoE variant (tiny-3_5-30B-A3B): several requests at once with chunked prefill equal
the official greedy ids, and the prefix cache (image features included) gives the same answer as a fresh engine."""

from __future__ import annotations

import json

import torch

from engine.test_engine import _engine
from internvl_runtime import load_image
from internvl_runtime.engine.engine import LLMEngine
from internvl_runtime.engine.sampling_params import SamplingParams
from internvl_runtime.processing.inputs import ImageInput, Message
from internvl_runtime.processing.template import build_prompt
from paths import FIXTURES

VARIANT = "tiny-3_5-30B-A3B"
CASES = ["text_chat", "img_800x600_max12", "img_300x1200_max6_autoprefix", "multi_round_image", "two_images_separate",
         "img_448x448_max12"]
GREEDY = SamplingParams(max_new_tokens=12, temperature=0)


def _golden_requests(engine: LLMEngine, cases: list[str]):
    """(prepared request, official greedy ids) for the first round of each chat case. The 3.5 code's ``generate``
    returns the new ids only (no bos to drop)."""
    all_cases = {c["id"]: c for c in json.loads((FIXTURES / "cases.json").read_text())["cases"]}
    out = []
    for case_id in cases:
        golden = json.loads((FIXTURES / "goldens" / VARIANT / f"{case_id}.json").read_text())
        case, record = all_cases[case_id], golden["rounds"][0]
        tiles = [load_image(FIXTURES / "data" / f"{im['ref']}.png", input_size=golden["input_size"],
                            max_num=im["max_num"]) for im in case.get("images", [])]
        if tiles and case.get("num_patches_list") != "per_image":
            tiles = [torch.cat(tiles)]
        question = record["question"]
        if tiles and "<image>" not in question:
            question = "<image>\n" + question
        prompt = build_prompt(engine.model.config.template, question)
        prepared = engine.processor.prepare_prompt(prompt, [ImageInput.from_tiles(t) for t in tiles])
        assert prepared.prompt_token_ids == record["input_ids"][0]
        out.append((prepared, record["generated_ids"][0]))
    return out


def test_concurrent_greedy_with_chunked_prefill_equals_official() -> None:
    engine = _engine(VARIANT, max_num_batched_tokens=96, max_num_seqs=4)
    requests = _golden_requests(engine, CASES)
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
