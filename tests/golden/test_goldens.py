"""Golden tests: our runtime against the official implementation's answers on the tiny checkpoints.

For every variant and case of ``tests/fixtures/cases.json``: the pixel values (sha256), the prompt
string, input_ids (and the batch attention mask), the vision features after mlp1, the first-step logits
(float32, relative error <= 1e-5), the greedy generated ids, the response and the returned history.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from internvl_runtime import AutoModel, AutoTokenizer, load_image
from internvl_runtime.api.chat import IdsOnlyVocabulary, engine_requests
from internvl_runtime.engine.engine import EngineConfig, LLMEngine
from internvl_runtime.engine.kv_groups import max_blocks_per_sequence
from internvl_runtime.engine.model_runner import model_kv_groups
from internvl_runtime.engine.sampler import Sampler, SamplerOutput
from internvl_runtime.engine.sampling_params import SamplingParams
from paths import FIXTURES

SHARED = FIXTURES
VARIANTS = ["tiny-1B", "tiny-2B", "tiny-4B", "tiny-8B", "tiny-26B", "tiny-40B", "tiny-76B"]
RTOL = 1e-5


def _cases() -> list[tuple[str, str]]:
    if not (SHARED / "cases.json").is_file():
        return []
    cases = json.loads((SHARED / "cases.json").read_text(encoding="utf-8"))["cases"]
    return [(v, c["id"]) for v in VARIANTS for c in cases if v in c.get("only", VARIANTS)]


@functools.lru_cache(maxsize=2)
def _model(variant: str, dtype: torch.dtype = torch.float32):
    path = SHARED / "ckpt" / variant
    model = AutoModel.from_pretrained(path, torch_dtype=dtype, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True, use_fast=False)
    return model, tokenizer


def _image(ref: str, max_num: int, input_size: int) -> torch.Tensor:
    if ref.startswith("frame:"):
        file = SHARED / "data" / f"frame_{int(ref.split(':')[1]):03d}.png"
    else:
        file = SHARED / "data" / f"{ref}.png"
    return load_image(file, input_size=input_size, max_num=max_num)


def _rel_err(ours: torch.Tensor, ref: np.ndarray) -> float:
    ref_t = torch.from_numpy(np.asarray(ref, dtype=np.float32)).reshape(ours.shape)
    return float((ours.float() - ref_t).norm() / ref_t.norm())


class _FirstLogits(Sampler):
    """The engine's sampler, keeping the logits of the first step it samples: the prompts' last tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.first: torch.Tensor | None = None

    def __call__(self, logits: torch.Tensor, rows) -> SamplerOutput:
        if self.first is None:
            self.first = logits.clone()
        return super().__call__(logits, rows)


def _first_logits(model, rows: list[list[int]], features: torch.Tensor | None) -> torch.Tensor:
    """The logits the engine samples the first tokens from, the rows handed to it as generate() does."""
    sampler = _FirstLogits()
    chunk, groups = sum(len(r) for r in rows), model_kv_groups(model)   # every KV group's blocks (sliding too)
    config = EngineConfig(max_num_seqs=len(rows), max_num_batched_tokens=chunk,
                          num_blocks=sum(max_blocks_per_sequence(groups, len(r), 16, chunk) + 2 for r in rows),
                          enable_prefix_caching=False, image_cache_bytes=0)
    vocabulary = IdsOnlyVocabulary(model.config.llm.vocab_size, model.img_context_token_id)
    engine = LLMEngine(model, vocabulary, config, sampler=sampler)
    requests = engine_requests(rows, features, model.img_context_token_id)
    engine.generate([r for r, _ in requests], SamplingParams(max_new_tokens=1, temperature=0),
                    image_features=[f for _, f in requests])
    assert sampler.first is not None and sampler.first.shape[0] == len(rows)
    return sampler.first


def _check_pixels(golden: dict, pixel_values: torch.Tensor) -> None:
    record = golden["pixel_values"]
    assert list(pixel_values.shape) == record["shape"]
    assert hashlib.sha256(pixel_values.numpy().tobytes()).hexdigest() == record["sha256"]


