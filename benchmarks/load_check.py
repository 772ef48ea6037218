"""Load check of the OpenAI-compatible server: many concurrent streaming clients on loopback.

Starts the server in this process on 127.0.0.1 (a free port; nothing else is ever contacted), then:

1. runs each of ``--distinct`` different greedy requests alone, one after the other (the reference answers);
2. sends ``--requests`` streaming requests (those same bodies, in turn) from ``--clients`` concurrent clients;
3. prints requests/s, p50/p99 time to first token, errors (target 0), and how many answers differ from the
   same request's answer alone (target 0: greedy decoding must not depend on the batch).

Bounded in count (``--requests``) and time (``--time-limit`` seconds for the whole run); it stops by itself.
Exit status 0 only with no errors and no mismatches.

    python benchmarks/load_check.py                       # 64 clients, 128 requests, tiny checkpoint
    python benchmarks/load_check.py --model pretrained/InternVL2-1B --requests 256 --json
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TINY = HERE.parent / "tests" / "fixtures" / "ckpt" / "tiny-1B"  # the golden data committed with the repository


@dataclass
class Result:
    index: int                     # which distinct request
    text: str = ""
    ttft: float | None = None
    latency: float = 0.0
    error: str | None = None
    finish_reason: str | None = None


@dataclass
class Report:
    clients: int
    requests: int
    completed: int = 0
    errors: int = 0
    mismatches: int = 0
    wall_s: float = 0.0
    requests_per_s: float = 0.0
    ttft_p50_s: float | None = None
    ttft_p99_s: float | None = None
    latency_p50_s: float | None = None
    error_samples: list[str] = field(default_factory=list)


def _png(color: tuple[int, int, int]) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), color).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def request_bodies(model: str, distinct: int, max_tokens: int) -> list[dict[str, Any]]:
    """``distinct`` different greedy streaming requests; every other one carries an image."""
    bodies = []
    for i in range(distinct):
        content: Any = f"Request {i}: describe what you know about topic number {i * 7 + 3}."
        if i % 2 == 0:
            content = [{"type": "text", "text": content},
                       {"type": "image_url", "image_url": {"url": _png((40 * i % 256, 90, 255 - 30 * i % 256))}}]
        bodies.append({"model": model, "messages": [{"role": "user", "content": content}], "stream": True,
                       "temperature": 0, "max_tokens": max_tokens, "max_dynamic_patch": 1,
                       "stream_options": {"include_usage": True}})
    return bodies


async def stream_one(client: Any, url: str, body: dict[str, Any], index: int) -> Result:
    result = Result(index)
    started = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = event["error"]["message"]
                    return result
                for choice in event.get("choices", []):
                    piece = choice.get("delta", {}).get("content")
                    if piece:
                        if result.ttft is None:
                            result.ttft = time.perf_counter() - started
                        result.text += piece
                    if choice.get("finish_reason"):
                        result.finish_reason = choice["finish_reason"]
        if result.finish_reason is None:
            result.error = "the stream ended without a finish_reason"
    except Exception as exc:  # noqa: BLE001 - counted as an error of this request
        result.error = f"{type(exc).__name__}: {exc}"
    result.latency = time.perf_counter() - started
    return result


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def run_load(base_url: str, model: str, *, clients: int, requests: int, distinct: int, max_tokens: int,
                   time_limit: float) -> Report:
    import httpx

    url = base_url + "/v1/chat/completions"
    bodies = request_bodies(model, distinct, max_tokens)
    report = Report(clients=clients, requests=requests)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    deadline = time.monotonic() + time_limit
    async with httpx.AsyncClient(timeout=httpx.Timeout(time_limit), limits=limits, trust_env=False) as client:
        # 1. each distinct request alone: the reference
        solo: list[Result] = []
        for i, body in enumerate(bodies):
            solo.append(await stream_one(client, url, body, i))
        for r in solo:
            if r.error:
                report.errors += 1
                report.error_samples.append(f"solo {r.index}: {r.error}")
        if report.errors:
            return report

        # 2. the load: `clients` workers share `requests` requests
        results: list[Result] = []
        next_request = 0

        async def worker() -> None:
            nonlocal next_request
            while next_request < requests:
                n = next_request
                next_request += 1
                results.append(await stream_one(client, url, bodies[n % distinct], n % distinct))

        started = time.perf_counter()
        tasks = [asyncio.ensure_future(worker()) for _ in range(clients)]
        try:
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=max(1.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            report.error_samples.append(f"time limit of {time_limit:g} s reached")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        report.wall_s = time.perf_counter() - started

    done = [r for r in results if r.error is None]
    report.completed = len(done)
    report.errors = requests - len(done)
    report.error_samples += [r.error for r in results if r.error][:5]
    report.mismatches = sum(1 for r in done if r.text != solo[r.index].text)
    report.requests_per_s = len(done) / report.wall_s if report.wall_s else 0.0
    ttfts = [r.ttft for r in done if r.ttft is not None]
    report.ttft_p50_s = _percentile(ttfts, 0.50)
    report.ttft_p99_s = _percentile(ttfts, 0.99)
    report.latency_p50_s = _percentile([r.latency for r in done], 0.50)
    return report


def run_load_check(model: str | Path, *, clients: int = 64, requests: int = 128, distinct: int = 8,
                   max_tokens: int = 16, time_limit: float = 300.0) -> Report:
    """Start a server for ``model`` on 127.0.0.1, run the load, stop the server; returns the figures."""
    import socket
    import threading

    import uvicorn

    from internvl_runtime.serving.app import create_app, load_async_engine
    from internvl_runtime.serving.config import ServerConfig

    config = ServerConfig(model=str(model), host="127.0.0.1", max_model_len=2048, max_queue_len=max(256, clients),
                          max_concurrent_requests=max(512, clients), log_level="warning")
    app = create_app(load_async_engine(config), config)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="load-check-server", daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        return asyncio.run(run_load(f"http://127.0.0.1:{port}", config.model_name, clients=clients,
                                    requests=requests, distinct=distinct, max_tokens=max_tokens,
                                    time_limit=time_limit))
    finally:
        server.should_exit = True
        thread.join(30)


def _fmt(value: float | None, unit: str = "s") -> str:
    return "n/a" if value is None else f"{value * 1000:.1f} ms" if unit == "ms" else f"{value:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the tiny fixture, else --demo's)")
    parser.add_argument("--clients", type=int, default=64, help="concurrent streaming clients (default: 64)")
    parser.add_argument("--requests", type=int, default=128, help="requests in all (default: 128)")
    parser.add_argument("--distinct", type=int, default=8, help="different request bodies (default: 8)")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per answer (default: 16)")
    parser.add_argument("--time-limit", type=float, default=300.0, help="seconds for the whole run (default: 300)")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    args = parser.parse_args(argv)
    for name in ("clients", "requests", "distinct", "max_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.model:
        model = Path(args.model)
    elif (TINY / "config.json").is_file():
        model = TINY
    else:
        from internvl_runtime.cli import demo_checkpoint
        model = demo_checkpoint()

    report = run_load_check(model, clients=args.clients, requests=args.requests, distinct=args.distinct,
                            max_tokens=args.max_tokens, time_limit=args.time_limit)
    print(f"load check: {model.name}, {report.clients} concurrent streaming clients, {report.requests} requests "
          f"({args.distinct} distinct, greedy, {args.max_tokens} tokens max), loopback")
    print(f"  completed        {report.completed}/{report.requests}")
    print(f"  requests/s       {report.requests_per_s:.2f}   (wall {report.wall_s:.2f} s)")
    print(f"  TTFT p50 / p99   {_fmt(report.ttft_p50_s, 'ms')} / {_fmt(report.ttft_p99_s, 'ms')}")
    print(f"  latency p50      {_fmt(report.latency_p50_s, 'ms')}")
    print(f"  errors           {report.errors}   (target 0)")
    print(f"  differ from solo {report.mismatches}   (target 0)")
    for sample in report.error_samples:
        print(f"  error: {sample}")
    if args.json:
        print(json.dumps(report.__dict__))
    return 0 if report.errors == 0 and report.mismatches == 0 and report.completed == report.requests else 1


if __name__ == "__main__":
    sys.exit(main())
