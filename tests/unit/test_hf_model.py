"""The model object as transformers users know it, on the tiny checkpoints: its attributes, a settable
``system_message``, ``from_pretrained``'s transformers keywords, ``forward`` (logits equal to the
official goldens'), ``.to()``/``.cpu()``, the generation keys (``max_length``, ``no_repeat_ngram_size``,
``use_cache``, ``output_scores``/``return_dict_in_generate``), and the official evaluation scripts'
call patterns (internvl_chat/eval/{mmbench,vqa,caption,mme,mvbench}) run unchanged."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from internvl_runtime import AutoModel, AutoTokenizer, InvalidGenerationConfig, UnsupportedFeature, load_image
from internvl_runtime.engine.sampler import banned_ngram_tokens
from paths import FIXTURES

CKPT = FIXTURES / "ckpt" / "tiny-1B"
GOLDENS = FIXTURES / "goldens" / "tiny-1B"
BEAM_GOLDENS = FIXTURES / "goldens" / "beam" / "tiny-1B"


@pytest.fixture(scope="module")
def model():
    return AutoModel.from_pretrained(CKPT, torch_dtype=torch.float32, low_cpu_mem_usage=True,
                                     trust_remote_code=True).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(CKPT, trust_remote_code=True, use_fast=False)


def golden(name: str) -> dict:
    return json.loads((GOLDENS / f"{name}.json").read_text(encoding="utf-8"))


def beam_golden(name: str) -> dict:
    return json.loads((BEAM_GOLDENS / f"{name}.json").read_text(encoding="utf-8"))


def image(ref: str, max_num: int) -> torch.Tensor:
    return load_image(FIXTURES / "data" / f"{ref}.png", input_size=448, max_num=max_num)


def rel_err(ours: torch.Tensor, ref: np.ndarray) -> float:
    ref_t = torch.from_numpy(np.asarray(ref, dtype=np.float32)).reshape(ours.shape)
    return float((ours.float() - ref_t).norm() / ref_t.norm())


# --------------------------------------------------------------------------------------------------
# attributes
# --------------------------------------------------------------------------------------------------
def test_attributes_as_the_official_model(model):
    raw = json.loads((CKPT / "config.json").read_text(encoding="utf-8"))
    assert model.device == torch.device("cpu")
    assert model.dtype == torch.float32
    assert model.template == raw["template"]
    assert model.ps_version == raw["ps_version"]
    assert model.downsample_ratio == raw["downsample_ratio"]
    assert model.select_layer == raw["select_layer"]
    assert model.num_image_token == 256
    assert model.name_or_path == str(CKPT)
    # what the official split_model(--auto) and the eval scripts read
    assert model.config.llm_config.num_hidden_layers == raw["llm_config"]["num_hidden_layers"]
    assert model.config.vision_config.image_size == raw["vision_config"]["image_size"]
    assert model.config.force_image_size or model.config.vision_config.image_size
    assert model.config.to_dict() == raw
    assert model.config.llm_config.to_dict() == raw["llm_config"]
    with pytest.raises(AttributeError):
        _ = model.config.llm_config.no_such_field


def test_generation_config_from_the_file(model):
    config = model.generation_config
    file = json.loads((CKPT / "generation_config.json").read_text(encoding="utf-8"))
    assert config.transformers_version == file["transformers_version"]
    # transformers' defaults where the file says nothing
    assert (config.max_length, config.do_sample, config.num_beams, config.top_k) == (20, False, 1, 50)
    as_dict = config.to_dict()
    assert as_dict["max_length"] == 20 and as_dict["transformers_version"] == file["transformers_version"]
    assert "max_length" not in config.to_diff_dict()


def test_system_message_is_settable_and_used_by_chat(model, tokenizer):
    default = model.system_message
    try:
        model.system_message = "You are a terse assistant."   # VLMEvalKit / the streamlit worker do this
        assert model.system_message == "You are a terse assistant."
        _, query = model.build_chat_query(None, "Hi")
        assert "You are a terse assistant." in query and default not in query
        answer = model.chat(tokenizer, None, "Hi", dict(max_new_tokens=3, do_sample=False))
        assert isinstance(answer, str)
    finally:
        model.system_message = default
    assert default in model.build_chat_query(None, "Hi")[1]


def test_template_is_settable(model):
    original = model.template
    try:
        model.template = "internlm2-chat"
        assert "<|im_start|>" in model.build_chat_query(None, "Hi")[1]
        assert model.conv_template.sep == "<|im_end|>"
    finally:
        model.template = original


# --------------------------------------------------------------------------------------------------
# from_pretrained keywords
# --------------------------------------------------------------------------------------------------
def test_transformers_loading_keywords_accepted():
    model = AutoModel.from_pretrained(CKPT, dtype=torch.bfloat16, attn_implementation="eager",
                                      use_safetensors=True, low_cpu_mem_usage=True, trust_remote_code=True,
                                      use_flash_attn=False)
    assert model.dtype == torch.bfloat16
    with pytest.raises(UnsupportedFeature, match="attn_implementation"):
        AutoModel.from_pretrained(CKPT, attn_implementation="paged_magic")
    with pytest.raises(TypeError, match="disagree"):
        AutoModel.from_pretrained(CKPT, dtype=torch.bfloat16, torch_dtype=torch.float32)


def test_bitsandbytes_quantization_config_maps_to_ours():
    model = AutoModel.from_pretrained(CKPT, torch_dtype=torch.bfloat16, quantization_config={
        "load_in_8bit": True, "llm_int8_threshold": 6.0, "llm_int8_skip_modules": ["vision_model", "mlp1"]})
    assert model.quantization.mode == "int8"
    model4 = AutoModel.from_pretrained(CKPT, torch_dtype=torch.bfloat16, quantization_config={
        "load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "bfloat16"})
    assert model4.quantization.mode == "int4"


class BitsAndBytesConfigShaped:
    """What transformers' ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
    bnb_4bit_compute_dtype=torch.bfloat16)`` gives: fields read through ``to_dict()``."""

    def to_dict(self) -> dict:
        return {"quant_method": "bitsandbytes", "_load_in_8bit": False, "_load_in_4bit": True,
                "llm_int8_threshold": 6.0, "llm_int8_skip_modules": None, "llm_int8_enable_fp32_cpu_offload": False,
                "llm_int8_has_fp16_weight": False, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": False,
                "bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_quant_storage": "uint8",
                "load_in_4bit": True, "load_in_8bit": False}


def test_bitsandbytes_config_object(tokenizer):
    # VLMEvalKit's call: quantization_config, device_map, low_cpu_mem_usage, use_flash_attn, trust_remote_code
    model = AutoModel.from_pretrained(CKPT, torch_dtype=torch.bfloat16, quantization_config=BitsAndBytesConfigShaped(),
                                      device_map="cpu", low_cpu_mem_usage=True, use_flash_attn=True,
                                      trust_remote_code=True).eval()
    assert model.quantization.mode == "int4" and model.dtype == torch.bfloat16
    assert isinstance(model.chat(tokenizer, None, "Hi", dict(max_new_tokens=3)), str)
    with pytest.raises(UnsupportedFeature, match="quantized"):
        model.to(torch.float32)
    with pytest.raises(UnsupportedFeature, match="quantized"):
        model.half()
    assert model.to("cpu") is model and model.cpu() is model


@pytest.mark.parametrize("config", [
    {"load_in_8bit": True, "llm_int8_threshold": 3.0},
    {"load_in_8bit": True, "llm_int8_skip_modules": ["language_model.model.layers.0"]},
    {"load_in_8bit": True, "llm_int8_enable_fp32_cpu_offload": True},
    {"quant_method": "gptq", "bits": 4},
    {"load_in_4bit": True, "bnb_4bit_compute_dtype": "float16"},
])
def test_quantization_config_we_cannot_honour_is_refused(config):
    with pytest.raises(UnsupportedFeature):
        AutoModel.from_pretrained(CKPT, torch_dtype=torch.bfloat16, quantization_config=config)


# --------------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------------
def test_forward_logits_equal_the_goldens_text_and_image(model, tokenizer):
    model.img_context_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    record = golden("text_chat")["rounds"][0]
    ids = torch.tensor(record["input_ids"])
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert out.logits.shape == (1, ids.shape[1], model.config.llm.vocab_size)
    assert out["logits"] is out.logits and out[0] is out.logits
    assert rel_err(out.logits[0, -1], np.load(GOLDENS / record["logits0_file"])) <= 1e-5

    record = golden("img_800x600_max1")["rounds"][0]
    pixel_values = image("img_800x600", 1)
    ids = torch.tensor(record["input_ids"])
    # the official training call: image_flags (tiles, 1), every tile used
    out = model(pixel_values=pixel_values, input_ids=ids, attention_mask=torch.ones_like(ids),
                image_flags=torch.ones(pixel_values.shape[0], 1, dtype=torch.long))
    assert rel_err(out.logits[0, -1], np.load(GOLDENS / record["logits0_file"])) <= 1e-5
    # a flag of 0 drops the tile: then the prompt's <IMG_CONTEXT> tokens have no features
    with pytest.raises(Exception, match="IMG_CONTEXT"):
        model(pixel_values=pixel_values, input_ids=ids, image_flags=torch.zeros(pixel_values.shape[0], 1))


@pytest.mark.parametrize("variant", ["tiny-2B", "tiny-4B", "tiny-8B", "tiny-26B", "tiny-40B", "tiny-76B"])
def test_forward_every_decoder_family_equals_the_goldens(variant):
    """InternLM2, Phi-3 (its su rope), Yi/Llama, Llama-3: the text prompt's logits at every decoder."""
    record = json.loads((FIXTURES / "goldens" / variant / "text_chat.json").read_text(encoding="utf-8"))["rounds"][0]
    model = AutoModel.from_pretrained(FIXTURES / "ckpt" / variant, torch_dtype=torch.float32)
    out = model(input_ids=torch.tensor(record["input_ids"]))
    assert rel_err(out.logits[0, -1], np.load(FIXTURES / "goldens" / variant / record["logits0_file"])) <= 1e-5


