"""Pydantic models of vLLM's ``/tokenize`` and ``/detokenize`` (same field names and defaults as vLLM's).

``/tokenize`` takes a plain ``prompt`` (tokenized as is) or chat ``messages`` (rendered exactly as
``/v1/chat/completions`` renders them: the checkpoint's template, images fetched, tiled and expanded to their
image tokens), so its ``count`` for messages is the chat completion's ``usage.prompt_tokens``. The chat form
*is* a chat completion request (it subclasses ``ChatCompletionRequest``), so it takes every field that
request takes that shapes the prompt (``max_dynamic_patch`` today) and the chat route's own preparation runs
on it; its sampling fields are accepted and have no effect here.

Example::

    TokenizeCompletionRequest.model_validate_json(b'{"model": "m", "prompt": "hi", "return_token_strs": true}')
    TokenizeChatRequest.model_validate_json(b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}')
"""

from __future__ import annotations

from pydantic import BaseModel

from ..processing.lenient_model import LenientModel
from .protocol import ChatCompletionRequest


class TokenizeCompletionRequest(LenientModel):
    """``{"model", "prompt"}``: ``add_special_tokens`` (default true) adds the tokenizer's bos/eos as the
    checkpoint says; ``return_token_strs`` also answers each token's string."""

    model: str
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool | None = False


class TokenizeChatRequest(ChatCompletionRequest):
    """``{"model", "messages", ...}``: the chat prompt's tokens. ``add_special_tokens`` (default false, as
    vLLM) adds the tokenizer's bos/eos on top of what rendering the conversation already gives."""

    add_special_tokens: bool = False
    return_token_strs: bool | None = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(LenientModel):
    """``{"model", "tokens"}``: an id outside the vocabulary is a 400."""

    model: str
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str
