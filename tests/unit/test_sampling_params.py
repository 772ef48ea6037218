"""SamplingParams: defaults, validation of every field, the generation_config mapping."""

from __future__ import annotations

import math

import pytest

from internvl_runtime.engine.sampling_params import MAX_LOGPROBS, SamplingParams
from internvl_runtime.errors import InvalidGenerationConfig
from internvl_runtime.processing.structured_output import StructuredOutput


def test_defaults() -> None:
    p = SamplingParams()
    assert (p.max_new_tokens, p.min_new_tokens, p.temperature, p.top_p, p.top_k) == (512, 0, 1.0, 1.0, 0)
    assert (p.repetition_penalty, p.do_sample, p.ignore_eos, p.seed, p.logprobs) == (1.0, None, False, None, None)
    assert p.stop == [] and p.stop_token_ids == []
    assert p.repetition_penalty_scope == "all" and p.repetition_penalty_prefix_ids == []
    assert not p.is_greedy


@pytest.mark.parametrize(
    ("kwargs", "greedy"),
    [
        ({"temperature": 0}, True),
        ({"temperature": 0.0, "do_sample": None}, True),
        ({"temperature": 0.7}, False),
        ({"temperature": 0.7, "do_sample": False}, True),  # transformers: do_sample=False is greedy
        ({"temperature": 0, "do_sample": False}, True),
        ({"temperature": 0.5, "do_sample": True}, False),
    ],
)
def test_is_greedy(kwargs: dict[str, object], greedy: bool) -> None:
    assert SamplingParams(**kwargs).is_greedy is greedy  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 2.0}, "max_new_tokens"),
        ({"max_new_tokens": True}, "max_new_tokens"),
        ({"min_new_tokens": -1}, "min_new_tokens"),
        ({"min_new_tokens": 11, "max_new_tokens": 10}, "min_new_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"temperature": "1"}, "temperature"),
        ({"temperature": 0, "do_sample": True}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_p": -0.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 1.5}, "top_k"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"repetition_penalty_scope": "prompt"}, "repetition_penalty_scope"),
        ({"repetition_penalty_scope": None}, "repetition_penalty_scope"),
        ({"repetition_penalty_scope": "generated", "repetition_penalty_prefix_ids": [-1]},
         "repetition_penalty_prefix_ids"),
        ({"repetition_penalty_scope": "generated", "repetition_penalty_prefix_ids": 1},
         "repetition_penalty_prefix_ids"),
        ({"repetition_penalty_prefix_ids": [1]}, "repetition_penalty_prefix_ids"),  # only with "generated"
        ({"do_sample": "yes"}, "do_sample"),
        ({"ignore_eos": 1}, "ignore_eos"),
        ({"stop": [""]}, "stop"),
        ({"stop": [1]}, "stop"),
        ({"stop": 3}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"stop_token_ids": 5}, "stop_token_ids"),
        ({"stop_token_ids": ["a"]}, "stop_token_ids"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"seed": 1.0}, "seed"),
        ({"logprobs": -1}, "logprobs"),
        ({"logprobs": MAX_LOGPROBS + 1}, "logprobs"),
        ({"presence_penalty": 2.01}, "presence_penalty"),
        ({"presence_penalty": math.nan}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"frequency_penalty": "1"}, "frequency_penalty"),
        ({"logit_bias": {5: 100.5}}, "logit_bias"),
        ({"logit_bias": {5: -101}}, "logit_bias"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias"),
        ({"logit_bias": {"x": 1.0}}, "logit_bias"),
        ({"logit_bias": {5: "1"}}, "logit_bias"),
        ({"logit_bias": [1, 2]}, "logit_bias"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.5}, "min_p"),
        ({"structured_output": {"json_object": True}}, "structured_output"),
    ],
)
def test_invalid_values_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidGenerationConfig, match=field):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


def test_valid_edges_and_normalisation() -> None:
    p = SamplingParams(
        max_new_tokens=1,
        min_new_tokens=1,
        temperature=2,
        top_p=1,
        top_k=-1,
        stop="###",  # type: ignore[arg-type]
        stop_token_ids=(3, 4),  # type: ignore[arg-type]
        seed=0,
        logprobs=MAX_LOGPROBS,
    )
    assert p.stop == ["###"] and p.stop_token_ids == [3, 4]
    assert isinstance(p.temperature, float) and isinstance(p.top_p, float)
    assert SamplingParams(logprobs=0).logprobs == 0
    assert SamplingParams(seed=2**64 - 1).seed == 2**64 - 1


def test_from_generation_config_reference_dict() -> None:
    params, streamer = SamplingParams.from_generation_config({"max_new_tokens": 1024, "do_sample": True})
    assert streamer is None
    assert params.max_new_tokens == 1024 and not params.is_greedy
    assert params.top_k == 50  # transformers' default applies when top_k is not given
    # the reference generate() stops only at eos_token_id and penalises only what it generates
    assert params.ignore_eos and params.repetition_penalty_scope == "generated"
    assert params.repetition_penalty_prefix_ids == []


