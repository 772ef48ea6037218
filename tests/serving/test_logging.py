"""What ``internvl serve`` logs, read from a real server process's stderr: the start lines (model, names, dtype,
device, quantization, limits, address, compute plan), one line per 4xx with its reason and never the body,
the periodic throughput / queue / KV line while busy; ``--log-level warning`` keeps the info lines out."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from .helpers import free_port

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING|ERROR|DEBUG|CRITICAL) [\w.]+: ")
SECRET = "body-text-that-must-never-be-logged"


def serve(tiny_1b: Path, log: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    """Start ``internvl serve`` on the tiny checkpoint with stderr to ``log``; wait until /health is 200."""
    port = free_port()
    with log.open("w") as err:
        process = subprocess.Popen([sys.executable, "-m", "internvl_runtime", "serve", str(tiny_1b), "--port",
                                    str(port), "--max-model-len", "1024", "--num-blocks", "64", *flags],
                                   env={**os.environ, "PYTHONPATH": str(Path.cwd())}, stdout=subprocess.DEVNULL,
                                   stderr=err, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return process, base
        except httpx.TransportError:
            pass
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGINT)
    process.wait(60)


def wait_for(log: Path, text: str) -> str:
    """The log once ``text`` is in it (or after a generous minute: the assertion then shows the log)."""
    deadline = time.monotonic() + 60
    while text not in (content := log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return content


@pytest.fixture(scope="module")
def logged(tiny_1b, tmp_path_factory):
    """A server run with a request that succeeds and two that fail: its stderr."""
    log = tmp_path_factory.mktemp("serve") / "stderr.log"
    process, base = serve(tiny_1b, log, "--served-model-name", "tiny", "alias", "--stats-log-interval-s", "0.2")
    try:
        with httpx.Client(base_url=base, timeout=60) as client:
            ok = client.post("/v1/chat/completions", json={"model": "alias", "max_tokens": 4, "min_tokens": 4,
                                                           "messages": [{"role": "user", "content": "hello"}]})
            assert ok.status_code == 200
            unknown = client.post("/v1/chat/completions", json={
                "model": "nope", "messages": [{"role": "user", "content": SECRET}]})
            assert unknown.status_code == 404
            bad = client.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": -3,
                                                            "messages": [{"role": "user", "content": SECRET}]})
            assert bad.status_code == 400
            wrong_type = client.post("/v1/chat/completions", content=SECRET, headers={"Content-Type": "text/plain"})
            assert wrong_type.status_code == 415
        content = wait_for(log, "Avg prompt throughput")
    finally:
        stop(process)
    return content + log.read_text()[len(content):], str(tiny_1b), (unknown.json(), bad.json())


def test_start_lines_say_what_is_served_how_and_where(logged):
    text, folder, _ = logged
    lines = text.splitlines()
    start = next(line for line in lines if "served as" in line)
    assert LINE.match(start) and " INFO internvl_runtime.cli: " in start
    assert folder in start and "'tiny', 'alias'" in start and "http://127.0.0.1:" in start
    loading = next(line for line in lines if line.split(": ", 1)[-1].startswith("loading: dtype"))
    assert "device cpu" in loading and "quantization none" in loading
    limits = next(line for line in lines if "limits: context 1024 tokens" in line)
    assert "sequences" in limits and "images" in limits
    engine = next(line for line in lines if "engine: dtype" in line)
    assert "device cpu" in engine and "KV cache 64 blocks" in engine and "context 1024 tokens" in engine
    assert any(LINE.match(line) and "compute plan: weights" in line for line in lines)


def test_each_4xx_logs_its_reason_and_never_the_body(logged):
    text, _, (unknown, bad) = logged
    lines = text.splitlines()
    not_found = [line for line in lines if "POST /v1/chat/completions -> 404" in line]
    assert len(not_found) == 1 and LINE.match(not_found[0])
    assert unknown["error"]["message"] in not_found[0]
    invalid = [line for line in lines if "POST /v1/chat/completions -> 400" in line]
    assert len(invalid) == 1 and bad["error"]["message"] in invalid[0]
    assert any("-> 415" in line and "Content-Type" in line for line in lines)
    assert SECRET not in text


def test_periodic_stats_line_while_busy(logged):
    text, _, _ = logged
    stats = [line for line in text.splitlines() if "Avg prompt throughput" in line]
    assert stats and LINE.match(stats[0])
    assert re.search(r"Avg generation throughput: [\d.]+ tokens/s, Running: \d+ reqs, Waiting: \d+ reqs, "
                     r"KV cache usage: [\d.]+%, Prefix cache hit rate: [\d.]+%", stats[0])


def test_log_level_warning_keeps_info_lines_out(tiny_1b, tmp_path):
    log = tmp_path / "stderr.log"
    process, base = serve(tiny_1b, log, "--log-level", "warning")
    try:
        assert httpx.post(base + "/v1/completions", json={"model": "x", "prompt": "hi"}).status_code == 404
    finally:
        stop(process)
    text = log.read_text()
    assert "serving 'tiny-1B'" in text                     # the banner is printed whatever the level
    assert not [line for line in text.splitlines() if LINE.match(line) and " INFO " in line]
