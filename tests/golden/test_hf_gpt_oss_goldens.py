"""Golden tests of the HF-format InternVL3.5-GPT-OSS (``InternVLForConditionalGeneration`` over a ``gpt_oss``
text config): our runtime against transformers 4.55's own model on the tiny ``tiny-3_5-20B-A4B-HF`` folder.

The folder is in the layout transformers 4.55's ``save_pretrained`` writes (``language_model.model.*``,
``vision_tower.*``, ``multi_modal_projector.*``, ``language_model.lm_head.weight``; GPT-OSS's stacked experts,
sinks and router biases under their own names); the goldens were made as the other HF goldens (see
tests/fixtures/README.md). The per-case checks are those of ``test_hf_goldens`` (prompt, ids, pixels, features,
first-step logits, greedy ids and responses through the engine; ``forward`` and ``generate`` through ``AutoModel``),
run here on this variant; the engine smoke is the whole-batch ``generate`` below, with the sliding-window layers
crossing their window.
"""

from __future__ import annotations

import pytest
import torch
from test_hf_goldens import _case_ids, _engine, _golden, _rounds
from test_hf_goldens import test_hf_golden_through_the_engine as check_through_the_engine
from test_hf_goldens import test_hf_golden_through_the_official_api as check_through_the_official_api

from internvl_runtime.engine.sampling_params import SamplingParams
from internvl_runtime.models.decoders.gpt_oss import GptOssForCausalLM
from internvl_runtime.processing.inputs import Message
from paths import FIXTURES

VARIANT = "tiny-3_5-20B-A4B-HF"


@pytest.mark.parametrize(("variant", "case_id", "round_index"), _rounds(VARIANT))
def test_hf_gpt_oss_golden_through_the_engine(variant: str, case_id: str, round_index: int) -> None:
    check_through_the_engine(variant, case_id, round_index)


@pytest.mark.parametrize("case_id", ["img_800x600_max1", "batch_2", "text_chat"])
def test_hf_gpt_oss_golden_through_the_official_api(case_id: str) -> None:
    check_through_the_official_api(VARIANT, case_id)


def test_hf_gpt_oss_goldens_have_cases() -> None:
    """Guard: the parametrisation above must not silently become empty."""
    assert {"text_chat", "img_800x600_max12", "two_images", "batch_2"} <= set(_case_ids(VARIANT))


def test_hf_gpt_oss_engine_smoke() -> None:
    """The folder loads as GPT-OSS (sliding and full layers as its config says) and one engine batch of a text
    and an image conversation gives transformers' answers of the two single-conversation goldens."""
    engine = _engine(VARIANT)
    decoder = engine.model.language_model
    assert isinstance(decoder, GptOssForCausalLM)
    windows = [layer.self_attn.window for layer in decoder.model.layers]
    assert windows == [8, None, 8, None]
    text, image = _golden(VARIANT, "text_chat"), _golden(VARIANT, "img_800x600_max1")
    image_file = str(FIXTURES / "data" / f"{image['case']['images'][0]}.png")
    prompts = [engine.processor.prepare([Message("user", text["case"]["rounds"][0])]),
               engine.processor.prepare([Message("user", image["case"]["rounds"][0], images=[image_file])], max_num=1)]
    assert all(len(p.prompt_token_ids) > 8 for p in prompts)       # every prompt crosses the sliding window
    outputs = engine.generate(prompts, SamplingParams(max_new_tokens=20, temperature=0))
    assert [o.text for o in outputs] == [text["rounds"][0]["responses"][0], image["rounds"][0]["responses"][0]]
    assert engine.model.config.llm.moe is not None and engine.model.config.llm.moe.num_experts == 4
    assert next(decoder.parameters()).dtype == torch.float32



def test_hf_gpt_oss_stops_where_transformers_generate_stops() -> None:
    """transformers' ``generate`` on the folder stops at every eos id of its generation_config.json (gpt-oss-20b's
    ``<|return|>``, ``<|endoftext|>`` and ``<|call|>``), not only at the tokenizer's eos: so does the engine. The
    first token is forced to ``<|call|>`` (714) by a logit bias; the answer ends there."""
    engine = _engine(VARIANT)
    assert engine.model.config.generation_eos_token_ids == (704, 701, 714)
    prompt = engine.processor.prepare([Message("user", "Hello, who are you?")])
    for forced in (714, 701):
        out = engine.generate([prompt], SamplingParams(max_new_tokens=5, temperature=0, logit_bias={forced: 100}))[0]
        assert out.token_ids == [forced]
        assert out.finish_reason == "stop"
