"""The GPU benchmark scripts run as a user runs them, on the CPU: ``benchmarks/gpu.py --device cpu --scale tiny``
(every measure of the GPU run, on tiny shapes) and ``benchmarks/preprocess.py`` (images/s, the exact path's
bit-identity check, the device path's differences)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run(script: str, *args: str, timeout: float = 300) -> str:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=timeout, check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done.stdout


def check_gpu_summary(out: str, json_file: Path, models: list[str]) -> None:
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary == json.loads(json_file.read_text())
    assert summary["device"] == "cpu" and summary["copy_gbps"] > 0
    assert list(summary["models"]) == models
    for variant, result in summary["models"].items():
        assert "error" not in result, (variant, result)
        assert result["decode_b1_tok_s"] > 0 and result["hbm_floor_ms"] > 0 and result["decode_b1_x_floor"] > 0
        assert result["ttft_one_tile_s"] > 0
        assert result["concurrent_3"]["output_tokens"] == 3 * 3 and result["concurrent_3"]["output_tok_s"] > 0
        assert result["images_per_s_preprocessed_8_threads"] > 0 and result["images_per_s_encoded"] > 0
        assert "transformers" in result["official"]["skipped"]        # not installed here: said, not run
        assert f"| {variant} | {result['decode_b1_tok_s']} |" in out
    assert "HBM floor bandwidth (device copy)" in out


def test_gpu_benchmark_dry_run_on_the_cpu(tmp_path):
    out = run("gpu.py", "--device", "cpu", "--scale", "tiny", "--models", "1B", "--concurrency", "3",
              "--decode-steps", "3", "--out-tokens", "3", "--out", str(tmp_path / "summary.json"))
    check_gpu_summary(out, tmp_path / "summary.json", ["1B"])


@pytest.mark.slow
def test_gpu_benchmark_dry_run_with_the_8b_shapes(tmp_path):
    out = run("gpu.py", "--device", "cpu", "--scale", "tiny", "--models", "1B,8B", "--concurrency", "3",
              "--decode-steps", "3", "--out-tokens", "3", "--out", str(tmp_path / "summary.json"))
    check_gpu_summary(out, tmp_path / "summary.json", ["1B", "8B"])


def test_gpu_benchmark_without_cuda_says_so():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py")], cwd=ROOT, text=True,
                          capture_output=True, timeout=120, check=False)
    assert done.returncode == 2 and "--device cpu" in done.stderr


def test_preprocess_benchmark_runs_and_compares():
    out = run("preprocess.py", "--rounds", "1", "--threads", "2", "--concurrency", "2", "--skip-encoder",
              "--compare")
    rows = [line for line in out.splitlines() if line.startswith("| ") and "JPEG" in line]
    assert [row.split(" | ")[0] for row in rows] == ["| 448x448 JPEG", "| 1024x768 JPEG", "| 1920x1080 JPEG"]
    assert [row.split(" | ")[1] for row in rows] == ["1", "13", "9"]
    assert "device path vs exact, pixel values" in out and "first-step logits on tiny-1B" in out
    assert out.count("argmax equal") == 3
