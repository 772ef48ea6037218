"""Building the native kernels just in time, under a lock that cannot hang.

``cpp_extension.load`` guards its build folder with a ``lock`` file made with O_EXCL (torch's FileBaton)
and waits, with no time limit, for that file to go away. A build killed halfway (Ctrl-C, OOM killer, a
tensor-parallel launcher taking its ranks down) leaves the file behind, and every later first start
then waits forever. Hence our own lock around the whole build:

- ``fcntl.flock`` on ``internvl_build.lock`` in the build folder. The kernel drops a flock when its
  owner dies, however it dies, so a dead builder leaves nothing stale behind. The file itself stays (never
  unlink a flock file: a waiter would hold a lock on the removed inode while a newcomer locks a new one);
  it holds the owner's pid and host, only to name them in messages.
- A bounded wait: ``$INTERNVL_KERNEL_BUILD_TIMEOUT`` seconds (default 300; a build takes 10-40 s). Past
  it, ``BuildLockTimeout``, and the caller falls back to torch with a warning naming the owner.
- While we hold our lock no other process of ours is building, so a torch ``lock`` file present then was
  left by a killed build: it is removed (with a warning) before torch looks at it.

Concurrent processes (the ranks of a tensor-parallel run) build once: the first builds, the others wait
on the lock, then run ``cpp_extension.load`` on the finished folder, where ninja finds nothing to do
(``build.ninja`` is rewritten only when its content changes) and the .so is loaded as it is.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

#: The build folder's name: a torch upgrade (new headers / ABI) gets its own build, never a stale one.
EXTENSION_NAME = "internvl_kernels_v5_torch" + re.sub(r"[^0-9A-Za-z]", "_", torch.__version__)
SOURCES = tuple(Path(__file__).with_name("csrc") / name
                for name in ("gemv.cpp", "packed_bf16.cpp", "packed_bf16_pack.cpp", "decode_step.cpp",
                             "vision_attention.cpp"))
# No -march: the ISA is chosen per function in the source. -fopenmp: at::parallel_for is an OpenMP region
# inlined from torch's headers, which runs on ONE thread when the extension is compiled without it. At
# load time our libgomp.so.1 dependency resolves to the copy torch has already loaded (same soname), so
# the kernels share torch's thread pool.
CFLAGS = ["-O3", "-fno-math-errno", "-fopenmp"]
LDFLAGS = ["-fopenmp"]

TIMEOUT_ENV_VAR = "INTERNVL_KERNEL_BUILD_TIMEOUT"
DEFAULT_TIMEOUT_SECONDS = 300.0
LOCK_NAME = "internvl_build.lock"   # ours (flock); torch's own is "lock" (FileBaton)
TORCH_LOCK_NAME = "lock"
POLL_SECONDS = 0.2                  # a polled LOCK_NB, not a blocking flock: no signals, any thread


class BuildLockTimeout(RuntimeError):
    """Another process held the build lock for longer than ``$INTERNVL_KERNEL_BUILD_TIMEOUT`` seconds."""


def build_timeout() -> float:
    """Seconds to wait for another process's build: ``$INTERNVL_KERNEL_BUILD_TIMEOUT``, default 300."""
    raw = os.environ.get(TIMEOUT_ENV_VAR, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value >= 0:   # also false for nan
        # only a wait is at stake: a typo here should not cost the kernels
        logger.warning("internvl_runtime.kernels: %s=%r is not a number of seconds >= 0; waiting up to %.0f s",
                       TIMEOUT_ENV_VAR, raw, DEFAULT_TIMEOUT_SECONDS)
        return DEFAULT_TIMEOUT_SECONDS
    return value


def build_directory() -> Path:
    """torch's build folder for the extension (``$TORCH_EXTENSIONS_DIR/<name>``), created if missing."""
    from torch.utils import cpp_extension

    find = getattr(cpp_extension, "_get_build_directory", None)   # private, but it is the folder load() uses
    if find is not None:
        return Path(find(EXTENSION_NAME, False))
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    directory = Path(root) / EXTENSION_NAME
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _owner(fd: int) -> str:
    """'pid 123 on host h', as the lock's holder wrote it (or a vaguer phrase while it has not yet)."""
    try:
        fields = os.pread(fd, 256, 0).decode(errors="replace").split()
    except OSError:
        fields = []
    return f"pid {fields[0]} on host {fields[1]}" if len(fields) >= 2 else "another process"


@contextlib.contextmanager
def build_lock(directory: Path, timeout: float) -> Iterator[None]:
    """Hold the build folder's lock; wait at most ``timeout`` seconds for it, else ``BuildLockTimeout``.

    On entry, a torch ``lock`` file left in ``directory`` by a killed build is removed.
    """
    import fcntl  # POSIX only; elsewhere the ImportError is a build failure: torch fallback

    path = directory / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        waiting = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pass
            except OSError as exc:   # e.g. ENOLCK on a network file system without a lock daemon
                raise OSError(exc.errno, f"cannot lock {path} ({exc.strerror}); point TORCH_EXTENSIONS_DIR "
                                         "at a local disk") from exc
            now = time.monotonic()
            if now >= deadline:
                raise BuildLockTimeout(
                    f"waited {timeout:.0f} s for the native kernels' build by {_owner(fd)} (lock {path}); "
                    f"set {TIMEOUT_ENV_VAR} to wait longer")
            if not waiting:
                waiting = True
                logger.info("internvl_runtime.kernels: waiting up to %.0f s for the build by %s (%s)",
                            timeout, _owner(fd), path)
            time.sleep(min(POLL_SECONDS, deadline - now))
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        _clear_stale_torch_lock(directory)
        yield
    finally:
        os.close(fd)   # releases the flock


def _clear_stale_torch_lock(directory: Path) -> None:
    """Remove torch's ``lock`` file; call only while holding our lock (then no live build owns it)."""
    stale = directory / TORCH_LOCK_NAME
    if stale.exists():
        logger.warning("internvl_runtime.kernels: removing the build lock %s left by a killed build", stale)
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()


def _put_ninja_on_path() -> None:
    import shutil

    if shutil.which("ninja") is None:       # the PyPI `ninja` package, when its bin/ is not on PATH
        try:
            import ninja
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
            logger.info("internvl_runtime.kernels: using ninja from %s", ninja.BIN_DIR)
        except (ImportError, AttributeError):
            pass                            # torch then raises "Ninja is required": we fall back


def compile_extension() -> str:
    """Build (or reuse the cached build of) the extension under the build lock and load it; the .so path.

    Raises ``BuildLockTimeout`` when another process's build outlasts ``build_timeout()``, and whatever
    the build raises when it fails.
    """
    # imported lazily: it is slow and pulls in setuptools
    from torch.utils import cpp_extension

    _put_ninja_on_path()
    directory = build_directory()
    # record=True: never let a build warning become an error
    with build_lock(directory, build_timeout()), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = cpp_extension.load(name=EXTENSION_NAME, sources=[str(s) for s in SOURCES],
                                  extra_cflags=CFLAGS, extra_ldflags=LDFLAGS, build_directory=str(directory),
                                  is_python_module=False, verbose=False)
    for w in caught:
        logger.debug("while building %s: %s", EXTENSION_NAME, w.message)
    return str(path)
