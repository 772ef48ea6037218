"""The chaos check (benchmarks/chaos.py, issue #13) for 15 s at 8 clients on the tiny checkpoint: a real server
subprocess, clients that leave at random points, bad inputs that must get a 4xx, /metrics scrapes; the verdict
must pass (no engine death, no unexpected error, 0 KV blocks after the drain, greedy answers equal alone)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

CHAOS = Path(__file__).resolve().parents[2] / "benchmarks" / "chaos.py"
FIELDS = ("host", "settings", "completed", "dropped", "bad_inputs_4xx", "metrics_scrapes", "errors", "engine_deaths",
          "engine_restarts", "server_exit_code", "kv_blocks_in_use_after_drain", "rss_start_mib", "rss_end_mib",
          "rss_growth_mib", "greedy_compared", "greedy_mismatches", "greedy_alone_after_run", "criteria", "passed")


def load_module():
    """benchmarks/ is not a package: import the script by path (registered first, for its dataclasses)."""
    if "internvl_chaos" in sys.modules:
        return sys.modules["internvl_chaos"]
    spec = importlib.util.spec_from_file_location("internvl_chaos", CHAOS)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_chaos_short_run(tiny_1b, tmp_path):
    out = tmp_path / "chaos.json"
    cmd = [sys.executable, str(CHAOS), "--model", str(tiny_1b), "--seconds", "15", "--concurrency", "8", "--seed",
           "1", "--request-timeout", "20", "--drain", "10", "--json", str(out)]
    # its own session: should the script ever overrun, its server goes down with it
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        stdout, _ = proc.communicate(timeout=240)   # above the script's own hard deadline (15 + 2 x 10 + 180 s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the chaos check overran its own hard deadline")
    assert out.is_file(), stdout
    figures = json.loads(out.read_text())
    assert set(FIELDS) <= set(figures), stdout
    assert figures["host"]["cpu_model"] and isinstance(figures["host"]["avx512_bf16"], bool)
    assert "verdict: " in stdout and "resident memory" in stdout
    assert figures["completed"] > 0 and sum(figures["dropped"].values()) > 0, stdout
    assert sum(sum(statuses.values()) for statuses in figures["bad_inputs_4xx"].values()) > 0, stdout
    assert figures["engine_deaths"] == 0 and figures["server_exit_code"] is None, stdout
    assert figures["errors"] == {}, stdout
    assert figures["kv_blocks_in_use_after_drain"] == 0, stdout
    assert figures["greedy_compared"] > 0 and figures["greedy_mismatches"] == 0, stdout
    assert figures["passed"] and all(figures["criteria"].values()), stdout
    assert proc.returncode == 0, stdout


def test_chaos_judges_each_criterion():
    chaos = load_module()
    figures = chaos.Figures(host={}, settings={}, completed=3, greedy_compared=2, greedy_alone_after_run=2,
                            greedy_alone_after_run_mismatches=0, kv_blocks_in_use_after_drain=0.0,
                            rss_start_mib=100.0, rss_end_mib=110.0)
    chaos.judge(figures, max_rss_growth_mib=64)
    assert figures.passed and figures.rss_growth_mib == 10.0
    figures.engine_deaths = 1              # e.g. /health turned 503
    chaos.judge(figures, max_rss_growth_mib=64)
    assert not figures.passed and not figures.criteria["no engine deaths or restarts"]
    assert sum(not ok for ok in figures.criteria.values()) == 1


def test_chaos_arguments():
    chaos = load_module()
    for bad in (["--seconds", "0"], ["--drop-share", "1.5"], ["--max-tokens", "8", "4"], ["--concurrency", "0"]):
        with pytest.raises(SystemExit):
            chaos.main(bad)
