"""What lmms-eval's OpenAI-compatible backend (``lmms_eval/models/chat/openai.py``, ``--model openai``) sends
for a video question, reproduced through the openai SDK exactly as it calls it
(``client.chat.completions.create(**payload)``):

- by default the video is decoded on the client into ``max_frames_num=10`` frames, each an ``image_url`` part
  (a PNG data URL, ``LMMS_IMAGE_ENCODE_FORMAT`` defaults to PNG), with ``chat_template_kwargs`` in
  ``extra_body`` when ``enable_thinking_kwarg`` is set;
- with ``pass_video_url=True`` the video goes as a ``video_url`` (a local path becomes ``file://``) with
  ``extra_body={"media_io_kwargs": {"video": {"num_frames": 10}}}``.

The harness scores whatever comes back as the model's answer, so an error here silently ruins an evaluation:
each request must be a 200 with an answer.
"""

from __future__ import annotations

import pytest

from paths import FIXTURES
from serving.helpers import data_url

DATA = FIXTURES / "data"
#: Local video files are read from here (lmms-eval passes them as file:// URLs).
SERVER_OPTIONS = {"allowed_local_media_path": str(DATA)}
FRAMES = 10            # lmms-eval's max_frames_num default
TILE_TOKENS = 256
QUESTION = "What is happening in this video? Answer with one word."


def payload(model: str, content: list[dict], extra_body: dict | None = None) -> dict:
    """``build_payload_for_index``: messages, model, max_tokens, temperature (+ extra_body when set)."""
    body = {"messages": [{"role": "user", "content": content}], "model": model, "max_tokens": 8, "temperature": 0}
    if extra_body:
        body["extra_body"] = extra_body
    return body


def frame_parts() -> list[dict]:
    """Ten frames of the fixture clip (320x240, evenly spread), as lmms-eval encodes decoded frames."""
    frames = [(DATA / f"frame_{i * 4:03d}.png").read_bytes() for i in range(FRAMES)]
    return [{"type": "image_url", "image_url": {"url": data_url(frame)}} for frame in frames]


@pytest.mark.parametrize("extra_body", [None, {"chat_template_kwargs": {"enable_thinking": False}}],
                         ids=["default", "enable_thinking_kwarg"])
def test_ten_frames_as_image_urls(client, model, extra_body):
    content = [*frame_parts(), {"type": "text", "text": QUESTION}]
    answer = client.chat.completions.create(**payload(model, content, extra_body))
    choice = answer.choices[0]
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert answer.usage.prompt_tokens >= FRAMES * TILE_TOKENS        # every frame was seen


def test_video_url_with_media_io_kwargs(client, model):
    url = f"file://{(DATA / 'video.mp4').resolve()}"
    content = [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": QUESTION}]
    answer = client.chat.completions.create(**payload(model, content, {
        "media_io_kwargs": {"video": {"num_frames": FRAMES}}}))
    assert isinstance(answer.choices[0].message.content, str)
    assert answer.usage.prompt_tokens > TILE_TOKENS                    # the video was seen
