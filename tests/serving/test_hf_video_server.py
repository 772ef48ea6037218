"""``video_url`` on an HF-format folder (``tiny-3_5-1B-HF``): the server samples the clip as transformers' InternVL
video processor does (``processing.hf_video``), not as the official ``load_video``; its answer is the engine's on
exactly those decoded frames, and the prompt has transformers' token count (the HF video golden's)."""

from __future__ import annotations

import base64
import json

import httpx
import pytest

from internvl_runtime.engine.engine import LLMEngine
from internvl_runtime.engine.sampling_params import SamplingParams
from internvl_runtime.processing import hf_video
from internvl_runtime.processing.inputs import Message
from internvl_runtime.processing.video import get_index, sample_frames
from internvl_runtime.serving.config import ServerConfig
from paths import FIXTURES

from .helpers import run_server

pytest.importorskip("av")

CKPT = FIXTURES / "ckpt" / "tiny-3_5-1B-HF"
VIDEO = FIXTURES / "data" / "video.mp4"
QUESTION = "What is happening in the video?"


def test_hf_video_url_samples_frames_as_transformers() -> None:
    golden = json.loads((FIXTURES / "goldens" / "tiny-3_5-1B-HF" / "video_8_frames.json").read_text(encoding="utf-8"))
    engine = LLMEngine.from_pretrained(CKPT, num_blocks=512)

    def engine_answer(rule) -> str:
        frames = list(sample_frames(VIDEO, num_segments=8, rule=rule).frames)
        prepared = engine.processor.prepare([Message("user", QUESTION, images=frames, is_video=True)])
        return engine.generate([prepared], SamplingParams(max_new_tokens=20, temperature=0))[0].text

    expected, official = engine_answer(hf_video.frame_indices), engine_answer(get_index)
    assert expected != official           # the two frame choices are told apart by the answer
    url = "data:video/mp4;base64," + base64.b64encode(VIDEO.read_bytes()).decode()
    config = ServerConfig(model=str(CKPT), max_model_len=8192, num_blocks=512, max_num_seqs=2, max_video_frames=8)
    with run_server(config) as server:
        response = httpx.post(server.base_url + "/v1/chat/completions", timeout=120, json={
            "model": httpx.get(server.base_url + "/v1/models").json()["data"][0]["id"], "max_tokens": 20,
            "temperature": 0, "messages": [{"role": "user", "content": [
                {"type": "video_url", "video_url": {"url": url, "num_segments": 8}},
                {"type": "text", "text": QUESTION}]}]})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == expected
    assert response.json()["usage"]["prompt_tokens"] == len(golden["rounds"][0]["input_ids"][0])
