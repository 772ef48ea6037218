"""The grouped expert kernels compile for sm_90 (H100 / H200) and sm_80 (A100), on a machine without a GPU.

As ``test_triton_compile.py`` does for the attention and int8 kernels: the exact launches
``triton_grouped_experts`` makes (``grouped_experts_kernel_calls``: grid, arguments, constants) are compiled
to a cubin with the ptxas triton ships, in a subprocess without ``TRITON_INTERPRET``. Not run: nothing here
says the kernels have run on a GPU (no GPU this session). Slow-marked (the compiler).
"""

from __future__ import annotations

import pytest

from triton_compile import compile_in_subprocess

pytest.importorskip("triton")

_KERNELS = r"""
from internvl_runtime.kernels import _triton_moe_kernel
from internvl_runtime.kernels.triton_moe import align_pairs, choose_block_m, grouped_experts_kernel_calls


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
        compiled = compile_call(_triton_moe_kernel, call, arch)
        print(call.kernel, dtype, t, arch, "block_m", aligned.block_m, "shared", compiled.metadata.shared)


compile_moe(torch.bfloat16, 4, 8, 128, 2048, 768, "silu", False, False, 90)       # Qwen3-30B-A3B decode
compile_moe(torch.bfloat16, 4096, 8, 128, 2048, 768, "silu", False, False, 90)    # its prefill: 64-row blocks
compile_moe(torch.bfloat16, 8, 4, 32, 2880, 2880, "gpt_oss", True, False, 90)     # GPT-OSS-20B
compile_moe(torch.float16, 300, 8, 128, 2048, 768, "silu", False, True, 80)       # int8 experts, A100
print("ok")
"""


@pytest.mark.slow
def test_the_moe_kernels_compile_for_sm90_and_sm80() -> None:
    compile_in_subprocess(_KERNELS)
