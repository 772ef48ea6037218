"""Run the benchmarks in sequence (``internvl bench`` calls this). Each prints its own table.

    python benchmarks/run_all.py [--quick] [--record]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only the engine benchmark, fewer decode steps")
    parser.add_argument("--record", action="store_true", help="append the engine table to RESULTS.md")
    args = parser.parse_args()
    engine = [sys.executable, str(HERE / "bench_engine.py")] + (["--decode-steps", "8"] if args.quick else [])
    runs = [engine + (["--record"] if args.record else [])]
    if not args.quick:
        runs += [[sys.executable, str(HERE / "gemv.py")], [sys.executable, str(HERE / "quantization.py")]]
    status = 0
    for cmd in runs:
        print("$", " ".join(cmd[1:]), flush=True)
        status |= subprocess.call(cmd)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
