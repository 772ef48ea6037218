"""What a CPU serving process imports and keeps (issue #18's resident memory): the modules that cost tens of MB
resident and that a CPU engine never runs stay unimported through loading, a text-only decode and an image
request, and the engine still answers both (each check in a fresh interpreter: ``sys.modules`` of the test
process holds whatever other tests imported); the CPU's KV pool is resident only where tokens were stored."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from internvl_runtime.models.layers.attention import KVCache
from internvl_runtime.models.layers.lazy_zeros import lazy_zeros
from paths import FIXTURES

CKPT = FIXTURES / "ckpt" / "tiny-1B"

#: Top-level modules (and torch submodules) a CPU engine must not import: triton (its library: ~70 MB of
#: pages), sympy and mpmath (~30 MB, imported by torch's Python references), the compiler stack.
HEAVY = ("triton", "sympy", "mpmath", "torch._dynamo", "torch._inductor")

_ENGINE_PATH = """
import json, sys
import torch
from PIL import Image
from internvl_runtime.engine.engine import EngineConfig, LLMEngine
from internvl_runtime.engine.sampling_params import SamplingParams
from internvl_runtime.processing.inputs import Message, PreparedRequest

HEAVY = tuple(sys.argv[2].split(","))

def heavy():
    return sorted(m for m in sys.modules if any(m == h or m.startswith(h + ".") for h in HEAVY))

engine = LLMEngine.from_pretrained(sys.argv[1], dtype=torch.float32, device="cpu",
                                   config=EngineConfig(num_blocks=32, max_num_seqs=1))
report = {"load": heavy()}
ids = engine.tokenizer.encode("hello world, tell me a story")
params = SamplingParams(max_new_tokens=4, ignore_eos=True, temperature=0)
text = engine.generate([PreparedRequest("", ids, [], [])], params)
report["text"] = heavy()
report["text_tokens"] = len(text[0].token_ids)
request = engine.processor.prepare([Message("user", "Describe the image.", [Image.new("RGB", (64, 48), "red")])],
                                   max_num=1)
image = engine.generate([request], params)
report["image"] = heavy()
report["image_tokens"] = len(image[0].token_ids)
print(json.dumps(report))
"""


def test_a_cpu_engine_imports_no_heavy_module_it_does_not_run() -> None:
    result = subprocess.run([sys.executable, "-c", _ENGINE_PATH, str(CKPT), ",".join(HEAVY)],
                            check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert (report["text_tokens"], report["image_tokens"]) == (4, 4)
    assert (report["load"], report["text"], report["image"]) == ([], [], [])


def _resident_mib() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def test_a_cpu_kv_pool_is_resident_only_where_written() -> None:
    before = _resident_mib()
    cache = KVCache.allocate(num_layers=4, num_blocks=4096, block_size=16, num_kv_heads=4, head_dim=64,
                             dtype=torch.bfloat16, device="cpu")          # 4 x 2 x 32 MiB = 256 MiB of pool
    assert cache.bytes_per_block() * cache.num_blocks == 256 * 2**20
    assert _resident_mib() - before < 32                                # not written: not resident
    first = cache.keys[0][: cache.block_size]
    first.copy_(torch.full_like(first, 1.5))                            # one block of one layer written
    assert _resident_mib() - before < 32
    assert bool((cache.keys[0][: cache.block_size] == 1.5).all())
    assert all(not bool(t.any()) for t in (cache.keys[0][cache.block_size:], cache.values[0], cache.keys[3]))
    assert cache.keys[0].is_contiguous() and cache.keys[0].shape == (4096 * 16, 4, 64)


def test_lazy_zeros_elsewhere_is_torch_zeros() -> None:
    meta = lazy_zeros((3, 5), dtype=torch.float16, device="meta")
    assert (meta.device.type, meta.shape, meta.dtype) == ("meta", (3, 5), torch.float16)
    empty = lazy_zeros((0, 5), dtype=torch.float32, device="cpu")
    assert empty.shape == (0, 5)
