"""The rules the server asks the engine about, each with one owner that the others call (issue #14):

- the context rule, ``Scheduler.max_new_tokens_for``: ``Scheduler.add`` applies it, the server and the CLI
  ask it first (through ``AsyncEngine`` / ``LLMEngine``) so a request is refused before anything streams;
- the queue limit, ``AsyncEngine.check_room``: ``generate`` applies it to each request, the routes ask it for
  all of a request's choices first (a refused stream is a 503, not an error inside a 200);
- the counters, ``LLMEngine.stats``: ``AsyncEngine.stats`` copies them and /metrics reads that copy.
"""

from __future__ import annotations

import asyncio
import io
import types

import httpx
import pytest

from internvl_runtime import AutoModel, AutoTokenizer, cli
from internvl_runtime.engine.async_engine import AsyncEngine
from internvl_runtime.engine.engine import EngineConfig, LLMEngine
from internvl_runtime.engine.sampling_params import SamplingParams
from internvl_runtime.engine.scheduler import Scheduler, SchedulerConfig
from internvl_runtime.engine.sequence import Sequence
from internvl_runtime.errors import ContextLengthExceeded, EngineOverloaded
from internvl_runtime.processing.inputs import Message
from internvl_runtime.serving.config import ServerConfig

from .helpers import MODEL, run_server

# ---------------------------------------------------------------------------------------------------
# The context rule
# ---------------------------------------------------------------------------------------------------


def rule(*, max_model_len: int | None = 100, num_blocks: int = 64, block_size: int = 16) -> Scheduler:
    return Scheduler(SchedulerConfig(num_blocks=num_blocks, block_size=block_size, max_model_len=max_model_len))


def test_context_rule_cuts_a_default_to_the_room_left():
    sch = rule()
    assert sch.max_new_tokens_for(90, default=512) == 10
    assert sch.max_new_tokens_for(10, default=5) == 5
    assert rule(max_model_len=None).max_new_tokens_for(10, default=7) == 7


def test_context_rule_refuses_what_was_asked_for_and_does_not_fit():
    sch = rule()
    assert sch.max_new_tokens_for(90, 10) == 10
    with pytest.raises(ContextLengthExceeded, match=r"plus max_new_tokens \(11\) is 101 tokens.*context of 100"):
        sch.max_new_tokens_for(90, 11)
    with pytest.raises(ContextLengthExceeded, match=r"plus max_tokens \(11\)"):      # the server's word for it
        sch.max_new_tokens_for(90, 11, name="max_tokens")
    for asked in (None, 1):
        with pytest.raises(ContextLengthExceeded, match="100 tokens; the model's context is 100 tokens, which "
                                                        "leaves no room"):
            sch.max_new_tokens_for(100, asked, default=5)


def test_context_rule_counts_the_kv_pool():
    sch = rule(max_model_len=None, num_blocks=4, block_size=4)         # 16 KV slots
    assert sch.kv_capacity == 16
    assert sch.max_new_tokens_for(10, 7) == 7                          # the last token needs no slot
    with pytest.raises(ContextLengthExceeded, match=r"needs 17 KV slots, more than the whole cache \(16 slots\)"):
        sch.max_new_tokens_for(10, 8)
    with pytest.raises(ContextLengthExceeded, match="KV slots"):       # a default is not cut to the pool
        rule(max_model_len=1000, num_blocks=4, block_size=4).max_new_tokens_for(10, default=512)


def test_scheduler_add_applies_the_same_rule():
    sch = rule()
    with pytest.raises(ContextLengthExceeded) as asked:
        sch.max_new_tokens_for(90, 11)
    with pytest.raises(ContextLengthExceeded) as added:
        sch.add(Sequence("r", list(range(90)), SamplingParams(max_new_tokens=11)))
    assert str(added.value) == str(asked.value)
    sch.add(Sequence("ok", list(range(90)), SamplingParams(max_new_tokens=10)))