def test_forward_left_padded_batch_equals_the_goldens(model, tokenizer):
    model.img_context_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    record = golden("batch_chat_2_text_len")
    case = json.loads((FIXTURES / "cases.json").read_text(encoding="utf-8"))
    items = next(c for c in case["cases"] if c["id"] == "batch_chat_2_text_len")["items"]
    pixel_values = torch.cat([image(item["ref"], item["max_num"]) for item in items])
    ids, mask = torch.tensor(record["input_ids"]), torch.tensor(record["attention_mask"])
    out = model(pixel_values=pixel_values, input_ids=ids, attention_mask=mask,
                image_flags=torch.ones(pixel_values.shape[0], 1), return_dict=True)
    ref = np.load(GOLDENS / record["logits0_file"]).reshape(len(items), -1)
    assert rel_err(out.logits[:, -1], ref) <= 1e-5
    assert not out.logits[mask == 0].any()  # masked positions hold zeros
    labels = ids.masked_fill(mask == 0, -100)
    loss_out = model(pixel_values=pixel_values, input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)
    assert loss_out[0].dim() == 0 and torch.isfinite(loss_out[0])


def test_to_moves_and_returns_self(tokenizer):
    model = AutoModel.from_pretrained(CKPT, torch_dtype=torch.float32)
    before = model.chat(tokenizer, None, "Hi", dict(max_new_tokens=4))
    assert model.generation_engine is not None
    assert model.to(torch.bfloat16) is model
    assert model.dtype == torch.bfloat16 and model.generation_engine is None   # old KV cache dropped
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    model.chat(tokenizer, None, "Hi", dict(max_new_tokens=4))
    assert model.generation_engine.runner.dtype == torch.bfloat16
    assert model.cpu() is model and model.float() is model
    assert model.chat(tokenizer, None, "Hi", dict(max_new_tokens=4)) == before


