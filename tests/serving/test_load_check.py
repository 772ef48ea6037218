"""The load check (benchmarks/load_check.py) runs in CI on the tiny checkpoint: 64 concurrent streaming
clients on loopback, no errors, and every answer equal to the same request's answer alone (greedy)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

LOAD_CHECK = Path(__file__).resolve().parents[2] / "benchmarks" / "load_check.py"


def load_module():
    """benchmarks/ is not a package: import the script by path (registered first, for its dataclasses)."""
    if "internvl_load_check" in sys.modules:
        return sys.modules["internvl_load_check"]
    spec = importlib.util.spec_from_file_location("internvl_load_check", LOAD_CHECK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_load_check_64_clients(tiny_1b):
    report = load_module().run_load_check(tiny_1b, clients=64, requests=128, distinct=8, max_tokens=8,
                                          time_limit=120)
    assert report.errors == 0, report.error_samples
    assert report.completed == 128
    assert report.mismatches == 0
    assert report.requests_per_s > 0 and report.ttft_p50_s is not None
    assert report.ttft_p50_s <= report.ttft_p99_s


def test_load_check_command_line(tiny_1b, capsys):
    status = load_module().main(["--model", str(tiny_1b), "--clients", "4", "--requests", "8", "--distinct", "2",
                                 "--max-tokens", "4", "--json"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "requests/s" in out and "TTFT p50 / p99" in out and '"mismatches": 0' in out
