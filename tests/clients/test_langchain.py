"""langchain-openai's ``ChatOpenAI`` pointed at the server: invoke, stream, ``with_structured_output`` (both the
``json_schema`` and the ``function_calling`` methods) and ``bind_tools`` with a forced call."""

from __future__ import annotations

from typing import Literal

import jsonschema
import pytest
from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from .conftest import API_KEY


class Ticket(BaseModel):
    """A support ticket: every field bounded, so even random weights finish it."""

    priority: Literal["low", "normal", "high"]
    minutes: int = Field(ge=1, le=60)
    summary: str = Field(max_length=10)


@tool
def lookup_stock(symbol: Literal["AAPL", "MSFT", "NVDA"], days: int) -> str:
    """Look up the closing prices of a stock over the last few days."""
    return f"{symbol}: {days} days"


@pytest.fixture(scope="module")
def chat(base_url, model) -> ChatOpenAI:
    return ChatOpenAI(base_url=base_url, api_key=API_KEY, model=model, max_tokens=200, max_retries=0, timeout=120)


def test_invoke(chat):
    answer = chat.invoke("Hello, who are you?", max_tokens=6)
    assert isinstance(answer, AIMessage) and isinstance(answer.content, str)
    assert answer.response_metadata["finish_reason"] in ("stop", "length")


def test_stream(chat):
    chunks = list(chat.stream("Hello, who are you?", max_tokens=6))
    assert chunks and all(isinstance(chunk, AIMessageChunk) for chunk in chunks)
    whole = chunks[0]
    for chunk in chunks[1:]:
        whole += chunk
    assert isinstance(whole.content, str)


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_with_structured_output(chat, method):
    structured = chat.with_structured_output(Ticket, method=method, strict=True)
    ticket = structured.invoke("My printer is on fire.")
    assert isinstance(ticket, Ticket)


def test_bind_tools_forced_call(chat):
    bound = chat.bind_tools([lookup_stock], tool_choice="lookup_stock")
    answer = bound.invoke("How did Nvidia do this week?")
    assert isinstance(answer, AIMessage)
    assert answer.invalid_tool_calls == []
    assert [call["name"] for call in answer.tool_calls] == ["lookup_stock"]
    call = answer.tool_calls[0]
    assert call["id"]
    jsonschema.validate(call["args"], lookup_stock.tool_call_schema.model_json_schema())
    assert answer.response_metadata["finish_reason"] == "tool_calls"
