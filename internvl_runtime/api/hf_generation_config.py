"""``model.generation_config``: the checkpoint's generation_config.json as transformers shows it.

A ``GenerationConfig``-like object: every transformers (4.37) generation option as an attribute, at
transformers' default unless the file sets it, ``to_dict()`` (all of them) and ``to_diff_dict()`` (those
that differ from the defaults). Code that reads ``model.generation_config.eos_token_id`` or copies its
values into a ``chat`` generation dict works as with the official model. The object is informational:
``chat``/``generate`` take their options from the dict they are given, as the official ones do.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from ..errors import ConfigError

#: transformers 4.37.2's ``GenerationConfig`` defaults.
DEFAULTS: dict[str, Any] = {
    "max_length": 20, "max_new_tokens": None, "min_length": 0, "min_new_tokens": None, "early_stopping": False,
    "max_time": None, "do_sample": False, "num_beams": 1, "num_beam_groups": 1, "penalty_alpha": None,
    "use_cache": True, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "typical_p": 1.0, "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0, "diversity_penalty": 0.0, "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0,
    "length_penalty": 1.0, "no_repeat_ngram_size": 0, "bad_words_ids": None, "force_words_ids": None,
    "renormalize_logits": False, "constraints": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
    "remove_invalid_values": False, "exponential_decay_length_penalty": None, "suppress_tokens": None,
    "begin_suppress_tokens": None, "forced_decoder_ids": None, "sequence_bias": None, "guidance_scale": None,
    "low_memory": None, "num_return_sequences": 1, "output_attentions": False, "output_hidden_states": False,
    "output_scores": False, "return_dict_in_generate": False, "pad_token_id": None, "bos_token_id": None,
    "eos_token_id": None, "encoder_no_repeat_ngram_size": 0, "decoder_start_token_id": None,
    "num_assistant_tokens": 5, "num_assistant_tokens_schedule": "heuristic",
}


class GenerationConfig:
    """transformers' defaults overlaid with the given values (a file's, or keywords); attribute access."""

    def __init__(self, **kwargs: Any) -> None:
        self._from_model_config = bool(kwargs.pop("_from_model_config", False))
        self.transformers_version = kwargs.pop("transformers_version", None)
        for name, value in {**copy.deepcopy(DEFAULTS), **kwargs}.items():
            setattr(self, name, value)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> GenerationConfig:
        """The folder's generation_config.json, or transformers' defaults when it has none."""
        file = Path(folder) / "generation_config.json"
        if not file.is_file():
            return cls()
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{file}: cannot be parsed as JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{file}: expected a JSON object")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """Every option (the defaults included) and ``transformers_version``, as transformers' ``to_dict``."""
        out = {k: copy.deepcopy(v) for k, v in vars(self).items() if k != "_from_model_config"}
        if self._from_model_config:
            out["_from_model_config"] = True
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        """The options that differ from transformers' defaults."""
        return {k: v for k, v in self.to_dict().items() if k not in DEFAULTS or DEFAULTS[k] != v}

    def update(self, **kwargs: Any) -> dict[str, Any]:
        """Set the given options that exist; returns the others (transformers' ``update``)."""
        unused = {}
        for name, value in kwargs.items():
            if hasattr(self, name):
                setattr(self, name, value)
            else:
                unused[name] = value
        return unused

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GenerationConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"GenerationConfig({json.dumps(self.to_diff_dict(), sort_keys=True, default=str)})"
