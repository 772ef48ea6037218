"""Pydantic models of OpenAI's Responses API (``POST /v1/responses``), as ``client.responses.create`` sends it.

The request is turned into the equivalent chat completion body (:meth:`ResponsesRequest.chat_body`), so a
response runs through exactly the chat route's pieces (media, template, tokens, the context rule, sampling):
``input`` items become chat messages, ``instructions`` a leading system message, ``max_output_tokens``
``max_tokens``, function tools and ``function_call`` / ``function_call_output`` items the chat request's tools,
assistant ``tool_calls`` and ``tool`` messages (for the models that answer in harmony, GPT-OSS: see
:meth:`ResponsesRequest.check_tools`), ``reasoning`` items of earlier answers are accepted and not shown to the
model (harmony drops past reasoning). What needs state on the server (``previous_response_id``,
``conversation``) or is not built yet (logprobs) is a 400 saying so; bookkeeping fields (``store``,
``metadata``, ``user``, ...) are accepted and ignored, as they change nothing a client can observe here.

Parsing is strict like ``protocol`` (``"5"`` is not an integer, unknown fields are refused). ``input`` and a
message's ``content`` are a string *or* a list; the branch is chosen by the value's JSON type, so an error
names the problem in the list rather than complaining that the value is not a string.

Example::

    req = ResponsesRequest.model_validate_json(b'{"model": "m", "input": "hi", "instructions": "Be brief."}')
    req.chat_body()   # {"model": "m", "messages": [{"role": "system", ...}, {"role": "user", ...}]}
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from ..errors import InvalidRequest
from ..processing.lenient_model import LenientModel
from ..processing.structured_output import StructuredOutput

_Request = LenientModel        # null is the default, unknown fields logged once (--strict-protocol refuses them)


class _Out(BaseModel):
    model_config = ConfigDict(extra="allow")


def _str_or_list(value: Any) -> str | None:
    """Which branch of ``str | list[...]`` a JSON value is checked against (None: neither)."""
    return "str" if isinstance(value, str) else "list" if isinstance(value, list) else None


#: Picks the branch of ``str | list[...]`` by the value's JSON type; a value of another type gets one clear error.
_STR_OR_LIST = Discriminator(_str_or_list, custom_error_type="string_or_list_type",
                             custom_error_message="Input should be a string or a list")


# ---------------------------------------------------------------------------------------------------
# Request: input items
# ---------------------------------------------------------------------------------------------------


class InputText(_Request):
    """``{"type": "input_text", "text": "..."}``"""

    type: Literal["input_text"]
    text: str


class InputImage(_Request):
    """``{"type": "input_image", "image_url": "data:...|https://...", "detail": "auto"}``. ``detail`` is
    accepted and ignored (tiling follows the server's ``max_dynamic_patch``); ``file_id`` needs file storage,
    which this server has not."""

    type: Literal["input_image"]
    image_url: str | None = Field(default=None, min_length=1)
    file_id: str | None = None
    detail: str | None = None

    @model_validator(mode="after")
    def _check(self) -> InputImage:
        if self.file_id is not None:
            raise ValueError("file_id images are not supported: this server stores no files; send image_url "
                             "(a data: URL or an http(s) URL)")
        if self.image_url is None:
            raise ValueError("an input_image needs image_url")
        return self


class OutputText(_Request):
    """An earlier answer's text, sent back as history: ``{"type": "output_text", "text": "..."}``."""

    type: Literal["output_text"]
    text: str
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None


class Refusal(_Request):
    """An earlier answer's refusal, sent back as history (its text is the assistant's turn)."""

    type: Literal["refusal"]
    refusal: str


InputPart = Annotated[InputText | InputImage | OutputText | Refusal, Field(discriminator="type")]


class InputMessage(_Request):
    """One message of ``input``: ``{"role", "content"}`` (``type: "message"`` optional), or an earlier answer as
    OpenAI returned it (``id``, ``status`` and ``phase`` accepted and ignored)."""

    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: Annotated[Annotated[str, Tag("str")] | Annotated[list[InputPart], Tag("list")],
                       _STR_OR_LIST]
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None
    phase: str | None = None

    @model_validator(mode="after")
    def _check(self) -> InputMessage:
        if isinstance(self.content, str):
            return self
        for part in self.content:
            if isinstance(part, InputImage) and self.role != "user":
                raise ValueError(f"only user messages may carry images, not {self.role} messages")
            if isinstance(part, (OutputText, Refusal)) and self.role != "assistant":
                raise ValueError(f"{part.type} parts belong to assistant messages, not {self.role} messages")
        return self

    def chat_message(self) -> dict[str, Any]:
        """The chat completions message of this item (``developer`` stays: the chat route maps it)."""
        if isinstance(self.content, str):
            return {"role": self.role, "content": self.content}
        parts: list[dict[str, Any]] = []
        for part in self.content:
            if isinstance(part, InputImage):
                parts.append({"type": "image_url", "image_url": {"url": part.image_url}})
            else:
                text = part.refusal if isinstance(part, Refusal) else part.text
                parts.append({"type": "text", "text": text})
        if self.role != "user":       # only user messages take parts with images; the others' text is joined
            return {"role": self.role, "content": "\n".join(p["text"] for p in parts)}
        return {"role": self.role, "content": parts}


class FunctionCallItem(_Request):
    """An earlier answer's call, sent back: ``{"type": "function_call", "call_id", "name", "arguments"}``."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None

    def chat_call(self) -> dict[str, Any]:
        return {"id": self.call_id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


class FunctionCallOutputItem(_Request):
    """A call's result: ``{"type": "function_call_output", "call_id", "output"}``."""

    type: Literal["function_call_output"]
    call_id: str
    output: str
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class ReasoningItem(_Request):
    """An earlier answer's reasoning, sent back: accepted and not shown to the model (harmony drops the
    reasoning of past turns)."""

    type: Literal["reasoning"]
    id: str | None = None
    summary: list[Any] | None = None
    content: list[Any] | None = None
    encrypted_content: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


def _item_type(value: Any) -> str | None:
    """The ``type`` of an input item (a message may leave it out)."""
    if isinstance(value, dict):
        kind = value.get("type", "message")
        return kind if isinstance(kind, str) else None
    return getattr(value, "type", None)


InputItem = Annotated[Annotated[InputMessage, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
                      | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
                      | Annotated[ReasoningItem, Tag("reasoning")], Discriminator(_item_type)]

#: Item types of the Responses API that need what this server has not: named in the 400.
_UNSUPPORTED_ITEMS = {
    "custom_tool_call": "custom tools", "custom_tool_call_output": "custom tools",
    "item_reference": "server-side state (stored responses)",
}
#: Item types that carry function calls: only for the models whose tools /v1/responses serves.
_TOOL_ITEMS = ("function_call", "function_call_output")


# ---------------------------------------------------------------------------------------------------
# Request: text format
# ---------------------------------------------------------------------------------------------------


class TextFormatText(_Request):
    type: Literal["text"]


class TextFormatJSONObject(_Request):
    type: Literal["json_object"]


class TextFormatJSONSchema(_Request):
    """``{"type": "json_schema", "name", "schema", "description"?, "strict"?}`` (the schema is always
    enforced in full, strict or not)."""

    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)

    type: Literal["json_schema"]
    name: str = Field(min_length=1, max_length=64)
    json_schema: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


TextFormat = Annotated[TextFormatText | TextFormatJSONObject | TextFormatJSONSchema, Field(discriminator="type")]


class TextConfig(_Request):
    """``text``: the output's ``format``; ``verbosity`` is accepted and ignored (the model has no such knob)."""

    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


# ---------------------------------------------------------------------------------------------------
# Request
# ---------------------------------------------------------------------------------------------------


class ResponsesRequest(_Request):
    """POST /v1/responses."""

    model: str
    input: Annotated[Annotated[str, Tag("str")] | Annotated[list[InputItem], Tag("list")],
                     _STR_OR_LIST]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stream: bool | None = None
    text: TextConfig | None = None
    # Refused with a reason (see _check).
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=0)
    background: bool | None = None
    truncation: Literal["disabled"] | None = None
    # Accepted and ignored: bookkeeping that changes nothing a client can observe on this server.
    store: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    max_tool_calls: int | None = None
    include: list[str] | None = None
    reasoning: dict[str, Any] | None = None
    stream_options: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _check_items(cls, data: Any) -> Any:
        """Name the input items that need tools or stored state before the item model complains of them."""
        items = data.get("input") if isinstance(data, dict) else None
        for item in items if isinstance(items, list) else []:
            kind = item.get("type") if isinstance(item, dict) else None
            if isinstance(kind, str) and kind not in ("message", "reasoning", *_TOOL_ITEMS):
                need = _UNSUPPORTED_ITEMS.get(kind, "a kind of input this server does not take")
                raise ValueError(f"input items of type {kind!r} need {need}, which /v1/responses does not support "
                                 "here; send messages (role + content)")
        return data

    @model_validator(mode="after")
    def _check(self) -> ResponsesRequest:
        if self.previous_response_id is not None:
            raise ValueError("previous_response_id is not supported: this server stores no responses; send the whole "
                             "conversation in input (earlier answers as assistant messages)")
        if self.conversation is not None:
            raise ValueError("conversation is not supported: this server stores no conversations; send the whole "
                             "conversation in input")
        for tool in self.tools or []:
            if tool.get("type") != "function":
                raise ValueError(f"tools: only function tools are supported here, got type {tool.get('type')!r}")
        if self.background:
            raise ValueError("background responses are not supported: this server stores no responses")
        if self.include and "message.output_text.logprobs" in self.include:
            raise ValueError("message.output_text.logprobs is not supported on /v1/responses yet")
        if isinstance(self.input, list) and not self.input:
            raise ValueError("input is empty; send a string or at least one message")
        return self

    def check_tools(self, *, served: bool) -> None:
        """Refuse tools and call items where /v1/responses does not serve them (``served``: the model answers
        in harmony, whose calls the route turns into ``function_call`` items)."""
        if served:
            return
        if self.tools:
            raise InvalidRequest("tools on /v1/responses are served for the models that answer in harmony "
                                 "(GPT-OSS) only; use /v1/chat/completions")
        if self.tool_choice not in (None, "none", "auto"):
            raise InvalidRequest("tool_choice needs tools, which /v1/responses serves for GPT-OSS only")
        for item in self.input if isinstance(self.input, list) else []:
            if item.type in _TOOL_ITEMS:
                raise InvalidRequest(f"input items of type {item.type!r} need tools, which /v1/responses serves "
                                     "for GPT-OSS only; use /v1/chat/completions")

    def chat_body(self) -> dict[str, Any]:
        """The equivalent ``/v1/chat/completions`` request body (as JSON-ready data)."""
        messages: list[dict[str, Any]] = []
        if self.instructions is not None:
            messages.append({"role": "system", "content": self.instructions})
        if isinstance(self.input, str):
            messages.append({"role": "user", "content": self.input})
        else:
            for item in self.input:
                if isinstance(item, FunctionCallItem):
                    last = messages[-1] if messages else None
                    if last is not None and last["role"] == "assistant" and last.get("tool_calls"):
                        last["tool_calls"].append(item.chat_call())     # one assistant turn, several calls
                    else:
                        messages.append({"role": "assistant", "content": None, "tool_calls": [item.chat_call()]})
                elif isinstance(item, FunctionCallOutputItem):
                    messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
                elif isinstance(item, InputMessage):
                    messages.append(item.chat_message())
        body: dict[str, Any] = {"model": self.model, "messages": messages}
        if self.tools:
            body["tools"] = [{"type": "function", "function": {
                key: tool[key] for key in ("name", "description", "parameters") if tool.get(key) is not None}}
                for tool in self.tools]
        if self.tool_choice is not None:
            choice = self.tool_choice
            if isinstance(choice, dict) and choice.get("type") == "function" and "name" in choice:
                choice = {"type": "function", "function": {"name": choice["name"]}}
            body["tool_choice"] = choice
        if self.parallel_tool_calls is not None:
            body["parallel_tool_calls"] = self.parallel_tool_calls
        for name, value in (("max_tokens", self.max_output_tokens), ("temperature", self.temperature),
                            ("top_p", self.top_p)):
            if value is not None:
                body[name] = value
        return body

    def structured_output(self) -> StructuredOutput | None:
        """``text.format`` as the engine's constraint (None: plain text)."""
        fmt = self.text.format if self.text is not None else None
        if isinstance(fmt, TextFormatJSONSchema):
            return StructuredOutput(json_schema=fmt.json_schema)
        if isinstance(fmt, TextFormatJSONObject):
            return StructuredOutput(json_object=True)
        return None

    def text_echo(self) -> dict[str, Any]:
        """The ``text`` field of the Response object: the format as asked (plain text by default)."""
        fmt = self.text.format if self.text is not None else None
        return {"format": fmt.model_dump(mode="json", by_alias=True, exclude_none=True) if fmt is not None
                else {"type": "text"}}