# --------------------------------------------------------------------------------------------------
# generation keys
# --------------------------------------------------------------------------------------------------
def _prompt(model, tokenizer):
    model.img_context_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    return tokenizer(model.build_chat_query(None, "Hello, who are you?")[1], return_tensors="pt")


def test_max_length_counts_the_bos_and_new_tokens(model, tokenizer):
    inputs = _prompt(model, tokenizer)
    out = model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_length=7,
                         use_cache=True)
    assert out.shape == (1, 7)                      # transformers: the bos the reference starts from + 6
    both = model.generate(input_ids=inputs["input_ids"], max_length=8192, max_new_tokens=3)
    assert both.shape == (1, 4)                     # max_new_tokens wins, as in transformers
    assert torch.equal(both, out[:, :4])
    with pytest.raises(InvalidGenerationConfig, match="max_length"):
        model.generate(input_ids=inputs["input_ids"], max_length=1)
    with pytest.raises(InvalidGenerationConfig, match="no_such_key"):
        model.generate(input_ids=inputs["input_ids"], no_such_key=1)


def test_banned_ngram_tokens_as_transformers():
    assert banned_ngram_tokens([1, 2, 3, 1, 2], 3) == [3]
    assert banned_ngram_tokens([1, 2, 1, 4, 1], 2) == [2, 4]
    assert banned_ngram_tokens([5, 6], 3) == []           # too short for a 3-gram to repeat
    assert banned_ngram_tokens([5, 6, 5], 1) == [5, 6]


