"""Conversation templates and ``<image>`` expansion, against the official prompts of the goldens."""

from __future__ import annotations

import json

import pytest

from internvl_runtime.errors import ConfigError, InvalidRequest, PlaceholderMismatch
from internvl_runtime.processing.template import (
    IMAGE_PLACEHOLDER,
    IMG_CONTEXT_TOKEN,
    IMG_END_TOKEN,
    IMG_START_TOKEN,
    INTERNVL2_SYSTEM_MESSAGE,
    TEMPLATES,
    build_prompt,
    expand_image_placeholders,
    get_template,
    image_tokens,
)
from paths import FIXTURES

GOLDENS = FIXTURES / "goldens"
VARIANTS = ["tiny-1B", "tiny-2B", "tiny-4B", "tiny-8B", "tiny-26B", "tiny-40B", "tiny-76B"]
SYSTEM = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"


def _golden(variant: str, case: str = "text_two_round") -> dict:
    return json.loads((GOLDENS / variant / f"{case}.json").read_text(encoding="utf-8"))


def test_the_four_templates_exist() -> None:
    assert {"Hermes-2", "internlm2-chat", "phi3-chat", "internvl_zh"} <= set(TEMPLATES)   # and the successors'
    assert INTERNVL2_SYSTEM_MESSAGE == SYSTEM
    assert get_template("Hermes-2").sep == "<|im_end|>"
    assert get_template("internlm2-chat").sep == "<|im_end|>"
    assert get_template("phi3-chat").sep == "<|end|>"
    assert get_template("internvl_zh").sep == "</s>"


@pytest.mark.parametrize("variant", VARIANTS)
def test_one_and_two_rounds_match_goldens(variant: str) -> None:
    golden = _golden(variant)
    rounds = golden["rounds"]
    assert len(rounds) == 2
    first = build_prompt(golden["template"], rounds[0]["question"])
    assert first == rounds[0]["prompt"]
    history = [(rounds[0]["question"], rounds[0]["response"])]
    assert [list(h) for h in history] == [list(h) for h in rounds[0]["history"]]
    second = build_prompt(golden["template"], rounds[1]["question"], history)
    assert second == rounds[1]["prompt"]


@pytest.mark.parametrize("template", ["Hermes-2", "internlm2-chat"])
def test_chatml_prompt_literal(template: str) -> None:
    assert build_prompt(template, "Hi") == (
        f"<|im_start|>system\n{SYSTEM}<|im_end|><|im_start|>user\nHi<|im_end|><|im_start|>assistant\n")
    assert build_prompt(template, "Q2", [("Q1", "A1")]) == (
        f"<|im_start|>system\n{SYSTEM}<|im_end|><|im_start|>user\nQ1<|im_end|><|im_start|>assistant\nA1<|im_end|>"
        "<|im_start|>user\nQ2<|im_end|><|im_start|>assistant\n")


def test_phi3_prompt_literal() -> None:
    assert build_prompt("phi3-chat", "Q2", [("Q1", "A1")]) == (
        f"<|system|>\n{SYSTEM}<|end|><|user|>\nQ1<|end|><|assistant|>\nA1<|end|><|user|>\nQ2<|end|><|assistant|>\n")


def test_internvl_zh_one_and_two_rounds() -> None:
    """The reference INTERNVL_ZH style: system + sep2, then 'role: message' + (sep2 after the user,
    sep after the bot), a bare 'role:' to prompt the answer; an empty system message."""
    assert build_prompt("internvl_zh", "你好") == " <human>: 你好 <bot>:"
    assert build_prompt("internvl_zh", "Q2", [("Q1", "A1")]) == " <human>: Q1 <bot>: A1</s><human>: Q2 <bot>:"
    assert build_prompt("internvl_zh", "Q3", [("Q1", "A1"), ("Q2", "A2")]) == (
        " <human>: Q1 <bot>: A1</s><human>: Q2 <bot>: A2</s><human>: Q3 <bot>:")


def test_system_message_override() -> None:
    assert build_prompt("Hermes-2", "Hi", system_message="Be brief.").startswith(
        "<|im_start|>system\nBe brief.<|im_end|>")
    assert build_prompt("internvl_zh", "Hi", system_message="SYS") == "SYS <human>: Hi <bot>:"


def test_get_template_returns_independent_copies() -> None:
    a = get_template("Hermes-2")
    a.append_message(a.roles[0], "changed")
    a.system_message = "changed"
    b = get_template("Hermes-2")
    assert b.messages == [] and b.system_message == SYSTEM


@pytest.mark.parametrize("name", ["hermes-2", "chatml", "", "internvl2_5"])
def test_unknown_template(name: str) -> None:
    with pytest.raises(ConfigError, match="template"):
        get_template(name)
    with pytest.raises(ConfigError):
        build_prompt(name, "Hi")


# --------------------------------------------------------------------------------------------------
# <image> expansion
# --------------------------------------------------------------------------------------------------

