"""The server keeps serving whatever one client or one request does (issue #13): streams dropped at any
point, a request that fails inside the engine, a step slow enough to outlast a /metrics scrape, huge
prompts; and if the engine loop dies anyway, /health says why and `internvl serve` exits non-zero."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from internvl_runtime import AutoModel, AutoTokenizer, cli
from internvl_runtime.engine.async_engine import AsyncEngine
from internvl_runtime.engine.engine import EngineConfig, LLMEngine
from internvl_runtime.serving import app as serving_app
from internvl_runtime.serving.app import load_async_engine
from internvl_runtime.serving.config import ServerConfig

from .helpers import MODEL, free_port, run_server


class Hooks:
    """Forward pre-hooks on the token embedding, run for one sequence's tokens at a time: a sequence
    holding ``poison_id`` raises (a fault one request's data triggers); one holding ``slow_id`` sleeps
    ``slow_s`` once (a step that takes seconds)."""

    def __init__(self, engine: AsyncEngine, *, slow_s: float = 5.5) -> None:
        tokenizer = engine.engine.tokenizer
        self.poison_id, self.slow_id = tokenizer.encode("~")[-1], tokenizer.encode("^")[-1]
        self.slow_s = slow_s
        self.slow_started = threading.Event()
        embedding = engine.engine.model.language_model.get_input_embeddings()
        embedding.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        ids = args[0]
        if bool((ids == self.poison_id).any()):
            raise RuntimeError("poisoned token")
        if bool((ids == self.slow_id).any()) and not self.slow_started.is_set():
            self.slow_started.set()
            time.sleep(self.slow_s)


class SlowAccept(LLMEngine):
    """Accepting a request takes 5 ms (a long prompt's bookkeeping), so clients that leave at once often
    leave while the engine accepts their request: the old loop died there (InvalidStateError)."""

    def add_request(self, *args, **kwargs) -> None:
        time.sleep(0.005)
        super().add_request(*args, **kwargs)


@pytest.fixture(scope="module")
def hooked(tiny_1b):
    config = ServerConfig(model=str(tiny_1b), num_blocks=512, max_model_len=2048, max_body_bytes=8 * 2**20)
    holder = {}

    def loader():
        model, tokenizer = AutoModel.from_pretrained(tiny_1b), AutoTokenizer.from_pretrained(tiny_1b)
        engine = AsyncEngine(SlowAccept(model, tokenizer, EngineConfig(**config.engine_kwargs())))
        holder["hooks"] = Hooks(engine)
        return engine

    with run_server(config, loader=loader) as server:
        yield server, holder["hooks"]


def chat_body(text: str, **extra) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 8, "temperature": 0}
    body.update(extra)
    return body


def wait_blocks_free(server, seconds: float = 15.0) -> float:
    deadline = time.monotonic() + seconds
    while True:
        in_use = server.metrics()["internvl_kv_blocks_in_use"]
        if in_use == 0 or time.monotonic() > deadline:
            return in_use
        time.sleep(0.1)


def test_dropped_streams_never_kill_the_engine(hooked):
    server, _ = hooked
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        alone = client.post("/v1/chat/completions", json=chat_body("Hello there")).json()
        with client.stream("POST", "/v1/chat/completions",
                           json=chat_body("keep the engine busy", max_tokens=600, stream=True)) as busy:
            busy_lines = busy.iter_lines()
            next(busy_lines)
            for i in range(60):              # open a stream, read its first chunk, leave
                with (httpx.Client(base_url=server.base_url, timeout=30) as leaver,
                      leaver.stream("POST", "/v1/chat/completions",
                                    json=chat_body(f"question {i}", max_tokens=64, stream=True)) as stream):
                    if i % 2:
                        next(stream.iter_lines())
            assert client.get("/health").status_code == 200
            again = client.post("/v1/chat/completions", json=chat_body("Hello there")).json()
            assert again["choices"][0]["message"]["content"] == alone["choices"][0]["message"]["content"]
    assert wait_blocks_free(server) == 0
    assert server.engine.is_running


def test_a_request_failing_in_the_engine_ends_alone(hooked):
    server, _ = hooked
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        expected = client.post("/v1/chat/completions", json=chat_body("Tell me a story", max_tokens=40)).json()
        with ThreadPoolExecutor(3) as pool:
            good = pool.submit(client.post, "/v1/chat/completions", json=chat_body("Tell me a story", max_tokens=40))
            bad = pool.submit(client.post, "/v1/chat/completions", json=chat_body("a ~ b"))
            bad_stream = pool.submit(client.post, "/v1/chat/completions", json=chat_body("c ~ d", stream=True))
            good, bad, bad_stream = good.result(), bad.result(), bad_stream.result()
        assert bad.status_code == 500
        assert "failed inside the engine" in bad.json()["error"]["message"]
        events = [line[6:] for line in bad_stream.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and "failed inside the engine" in json.loads(events[-2])["error"]["message"]
        assert good.status_code == 200
        assert good.json()["choices"][0]["message"]["content"] == expected["choices"][0]["message"]["content"]
        assert client.get("/health").status_code == 200
    assert wait_blocks_free(server) == 0


def test_metrics_never_wait_for_a_slow_step(hooked):
    """The old /metrics waited up to 5 s on the engine thread, then cancelled a future the thread was about
    to resolve, which killed the thread."""
    server, hooks = hooked
    with httpx.Client(base_url=server.base_url, timeout=30) as client, ThreadPoolExecutor(1) as pool:
        slow = pool.submit(client.post, "/v1/chat/completions", json=chat_body("slow ^ step"))
        assert hooks.slow_started.wait(10)
        started = time.monotonic()
        scrape = client.get("/metrics")
        assert scrape.status_code == 200 and "internvl_kv_blocks_in_use" in scrape.text
        assert time.monotonic() - started < hooks.slow_s / 2, "the scrape waited for the engine step"
        assert slow.result().status_code == 200
        assert client.get("/health").status_code == 200


def test_huge_prompt_is_refused_before_tokenization(hooked):
    server, _ = hooked
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        reply = client.post("/v1/chat/completions", json=chat_body("word " * 1_000_000))    # 5 MB
        assert reply.status_code == 400
        error = reply.json()["error"]
        assert error["code"] == "context_length_exceeded" and "5000000 bytes" in error["message"]
        completion = client.post("/v1/completions", json={"model": MODEL, "prompt": "x" * 3_000_000})
        assert completion.status_code == 400 and "3000000 bytes" in completion.json()["error"]["message"]


def test_large_prompts_do_not_stall_small_ones(tiny_1b):
    """Prompts over 64 KiB are tokenized in a worker process: small requests go on meanwhile (the old
    server tokenized them on its two worker threads, holding the GIL, and a 'hi' waited seconds)."""
    config = ServerConfig(model=str(tiny_1b), num_blocks=256, max_body_bytes=8 * 2**20)   # context 32768
    large = "lorem ipsum dolor sit amet " * 15_000                                        # 405 KB < 32768 x 13
    with run_server(config) as server, httpx.Client(base_url=server.base_url, timeout=120) as client:
        finished: list[str] = []

        def ask(name: str, text: str, max_tokens: int) -> int:
            status = client.post("/v1/chat/completions", json=chat_body(text, max_tokens=max_tokens)).status_code
            finished.append(name)
            return status

        with ThreadPoolExecutor(6) as pool:
            big = [pool.submit(ask, f"large{i}", large, 1) for i in range(2)]
            time.sleep(0.2)
            small = [pool.submit(ask, f"small{i}", "hi", 2) for i in range(4)]
            assert [f.result() for f in small] == [200] * 4
            assert [f.result() for f in big] == [400, 400]     # tokenized: more tokens than the context
        assert set(finished[:4]) == {f"small{i}" for i in range(4)}, finished


class DyingEngine(LLMEngine):
    """Its bookkeeping breaks (as a bug outside any request would) right after it accepts a request."""

    broken = False

    def add_request(self, *args, **kwargs) -> None:
        super().add_request(*args, **kwargs)
        self.broken = True

    def has_unfinished_requests(self) -> bool:
        if self.broken:
            raise MemoryError("bookkeeping broke")
        return super().has_unfinished_requests()


def test_a_dead_engine_loop_is_reported_and_the_server_exits(tiny_1b, monkeypatch, capsys, restored_logging):
    def dying_loader(config, *, progress=False):
        llm = load_async_engine(config).engine
        llm_engine = DyingEngine(llm.model, llm.tokenizer, EngineConfig(num_blocks=128))
        return AsyncEngine(llm_engine)

    monkeypatch.setattr(serving_app, "load_async_engine", dying_loader)
    port = free_port()
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(cli.main(["serve", str(tiny_1b), "--port", str(port)])))
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=30) as client:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.1)
            reply = client.post("/v1/chat/completions", json=chat_body("hello"))
            assert reply.status_code == 503 and "bookkeeping broke" in reply.json()["error"]["message"]
            health = client.get("/health")
            assert health.status_code == 503
            assert health.json()["status"] == "error" and "bookkeeping broke" in health.json()["error"]
    except httpx.TransportError:
        pass                                     # the server may already be gone: what matters is below
    thread.join(30)
    assert not thread.is_alive(), "the server kept running with a dead engine"
    assert result == [1]
    assert "exiting so that a supervisor restarts" in capsys.readouterr().err
