"""What to quantize and how: ``QuantizationConfig``, and the official keywords resolved into one.

``AutoModel.from_pretrained`` takes the official ``load_in_8bit=True`` / ``load_in_4bit=True`` and our
``quantization=`` ("int8", "int4", a dict or a ``QuantizationConfig``). All of them become one
``QuantizationConfig`` here, or None for a 16/32-bit model; contradictory requests are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import InvalidRequest

#: Group sizes the int4 kernels accept (torch's tinygemm on CUDA and its CPU port).
INT4_GROUP_SIZES = (32, 64, 128, 256)


@dataclass(frozen=True)
class QuantizationConfig:
    """Weight-only quantization of the LLM's linear layers.

    mode: "int8" (symmetric, one scale per output channel) or "int4" (asymmetric, one bf16 scale and
    zero per ``group_size`` input columns, the tinygemm format).
    group_size: int4 only; a layer whose input width it does not divide uses the largest smaller
    group size that does (down to 32), else falls back to int8 (logged).
    include_vision: also quantize the vision encoder and ``mlp1`` (off by default: the official
    model card warns that 4-bit breaks the 6B InternViT; a warning is raised when set).

    Example::

        model = AutoModel.from_pretrained(path, torch_dtype=torch.bfloat16,
                                          quantization=QuantizationConfig("int4", group_size=64))
    """

    mode: str
    group_size: int = 128
    include_vision: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("int8", "int4"):
            raise InvalidRequest(f"quantization mode must be 'int8' or 'int4', got {self.mode!r}")
        if self.group_size not in INT4_GROUP_SIZES:
            raise InvalidRequest(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {self.group_size!r}")

    @property
    def bits(self) -> int:
        return 8 if self.mode == "int8" else 4

    @classmethod
    def parse(cls, value: Any) -> QuantizationConfig | None:
        """None, "int8", "int4", "int4:g64" (group size), a dict of the fields, or a config."""
        if value is None or isinstance(value, QuantizationConfig):
            return value
        if isinstance(value, str):
            mode, _, group = value.partition(":g")
            try:
                return cls(mode, int(group)) if group else cls(mode)
            except ValueError:
                raise InvalidRequest(f"quantization {value!r} is not 'int8', 'int4' or 'int4:g<group size>'") from None
        if isinstance(value, dict):
            unknown = set(value) - {"mode", "group_size", "include_vision"}
            if unknown:
                raise InvalidRequest(f"unknown quantization option(s): {', '.join(sorted(unknown))}")
            if "mode" not in value:
                raise InvalidRequest("a quantization dict needs a 'mode' ('int8' or 'int4')")
            return cls(**value)
        raise InvalidRequest(f"quantization must be None, a string, a dict or a QuantizationConfig, got {value!r}")


def resolve_quantization(quantization: Any = None, *, load_in_8bit: bool = False,
                         load_in_4bit: bool = False) -> QuantizationConfig | None:
    """One config from the official keywords and ours; conflicting requests raise ``InvalidRequest``."""
    if load_in_8bit and load_in_4bit:
        raise InvalidRequest("load_in_8bit and load_in_4bit are both set; choose one")
    config = QuantizationConfig.parse(quantization)
    keyword = "int8" if load_in_8bit else "int4" if load_in_4bit else None
    if keyword is None:
        return config
    if config is not None and config.mode != keyword:
        raise InvalidRequest(f"load_in_{keyword[3:]}bit=True contradicts quantization={config.mode!r}")
    return config or QuantizationConfig(keyword)
