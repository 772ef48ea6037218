"""The engine loop (AsyncEngine) and the step (LLMEngine) survive what handlers and requests do to them:
handlers cancelled at every point of the hand-off, one request failing inside a step, and a loop that dies
anyway (every waiter told why, never a silent hang)."""

from __future__ import annotations

import asyncio
import functools
import random
import time

import pytest
import torch

from internvl_runtime import AutoModel, AutoTokenizer
from internvl_runtime.engine.async_engine import AsyncEngine
from internvl_runtime.engine.engine import EngineConfig, LLMEngine
from internvl_runtime.engine.sampling_params import SamplingParams
from internvl_runtime.errors import EngineDead, RequestFailed
from internvl_runtime.processing.inputs import ImageInput, Message
from paths import FIXTURES

SHARED = FIXTURES
GREEDY = SamplingParams(max_new_tokens=8, temperature=0)


@functools.lru_cache(maxsize=1)
def _loaded():
    path = SHARED / "ckpt" / "tiny-1B"
    return AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def _engine(**kwargs) -> LLMEngine:
    model, tokenizer = _loaded()
    kwargs.setdefault("num_blocks", 512)
    return LLMEngine(model, tokenizer, EngineConfig(**kwargs))


class Poison:
    """Forward pre-hooks that fail the model on one request's rows only: the token embedding raises for a
    sequence holding ``token_id``, the vision encoder for a tile batch holding an all-white tile (pixel
    value > ``white``), as a kernel fault triggered by one request's data would."""

    def __init__(self, model, token_id: int, white: float = 1.5) -> None:
        self.token_id, self.white = token_id, white
        self.handles = [
            model.language_model.get_input_embeddings().register_forward_pre_hook(self._tokens),
            model.vision_model.register_forward_pre_hook(self._pixels),
        ]

    def _tokens(self, module, args):
        if bool((args[0] == self.token_id).any()):
            raise RuntimeError("poisoned token")

    def _pixels(self, module, args):
        tiles = args[0]
        if bool((tiles.flatten(1).amin(dim=1) > self.white).any()):
            raise RuntimeError("poisoned tile")

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@pytest.fixture()
def poisoned():
    engine = _engine()
    poison_id = engine.tokenizer.encode("~")[-1]
    hooks = Poison(engine.model, poison_id)
    yield engine
    hooks.remove()


def _prompt(engine: LLMEngine, text: str, images=()):
    return engine.processor.prepare([Message("user", text, list(images))], max_num=1)


def _alone(engine: LLMEngine, prepared) -> list[int]:
    return engine.generate([prepared], GREEDY)[0].token_ids


