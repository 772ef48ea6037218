"""A Hugging Face Hub cache folder laid out as huggingface_hub lays it, for tests without network.

``<cache>/models--OpenGVLab--InternVL2-1B/`` holds ``blobs/<sha256>`` (each file's bytes), ``snapshots/<rev>/``
(one relative symlink per file into ``blobs/``) and ``refs/main`` (the 40-hex commit ``main`` points at),
exactly what ``snapshot_download`` leaves behind after a download; with ``HF_HUB_OFFLINE=1`` it then answers
from there.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from paths import FIXTURES

#: The tiny InternVL2-1B checkpoint (official layout, random weights) the cache holds.
CKPT = FIXTURES / "ckpt" / "tiny-1B"
REPO_ID = "OpenGVLab/InternVL2-1B"
#: The commit ``main`` points at in the fake cache.
REVISION = "0123456789abcdef0123456789abcdef01234567"


def make_hub_cache(cache: Path, *, repo_id: str = REPO_ID, revision: str = REVISION, source: Path = CKPT,
                   refs: tuple[str, ...] = ("main",)) -> Path:
    """Put ``source``'s files into ``cache`` as the snapshot ``revision`` of ``repo_id`` (each of ``refs``
    pointing at it); returns the snapshot folder."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for file in sorted(source.iterdir()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(revision)
    return snapshot
