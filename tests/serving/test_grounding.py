"""The ``grounding`` extension of /v1/chat/completions: the <ref>/<box> regions of each answer, in pixels of the
request's last image, on the choice (a stream: on each choice's final chunk); absent unless asked.

A random-weight model writes no boxes, so the real engine is given a sampler that picks the tokens of a known
grounding answer, as a trained model writes it: ``<ref>``, ``</ref>``, ``<box>``, ``</box>`` are the
checkpoint's special tokens (ids 708-711 in tiny-1B), the rest ordinary text, then the template's stop token.
Everything else (the route, the engine, the detokenizer) runs as served."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import httpx
import pytest
import torch

from internvl_runtime import AutoTokenizer, Grounding
from internvl_runtime.engine.async_engine import AsyncEngine
from internvl_runtime.engine.engine import EngineConfig, LLMEngine
from internvl_runtime.engine.sampler import Sampler, SamplerOutput, SamplingRow
from internvl_runtime.loading import load_model
from internvl_runtime.serving.config import ServerConfig

from .helpers import MODEL, data_url, png_bytes, run_server

README = Path(__file__).resolve().parents[2] / "README.md"
ANSWER = ("<ref>two dogs</ref><box>[[100, 200, 300, 400], [500, 0, 1000, 1000]]</box> and "
          "<ref>a cat</ref><box>[[0, 500, 250, 750]]</box>")
#: The content with the special tokens skipped (the default, as the official ``chat``).
PLAIN = "two dogs[[100, 200, 300, 400], [500, 0, 1000, 1000]] and a cat[[0, 500, 250, 750]]"
#: The last image is 640 x 480: x * 640 / 1000, y * 480 / 1000, truncated as the official demo.
PIXELS = [{"ref": "two dogs", "boxes": [[64, 96, 192, 192], [320, 0, 640, 480]], "image_index": 1},
          {"ref": "a cat", "boxes": [[0, 240, 160, 360]], "image_index": 1}]


class _ScriptedSampler(Sampler):
    """Samples as usual, then replaces each row's token by the next one of ``script`` (the answer's ids and
    the stop id): every request answers the script."""

    def __init__(self, script: list[int]) -> None:
        self.script = script

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:  # type: ignore[override]
        out = super().__call__(logits, rows)
        for i, row in enumerate(rows):
            out.token_ids[i] = self.script[min(row.num_output_tokens, len(self.script) - 1)]
        return out


@pytest.fixture(scope="module")
def server(tiny_1b):
    config = ServerConfig(model=str(tiny_1b), max_model_len=4096, num_blocks=256, max_num_seqs=2)

    def loader() -> AsyncEngine:
        tokenizer = AutoTokenizer.from_pretrained(tiny_1b)
        script = [*tokenizer.encode(ANSWER, add_special_tokens=False), tokenizer.convert_tokens_to_ids("<|im_end|>")]
        assert {708, 709, 710, 711} <= set(script)          # the tags are the special tokens, as trained
        llm = LLMEngine(load_model(tiny_1b), tokenizer, EngineConfig(**config.engine_kwargs()),
                        sampler=_ScriptedSampler(script))
        return AsyncEngine(llm)

    with run_server(config, loader=loader) as running:
        yield running


def _body(**extra) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": data_url(png_bytes(100, 50)), "max_dynamic_patch": 1}},
             {"type": "image_url", "image_url": {"url": data_url(png_bytes(640, 480)), "max_dynamic_patch": 1}},
             {"type": "text", "text": "Please provide the bounding box coordinate of the region this sentence "
                                      "describes: <ref>the animals</ref>"}]
    return {"model": MODEL, "max_tokens": 200, "temperature": 0,
            "messages": [{"role": "user", "content": parts}], **extra}


def _post(server, body: dict) -> httpx.Response:
    return httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=300)


def test_grounding_in_pixels_of_the_last_image(server) -> None:
    response = _post(server, _body(grounding=True))
    assert response.status_code == 200, response.text
    [choice] = response.json()["choices"]
    assert choice["message"]["content"] == PLAIN        # the tags are special tokens: skipped in the content
    assert choice["grounding"] == PIXELS                # read from the answer's tokens, tags kept


def test_with_special_tokens_kept_the_content_shows_the_tags(server) -> None:
    response = _post(server, _body(grounding=True, skip_special_tokens=False))
    assert response.status_code == 200, response.text
    [choice] = response.json()["choices"]
    assert choice["message"]["content"] == ANSWER
    assert choice["grounding"] == PIXELS


def test_every_choice_carries_its_own(server) -> None:
    response = _post(server, _body(grounding=True, n=2))
    assert response.status_code == 200, response.text
    choices = response.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    assert [c["grounding"] for c in choices] == [PIXELS, PIXELS]


def test_absent_unless_asked(server) -> None:
    for extra in ({}, {"grounding": False}, {"grounding": None}):
        response = _post(server, _body(**extra))
        assert response.status_code == 200, response.text
        [choice] = response.json()["choices"]
        assert choice["message"]["content"] == PLAIN
        assert "grounding" not in choice


def _streamed_choices(server, body: dict) -> list[dict]:
    chunks = []
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body, timeout=300) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[len("data: "):]))
    return [choice for chunk in chunks for choice in chunk["choices"]]


def test_streamed_final_chunk_carries_it(server) -> None:
    assert all("grounding" not in c for c in _streamed_choices(server, _body(stream=True)))
    choices = _streamed_choices(server, _body(grounding=True, stream=True))
    assert "".join(c["delta"].get("content") or "" for c in choices) == PLAIN
    assert choices[-1]["finish_reason"] is not None
    assert choices[-1]["grounding"] == PIXELS
    assert all("grounding" not in c for c in choices[:-1])


def test_without_an_image_the_coordinates_stay_raw(server) -> None:
    body = _body(grounding=True)
    body["messages"] = [{"role": "user", "content": "Where are the animals?"}]
    response = _post(server, body)
    assert response.status_code == 200, response.text
    [choice] = response.json()["choices"]
    assert choice["grounding"] == [
        {"ref": "two dogs", "boxes": [[100, 200, 300, 400], [500, 0, 1000, 1000]], "image_index": None},
        {"ref": "a cat", "boxes": [[0, 500, 250, 750]], "image_index": None}]


def test_grounding_must_be_a_boolean(server) -> None:
    response = _post(server, _body(grounding="yes"))
    assert response.status_code == 400
    assert "grounding" in response.text


def test_readme_grounding_example_runs(server, capsys) -> None:
    text = README.read_text(encoding="utf-8")
    start = text.index("## Grounding")
    code = re.search(r"```python\n(.*?)```", text[start:text.index("\n## ", start + 1)], re.DOTALL).group(1)
    assert "http://127.0.0.1:23333/v1" in code
    exec(compile(code.replace("http://127.0.0.1:23333", server.base_url), "README.md", "exec"), {})
    content, field, parsed = capsys.readouterr().out.splitlines()
    assert content == ANSWER
    pixels = [{**region, "image_index": 0} for region in PIXELS]      # the snippet's one image is 640 x 480
    assert ast.literal_eval(field) == pixels
    assert parsed == repr([Grounding(ref=r["ref"], boxes=r["boxes"]) for r in pixels])
