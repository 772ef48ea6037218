"""Video goldens of the HF format: our runtime against transformers 4.55's own InternVL with its video processor
(``InternVLVideoProcessor``) on the tiny ``tiny-3_5-1B-HF`` folder (how they were made: tests/fixtures/README.md).

transformers samples the frames of an HF-format folder its own way (``processing.hf_video.frame_indices``: for the
40-frame clip and 8 frames, 2, 7, ..., 37 where the GitHub format's ``load_video`` takes 2, 7, 12, 17, 22, 26, 31,
36), makes each frame one tile with torch's resize and its fused normalisation, and writes ``Frame1: <img>...``
for the template's ``<video>``. Per round, through the engine: the input ids, the pixel values (sha256), the vision
features, the first-step logits, the greedy ids and the response.
"""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_goldens import RTOL, _check_features, _check_pixels, _first_logits, _rel_err
from test_hf_goldens import _engine

from internvl_runtime.api.generation_config import GenerationConfig
from internvl_runtime.api.pipeline import Video, pipeline
from internvl_runtime.engine.sampling_params import SamplingParams
from internvl_runtime.processing import hf_video
from internvl_runtime.processing.inputs import Message
from internvl_runtime.processing.video import get_index, sample_frames
from paths import FIXTURES

VARIANT = "tiny-3_5-1B-HF"
GOLDENS = FIXTURES / "goldens" / VARIANT
QUESTION = "What is happening in the video?"


def _golden() -> dict:
    return json.loads((GOLDENS / "video_8_frames.json").read_text(encoding="utf-8"))


def test_hf_frame_choice_is_transformers_own() -> None:
    """The frames transformers' video processor picked, chosen from the decoded clip; not the official ones."""
    picked = _golden()["case"]["frame_indices"]
    assert hf_video.frame_indices(None, 10.0, 39, 0, 8).tolist() == picked
    assert sample_frames(FIXTURES / "data" / "video.mp4", num_segments=8, rule=hf_video.frame_indices).indices \
        == picked
    assert get_index(None, 10.0, 39, 0, 8).tolist() != picked
    with pytest.raises(ValueError):      # VideoDecodeError: more frames than the clip has, as transformers refuses
        hf_video.frame_indices(None, 10.0, 39, 0, 41)


@pytest.mark.parametrize("round_index", [0, 1])
def test_hf_video_golden_through_the_engine(round_index: int) -> None:
    golden = _golden()
    case, record = golden["case"], golden["rounds"][round_index]
    engine = _engine(VARIANT)
    model = engine.model
    frames = [Image.open(FIXTURES / "data" / f"frame_{i:03d}.png").convert("RGB") for i in case["frame_indices"]]
    messages = [Message("user", case["rounds"][0], images=frames, is_video=True)]
    for r in range(1, round_index + 1):
        messages += [Message("assistant", golden["rounds"][r - 1]["responses"][0]), Message("user", case["rounds"][r])]
    prepared = engine.processor.prepare(messages)
    assert [prepared.prompt_token_ids] == record["input_ids"]

    tiles = torch.cat([image.pixel_values for image in prepared.images])
    _check_pixels(record, tiles)
    features = _check_features(model, GOLDENS, record.get("features_file", "-"), tiles)   # first round only
    logits = _first_logits(model, record["input_ids"], features)
    assert _rel_err(logits, np.load(GOLDENS / record["logits0_file"])) <= RTOL

    out = engine.generate([prepared], SamplingParams(max_new_tokens=20, temperature=0))[0]
    eos = model.config.llm.eos_token_id
    ids = record["generated_ids"][0]
    assert out.token_ids == (ids[:ids.index(eos) + 1] if eos in ids else ids)
    assert out.text == record["responses"][0]


def test_hf_video_through_the_pipeline_samples_as_transformers() -> None:
    """LMDeploy's ``pipeline`` on the HF folder: a ``Video`` (the clip file) and the same video as a ``video_url``
    message are sampled with transformers' rule, so the answer is the engine's on those frames, not on the
    official ``load_video``'s."""
    engine = _engine(VARIANT)
    video = FIXTURES / "data" / "video.mp4"

    def engine_ids(rule) -> list[int]:
        frames = list(sample_frames(video, num_segments=8, rule=rule).frames)
        prepared = engine.processor.prepare([Message("user", QUESTION, images=frames, is_video=True)])
        return engine.generate([prepared], SamplingParams(max_new_tokens=20, temperature=0))[0].token_ids

    expected = engine_ids(hf_video.frame_indices)
    assert expected != engine_ids(get_index)
    pipe = pipeline(FIXTURES / "ckpt" / VARIANT)
    try:
        greedy = GenerationConfig(max_new_tokens=20)
        assert pipe((QUESTION, Video(video, num_segments=8)), greedy).token_ids == expected
        url = "data:video/mp4;base64," + base64.b64encode(video.read_bytes()).decode()
        message = {"role": "user", "content": [{"type": "video_url", "video_url": {"url": url, "num_segments": 8}},
                                               {"type": "text", "text": QUESTION}]}
        assert pipe([message], greedy).token_ids == expected
    finally:
        pipe.close()
