"""The grouped expert kernels compile for sm_90 (H100 / H200) and sm_80 (A100), on a machine without a GPU.

As ``test_triton_compile.py`` does for the attention and int8 kernels: the exact launches
``triton_grouped_experts`` makes (``grouped_experts_kernel_calls``: grid, arguments, constants) are compiled
to a cubin with the ptxas triton ships, in a subprocess without ``TRITON_INTERPRET``. Not run: nothing here
says the kernels have run on a GPU (no GPU this session). Slow-marked (the compiler).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]

_COMPILE = r"""
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from internvl_runtime.kernels import _triton_moe_kernel
from internvl_runtime.kernels.triton_moe import align_pairs, choose_block_m, grouped_experts_kernel_calls

assert not _triton_moe_kernel.INTERPRETED
TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int8: "i8", torch.int32: "i32"}


def kind(arg):
    if isinstance(arg, torch.Tensor):
        return "*" + TYPES[arg.dtype]
    return {bool: "i1", int: "i32", float: "fp32"}[type(arg)]


def compile_moe(dtype, t, k, experts, hidden, inter, activation, bias, int8, arch):
    x = torch.empty(t, hidden, dtype=dtype)
    wdtype = torch.int8 if int8 else dtype
    w13, w2 = torch.empty(experts, 2 * inter, hidden, dtype=wdtype), torch.empty(experts, hidden, inter, dtype=wdtype)
    ids = torch.randint(0, experts, (t, k))
    aligned = align_pairs(ids, experts, choose_block_m(t * k, experts))
    calls = grouped_experts_kernel_calls(
        torch.empty(t * k, hidden), torch.empty(aligned.sorted_ids.shape[0], inter, dtype=dtype), x,
        torch.empty(t * k, dtype=dtype), w13, w2,
        torch.empty(experts, 2 * inter, dtype=dtype) if bias else None,
        torch.empty(experts, hidden, dtype=dtype) if bias else None,
        torch.empty(experts, 2 * inter, dtype=dtype) if int8 else None,
        torch.empty(experts, hidden, dtype=dtype) if int8 else None,
        aligned, top_k=k, activation=activation, limit=7.0 if activation == "gpt_oss" else None, alpha=1.702,
        interpreted=False)
    for call in calls:
        fn = getattr(_triton_moe_kernel, call.kernel)
        signature = {name: kind(arg) for name, arg in zip(fn.arg_names, call.args)}
        signature.update({name: "constexpr" for name in call.constants})
        assert list(signature) == fn.arg_names, (list(signature), fn.arg_names)
        compiled = triton.compile(ASTSource(fn, signature, call.constants), target=GPUTarget("cuda", arch, 32),
                                  options={"enable_fp_fusion": True})
        assert compiled.asm["cubin"]
        print(call.kernel, dtype, t, arch, "block_m", aligned.block_m, "shared", compiled.metadata.shared)


compile_moe(torch.bfloat16, 4, 8, 128, 2048, 768, "silu", False, False, 90)       # Qwen3-30B-A3B decode
compile_moe(torch.bfloat16, 4096, 8, 128, 2048, 768, "silu", False, False, 90)    # its prefill: 64-row blocks
compile_moe(torch.bfloat16, 8, 4, 32, 2880, 2880, "gpt_oss", True, False, 90)     # GPT-OSS-20B
compile_moe(torch.float16, 300, 8, 128, 2048, 768, "silu", False, True, 80)       # int8 experts, A100
print("ok")
"""


@pytest.mark.slow
def test_the_moe_kernels_compile_for_sm90_and_sm80() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run([sys.executable, "-c", _COMPILE], capture_output=True, text=True, env=env,
                            cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("ok"), result.stdout
