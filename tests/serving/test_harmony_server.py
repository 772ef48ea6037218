"""GPT-OSS answers in harmony on /v1/chat/completions, as vLLM serves gpt-oss: the ``final`` channel's text in
``message.content``, the ``analysis`` channel's in ``message.reasoning_content``; streamed, each delta in the
field of the channel being written; none of the markup in either field; finish_reason "stop" at
``<|return|>``.

A random-weight model writes no harmony, so the real engine of the GPT-OSS tiny variant is given a sampler
that picks the tokens of a known harmony answer (the tags are the checkpoint's special tokens), then the
stop token ``<|return|>``. Everything else (the route, the engine, the detokenizer) runs as served, and the
real ``openai`` client reads the answers on loopback."""

from __future__ import annotations

import openai
import pytest

from internvl_runtime import AutoTokenizer
from paths import FIXTURES

from .helpers import client_with_sampler
from .test_grounding import _ScriptedSampler

CKPT = FIXTURES / "ckpt" / "tiny-3_5-20B-A4B"
MODEL = "tiny-3_5-20B-A4B"
REASONING = "The user asks for the capital of France. Easy."
FINAL = "The capital of France is Paris."
ANSWER = (f"<|channel|>analysis<|message|>{REASONING}<|end|>"
          f"<|start|>assistant<|channel|>final<|message|>{FINAL}")
ASK = [{"role": "user", "content": "What is the capital of France?"}]
TAGS = ("<|channel|>", "<|message|>", "<|end|>", "<|start|>", "<|return|>", "analysis", "assistantfinal")


@pytest.fixture(scope="module")
def script() -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(CKPT)
    ids = [*tokenizer.encode(ANSWER, add_special_tokens=False), tokenizer.convert_tokens_to_ids("<|return|>")]
    specials = {tokenizer.convert_tokens_to_ids(t) for t in ("<|channel|>", "<|message|>", "<|end|>", "<|start|>")}
    assert specials <= set(ids)                       # the tags are special tokens, as the model writes them
    return ids


def _scripted_client(script: list[int]):
    """The openai client of a GPT-OSS tiny server whose every answer is ``script``."""
    return client_with_sampler(CKPT, _ScriptedSampler(script))


@pytest.fixture(scope="module")
def client(script):
    with _scripted_client(script) as c:
        yield c


def _streamed(client: openai.OpenAI, **kwargs) -> tuple[str, str, list[str | None], list]:
    content, reasoning, finishes, chunks = [], [], [], []
    for chunk in client.chat.completions.create(model=MODEL, messages=ASK, stream=True, **kwargs):
        for choice in chunk.choices:
            chunks.append(choice.delta)
            content.append(choice.delta.content or "")
            reasoning.append(getattr(choice.delta, "reasoning_content", None) or "")
            finishes.append(choice.finish_reason)
    return "".join(content), "".join(reasoning), finishes, chunks


def test_final_channel_is_the_content_and_analysis_the_reasoning(client) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=200, temperature=0)
    message = reply.choices[0].message
    assert message.content == FINAL
    assert message.reasoning_content == REASONING      # type: ignore[attr-defined]
    assert reply.choices[0].finish_reason == "stop"


def test_streamed_deltas_go_to_the_field_of_their_channel(client, script) -> None:
    content, reasoning, finishes, chunks = _streamed(client, max_tokens=200, temperature=0)
    assert (content, reasoning) == (FINAL, REASONING)
    assert finishes[-1] == "stop"
    # every delta carries one field's text, and the reasoning comes before the answer, as written
    fields = [("reasoning" if getattr(d, "reasoning_content", None) else "content")
              for d in chunks if d.content or getattr(d, "reasoning_content", None)]
    assert fields == sorted(fields, key=lambda f: f == "content") and {"reasoning", "content"} == set(fields)
    assert len(fields) > 2                              # streamed in pieces, not in one delta per field
    for delta in chunks:
        for text in (delta.content or "", getattr(delta, "reasoning_content", None) or ""):
            assert not any(tag in text for tag in TAGS[:5])


