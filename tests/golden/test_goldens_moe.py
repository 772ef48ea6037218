"""Golden tests of tiny-3_5-30B-A3B (InternVL3.5 on Qwen3-MoE) against the official internvl_chat_gpt_oss code at
eca3ea7 with transformers 4.55.0 (tests/fixtures/README.md says how the goldens were made).

Per case of cases.json and round: pixel values (sha256), the prompt our official API builds, the input ids,
the vision features after mlp1, the first-step logits through the engine (float32, relative error <= 1e-5), the
greedy ids through the engine with several requests at once, through ``generate`` and the response of ``chat`` /
``batch_chat``. The 3.5 code's own rules (transformers 4.55: ``generate`` returns the new ids only, ``chat``
decodes with special tokens kept before cutting at the separator) are ours for this architecture
(``api.official_rules``), so everything is compared as the official code returned it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from golden.test_goldens import _check_features, _check_pixels, _first_logits, _image, _model, _rel_err
from golden.test_goldens_bf16 import test_bf16_first_logits as _bf16_first_logits
from internvl_runtime.api.chat import IdsOnlyVocabulary, engine_requests
from internvl_runtime.engine.engine import EngineConfig, LLMEngine
from internvl_runtime.engine.sampling_params import SamplingParams
from paths import FIXTURES

VARIANT = "tiny-3_5-30B-A3B"
GOLDENS = FIXTURES / "goldens" / VARIANT
RTOL = 1e-5


def _case_ids() -> list[str]:
    index = json.loads((GOLDENS / "index.json").read_text(encoding="utf-8"))
    return [c["id"] for c in index["variants"][VARIANT]["cases"]]


def _engine_greedy(model, rows: list[list[int]], features: torch.Tensor | None, eos: int,
                   max_new: int) -> list[list[int]]:
    """Greedy ids of every row, all rows in one engine (batched decode, chunked prefill of 64 tokens)."""
    config = EngineConfig(max_num_seqs=len(rows), max_num_batched_tokens=64,
                          num_blocks=sum(-(-(len(r) + max_new) // 16) + 2 for r in rows),
                          enable_prefix_caching=False, image_cache_bytes=0)
    engine = LLMEngine(model, IdsOnlyVocabulary(model.config.llm.vocab_size, model.img_context_token_id), config)
    requests = engine_requests(rows, features, model.img_context_token_id)
    outputs = engine.generate([r for r, _ in requests], SamplingParams(max_new_tokens=max_new, temperature=0,
                                                                        stop_token_ids=[eos]),
                              image_features=[f for _, f in requests])
    return [list(o.token_ids) for o in outputs]


@pytest.mark.parametrize("case_id", _case_ids())
def test_golden_case_moe(case_id: str) -> None:
    golden = json.loads((GOLDENS / f"{case_id}.json").read_text(encoding="utf-8"))
    case = next(c for c in json.loads((FIXTURES / "cases.json").read_text(encoding="utf-8"))["cases"]
                if c["id"] == case_id)
    model, tokenizer = _model(VARIANT)
    model.img_context_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    size, config = golden["input_size"], dict(golden["generation_config"])
    assert golden["template"] == "internvl2_5"

    if case["type"] == "batch_chat":
        images = [_image(item["ref"], item["max_num"], size) for item in case["items"]]
        pixel_values = torch.cat(images)
        num_patches_list = [im.shape[0] for im in images]
        assert num_patches_list == golden["num_patches_list_arg"]
        _check_pixels(golden, pixel_values)
        features = _check_features(model, GOLDENS, f"{case_id}.features.npy", pixel_values)
        tokenizer.padding_side = "left"
        inputs = tokenizer(golden["prompts"], return_tensors="pt", padding=True)
        tokenizer.padding_side = "right"
        assert inputs["input_ids"].tolist() == golden["input_ids"]
        assert inputs["attention_mask"].tolist() == golden["attention_mask"]
        rows = [ids[m.bool()].tolist() for ids, m in zip(inputs["input_ids"], inputs["attention_mask"], strict=True)]
        assert _rel_err(_first_logits(model, rows, features), np.load(GOLDENS / golden["logits0_file"])) <= RTOL
        eos = golden["eos_token_id"]
        want = [[t for t in row if t != eos] for row in golden["generated_ids"]]
        got = _engine_greedy(model, rows, features, eos, config["max_new_tokens"])
        assert [[t for t in row if t != eos] for row in got] == want
        generated = model.generate(pixel_values=pixel_values, input_ids=inputs["input_ids"],
                                   attention_mask=inputs["attention_mask"], eos_token_id=eos, **config)
        assert generated.tolist() == golden["generated_ids"]
        responses = model.batch_chat(tokenizer, pixel_values, golden["questions"], dict(config),
                                     num_patches_list=num_patches_list)
        assert responses == golden["responses"]
        return

    pixel_values, num_patches_list = None, None
    if case.get("images"):
        images = [_image(im["ref"], im["max_num"], size) for im in case["images"]]
        pixel_values = torch.cat(images)
        assert [im.shape[0] for im in images] == golden["image_tile_counts"]
        if case.get("num_patches_list") == "per_image":
            num_patches_list = [im.shape[0] for im in images]
        _check_pixels(golden, pixel_values)
    history = None
    for index, record in enumerate(golden["rounds"]):
        _question, query = model.build_chat_query(pixel_values, record["question"], history, num_patches_list)
        assert query == record["prompt"]
        inputs = tokenizer(query, return_tensors="pt")
        assert inputs["input_ids"].tolist() == record["input_ids"]
        features = None
        if pixel_values is not None:
            features = _check_features(model, GOLDENS, f"{case_id}.r{index}.features.npy", pixel_values)
        logits = _first_logits(model, inputs["input_ids"].tolist(), features)
        assert _rel_err(logits, np.load(GOLDENS / record["logits0_file"])) <= RTOL
        eos = record["eos_token_id"]
        generated = model.generate(pixel_values=pixel_values, input_ids=inputs["input_ids"],
                                   attention_mask=inputs["attention_mask"], eos_token_id=eos, **config)
        assert generated.tolist() == record["generated_ids"]
        response, history = model.chat(tokenizer, pixel_values, record["question"], dict(config),
                                       history=history, return_history=True, num_patches_list=num_patches_list)
        assert response == record["response"]
        assert [list(h) for h in history] == [list(h) for h in record["history"]]


@pytest.mark.parametrize("compute", ["native", "upcast"])
@pytest.mark.parametrize("case_id", ["text_chat", "img_800x600_max1"])
def test_bf16_first_logits_moe(case_id: str, compute: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 weights (the native plan: experts through the GEMV kernel at few rows; the upcast plan: float32
    math) against the float32 goldens, as the InternVL2 variants' bf16 test checks them."""
    _bf16_first_logits(VARIANT, case_id, compute, monkeypatch)


def test_goldens_cover_the_usual_cases() -> None:
    """Guard: every case of cases.json that applies to this variant has a golden."""
    cases = json.loads((FIXTURES / "cases.json").read_text(encoding="utf-8"))["cases"]
    assert set(_case_ids()) == {c["id"] for c in cases if VARIANT in c.get("only", [VARIANT])}
