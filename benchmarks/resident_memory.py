"""Resident memory of a serving process by phase: load only, text-only decode, one image request.

    python benchmarks/resident_memory.py [--model /tmp/bench/InternVL2-1B] [--append]

Each mode runs in a fresh child process that builds an engine with ``LLMEngine.from_pretrained`` on the CPU in
bf16 (random InternVL2-1B-shaped weights, written when ``--model`` does not exist), then, in order: a text-only
request (a 280-token prompt, as the llama.cpp side-by-side's decode depth, and 32 greedy tokens), then one
request with a 448x448 image (one tile, 8 tokens). After each phase it reads ``/proc/self/status``: VmRSS
(steady), VmHWM (the peak so far), RssAnon (the process's own memory: heap, copies of weights) and RssFile
(file pages mapped and touched: the libraries, and the weights viewed from the checkpoint's memory map).

Modes: ``read+eager`` (every weight read into memory, the vision encoder loaded at start: the code before
issue #18's memory work, ``mmap=False, vision="eager"``), ``read+lazy`` (what a host computing in another dtype
than the stored one gets, e.g. float32 on an AVX2 host: nothing can be mapped), ``mmap+eager`` and ``mmap+lazy``
(``internvl serve``'s CPU default: weights in their stored format viewed from the file, the encoder read on the
first image).
``--package DIR`` runs the same modes on another checkout of the package first (the code before, from
``git archive``), labelled ``--label`` (a checkout from before the mmap / lazy options: read+eager only).
The KV pool is the same in every mode (``--num-blocks``, default 64 blocks of 16 tokens), so the figures
compare the weights; ``--num-blocks 8192`` (1.5 GiB for InternVL2-1B) shows what a large pool costs, as
``internvl serve``'s CPU default (a quarter of the memory available) makes one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
MODES = {"read+eager": (False, "eager"), "read+lazy": (False, "lazy"), "mmap+eager": (True, "eager"),
         "mmap+lazy": (True, "lazy")}
FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")
CONTEXT = 280


def status_mib() -> dict[str, float]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, MiB."""
    values = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in FIELDS:
                values[name] = int(rest.split()[0]) / 1024
    return values


def child(path: Path, mode: str, threads: int, num_blocks: int) -> None:
    """One mode, three phases; prints one JSON line."""
    import gc
    import inspect

    import torch

    # the package first: bench_engine puts this checkout's root first on sys.path, which would shadow --package
    from internvl_runtime.engine.engine import EngineConfig, LLMEngine
    from internvl_runtime.engine.sampling_params import SamplingParams
    from internvl_runtime.processing.inputs import Message, PreparedRequest

    sys.path.insert(0, str(HERE))
    from bench_engine import make_image

    torch.set_num_threads(threads)
    mmap, vision = MODES[mode]
    options = {"mmap": mmap, "vision": vision}
    if "mmap" not in inspect.signature(LLMEngine.from_pretrained).parameters:   # code from before the options
        assert (mmap, vision) == (False, "eager"), "the code under --package has no mmap / lazy vision"
        options = {}
    engine = LLMEngine.from_pretrained(path, dtype=torch.bfloat16, device="cpu", **options,
                                       config=EngineConfig(num_blocks=num_blocks, max_num_seqs=1, image_cache_bytes=0))
    gc.collect()
    phases = {"load": status_mib()}
    ids: list[int] = []
    while len(ids) < CONTEXT:
        ids += engine.tokenizer.encode("hello world, tell me a story about the number seven. ")
    engine.generate([PreparedRequest("", ids[:CONTEXT], [], [])],
                    SamplingParams(max_new_tokens=32, ignore_eos=True, temperature=0))
    gc.collect()
    phases["text decode"] = status_mib()
    phases["text decode"]["vision_loaded"] = getattr(engine.model, "vision_loaded", True)
    request = engine.processor.prepare([Message("user", "Describe the image.", [make_image(448, 448, 7)])], max_num=1)
    engine.generate([request], SamplingParams(max_new_tokens=8, ignore_eos=True, temperature=0))
    gc.collect()
    phases["one image"] = status_mib()
    print(json.dumps({"mode": mode, "phases": phases, "package": str(Path(inspect.getfile(LLMEngine)).parents[2]),
                      "mapped_mib": getattr(engine.model, "mapped_bytes", 0) / 2**20}))


def run_child(path: Path, mode: str, threads: int, num_blocks: int, package: Path | None, label: str) -> dict:
    env = dict(os.environ)
    if package is not None:
        env["PYTHONPATH"] = str(package) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, __file__, "--model", str(path), "--child", mode, "--threads", str(threads),
                          "--num-blocks", str(num_blocks)],
                         capture_output=True, text=True, check=True, env=env)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["code"] = label
    row["num_blocks"] = num_blocks
    return row


def table(rows: list[dict]) -> str:
    lines = ["| code | mode | KV blocks | phase | RSS MiB (steady) | peak RSS MiB (VmHWM) | RssAnon MiB "
             "| RssFile MiB | mapped weights MiB |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        for phase, v in row["phases"].items():
            note = " (encoder not loaded)" if v.get("vision_loaded") is False else ""
            lines.append(f"| {row['code']} | {row['mode']} | {row['num_blocks']} | {phase}{note} | {v['VmRSS']:.0f} "
                         f"| {v['VmHWM']:.0f} "
                         f"| {v['RssAnon']:.0f} "
                         f"| {v['RssFile']:.0f} | {row['mapped_mib']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("/tmp/bench/InternVL2-1B"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-blocks", type=int, default=64, help="KV pool blocks of 16 tokens")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated, of: " + ", ".join(MODES))
    parser.add_argument("--package", type=Path, default=None,
                        help="also run the modes on the internvl_runtime under this folder (the code before)")
    parser.add_argument("--label", default="before", help="that package's name in the table")
    parser.add_argument("--append", action="store_true", help="append the table to benchmarks/RESULTS.md")
    parser.add_argument("--child", choices=list(MODES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.model, args.child, args.threads, args.num_blocks)
        return
    path = args.model
    if not (path / "config.json").is_file():
        from internvl_runtime.testing.checkpoints import write_checkpoint

        path = write_checkpoint(Path(tempfile.mkdtemp()) / "InternVL2-1B", "1B", scale="real")
    modes = args.modes.split(",")
    runs = [(mode, None, "after") for mode in modes]
    if args.package is not None:
        runs = [(mode, args.package, args.label) for mode in modes] + runs
    rows = []
    for mode, package, label in runs:
        rows.append(run_child(path, mode, args.threads, args.num_blocks, package, label))
        print(json.dumps(rows[-1]), flush=True)
    text = table(rows)
    print(text)
    if args.append:
        from internvl_runtime.hardware import describe_host

        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        with RESULTS.open("a", encoding="utf-8") as f:
            f.write(f"\n### resident memory by phase, {stamp}\n\nHost: {describe_host()}\n\n{text}\n")


if __name__ == "__main__":
    main()
