"""Golden tests of the successors on the decoders we already have: InternVL2.5-1B (Qwen2.5), InternVL2.5-8B
(InternLM2.5) and InternVL3-1B (Qwen2.5 with dynamic rope), against the official code of their release
commits (31e075f for 2.5, 19b0da2 for 3; see tests/fixtures/README.md).

The checks are those of the InternVL2 goldens (``test_goldens.test_golden_case``: pixel values, prompt,
input ids, vision features, first-step logits through the engine, greedy ids through ``generate``, the
response and history through ``chat`` / ``batch_chat``); the cases of each variant are listed in its own
``goldens/<variant>/index.json``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import test_goldens as goldens  # the InternVL2 golden checks (same folder), reused as they are
import test_goldens_bf16 as bf16_goldens
import torch

from internvl_runtime import AutoModel, AutoTokenizer
from internvl_runtime.processing.template import INTERNVL2_5_SYSTEM_MESSAGE
from internvl_runtime.quantization import Int8Linear
from paths import FIXTURES

VARIANTS = ["tiny-2_5-1B", "tiny-2_5-8B", "tiny-3-1B"]
COMMITS = {"tiny-2_5-1B": "31e075f", "tiny-2_5-8B": "31e075f", "tiny-3-1B": "19b0da2"}


def _index(variant: str) -> dict:
    return json.loads((FIXTURES / "goldens" / variant / "index.json").read_text(encoding="utf-8"))


def _cases() -> list[tuple[str, str]]:
    return [(v, c["id"]) for v in VARIANTS if (FIXTURES / "goldens" / v / "index.json").is_file()
            for c in _index(v)["cases"]]


@pytest.mark.parametrize(("variant", "case_id"), _cases())
def test_golden_case(variant: str, case_id: str) -> None:
    goldens.test_golden_case(variant, case_id)


@pytest.mark.parametrize("compute", ["native", "upcast"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case_id", ["text_chat", "img_800x600_max1"])
def test_bf16_first_logits(variant: str, case_id: str, compute: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 weights (native bf16 math, and the float32-upcast plan) within bf16 tolerance of the float32 goldens."""
    bf16_goldens.test_bf16_first_logits(variant, case_id, compute, monkeypatch)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_case_of_the_variant_is_there(variant: str) -> None:
    """Guard: each variant has a golden for every case of cases.json that applies to it, made at its
    generation's release commit with the internvl2_5 template."""
    index = _index(variant)
    cases = json.loads((FIXTURES / "cases.json").read_text(encoding="utf-8"))["cases"]
    expected = [c["id"] for c in cases if variant in c.get("only", [variant])]
    assert [c["id"] for c in index["cases"]] == expected
    assert index["reference_commit"] == COMMITS[variant] and index["template"] == "internvl2_5"
    config = json.loads((FIXTURES / "ckpt" / variant / "config.json").read_text(encoding="utf-8"))
    assert config["template"] == "internvl2_5"


def test_prompts_carry_the_2_5_format() -> None:
    """The golden prompts themselves: the 2.5 system message, and a newline after every ``<|im_end|>``."""
    record = json.loads((FIXTURES / "goldens" / "tiny-2_5-1B" / "text_two_round.json").read_text(encoding="utf-8"))
    prompt = record["rounds"][1]["prompt"]
    assert prompt.startswith(f"<|im_start|>system\n{INTERNVL2_5_SYSTEM_MESSAGE}<|im_end|>\n<|im_start|>user\n")
    assert prompt.count("<|im_end|>") == prompt.count("<|im_end|>\n") == 4   # system, user, answer, user
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_int8_load_of_internvl2_5() -> None:
    """tiny-2_5-8B (InternLM2.5) with ``load_in_8bit``: every LLM linear is int8, and the engine's first-step logits
    of an image prompt stay within 2% of the official float32 ones (weight-only int8 on random weights)."""
    golden_dir = FIXTURES / "goldens" / "tiny-2_5-8B"
    golden = json.loads((golden_dir / "img_800x600_max1.json").read_text(encoding="utf-8"))
    record = golden["rounds"][0]
    folder = FIXTURES / "ckpt" / "tiny-2_5-8B"
    model = AutoModel.from_pretrained(folder, torch_dtype=torch.float32, load_in_8bit=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, use_fast=False)
    linears = [m for m in model.language_model.modules() if isinstance(m, (torch.nn.Linear, Int8Linear))]
    assert len(linears) == 2 * 4 + 1 and all(isinstance(m, Int8Linear) for m in linears)   # 2 layers + lm_head
    pixel_values = goldens._image("img_800x600", 1, golden["input_size"])
    features = model.extract_feature(pixel_values).reshape(-1, model.config.llm.hidden_size)
    model.img_context_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    logits = goldens._first_logits(model, record["input_ids"], features)
    reference = torch.from_numpy(np.load(golden_dir / record["logits0_file"])).reshape(logits.shape)
    error = float((logits - reference).norm() / reference.norm())
    assert 0 < error < 0.02
    response = model.chat(tokenizer, pixel_values, record["question"], {"max_new_tokens": 4, "do_sample": False})
    assert isinstance(response, str) and response
