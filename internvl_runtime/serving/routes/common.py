"""What the generation routes share: the request's serving state, body parsing, the model and ``n``
checks, one ``SamplingParams`` per choice (the context rule is the engine's), and engine logprobs in
OpenAI's two shapes."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel

from ...engine.async_engine import AsyncEngine
from ...engine.sampler import TokenLogprobs
from ...engine.sampling_params import SamplingParams
from ...errors import InvalidRequest, ModelNotFound
from ...processing.harmony import ACTION_STOP_TOKENS
from ...processing.inputs import PreparedRequest
from ...processing.lenient_model import STRICT_PROTOCOL
from ..protocol import ChatCompletionRequest, CompletionLogprobs, CompletionRequest, TokenLogprob, TopLogprob
from ..state import ServingState

ModelT = TypeVar("ModelT", bound=BaseModel)


def serving_state(request: Request) -> ServingState:
    """The app's ``ServingState``."""
    state = request.app.state.serving
    assert isinstance(state, ServingState)
    return state


def parse(state: ServingState, model: type[ModelT], body: bytes) -> ModelT:
    """The request body as ``model``: lenient (unknown fields logged once) unless ``--strict-protocol``."""
    if not body:
        raise InvalidRequest("the request body is empty; send a JSON object")
    return model.model_validate_json(body, context={STRICT_PROTOCOL: state.config.strict_protocol})


def check_model(state: ServingState, model: str) -> None:
    """``model`` must be one of the served names (``--served-model-name``, any of them)."""
    names = state.config.model_names
    if model not in names:
        served = " or ".join(repr(name) for name in names)
        raise ModelNotFound(f"the model {model!r} does not exist; this server serves {served}")


def check_n(state: ServingState, n: int) -> None:
    if n > state.config.max_n:
        raise InvalidRequest(f"n: at most {state.config.max_n} choices per request, got {n}")


def sampling_params(state: ServingState, engine: AsyncEngine, req: ChatCompletionRequest | CompletionRequest,
                    prepared: PreparedRequest) -> list[SamplingParams]:
    """One SamplingParams per choice. The engine's context rule says how many tokens fit (or refuses):
    ``max_tokens`` as asked, else the server's default cut to what the context leaves. Tool calls in a format
    made of special tokens (InternLM2's) keep special tokens in the text, to be parsed; so do chat answers in
    harmony (GPT-OSS), whose channels the chat route splits into content and reasoning."""
    plan = prepared.tool_plan
    skip_special_tokens = req.skip_special_tokens and (plan is None or plan.skip_special_tokens)
    spaces_between_special_tokens = req.spaces_between_special_tokens
    stop_token_ids = list(req.stop_token_ids or [])
    if isinstance(req, ChatCompletionRequest) and state.processor.harmony_answers:
        # the harmony tags are special tokens: kept verbatim, for the chat route to parse (processing.harmony)
        skip_special_tokens, spaces_between_special_tokens = False, False
        stop_token_ids += [i for i in _token_ids(state, ACTION_STOP_TOKENS) if i not in stop_token_ids]
    constraint = req.structured_output()
    forced_calls = plan.constraint if plan is not None else None
    if constraint is not None and forced_calls is not None:
        raise InvalidRequest("tool_choice forces a tool call, and the request also constrains the output "
                             f"({constraint.kind}); send one of them")
    max_tokens = engine.max_new_tokens_for(len(prepared.prompt_token_ids), req.requested_max_tokens,
                                           default=state.config.default_max_tokens, name="max_tokens")
    params = []
    for i in range(req.n):
        params.append(SamplingParams(
            max_new_tokens=max_tokens,
            min_new_tokens=req.requested_min_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=0 if req.top_k is None else req.top_k,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            ignore_eos=req.ignore_eos,
            stop=req.stop_list,
            stop_token_ids=stop_token_ids,
            seed=None if req.seed is None else (req.seed + i) % 2**64,   # choice i: seed + i, reproducible
            logprobs=req.num_logprobs,
            skip_special_tokens=skip_special_tokens,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            logit_bias=req.logit_bias_ids,
            min_p=req.min_p or 0.0,
            structured_output=constraint or forced_calls,
            spaces_between_special_tokens=spaces_between_special_tokens,
            include_stop_str_in_output=req.include_stop_str_in_output,
        ))
    return params


def _token_ids(state: ServingState, tokens: tuple[str, ...]) -> list[int]:
    """The ids of those of ``tokens`` the tokenizer has as single tokens (an unknown one is left out, not
    mapped to the unk id)."""
    tokenizer = state.tokenizer
    ids = []
    for token in tokens:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is not None and tokenizer.decode([token_id], skip_special_tokens=False) == token:
            ids.append(token_id)
    return ids


def chat_logprobs(records: list[TokenLogprobs], token_text: Callable[[int], str]) -> list[TokenLogprob]:
    """Engine ``TokenLogprobs`` -> OpenAI chat logprobs content entries."""
    entries = []
    for record in records:
        token = token_text(record.token_id)
        top = [TopLogprob(token=token_text(t), logprob=_finite(lp), bytes=list(token_text(t).encode()))
               for t, lp in record.top]
        entries.append(TokenLogprob(token=token, logprob=_finite(record.logprob), bytes=list(token.encode()),
                                    top_logprobs=top))
    return entries


def completion_logprobs(records: list[TokenLogprobs], token_text: Callable[[int], str]) -> CompletionLogprobs:
    """Engine ``TokenLogprobs`` -> the legacy completions logprobs shape."""
    result = CompletionLogprobs()
    offset = 0
    for record in records:
        token = token_text(record.token_id)
        result.tokens.append(token)
        result.token_logprobs.append(_finite(record.logprob))
        result.top_logprobs.append({token_text(t): _finite(lp) for t, lp in record.top})
        result.text_offset.append(offset)
        offset += len(token)
    return result


def _finite(value: float) -> float:
    """JSON has no -inf: clamp to the most negative float (as OpenAI's -9999.0-style floor)."""
    return value if math.isfinite(value) else -9999.0
