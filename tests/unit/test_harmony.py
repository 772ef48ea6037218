"""The harmony answer parser (processing/harmony.py): a whole answer's content and reasoning, and the same
fields from the answer streamed in pieces of every split (no markup ever leaks into either field)."""

from __future__ import annotations

import itertools

import pytest

from internvl_runtime.processing.harmony import HarmonyAnswer, HarmonyStreamParser, parse_harmony, uses_harmony

TWO_CHANNELS = ("<|channel|>analysis<|message|>The user asks for the capital.<|end|>"
                "<|start|>assistant<|channel|>final<|message|>Paris is the capital.<|return|>")

CASES = [
    (TWO_CHANNELS, HarmonyAnswer("Paris is the capital.", "The user asks for the capital.")),
    # the final channel alone (the system message's "Valid channels: final")
    ("<|channel|>final<|message|>Hello <|world|>?<|return|>", HarmonyAnswer("Hello <|world|>?", None)),
    # cut off while reasoning (max_tokens): no content yet, as vLLM's null
    ("<|channel|>analysis<|message|>Let me think", HarmonyAnswer(None, "Let me think")),
    # two reasoning messages (one of them commentary) join with a newline; the <|end|> before <|start|> missing
    ("<|channel|>analysis<|message|>a<|end|><|start|>assistant<|channel|>commentary<|message|>b"
     "<|start|>assistant<|channel|>final<|message|>c<|end|>", HarmonyAnswer("c", "a\nb")),
    # a recipient and a content type in the header: the body is still the channel's
    ("<|channel|>analysis<|message|>x<|end|><|start|>assistant to=functions.f<|channel|>commentary "
     "<|constrain|>json<|message|>{\"a\": 1}<|call|>", HarmonyAnswer(None, "x\n{\"a\": 1}")),
    # no markup at all: content, whole
    ("Just text, < | not a tag", HarmonyAnswer("Just text, < | not a tag", None)),
    # a header that never opens a body is markup: dropped
    ("<|channel|>final<|message|>ok<|end|><|start|>assistant<|channel|>ana", HarmonyAnswer("ok", None)),
    ("", HarmonyAnswer(None, None)),
]


def _streamed(pieces: list[str]) -> tuple[str, str]:
    parser = HarmonyStreamParser()
    deltas = [parser.feed(piece) for piece in pieces] + [parser.finish()]
    return "".join(d.content for d in deltas), "".join(d.reasoning for d in deltas)


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_whole_answer(text: str, expected: HarmonyAnswer) -> None:
    assert parse_harmony(text) == expected


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_every_split_in_two_and_three_gives_the_whole_answer(text: str, expected: HarmonyAnswer) -> None:
    want = (expected.content or "", expected.reasoning_content or "")
    for i in range(len(text) + 1):
        assert _streamed([text[:i], text[i:]]) == want, i
    for i, j in itertools.combinations(range(len(text) + 1), 2):
        assert _streamed([text[:i], text[i:j], text[j:]]) == want, (i, j)


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_character_by_character(text: str, expected: HarmonyAnswer) -> None:
    assert _streamed(list(text)) == (expected.content or "", expected.reasoning_content or "")


def test_deltas_go_to_the_channel_being_written_as_they_come() -> None:
    parser = HarmonyStreamParser()
    delta = parser.feed("<|channel|>analysis<|message|>Thin")
    assert (delta.content, delta.reasoning) == ("", "Thin")
    delta = parser.feed("king<|e")
    assert (delta.content, delta.reasoning) == ("", "king")          # "<|e" may be <|end|>: held back
    delta = parser.feed("nd|><|start|>assistant<|channel|>final<|message|>Pa")
    assert (delta.content, delta.reasoning) == ("Pa", "")
    delta = parser.feed("ris<|return|>")
    assert (delta.content, delta.reasoning) == ("ris", "")
    assert parser.finish() == parser.finish().__class__()


def test_a_held_back_tag_prefix_that_is_no_tag_is_released_at_the_end() -> None:
    parser = HarmonyStreamParser()
    assert parser.feed("<|channel|>final<|message|>a <|").content == "a "
    assert parser.finish().content == "<|"


def test_only_the_gpt_oss_template_answers_in_harmony() -> None:
    assert uses_harmony("internvl3_5_gpt_oss")
    assert not uses_harmony("internvl2_5") and not uses_harmony("Hermes-2") and not uses_harmony(None)
