"""``/tokenize``, ``/detokenize`` (vLLM's, for clients that count tokens before they send) and ``/version``.

Both token routes check the model name as the generation routes do and sit behind the same HTTP guard (API
key, body limits). ``/tokenize`` holds an admission slot while it works (the messages form fetches and tiles
images like a chat request) and tokenizes through the server's bounded prompt encoder; the chat form runs
the chat route's own preparation (``chat.prepare_chat``), so its tokens are the ones a chat completion would
generate from.
"""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ...errors import InvalidRequest
from ...version import __version__
from ..tokenize_protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
)
from .chat import prepare_chat
from .common import check_model, parse, serving_state

router = APIRouter()


def _has_messages(body: bytes) -> bool:
    """Whether the body is the chat form (a JSON object with ``messages``); anything else is parsed as the
    prompt form, whose parser reports what is wrong."""
    try:
        data = json.loads(body)
    except ValueError:
        return False
    return isinstance(data, dict) and "messages" in data


@router.post("/tokenize")
async def tokenize(request: Request) -> JSONResponse:
    state = serving_state(request)
    body = await request.body()
    req: TokenizeChatRequest | TokenizeCompletionRequest = (
        parse(state, TokenizeChatRequest, body) if _has_messages(body)
        else parse(state, TokenizeCompletionRequest, body))
    check_model(state, req.model)
    state.require_engine()
    tokenizer, encoder = state.tokenizer, state.prompt_encoder
    slot = state.admit()
    try:
        if isinstance(req, TokenizeChatRequest):
            encoder.check_bytes(sum(len(m.text().encode("utf-8")) for m in req.messages))
            ids = (await prepare_chat(state, req)).prompt_token_ids
            if req.add_special_tokens:
                ids = tokenizer.build_inputs_with_special_tokens(ids)
        else:
            prompt, add_special_tokens = req.prompt, req.add_special_tokens
            encoder.check_bytes(len(prompt.encode("utf-8")))
            ids = await state.run_in_worker(lambda: encoder.encode(prompt, add_special_tokens=add_special_tokens))
    finally:
        slot.release()
    token_strs = None
    if req.return_token_strs:
        strs = tokenizer.convert_ids_to_tokens(ids)
        assert isinstance(strs, list), "a list of ids gives a list of tokens"
        token_strs = strs
    assert state.max_model_len is not None, "set with the engine"
    return JSONResponse(TokenizeResponse(count=len(ids), max_model_len=state.max_model_len, tokens=ids,
                                         token_strs=token_strs).model_dump(mode="json"))


@router.post("/detokenize")
async def detokenize(request: Request) -> JSONResponse:
    state = serving_state(request)
    req: DetokenizeRequest = parse(state, DetokenizeRequest, await request.body())
    check_model(state, req.model)
    state.require_engine()
    tokenizer, tokens = state.tokenizer, req.tokens
    vocab_size, added = tokenizer.vocab_size, tokenizer.added_tokens_decoder
    for i, token_id in enumerate(tokens):   # the tokenizer refuses them too, naming its folder: not for clients
        if not (0 <= token_id < vocab_size or token_id in added):
            raise InvalidRequest(f"tokens[{i}]: {token_id} is not a token id of this model (its tokenizer has "
                                 f"{len(tokenizer)} tokens)")
    text = await state.run_in_worker(lambda: tokenizer.decode(tokens))
    return JSONResponse(DetokenizeResponse(prompt=text).model_dump(mode="json"))


@router.get("/version")
async def version() -> JSONResponse:
    return JSONResponse({"version": __version__})
