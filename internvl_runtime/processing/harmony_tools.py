"""How harmony (OpenAI's chat format, InternVL3.5-GPT-OSS's) writes offered functions, calls and results into
the prompt, as openai-harmony renders them (its ``render_conversation_for_completion``) and vLLM serves gpt-oss:

- the functions are a ``developer`` message after the system message, each a TypeScript-like declaration in
  ``namespace functions``::

      <|start|>developer<|message|># Tools

      ## functions

      namespace functions {

      // Gets the weather.
      type get_weather = (_: {
      city: string,
      unit?: "c" | "f", // default: "c"
      }) => any;

      } // namespace functions<|end|>

- the system message's channel line becomes harmony's for a conversation with functions: ``# Valid channels:
  analysis, commentary, final. ...`` and ``Calls to these tools must go to the commentary channel: 'functions'.``
- a call of the history is ``<|start|>assistant to=functions.NAME<|channel|>commentary json<|message|>ARGS<|call|>``
  (the arguments' text as the client sends it back);
- a result is ``<|start|>functions.NAME to=assistant<|channel|>commentary<|message|>RESULT<|end|>``;
- an earlier answer that a client sends back as its content (the final channel, which is what the server gave
  it) is a final-channel message again, ``<|start|>assistant<|channel|>final<|message|>TEXT<|end|>`` (as the
  gpt-oss chat template and vLLM write it); an answer that is already harmony (the official ``chat``'s history
  keeps the special tokens) is written as it is.

The JSON schema -> TypeScript rules (the comments for titles, descriptions, examples and defaults, ``?`` for
optional properties, ``oneOf`` as ``|`` lines, ``nullable``) follow openai-harmony's, so the declarations are the
text gpt-oss was trained on. This module only writes text; the tool-call format that uses it is
``tool_calls.HARMONY``, and the answer's calls are parsed by ``harmony.py``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["CHANNELS_WITH_FUNCTIONS", "DEVELOPER_HEADER", "call_turn", "history_answer", "result_header",
           "system_with_functions", "tools_section", "typescript"]

#: The header of the developer message that offers the functions (its body: :func:`tools_section`).
DEVELOPER_HEADER = "<|start|>developer<|message|>"
#: Harmony's channel section of a system message when the conversation offers functions.
CHANNELS_WITH_FUNCTIONS = ("# Valid channels: analysis, commentary, final. Channel must be included for every "
                           "message.\nCalls to these tools must go to the commentary channel: 'functions'.")
_CHANNELS = re.compile(r"# Valid channels:[^\n]*(\nCalls to these tools[^\n]*)?$")


def system_with_functions(system: str) -> str:
    """The system message of a conversation that offers functions: its ``# Valid channels`` section (the
    last one; InternVL3.5-GPT-OSS's says ``final`` only) replaced by harmony's, or harmony's appended."""
    match = _CHANNELS.search(system)
    if match is not None:
        return system[:match.start()] + CHANNELS_WITH_FUNCTIONS
    return f"{system}\n\n{CHANNELS_WITH_FUNCTIONS}" if system else CHANNELS_WITH_FUNCTIONS


def tools_section(functions: Sequence[tuple[str, str | None, Mapping[str, Any] | None]]) -> str:
    """The developer message's body: ``# Tools`` and the ``functions`` namespace of (name, description,
    parameters) declarations."""
    lines = ["## functions\n", "namespace functions {\n"]
    for name, description, parameters in functions:
        lines.extend(f"// {line}" for line in (description or "").splitlines())
        if parameters is None:
            lines.append(f"type {name} = () => any;\n")
        else:
            lines.append(f"type {name} = (_: {typescript(parameters)}) => any;\n")
    lines.append("} // namespace functions")
    return "# Tools\n\n" + "\n".join(lines)


def call_turn(name: str, arguments: str) -> str:
    """One call of the history, whole (header, arguments, ``<|call|>``)."""
    return f"<|start|>assistant to=functions.{name}<|channel|>commentary json<|message|>{arguments}<|call|>"


def result_header(name: str) -> str:
    """The header of a function's result (its text follows, then ``<|end|>``)."""
    return f"<|start|>functions.{name} to=assistant<|channel|>commentary<|message|>"


def history_answer(text: str) -> str:
    """An earlier answer of the history, after ``<|start|>assistant``: a final-channel message unless it is
    harmony already (it starts with a header: ``<|channel|>`` or a recipient)."""
    if text.startswith(("<|channel|>", " to=")):
        return text
    return "<|channel|>final<|message|>" + text