def test_image_tokens_block() -> None:
    assert image_tokens(1, 256) == IMG_START_TOKEN + IMG_CONTEXT_TOKEN * 256 + IMG_END_TOKEN
    assert image_tokens(7, 256).count(IMG_CONTEXT_TOKEN) == 7 * 256
    assert image_tokens(3, 64).count(IMG_CONTEXT_TOKEN) == 192


def _blocks(prompt: str) -> list[int]:
    """<IMG_CONTEXT> count of each <img>...</img> block, in order."""
    out = []
    for part in prompt.split(IMG_START_TOKEN)[1:]:
        inner, sep, _ = part.partition(IMG_END_TOKEN)
        assert sep and inner == IMG_CONTEXT_TOKEN * (len(inner) // len(IMG_CONTEXT_TOKEN))
        out.append(inner.count(IMG_CONTEXT_TOKEN))
    return out


@pytest.mark.parametrize("tiles", [[1], [7], [13], [5, 1], [1, 7, 3]])
def test_expansion_counts_in_order(tiles: list[int]) -> None:
    question = " and ".join(f"Image-{i + 1}: {IMAGE_PLACEHOLDER}" for i in range(len(tiles)))
    prompt = build_prompt("Hermes-2", question + "\nCompare.")
    expanded = expand_image_placeholders(prompt, tiles, 256)
    assert IMAGE_PLACEHOLDER not in expanded
    assert _blocks(expanded) == [256 * n for n in tiles]
    assert expanded.count(IMG_CONTEXT_TOKEN) == 256 * sum(tiles)
    # the text around the placeholders is untouched
    for i in range(len(tiles)):
        assert f"Image-{i + 1}: {IMG_START_TOKEN}" in expanded


def test_expansion_includes_history() -> None:
    prompt = build_prompt("internlm2-chat", "And this one? <image>", [(f"{IMAGE_PLACEHOLDER}\nDescribe.", "A cat.")])
    expanded = expand_image_placeholders(prompt, [2, 5], 64)
    assert _blocks(expanded) == [128, 320]
    assert expanded.index("Describe.") < expanded.index("A cat.") < expanded.index("And this one?")


def test_expansion_matches_golden_image_prompts() -> None:
    """Every golden single-turn chat prompt with images is our template + expansion."""
    index = json.loads((GOLDENS / "index.json").read_text(encoding="utf-8"))
    checked = 0
    for variant in VARIANTS:
        for file in sorted((GOLDENS / variant).glob("*.json")):
            golden = json.loads(file.read_text(encoding="utf-8"))
            if "rounds" not in golden or not golden.get("image_tile_counts"):
                continue
            tiles = golden.get("num_patches_list_arg") or [sum(golden["image_tile_counts"])]
            history: list[tuple[str, str]] = []
            for record in golden["rounds"]:
                question = record["question"]
                if not history and IMAGE_PLACEHOLDER not in question:
                    question = IMAGE_PLACEHOLDER + "\n" + question
                prompt = build_prompt(golden["template"], question, history)
                n = prompt.count(IMAGE_PLACEHOLDER)
                if n != len(tiles):
                    break  # a case whose counts are only valid via chat()'s own logic; covered by goldens
                assert expand_image_placeholders(prompt, tiles, golden["num_image_token"]) == record["prompt"]
                history.append((question, record["response"]))
                checked += 1
    assert index and checked >= len(VARIANTS)


@pytest.mark.parametrize(("placeholders", "tiles"), [(1, []), (0, [1]), (2, [3]), (1, [1, 1]), (3, [1, 2])])
def test_placeholder_count_mismatch(placeholders: int, tiles: list[int]) -> None:
    prompt = build_prompt("Hermes-2", " ".join([IMAGE_PLACEHOLDER] * placeholders) + " What?")
    with pytest.raises(PlaceholderMismatch) as info:
        expand_image_placeholders(prompt, tiles, 256)
    assert isinstance(info.value, InvalidRequest) and isinstance(info.value, ValueError)
    assert str(placeholders) in str(info.value) and str(len(tiles)) in str(info.value)


def test_no_images_no_placeholders() -> None:
    prompt = build_prompt("phi3-chat", "Hello")
    assert expand_image_placeholders(prompt, [], 256) == prompt


# --------------------------------------------------------------------------------------------------
# InputProcessor.prepare: the official prompt unchanged, prefill, <IMAGE_TOKEN>, per-image tiles
# --------------------------------------------------------------------------------------------------

def _processor(variant: str):
    from internvl_runtime.processing.inputs import InputProcessor
    from internvl_runtime.processing.tokenization import AutoTokenizer

    golden = _golden(variant)
    return InputProcessor(AutoTokenizer.from_pretrained(FIXTURES / "ckpt" / variant), template=golden["template"],
                          image_size=448, num_image_token=golden["num_image_token"])


def _tiles(n: int):
    import torch

    return torch.zeros(n, 3, 448, 448)


@pytest.mark.parametrize("variant", VARIANTS)
def test_prepare_renders_the_golden_prompts_byte_for_byte(variant: str) -> None:
    """Messages through InputProcessor.prepare (no tools, no prefill, no Jinja) give the official prompts:
    a two-round text chat and a multi-round chat with an image (tiles as the golden counts)."""
    from internvl_runtime.processing.inputs import Message

    processor = _processor(variant)
    rounds = _golden(variant)["rounds"]
    messages = [Message("user", rounds[0]["question"]), Message("assistant", rounds[0]["response"]),
                Message("user", rounds[1]["question"])]
    assert processor.prepare(messages).prompt == rounds[1]["prompt"]
    image_case = _golden(variant, "multi_round_image")
    tiles = _tiles(sum(image_case["image_tile_counts"]))
    history: list = []
    for index, record in enumerate(image_case["rounds"]):
        question = record["question"].replace(IMAGE_PLACEHOLDER + "\n", "") if index == 0 else record["question"]
        history.append(Message("user", question, [tiles] if index == 0 else []))
        assert processor.prepare(history).prompt == record["prompt"]
        history.append(Message("assistant", record["response"]))


def test_prefill_and_no_generation_prompt() -> None:
    from internvl_runtime.processing.inputs import Message

    for variant, head in [("tiny-1B", "<|im_start|>assistant\n"), ("tiny-4B", "<|assistant|>\n")]:
        processor = _processor(variant)
        sep = processor.sep
        base = processor.prepare([Message("user", "Hi")]).prompt
        assert base.endswith(head)
        prefilled = processor.prepare([Message("user", "Hi"), Message("assistant", "Sure, here is")],
                                      continue_final_message=True)
        assert prefilled.prompt == base + "Sure, here is"          # no separator: the answer goes on
        # continue_final_message wins over add_generation_prompt (which defaults to True)
        assert processor.prepare([Message("user", "Hi"), Message("assistant", "Sure, here is")],
                                 continue_final_message=True, add_generation_prompt=True).prompt == prefilled.prompt
        closed = processor.prepare([Message("user", "Hi")], add_generation_prompt=False)
        assert closed.prompt == base[:-len(head)] and closed.prompt.endswith("Hi" + sep)
        done = processor.prepare([Message("user", "Hi"), Message("assistant", "Hello")], add_generation_prompt=False)
        assert done.prompt == base + "Hello" + sep
        with pytest.raises(InvalidRequest, match="continue_final_message"):
            processor.prepare([Message("user", "Hi")], continue_final_message=True)
        with pytest.raises(InvalidRequest, match="last message"):
            processor.prepare([Message("user", "Hi"), Message("assistant", "Hello")])
    zh = _processor("tiny-1B")
    zh.template = "internvl_zh"
    assert zh.prepare([Message("user", "Q"), Message("assistant", "A")], continue_final_message=True).prompt == (
        " <human>: Q <bot>: A")


def test_image_token_places_the_images() -> None:
    """LMDeploy's <IMAGE_TOKEN> marks where the images go (no automatic prefix), as <image> does."""
    from internvl_runtime.processing.inputs import Message

    processor = _processor("tiny-1B")
    marked = processor.prepare([Message("user", "Left <IMAGE_TOKEN> right <IMAGE_TOKEN> end", [_tiles(1), _tiles(2)])])
    same = processor.prepare([Message("user", "Left <image> right <image> end", [_tiles(1), _tiles(2)])])
    assert marked.prompt == same.prompt and marked.prompt_token_ids == same.prompt_token_ids
    assert "<IMAGE_TOKEN>" not in marked.prompt and "Image-1" not in marked.prompt
    assert "user\nLeft <img>" in marked.prompt and [s.length for s in marked.mm_spans] == [256, 512]
    prefixed = processor.prepare([Message("user", "Left right end", [_tiles(1), _tiles(2)])])
    assert "Image-1: <img>" in prefixed.prompt
    with pytest.raises(PlaceholderMismatch):
        processor.prepare([Message("user", "Only <IMAGE_TOKEN>", [_tiles(1), _tiles(1)])])
    # without images the text is left as it is
    assert "<IMAGE_TOKEN>" in processor.prepare([Message("user", "literal <IMAGE_TOKEN>")]).prompt


def test_per_image_max_dynamic_patch() -> None:
    from PIL import Image

    from internvl_runtime.processing.inputs import ImageWithTiles, Message

    processor = _processor("tiny-1B")
    picture = Image.new("RGB", (1600, 900), "green")
    default = processor.prepare([Message("user", "x", [picture, picture])])
    mixed = processor.prepare([Message("user", "x", [ImageWithTiles(picture, 1), picture])])
    capped = processor.prepare([Message("user", "x", [ImageWithTiles(picture, 1), picture])], max_num=2)
    assert [im.num_tiles for im in default.images] == [9, 9]           # 4 x 2 tiles, plus the thumbnail
    assert [im.num_tiles for im in mixed.images] == [1, 9]
    assert [im.num_tiles for im in capped.images] == [1, 3]            # the image's own limit wins over max_num
    assert len(mixed.prompt_token_ids) == len(default.prompt_token_ids) - 8 * 256
    with pytest.raises(InvalidRequest, match="max_dynamic_patch"):
        processor.prepare([Message("user", "x", [ImageWithTiles(picture, 0)])])
