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

import pytest

from golden.test_goldens import check_golden_case
from golden.test_goldens_bf16 import test_bf16_first_logits as _bf16_first_logits
from paths import FIXTURES

VARIANT = "tiny-3_5-30B-A3B"
GOLDENS = FIXTURES / "goldens" / VARIANT


def _case_ids() -> list[str]:
    index = json.loads((GOLDENS / "index.json").read_text(encoding="utf-8"))
    return [c["id"] for c in index["variants"][VARIANT]["cases"]]


@pytest.mark.parametrize("case_id", _case_ids())
def test_golden_case_moe(case_id: str) -> None:
    golden = json.loads((GOLDENS / f"{case_id}.json").read_text(encoding="utf-8"))
    assert golden["template"] == "internvl2_5"
    check_golden_case(VARIANT, case_id, batched_engine=True)


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
