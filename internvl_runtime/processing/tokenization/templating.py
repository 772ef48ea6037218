"""``Tokenizer.apply_chat_template``: the checkpoint's ``chat_template`` rendered as transformers renders it.

The template (``tokenizer_config.json``'s ``chat_template``: a string, or a list of ``{"name", "template"}``
for named templates) is compiled by :class:`~internvl_runtime.processing.chat_template.ChatTemplate`, the
same sandboxed Jinja environment as ``--chat-template`` (``trim_blocks``, ``lstrip_blocks``,
``raise_exception``, ``strftime_now``, a ``tojson`` that keeps non-ASCII text), and sees what transformers
passes: ``messages``, ``tools``, ``add_generation_prompt``, the tokenizer's special tokens (``bos_token``,
``eos_token``, ``unk_token``, ``pad_token``..., ``additional_special_tokens``) and every extra keyword. One
difference: an unset ``bos_token``/``eos_token`` (Qwen2 has no bos) is the empty string here and undefined
there; both print nothing and are false, only a template testing ``is defined`` could tell them apart.

The rest follows transformers' ``apply_chat_template``: a list of conversations is a batch;
``continue_final_message`` cuts the prompt right after the last message's text (and refuses
``add_generation_prompt``); ``tokenize`` encodes with ``add_special_tokens=False`` (the template writes the
bos token itself), returning the ids, or the whole encoding with ``return_dict``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any, Protocol

from internvl_runtime.errors import InvalidRequest, UnsupportedFeature

from ..chat_template import ChatTemplate


class TemplateTokens(Protocol):
    """What rendering needs from a tokenizer (``base.Tokenizer``, which imports this module)."""

    @property
    def chat_template(self) -> str | dict[str, str] | None: ...

    @property
    def special_tokens_map(self) -> dict[str, str | list[str]]: ...

    @property
    def bos_token(self) -> str | None: ...

    @property
    def eos_token(self) -> str | None: ...

#: transformers' error when there is no template to use (same text, a ValueError as there).
NO_TEMPLATE_MESSAGE = (
    "Cannot use chat template functions because tokenizer.chat_template is not set and no template argument was "
    "passed! For information about writing templates and setting the tokenizer.chat_template attribute, please "
    "see the documentation at https://huggingface.co/docs/transformers/main/en/chat_templating"
)


@lru_cache(maxsize=16)
def _compiled(source: str) -> ChatTemplate:
    """Templates are compiled once per source text (a tokenizer renders the same one for every call)."""
    return ChatTemplate(source, origin="tokenizer chat_template")


def select_template(own: str | Mapping[str, str] | None, requested: str | None) -> str:
    """The template source to render: transformers' ``get_chat_template`` rules.

    ``own`` is the tokenizer's ``chat_template`` (one string, or templates by name); ``requested`` the
    ``chat_template`` argument: a template name when ``own`` has one by that name, else template source.
    """
    if isinstance(own, Mapping):
        if requested is not None and requested in own:
            return own[requested]
        if requested is not None:
            return requested
        if "default" in own:
            return own["default"]
        raise InvalidRequest(
            "This model has multiple chat templates with no default specified! Please either pass a chat template "
            "or the name of the template you wish to use to the `chat_template` argument. Available template "
            f"names are {sorted(own)}."
        )
    if requested is not None:
        return requested
    if own is None:
        raise InvalidRequest(NO_TEMPLATE_MESSAGE)
    return own


def template_from_config(value: Any) -> str | dict[str, str] | None:
    """``tokenizer_config.json``'s ``chat_template``: a string, or a list of named templates as a dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        return {str(item["name"]): str(item["template"]) for item in value}
    if isinstance(value, Mapping):
        return {str(k): str(v) for k, v in value.items()}
    raise InvalidRequest(f"chat_template must be a string or a list of named templates, not {type(value).__name__}")


def _messages(conversation: Any) -> list[dict[str, Any]]:
    """A conversation (a list of message dicts, or an object with ``messages`` as transformers'
    ``Conversation``) as a list of dicts."""
    messages = getattr(conversation, "messages", conversation)
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        raise InvalidRequest(f"a conversation must be a list of messages, not {type(messages).__name__}")
    out = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise InvalidRequest(f"a message must be a dict with 'role' and 'content', not {message!r}")
        out.append(dict(message))
    return out


def _tool_schemas(tools: Sequence[Any] | None) -> list[dict[str, Any]] | None:
    """Tools as the JSON schemas transformers passes (dicts); Python functions are not converted here."""
    if tools is None:
        return None
    schemas = []
    for tool in tools:
        if not isinstance(tool, Mapping):
            raise UnsupportedFeature(
                f"tools must be JSON schema dicts (transformers' get_json_schema output), not {type(tool).__name__}"
            )
        schemas.append(dict(tool))
    return schemas


def _continue_final_message(rendered: str, messages: list[dict[str, Any]]) -> str:
    """Cut the prompt right after the final message's text, so that the model continues it."""
    if not messages:
        raise InvalidRequest("continue_final_message needs a non-empty conversation")
    final = messages[-1].get("content")
    if isinstance(final, (list, tuple)):  # multimodal content: its last part's text
        final = final[-1].get("text") if final and isinstance(final[-1], Mapping) else None
    if not isinstance(final, str):
        raise InvalidRequest("continue_final_message needs a final message with text content")
    for text in (final, final.strip()):  # some templates strip the messages before rendering them
        index = rendered.rfind(text)
        if index >= 0:
            return rendered[: index + len(text)]
    raise InvalidRequest(
        "continue_final_message is set but the final message does not appear in the chat after applying the chat "
        "template! This can happen if the chat template deletes portions of the final message."
    )


def render_chat(
    tokenizer: TemplateTokens,
    conversation: Any,
    *,
    tools: Sequence[Any] | None = None,
    chat_template: str | None = None,
    add_generation_prompt: bool = False,
    continue_final_message: bool = False,
    template_kwargs: Mapping[str, Any] | None = None,
) -> str:
    """The prompt text of one conversation with the tokenizer's template (see the module docstring)."""
    if continue_final_message and add_generation_prompt:
        raise InvalidRequest(
            "continue_final_message and add_generation_prompt are not compatible. Use continue_final_message when "
            "you want the model to continue the final message, and add_generation_prompt when you want to add a "
            "header that will prompt it to start a new assistant message instead."
        )
    template = _compiled(select_template(tokenizer.chat_template, chat_template))
    messages = _messages(conversation)
    variables: dict[str, Any] = {key: value for key, value in tokenizer.special_tokens_map.items()
                                 if key not in ("bos_token", "eos_token")}
    variables.update(template_kwargs or {})
    rendered = template.render(messages, tools=_tool_schemas(tools), add_generation_prompt=add_generation_prompt,
                               bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token,
                               template_kwargs=variables)
    if continue_final_message:
        rendered = _continue_final_message(rendered, messages)
    return rendered


def is_batch(conversation: Any) -> bool:
    """transformers' test: a list whose first item is itself a list of messages (or a ``Conversation``)."""
    return (
        isinstance(conversation, (list, tuple))
        and len(conversation) > 0
        and (isinstance(conversation[0], (list, tuple)) or hasattr(conversation[0], "messages"))
    )
