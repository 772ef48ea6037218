"""Pydantic models of the OpenAI requests and responses this server speaks.

Requests are parsed strictly (``strict=True``: ``"5"`` is not an integer, ``1`` is not ``true``) and
unknown fields are refused (``extra="forbid"``), so a typo is a 400 naming the field rather than a setting
silently ignored. A few fields clients commonly send are accepted only with their neutral value
(``presence_penalty: 0``, ``response_format: {"type": "text"}``); anything else there is a 400 saying it
is not supported.

Example::

    request = ChatCompletionRequest.model_validate_json(body)
    for message in request.messages:
        print(message.role, message.text(), message.image_urls())
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..engine.sampling_params import MAX_LOGPROBS
from ..errors import (
    ContextLengthExceeded,
    EngineDead,
    EngineOverloaded,
    HostNotAllowed,
    InternVLError,
    ModelLoading,
    ModelNotFound,
    PayloadTooLarge,
    RequestTimeout,
    TooManyRequests,
    Unauthorized,
    UnsupportedFeature,
    UnsupportedMediaType,
    http_status,
)
from ..processing.chat_messages import ChatMessage


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class _Out(BaseModel):
    model_config = ConfigDict(extra="allow")


# ---------------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------------


class StreamOptions(_Strict):
    include_usage: bool = False


class ResponseFormat(_Strict):
    type: Literal["text"]


class _SamplingFields(_Strict):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)
    repetition_penalty: float | None = Field(default=None, gt=0, le=10)
    min_tokens: int | None = Field(default=None, ge=0)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Accepted only with their neutral value, so clients that always send them keep working.
    presence_penalty: float | None = Field(default=None, ge=0, le=0)
    frequency_penalty: float | None = Field(default=None, ge=0, le=0)
    logit_bias: dict[str, float] | None = Field(default=None, max_length=0)

    @model_validator(mode="after")
    def _check_common(self) -> _SamplingFields:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > 8 or any(not s for s in stops):
            raise ValueError("stop must be a non-empty string or a list of at most 8 non-empty strings")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions. ``max_dynamic_patch`` (an extension) caps the tiles per image."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    max_dynamic_patch: int | None = Field(default=None, ge=1)
    response_format: ResponseFormat | None = None

    @model_validator(mode="after")
    def _check_chat(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens disagree; send one of them")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        if not self.logprobs:
            return None
        return self.top_logprobs or 0


class CompletionRequest(_SamplingFields):
    """POST /v1/completions: plain text in, text out (no chat template)."""

    prompt: str | list[str] = Field(min_length=1)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: Literal[False] = False
    suffix: None = None
    best_of: int | None = Field(default=None, ge=1, le=1)

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs


# ---------------------------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class ErrorDetail(_Out):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Out):
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorDetail


class ModelCard(_Out):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "internvl-runtime"
    max_model_len: int | None = None


class ModelList(_Out):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Usage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(_Out):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(_Out):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(_Out):
    content: list[TokenLogprob] | None = None


class ChatMessageOut(_Out):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(_Out):
    index: int
    message: ChatMessageOut
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(_Out):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class DeltaMessage(_Out):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Out):
    index: int
    delta: DeltaMessage
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(_Out):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionLogprobs(_Out):
    """The legacy completions logprobs shape."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(_Out):
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: CompletionLogprobs | None = None


class Completion(_Out):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


# ---------------------------------------------------------------------------------------------------
# Errors: every error as (status, OpenAI error body); the status is ``errors.http_status``'s
# ---------------------------------------------------------------------------------------------------


#: OpenAI's error ``type`` and ``code`` for the errors that have a code, looked up along the error's MRO
#: (the most specific listed class wins). Others get ``code: null`` and the type their status implies.
_CODES: dict[type[BaseException], tuple[str, str]] = {
    Unauthorized: ("invalid_request_error", "invalid_api_key"),
    ModelNotFound: ("invalid_request_error", "model_not_found"),
    ContextLengthExceeded: ("invalid_request_error", "context_length_exceeded"),
    UnsupportedFeature: ("invalid_request_error", "unsupported"),
    HostNotAllowed: ("invalid_request_error", "host_not_allowed"),
    RequestTimeout: ("invalid_request_error", "request_timeout"),
    PayloadTooLarge: ("invalid_request_error", "request_too_large"),
    UnsupportedMediaType: ("invalid_request_error", "unsupported_media_type"),
    TooManyRequests: ("rate_limit_error", "too_many_requests"),
    ModelLoading: ("server_error", "model_not_ready"),
    EngineOverloaded: ("server_error", "engine_overloaded"),
    EngineDead: ("server_error", "engine_overloaded"),    # as overloaded: retry (the server restarts)
}


def error_status(error: BaseException) -> int:
    """The HTTP status of any error: ``errors.http_status``, and 400 for pydantic's request validation."""
    if isinstance(error, ValidationError):
        return 400
    return http_status(error)


def _error_type_and_code(error: BaseException, status: int) -> tuple[str, str | None]:
    for cls in type(error).__mro__:
        if cls in _CODES:
            return _CODES[cls]
    return ("invalid_request_error" if status < 500 else "server_error"), None


def _validation_message(error: ValidationError) -> tuple[str, str | None]:
    """A short message for the first problem, and the dotted path of the field (OpenAI's ``param``)."""
    first = error.errors(include_url=False)[0]
    if first["type"] == "json_invalid":
        return f"the request body is not valid JSON: {first['msg'].removeprefix('Invalid JSON: ')}", None
    if first["type"] == "model_type" and not first["loc"]:
        return "the request body must be a JSON object", None
    # Drop pydantic's union-branch labels ("str", "list[...]", "function-after[...]") from the path.
    loc = [str(p) for p in first["loc"] if not (isinstance(p, str) and ("[" in p or p in ("str", "int", "float",
                                                                                           "bool", "list")))]
    param = ".".join(loc) or None
    message = first["msg"].removeprefix("Value error, ")
    count = error.error_count()
    more = f" (and {count - 1} more problem{'s' * (count > 2)})" if count > 1 else ""
    return (f"{param}: {message}{more}" if param else message + more), param


def error_payload(error: BaseException) -> tuple[int, dict[str, Any]]:
    """``(status, {"error": {"message", "type", "param", "code"}})`` for any error."""
    status = error_status(error)
    param = None
    if isinstance(error, ValidationError):
        message, param = _validation_message(error)
    elif status >= 500 and not isinstance(error, InternVLError):
        message = "internal server error"          # never leak a traceback's details
    else:
        message = str(error) or type(error).__name__
    kind, code = _error_type_and_code(error, status)
    return status, {"error": {"message": message, "type": kind, "param": param, "code": code}}


def dump(model: BaseModel) -> dict[str, Any]:
    """JSON-ready dict of a response model (``None`` kept: OpenAI sends ``null``)."""
    return model.model_dump(mode="json")