def test_a_failing_request_ends_alone_and_the_batch_goes_on(poisoned):
    engine = poisoned
    good = [_prompt(engine, "Hello there"), _prompt(engine, "What is the weather like?")]
    bad = _prompt(engine, "tell me ~ now")
    expected = [_alone(engine, p) for p in good]
    for i, p in enumerate([good[0], bad, good[1]]):
        engine.add_request(f"r{i}", p, GREEDY)
    finals, errors = {}, {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.error is not None:
                errors[out.request_id] = out
            elif out.finished:
                finals[out.request_id] = out.token_ids
    assert set(errors) == {"r1"}
    assert errors["r1"].finished and errors["r1"].finish_reason == "error"
    assert isinstance(errors["r1"].error, RequestFailed) and "poisoned token" in str(errors["r1"].error)
    assert [finals["r0"], finals["r2"]] == expected         # the others answer as if alone
    assert engine.num_free_blocks == engine.scheduler.config.num_blocks


def test_an_image_that_fails_to_encode_fails_only_its_request(poisoned):
    engine = poisoned
    white = ImageInput.from_tiles(torch.full((1, 3, 448, 448), 2.0))
    grey = ImageInput.from_tiles(torch.zeros((1, 3, 448, 448)))
    good, bad = _prompt(engine, "Describe it.", [grey]), _prompt(engine, "Describe it.", [white])
    expected = _alone(_engine(), good)          # another engine: its own vision feature cache
    engine.add_request("good", good, GREEDY)
    engine.add_request("bad", bad, GREEDY)      # encoded in the same vision batch as "good"
    finals, errors = {}, {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            (errors if out.error is not None else finals)[out.request_id] = out
    assert set(errors) == {"bad"} and "poisoned tile" in str(errors["bad"].error)
    assert finals["good"].token_ids == expected
    assert engine.num_free_blocks == engine.scheduler.config.num_blocks


def test_offline_generate_raises_the_failure(poisoned):
    with pytest.raises(RequestFailed, match="poisoned token"):
        poisoned.generate([_prompt(poisoned, "Hello"), _prompt(poisoned, "a ~ b")], GREEDY)
    assert not poisoned.has_unfinished_requests()


async def _first(engine: AsyncEngine, request_id: str, prepared) -> None:
    async for _ in engine.generate(request_id, prepared, SamplingParams(max_new_tokens=64, temperature=0)):
        return


class SlowAccept(LLMEngine):
    """Accepting a request takes 5 ms (a long prompt's bookkeeping): handlers can leave in the middle."""

    def add_request(self, *args, **kwargs) -> None:
        time.sleep(0.005)
        super().add_request(*args, **kwargs)


def test_handlers_cancelled_at_any_point_never_kill_the_loop():
    """The old loop died with InvalidStateError when a handler left before the engine accepted its request."""
    model, tokenizer = _loaded()
    llm = SlowAccept(model, tokenizer, EngineConfig(num_blocks=512))
    engine = AsyncEngine(llm)
    prepared = _prompt(llm, "Hello there, how are you?")

    async def main() -> None:
        busy = asyncio.ensure_future(_first(engine, "busy", prepared))   # keeps the engine stepping
        rng = random.Random(0)
        for i in range(150):
            task = asyncio.ensure_future(_first(engine, f"r{i}", prepared))
            # leave before, while or after the engine accepts the request
            await asyncio.sleep(0 if i % 3 == 0 else rng.uniform(0, 0.012))
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        busy.cancel()
        await asyncio.gather(busy, return_exceptions=True)
        outputs = [out async for out in engine.generate("last", prepared, GREEDY)]
        assert outputs[-1].finished

    try:
        asyncio.run(asyncio.wait_for(main(), 60))      # the old loop died here: the last request never answered
        assert engine.is_running and engine.death is None
        deadline = asyncio.run(_wait_for(lambda: engine.kv_blocks_free == engine.kv_blocks_total))
        assert deadline, "KV blocks leaked after the handlers left"
    finally:
        engine.shutdown()


async def _wait_for(predicate, seconds: float = 10.0) -> bool:
    for _ in range(int(seconds / 0.05)):
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return predicate()


class DyingEngine(LLMEngine):
    """An engine whose bookkeeping breaks (as a bug outside any request would) once ``broken`` is set."""

    broken = False

    def has_unfinished_requests(self) -> bool:
        if self.broken:
            raise MemoryError("bookkeeping broke")
        return super().has_unfinished_requests()


def test_a_dead_loop_tells_every_waiter_why():
    model, tokenizer = _loaded()
    llm = DyingEngine(model, tokenizer, EngineConfig(num_blocks=256))
    engine = AsyncEngine(llm)
    prepared = _prompt(llm, "Hello")

    async def main() -> None:
        stream = engine.generate("long", prepared, SamplingParams(max_new_tokens=200, temperature=0, ignore_eos=True))
        await stream.__anext__()
        llm.broken = True
        with pytest.raises(EngineDead, match="bookkeeping broke"):
            async for _ in stream:
                pass
        assert await _wait_for(lambda: not engine.is_running)
        with pytest.raises(EngineDead, match="bookkeeping broke"):
            await _first(engine, "after", prepared)

    asyncio.run(asyncio.wait_for(main(), 30))
    assert engine.death is not None and "MemoryError" in engine.death
