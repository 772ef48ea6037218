"""The kernels' just-in-time build lock (internvl_runtime/kernels/build.py) cannot hang a first start.

Each case loads the kernels in a fresh Python process with ``TORCH_EXTENSIONS_DIR`` in a tmp folder (the
real cache is never touched) and a subprocess timeout, so a hang fails the test instead of the run.
Only the concurrency test compiles (~15-40 s); the others replace torch's compile step with a stub that
raises, which proves the loader got past both locks without spending a build on it.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from internvl_runtime import kernels
from internvl_runtime.kernels import build

pytestmark = pytest.mark.skipif(not kernels.supported_paths(), reason="no native path on this CPU: nothing is built")

STUB = "stub build: not compiled in this test"

# Loads the kernels and prints what happened as JSON. argv[1] == "stub": torch's compile step raises
# (private torch name, hence the check that it exists: otherwise the test would silently compile).
LOADER = f"""
import json, logging, os, sys, time
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
if sys.argv[1] == "stub":
    from torch.utils import cpp_extension
    assert hasattr(cpp_extension, "_write_ninja_file_and_build_library")
    def stub(*args, **kwargs):
        raise RuntimeError({STUB!r})
    cpp_extension._write_ninja_file_and_build_library = stub
from internvl_runtime import kernels
if len(sys.argv) > 2:                      # a barrier: start loading when the file appears
    print("ready", flush=True)
    while not os.path.exists(sys.argv[2]):
        time.sleep(0.01)
start = time.monotonic()
available = kernels.available()
print(json.dumps({{"available": available, "seconds": time.monotonic() - start,
                  "describe": kernels.describe()}}), flush=True)
