"""The engine on the GPT-OSS tiny variant (tiny-3_5-20B-A4B: window 8, sinks, experts): greedy answers equal
the official code's under continuous batching with chunked prefill whose chunks cross the window, and with
prefix caching (a second round that reuses the first round's cached blocks)."""

from __future__ import annotations

import json

import torch
from test_engine import _engine, _loaded

from internvl_runtime import load_image
from internvl_runtime.engine.engine import LLMEngine
from internvl_runtime.engine.model_runner import ModelRunner
from internvl_runtime.engine.sampling_params import SamplingParams
from internvl_runtime.processing.inputs import ImageInput, PreparedRequest
from paths import FIXTURES

VARIANT = "tiny-3_5-20B-A4B"
GOLDENS = FIXTURES / "goldens" / VARIANT
GREEDY = SamplingParams(max_new_tokens=20, temperature=0)


def _requests(engine: LLMEngine, case_id: str) -> list[tuple[PreparedRequest, list[int]]]:
    """(prepared request, official greedy ids) per round of a chat case, from the golden prompts."""
    case = next(c for c in json.loads((FIXTURES / "cases.json").read_text())["cases"] if c["id"] == case_id)
    golden = json.loads((GOLDENS / f"{case_id}.json").read_text())
    tiles = [load_image(FIXTURES / "data" / f"{im['ref']}.png", input_size=golden["input_size"],
                        max_num=im["max_num"]) for im in case.get("images", [])]
    if tiles and case.get("num_patches_list") != "per_image":
        tiles = [torch.cat(tiles)]
    out = []
    for record in golden["rounds"]:
        prepared = engine.processor.prepare_prompt(record["prompt"].replace(
            "<img>" + "<IMG_CONTEXT>" * golden["num_image_token"] * sum(t.shape[0] for t in tiles) + "</img>",
            "<image>"), [ImageInput.from_tiles(t) for t in tiles])
        assert prepared.prompt_token_ids == record["input_ids"][0]
        out.append((prepared, record["generated_ids"][0]))
    return out


def test_concurrent_chunked_greedy_equals_official() -> None:
    """Five requests at once, at most 24 tokens a step: prefills run in chunks of up to 24 tokens, each
    starting past the window of the sliding layers, beside other requests' decode steps."""
    engine = _engine(VARIANT, max_num_batched_tokens=24)
    requests = [r for case in ("text_chat", "img_800x600_max1", "img_300x1200_max6_autoprefix")
                for r in _requests(engine, case)[:1]]
    outputs = engine.generate([r for r, _ in requests], GREEDY)
    for out, (_, golden) in zip(outputs, requests, strict=True):
        assert out.token_ids == golden
    assert engine.num_free_blocks == engine.scheduler.config.num_blocks


def test_second_round_from_the_prefix_cache_equals_official() -> None:
    engine = _engine(VARIANT, block_size=16)
    (first, first_ids), (second, second_ids) = _requests(engine, "text_two_round")
    assert engine.generate([first], GREEDY)[0].token_ids == first_ids
    out = engine.generate([second], GREEDY)[0]
    assert out.num_cached_tokens >= 16 * (len(first.prompt_token_ids) // 16) > 8
    assert out.token_ids == second_ids


def test_the_runner_takes_gpt_oss_on_either_attention_backend() -> None:
    """The triton kernel has sinks and windows: "triton" is taken; "auto" is torch on the CPU, as for Llama."""
    model, _ = _loaded(VARIANT)
    assert ModelRunner(model, num_blocks=4, attention_backend="auto").attention_backend == "torch"
    assert ModelRunner(model, num_blocks=4, attention_backend="triton",
                       enforce_eager=True).attention_backend == "triton"
