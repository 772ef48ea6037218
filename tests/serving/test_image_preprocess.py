"""``internvl serve --image-preprocess exact|device``: the same tiles and prompt either way, the official pixel
values by default (the answer's logprobs equal an offline engine's), close ones on the device path."""

from __future__ import annotations

import io

import numpy as np
import openai
import pytest
from PIL import Image

from internvl_runtime import cli
from internvl_runtime.engine.engine import LLMEngine
from internvl_runtime.engine.sampling_params import SamplingParams
from internvl_runtime.errors import InvalidRequest
from internvl_runtime.processing.inputs import Message
from internvl_runtime.serving.config import ServerConfig

from .helpers import data_url, run_server


def _photo_png() -> bytes:
    """1024x768, noisy: 12 tiles + thumbnail, with values the two paths round differently."""
    rng = np.random.default_rng(5)
    coarse = (rng.random((97, 129, 3)) * 255).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((1024, 768), Image.Resampling.BILINEAR), np.int16)
    image = Image.fromarray(np.clip(smooth + rng.integers(-20, 21, smooth.shape), 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


PNG = _photo_png()
QUESTION = "Describe the image."


def _first_token(config: ServerConfig) -> tuple[int, list[tuple[str, float]]]:
    """(prompt tokens, the first answer token's top-5 logprobs) from a real server with ``config``."""
    with run_server(config) as server, openai.OpenAI(base_url=server.base_url + "/v1", api_key="x",
                                                     max_retries=0) as client:
        answer = client.chat.completions.create(
            model=config.model_name, max_tokens=1, temperature=0, logprobs=True, top_logprobs=5,
            messages=[{"role": "user", "content": [{"type": "text", "text": QUESTION},
                                                   {"type": "image_url", "image_url": {"url": data_url(PNG)}}]}])
    assert answer.usage is not None and answer.choices[0].logprobs is not None
    content = answer.choices[0].logprobs.content
    assert content is not None
    return answer.usage.prompt_tokens, [(t.token, t.logprob) for t in content[0].top_logprobs]


@pytest.fixture(scope="module")
def answers(tiny_1b) -> dict[str, tuple[int, list[tuple[str, float]]]]:
    base = dict(model=str(tiny_1b), device="cpu", max_model_len=8192, num_blocks=512)
    return {mode: _first_token(ServerConfig(image_preprocess=mode, **base)) for mode in ("exact", "device")}


def test_exact_is_the_default_and_gives_the_official_pixels(answers, tiny_1b):
    assert ServerConfig().image_preprocess == "exact"
    engine = LLMEngine.from_pretrained(tiny_1b, dtype="float32")
    request = engine.processor.prepare([Message("user", QUESTION, [PNG])])      # the reference tiling, offline
    out = engine.generate([request], SamplingParams(max_new_tokens=1, temperature=0, logprobs=5))[0]
    prompt_tokens, top = answers["exact"]
    assert prompt_tokens == len(request.prompt_token_ids) > 13 * 256        # 12 tiles + thumbnail
    offline = [(engine.tokenizer.decode([token]), value) for token, value in out.logprobs[0].top]
    assert [token for token, _ in top] == [token for token, _ in offline]
    assert [value for _, value in top] == pytest.approx([value for _, value in offline], abs=1e-6)


def test_device_path_serves_the_same_prompt_with_close_logprobs(answers):
    exact_tokens, exact = answers["exact"]
    device_tokens, device = answers["device"]
    assert device_tokens == exact_tokens                   # the same grid, the same tiles, the same prompt
    assert [token for token, _ in device] == [token for token, _ in exact]
    deltas = [abs(a - b) for (_, a), (_, b) in zip(exact, device, strict=True)]
    assert max(deltas) < 0.05                              # close ...
    assert max(deltas) > 0                                 # ... but not the same pixels: the flag took effect


def test_the_flag_builds_the_config_and_bad_values_are_refused():
    args = cli.build_parser().parse_args(["serve", "ckpt", "--image-preprocess", "device"])
    assert args.image_preprocess == "device"
    values = {f.name: getattr(args, f.name) for f in ServerConfig.cli_fields()}
    assert ServerConfig(model="ckpt", **values).image_preprocess == "device"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "ckpt", "--image-preprocess", "gpu"])
    with pytest.raises(InvalidRequest, match="image_preprocess"):
        ServerConfig(image_preprocess="gpu")
