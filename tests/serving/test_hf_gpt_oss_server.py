"""``internvl serve`` on the HF-format InternVL3.5-GPT-OSS folder (``tiny-3_5-20B-A4B-HF``) with the OpenAI client on
loopback: an image question answered as transformers' own model answers it (its HF golden), with the prompt its
folder's chat template renders (the token count)."""

from __future__ import annotations

import base64
import json

import openai

from internvl_runtime.serving.config import ServerConfig
from paths import FIXTURES

from .helpers import client_with_sampler, run_server

VARIANT = "tiny-3_5-20B-A4B-HF"


def test_image_answer_is_transformers_own() -> None:
    """One image (12 tiles at most: the folder's preprocessor_config.json) and a question: transformers' answer."""
    golden = json.loads((FIXTURES / "goldens" / VARIANT / "img_800x600_max12.json").read_text(encoding="utf-8"))
    record = golden["rounds"][0]
    data = base64.b64encode((FIXTURES / "data" / "img_800x600.png").read_bytes()).decode()
    config = ServerConfig(model=str(FIXTURES / "ckpt" / VARIANT), max_model_len=8192, num_blocks=512, max_num_seqs=2)
    with run_server(config) as server, \
            openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0, timeout=120) as client:
        response = client.chat.completions.create(
            model=client.models.list().data[0].id, temperature=0, max_tokens=20,
            messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}},
                {"type": "text", "text": golden["case"]["rounds"][0]}]}])
    assert response.choices[0].message.content == record["responses"][0]
    assert response.usage.prompt_tokens == len(record["input_ids"][0])


def test_harmony_answers_are_split_as_for_the_github_format() -> None:
    """The HF folder's model answers in harmony as the GitHub format's does: the server parses it the same way
    (``analysis`` -> ``reasoning_content``, ``final`` -> ``content``, no markup), whole and streamed. A random
    model writes no harmony, so the engine's sampler picks the tokens of a known answer."""
    from internvl_runtime import AutoTokenizer

    from .test_grounding import _ScriptedSampler

    ckpt = FIXTURES / "ckpt" / VARIANT
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    answer = ("<|channel|>analysis<|message|>The user asks for a capital.<|end|>"
              "<|start|>assistant<|channel|>final<|message|>Paris.")
    script = [*tokenizer.encode(answer, add_special_tokens=False), tokenizer.convert_tokens_to_ids("<|return|>")]
    assert tokenizer.convert_tokens_to_ids("<|channel|>") in script      # the tags are the folder's special tokens
    ask = [{"role": "user", "content": "What is the capital of France?"}]
    with client_with_sampler(ckpt, _ScriptedSampler(script)) as client:
        model = client.models.list().data[0].id
        message = client.chat.completions.create(model=model, messages=ask, max_tokens=64).choices[0].message
        assert message.content == "Paris."
        assert message.reasoning_content == "The user asks for a capital."
        content, reasoning = [], []
        for chunk in client.chat.completions.create(model=model, messages=ask, max_tokens=64, stream=True):
            for choice in chunk.choices:
                content.append(choice.delta.content or "")
                reasoning.append(getattr(choice.delta, "reasoning_content", None) or "")
    assert ("".join(content), "".join(reasoning)) == ("Paris.", "The user asks for a capital.")