def test_from_generation_config_defaults_to_greedy_like_transformers() -> None:
    params, _ = SamplingParams.from_generation_config({"temperature": 0.7, "top_p": 0.9})
    assert params.is_greedy and params.temperature == 0.7


def test_from_generation_config_all_keys() -> None:
    marker = object()
    params, streamer = SamplingParams.from_generation_config(
        {
            "max_new_tokens": 8,
            "min_new_tokens": 2,
            "do_sample": True,
            "temperature": 0.5,
            "top_p": 0.8,
            "top_k": 0,
            "repetition_penalty": 1.1,
            "num_beams": 1,
            "eos_token_id": [2, 92542],
            "pad_token_id": 2,
            "streamer": marker,
        }
    )
    assert streamer is marker
    assert params == SamplingParams(
        max_new_tokens=8,
        min_new_tokens=2,
        do_sample=True,
        temperature=0.5,
        top_p=0.8,
        top_k=0,
        repetition_penalty=1.1,
        stop_token_ids=[2, 92542],
        ignore_eos=True,
        repetition_penalty_scope="generated",
    )
    single, _ = SamplingParams.from_generation_config({"eos_token_id": 7, "top_k": None, "temperature": None})
    assert single.stop_token_ids == [7] and single.top_k == 50 and single.temperature == 1.0


def test_repetition_penalty_scope_values() -> None:
    assert SamplingParams(repetition_penalty_scope="generated").repetition_penalty_prefix_ids == []
    p = SamplingParams(repetition_penalty_scope="generated", repetition_penalty_prefix_ids=(7,))  # type: ignore[arg-type]
    assert p.repetition_penalty_prefix_ids == [7]


def test_from_generation_config_file_metadata_is_ignored() -> None:
    params, _ = SamplingParams.from_generation_config({"_from_model_config": True, "transformers_version": "4.37.2"})
    assert params.is_greedy


def test_from_generation_config_unknown_key() -> None:
    with pytest.raises(InvalidGenerationConfig, match="typo_top_p"):
        SamplingParams.from_generation_config({"max_new_tokens": 4, "typo_top_p": 1.0})


def test_from_generation_config_beam_search_keys() -> None:
    params, _ = SamplingParams.from_generation_config(
        {"num_beams": 4, "length_penalty": 0.5, "early_stopping": "never", "num_return_sequences": 3})
    assert (params.num_beams, params.length_penalty, params.early_stopping, params.num_return_sequences) == (
        4, 0.5, "never", 3)
    default, _ = SamplingParams.from_generation_config({})
    assert (default.num_beams, default.length_penalty, default.early_stopping, default.num_return_sequences) == (
        1, 1.0, False, 1)  # transformers' GenerationConfig defaults


@pytest.mark.parametrize(("config", "field"), [
    ({"num_beams": 0}, "num_beams"),
    ({"num_beams": 2, "num_return_sequences": 3}, "num_return_sequences"),
    ({"num_return_sequences": 2}, "num_return_sequences"),
    ({"num_beams": 2, "early_stopping": "always"}, "early_stopping"),
    ({"num_beams": 2, "length_penalty": float("nan")}, "length_penalty"),
])
def test_from_generation_config_beam_search_values(config: dict, field: str) -> None:
    with pytest.raises(InvalidGenerationConfig, match=field):
        SamplingParams.from_generation_config(config)


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"eos_token_id": "x"}, "eos_token_id"),
        ({"eos_token_id": [1, -2]}, "eos_token_id"),
        ({"pad_token_id": -3}, "pad_token_id"),
        ({"top_p": 2.0}, "top_p"),
        ({"do_sample": True, "temperature": 0.0}, "temperature"),  # transformers refuses it too
        ([("max_new_tokens", 3)], "generation_config"),
    ],
)
def test_from_generation_config_bad_values(config: object, field: str) -> None:
    with pytest.raises(InvalidGenerationConfig, match=field):
        SamplingParams.from_generation_config(config)  # type: ignore[arg-type]


def test_openai_penalties_logit_bias_min_p_and_structured_output() -> None:
    p = SamplingParams(presence_penalty=-2, frequency_penalty=2, logit_bias={"50256": -100, 7: 100}, min_p=1)
    assert (p.presence_penalty, p.frequency_penalty, p.min_p) == (-2.0, 2.0, 1.0)
    assert p.logit_bias == {50256: -100.0, 7: 100.0}   # OpenAI's JSON keys are strings
    assert SamplingParams(logit_bias=None).logit_bias == {}  # type: ignore[arg-type]
    defaults = SamplingParams()
    assert (defaults.presence_penalty, defaults.frequency_penalty, defaults.logit_bias, defaults.min_p,
            defaults.structured_output) == (0.0, 0.0, {}, 0.0, None)
    constraint = StructuredOutput(regex="[a-z]+")
    assert SamplingParams(structured_output=constraint).structured_output is constraint