class _CLIEngine:
    """What ``cli._stream_answer`` needs of an LLMEngine, with the scheduler's rule; it records the request."""

    def __init__(self, max_model_len: int) -> None:
        self.max_new_tokens_for = rule(max_model_len=max_model_len).max_new_tokens_for
        self.added: list[SamplingParams] = []

    def add_request(self, request_id: str, prepared: object, params: SamplingParams) -> None:
        self.added.append(params)

    def has_unfinished_requests(self) -> bool:
        return False


class _Prepared:
    def __init__(self, num_tokens: int) -> None:
        self.prompt_token_ids = list(range(num_tokens))


def test_cli_asks_the_engine_rule():
    engine = _CLIEngine(max_model_len=100)
    params = SamplingParams(max_new_tokens=64, min_new_tokens=32)
    cli._stream_answer(engine, _Prepared(90), params, False, io.StringIO())
    assert engine.added[0].max_new_tokens == 10 and engine.added[0].min_new_tokens == 10   # cut to the room left
    with pytest.raises(ContextLengthExceeded, match="leaves no room for an answer; /reset to start over"):
        cli._stream_answer(engine, _Prepared(100), SamplingParams(max_new_tokens=64), False, io.StringIO())
    assert len(engine.added) == 1


# ---------------------------------------------------------------------------------------------------
# The queue limit
# ---------------------------------------------------------------------------------------------------


class _IdleEngine:
    """Just enough of an LLMEngine for AsyncEngine: it accepts requests and never steps them."""

    num_blocks = num_free_blocks = 8
    scheduler = types.SimpleNamespace(num_running=0, num_waiting=0)    # the queue sizes AsyncEngine publishes

    def add_request(self, request_id: str, request: object, params: object, arrival_time: float) -> None:
        pass

    def abort_request(self, request_id: str) -> bool:
        return True

    def has_unfinished_requests(self) -> bool:
        return False


def test_queue_limit_check_room_and_generate_share_one_rule():
    async def main() -> None:
        engine = AsyncEngine(_IdleEngine(), max_queue_len=2)   # type: ignore[arg-type]
        streams: list = []
        first = second = asyncio.ensure_future(asyncio.sleep(0))
        try:
            engine.check_room(2)
            with pytest.raises(EngineOverloaded, match=r"has 0 requests in flight \(limit 2\)"):
                engine.check_room(3)                           # a request's choices are counted together

            async def start(request_id: str) -> None:
                stream = engine.generate(request_id, None, SamplingParams())   # type: ignore[arg-type]
                streams.append(stream)
                await stream.__anext__()                      # accepted, then waits for outputs forever

            first = asyncio.ensure_future(start("a"))
            while engine.num_pending < 1:
                await asyncio.sleep(0.01)
            engine.check_room(1)
            with pytest.raises(EngineOverloaded, match=r"has 1 requests in flight \(limit 2\)") as asked:
                engine.check_room(2)
            second = asyncio.ensure_future(start("b"))
            while engine.num_pending < 2:
                await asyncio.sleep(0.01)
            with pytest.raises(EngineOverloaded) as refused:
                await start("c")
            assert str(refused.value) == str(asked.value).replace("has 1 requests", "has 2 requests")
            assert engine.num_pending == 2          # the refused request left nothing behind
        finally:
            for task in (first, second):
                task.cancel()
            await asyncio.gather(first, second, return_exceptions=True)
            for stream in streams:
                await stream.aclose()
            engine.shutdown()

    asyncio.run(main())


# ---------------------------------------------------------------------------------------------------
# Through the server: refused before the headers; the counters are the engine's
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small(tiny_1b):
    """A server whose engine holds one request (max_queue_len=1) and 256 tokens of context."""
    config = ServerConfig(model=str(tiny_1b), max_model_len=256, num_blocks=64, max_queue_len=1)
    holder: dict[str, LLMEngine] = {}

    def loader() -> AsyncEngine:
        model, tokenizer = AutoModel.from_pretrained(tiny_1b), AutoTokenizer.from_pretrained(tiny_1b)
        holder["llm"] = LLMEngine(model, tokenizer, EngineConfig(**config.engine_kwargs()))
        return AsyncEngine(holder["llm"], max_queue_len=config.max_queue_len)

    with run_server(config, loader=loader) as server:
        yield server, holder["llm"]


