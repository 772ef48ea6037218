"""Golden tests of InternVL3.5 dense (Qwen3): our runtime against the official InternVL3.5 code's answers.

The goldens (``tests/fixtures/goldens/tiny-3_5-1B``) were made by ``internvl_chat_gpt_oss`` at eca3ea7 with
transformers 4.55.0 (see tests/fixtures/README.md); each case of ``cases.json`` is checked exactly as the
InternVL2 goldens are (``test_goldens.test_golden_case``: pixels, prompt, ids, features, first-step logits
on the engine, greedy ids of ``generate``, ``chat`` / ``batch_chat`` answers and histories). What differs from
InternVL2 lives in the data: ``generate`` returns no leading bos and answers keep special tokens.
"""

from __future__ import annotations

import json

import pytest
import test_goldens as golden
import test_goldens_bf16 as golden_bf16

VARIANTS = ["tiny-3_5-1B"]


def _cases() -> list[tuple[str, str]]:
    out = []
    for variant in VARIANTS:
        index = json.loads((golden.SHARED / "goldens" / variant / "index.json").read_text(encoding="utf-8"))
        out += [(variant, case["id"]) for case in index["cases"]]
    return out


@pytest.mark.parametrize(("variant", "case_id"), _cases())
def test_golden_case_3_5(variant: str, case_id: str) -> None:
    golden.test_golden_case(variant, case_id)


def test_every_case_applies() -> None:
    """Guard: every case of cases.json that is not limited to other variants has a golden."""
    cases = json.loads((golden.SHARED / "cases.json").read_text(encoding="utf-8"))["cases"]
    wanted = {c["id"] for c in cases if "only" not in c}
    assert {c for v, c in _cases() if v == "tiny-3_5-1B"} == wanted


@pytest.mark.parametrize("compute", ["native", "upcast"])
@pytest.mark.parametrize("case_id", ["text_chat", "img_800x600_max1"])
def test_bf16_first_logits_3_5(case_id: str, compute: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """bfloat16 (native bf16 and float32-upcast plans) against the official float32 first-step logits."""
    golden_bf16.test_bf16_first_logits("tiny-3_5-1B", case_id, compute, monkeypatch)
