"""Per-request generation options, validated when they are built.

``SamplingParams`` is the one typed object the engine reads; the OpenAI routes and the
``chat(generation_config=...)`` path both end here. Every value is checked in ``__post_init__`` and a bad
one raises :class:`~internvl_runtime.errors.InvalidGenerationConfig` naming the field and its allowed
range, so nothing downstream has to re-check.

Example::

    >>> params = SamplingParams(max_new_tokens=64, temperature=0.7, top_p=0.9, seed=0)
    >>> params.is_greedy
    False
    >>> params, streamer = SamplingParams.from_generation_config({"max_new_tokens": 64, "do_sample": False})
    >>> params.is_greedy, streamer
    (True, None)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from internvl_runtime.errors import InvalidGenerationConfig
from internvl_runtime.processing.structured_output import StructuredOutput

MAX_LOGPROBS = 20
"""The largest number of top logprobs a request may ask for."""

MAX_ABS_PENALTY = 2.0
"""``presence_penalty`` and ``frequency_penalty`` lie in [-2, 2] (OpenAI's range)."""

MAX_ABS_LOGIT_BIAS = 100.0
"""A ``logit_bias`` value lies in [-100, 100] (OpenAI's range)."""

REPETITION_PENALTY_SCOPES = ("all", "generated")
"""Values of ``SamplingParams.repetition_penalty_scope``."""

_MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed accepts [0, 2**64 - 1]

# transformers' GenerationConfig defaults, used only by ``from_generation_config`` so that a dict the
# reference ``chat()`` would accept behaves the same here: sampling is off unless asked for, and
# sampling keeps the 50 most likely tokens unless ``top_k`` says otherwise.
_HF_DEFAULT_DO_SAMPLE = False
_HF_DEFAULT_TOP_K = 50

# Keys of a checkpoint's generation_config.json that carry no generation option (file metadata and
# token ids the engine takes from the tokenizer); accepted and ignored by name, never silently by pattern.
_GENERATION_CONFIG_METADATA = frozenset({"_from_model_config", "transformers_version", "bos_token_id"})

_GENERATION_CONFIG_KEYS = frozenset(
    {
        "max_new_tokens",
        "min_new_tokens",
        "do_sample",
        "temperature",
        "top_p",
        "top_k",
        "repetition_penalty",
        "num_beams",
        "length_penalty",
        "early_stopping",
        "num_return_sequences",
        "no_repeat_ngram_size",
        "max_length",
        "use_cache",
        "eos_token_id",
        "pad_token_id",
        "streamer",
    }
)


def _fail(name: str, allowed: str, value: object) -> InvalidGenerationConfig:
    return InvalidGenerationConfig(f"{name} must be {allowed}, got {value!r}")


def _check_int(name: str, value: object, lo: int, hi: int | None = None) -> int:
    allowed = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(name, allowed, value)
    if value < lo or (hi is not None and value > hi):
        raise _fail(name, allowed, value)
    return value


def _check_float(name: str, value: object, allowed: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(name, allowed, value)
    return float(value)


@dataclass
class SamplingParams:
    """How to generate the tokens of one request.

    Attributes:
        max_new_tokens: generate at most this many tokens (>= 1).
        min_new_tokens: stop tokens (EOS and ``stop_token_ids``) are masked until this many tokens
            exist (0 <= min_new_tokens <= max_new_tokens).
        temperature: softmax temperature (>= 0). 0 means greedy unless ``do_sample`` is True.
        top_p: nucleus sampling; keep the smallest set of tokens whose probability sums to at least
            ``top_p`` (0 < top_p <= 1; 1 = off).
        top_k: keep the ``top_k`` most likely tokens (0 or -1 = off).
        repetition_penalty: transformers' CTRL-style penalty (> 0; 1 = off).
        repetition_penalty_scope: which token ids count as seen by the penalty. ``"all"`` (default): the
            prompt and the generated tokens, as vLLM, and transformers' ``generate`` given ``input_ids``.
            ``"generated"``: ``repetition_penalty_prefix_ids`` then the generated tokens, not the prompt;
            the official InternVL ``generate`` calls transformers' with ``inputs_embeds`` only, so its
            ``RepetitionPenaltyLogitsProcessor`` sees only the ids it tracks: the bos it starts from
            (the prefix) and the generated tokens.
        repetition_penalty_prefix_ids: ids counted as seen before the generated ones when the scope is
            ``"generated"`` (the official ``generate()`` passes the LLM's bos); empty with ``"all"``.
        do_sample: None derives it from ``temperature > 0``; False is greedy whatever the temperature
            (as in transformers); True samples and then needs ``temperature > 0``.
        ignore_eos: keep generating after the model's EOS token (``stop_token_ids`` still stop).
        stop: strings that end the output; the detokenizer finds them (a single string is accepted).
        stop_token_ids: token ids that end the output (the token is not part of the text).
        seed: seeds this request's own random generator, so its samples do not depend on the batch.
        logprobs: return the log-probability of each chosen token and of the ``logprobs`` most likely
            tokens (0 = the chosen token's only; at most 20).
        skip_special_tokens: leave special tokens out of the text (default, as vLLM and LMDeploy).
        spaces_between_special_tokens: accepted for vLLM's and LMDeploy's clients; the tokenizers here decode
            like Hugging Face's fast tokenizers, which never put spaces between special tokens, so the text is
            the same either way.
        include_stop_str_in_output: keep the stop string that ended the output at its end.
        num_beams: beam search with this many beams when > 1 (transformers' ``BeamSearchScorer``); only
            ``api.chat``'s ``generate`` runs it (``engine.beam_search``), the engine refuses it.
        length_penalty: beam search ranks a hypothesis by its summed logprobs / length ** length_penalty.
        early_stopping: beam search stop rule, as transformers: True, False (heuristic) or ``"never"``.
        num_return_sequences: hypotheses returned per prompt (beam search; at most ``num_beams``).
        no_repeat_ngram_size: transformers' ``NoRepeatNGramLogitsProcessor``: a token that would complete an
            n-gram of this size already present in the penalty history (the ids the repetition penalty counts
            as seen, see ``repetition_penalty_scope``) gets -inf; 0 = off.
        presence_penalty: OpenAI's: subtracted once from the logit of every token generated so far
            (in [-2, 2]; 0 = off; the prompt does not count, as in OpenAI and vLLM).
        frequency_penalty: OpenAI's: subtracted from each token's logit times the number of times it was
            generated so far (in [-2, 2]; 0 = off).
        logit_bias: token id -> bias in [-100, 100], added to that token's logit before anything else.
            Keys may be ints or decimal strings (OpenAI's JSON keys); an id outside the model's vocabulary
            is refused by ``LLMEngine.add_request`` (InvalidRequest), as vLLM does.
        min_p: vLLM's min-p: after temperature, drop the tokens whose probability is below
            ``min_p`` times the most likely token's (in [0, 1]; 0 = off; no effect on greedy rows).
        structured_output: the output must match this constraint (a JSON schema, a regex, a choice, a
            grammar...); the engine masks the logits with the grammar engine, and the request finishes
            (reason "stop") when the constraint is complete.

    Example::

        SamplingParams(max_new_tokens=128, temperature=0)           # greedy
        SamplingParams(temperature=0.8, top_p=0.95, stop=["\\n\\n"], seed=1)
    """

    max_new_tokens: int = 512
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    repetition_penalty_scope: str = "all"
    repetition_penalty_prefix_ids: list[int] = field(default_factory=list)
    do_sample: bool | None = None
    ignore_eos: bool = False
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1
    no_repeat_ngram_size: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    min_p: float = 0.0
    structured_output: StructuredOutput | None = None

    def __post_init__(self) -> None:
        self.max_new_tokens = _check_int("max_new_tokens", self.max_new_tokens, 1)
        self.min_new_tokens = _check_int("min_new_tokens", self.min_new_tokens, 0, self.max_new_tokens)
        self.temperature = _check_float("temperature", self.temperature, "a finite number >= 0")
        if self.temperature < 0:
            raise _fail("temperature", "a finite number >= 0", self.temperature)
        self.top_p = _check_float("top_p", self.top_p, "a number in (0, 1]")
        if not 0 < self.top_p <= 1:
            raise _fail("top_p", "a number in (0, 1]", self.top_p)
        self.top_k = _check_int("top_k", self.top_k, -1)
        self.repetition_penalty = _check_float("repetition_penalty", self.repetition_penalty, "a finite number > 0")
        if self.repetition_penalty <= 0:
            raise _fail("repetition_penalty", "a finite number > 0", self.repetition_penalty)
        if self.repetition_penalty_scope not in REPETITION_PENALTY_SCOPES:
            raise _fail("repetition_penalty_scope", " or ".join(map(repr, REPETITION_PENALTY_SCOPES)),
                        self.repetition_penalty_scope)
        ids = self.repetition_penalty_prefix_ids
        if not isinstance(ids, (list, tuple)):
            raise _fail("repetition_penalty_prefix_ids", "a list of integers >= 0", ids)
        self.repetition_penalty_prefix_ids = [_check_int("repetition_penalty_prefix_ids", i, 0) for i in ids]
        if self.repetition_penalty_prefix_ids and self.repetition_penalty_scope != "generated":
            raise _fail("repetition_penalty_prefix_ids", 'empty unless repetition_penalty_scope is "generated"',
                        self.repetition_penalty_prefix_ids)
        if self.do_sample is not None and not isinstance(self.do_sample, bool):
            raise _fail("do_sample", "true, false or null", self.do_sample)
        if self.do_sample is True and self.temperature == 0:
            raise _fail("temperature", "> 0 when do_sample is true", self.temperature)
        for name in ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens",
                     "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise _fail(name, "true or false", getattr(self, name))
        self.stop = self._check_stop(self.stop)
        self.stop_token_ids = self._check_stop_token_ids(self.stop_token_ids)
        if self.seed is not None:
            self.seed = _check_int("seed", self.seed, 0, _MAX_SEED)
        if self.logprobs is not None:
            self.logprobs = _check_int("logprobs", self.logprobs, 0, MAX_LOGPROBS)
        for name in ("presence_penalty", "frequency_penalty"):
            allowed = f"a number in [{-MAX_ABS_PENALTY:g}, {MAX_ABS_PENALTY:g}]"
            value = _check_float(name, getattr(self, name), allowed)
            if abs(value) > MAX_ABS_PENALTY:
                raise _fail(name, allowed, value)
            setattr(self, name, value)
        self.logit_bias = self._check_logit_bias(self.logit_bias)
        self.min_p = _check_float("min_p", self.min_p, "a number in [0, 1]")
        if not 0 <= self.min_p <= 1:
            raise _fail("min_p", "a number in [0, 1]", self.min_p)
        if self.structured_output is not None and not isinstance(self.structured_output, StructuredOutput):
            raise _fail("structured_output", "a StructuredOutput or None", self.structured_output)
        self._check_beam_search()

    def _check_beam_search(self) -> None:
        self.num_beams = _check_int("num_beams", self.num_beams, 1)
        self.length_penalty = _check_float("length_penalty", self.length_penalty, "a finite number")
        if self.early_stopping not in (True, False, "never"):
            raise _fail("early_stopping", 'true, false or "never"', self.early_stopping)
        self.num_return_sequences = _check_int("num_return_sequences", self.num_return_sequences, 1, self.num_beams)
        self.no_repeat_ngram_size = _check_int("no_repeat_ngram_size", self.no_repeat_ngram_size, 0)

    @staticmethod
    def _check_stop(stop: object) -> list[str]:
        allowed = "a string or a list of non-empty strings"
        if stop is None:
            return []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise _fail("stop", allowed, stop)
        return list(stop)

    @staticmethod
    def _check_logit_bias(bias: object) -> dict[int, float]:
        allowed = f"a mapping of token ids (>= 0) to numbers in [{-MAX_ABS_LOGIT_BIAS:g}, {MAX_ABS_LOGIT_BIAS:g}]"
        if bias is None:
            return {}
        if not isinstance(bias, Mapping):
            raise _fail("logit_bias", allowed, bias)
        checked: dict[int, float] = {}
        for key, value in bias.items():
            token = int(key) if isinstance(key, str) and key.strip().isdecimal() else key
            token = _check_int("logit_bias token id", token, 0)
            number = _check_float(f"logit_bias[{token}]", value, allowed)
            if abs(number) > MAX_ABS_LOGIT_BIAS:
                raise _fail(f"logit_bias[{token}]", f"in [{-MAX_ABS_LOGIT_BIAS:g}, {MAX_ABS_LOGIT_BIAS:g}]", number)
            checked[token] = number
        return checked

    @staticmethod
    def _check_stop_token_ids(ids: object) -> list[int]:
        if ids is None:
            return []
        if not isinstance(ids, (list, tuple)):
            raise _fail("stop_token_ids", "a list of integers >= 0", ids)
        return [_check_int("stop_token_ids", i, 0) for i in ids]

    @property
    def is_greedy(self) -> bool:
        """True when the next token is the argmax: ``do_sample=False``, or ``temperature == 0`` by default."""
        if self.do_sample is None:
            return self.temperature == 0
        return not self.do_sample

    @classmethod
    def from_generation_config(cls, config: Mapping[str, Any], *, input_ids_length: int = 1
                               ) -> tuple[SamplingParams, Any]:
        """Build params from the reference ``chat(generation_config=...)`` dict (transformers keys).

        Accepted keys: max_new_tokens, min_new_tokens, do_sample, temperature, top_p, top_k,
        repetition_penalty, num_beams, eos_token_id (int or list -> ``stop_token_ids``),
        pad_token_id (accepted, unused) and streamer (returned, not interpreted), plus the metadata keys
        of a generation_config.json file (``_from_model_config``, ``transformers_version``,
        ``bos_token_id``), which are ignored. A value of None means "not given". Beam search also takes
        length_penalty, early_stopping and num_return_sequences (see the attributes); every mode takes
        no_repeat_ngram_size. ``use_cache`` is accepted and changes nothing (the KV cache is always used).
        ``max_length`` is transformers' total length: when ``max_new_tokens`` is not given (which wins, as
        in transformers), ``max_new_tokens = max_length - input_ids_length``. ``input_ids_length`` is the
        length transformers counts: 1 for the official ``generate()``, which hands the prompt to
        transformers as embeddings, so its ``input_ids`` are only the bos it starts from (the streamlit
        worker's ``max_length=8192`` allows 8191 new tokens there, and here).

        transformers' defaults apply to keys not given, so the same dict means the same thing here
        and in the reference: ``do_sample`` defaults to False (greedy) and ``top_k`` to 50. Two more
        settings follow from the reference ``generate()`` (transformers' ``generate`` given embeddings):
        it stops only at ``eos_token_id``, so ``ignore_eos`` is set (no other end token stops or is masked
        by ``min_new_tokens``); and its repetition penalty sees only the generated ids, so
        ``repetition_penalty_scope`` is ``"generated"`` (the caller adds the bos it starts from as
        ``repetition_penalty_prefix_ids``, as ``api.chat``'s ``generate()`` does).

        Returns:
            ``(params, streamer)``; ``streamer`` is None when the dict has none.

        Raises:
            InvalidGenerationConfig: an unknown key, or a value out of range.
        """
        if not isinstance(config, Mapping):
            raise _fail("generation_config", "a dict", config)
        unknown = sorted(str(k) for k in config if k not in _GENERATION_CONFIG_KEYS | _GENERATION_CONFIG_METADATA)
        if unknown:
            raise InvalidGenerationConfig(
                f"unknown generation_config key(s) {unknown}; accepted: {sorted(_GENERATION_CONFIG_KEYS)}"
            )
        given = {k: v for k, v in config.items() if v is not None and k in _GENERATION_CONFIG_KEYS}

        streamer = given.pop("streamer", None)
        use_cache = given.pop("use_cache", None)
        if use_cache is not None and not isinstance(use_cache, bool):
            raise _fail("use_cache", "true or false", use_cache)
        max_length = given.pop("max_length", None)
        if max_length is not None:
            max_length = _check_int("max_length", max_length, input_ids_length + 1)
            given.setdefault("max_new_tokens", max_length - input_ids_length)
        pad = given.pop("pad_token_id", None)
        if pad is not None:
            _check_int("pad_token_id", pad, 0)
        eos = given.pop("eos_token_id", [])
        eos_list = [eos] if isinstance(eos, int) and not isinstance(eos, bool) else eos
        if not isinstance(eos_list, (list, tuple)):
            raise _fail("eos_token_id", "an integer or a list of integers >= 0", eos)
        stop_token_ids = [_check_int("eos_token_id", i, 0) for i in eos_list]

        given.setdefault("do_sample", _HF_DEFAULT_DO_SAMPLE)
        given.setdefault("top_k", _HF_DEFAULT_TOP_K)
        return cls(stop_token_ids=stop_token_ids, ignore_eos=True, repetition_penalty_scope="generated",
                   **given), streamer
