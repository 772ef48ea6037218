"""``internvl serve`` on an HF-format folder (transformers' native InternVL: the tiny InternVL3-1B-hf and
InternVL3.5-1B-HF), with the OpenAI client on loopback: the answers are transformers' own (the HF goldens),
the prompt is the folder's chat template's (its token count), streamed and whole alike."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import openai
import pytest

from internvl_runtime.serving.config import ServerConfig
from paths import FIXTURES

from .helpers import RunningServer, run_server

VARIANTS = ["tiny-3-1B-hf", "tiny-3_5-1B-HF"]


def _golden(variant: str, case_id: str) -> dict:
    return json.loads((FIXTURES / "goldens" / variant / f"{case_id}.json").read_text(encoding="utf-8"))


def _image_part(ref: str) -> dict:
    data = base64.b64encode((FIXTURES / "data" / f"{ref}.png").read_bytes()).decode()
    return {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}


@pytest.fixture(scope="module", params=VARIANTS)
def variant(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def server(variant: str) -> Iterator[RunningServer]:
    config = ServerConfig(model=str(FIXTURES / "ckpt" / variant), max_model_len=8192, num_blocks=512, max_num_seqs=4)
    with run_server(config) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0, timeout=120) as c:
        yield c


def _model_name(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def test_image_answer_is_transformers_own(client: openai.OpenAI, variant: str) -> None:
    """One image (12 tiles at most: the folder's preprocessor_config.json) and a question: transformers' answer."""
    record = _golden(variant, "img_800x600_max12")["rounds"][0]
    response = client.chat.completions.create(
        model=_model_name(client), temperature=0, max_tokens=20,
        messages=[{"role": "user", "content": [_image_part("img_800x600"),
                                               {"type": "text", "text": "Please describe the image shortly."}]}])
    assert response.choices[0].message.content == record["responses"][0]
    assert response.usage.prompt_tokens == len(record["input_ids"][0])


def test_two_rounds_streamed(client: openai.OpenAI, variant: str) -> None:
    """A second round after the first answer (no system message: the folder's template has none), streamed."""
    golden = _golden(variant, "text_two_round")
    stream = client.chat.completions.create(
        model=_model_name(client), temperature=0, max_tokens=20, stream=True,
        messages=[{"role": "user", "content": "Hello, who are you?"},
                  {"role": "assistant", "content": golden["rounds"][0]["responses"][0]},
                  {"role": "user", "content": "Can you tell me a story?"}])
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == golden["rounds"][1]["responses"][0]
