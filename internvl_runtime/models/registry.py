"""Exact ``llm_config.architectures[0]`` string -> decoder class. No fuzzy matching."""

from __future__ import annotations

from ..errors import UnknownArchitectureError
from .decoders.base import DecoderForCausalLM
from .decoders.internlm2 import InternLM2ForCausalLM
from .decoders.llama import LlamaForCausalLM
from .decoders.phi3 import Phi3ForCausalLM
from .decoders.qwen2 import Qwen2ForCausalLM
from .decoders.qwen3 import Qwen3ForCausalLM
from .decoders.qwen3_moe import Qwen3MoeForCausalLM

DECODERS: dict[str, type[DecoderForCausalLM]] = {
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "InternLM2ForCausalLM": InternLM2ForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
}


def decoder_class(architecture: str, source: str | None = None) -> type[DecoderForCausalLM]:
    """The decoder class; ``source`` (the config file) is named in the error."""
    try:
        return DECODERS[architecture]
    except KeyError:
        where = f"{source}: " if source else ""
        raise UnknownArchitectureError(
            f"{where}llm_config.architectures[0] = {architecture!r} is not supported; "
            f"known: {', '.join(sorted(DECODERS))}") from None
