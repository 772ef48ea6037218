"""A Jinja chat template file (``--chat-template``) instead of the official template: what it sees, prefill,
the image placeholders check, the sandbox, and errors at start."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from internvl_runtime.errors import ConfigError, InvalidRequest, PlaceholderMismatch
from internvl_runtime.processing.chat_template import ChatTemplate
from internvl_runtime.processing.inputs import InputProcessor, Message
from internvl_runtime.processing.tokenization import AutoTokenizer
from internvl_runtime.processing.tool_calls import ToolCall
from internvl_runtime.serving.config import ServerConfig
from paths import FIXTURES

# A ChatML template in the Hugging Face style (Qwen-like tool rendering), written for these tests.
CHATML = """\
{% if tools %}<|im_start|>system
{{ system_hint | default("Tools:") }}
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}<|im_end|>
{% endif %}
{% for message in messages %}
<|im_start|>{{ message.role }}
{% if message.content %}{{ message.content }}{% endif %}
{% for call in message.tool_calls or [] %}<call id={{ call.id }}>{{ call.function.name }}\
({{ call.function.arguments.city }})</call>{% endfor %}
{% if message.role == "tool" %} [for {{ message.tool_call_id }}]{% endif %}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


@pytest.fixture(scope="module")
def template_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("templates") / "chatml.jinja"
    path.write_text(CHATML, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def processor(template_file: Path) -> InputProcessor:
    tokenizer = AutoTokenizer.from_pretrained(FIXTURES / "ckpt" / "tiny-1B")
    official = InputProcessor(tokenizer, template="Hermes-2", image_size=448, num_image_token=256)
    return official.with_chat_template(ChatTemplate.from_file(template_file))


def test_a_template_file_renders_the_conversation(processor: InputProcessor) -> None:
    prepared = processor.prepare([Message("system", "Be brief."), Message("user", "Hi")])
    assert prepared.prompt == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                               "<|im_start|>assistant\n")
    assert prepared.prompt_token_ids == processor.tokenizer.encode(prepared.prompt)
    closed = processor.prepare([Message("user", "Hi")], add_generation_prompt=False)
    assert closed.prompt == "<|im_start|>user\nHi<|im_end|>\n"
    # the official template is still the default
    official = processor.with_chat_template(None).prepare([Message("user", "Hi")]).prompt
    assert official.startswith("<|im_start|>system\n你是") and official != prepared.prompt


def test_tools_calls_results_and_template_kwargs(processor: InputProcessor) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    messages = [Message("user", "Weather?"),
                Message("assistant", "", tool_calls=[ToolCall("c1", "get_weather", '{"city": "Oslo"}')]),
                Message("tool", "cold", tool_call_id="c1")]
    prompt = processor.prepare(messages, tools=tools, template_kwargs={"system_hint": "Use these:"}).prompt
    assert prompt == (f"<|im_start|>system\nUse these:\n{json.dumps(tools[0])}\n<|im_end|>\n"
                      "<|im_start|>user\nWeather?<|im_end|>\n"
                      "<|im_start|>assistant\n<call id=c1>get_weather(Oslo)</call><|im_end|>\n"
                      "<|im_start|>tool\ncold [for c1]<|im_end|>\n<|im_start|>assistant\n")
    # kwargs cannot replace what the template is given
    assert processor.prepare([Message("user", "x")], template_kwargs={"messages": []}).prompt.count("x") == 1
    # tool_choice "none": no tools for the template either
    assert "Tools" not in processor.prepare([Message("user", "x")], tools=tools, tool_choice="none").prompt


def test_prefill_with_a_template(processor: InputProcessor) -> None:
    prompt = processor.prepare([Message("user", "Hi"), Message("assistant", "Sure, the")],
                               continue_final_message=True).prompt
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nSure, the"


def test_images_are_placeholders_in_the_content(processor: InputProcessor, tmp_path: Path) -> None:
    tiles = torch.zeros(2, 3, 448, 448)
    prepared = processor.prepare([Message("user", "What is it?", [tiles])])
    assert prepared.prompt.startswith("<|im_start|>user\n<img><IMG_CONTEXT>")
    assert len(prepared.mm_spans) == 1 and prepared.mm_spans[0].length == 512
    two = processor.prepare([Message("user", "Compare <IMAGE_TOKEN> and <IMAGE_TOKEN>", [tiles, tiles])])
    assert [s.length for s in two.mm_spans] == [512, 512] and "Compare <img>" in two.prompt
    # a template that drops the content (and so the placeholders) fails the count check
    lossy = tmp_path / "lossy.jinja"
    lossy.write_text("{% for m in messages %}{{ m.role }}: [hidden]\n{% endfor %}", encoding="utf-8")
    with pytest.raises(PlaceholderMismatch):
        processor.with_chat_template(ChatTemplate.from_file(lossy)).prepare([Message("user", "x", [tiles])])


def test_sandbox_and_render_errors(tmp_path: Path) -> None:
    escape = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(InvalidRequest, match="chat template"):
        escape.render([{"role": "user", "content": "x"}])
    mutate = ChatTemplate("{% set _ = messages.append(1) %}{{ messages | length }}")
    with pytest.raises(InvalidRequest):
        mutate.render([{"role": "user", "content": "x"}])
    refuse = ChatTemplate("{{ raise_exception('only user messages') }}")
    with pytest.raises(InvalidRequest, match="only user messages"):
        refuse.render([])
    assert ChatTemplate("{{ bos_token }}|{{ eos_token }}|{{ '%d' | format(3) }}").render(
        [], bos_token="<s>", eos_token="</s>") == "<s>|</s>|3"


def test_bad_templates_stop_the_server_at_start(tmp_path: Path, template_file: Path) -> None:
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m.content }}", encoding="utf-8")
    with pytest.raises(ConfigError, match="line 1"):
        ServerConfig(chat_template=str(broken))
    with pytest.raises(ConfigError, match="cannot be read"):
        ServerConfig(chat_template=str(tmp_path / "missing.jinja"))
    empty = tmp_path / "empty.jinja"
    empty.write_text("  \n", encoding="utf-8")
    with pytest.raises(ConfigError, match="empty"):
        ServerConfig(chat_template=str(empty))
    assert ServerConfig(chat_template=str(template_file)).chat_template == str(template_file)
    assert ServerConfig().chat_template is None


def test_the_server_renders_with_the_template_file(template_file: Path) -> None:
    """``internvl serve --chat-template FILE``: a chat request's prompt is the template's."""
    import httpx

    from serving.helpers import MODEL, TINY_1B, run_server

    tokenizer = AutoTokenizer.from_pretrained(TINY_1B)
    expected = tokenizer.encode("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    with run_server(ServerConfig(model=str(TINY_1B), chat_template=str(template_file), num_blocks=64)) as server:
        answer = httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["prompt_tokens"] == len(expected)
