"""``internvl serve OpenGVLab/InternVL2-1B``: a hub id served from an offline hub cache, as a user starts it.

The server loads through ``LLMEngine.from_pretrained``, which resolves the id (``internvl_runtime.hub``);
it answers as the same checkpoint served from its folder, under the id's last part as the model name.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from hub_cache import CKPT, REPO_ID, REVISION, make_hub_cache

from .helpers import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]


def _serve(model: str, cache: Path, cwd: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "internvl_runtime", "serve", model, "--port", str(port),
                                "--dtype", "float32", *extra], cwd=cwd, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    return process, f"http://127.0.0.1:{port}"


def _answer(base: str, process: subprocess.Popen[str]) -> tuple[str, str]:
    """(the served model id, the greedy answer to "Hello") once /health says ready."""
    deadline = time.monotonic() + 120
    with httpx.Client(timeout=30) as client:
        while True:
            assert process.poll() is None, process.communicate()[0]
            try:
                if client.get(base + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.2)
        model = client.get(base + "/v1/models").json()["data"][0]["id"]
        reply = client.post(base + "/v1/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 6, "temperature": 0})
        assert reply.status_code == 200, reply.text
        return model, reply.json()["choices"][0]["message"]["content"]


def _stop(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate(timeout=30)


def test_serve_a_hub_id_from_the_offline_cache(tmp_path: Path) -> None:
    cache = tmp_path / "hf-cache"
    make_hub_cache(cache)
    answers = []
    for model in (REPO_ID, str(CKPT)):
        process, base = _serve(model, cache, tmp_path)
        try:
            answers.append(_answer(base, process))
        finally:
            _stop(process)
    (id_name, by_id), (_, by_folder) = answers
    assert id_name == "InternVL2-1B"
    assert by_id == by_folder and by_id


def test_serve_an_uncached_id_fails_with_a_clear_line(tmp_path: Path) -> None:
    cache = tmp_path / "hf-cache"
    make_hub_cache(cache)
    process, _ = _serve("OpenGVLab/InternVL2-2B", cache, tmp_path)
    try:
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=30)
    assert process.returncode == 1, output
    assert "OpenGVLab/InternVL2-2B" in output and "HF_HUB_OFFLINE" in output and "Traceback" not in output


def test_serve_a_revision(tmp_path: Path) -> None:
    cache = tmp_path / "hf-cache"
    make_hub_cache(cache)
    process, base = _serve(REPO_ID, cache, tmp_path, "--revision", REVISION)
    try:
        assert _answer(base, process)[1]
    finally:
        _stop(process)
    process, _ = _serve(REPO_ID, cache, tmp_path, "--revision", "no-such-branch")
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 1 and "no-such-branch" in output and "Traceback" not in output, output
