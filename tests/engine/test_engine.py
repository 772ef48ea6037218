"""The engine on tiny checkpoints: golden equality under continuous batching, chunked prefill, preemption,
prefix and image-feature reuse, cancellation, sampling reproducibility, stop strings, bad input."""

from __future__ import annotations

import functools
import json

import pytest
import torch

from internvl_runtime import AutoModel, AutoTokenizer, load_image
from internvl_runtime.api.official_rules import official_chat_rules
from internvl_runtime.engine.engine import EngineConfig, LLMEngine
from internvl_runtime.engine.sampling_params import SamplingParams
from internvl_runtime.errors import ContextLengthExceeded, InvalidGenerationConfig, InvalidRequest
from internvl_runtime.processing.inputs import ImageInput, Message
from internvl_runtime.processing.template import build_prompt
from paths import FIXTURES

SHARED = FIXTURES
GREEDY = SamplingParams(max_new_tokens=12, temperature=0)


@functools.lru_cache(maxsize=3)
def _loaded(variant: str):
    path = SHARED / "ckpt" / variant
    return AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def _engine(variant: str = "tiny-1B", **kwargs) -> LLMEngine:
    model, tokenizer = _loaded(variant)
    kwargs.setdefault("num_blocks", 1024)
    return LLMEngine(model, tokenizer, EngineConfig(**kwargs))


def _golden_requests(engine: LLMEngine, variant: str, cases: list[str]):
    """(prepared request, golden greedy ids) for the first round of each chat case; the leading bos that the
    official ``generate`` of the variant's generation returns (``official_chat_rules``) is dropped."""
    skip = 1 if official_chat_rules(engine.model.config).leading_bos else 0
    all_cases = {c["id"]: c for c in json.loads((SHARED / "cases.json").read_text())["cases"]}
    out = []
    for case_id in cases:
        golden = json.loads((SHARED / "goldens" / variant / f"{case_id}.json").read_text())
        case, record = all_cases[case_id], golden["rounds"][0]
        tiles = [load_image(SHARED / "data" / f"{im['ref']}.png", input_size=golden["input_size"],
                            max_num=im["max_num"]) for im in case.get("images", [])]
        if tiles and case.get("num_patches_list") != "per_image":
            tiles = [torch.cat(tiles)]
        question = record["question"]
        if tiles and "<image>" not in question:
            question = "<image>\n" + question
        prompt = build_prompt(engine.model.config.template, question)
        prepared = engine.processor.prepare_prompt(prompt, [ImageInput.from_tiles(t) for t in tiles])
        assert prepared.prompt_token_ids == record["input_ids"][0]
        out.append((prepared, record["generated_ids"][0][skip:]))
    return out


CASES = ["text_chat", "img_800x600_max12", "img_300x1200_max6_autoprefix", "multi_round_image", "two_images_separate"]


@pytest.mark.parametrize("variant", ["tiny-1B", "tiny-4B", "tiny-26B"])
def test_concurrent_greedy_equals_official(variant: str) -> None:
    engine = _engine(variant, max_num_batched_tokens=512)
    requests = _golden_requests(engine, variant, CASES)
    outputs = engine.generate([r for r, _ in requests], SamplingParams(max_new_tokens=20, temperature=0))
    for out, (_, golden) in zip(outputs, requests, strict=True):
        assert out.token_ids == golden
    assert engine.num_free_blocks == engine.scheduler.config.num_blocks


def test_batched_equals_alone_with_chunking_preemption_and_fragmented_blocks() -> None:
    engine = _engine("tiny-1B")
    requests = [r for r, _ in _golden_requests(engine, "tiny-1B", CASES)]
    alone = [engine.generate([r], GREEDY)[0].token_ids for r in requests]
    # tight pool (forces preemption by recompute) and a small token budget (chunked prefill)
    tight = _engine("tiny-1B", num_blocks=420, max_num_batched_tokens=300, max_num_seqs=4)
    # fragment the free list so block tables are not contiguous
    hog = tight.processor.prepare([Message("user", "x " * 40)])
    tight.add_request("hog", hog, SamplingParams(max_new_tokens=200, ignore_eos=True))
    tight.step()
    batched = tight.generate(requests, GREEDY)
    assert [o.token_ids for o in batched] == alone
    tight.abort_request("hog")
    assert tight.num_free_blocks == 420


