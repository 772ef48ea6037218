"""The OpenAI-compatible server on an InternVL2.5 checkpoint (tiny-2_5-1B: Qwen2.5, the internvl2_5
template), with the real ``openai`` client: the prompt the server builds and the greedy answer it streams
or returns are the official implementation's (the goldens of tests/fixtures/goldens/tiny-2_5-1B)."""

from __future__ import annotations

import json

import openai
import pytest

from internvl_runtime.serving.config import ServerConfig
from paths import FIXTURES

from .helpers import data_url, run_server

CKPT = FIXTURES / "ckpt" / "tiny-2_5-1B"
GOLDENS = FIXTURES / "goldens" / "tiny-2_5-1B"
MODEL = "tiny-2_5-1B"


def _golden(case: str) -> dict:
    return json.loads((GOLDENS / f"{case}.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def client():
    # one tile per image, as the golden case img_800x600_max1 (max_num=1)
    config = ServerConfig(model=str(CKPT), max_model_len=2048, num_blocks=256, max_tiles_per_image=1, max_num_seqs=4)
    with run_server(config) as server, openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused",
                                                     max_retries=0, timeout=60) as c:
        yield c


def _completion(client, content, *, stream: bool = False) -> tuple[str, int | None, str | None]:
    """(text, prompt tokens, finish reason) of a greedy answer of at most 20 tokens, as the goldens."""
    messages = [{"role": "user", "content": content}]
    if not stream:
        result = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=20)
        return result.choices[0].message.content, result.usage.prompt_tokens, result.choices[0].finish_reason
    chunks = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=20,
                                            stream=True, stream_options={"include_usage": True})
    text, usage, finish = "", None, None
    for chunk in chunks:
        if chunk.usage is not None:
            usage = chunk.usage.prompt_tokens
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return text, usage, finish


@pytest.mark.parametrize("stream", [False, True])
def test_text_answer_is_the_official_one(client, stream: bool) -> None:
    record = _golden("text_chat")["rounds"][0]
    text, prompt_tokens, finish = _completion(client, record["question"], stream=stream)
    assert prompt_tokens == len(record["input_ids"][0])
    assert text.strip() == record["response"]
    assert finish == "length"   # 20 tokens, no <|im_end|> among them (random weights)


def test_image_answer_is_the_official_one(client) -> None:
    golden = _golden("img_800x600_max1")
    record = golden["rounds"][0]
    image = data_url((FIXTURES / "data" / "img_800x600.png").read_bytes())
    question = record["question"].removeprefix("<image>\n")
    text, prompt_tokens, _ = _completion(client, [{"type": "image_url", "image_url": {"url": image}},
                                                  {"type": "text", "text": question}])
    assert prompt_tokens == len(record["input_ids"][0])
    assert text.strip() == record["response"]


def test_answer_stops_at_im_end(client) -> None:
    """The answer ends at ``<|im_end|>`` (the template's separator ``<|im_end|>\\n`` stripped, as the official
    chat's eos): a logit bias that makes it the first token gives an empty answer that finished by "stop"."""
    config = json.loads((CKPT / "tokenizer_config.json").read_text(encoding="utf-8"))
    im_end = next(int(i) for i, t in config["added_tokens_decoder"].items() if t["content"] == "<|im_end|>")
    result = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], temperature=0,
                                            max_tokens=20, logit_bias={str(im_end): 100})
    assert result.choices[0].finish_reason == "stop"
    assert result.choices[0].message.content == ""
    assert result.usage.completion_tokens == 1
