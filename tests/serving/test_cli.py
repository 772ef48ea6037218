"""The ``internvl`` command: --help everywhere, flags built from ServerConfig, generate / chat / serve with the
tiny checkpoint and with --demo, download without a network, bench."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from internvl_runtime import cli
from internvl_runtime.serving.config import DEMO_LABEL, ServerConfig

from .helpers import free_port, png_bytes


def run_cli(*args: str, env: dict | None = None, stdin: str | None = None, timeout: float = 120,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "internvl_runtime", *args], input=stdin, capture_output=True,
                          text=True, env=full_env, timeout=timeout, cwd=cwd)


@pytest.fixture
def cache_env(tmp_path: Path) -> dict:
    return {"XDG_CACHE_HOME": str(tmp_path / "cache"), "INTERNVL_CACHE": ""}


@pytest.fixture
def image_file(tmp_path: Path) -> Path:
    path = tmp_path / "red.png"
    path.write_bytes(png_bytes(48, 32))
    return path


# ---------------------------------------------------------------------------------------------------
# help and flags
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["serve"], ["chat"], ["generate"], ["download"], ["bench"]])
def test_help_everywhere(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: internvl")


def test_serve_flags_come_from_server_config(capsys):
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    out = capsys.readouterr().out
    for field in ServerConfig.cli_fields():
        assert "--" + field.name.replace("_", "-") in out, field.name
        assert field.metadata["help"].split()[0] in out
    assert "--demo" in out


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "serve" in capsys.readouterr().out


def test_console_script_entry_point():
    result = subprocess.run([sys.executable, "-c", "from importlib.metadata import entry_points; "
                             "print([e.value for e in entry_points(group='console_scripts', name='internvl')])"],
                            capture_output=True, text=True, timeout=60)
    assert "internvl_runtime.cli:main" in result.stdout


def test_missing_path_is_a_clear_error(capsys, tmp_path):
    assert cli.main(["serve"]) == 1
    assert "--demo" in capsys.readouterr().err
    assert cli.main(["generate", str(tmp_path / "nope"), "--prompt", "hi"]) == 1
    err = capsys.readouterr().err
    assert "does not exist" in err and "internvl download" in err
    assert cli.main(["chat", str(tmp_path), "--demo"]) == 1
    assert "not both" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# generate / chat
# ---------------------------------------------------------------------------------------------------


def test_generate_with_checkpoint_and_image(tiny_1b, image_file):
    result = run_cli("generate", str(tiny_1b), "--image", str(image_file), "--prompt", "Describe the image.",
                     "--max-tokens", "6", "--max-dynamic-patch", "1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert DEMO_LABEL not in result.stdout
    assert "Traceback" not in result.stderr
    assert "loading tiny-1B" in result.stderr            # the progress bar


def test_generate_demo_builds_a_labelled_checkpoint(cache_env, tmp_path):
    result = run_cli("generate", "--demo", "--prompt", "Hello", "--max-tokens", "4", env=cache_env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(DEMO_LABEL)
    demo = tmp_path / "cache" / "internvl_runtime" / "demo-1B"
    assert (demo / "config.json").is_file() and (demo / "model.safetensors").is_file()
    assert "random" in result.stderr.lower()
    again = run_cli("generate", "--demo", "--prompt", "Hello", "--max-tokens", "4", env=cache_env)
    assert again.returncode == 0 and "built a random-weight" not in again.stderr     # reused, not rebuilt


def test_generate_bad_image_is_a_clear_error(tiny_1b, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    result = run_cli("generate", str(tiny_1b), "--image", str(bad), "--prompt", "x", "--max-tokens", "2")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "cannot decode image" in result.stderr


def test_chat_session(tiny_1b, image_file):
    script = "\n".join(["Hello there", f"/image {image_file}", "What is in it?", "/image /no/such.png",
                        "/reset", "/bogus", "", "Again", "/exit"]) + "\n"
    result = run_cli("chat", str(tiny_1b), "--max-tokens", "4", "--max-dynamic-patch", "1", stdin=script)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.count("model> ") == 3
    assert "[image attached:" in out
    assert "error: image file '/no/such.png' does not exist" in out
    assert "[conversation reset]" in out
    assert "unknown command /bogus" in out
    assert "Traceback" not in result.stderr


def test_chat_demo_labels_every_answer(cache_env, image_file):
    result = run_cli("chat", "--demo", "--image", str(image_file), "--max-tokens", "3", "--max-dynamic-patch", "1",
                     env=cache_env, stdin="one\ntwo\n")           # EOF ends the session
    assert result.returncode == 0, result.stderr
    answers = [line for line in result.stdout.splitlines() if "model> " in line]
    assert len(answers) == 2 and all(DEMO_LABEL in a for a in answers)
    assert "RANDOM-WEIGHT DEMO" in result.stdout


# ---------------------------------------------------------------------------------------------------
# serve
# ---------------------------------------------------------------------------------------------------


def test_serve_demo_end_to_end(cache_env):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "internvl_runtime", "serve", "--demo", "--port", str(port),
                                "--log-level", "warning", "--max-model-len", "2048"],
                               env={**os.environ, **cache_env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert httpx.get(base + "/health").json()["demo"] is True
        assert "<title>InternVL chat</title>" in httpx.get(base + "/").text
        with openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0) as client:
            model = client.models.list().data[0].id
            answer = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                                    max_tokens=3)
            assert answer.choices[0].message.content.startswith(DEMO_LABEL)
            assert answer.system_fingerprint == "demo-random-weights"
    finally:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert "serving 'demo-1B'" in err and "Traceback" not in err


def test_serve_exits_when_loading_fails(tmp_path):
    empty = tmp_path / "not-a-checkpoint"
    empty.mkdir()
    result = run_cli("serve", str(empty), "--port", str(free_port()), "--log-level", "critical", timeout=90)
    assert result.returncode == 1
    assert "loading the model failed" in result.stderr
    assert result.stderr.count("Traceback") == 0


# ---------------------------------------------------------------------------------------------------
# download / bench
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"}],
                         ids=["offline-mode", "unreachable-hub"])
def test_download_offline_is_a_clear_message(tmp_path, env):
    result = run_cli("download", "OpenGVLab/InternVL2-1B", "--local-dir", str(tmp_path / "w"),
                     env={**env, "HF_HOME": str(tmp_path / "hf")}, timeout=120)
    assert result.returncode == 1
    assert "cannot reach the Hugging Face Hub" in result.stderr
    assert "Traceback" not in result.stderr


def test_bench_runs_run_all(tmp_path, monkeypatch):
    (tmp_path / "benchmarks").mkdir()
    marker = tmp_path / "ran.txt"
    (tmp_path / "benchmarks" / "run_all.py").write_text(
        "import sys, pathlib\n"
        f"pathlib.Path({str(marker)!r}).write_text(' '.join(sys.argv[1:]))\n"
        "sys.exit(3)\n")
    monkeypatch.setattr(cli, "_bench_roots", lambda: [tmp_path])
    assert cli.main(["bench", "--quick"]) == 3
    assert marker.read_text() == "--quick"


def test_bench_without_benchmarks(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "_bench_roots", lambda: [tmp_path])
    assert cli.main(["bench"]) == 1
    assert "no benchmarks are there" in capsys.readouterr().err


def test_info_shows_the_host_and_plan(capsys):
    assert cli.main(["info", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "host:" in out and "compute plan: weights float32" in out