def test_an_answer_cut_while_reasoning_has_no_content(client, script) -> None:
    cut = script.index(AutoTokenizer.from_pretrained(CKPT).convert_tokens_to_ids("<|message|>")) + 4
    reply = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=cut, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "length" and choice.message.content is None
    reasoning = choice.message.reasoning_content       # type: ignore[attr-defined]
    assert reasoning and REASONING.startswith(reasoning) and reasoning != REASONING
    content, streamed_reasoning, finishes, _ = _streamed(client, max_tokens=cut, temperature=0)
    assert (content, streamed_reasoning, finishes[-1]) == ("", reasoning, "length")


def test_completions_keep_the_raw_text(client, script) -> None:
    """/v1/completions is no chat: its text is the model's text (special tokens skipped, as asked)."""
    reply = client.completions.create(model=MODEL, prompt="Hello", max_tokens=200, temperature=0)
    raw = AutoTokenizer.from_pretrained(CKPT).decode(script[:-1], skip_special_tokens=True)
    assert reply.choices[0].text == raw and FINAL in raw and REASONING in raw


def test_responses_output_text_is_the_final_channel(client) -> None:
    response = client.responses.create(model=MODEL, input="What is the capital of France?", max_output_tokens=200)
    assert response.output_text == FINAL and response.status == "completed"
    events = list(client.responses.create(model=MODEL, input="What is the capital of France?",
                                          max_output_tokens=200, stream=True))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == FINAL and events[-1].type == "response.completed"


def test_the_answer_sent_back_as_history_is_a_known_message(client) -> None:
    """``model_dump()`` of a harmony answer carries ``reasoning_content``: the next request takes it back, even
    under --strict-protocol's rule that unknown fields are refused (checked on the request model)."""
    from internvl_runtime.processing.lenient_model import STRICT_PROTOCOL
    from internvl_runtime.serving.protocol import ChatCompletionRequest

    first = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=200, temperature=0)
    history = [*ASK, first.choices[0].message.model_dump(exclude={"refusal", "audio", "function_call",
                                                                  "annotations"}),
               {"role": "user", "content": "And Germany?"}]
    assert history[1]["reasoning_content"] == REASONING
    ChatCompletionRequest.model_validate({"model": MODEL, "messages": history}, context={STRICT_PROTOCOL: True})
    second = client.chat.completions.create(model=MODEL, messages=history, max_tokens=200, temperature=0)
    assert second.choices[0].message.content == FINAL
    assert second.usage.prompt_tokens > first.usage.prompt_tokens


def test_a_tool_call_ends_the_answer_at_call() -> None:
    """``<|call|>`` ends the turn (the tool's result comes next), as vLLM stops gpt-oss: what the model would
    write after it is never generated; the call's text is reasoning (harmony tool calls are not parsed)."""
    tokenizer = AutoTokenizer.from_pretrained(CKPT)
    call = ("<|channel|>analysis<|message|>Look it up.<|end|><|start|>assistant to=functions.lookup"
            "<|channel|>commentary <|constrain|>json<|message|>{\"q\": 1}")
    after = "<|start|>assistant<|channel|>final<|message|>never"
    ids = tokenizer.encode(call, add_special_tokens=False)
    script = [*ids, tokenizer.convert_tokens_to_ids("<|call|>"), *tokenizer.encode(after, add_special_tokens=False)]
    with _scripted_client(script) as c:
        reply = c.chat.completions.create(model=MODEL, messages=ASK, max_tokens=200, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "stop" and choice.message.content is None
    assert choice.message.reasoning_content == "Look it up.\n{\"q\": 1}"       # type: ignore[attr-defined]
    assert reply.usage.completion_tokens == len(ids) + 1