"""

# Holds our lock and torch's, as a build in progress does; prints "locked", then sleeps or dies.
HOLDER = """
import fcntl, os, signal, socket, sys, time
directory = sys.argv[1]
fd = os.open(os.path.join(directory, sys.argv[2]), os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\\n".encode(), 0)
os.close(os.open(os.path.join(directory, "lock"), os.O_CREAT | os.O_EXCL))   # torch's FileBaton
print("locked", flush=True)
if sys.argv[3] == "die":
    os.kill(os.getpid(), signal.SIGKILL)   # killed mid-build: nothing released by hand
time.sleep(300)
"""


def _env(extensions: Path, timeout: float | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (kernels.ENV_VAR, build.TIMEOUT_ENV_VAR)}
    env["TORCH_EXTENSIONS_DIR"] = str(extensions)
    if timeout is not None:
        env[build.TIMEOUT_ENV_VAR] = str(timeout)
    return env


def _load(extensions: Path, timeout: float | None, limit: float = 120) -> tuple[dict, str]:
    """Run LOADER with a stubbed compile; its JSON line and its log. Hanging past ``limit`` fails."""
    try:
        out = subprocess.run([sys.executable, "-c", LOADER, "stub"], env=_env(extensions, timeout),
                             capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        pytest.fail(f"loading the kernels hung for {limit} s")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


def _folder(tmp_path: Path) -> tuple[Path, Path]:
    """(TORCH_EXTENSIONS_DIR, the extension's build folder in it)."""
    directory = tmp_path / build.EXTENSION_NAME
    directory.mkdir()
    return tmp_path, directory


@contextlib.contextmanager
def _holder(directory: Path, then: str) -> Iterator[subprocess.Popen]:
    """A process holding both locks (``then``: "sleep" or "die" once it holds them); killed on exit."""
    with subprocess.Popen([sys.executable, "-c", HOLDER, str(directory), build.LOCK_NAME, then],
                          stdout=subprocess.PIPE, text=True) as holder:
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
            yield holder
        finally:
            holder.kill()


@pytest.mark.parametrize("owner", ["none", "dead"])
def test_lock_left_by_a_killed_build_does_not_hang(tmp_path: Path, owner: str) -> None:
    """torch's ``lock`` with a fresh mtime (torch waits forever on it), with or without our lock file."""
    extensions, directory = _folder(tmp_path)
    if owner == "dead":           # the killed builder also held our lock: its flock died with it
        with _holder(directory, then="die") as holder:
            assert holder.wait(timeout=30) == -signal.SIGKILL
    else:
        (directory / "lock").touch()
    assert time.time() - (directory / "lock").stat().st_mtime < 60
    result, log = _load(extensions, timeout=60)
    assert not result["available"] and STUB in result["describe"]   # got past both locks, to the build
    assert result["seconds"] < 30                                     # and did not wait for the timeout
    assert not (directory / "lock").exists()
    assert "removing the build lock" in log and "WARNING" in log


def test_live_builder_is_waited_for_at_most_the_timeout(tmp_path: Path) -> None:
    extensions, directory = _folder(tmp_path)
    with _holder(directory, then="sleep") as holder:
        result, log = _load(extensions, timeout=2)
    assert not result["available"]
    assert 2 <= result["seconds"] < 2 + 20, result
    assert f"pid {holder.pid}" in result["describe"] and build.TIMEOUT_ENV_VAR in result["describe"]
    assert STUB not in result["describe"]                       # it never built
    assert (directory / "lock").exists()                        # a live builder's torch lock stays
    warnings_logged = [line for line in log.splitlines() if line.startswith("WARNING")]
    assert len(warnings_logged) == 1 and "using torch" in warnings_logged[0], log


def test_build_lock_in_process(tmp_path: Path) -> None:
    """The lock itself: exclusive, bounded, released on exit and on error, owner written."""
    with build.build_lock(tmp_path, timeout=0):
        assert (tmp_path / build.LOCK_NAME).read_text().split()[0] == str(os.getpid())
        fd = os.open(tmp_path / build.LOCK_NAME, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):                   # held: another open file cannot take it
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    with pytest.raises(ZeroDivisionError), build.build_lock(tmp_path, timeout=0):
        1 / 0  # noqa: B018
    with build.build_lock(tmp_path, timeout=0):                      # released both times
        pass


def test_build_timeout_from_env(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv(build.TIMEOUT_ENV_VAR, raising=False)
    assert build.build_timeout() == build.DEFAULT_TIMEOUT_SECONDS
    monkeypatch.setenv(build.TIMEOUT_ENV_VAR, "2.5")
    assert build.build_timeout() == 2.5
    monkeypatch.setenv(build.TIMEOUT_ENV_VAR, "0")
    assert build.build_timeout() == 0
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv(build.TIMEOUT_ENV_VAR, bad)
        caplog.clear()
        assert build.build_timeout() == build.DEFAULT_TIMEOUT_SECONDS
        assert build.TIMEOUT_ENV_VAR in caplog.text


def _ninja_log_outputs(directory: Path) -> list[str]:
    """The outputs of every command ninja ran in ``directory`` (one entry per compile or link)."""
    lines = (directory / ".ninja_log").read_text().splitlines()
    return [line.split("\t")[3] for line in lines if line and not line.startswith("#")]


@pytest.mark.slow
def test_processes_starting_together_build_once(tmp_path: Path) -> None:
    """Two ranks load at the same moment: one compiles, the other waits, then loads the same .so."""
    if not (shutil.which("c++") and (shutil.which("ninja") or importlib.util.find_spec("ninja"))):
        pytest.skip("no compiler / ninja to build the kernels")
    extensions, directory = tmp_path, tmp_path / build.EXTENSION_NAME
    go = tmp_path / "go"
    env = _env(extensions, timeout=300)
    with contextlib.ExitStack() as stack:
        procs = [stack.enter_context(subprocess.Popen([sys.executable, "-c", LOADER, "real", str(go)], env=env,
                                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
                 for _ in range(2)]
        for p in procs:
            stack.callback(p.kill)
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        go.touch()
        outs = [p.communicate(timeout=400) for p in procs]
    results = [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in outs]
    assert all(r["available"] for r in results), results
    outputs = _ninja_log_outputs(directory)
    objects = sorted(o for o in outputs if o.endswith(".o"))
    assert objects == sorted(s.stem + ".o" for s in build.SOURCES), outputs   # each source compiled once
    assert [o for o in outputs if o.endswith(".so")] == [build.EXTENSION_NAME + ".so"], outputs
    waited = [stderr for _, stderr in outs if "waiting up to" in stderr]
    assert len(waited) == 1, [stderr for _, stderr in outs]                   # the other rank waited
    assert not (directory / "lock").exists()
