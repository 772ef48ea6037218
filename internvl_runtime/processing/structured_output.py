"""What a request's output must look like: a JSON schema, any JSON object, a regex, one of some strings,
a grammar, or tool calls as tagged JSON. Plain data: the server, the pipeline and the tool-call formats
describe the constraint here; the engine compiles it with the grammar engine and masks the logits.

Exactly one kind is set per ``StructuredOutput``.

Example::

    StructuredOutput(json_schema={"type": "object", "properties": {"a": {"type": "integer"}}})
    StructuredOutput(choice=("yes", "no"))
    StructuredOutput(tagged_json=TaggedJSON(begin="<tool_call>\\n", end="\\n</tool_call>",
                                            schemas=(call_schema,), min_items=1))
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidRequest

__all__ = ["StructuredOutput", "TaggedJSON"]


@dataclass(frozen=True)
class TaggedJSON:
    """Output made of items ``begin`` + a JSON value matching one of ``schemas`` + ``end``, repeated
    ``min_items`` to ``max_items`` times (None: no upper bound), ``separator`` between items. How a tool
    call is forced in the model's own format (Hermes ``<tool_call>\\n{...}\\n</tool_call>``, ...).
    ``begins``: one begin per schema instead of ``begin`` (harmony names the function in the call's header)."""

    begin: str
    end: str
    schemas: tuple[dict[str, Any], ...]
    min_items: int = 1
    max_items: int | None = None
    separator: str = "\n"
    begins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.schemas:
            raise InvalidRequest("tagged JSON needs at least one schema")
        if self.min_items < 0 or (self.max_items is not None and self.max_items < max(1, self.min_items)):
            raise InvalidRequest(f"tagged JSON item counts out of range: {self.min_items}..{self.max_items}")
        if self.begins and len(self.begins) != len(self.schemas):
            raise InvalidRequest("tagged JSON needs one begin per schema")


@dataclass(frozen=True)
class StructuredOutput:
    """One constraint on the whole output (set exactly one field).

    Attributes:
        json_schema: the output is JSON valid against this schema (OpenAI ``json_schema``, vLLM ``json``).
        json_object: the output is any JSON object (OpenAI ``{"type": "json_object"}``).
        regex: the output matches this regular expression in full.
        choice: the output is exactly one of these strings.
        grammar: the output follows this grammar (EBNF / GBNF, or Lark, as vLLM's ``guided_grammar``).
        tagged_json: tool calls in the model's format (see :class:`TaggedJSON`).
    """

    json_schema: dict[str, Any] | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    tagged_json: TaggedJSON | None = None

    def __post_init__(self) -> None:
        chosen = [name for name in ("json_schema", "regex", "choice", "grammar", "tagged_json")
                  if getattr(self, name) is not None] + (["json_object"] if self.json_object else [])
        if len(chosen) != 1:
            raise InvalidRequest("a structured output constraint needs exactly one kind (json_schema, json_object, "
                                 f"regex, choice, grammar or tagged_json), got {chosen or 'none'}")
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) for c in self.choice)):
            raise InvalidRequest("choice must be a non-empty list of strings")

    @classmethod
    def from_response_format(cls, response_format: Mapping[str, Any] | None) -> StructuredOutput | None:
        """The constraint of an OpenAI / LMDeploy ``response_format``, or None for ``{"type": "text"}``.

        Accepted shapes: ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...},
        "strict": ...}}`` (OpenAI and LMDeploy; the schema is enforced whatever ``strict`` says),
        ``{"type": "json_object"}``, ``{"type": "regex_schema", "regex_schema": "..."}`` (LMDeploy) and
        ``{"type": "text"}``.

        Raises:
            InvalidRequest: another type, or a missing / mistyped schema or regex.
        """
        if response_format is None:
            return None
        if not isinstance(response_format, Mapping):
            raise InvalidRequest(f"response_format must be an object, got {type(response_format).__name__}")
        kind = response_format.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            return cls(json_object=True)
        if kind == "json_schema":
            spec = response_format.get("json_schema")
            schema = spec.get("schema", spec.get("json_schema")) if isinstance(spec, Mapping) else None
            if not isinstance(schema, Mapping):
                raise InvalidRequest('response_format "json_schema" needs json_schema.schema, a JSON schema object')
            return cls(json_schema=dict(schema))
        if kind == "regex_schema":
            regex = response_format.get("regex_schema")
            if not isinstance(regex, str):
                raise InvalidRequest('response_format "regex_schema" needs regex_schema, a string')
            return cls(regex=regex)
        raise InvalidRequest(f"response_format type must be text, json_object, json_schema or regex_schema, "
                             f"got {kind!r}")

    @property
    def kind(self) -> str:
        """The name of the field that is set."""
        for name in ("json_schema", "regex", "choice", "grammar", "tagged_json"):
            if getattr(self, name) is not None:
                return name
        return "json_object"
