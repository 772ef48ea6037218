"""A Jinja chat template (Hugging Face style) to use instead of the checkpoint's official one (``--chat-template``).

The template is rendered in jinja2's ``ImmutableSandboxedEnvironment`` (a template file cannot reach Python
objects or change its inputs), with ``trim_blocks`` and ``lstrip_blocks`` as transformers renders chat
templates, its ``raise_exception(message)`` and ``strftime_now(format)`` globals and a ``tojson`` filter that
keeps non-ASCII text. It sees:

- ``messages``: dicts with ``role`` ("system", "user", "assistant", "tool") and ``content`` (a string). A
  user message's images are already in its content as ``<image>`` placeholders, placed by the official rules
  (``<image>\\n`` before the text for one image, ``Image-1: <image>\\n...`` for several, ``Frame1: <image>\\n...``
  for video frames; where the text has ``<image>`` or LMDeploy's ``<IMAGE_TOKEN>`` itself, there). The
  template must keep every placeholder: the rendered prompt must hold exactly one per image, or the request
  fails with ``PlaceholderMismatch``. An assistant message with calls has ``tool_calls``
  (``[{"id", "type": "function", "function": {"name", "arguments": <dict>}}]``, the arguments parsed as
  vLLM passes them); a tool result has ``tool_call_id`` and ``name`` when given. No system message is added
  for the template: the checkpoint's default system message is the official template's.
- ``tools``: OpenAI's tool list (``[{"type": "function", "function": {...}}]``), or None.
- ``add_generation_prompt``, ``bos_token``, ``eos_token``, and every ``chat_template_kwargs`` entry (these
  cannot replace the names above).

Tool calls in the answer are still parsed in the checkpoint template's tool format (``tool_calls.py``), and
``tool_choice`` "required" or a named function still forces that format: a template that offers tools should
ask for it.

A template that fails while rendering a request is that request's error (``InvalidRequest``); one that does
not compile is a ``ConfigError`` when it is loaded (at server start).

Example::

    template = ChatTemplate.from_file("chatml.jinja")
    prompt = template.render([{"role": "user", "content": "<image>\\nWhat is it?"}], add_generation_prompt=True)
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import ConfigError, InvalidRequest

__all__ = ["ChatTemplate"]


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def _strftime_now(format_string: str) -> str:
    return datetime.now().strftime(format_string)


class ChatTemplate:
    """A compiled Jinja chat template; ``origin`` (its file) names it in errors."""

    def __init__(self, source: str, *, origin: str = "<chat template>") -> None:
        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                    extensions=["jinja2.ext.loopcontrols"])
        environment.filters["tojson"] = _tojson
        environment.globals["raise_exception"] = _raise_exception
        environment.globals["strftime_now"] = _strftime_now
        self.origin = origin
        self.source = source
        try:
            self._template = environment.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ConfigError(f"chat template {origin}: line {exc.lineno}: {exc.message}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> ChatTemplate:
        """Read and compile a template file (a clear ``ConfigError`` if it is missing, unreadable or broken)."""
        file = Path(path).expanduser()
        try:
            source = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"chat template {str(file)!r} cannot be read: {exc}") from None
        if not source.strip():
            raise ConfigError(f"chat template {str(file)!r} is empty")
        return cls(source, origin=str(file))

    def render(self, messages: Sequence[Mapping[str, Any]], *, tools: Sequence[Mapping[str, Any]] | None = None,
               add_generation_prompt: bool = True, bos_token: str | None = None, eos_token: str | None = None,
               template_kwargs: Mapping[str, Any] | None = None) -> str:
        """The prompt for ``messages`` (see the module docstring for what the template sees)."""
        variables: dict[str, Any] = dict(template_kwargs or {})
        variables.update(messages=[dict(m) for m in messages], tools=list(tools) if tools else None,
                         add_generation_prompt=add_generation_prompt, bos_token=bos_token or "",
                         eos_token=eos_token or "")
        try:
            return self._template.render(**variables)
        except jinja2.TemplateError as exc:
            raise InvalidRequest(f"the chat template ({self.origin}) failed: {exc}") from None
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
            raise InvalidRequest(f"the chat template ({self.origin}) failed: {type(exc).__name__}: {exc}") from None
