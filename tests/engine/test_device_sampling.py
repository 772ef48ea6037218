"""Sampling on the logits' device: the engine makes each seeded request's generator where its runner leaves
the logits, and a row whose sampling raises ends its own request while the others finish.

On the CPU the logits' device is the CPU; what can fail here is the wiring (the engine decides the device
once, from the LM head, and hands the sampler generators made there) and the isolation of a failing row.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from internvl_runtime import AutoModel, AutoTokenizer
from internvl_runtime.engine.engine import EngineConfig, LLMEngine, RequestOutput
from internvl_runtime.engine.sampler import Sampler, SamplerOutput, SamplingRow
from internvl_runtime.engine.sampling_params import SamplingParams
from internvl_runtime.errors import RequestFailed
from internvl_runtime.processing.inputs import Message
from paths import FIXTURES

POISON_SEED = 13


@functools.lru_cache(maxsize=1)
def _loaded():
    path = FIXTURES / "ckpt" / "tiny-1B"
    return AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)


class RecordingSampler(Sampler):
    """The default sampler, recording the logits' device and every seeded row's generator device."""

    def __init__(self) -> None:
        self.seen: list[tuple[torch.device, list[torch.device]]] = []

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SamplerOutput:
        self.seen.append((logits.device, [row.generator.device for row in rows if row.generator is not None]))
        return super().__call__(logits, rows)


class PoisonedSampler(Sampler):
    """Raises for any batch holding a row seeded with ``POISON_SEED``: that request's sampling always fails."""

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SamplerOutput:
        if any(row.params.seed == POISON_SEED for row in rows):
            raise RuntimeError("this row cannot be sampled")
        return super().__call__(logits, rows)


def _engine(sampler: Sampler | None = None) -> LLMEngine:
    model, tokenizer = _loaded()
    return LLMEngine(model, tokenizer, EngineConfig(num_blocks=256), sampler=sampler)


def _run(engine: LLMEngine, requests: dict[str, tuple[str, SamplingParams]]) -> dict[str, RequestOutput]:
    """Add every request, step until none is left; the final output of each."""
    for request_id, (text, params) in requests.items():
        engine.add_request(request_id, engine.processor.prepare([Message("user", text)]), params)
    final: dict[str, RequestOutput] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    return final


def test_seeded_generators_are_made_on_the_logits_device() -> None:
    sampler = RecordingSampler()
    engine = _engine(sampler)
    model = engine.model
    assert engine.logits_device == model.language_model.lm_head.weight.device
    params = SamplingParams(max_new_tokens=4, temperature=1.0, seed=3, ignore_eos=True)
    _run(engine, {"a": ("Tell me a story.", params), "b": ("Hi", SamplingParams(max_new_tokens=4, temperature=0))})
    seeded_steps = [(device, generators) for device, generators in sampler.seen if generators]
    assert len(seeded_steps) == 4                      # one per token of the seeded request
    for device, generators in seeded_steps:
        assert generators == [device] and device == engine.logits_device


def test_a_row_whose_sampling_raises_ends_only_its_own_request() -> None:
    seeded = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=5, ignore_eos=True)
    greedy = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
    poisoned = SamplingParams(max_new_tokens=8, temperature=1.0, seed=POISON_SEED, ignore_eos=True)
    alone = _run(_engine(), {"seeded": ("Tell me a story.", seeded), "greedy": ("Who are you?", greedy)})

    engine = _engine(PoisonedSampler())
    final = _run(engine, {"seeded": ("Tell me a story.", seeded), "bad": ("Describe a cat.", poisoned),
                          "greedy": ("Who are you?", greedy)})
    assert final["bad"].finish_reason == "error" and isinstance(final["bad"].error, RequestFailed)
    assert "this row cannot be sampled" in str(final["bad"].error)
    for request_id in ("seeded", "greedy"):
        assert final[request_id].error is None and final[request_id].finish_reason == "length"
        assert final[request_id].token_ids == alone[request_id].token_ids    # unchanged by the failing neighbour
    assert engine.stats["requests_failed"] == 1 and engine.stats["requests_finished"] == 2
    assert not engine.has_unfinished_requests()
