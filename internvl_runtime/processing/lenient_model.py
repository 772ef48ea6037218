"""The base of every request model: lenient where real clients need it, strict where it matters.

What OpenAI-compatible clients send goes beyond what a server implements: the openai SDK's ``model_dump()`` of
an answer carries ``tool_calls: null``, ``refusal: null``, ``audio: null``; LMDeploy sends ``min_new_tokens:
null``; agent frameworks add ``cache_control`` to text parts. So, as vLLM does:

- ``null`` means "not given": the field takes its default (``"n": null`` is ``n = 1``);
- an unknown field is accepted and ignored, and logged once per name (so an operator sees what clients send);
  with the validation context ``{"strict_protocol": True}`` (``internvl serve --strict-protocol``) it is a
  validation error naming the field instead;
- types and ranges stay strict (``strict=True``: ``"5"`` is not an integer, ``1`` is not ``true``): a wrong
  value is a clear 400, never a silent default.

Example::

    class Thing(LenientModel):
        n: int = 1

    Thing.model_validate({"n": None, "extra": 1}).n                     # 1; "extra" logged once
    Thing.model_validate({"extra": 1}, context={"strict_protocol": True})  # ValidationError: extra
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, model_validator
from pydantic_core import PydanticCustomError

__all__ = ["STRICT_PROTOCOL", "LenientModel", "reset_logged_unknown_fields"]

logger = logging.getLogger(__name__)

STRICT_PROTOCOL = "strict_protocol"
"""The validation-context key that turns unknown fields into errors."""

_logged: set[str] = set()
_logged_lock = threading.Lock()


def reset_logged_unknown_fields() -> None:
    """Forget which unknown field names were logged (tests)."""
    with _logged_lock:
        _logged.clear()


def _log_once(model: str, names: list[str]) -> None:
    with _logged_lock:
        new = [f"{model}.{name}" for name in names if f"{model}.{name}" not in _logged]
        _logged.update(new)
    for name in new:
        logger.warning("request field %r is unknown here: accepted and ignored (logged once per name; "
                       "internvl serve --strict-protocol refuses unknown fields)", name)


class LenientModel(BaseModel):
    """Strict types, ``null`` as the default, unknown fields accepted and logged once (see the module)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _lenient(cls, data: Any, info: ValidationInfo) -> Any:
        if not isinstance(data, dict):
            return data
        data = {key: value for key, value in data.items() if value is not None}
        known = set(cls.model_fields) | {f.alias for f in cls.model_fields.values() if f.alias}
        unknown = [str(key) for key in data if key not in known]
        if unknown:
            if isinstance(info.context, dict) and info.context.get(STRICT_PROTOCOL):
                raise PydanticCustomError("extra_forbidden", "unknown field(s) {names} (this server runs with "
                                          "--strict-protocol)", {"names": ", ".join(map(repr, unknown))})
            _log_once(cls.__name__, unknown)
        return data
