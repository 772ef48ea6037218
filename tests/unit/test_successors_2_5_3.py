"""InternVL2.5 / InternVL3 on the decoders we already have: every released size's config is understood (decoder by
the exact architecture string, the internvl2_5 template, the parameter counts of the model cards), the template is
conversation.py's, the answer stops at ``<|im_end|>``, and the tiny variants load tensor for tensor (the int8 load
is tested beside the goldens, tests/golden/test_goldens_2_5_3.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import test_loader as loader_tests  # the InternVL2 loader checks (same folder), reused as they are
import test_tokenizer as tokenizer_tests

from internvl_runtime.config import InternVLConfig
from internvl_runtime.models.registry import decoder_class
from internvl_runtime.processing.inputs import InputProcessor, Message
from internvl_runtime.processing.template import INTERNVL2_5_SYSTEM_MESSAGE, build_prompt, get_template
from internvl_runtime.processing.tokenization import AutoTokenizer as OwnTokenizer
from internvl_runtime.testing.checkpoints import RELEASED_2_5_3, VARIANTS_2_5_3, official_tensor_shapes, real_config
from paths import FIXTURES

# Total parameters in billions, as the model cards of OpenGVLab/InternVL2_5-* and InternVL3-* state them.
MODEL_CARD_PARAMS = {"2_5-1B": 0.9, "2_5-2B": 2.2, "2_5-4B": 3.7, "2_5-8B": 8.1, "2_5-26B": 25.5, "2_5-38B": 38.4,
                     "2_5-78B": 78.4, "3-1B": 0.9, "3-2B": 2.1, "3-8B": 7.9, "3-14B": 15.1, "3-38B": 38.4,
                     "3-78B": 78.4}


@pytest.mark.parametrize("variant", RELEASED_2_5_3)
def test_released_configs_parse(variant: str) -> None:
    raw = real_config(variant)
    cfg = InternVLConfig.from_dict(raw, f"{variant}/config.json")
    assert cfg.template == "internvl2_5"
    assert cfg.num_image_token == 256 and cfg.image_size == 448
    assert decoder_class(cfg.llm.architecture).__name__ == cfg.llm.architecture
    assert cfg.llm.num_attention_heads % cfg.llm.num_key_value_heads == 0
    if variant.startswith("3-"):   # InternVL3's Qwen2.5 configs carry dynamic NTK rope
        assert cfg.llm.rope_scaling is not None and cfg.llm.rope_scaling.type == "dynamic"
    params = sum(math.prod(shape) for shape in official_tensor_shapes(raw).values())
    assert round(params / 1e9, 1) == MODEL_CARD_PARAMS[variant]


def test_internvl2_5_template_is_conversation_py() -> None:
    template = get_template("internvl2_5")
    assert template.sep == "<|im_end|>\n" and template.stop_str == "<|im_end|>"
    assert template.system_message == INTERNVL2_5_SYSTEM_MESSAGE
    prompt = build_prompt("internvl2_5", "Again?", [("Hi", "Hello.")])
    assert prompt == (f"<|im_start|>system\n{INTERNVL2_5_SYSTEM_MESSAGE}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                      "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nAgain?<|im_end|>\n"
                      "<|im_start|>assistant\n")
    for name in ("Hermes-2", "internlm2-chat", "phi3-chat", "internvl_zh"):   # unchanged: their sep has no space
        assert get_template(name).stop_str == get_template(name).sep


@pytest.mark.parametrize("variant", VARIANTS_2_5_3)
def test_stop_token_is_im_end(variant: str) -> None:
    folder = FIXTURES / "ckpt" / f"tiny-{variant}"
    tokenizer = OwnTokenizer.from_pretrained(folder)
    processor = InputProcessor.for_model(SimpleNamespace(config=InternVLConfig.from_pretrained(folder)), tokenizer)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end != tokenizer.unk_token_id and processor.stop_token_ids[0] == im_end
    prepared = processor.prepare([Message("user", "Hello, who are you?")])
    golden = json.loads((FIXTURES / "goldens" / f"tiny-{variant}" / "text_chat.json").read_text(encoding="utf-8"))
    assert prepared.prompt_token_ids == golden["rounds"][0]["input_ids"][0]


@pytest.mark.parametrize("num_shards", [1, 2])
@pytest.mark.parametrize("variant", VARIANTS_2_5_3)
def test_every_parameter_equals_checkpoint(tmp_path: Path, variant: str, num_shards: int) -> None:
    loader_tests.test_every_parameter_equals_checkpoint(tmp_path, variant, num_shards)


ORACLE_CHECKS = ["test_oracle_attributes", "test_oracle_tokens", "test_oracle_encode",
                 "test_oracle_decode_of_encodings", "test_oracle_decode_id_runs", "test_oracle_single_token_decode",
                 "test_oracle_batches"]


@pytest.mark.parametrize("check", ORACLE_CHECKS)
def test_qwen2_5_tokenizer_against_the_official_one(check: str) -> None:
    """The Qwen2.5-kind tokenizer (tiny-2_5-1B, shared by tiny-3-1B) against transformers 4.37.2's slow
    Qwen2Tokenizer on the InternVL2 edge-case corpus plus texts around Qwen2.5's added tokens, special
    (``<|box_start|>``...) and not (``<tool_call>``, ``<|fim_prefix|>``...): tests/data/tokenizer/tiny-2_5-1B.json,
    checked by the InternVL2 tokenizer tests' own functions."""
    folder = FIXTURES / "ckpt" / "tiny-2_5-1B"
    oracle = json.loads((tokenizer_tests.DATA_DIR / "tiny-2_5-1B.json").read_text(encoding="utf-8"))
    tok = OwnTokenizer.from_pretrained(folder, trust_remote_code=True, use_fast=False)
    function = getattr(tokenizer_tests, check)
    if check == "test_oracle_attributes":
        function(tok, oracle, folder)
    else:
        function(tok, oracle)
