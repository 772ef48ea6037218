"""``ModelOutput``: what transformers' output dataclasses let callers do, for ours (``CausalLMOutput`` of
``forward``, ``GenerateOutput`` of ``generate``): read a field by attribute, by key (``out["logits"]``) or by
position over the fields that are set (``out[0]``), iterate over those keys, test ``"scores" in out``."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import fields
from typing import Any


class ModelOutput:
    """Mix into a dataclass: keys are its fields whose value is not None, in order."""

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]  # type: ignore[arg-type]

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(getattr(self, key) for key in self.keys())

    def __getitem__(self, key: str | int) -> Any:
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __contains__(self, key: object) -> bool:
        return key in self.keys()
