"""The OpenAI-compatible server on the GPT-OSS tiny variant (tiny-3_5-20B-A4B), with the real ``openai``
client on loopback: the prompt the server renders is the official internvl3_5_gpt_oss prompt, and greedy
answers are the official code's tokens (text and image, streamed and not)."""

from __future__ import annotations

import json

import openai
import pytest

from internvl_runtime.processing.harmony import parse_harmony
from internvl_runtime.processing.tokenization import AutoTokenizer
from internvl_runtime.serving.config import ServerConfig
from paths import FIXTURES

from .helpers import data_url, run_server

CKPT = FIXTURES / "ckpt" / "tiny-3_5-20B-A4B"
GOLDENS = FIXTURES / "goldens" / "tiny-3_5-20B-A4B"


@pytest.fixture(scope="module")
def server():
    config = ServerConfig(model=str(CKPT), max_model_len=4096, num_blocks=512, max_num_seqs=4)
    with run_server(config) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def _golden(case_id: str) -> dict:
    return json.loads((GOLDENS / f"{case_id}.json").read_text(encoding="utf-8"))["rounds"][0]


def _expected_text(ids: list[int]) -> str:
    """The official greedy ids up to the stop token <|return|>, as the server's content: the text with the
    special tokens kept, read as harmony (processing.harmony; this random model writes no channel header, so
    its text is content, a stray ``<|end|>`` ending one message)."""
    tokenizer = AutoTokenizer.from_pretrained(CKPT)
    stop = tokenizer.convert_tokens_to_ids("<|return|>")
    text = tokenizer.decode(ids[:ids.index(stop)] if stop in ids else ids, skip_special_tokens=False,
                            spaces_between_special_tokens=False)
    content = parse_harmony(text).content
    assert content is not None
    return content


def test_text_chat_equals_official(server, client) -> None:
    record = _golden("text_chat")
    messages = [{"role": "user", "content": record["question"]}]
    reply = client.chat.completions.create(model="tiny-3_5-20B-A4B",
                                           messages=messages, temperature=0, max_tokens=20)
    assert reply.usage.prompt_tokens == len(record["input_ids"][0])
    assert reply.usage.completion_tokens == len(record["generated_ids"][0])
    assert reply.choices[0].message.content == _expected_text(record["generated_ids"][0])
    stream = client.chat.completions.create(model=reply.model, messages=messages, temperature=0, max_tokens=20,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == reply.choices[0].message.content


def test_image_chat_equals_official(server, client) -> None:
    record = _golden("img_800x600_max1")
    image = (FIXTURES / "data" / "img_800x600.png").read_bytes()
    question = record["question"].removeprefix("<image>\n")
    reply = client.chat.completions.create(
        model="tiny-3_5-20B-A4B", temperature=0, max_tokens=20,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                               {"type": "text", "text": question}]}],
        extra_body={"max_dynamic_patch": 1})
    assert reply.usage.prompt_tokens == len(record["input_ids"][0])
    assert reply.choices[0].message.content == _expected_text(record["generated_ids"][0])
