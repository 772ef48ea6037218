"""Golden tests of the HF format: our runtime against transformers' native InternVLForConditionalGeneration.

The tiny InternVL3-1B-hf (Qwen2), InternVL3.5-1B-HF (Qwen3) and InternVL3.5-30B-A3B-HF (Qwen3-MoE) folders
(``tests/fixtures/ckpt/<variant>``)
and what transformers 4.55's own model and processor answer on them (``tests/fixtures/goldens/<variant>``; how
they were made: the fixtures README). Per case and round, through the engine (``LLMEngine.from_pretrained`` on
the folder: its chat template renders, its tiling tiles): the prompt (the golden's ``<IMG_CONTEXT>``
placeholders expanded as the processor does), the input ids, the pixel values (sha256), the vision features,
the first-step logits (relative error <= 1e-5), the greedy ids and the decoded response. Through the official-style API
(``AutoModel``): ``forward``'s last logits and ``generate`` returning the prompt ids then the new ones, as
transformers' ``generate`` given ``input_ids`` does.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
from test_goldens import RTOL, _check_features, _check_pixels, _first_logits, _rel_err

from internvl_runtime import AutoModel
from internvl_runtime.engine.engine import LLMEngine
from internvl_runtime.engine.sampling_params import SamplingParams
from internvl_runtime.processing.inputs import Message, PreparedRequest
from internvl_runtime.processing.template import IMAGE_PLACEHOLDER, IMG_CONTEXT_TOKEN, expand_image_placeholders
from paths import FIXTURES

VARIANTS = ["tiny-3-1B-hf", "tiny-3_5-1B-HF", "tiny-3_5-30B-A3B-HF"]


def _goldens(variant: str):
    return FIXTURES / "goldens" / variant


def _case_ids(variant: str) -> list[str]:
    return list(json.loads((_goldens(variant) / "index.json").read_text(encoding="utf-8"))["cases"])


def _golden(variant: str, case_id: str) -> dict:
    return json.loads((_goldens(variant) / f"{case_id}.json").read_text(encoding="utf-8"))


@functools.lru_cache(maxsize=1)
def _engine(variant: str) -> LLMEngine:
    return LLMEngine.from_pretrained(FIXTURES / "ckpt" / variant, num_blocks=512)


@functools.lru_cache(maxsize=1)
def _auto_model(variant: str):
    return AutoModel.from_pretrained(FIXTURES / "ckpt" / variant, torch_dtype=torch.float32).eval()


def _image_file(ref: str) -> str:
    return str(FIXTURES / "data" / f"{ref}.png")


def _conversations(golden: dict, round_index: int) -> list[list[Message]]:
    """The round's conversations as our messages: a chat's earlier rounds (the golden answers as the
    assistant's), the images with the first question; a batch's items."""
    case = golden["case"]
    if case["type"] == "batch":
        return [[Message("user", item["question"], images=[_image_file(r) for r in item["images"]])]
                for item in case["items"]]
    messages: list[Message] = []
    for r in range(round_index + 1):
        images = [_image_file(ref) for ref in case.get("images", [])] if r == 0 else []
        messages.append(Message("user", case["rounds"][r], images=images))
        if r < round_index:
            messages.append(Message("assistant", golden["rounds"][r]["responses"][0]))
    return [messages]


def _unpadded(record: dict) -> list[list[int]]:
    return [[t for t, m in zip(ids, mask, strict=True) if m]
            for ids, mask in zip(record["input_ids"], record["attention_mask"], strict=True)]


def _until_eos(ids: list[int], eos: int) -> list[int]:
    return ids[:ids.index(eos) + 1] if eos in ids else ids


def _pixel_values(prepared: list[PreparedRequest]) -> torch.Tensor | None:
    tiles = [image.pixel_values for p in prepared for image in p.images]
    return torch.cat(tiles) if tiles else None


def _rounds(variant: str) -> list[tuple[str, str, int]]:
    return [(variant, case_id, r) for case_id in _case_ids(variant)
            for r in range(len(_golden(variant, case_id)["rounds"]))]


@pytest.mark.parametrize(("variant", "case_id", "round_index"), [vcr for v in VARIANTS for vcr in _rounds(v)])
def test_hf_golden_through_the_engine(variant: str, case_id: str, round_index: int) -> None:
    golden = _golden(variant, case_id)
    record = golden["rounds"][round_index]
    goldens = _goldens(variant)
    engine = _engine(variant)
    model = engine.model
    max_num = golden["case"].get("max_patches", 12)
    prepared = [engine.processor.prepare(messages, max_num=max_num)
                for messages in _conversations(golden, round_index)]

    for ours, prompt in zip(prepared, record["prompts"], strict=True):
        # the processor replaces each <IMG_CONTEXT> of the rendered template as we replace <image>
        tiles = [image.num_tiles for image in ours.images]
        expected = expand_image_placeholders(prompt.replace(IMG_CONTEXT_TOKEN, IMAGE_PLACEHOLDER), tiles,
                                             model.num_image_token)
        assert ours.prompt == expected
    rows = _unpadded(record)
    assert [p.prompt_token_ids for p in prepared] == rows

    pixel_values = _pixel_values(prepared)
    features = None
    if pixel_values is not None:
        _check_pixels(record, pixel_values)
        features = _check_features(model, goldens, record.get("features_file", "-"), pixel_values)
        assert float(features.double().sum()) == pytest.approx(record["features"]["sum"], rel=1e-4, abs=1e-3)

    logits = _first_logits(model, rows, features)
    assert _rel_err(logits, np.load(goldens / record["logits0_file"])) <= RTOL

    eos = model.config.llm.eos_token_id
    outputs = engine.generate(prepared, SamplingParams(max_new_tokens=golden["generation_config"]["max_new_tokens"],
                                                       temperature=0))
    for out, ids, response in zip(outputs, record["generated_ids"], record["responses"], strict=True):
        assert out.token_ids == _until_eos(ids, eos)
        assert out.text == response


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case_id", ["img_800x600_max1", "batch_2", "text_chat"])
def test_hf_golden_through_the_official_api(variant: str, case_id: str) -> None:
    """``AutoModel`` on the HF folder: ``forward`` gives the golden last-position logits and ``generate``
    returns the prompt ids (left padding included) then the golden greedy ids, as transformers' does."""
    golden = _golden(variant, case_id)
    record = golden["rounds"][0]
    model = _auto_model(variant)
    pixel_values = _pixel_values([_engine(variant).processor.prepare(messages,
                                                                     max_num=golden["case"].get("max_patches", 12))
                                  for messages in _conversations(golden, 0)])
    input_ids = torch.tensor(record["input_ids"])
    mask = torch.tensor(record["attention_mask"])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)      # transformers' generate: from the attention mask
    logits = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=mask, position_ids=positions).logits
    assert _rel_err(logits[:, -1], np.load(_goldens(variant) / record["logits0_file"])) <= RTOL
    generated = model.generate(pixel_values=pixel_values, input_ids=input_ids, attention_mask=mask,
                               max_new_tokens=20, do_sample=False)
    assert generated.tolist() == [ids + new for ids, new in zip(record["input_ids"], record["generated_ids"],
                                                                 strict=True)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_hf_goldens_have_cases(variant: str) -> None:
    """Guard: the parametrisation above must not silently become empty."""
    assert {"text_chat", "img_800x600_max12", "two_images", "batch_2"} <= set(_case_ids(variant))
