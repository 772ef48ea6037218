"""LMDeploy's clients: the exact JSON its ``APIClient.chat_completions_v1`` posts by default, and the InternVL
requests LMDeploy documents (per-image ``max_dynamic_patch``, ``<IMAGE_TOKEN>`` placeholders).

LMDeploy is not installed (it brings CUDA engines); its request is reproduced field for field from
``lmdeploy/serve/openai/api_client.py`` (v0.16): the method posts ``locals()`` of its call, so every keyword
parameter is sent with its default, ``"kwargs": {}`` included, through ``requests.post(json=...)``.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import httpx
import pytest

from internvl_runtime.config import InternVLConfig
from internvl_runtime.processing.inputs import InputProcessor, Message
from internvl_runtime.processing.tokenization import AutoTokenizer
from paths import FIXTURES
from serving.helpers import TINY_1B, data_url, png_bytes

from .conftest import API_KEY

#: ``max_tokens`` is null in LMDeploy's default request: the server's default applies; kept small here.
SERVER_OPTIONS = {"default_max_tokens": 16}

#: LMDeploy's ``IMAGE_TOKEN`` (lmdeploy/vl/constants.py): where the user wants each image in the text.
IMAGE_TOKEN = "<IMAGE_TOKEN>"
TILE_TOKENS = 256   # image tokens per 448x448 tile for InternVL2 (tiny-1B included)


def api_client_body(model: str, messages, *, stream: bool = False) -> dict:
    """What ``APIClient(url).chat_completions_v1(model=model, messages=messages, stream=stream)`` posts."""
    return {
        "model": model, "messages": messages, "temperature": 0.7, "top_p": 1.0, "logprobs": False,
        "top_logprobs": 0, "n": 1, "max_completion_tokens": None, "max_tokens": None, "stop": None,
        "stream": stream, "presence_penalty": 0.0, "frequency_penalty": 0.0, "user": None,
        "repetition_penalty": 1.0, "ignore_eos": False, "skip_special_tokens": True,
        "spaces_between_special_tokens": True, "top_k": 40, "min_new_tokens": None, "min_p": 0.0,
        "logit_bias": None, "stream_options": None, "kwargs": {},
    }


def post(server, body: dict) -> httpx.Response:
    """As ``APIClient`` posts: JSON body, content-type and bearer headers."""
    headers = {"content-type": "application/json", "Authorization": f"Bearer {API_KEY}"}
    return httpx.post(server.base_url + "/v1/chat/completions", content=json.dumps(body), headers=headers,
                      timeout=120)


@pytest.fixture(scope="module")
def processor():
    """An InputProcessor of our own: the prompt LMDeploy's placeholders must produce, counted independently."""
    config = InternVLConfig.from_pretrained(TINY_1B)
    return InputProcessor.for_model(SimpleNamespace(config=config), AutoTokenizer.from_pretrained(TINY_1B))


def test_api_client_default_request(server, model):
    response = post(server, api_client_body(model, [{"role": "user", "content": "Hello, who are you?"}]))
    assert response.status_code == 200, response.text
    answer = response.json()
    choice = answer["choices"][0]
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    assert answer["usage"]["completion_tokens"] <= 16
    assert choice.get("logprobs") is None         # logprobs false, top_logprobs 0: none asked for


def test_api_client_default_request_streamed(server, model):
    body = api_client_body(model, [{"role": "user", "content": "Hello, who are you?"}], stream=True)
    headers = {"content-type": "application/json", "Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", content=json.dumps(body), headers=headers,
                      timeout=120) as response:
        assert response.status_code == 200, response.read().decode()
        lines = [line for line in response.iter_lines() if line]
    # As APIClient reads them: skip [DONE], strip "data: ", parse JSON.
    outputs = [json.loads(line[6:]) for line in lines if line != "data: [DONE]"]
    assert outputs and all(output["object"] == "chat.completion.chunk" for output in outputs)
    assert outputs[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_api_client_string_messages(server, model):
    """``chat_completions_v1`` documents ``messages`` as a chat history or a plain string prompt."""
    response = post(server, api_client_body(model, "Hello, who are you?"))
    assert response.status_code == 200, response.text
    assert isinstance(response.json()["choices"][0]["message"]["content"], str)


def internvl_request(model: str, text: str, images: list[bytes], max_dynamic_patch: int) -> dict:
    """LMDeploy's documented InternVL request (docs/en/multi_modal/internvl.md): the text with
    ``<IMAGE_TOKEN>`` placeholders, then the images, each with its own ``max_dynamic_patch``."""
    content = [{"type": "text", "text": text}]
    content += [{"type": "image_url", "image_url": {"max_dynamic_patch": max_dynamic_patch, "url": data_url(image)}}
                for image in images]
    return api_client_body(model, [{"role": "user", "content": content}]) | {"max_tokens": 4}


@pytest.mark.parametrize("max_dynamic_patch", [1, 6])
def test_max_dynamic_patch_per_image(server, model, processor, max_dynamic_patch):
    wide = png_bytes(896, 448, noise=True)   # 2:1: one tile at 1; two tiles and a thumbnail at 6
    text = f"{IMAGE_TOKEN}\nDescribe this image."
    response = post(server, internvl_request(model, text, [wide], max_dynamic_patch))
    assert response.status_code == 200, response.text
    expected = processor.prepare([Message("user", "<image>\nDescribe this image.", images=[wide])],
                                 max_num=max_dynamic_patch)
    assert response.json()["usage"]["prompt_tokens"] == len(expected.prompt_token_ids)


def test_max_dynamic_patch_changes_the_prompt(server, model):
    wide = png_bytes(896, 448, noise=True)
    counts = {}
    for patches in (1, 6):
        response = post(server, internvl_request(model, f"{IMAGE_TOKEN}\nDescribe this image.", [wide], patches))
        assert response.status_code == 200, response.text
        counts[patches] = response.json()["usage"]["prompt_tokens"]
    assert counts[6] - counts[1] == 2 * TILE_TOKENS


@pytest.mark.parametrize("label", ["Image-{}: ", "Frame{}: "])
def test_image_token_placeholders_place_the_images(server, model, processor, label):
    """Documented forms: ``Image-1: <IMAGE_TOKEN>\\nImage-2: <IMAGE_TOKEN>\\n...`` for separate images and
    ``Frame1: <IMAGE_TOKEN>\\n...`` (8 frames, max_dynamic_patch 1) for a video; the images go where the
    placeholders are, and no placeholder is left as text."""
    count = 2 if label.startswith("Image") else 8
    frames = [(FIXTURES / "data" / f"frame_{i * 4:03d}.png").read_bytes() for i in range(count)]
    lines = "".join(f"{label.format(i + 1)}{IMAGE_TOKEN}\n" for i in range(count))
    response = post(server, internvl_request(model, lines + "What happens here?", frames, 1))
    assert response.status_code == 200, response.text
    native = "".join(f"{label.format(i + 1)}<image>\n" for i in range(count)) + "What happens here?"
    expected = processor.prepare([Message("user", native, images=frames)], max_num=1)
    assert response.json()["usage"]["prompt_tokens"] == len(expected.prompt_token_ids)
