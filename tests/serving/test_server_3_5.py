"""InternVL3.5 dense (Qwen3) served: a real server on loopback with tiny-3_5-1B and the ``openai`` client.
The server renders the same prompt as the official ``chat`` (``internvl2_5`` template and system message), so
its greedy tokens are the official ones (goldens/tiny-3_5-1B/text_chat.json); its text skips special tokens
(OpenAI semantics) where the official ``chat`` of InternVL3.5 keeps them."""

from __future__ import annotations

import json

import openai
import pytest

from internvl_runtime.processing.tokenization import AutoTokenizer
from internvl_runtime.serving.config import ServerConfig
from paths import FIXTURES

from .helpers import data_url, png_bytes, run_server

CKPT = FIXTURES / "ckpt" / "tiny-3_5-1B"
MODEL = "tiny-3_5-1B"


@pytest.fixture(scope="module")
def client():
    config = ServerConfig(model=str(CKPT), max_model_len=4096, num_blocks=512, max_tiles_per_image=2, max_num_seqs=4)
    with run_server(config) as running, openai.OpenAI(base_url=running.base_url + "/v1", api_key="unused",
                                                      max_retries=0, timeout=60) as c:
        yield c


def test_text_answer_is_the_official_greedy_one(client) -> None:
    golden = json.loads((FIXTURES / "goldens" / MODEL / "text_chat.json").read_text(encoding="utf-8"))["rounds"][0]
    ids = golden["generated_ids"][0]
    tokenizer = AutoTokenizer.from_pretrained(CKPT)
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    expected = ids[:ids.index(stop)] if stop in ids else ids
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": golden["question"]}],
                                           temperature=0, max_tokens=len(ids))
    assert reply.usage.prompt_tokens == len(golden["input_ids"][0])
    assert reply.usage.completion_tokens == len(ids)
    assert reply.choices[0].message.content == tokenizer.decode(expected, skip_special_tokens=True)


def test_image_stream_equals_whole(client) -> None:
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "Describe the image."},
        {"type": "image_url", "image_url": {"url": data_url(png_bytes(64, 48, (220, 20, 20)))}}]}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=8)
    stream = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=8, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert whole.usage.prompt_tokens > 256                      # one tile of 256 image tokens and the text
    assert text == whole.choices[0].message.content
