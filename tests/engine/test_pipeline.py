"""The LMDeploy-style pipeline runs every case of the official quick start on the engine."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from internvl_runtime import GenerationConfig, Video, pipeline
from internvl_runtime.api.pipeline import to_messages
from internvl_runtime.errors import InvalidRequest
from paths import FIXTURES

SHARED = FIXTURES
IMAGE1 = SHARED / "data" / "img_800x600.png"
IMAGE2 = SHARED / "data" / "img_300x1200.png"
GREEDY = GenerationConfig(max_new_tokens=8)


@pytest.fixture(scope="module")
def pipe():
    return pipeline(SHARED / "ckpt" / "tiny-1B", num_blocks=1024)


def test_pure_text_and_single_image(pipe) -> None:
    text = pipe("Hello, who are you?", GREEDY)
    assert text.generate_token_len >= 1 and text.input_token_len > 10
    image = pipe(("describe this image", IMAGE1), GREEDY)
    assert image.input_token_len > 256                      # the image's context tokens are in the prompt
    same = pipe(("describe this image", Image.open(IMAGE1)), GREEDY)
    assert same.token_ids == image.token_ids                 # a path and a PIL image are the same input


def test_image_matches_the_official_chat(pipe) -> None:
    from internvl_runtime import AutoModel, AutoTokenizer, load_image

    path = SHARED / "ckpt" / "tiny-1B"
    model, tokenizer = AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    pixel_values = load_image(IMAGE1, max_num=12)
    official = model.chat(tokenizer, pixel_values, "<image>\nPlease describe the image shortly.",
                          dict(max_new_tokens=8, do_sample=False))
    ours = pipe(("<image>\nPlease describe the image shortly.", IMAGE1), GenerationConfig(max_new_tokens=8))
    assert ours.text.strip() == official


def test_multi_round_session_reuses_the_prefix(pipe) -> None:
    sess = pipe.chat(("Please describe the image in detail.", IMAGE1), gen_config=GREEDY)
    first = sess.response
    before = pipe.engine.stats["vision_tiles_encoded"]
    sess = pipe.chat("Please write a poem according to the image.", session=sess, gen_config=GREEDY)
    assert len(sess.history) == 2
    assert pipe.engine.stats["vision_tiles_encoded"] == before
    assert first is not None and sess.response is not None


def test_multi_image_batch_video_and_messages(pipe) -> None:
    combined = pipe(("Describe the two images in detail.", [IMAGE1, IMAGE2]), GREEDY)
    assert combined.generate_token_len >= 1
    batch = pipe([("Describe the image in detail.", IMAGE1), ("Describe the image in detail.", IMAGE2)], GREEDY)
    assert len(batch) == 2 and [r.index for r in batch] == [0, 1]
    video = pipe(("What is the red panda doing?", Video(SHARED / "data" / "video.mp4", num_segments=8)), GREEDY)
    assert video.input_token_len > 8 * 256
    data_url = "data:image/png;base64," + base64.b64encode(IMAGE1.read_bytes()).decode()
    messages = [{"role": "user", "content": [{"type": "text", "text": "describe"},
                                             {"type": "image_url", "image_url": {"url": data_url}}]}]
    assert pipe(messages, GREEDY).token_ids == pipe(("describe", IMAGE1), GREEDY).token_ids


def test_stream_infer_pieces_add_up(pipe) -> None:
    full = pipe(("describe this image", IMAGE1), GREEDY)
    pieces = list(pipe.stream_infer(("describe this image", IMAGE1), gen_config=GREEDY))
    assert "".join(p.text for p in pieces) == full.text
    assert pieces[-1].finish_reason is not None


def test_bad_prompts(pipe) -> None:
    with pytest.raises(InvalidRequest):
        pipe(42)
    with pytest.raises(InvalidRequest):
        pipe([{"role": "user", "content": [{"type": "audio", "audio": "x"}]}])
    with pytest.raises(InvalidRequest):
        pipe(("a", IMAGE1), [GREEDY, GREEDY])
    assert pipe("still serving", GREEDY).generate_token_len >= 1


def test_chat_messages_parse_with_the_servers_models() -> None:
    """The pipeline reads OpenAI messages with processing.chat_messages, the server's models: the same
    parts, the same strictness, plus LMDeploy's {"type": "image"} parts."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    picture = Image.new("RGB", (8, 8), "blue")
    messages = to_messages([
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Compare"},
                                     {"type": "image_url", "image_url": {"url": url}},
                                     {"type": "image", "image": picture}]},
    ])
    assert [m.role for m in messages] == ["system", "user"]
    assert messages[1].text == "Compare" and messages[1].images == [buffer.getvalue(), picture]
    for bad, words in [({"role": "user", "content": [{"type": "audio", "audio": "x"}]}, "content"),
                       ({"role": "user", "content": 5}, "content"),
                       ({"role": "robot", "content": "hi"}, "role")]:
        with pytest.raises(InvalidRequest, match=words):
            to_messages([bad])
    assert to_messages([{"role": "user", "content": "hi", "cache_control": {}}])[0].text == "hi"   # extras ignored


