"""The official quick start (examples/quick_start.py) runs end to end on tiny checkpoints."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from paths import FIXTURES

ROOT = Path(__file__).resolve().parents[2]
DATA = FIXTURES


@pytest.mark.parametrize("variant", ["tiny-1B", "tiny-4B", "tiny-26B"])
def test_quick_start_example_runs(variant: str) -> None:
    cmd = [sys.executable, str(ROOT / "examples" / "quick_start.py"), "--model", str(DATA / "ckpt" / variant),
           "--image1", str(DATA / "data" / "img_800x600.png"), "--image2", str(DATA / "data" / "img_300x1200.png"),
           "--video", str(DATA / "data" / "video.mp4"), "--max-new-tokens", "8"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for expected in ("User: Hello, who are you?", "Image-1: <image>", "What is the red panda doing?",
                     "Please write a poem according to the image."):
        assert expected in out
    assert out.count("Assistant:") == 13
