"""The OpenAI-compatible server on the Qwen3-MoE variant (tiny-3_5-30B-A3B): a real server on loopback, the openai
client, a text and an image question; greedy answers equal the official API's ``chat`` on the same model."""

from __future__ import annotations

import openai
import torch

from internvl_runtime import AutoModel, AutoTokenizer, load_image
from internvl_runtime.serving.config import ServerConfig
from paths import FIXTURES

from .helpers import data_url, run_server

CKPT = FIXTURES / "ckpt" / "tiny-3_5-30B-A3B"
IMAGE = FIXTURES / "data" / "img_640x427.png"


def test_served_greedy_answers_equal_the_official_chat() -> None:
    model = AutoModel.from_pretrained(CKPT, torch_dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(CKPT)
    generation = {"max_new_tokens": 8, "do_sample": False}
    text_answer = model.chat(tokenizer, None, "Hello, who are you?", dict(generation))
    pixels = load_image(IMAGE, input_size=448, max_num=12)
    image_answer = model.chat(tokenizer, pixels, "<image>\nWhat is in the image?", dict(generation))

    config = ServerConfig(model=str(CKPT), device="cpu", dtype="float32", num_blocks=256, max_model_len=4096)
    with run_server(config) as server, openai.OpenAI(base_url=server.base_url + "/v1", api_key="x",
                                                     max_retries=0, timeout=120) as client:
        assert [m.id for m in client.models.list().data] == [config.model_name]
        text = client.chat.completions.create(model=config.model_name, max_tokens=8, temperature=0,
                                              messages=[{"role": "user", "content": "Hello, who are you?"}])
        image = client.chat.completions.create(
            model=config.model_name, max_tokens=8, temperature=0,
            messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": data_url(IMAGE.read_bytes())}},
                {"type": "text", "text": "What is in the image?"}]}])
    assert text.choices[0].message.content == text_answer
    assert image.choices[0].message.content == image_answer
    assert text.usage is not None and text.usage.completion_tokens == 8
    assert image.usage is not None and image.usage.prompt_tokens > 256 * 2          # the image's tiles are in