def test_per_image_max_dynamic_patch_and_image_token(pipe) -> None:
    """LMDeploy's InternVL requests: ``image_url.max_dynamic_patch`` per image (1 tile vs 12 changes the prompt
    tokens) and ``<IMAGE_TOKEN>`` placing the images in the text (not as a prefix)."""
    url = "data:image/png;base64," + base64.b64encode(IMAGE1.read_bytes()).decode()

    def ask(text: str, *limits: int | None) -> object:
        parts: list[dict] = [{"type": "text", "text": text}]
        for limit in limits:
            image_url = {"url": url} if limit is None else {"url": url, "max_dynamic_patch": limit}
            parts.append({"type": "image_url", "image_url": image_url})
        return pipe([{"role": "user", "content": parts}], GenerationConfig(max_new_tokens=1))

    one, twelve, default = ask("describe", 1), ask("describe", 12), ask("describe", None)
    # 800x600 with 12 tiles: 4 x 3 + the thumbnail; with 1 tile: one, no thumbnail
    assert twelve.input_token_len - one.input_token_len == 12 * 256
    assert default.input_token_len == twelve.input_token_len
    assert ask("Compare <IMAGE_TOKEN> with <IMAGE_TOKEN>.", 1, None).generate_token_len == 1
    parts = [{"type": "text", "text": "Compare <IMAGE_TOKEN> with <IMAGE_TOKEN>."},
             {"type": "image_url", "image_url": {"url": url, "max_dynamic_patch": 1}},
             {"type": "image_url", "image_url": {"url": url}}]
    prepared = pipe.engine.processor.prepare(to_messages([{"role": "user", "content": parts}]))
    assert "user\nCompare <img>" in prepared.prompt and "</img> with <img>" in prepared.prompt
    assert "Image-1" not in prepared.prompt and "<IMAGE_TOKEN>" not in prepared.prompt
    assert [span.length for span in prepared.mm_spans] == [256, 13 * 256]
    # the same through the request-wide GenerationConfig.max_dynamic_patch and a tuple prompt with the token
    tuple_prompt = pipe(("<IMAGE_TOKEN>\ndescribe", IMAGE1), GenerationConfig(max_new_tokens=1, max_dynamic_patch=1))
    assert tuple_prompt.input_token_len == one.input_token_len
    with pytest.raises(InvalidRequest, match="max_dynamic_patch"):
        ask("describe", 0)


def test_tool_messages_in_the_pipeline(pipe) -> None:
    """Assistant tool calls and tool results render in the model's format (Hermes-2 for the 1B)."""
    messages = [{"role": "user", "content": "Weather in Rome?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_weather",
                                                                  "arguments": '{"city": "Rome"}'}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    prepared = pipe.engine.processor.prepare(to_messages(messages))
    assert prepared.prompt.endswith(
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
        "<|im_end|><|im_start|>tool\n<tool_response>\nsunny\n</tool_response><|im_end|><|im_start|>assistant\n")
    assert pipe(messages, GREEDY).generate_token_len >= 1
    with pytest.raises(InvalidRequest, match="tool"):
        to_messages([{"role": "tool", "content": "x", "extra": 1}])


def test_response_format_in_lmdeploys_shapes(pipe) -> None:
    import json
    import re

    import jsonschema

    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                               "rain": {"type": "boolean"}},
              "required": ["city", "rain"], "additionalProperties": False}
    answer = pipe(("What is the weather here? Answer in JSON.", IMAGE1),
                  GenerationConfig(max_new_tokens=128, response_format={
                      "type": "json_schema", "json_schema": {"name": "weather", "schema": schema}}))
    jsonschema.validate(json.loads(answer.text), schema)
    assert answer.finish_reason == "stop"
    code = {"type": "regex_schema", "regex_schema": "[A-F]{3}-\\d"}
    sampled = pipe("A code?", GenerationConfig(max_new_tokens=32, do_sample=True, temperature=1.2, random_seed=3,
                                               response_format=code))
    assert re.fullmatch(r"[A-F]{3}-\d", sampled.text)
    obj = pipe("Any JSON object.", GenerationConfig(max_new_tokens=256, response_format={"type": "json_object"}))
    assert obj.finish_reason == "stop" and isinstance(json.loads(obj.text), dict)
    with pytest.raises(InvalidRequest):
        pipe("x", GenerationConfig(response_format={"type": "regex_schema", "regex_schema": "(oops"}))