def _has_repeated_ngram(ids: list[int], n: int) -> bool:
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return len(grams) != len(set(grams))


@pytest.mark.parametrize("num_beams", [1, 3])
def test_no_repeat_ngram_size(model, tokenizer, num_beams):
    model.img_context_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    pixel_values = image("img_800x600", 1)   # its answers repeat "image image ..." (the goldens)
    inputs = tokenizer(model.build_chat_query(pixel_values, "Please describe the image shortly.")[1],
                       return_tensors="pt")
    stop = tokenizer.convert_tokens_to_ids(model.conv_template.sep)
    common = dict(pixel_values=pixel_values, input_ids=inputs["input_ids"], max_new_tokens=24,
                  num_beams=num_beams, eos_token_id=stop)
    plain = model.generate(**common)[0].tolist()
    assert _has_repeated_ngram(plain, 2)   # the random tiny model repeats itself: the test can fail
    banned = model.generate(**common, no_repeat_ngram_size=2)[0].tolist()
    body = [t for t in banned if t != stop]     # the ids transformers tracks: bos + generated (eos padding aside)
    assert not _has_repeated_ngram(body, 2)


def test_output_scores_greedy(model, tokenizer):
    inputs = _prompt(model, tokenizer)
    out = model.generate(input_ids=inputs["input_ids"], max_new_tokens=5, output_scores=True,
                         return_dict_in_generate=True)
    assert out.sequences.shape == (1, 6) and len(out.scores) == 5
    assert [int(s.argmax()) for s in out.scores] == out.sequences[0, 1:].tolist()
    first = model(input_ids=inputs["input_ids"]).logits[0, -1]
    assert torch.allclose(out.scores[0][0], first, rtol=1e-4, atol=1e-4)
    assert out["sequences"] is out.sequences
    # processors show in the scores: min_new_tokens masks the eos, as transformers records it
    stop = tokenizer.convert_tokens_to_ids(model.conv_template.sep)
    masked = model.generate(input_ids=inputs["input_ids"], max_new_tokens=2, min_new_tokens=2, eos_token_id=stop,
                            output_scores=True, return_dict_in_generate=True)
    assert masked.scores[0][0, stop] == float("-inf")
    plain = model.generate(input_ids=inputs["input_ids"], max_new_tokens=2, return_dict_in_generate=True)
    assert plain.scores is None and plain.sequences.shape == (1, 3)


