"""Peak host memory of loading: InternVL2-1B shapes (random weights), bf16 and int8, each in a fresh process.

    python benchmarks/load_peak.py [--model /tmp/bench/InternVL2-1B] [--package /work/main] [--append]

For each mode a child process loads the checkpoint on the CPU with ``loading.load_model`` and reports its peak
resident memory (``VmHWM``), its resident memory once loaded, the bytes the loaded weights hold, the largest
checkpoint tensor, and the load time. ``excess`` = peak - (resident after loading): what loading needed on top of
the model it produced (for int8 on the old path, the whole bf16 model; on the direct path, about one tensor plus
one linear layer in bf16). The import of torch and the package is in both figures, so it cancels out.
With the direct loader the child also counts, through its ``watch`` hook, the bytes of the LLM's linear
weights held in 16 bits at once (all of them on the old path, by construction: "not counted" there).

``--package DIR`` runs the children on another checkout of the package (e.g. the code before a change: a
``git worktree`` of an older commit), so "before" and "after" come from one script on one host.
Writes the real-shape checkpoint (1.8 GB) into a temporary folder when ``--model`` does not exist.
With ``--append`` the table goes to benchmarks/RESULTS.md with the host's CPU line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
MODES = {"bf16": None, "int8": "int8"}


def rss_mib(field: str = "VmRSS") -> float:
    """Resident memory of this process (``VmHWM``: its peak so far), MiB."""
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def child(path: Path, mode: str) -> None:
    """Load one mode; print one JSON line."""
    import gc

    import torch

    from internvl_runtime import loading
    from internvl_runtime.quantization import model_bytes
    from internvl_runtime.weights.loader import checkpoint_files, iter_checkpoint_lazy

    largest = max(lazy.nbytes for _, lazy in iter_checkpoint_lazy(checkpoint_files(path)))
    gc.collect()
    before = rss_mib()
    start = time.perf_counter()
    tracker = FloatTracker()
    if hasattr(loading, "build_on_devices"):       # the direct loader: counted as it allocates
        plan = loading.plan_load(path, dtype=torch.bfloat16, quantization=MODES[mode])
        model = loading.build_on_devices(plan, watch=tracker)
    else:
        model = loading.load_model(path, dtype=torch.bfloat16, quantization=MODES[mode])
    seconds = time.perf_counter() - start
    gc.collect()
    after = rss_mib()
    print(json.dumps({"mode": mode, "start_mib": before, "peak_mib": rss_mib("VmHWM"), "rss_mib": after,
                      "weights_mib": model_bytes(model) / 2**20, "largest_tensor_mib": largest / 2**20,
                      "float_linear_peak_mib": tracker.peak / 2**20 if tracker.allocated else None,
                      "float_linear_total_mib": tracker.allocated / 2**20 if tracker.allocated else None,
                      "load_s": seconds, "package": str(Path(loading.__file__).parent)}))


class FloatTracker:
    """The direct loader's ``watch``: bytes of the LLM's linear weights (what int8 quantizes) alive at once,
    through weak references to their storage (sampled at each allocation, where the figure can only grow)."""

    def __init__(self) -> None:
        self.alive: list[tuple[object, int]] = []
        self.peak = self.allocated = 0

    def __call__(self, name: str, tensor) -> None:
        from torch.multiprocessing.reductions import StorageWeakRef

        if not (name.startswith("language_model.") and name.endswith("weight")
                and ("_proj." in name or "lm_head." in name)):
            return
        nbytes = tensor.numel() * tensor.element_size()
        self.alive.append((StorageWeakRef(tensor.untyped_storage()), nbytes))
        self.allocated += nbytes
        self.peak = max(self.peak, sum(n for ref, n in self.alive if not ref.expired()))


def run_child(path: Path, mode: str, package: Path | None) -> dict:
    env = dict(os.environ)
    if package is not None:
        env["PYTHONPATH"] = str(package) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, __file__, "--model", str(path), "--child", mode], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict], label: str) -> str:
    lines = ["| code | mode | peak RSS MiB | RSS after MiB | excess MiB | weights MiB | largest tensor MiB "
             "| LLM linear weights in 16 bits alive at once / all, MiB | load s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        floats = ("not counted" if r.get("float_linear_peak_mib") is None
                  else f"{r['float_linear_peak_mib']:.0f} / {r['float_linear_total_mib']:.0f}")
        lines.append(f"| {label} | {r['mode']} | {r['peak_mib']:.0f} | {r['rss_mib']:.0f} | "
                     f"{r['peak_mib'] - r['rss_mib']:.0f} | {r['weights_mib']:.0f} | {r['largest_tensor_mib']:.0f} | "
                     f"{floats} | {r['load_s']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("/tmp/bench/InternVL2-1B"))
    parser.add_argument("--package", type=Path, default=None,
                        help="run the loads on the internvl_runtime under this folder (another checkout)")
    parser.add_argument("--label", default=None, help="the code's name in the table (default: the package path)")
    parser.add_argument("--append", action="store_true", help="append the table to benchmarks/RESULTS.md")
    parser.add_argument("--child", choices=list(MODES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.model, args.child)
        return
    path = args.model
    if not (path / "config.json").is_file():
        from internvl_runtime.testing.checkpoints import write_checkpoint

        path = write_checkpoint(Path(tempfile.mkdtemp()) / "InternVL2-1B", "1B", scale="real")
    rows = [run_child(path, mode, args.package) for mode in MODES]
    for row in rows:
        print(json.dumps(row), flush=True)
    label = args.label or rows[0]["package"]
    text = table(rows, label)
    print(text)
    if args.append:
        from internvl_runtime.hardware import describe_host

        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        with RESULTS.open("a", encoding="utf-8") as f:
            f.write(f"\n### load peak ({label}), {stamp}\n\nHost: {describe_host()}\n\n{text}\n")


if __name__ == "__main__":
    main()