def _check_features(model, golden_dir: Path, name: str, pixel_values: torch.Tensor) -> torch.Tensor:
    features = model.extract_feature(pixel_values).reshape(-1, model.config.llm.hidden_size)
    file = golden_dir / name
    if file.is_file():
        assert _rel_err(features, np.load(file).reshape(-1, features.shape[-1])) <= RTOL
    return features


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


@pytest.mark.parametrize(("variant", "case_id"), _cases())
def test_golden_case(variant: str, case_id: str) -> None:
    check_golden_case(variant, case_id)


def check_golden_case(variant: str, case_id: str, *, batched_engine: bool = False) -> None:
    """One case of one variant through the official API (chat / batch_chat / generate) and the engine.

    ``batched_engine``: also run a batch case's rows together through one engine with chunked prefill and
    compare their greedy ids with the golden ones (the MoE variants: experts at several rows per step).
    """
    golden_dir = SHARED / "goldens" / variant
    golden = json.loads((golden_dir / f"{case_id}.json").read_text(encoding="utf-8"))
    case = next(c for c in json.loads((SHARED / "cases.json").read_text(encoding="utf-8"))["cases"]
                if c["id"] == case_id)
    model, tokenizer = _model(variant)
    size = golden["input_size"]
    generation_config = dict(golden["generation_config"])
    model.img_context_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")

    if case["type"] == "batch_chat":
        images = [_image(item["ref"], item["max_num"], size) for item in case["items"]]
        pixel_values = torch.cat(images)
        num_patches_list = [im.shape[0] for im in images]
        assert num_patches_list == golden["num_patches_list_arg"]
        _check_pixels(golden, pixel_values)
        features = _check_features(model, golden_dir, f"{case_id}.features.npy", pixel_values)
        responses = model.batch_chat(tokenizer, pixel_values, golden["questions"], generation_config,
                                     num_patches_list=num_patches_list)
        assert responses == golden["responses"]
        tokenizer.padding_side = "left"
        inputs = tokenizer(golden["prompts"], return_tensors="pt", padding=True)
        tokenizer.padding_side = "right"
        assert inputs["input_ids"].tolist() == golden["input_ids"]
        assert inputs["attention_mask"].tolist() == golden["attention_mask"]
        rows = [ids[m.bool()].tolist() for ids, m in zip(inputs["input_ids"], inputs["attention_mask"], strict=True)]
        logits = _first_logits(model, rows, features)
        assert _rel_err(logits, np.load(golden_dir / golden["logits0_file"])) <= RTOL
        if batched_engine:
            eos = golden["eos_token_id"]
            got = _engine_greedy(model, rows, features, eos, generation_config["max_new_tokens"])
            assert [[t for t in row if t != eos] for row in got] == [[t for t in row if t != eos]
                                                                     for row in golden["generated_ids"]]
        generated = model.generate(pixel_values=pixel_values, input_ids=inputs["input_ids"],
                                   attention_mask=inputs["attention_mask"],
                                   eos_token_id=golden["eos_token_id"], **generation_config)
        assert generated.tolist() == golden["generated_ids"]
        return

    pixel_values = None
    num_patches_list = None
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
            features = _check_features(model, golden_dir, f"{case_id}.r{index}.features.npy", pixel_values)
        logits = _first_logits(model, inputs["input_ids"].tolist(), features)
        assert _rel_err(logits, np.load(golden_dir / record["logits0_file"])) <= RTOL
        generated = model.generate(pixel_values=pixel_values, input_ids=inputs["input_ids"],
                                   attention_mask=inputs["attention_mask"], eos_token_id=record["eos_token_id"],
                                   **generation_config)
        assert generated.tolist() == record["generated_ids"]
        response, history = model.chat(tokenizer, pixel_values, record["question"], generation_config,
                                       history=history, return_history=True, num_patches_list=num_patches_list)
        assert response == record["response"]
        assert [list(h) for h in history] == [list(h) for h in record["history"]]


def test_every_variant_has_cases() -> None:
    """Guard: the parametrisation above must not silently become empty."""
    assert (SHARED / "cases.json").is_file(), f"golden fixtures missing at {SHARED}"
    assert {v for v, _ in _cases()} == set(VARIANTS)
