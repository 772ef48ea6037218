"""Goldens of InternVL3.5-GPT-OSS (tiny-3_5-20B-A4B): our official API (``chat`` / ``batch_chat`` /
``generate``) and the engine's first-step logits against the official internvl_chat_gpt_oss code at 2410d1d
(transformers 4.55.0), on the InternVL2 cases. Every prompt is longer than the tiny variant's window (8), so
the sliding layers' window, the sinks and the stacked experts are all in the numbers.

The checks are those of ``test_goldens.test_golden_case`` (prompt, ids, pixel values, features, logits of
the first step through the engine, greedy ids, response, history), run on this variant's own case list."""

from __future__ import annotations

import json

import pytest
from test_goldens import test_golden_case as check_golden_case

from paths import FIXTURES

VARIANT = "tiny-3_5-20B-A4B"
GOLDENS = FIXTURES / "goldens" / VARIANT


def _case_ids() -> list[str]:
    index = json.loads((GOLDENS / "index.json").read_text(encoding="utf-8"))
    return [c["id"] for c in index["variants"][VARIANT]["cases"]]


@pytest.mark.parametrize("case_id", _case_ids())
def test_gpt_oss_golden_case(case_id: str) -> None:
    check_golden_case(VARIANT, case_id)


def test_the_case_list_is_the_usual_one() -> None:
    """Guard: every InternVL2 case that applies to every variant has a golden here."""
    cases = json.loads((FIXTURES / "cases.json").read_text(encoding="utf-8"))["cases"]
    assert set(_case_ids()) == {c["id"] for c in cases if "only" not in c}
    assert json.loads((GOLDENS / "index.json").read_text(encoding="utf-8"))["reference_commit"] == "2410d1d"
