"""Pydantic models of the OpenAI requests and responses this server speaks.

Requests are :class:`~internvl_runtime.processing.lenient_model.LenientModel` s, as vLLM parses them:
``null`` means the default, unknown fields are accepted and logged once per name (``--strict-protocol``
refuses them), and types and ranges stay strict (``"5"`` is not an integer, ``1`` is not ``true``), so a wrong
value is a 400 naming the field. Besides OpenAI's fields, the extensions vLLM's and LMDeploy's clients send
are understood (``top_k``, ``min_p``, ``repetition_penalty``, ``min_tokens`` / ``min_new_tokens``,
``ignore_eos``, ``stop_token_ids``, ``skip_special_tokens``, ``spaces_between_special_tokens``,
``include_stop_str_in_output``, assistant prefill, ``chat_template_kwargs``, ``guided_*`` and
``structured_outputs``, ``max_dynamic_patch``), and this server's own ``grounding`` (docs/compatibility.md).

Example::

    request = ChatCompletionRequest.model_validate_json(body)
    for message in request.messages:
        print(message.role, message.text(), message.image_urls())
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..engine.sampling_params import MAX_LOGPROBS
from ..errors import (
    ContextLengthExceeded,
    EngineDead,
    EngineOverloaded,
    HostNotAllowed,
    InternVLError,
    InvalidRequest,
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
from ..processing.lenient_model import LenientModel
from ..processing.structured_output import StructuredOutput


class _Out(BaseModel):
    model_config = ConfigDict(extra="allow")


# ---------------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------------


class StreamOptions(LenientModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class JsonSchemaFormat(LenientModel):
    """OpenAI's ``response_format.json_schema``: ``{"name", "schema", "strict", "description"}``."""

    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(LenientModel):
    """``{"type": "text" | "json_object" | "json_schema" | "regex_schema"}`` (``regex_schema``: LMDeploy's)."""

    type: Literal["text", "json_object", "json_schema", "regex_schema"]
    json_schema: JsonSchemaFormat | None = None
    regex_schema: str | None = None

    @model_validator(mode="after")
    def _check(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('response_format type "json_schema" needs a json_schema object')
        if self.type == "regex_schema" and not self.regex_schema:
            raise ValueError('response_format type "regex_schema" needs a regex_schema string')
        return self


class StructuredOutputsParams(LenientModel):
    """vLLM's ``structured_outputs``: exactly one of ``json``, ``regex``, ``choice``, ``grammar``,
    ``json_object``."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class FunctionDefinition(LenientModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class Tool(LenientModel):
    """``{"type": "function", "function": {"name", "description", "parameters"}}``."""

    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(LenientModel):
    name: str


class NamedToolChoice(LenientModel):
    """``{"type": "function", "function": {"name": ...}}``: call this function."""

    type: Literal["function"] = "function"
    function: NamedFunction


def _schema_of(value: dict[str, Any] | str, field: str) -> dict[str, Any]:
    """A JSON schema given as an object or as its JSON text."""
    if isinstance(value, dict):
        return value
    try:
        schema = json.loads(value)
    except ValueError as exc:
        raise InvalidRequest(f"{field}: not a JSON schema ({exc})") from None
    if not isinstance(schema, dict):
        raise InvalidRequest(f"{field}: a JSON schema must be an object")
    return schema


class _SamplingFields(LenientModel):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0, le=10)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    min_tokens: int | None = Field(default=None, ge=0)
    min_new_tokens: int | None = Field(default=None, ge=0)     # LMDeploy's name of min_tokens
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # accepted and ignored: they change nothing in what a self-hosted model answers
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    # structured output (OpenAI's response_format; vLLM's structured_outputs and guided_* fields)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsParams | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None        # accepted: this server has one backend
    guided_whitespace_pattern: str | None = None      # accepted: JSON is generated compact
    # vLLM options that would change the answer and are not served here: refused, never silently ignored
    use_beam_search: bool = False
    prompt_logprobs: int | None = None
    best_of: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _check_common(self) -> _SamplingFields:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > 16 or any(not s for s in stops):
            raise ValueError("stop must be a non-empty string or a list of at most 16 non-empty strings")
        if self.min_tokens is not None and self.min_new_tokens is not None and self.min_tokens != self.min_new_tokens:
            raise ValueError("min_tokens and min_new_tokens disagree; send one of them")
        for token, bias in (self.logit_bias or {}).items():
            if not token.lstrip("-").isdigit() or int(token) < 0:
                raise ValueError(f"logit_bias: keys are token ids, got {token!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias: a bias is in [-100, 100], got {bias} for token {token}")
        if self.stop_token_ids is not None and any(t < 0 for t in self.stop_token_ids):
            raise ValueError("stop_token_ids: token ids are >= 0")
        if self.use_beam_search:
            raise ValueError("use_beam_search: beam search is not served (the Python API's num_beams has it); "
                             "use n for several sampled answers")
        if self.prompt_logprobs is not None:
            raise ValueError("prompt_logprobs: the prompt's logprobs are not returned by this server")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"best_of must equal n ({self.n}) on this server: choices are not ranked")
        return self

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def requested_min_tokens(self) -> int:
        return self.min_tokens if self.min_tokens is not None else (self.min_new_tokens or 0)

    @property
    def logit_bias_ids(self) -> dict[int, float]:
        return {int(token): bias for token, bias in (self.logit_bias or {}).items()}

    def structured_output(self) -> StructuredOutput | None:
        """The one output constraint the request asks for, if any; two different ones are a 400."""
        found: list[tuple[str, StructuredOutput]] = []
        fmt = self.response_format
        constraint = (StructuredOutput.from_response_format(fmt.model_dump(by_alias=True, exclude_none=True))
                      if fmt is not None else None)       # the one mapping of response_format (the pipeline's too)
        if constraint is not None:
            found.append(("response_format", constraint))
        so = self.structured_outputs
        if so is not None:
            kinds = [k for k in ("json_", "regex", "choice", "grammar") if getattr(so, k) is not None]
            kinds += ["json_object"] if so.json_object else []
            if len(kinds) != 1:
                raise InvalidRequest("structured_outputs: give exactly one of json, regex, choice, grammar, "
                                     "json_object")
            if so.json_ is not None:
                found.append(("structured_outputs", StructuredOutput(
                    json_schema=_schema_of(so.json_, "structured_outputs.json"))))
            elif so.regex is not None:
                found.append(("structured_outputs", StructuredOutput(regex=so.regex)))
            elif so.choice is not None:
                found.append(("structured_outputs", StructuredOutput(choice=tuple(so.choice))))
            elif so.grammar is not None:
                found.append(("structured_outputs", StructuredOutput(grammar=so.grammar)))
            else:
                found.append(("structured_outputs", StructuredOutput(json_object=True)))
        if self.guided_json is not None:
            found.append(("guided_json", StructuredOutput(json_schema=_schema_of(self.guided_json, "guided_json"))))
        if self.guided_regex is not None:
            found.append(("guided_regex", StructuredOutput(regex=self.guided_regex)))
        if self.guided_choice is not None:
            found.append(("guided_choice", StructuredOutput(choice=tuple(self.guided_choice))))
        if self.guided_grammar is not None:
            found.append(("guided_grammar", StructuredOutput(grammar=self.guided_grammar)))
        if len(found) > 1:
            raise InvalidRequest(f"{found[0][0]} and {found[1][0]} both constrain the output; send one of them")
        return found[0][1] if found else None


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions. ``max_dynamic_patch`` (an extension) caps the tiles per image."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    max_dynamic_patch: int | None = Field(default=None, ge=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    # assistant prefill and the template (vLLM's names)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    # vLLM's media options; ``media_io_kwargs.video.num_frames`` sets the frames sampled from a video
    media_io_kwargs: dict[str, dict[str, Any]] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    # an extension: each choice carries the <ref>/<box> regions of its answer (processing/grounding.py)
    grounding: bool = False

    @field_validator("messages", mode="before")
    @classmethod
    def _prompt_as_messages(cls, value: Any) -> Any:
        """A plain string is one user message (LMDeploy's ``chat_completions_v1`` sends one)."""
        return [{"role": "user", "content": value}] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_chat(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens disagree; send one of them")
        if self.continue_final_message and self.add_generation_prompt:
            if "add_generation_prompt" in self.model_fields_set:
                raise ValueError("continue_final_message and add_generation_prompt cannot both be true")
            self.add_generation_prompt = False      # vLLM's clients send only continue_final_message
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise ValueError("continue_final_message needs a final assistant message to continue")
        if isinstance(self.tool_choice, NamedToolChoice):
            names = [t.function.name for t in self.tools or []]
            if self.tool_choice.function.name not in names:
                raise ValueError(f"tool_choice names the function {self.tool_choice.function.name!r}, which "
                                 f"tools does not define (defined: {names})")
        elif self.tool_choice == "required" and not self.tools:
            raise ValueError('tool_choice "required" needs tools')
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        if not self.logprobs:
            return None
        return self.top_logprobs or 0

    @property
    def effective_tool_choice(self) -> str | NamedToolChoice:
        """OpenAI's default: "auto" when tools are given, "none" without."""
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"

    @property
    def video_frames(self) -> int | None:
        """``media_io_kwargs.video.num_frames`` if given."""
        frames = ((self.media_io_kwargs or {}).get("video") or {}).get("num_frames")
        if frames is None:
            return None
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
            raise InvalidRequest(f"media_io_kwargs.video.num_frames must be an integer >= 1, got {frames!r}")
        return frames


class CompletionRequest(_SamplingFields):
    """POST /v1/completions: plain text in, text out (no chat template)."""

    prompt: str | list[str] = Field(min_length=1)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    add_special_tokens: bool = False

    @model_validator(mode="after")
    def _check_completion(self) -> CompletionRequest:
        if self.suffix:
            raise ValueError("suffix (fill in the middle) is not supported by these models")
        if self.echo:
            raise ValueError("echo is not supported on /v1/completions")
        return self

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
    #: The model's reasoning (harmony's analysis channel, GPT-OSS), as vLLM's field; null for other models.
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] = Field(default_factory=list)


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
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


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