# -- JSON schema -> TypeScript ------------------------------------------------------------------------


def _is_enum(schema: Mapping[str, Any]) -> bool:
    values = schema.get("enum")
    return isinstance(values, list) and bool(values)


def _default(schema: Mapping[str, Any]) -> str:
    """``default: ...`` as harmony writes it: a string quoted unless the schema is an enum."""
    value = schema["default"]
    if isinstance(value, str):
        return f"default: {value}" if _is_enum(schema) else f'default: "{value}"'
    return f"default: {json.dumps(value, separators=(',', ':'), ensure_ascii=False)}"


def _nullable(schema: Any, text: str) -> str:
    if isinstance(schema, Mapping) and schema.get("nullable") is True and "null" not in text:
        return f"{text} | null"
    return text


def _variant_lines(variants: list[Any], indent: str, skip_first_description: bool,
                   property_description: str | None) -> str:
    """The ``| type // comments`` lines of a ``oneOf``."""
    out = ""
    for i, variant in enumerate(variants):
        out += f"{indent} | " + _nullable(variant, typescript(variant, indent + "   "))
        comments = []
        description = variant.get("description") if isinstance(variant, Mapping) else None
        if isinstance(description, str) and not (i == 0 and skip_first_description) \
                and description != property_description:
            comments.append(description)
        if isinstance(variant, Mapping) and "default" in variant:
            comments.append(_default(variant))
        if comments:
            out += " // " + " ".join(comments)
        out += "\n"
    return out


def _property(key: str, value: Any, indent: str, required: bool) -> str:
    """One property of an object: its comments, then ``key?: type,``."""
    schema: Mapping[str, Any] = value if isinstance(value, Mapping) else {}
    out = ""
    if isinstance(schema.get("title"), str):
        out += f"{indent}// {schema['title']}\n{indent}//\n"
    description = schema.get("description") if isinstance(schema.get("description"), str) else None
    variants = schema.get("oneOf")
    if description is not None and not isinstance(variants, list):
        out += f"{indent}// {description}\n"
    examples = schema.get("examples")
    if isinstance(examples, list) and examples:
        out += f"{indent}// Examples:\n"
        out += "".join(f'{indent}// - "{example}"\n' for example in examples if isinstance(example, str))
    mark = "" if required else "?"
    if isinstance(variants, list):
        first = variants[0] if variants and isinstance(variants[0], Mapping) else {}
        above = description is not None and description != first.get("description")
        if above:
            out += f"{indent}// {description}\n"
        if "default" in schema:
            out += f"{indent}// {_default(schema)}\n"
        out += f"{indent}{key}{mark}:\n" + _variant_lines(variants, indent, above, description) + f"{indent},\n"
        return out
    out += f"{indent}{key}{mark}: " + _nullable(schema, typescript(schema, indent + "    ")) + ","
    if "default" in schema:
        out += f" // {_default(schema)}"
    return out + "\n"


def typescript(schema: Any, indent: str = "") -> str:
    """A JSON schema (OpenAPI style, as OpenAI's ``parameters``) as the TypeScript type harmony shows."""
    if not isinstance(schema, Mapping):
        return "any"
    variants = schema.get("oneOf")
    if isinstance(variants, list):
        return "\n" + _variant_lines(variants, indent, False, None).rstrip("\n")
    kind = schema.get("type")
    if isinstance(kind, list):
        names = ["number" if k == "integer" else k for k in kind if isinstance(k, str)]
        if names:
            return " | ".join(names)
        kind = None
    if kind == "object":
        out = f"{indent}// {schema['description']}\n" if isinstance(schema.get("description"), str) else ""
        out += "{\n"
        properties = schema.get("properties")
        listed = schema.get("required")
        required: list[Any] = listed if isinstance(listed, list) else []
        if isinstance(properties, Mapping):
            for key, value in properties.items():
                out += _property(key, value, indent, key in required)
        return out + f"{indent}}}"
    if kind == "string":
        values = [f'"{v}"' for v in schema.get("enum") or [] if isinstance(v, str)]
        return " | ".join(values) if values else "string"
    if kind in ("number", "integer"):
        return "number"
    if kind == "boolean":
        return "boolean"
    if kind == "array":
        return f"{typescript(schema['items'], indent)}[]" if "items" in schema else "Array<any>"
    return "any"
