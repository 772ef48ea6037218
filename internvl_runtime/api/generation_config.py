"""LMDeploy's ``GenerationConfig`` (its fields and defaults, LMDeploy 0.18), mapped to ``SamplingParams``.

``do_sample=False`` (the default) is greedy whatever the temperature, as in LMDeploy. The fields map as:
``stop_words`` -> ``stop``, ``random_seed`` -> ``seed``, ``bad_words`` / ``bad_token_ids`` -> those tokens
banned (a logit bias of -100, which no other token's lead can overcome in practice), and the rest by name
(``n``, ``min_p``, ``stop_token_ids``, ``skip_special_tokens``, ``include_stop_str_in_output``,
``response_format``, ``logprobs``, ...). ``output_logits`` (``"generation"`` or ``"all"``) puts the logits on
the finished ``Response.logits`` (``api.scoring.answer_logits``). ``n`` answers per prompt are separate requests; with a
``random_seed`` the k-th uses ``random_seed + k`` so that sampled answers differ, as separate seeds would.

Fields this runtime cannot honour raise :class:`~internvl_runtime.errors.UnsupportedFeature` when set:
``logits_processors`` (Python callbacks on the engine loop), ``output_last_hidden_state``,
``logprob_start_len`` (prompt logprobs) and ``return_ppl`` (use ``Pipeline.get_ppl``), the disaggregation
fields and the n-gram early stop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..engine.sampling_params import MAX_ABS_LOGIT_BIAS, SamplingParams
from ..errors import InvalidGenerationConfig, UnsupportedFeature
from ..processing.structured_output import StructuredOutput

#: Fields that must keep their default here: (name, default, why).
_UNSUPPORTED: tuple[tuple[str, Any, str], ...] = (
    ("logits_processors", None, "Python logits processors do not run on this engine"),
    ("output_last_hidden_state", None, "hidden states are not returned"),
    ("logprob_start_len", -1, "prompt logprobs are not returned; Pipeline.get_ppl gives a sequence's loss"),
    ("return_ppl", False, "use Pipeline.get_ppl"),
    ("with_cache", False, "KV cache migration (disaggregation) is not supported"),
    ("preserve_cache", False, "KV cache migration (disaggregation) is not supported"),
    ("migration_request", None, "KV cache migration (disaggregation) is not supported"),
    ("return_routed_experts", False, "InternVL2 models have no experts"),
    ("repetition_ngram_size", 0, "the n-gram repetition early stop is not supported"),
    ("repetition_ngram_threshold", 0, "the n-gram repetition early stop is not supported"),
)


@dataclass
class GenerationConfig:
    """LMDeploy's generation options (see the module docstring); ``max_dynamic_patch`` is this runtime's: the
    tile limit of every image of the request (an ``image_url`` part may carry its own)."""

    n: int = 1
    max_new_tokens: int = 512
    do_sample: bool = False
    top_p: float = 1.0
    top_k: int = 50
    min_p: float = 0.0
    temperature: float = 0.8
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    random_seed: int | None = None
    stop_words: list[str] | None = None
    bad_words: list[str] | None = None
    stop_token_ids: list[int] | None = None
    bad_token_ids: list[int] | None = None
    min_new_tokens: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logprobs: int | None = None
    logprob_start_len: int = -1
    # LMDeploy's: {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}},
    # {"type": "regex_schema", "regex_schema": "..."} or {"type": "json_object"}; enforced by token masks.
    response_format: dict[str, Any] | None = None
    logits_processors: list[Any] | None = None
    output_logits: str | None = None
    output_last_hidden_state: str | None = None
    include_stop_str_in_output: bool = False
    return_ppl: bool = False
    with_cache: bool = False
    preserve_cache: bool = False
    migration_request: Any = None
    return_routed_experts: bool = False
    repetition_ngram_size: int = 0
    repetition_ngram_threshold: int = 0
    max_dynamic_patch: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise InvalidGenerationConfig(f"n must be an integer >= 1, got {self.n!r}")
        for name, default, why in _UNSUPPORTED:
            if getattr(self, name) != default:
                raise UnsupportedFeature(f"GenerationConfig.{name}={getattr(self, name)!r} cannot be honoured: {why}")
        if self.output_logits not in (None, "all", "generation"):
            raise InvalidGenerationConfig(
                f'output_logits must be None, "all" or "generation", got {self.output_logits!r}')
        for name in ("bad_words", "stop_words"):
            words = getattr(self, name)
            if words is not None and (not isinstance(words, list) or not all(isinstance(w, str) and w for w in words)):
                raise InvalidGenerationConfig(f"{name} must be a list of non-empty strings, got {words!r}")
        self.to_sampling_params()           # every other value checked now, as LMDeploy checks at construction

    def banned_token_ids(self, tokenizer: Any) -> list[int]:
        """``bad_token_ids`` and the token of each of ``bad_words``. A bad word must be one token (LMDeploy
        cannot ban a longer one either: it warns and drops it; here that is an error, not a silent no-op)."""
        banned = list(self.bad_token_ids or [])
        for word in self.bad_words or []:
            if tokenizer is None:
                break
            ids = tokenizer.encode(word, add_special_tokens=False)
            if len(ids) != 1:
                raise InvalidGenerationConfig(f"bad_words: {word!r} is {len(ids)} tokens {ids}; only a word that is "
                                              "one token can be banned (ban token ids with bad_token_ids)")
            banned.append(ids[0])
        return banned

    def to_sampling_params(self, tokenizer: Any = None, *, copy: int = 0) -> SamplingParams:
        """The engine's params for the ``copy``-th of the ``n`` answers (``tokenizer`` resolves ``bad_words``)."""
        seed = None if self.random_seed is None else self.random_seed + copy
        bias = {token: -MAX_ABS_LOGIT_BIAS for token in self.banned_token_ids(tokenizer)}
        return SamplingParams(max_new_tokens=self.max_new_tokens, min_new_tokens=self.min_new_tokens or 0,
                              do_sample=self.do_sample, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, min_p=self.min_p, repetition_penalty=self.repetition_penalty,
                              ignore_eos=self.ignore_eos, seed=seed, stop=list(self.stop_words or []),
                              stop_token_ids=list(self.stop_token_ids or []), logprobs=self.logprobs,
                              skip_special_tokens=self.skip_special_tokens,
                              spaces_between_special_tokens=self.spaces_between_special_tokens,
                              include_stop_str_in_output=self.include_stop_str_in_output, logit_bias=bias,
                              structured_output=StructuredOutput.from_response_format(self.response_format))