def test_output_scores_beam_search_equal_the_goldens(model, tokenizer):
    record = beam_golden("text_chat_beams5_return3")
    rnd = record["rounds"][0] if isinstance(record.get("rounds"), list) else record
    model.img_context_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    query = model.build_chat_query(None, rnd["question"])[1]
    inputs = tokenizer(query, return_tensors="pt")
    out = model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                         eos_token_id=rnd["eos_token_id"], output_scores=True, return_dict_in_generate=True,
                         **record["generation_config"])
    assert out.sequences.tolist() == rnd["generated_ids"]
    assert out.sequences_scores.tolist() == pytest.approx(rnd["sequences_scores"], abs=1e-4)


# --------------------------------------------------------------------------------------------------
# the official evaluation scripts' call patterns, unchanged but for .cuda() (a CPU here)
# --------------------------------------------------------------------------------------------------
def _eval_config(script: str, num_beams: int, temperature: float = 0.0) -> dict:
    """generation_config exactly as each script builds it (max_new_tokens of one of its datasets)."""
    if script == "mme":
        return dict(do_sample=False, top_k=50, top_p=0.9, num_beams=num_beams, max_new_tokens=20,
                    eos_token_id=None)
    max_new, min_new = {"mmbench": (100, 1), "vqa": (10, 1), "caption": (30, 8), "mvbench": (1000, 1)}[script]
    return dict(num_beams=num_beams, max_new_tokens=max_new, min_new_tokens=min_new,
                do_sample=temperature > 0, temperature=temperature)   # the scripts: True if ... else False


@pytest.mark.parametrize("num_beams", [1, 5])
@pytest.mark.parametrize("script", ["mmbench", "vqa", "caption", "mme"])
def test_eval_script_chat_pattern(model, tokenizer, script, num_beams):
    # the scripts' own checks before they run
    image_size = model.config.force_image_size or model.config.vision_config.image_size
    assert model.config.use_thumbnail in (True, False) and model.config.template
    total_params = sum(p.numel() for p in model.parameters()) / 1e9
    assert total_params < 20
    pixel_values = load_image(FIXTURES / "data" / "img_800x600.png", input_size=image_size, max_num=1)
    generation_config = _eval_config(script, num_beams)
    if script == "mme":
        generation_config["eos_token_id"] = tokenizer.eos_token_id
    record = beam_golden("img_800x600_max1_beams5")["rounds"][0]
    pred = model.chat(tokenizer=tokenizer, pixel_values=pixel_values.to(torch.float32),
                      question=record["question"], generation_config=generation_config, verbose=True)
    assert isinstance(pred, str)
    if script == "mme" and num_beams == 5:   # the golden's exact settings: max_new_tokens 20, greedy beams
        assert pred == record["response"]
    if script == "mme" and num_beams == 1:
        greedy = golden("img_800x600_max1")["rounds"][0]
        assert pred == greedy["response"]


@pytest.mark.parametrize("num_beams", [1, 5])
def test_eval_script_mvbench_pattern(model, tokenizer, num_beams):
    frames = [load_image(FIXTURES / "data" / f"frame_{i:03d}.png", input_size=448, max_num=1) for i in (0, 5, 10)]
    num_patches_list = [f.shape[0] for f in frames]
    pixel_values = torch.cat(frames)
    question = "".join(f"Frame{i + 1}: <image>\n" for i in range(len(frames))) + "What happens?"
    generation_config = _eval_config("mvbench", num_beams)
    generation_config["max_new_tokens"] = 24   # the script's 1000, shortened: the tiny model never stops
    pred = model.chat(tokenizer=tokenizer, pixel_values=pixel_values, num_patches_list=num_patches_list,
                      question=question, generation_config=generation_config, verbose=True)
    assert isinstance(pred, str)


def test_streamlit_worker_generation_config(model, tokenizer):
    """model_worker.py: max_length=context_len next to max_new_tokens, system_message swapped around chat."""
    old = model.system_message
    model.system_message = "请尽可能详细地回答用户的问题。"
    try:
        config = dict(num_beams=1, max_new_tokens=6, do_sample=False, temperature=1.0, repetition_penalty=1.1,
                      max_length=8192, top_p=1.0)
        answer = model.chat(tokenizer, None, "Hi", config)
        assert isinstance(answer, str)
    finally:
        model.system_message = old
    assert model.system_message == old
