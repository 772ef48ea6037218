"""`torchrun --nproc-per-node 2 -m internvl_runtime serve PATH --tensor-parallel-size 2` starts, reports
ready on /health only once weights are loaded, answers a chat completion equal to the single-process
server's greedy answer, and stops cleanly."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from paths import FIXTURES

CKPT = FIXTURES / "ckpt" / "tiny-1B"
BODY = {"model": "tiny-1B", "max_tokens": 8, "temperature": 0,
        "messages": [{"role": "user", "content": "Hello, who are you?"}]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(cmd: list[str], port: int) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early:\n{proc.stdout.read().decode()[-3000:]}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    _stop(proc)
    raise AssertionError("server did not become ready in 120 s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    if proc.stdout is not None:
        proc.stdout.close()


def _answer(base: str) -> str:
    response = httpx.post(base + "/v1/chat/completions", json=BODY, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


@pytest.mark.skipif(not CKPT.is_dir(), reason="tiny checkpoints missing")
@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
                    reason="torchrun is not installed beside this Python")
def test_torchrun_tensor_parallel_server_answers_like_one_process() -> None:
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    port = _free_port()
    proc, base = _serve([torchrun, "--nproc-per-node", "2", "--master-port", str(_free_port()), "-m",
                         "internvl_runtime", "serve", str(CKPT), "--port", str(port), "--tensor-parallel-size", "2",
                         "--num-blocks", "256"], port)
    try:
        parallel = _answer(base)
    finally:
        _stop(proc)
    port = _free_port()
    single, base = _serve([sys.executable, "-m", "internvl_runtime", "serve", str(CKPT), "--port", str(port),
                           "--num-blocks", "256"], port)
    try:
        assert _answer(base) == parallel
    finally:
        _stop(single)