def chat(text: str, **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], "temperature": 0, **extra}


def refusal(response: httpx.Response, status: int, code: str) -> str:
    """The error of a request refused before any streaming: a JSON error, never an SSE body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code
    return error["message"]


def test_server_refuses_choices_beyond_the_queue_before_streaming(small):
    server, _ = small
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        for stream in (False, True):
            message = refusal(http.post("/v1/chat/completions", json=chat("hi", n=2, max_tokens=2, stream=stream)),
                              503, "engine_overloaded")
            assert "0 requests in flight (limit 1)" in message
        body = {"model": MODEL, "prompt": ["a", "b"], "max_tokens": 2, "stream": True}
        refusal(http.post("/v1/completions", json=body), 503, "engine_overloaded")
        assert http.post("/v1/chat/completions", json=chat("hi", max_tokens=2, stream=True)).status_code == 200


def test_server_uses_the_engine_context_rule_before_streaming(small):
    server, llm = small
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        for stream in (False, True):
            message = refusal(http.post("/v1/chat/completions", json=chat("hi", max_tokens=5000, stream=stream)),
                              400, "context_length_exceeded")
            num_prompt_tokens = int(message.split("the prompt (")[1].split(" tokens")[0])
            with pytest.raises(ContextLengthExceeded) as expected:
                llm.max_new_tokens_for(num_prompt_tokens, 5000, name="max_tokens")
            assert message == str(expected.value)
        # no max_tokens: the server's default (512), cut to what the 256-token context leaves
        room = 256 - num_prompt_tokens
        answer = http.post("/v1/chat/completions", json=chat("hi", min_tokens=room)).json()
        assert answer["usage"]["completion_tokens"] == room and answer["choices"][0]["finish_reason"] == "length"


def test_metrics_are_the_engine_counters(small):
    server, llm = small
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        http.post("/v1/chat/completions", json=chat("count me", max_tokens=3)).raise_for_status()
    metrics = server.metrics()
    stats = llm.stats.copy()
    assert metrics["internvl_requests_total"] == stats["requests_added"] > 0
    assert metrics["internvl_requests_failed_total"] == stats["requests_refused"] + stats["requests_failed"]
    assert metrics["internvl_requests_aborted_total"] == stats["requests_aborted"]
    assert metrics["internvl_prompt_tokens_total"] == stats["prompt_tokens"] > 0
    assert metrics["internvl_generation_tokens_total"] == stats["generated_tokens"] >= 3
    label = f'{{model_name="{server.config.model_name}"}}'
    assert metrics[f"vllm:time_to_first_token_seconds_count{label}"] == len(llm.ttft_seconds) > 0
    assert server.engine.stats == stats and server.engine.stats is not llm.stats


def test_engine_counts_what_happens_to_its_requests(tiny_1b):
    model, tokenizer = AutoModel.from_pretrained(tiny_1b), AutoTokenizer.from_pretrained(tiny_1b)
    llm = LLMEngine(model, tokenizer, EngineConfig(num_blocks=64, max_model_len=256))
    prepared = llm.processor.prepare([Message("user", "hi")])
    llm.max_new_tokens_for(len(prepared.prompt_token_ids), 10)
    assert llm.stats["requests_added"] == llm.stats["requests_refused"] == 0      # asking counts nothing
    with pytest.raises(ContextLengthExceeded):
        llm.add_request("big", prepared, SamplingParams(max_new_tokens=10_000))
    llm.add_request("gone", prepared, SamplingParams(max_new_tokens=5))
    assert llm.abort_request("gone") and not llm.abort_request("gone")
    llm.generate([prepared], SamplingParams(max_new_tokens=3, min_new_tokens=3, temperature=0))
    assert llm.stats == {"requests_added": 2, "requests_refused": 1, "requests_failed": 0, "requests_aborted": 1,
                         "requests_finished": 1, "prompt_tokens": len(prepared.prompt_token_ids),
                         "cached_prompt_tokens": 0, "generated_tokens": 3, "vision_tiles_encoded": 0}
    assert len(llm.ttft_seconds) == 1 and llm.ttft_seconds[0] >= 0
