"""InternVL3.5 dense (Qwen3) on the engine: the official greedy answers under chunked prefill and continuous
batching, the prefix cache on a second turn, and int8 / int4 weights (tiny-3_5-1B)."""

from __future__ import annotations

import functools
import json

import pytest
import torch

from internvl_runtime import AutoModel, AutoTokenizer, load_image
from internvl_runtime.engine.engine import EngineConfig, LLMEngine
from internvl_runtime.engine.sampling_params import SamplingParams
from internvl_runtime.processing.inputs import ImageInput
from internvl_runtime.quantization.linear import Int4Linear, Int8Linear
from paths import FIXTURES

VARIANT = "tiny-3_5-1B"
CKPT = FIXTURES / "ckpt" / VARIANT
GOLDENS = FIXTURES / "goldens" / VARIANT
GREEDY = SamplingParams(max_new_tokens=20, temperature=0)
CASES = ["text_chat", "img_800x600_max1", "img_300x1200_max6_autoprefix", "two_images_separate"]


@functools.lru_cache(maxsize=1)
def _loaded():
    return AutoModel.from_pretrained(CKPT), AutoTokenizer.from_pretrained(CKPT)


def _engine(**kwargs) -> LLMEngine:
    model, tokenizer = _loaded()
    kwargs.setdefault("num_blocks", 1024)
    return LLMEngine(model, tokenizer, EngineConfig(**kwargs))


def _request(engine: LLMEngine, case_id: str, round_index: int = 0):
    """(prepared request, the official greedy ids) of one round: the golden prompt with its images' tiles.
    The InternVL3.5 code's ``generate`` returns only the new ids (no leading bos)."""
    case = next(c for c in json.loads((FIXTURES / "cases.json").read_text())["cases"] if c["id"] == case_id)
    golden = json.loads((GOLDENS / f"{case_id}.json").read_text())
    record = golden["rounds"][round_index]
    tiles = [load_image(FIXTURES / "data" / f"{im['ref']}.png", input_size=golden["input_size"], max_num=im["max_num"])
             for im in case.get("images", [])]
    if tiles and case.get("num_patches_list") != "per_image":
        tiles = [torch.cat(tiles)]
    # the golden prompt with every image block folded back to its placeholder
    prompt = record["prompt"]
    for _ in tiles:
        start, end = prompt.index("<img>"), prompt.index("</img>") + len("</img>")
        prompt = prompt[:start] + "<image>" + prompt[end:]
    prepared = engine.processor.prepare_prompt(prompt, [ImageInput.from_tiles(t) for t in tiles])
    assert prepared.prompt_token_ids == record["input_ids"][0]
    assert not golden.get("leading_bos", record.get("leading_bos"))
    return prepared, record["generated_ids"][0]


def test_chunked_prefill_and_batching_equal_official() -> None:
    engine = _engine(num_blocks=600, max_num_batched_tokens=300, max_num_seqs=4)
    requests = [_request(engine, case_id) for case_id in CASES]
    outputs = engine.generate([r for r, _ in requests], GREEDY)
    assert [o.token_ids for o in outputs] == [golden for _, golden in requests]
    assert engine.num_free_blocks == 600


def test_second_turn_reuses_the_prefix() -> None:
    engine = _engine()
    first, golden_first = _request(engine, "text_two_round", 0)
    assert engine.generate([first], GREEDY)[0].token_ids == golden_first
    second, golden_second = _request(engine, "text_two_round", 1)
    out = engine.generate([second], GREEDY)[0]
    assert out.num_cached_tokens >= 16          # at least the system message's full block
    assert out.token_ids == golden_second


@pytest.mark.parametrize(("kwargs", "kind"), [(dict(load_in_8bit=True), Int8Linear),
                                              (dict(load_in_4bit=True), Int4Linear)])
def test_quantized_load_generates(kwargs: dict, kind: type) -> None:
    model = AutoModel.from_pretrained(CKPT, torch_dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(CKPT)
    attn = model.language_model.model.layers[0].self_attn
    assert isinstance(attn.qkv_proj, kind) and isinstance(attn.o_proj, kind)
    assert attn.q_norm is not None and attn.q_norm.weight.shape == (16,)   # the per-head norms stay as they are
    pixel_values = load_image(FIXTURES / "data" / "img_800x600.png", input_size=448, max_num=1)
    output = model.generate(pixel_values=pixel_values, **_prompt_ids(model, tokenizer),
                            max_new_tokens=6, min_new_tokens=6, do_sample=False, eos_token_id=702)
    assert output.shape == (1, 6)                                  # no leading bos: only the new ids
    response = model.chat(tokenizer, pixel_values, "Describe.", dict(max_new_tokens=6, do_sample=False))
    assert isinstance(response, str)


def _prompt_ids(model, tokenizer) -> dict:
    model.img_context_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    _, query = model.build_chat_query(torch.zeros(1, 3, 448, 448), "Describe.")
    inputs = tokenizer(query, return_tensors="pt")
    return {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}


def test_generate_counts_lengths_as_transformers_4_55() -> None:
    """The InternVL3.5 code's ``generate`` (transformers 4.55, prompt as embeddings): only the new ids come back,
    and ``max_length`` counts the prompt's embeddings plus the new tokens."""
    model, tokenizer = _loaded()
    inputs = _prompt_ids(model, tokenizer)
    pixel_values = load_image(FIXTURES / "data" / "img_800x600.png", input_size=448, max_num=1)
    width = inputs["input_ids"].shape[1]
    output = model.generate(pixel_values=pixel_values, **inputs, max_length=width + 3, min_new_tokens=3,
                            do_sample=False, eos_token_id=702)
    assert output.shape == (1, 3)
    longer = model.generate(pixel_values=pixel_values, **inputs, max_new_tokens=5, min_new_tokens=5,
                            do_sample=False, eos_token_id=702)
    assert longer[0, :3].tolist() == output[0].tolist()