# ---------------------------------------------------------------------------------------------------
# Response
# ---------------------------------------------------------------------------------------------------


def new_response_id(prefix: str) -> str:
    """OpenAI's id shape for this API: ``resp_...``, ``msg_...``."""
    return f"{prefix}_{uuid.uuid4().hex}"


class OutputTextPart(_Out):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class OutputMessage(_Out):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[OutputTextPart] = Field(default_factory=list)


class ReasoningTextPart(_Out):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


class OutputReasoning(_Out):
    """The model's reasoning (harmony's analysis channel), an item before the message, as vLLM gives gpt-oss's."""

    id: str
    type: Literal["reasoning"] = "reasoning"
    summary: list[Any] = Field(default_factory=list)
    content: list[ReasoningTextPart] = Field(default_factory=list)
    status: Literal["in_progress", "completed", "incomplete"]


class OutputFunctionCall(_Out):
    """A call of one of the request's functions."""

    id: str
    type: Literal["function_call"] = "function_call"
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"]


OutputItem = OutputMessage | OutputReasoning | OutputFunctionCall


class InputTokensDetails(_Out):
    cached_tokens: int = 0


class OutputTokensDetails(_Out):
    reasoning_tokens: int = 0


class ResponseUsage(_Out):
    input_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class IncompleteDetails(_Out):
    reason: Literal["max_output_tokens"]