def test_prefix_and_image_feature_reuse() -> None:
    engine = _engine("tiny-1B")
    image = SHARED / "data" / "img_640x427.png"
    first = [Message("user", "Please describe the image shortly.", [image])]
    out1 = engine.generate([engine.processor.prepare(first)], GREEDY)[0]
    tiles_before = engine.stats["vision_tiles_encoded"]
    second = [*first, Message("assistant", out1.text), Message("user", "What is the red object?")]
    prepared = engine.processor.prepare(second)
    out2 = engine.generate([prepared], GREEDY)[0]
    assert engine.stats["vision_tiles_encoded"] == tiles_before          # features reused
    assert out2.num_cached_tokens >= prepared.prompt_token_ids.index(engine.processor.img_context_id)
    assert out2.num_cached_tokens > 0.8 * len(prepared.prompt_token_ids)
    fresh = _engine("tiny-1B", enable_prefix_caching=False)
    assert fresh.generate([prepared], GREEDY)[0].token_ids == out2.token_ids


def test_same_tokens_different_images_are_not_confused() -> None:
    engine = _engine("tiny-1B")
    a = engine.processor.prepare([Message("user", "Describe.", [SHARED / "data" / "img_448x448.png"])], max_num=1)
    b = engine.processor.prepare([Message("user", "Describe.", [SHARED / "data" / "img_500x400.png"])], max_num=1)
    assert a.prompt_token_ids == b.prompt_token_ids
    out_a = engine.generate([a], GREEDY)[0]
    out_b = engine.generate([b], GREEDY)[0]
    solo_b = _engine("tiny-1B", enable_prefix_caching=False).generate([b], GREEDY)[0]
    assert out_b.num_cached_tokens < b.mm_spans[0].offset + b.mm_spans[0].length
    assert out_b.token_ids == solo_b.token_ids
    assert out_a.token_ids != [] and out_b.token_ids != []


def test_cancellation_frees_every_block() -> None:
    engine = _engine("tiny-1B", num_blocks=600)
    start = engine.num_free_blocks
    image = SHARED / "data" / "img_800x600.png"
    for round_ in range(3):
        for i in range(6):
            msgs = [Message("user", f"question {i}", [image] if i % 2 else [])]
            engine.add_request(f"r{round_}-{i}", engine.processor.prepare(msgs, max_num=2),
                               SamplingParams(max_new_tokens=50, ignore_eos=True))
        for _ in range(2 + round_):
            engine.step()
        for i in range(6):
            engine.abort_request(f"r{round_}-{i}")
        assert not engine.has_unfinished_requests()
        assert engine.num_free_blocks == start
    # the engine still serves afterwards
    assert engine.generate([engine.processor.prepare([Message("user", "hi")])], GREEDY)[0].finished


def test_seeded_sampling_is_reproducible_and_batch_independent() -> None:
    engine = _engine("tiny-1B")
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    req = engine.processor.prepare([Message("user", "Tell me a story.")])
    other = engine.processor.prepare([Message("user", "Something else entirely, longer prompt here.")])
    alone = engine.generate([req], params)[0].token_ids
    again = engine.generate([other, req], [SamplingParams(max_new_tokens=16, temperature=1.0, seed=7), params])
    assert again[1].token_ids == alone
    different = engine.generate([req], SamplingParams(max_new_tokens=16, temperature=1.0, seed=99,
                                                      ignore_eos=True))[0].token_ids
    assert different != alone


def test_stop_string_cuts_the_text() -> None:
    engine = _engine("tiny-1B")
    req = engine.processor.prepare([Message("user", "Hello, who are you?")])
    full = engine.generate([req], SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True))[0]
    assert len(full.text) > 4
    stop = full.text[2:4]
    cut = engine.generate([req], SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True, stop=[stop]))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]


def test_streamed_deltas_add_up_to_the_text() -> None:
    engine = _engine("tiny-1B")
    req = engine.processor.prepare([Message("user", "你好，请介绍一下你自己。")])
    engine.add_request("s", req, SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True))
    deltas, final = [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            deltas.append(out.delta)
            final = out
    assert final is not None and final.finished
    assert "".join(deltas) == final.text


def test_bad_requests_fail_before_work_and_the_engine_keeps_serving() -> None:
    engine = _engine("tiny-1B", max_model_len=600)
    free = engine.num_free_blocks
    long_prompt = engine.processor.prepare([Message("user", "word " * 700)])
    with pytest.raises(ContextLengthExceeded):
        engine.add_request("long", long_prompt, GREEDY)
    with pytest.raises(InvalidRequest):
        engine.processor.prepare([])
    with pytest.raises(InvalidRequest):
        engine.processor.prepare([Message("robot", "hi")])
    with pytest.raises(InvalidRequest):
        engine.processor.prepare([Message("user", "hi", [SHARED / "data" / "img_448x448.png"] * 17)], max_num=1)
    with pytest.raises(InvalidGenerationConfig):
        SamplingParams(temperature=-1)
    with pytest.raises(InvalidGenerationConfig):
        SamplingParams(top_p=1.5)
    with pytest.raises(InvalidGenerationConfig):
        SamplingParams(max_new_tokens=0)
    assert engine.num_free_blocks == free
    out = engine.generate([engine.processor.prepare([Message("user", "hi")])], GREEDY)[0]
    assert out.finished
