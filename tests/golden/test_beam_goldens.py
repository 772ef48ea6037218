"""Beam search equals the official one: every record of ``tests/fixtures/goldens/beam`` (see the README
there: ``num_beams`` 2-5, ``length_penalty``, ``early_stopping``, ``num_return_sequences``, ``chat`` over
rounds and ``batch_chat``, made with the official InternVL code and transformers 4.37.2) gives the same
response(s), history and ``generate`` ids here.
"""

from __future__ import annotations

import functools
import json

import pytest
import torch

from internvl_runtime import AutoModel, AutoTokenizer, load_image
from paths import FIXTURES

BEAM = FIXTURES / "goldens" / "beam"
VARIANTS = ["tiny-1B", "tiny-2B", "tiny-4B", "tiny-8B", "tiny-26B", "tiny-40B", "tiny-76B"]


def _records() -> list[tuple[str, str]]:
    return sorted((p.parent.name, p.stem) for p in BEAM.glob("*/*.json"))


@functools.lru_cache(maxsize=1)
def _model(variant: str):
    path = FIXTURES / "ckpt" / variant
    model = AutoModel.from_pretrained(path, torch_dtype=torch.float32, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True, use_fast=False)
    return model, tokenizer


def _images(entries: list[dict], size: int) -> list[torch.Tensor]:
    return [load_image(FIXTURES / "data" / f"{e['ref']}.png", input_size=size, max_num=e["max_num"]) for e in entries]


@pytest.mark.parametrize(("variant", "record_id"), _records())
def test_beam_golden(variant: str, record_id: str) -> None:
    golden = json.loads((BEAM / variant / f"{record_id}.json").read_text(encoding="utf-8"))
    model, tokenizer = _model(variant)
    size = model.config.image_size
    config = dict(golden["generation_config"])
    assert config["num_beams"] > 1
    model.img_context_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")

    if golden["type"] == "batch_chat":
        images = _images(golden["items"], size)
        pixel_values = torch.cat(images)
        num_patches_list = [im.shape[0] for im in images]
        responses = model.batch_chat(tokenizer, pixel_values, golden["questions"], dict(config),
                                     num_patches_list=num_patches_list)
        assert responses == golden["responses"]
        queries = [model.build_chat_query(im, q)[1]
                   for im, q in zip(images, golden["questions"], strict=True)]
        tokenizer.padding_side = "left"
        inputs = tokenizer(queries, return_tensors="pt", padding=True)
        tokenizer.padding_side = "right"
        generated = model.generate(pixel_values=pixel_values, input_ids=inputs["input_ids"],
                                   attention_mask=inputs["attention_mask"], eos_token_id=golden["eos_token_id"],
                                   **config)
        assert generated.tolist() == golden["generated_ids"]
        return

    pixel_values = torch.cat(_images(golden["images"], size)) if golden.get("images") else None
    history = None
    for record in golden["rounds"]:
        _question, query = model.build_chat_query(pixel_values, record["question"], history)
        inputs = tokenizer(query, return_tensors="pt")
        generated = model.generate(pixel_values=pixel_values, input_ids=inputs["input_ids"],
                                   attention_mask=inputs["attention_mask"], eos_token_id=record["eos_token_id"],
                                   **config)
        assert generated.tolist() == record["generated_ids"]
        assert tokenizer.batch_decode(generated, skip_special_tokens=True) == record["decoded_all"]
        response, history = model.chat(tokenizer, pixel_values, record["question"], dict(config),
                                       history=history, return_history=True)
        assert response == record["response"]
        assert [list(h) for h in history] == [list(h) for h in record["history"]]


def test_every_variant_has_beam_records() -> None:
    """Guard: the parametrisation above must not silently become empty."""
    assert {v for v, _ in _records()} == set(VARIANTS)