class ResponseObject(_Out):
    """The Response object (``object: "response"``)."""

    id: str
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=lambda: int(time.time()))
    status: Literal["in_progress", "completed", "incomplete"]
    model: str
    output: list[OutputItem] = Field(default_factory=list)
    usage: ResponseUsage | None = None
    error: None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    parallel_tool_calls: bool = True
    tool_choice: str | dict[str, Any] = "auto"
    tools: list[Any] = Field(default_factory=list)
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    metadata: dict[str, str] = Field(default_factory=dict)
    store: bool = False
    previous_response_id: None = None
    reasoning: None = None
    truncation: Literal["disabled"] = "disabled"
    user: str | None = None

    @classmethod
    def start(cls, response_id: str, req: ResponsesRequest) -> ResponseObject:
        """The in-progress Response of ``req``, echoing its settings as OpenAI does."""
        return cls(id=response_id, status="in_progress", model=req.model, instructions=req.instructions,
                   max_output_tokens=req.max_output_tokens,
                   temperature=1.0 if req.temperature is None else req.temperature,
                   top_p=1.0 if req.top_p is None else req.top_p, text=req.text_echo(),
                   tool_choice=req.tool_choice if req.tool_choice is not None else "auto",
                   tools=list(req.tools or []), metadata=req.metadata or {}, user=req.user,
                   parallel_tool_calls=req.parallel_tool_calls is not False)
