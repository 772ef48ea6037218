"""The Triton kernels compile for the GPUs we serve on, on a machine without one.

The interpreter tests (``test_triton_attention.py``, ``test_triton_sink_attention.py``,
``test_triton_int8.py``) check the numbers but not what only the compiler checks (types across branches
and loop iterations, ``tl.dot`` shapes and precisions, register and shared-memory limits). Here the exact
launches the package makes (``attention_kernel_calls``, ``int8_matmul_kernel_call``: grid, arguments,
constants) are compiled by triton down to a cubin for sm_90 (H100 / H200) and sm_80 (A100) with the
ptxas triton ships; no driver and no device are needed. This does not run them: what has run on a GPU
is said in the kernels' commits.

One subprocess (``tests/triton_compile.py``: the kernels must be defined without ``TRITON_INTERPRET``, which
the other test modules set); slow-marked: ~15 s of CPU, most of it the compiler.
"""

from __future__ import annotations

import pytest

from triton_compile import compile_in_subprocess

pytest.importorskip("triton")

_KERNELS = r"""
from internvl_runtime.kernels import _triton_attention_kernel, _triton_int8_kernel
from internvl_runtime.kernels.triton_attention import attention_kernel_calls
from internvl_runtime.kernels.triton_int8 import int8_matmul_kernel_call


def attention(dtype, heads, kv_heads, head_dim, query_lens, arch, sinks=False, window=None):
    t = sum(query_lens)
    q = torch.empty(t, heads, head_dim, dtype=dtype)
    cache = torch.empty(64 * 16, kv_heads, head_dim, dtype=dtype)
    calls = attention_kernel_calls(
        q, cache, cache, torch.empty_like(q), block_tables=torch.zeros(len(query_lens), 8, dtype=torch.int32),
        seq_lens=torch.tensor(query_lens, dtype=torch.int32),
        query_start_loc=torch.zeros(len(query_lens) + 1, dtype=torch.int32), max_query_len=max(query_lens),
        block_size=16, scale=head_dim ** -0.5, interpreted=False,
        sinks=torch.empty(heads, dtype=dtype) if sinks else None, window=window)
    for call in calls:
        compiled = compile_call(_triton_attention_kernel, call, arch)
        print(call.kernel, dtype, heads, kv_heads, head_dim, max(query_lens), arch, sinks, window,
              "shared", compiled.metadata.shared)
    return len(calls)


def int8(dtype, m, n, k, bias, arch):
    x, weight = torch.empty(m, k, dtype=dtype), torch.empty(n, k, dtype=torch.int8)
    scales = torch.empty(n, dtype=dtype)
    call = int8_matmul_kernel_call(torch.empty(m, n, dtype=dtype), x, weight, scales,
                                   scales if bias else None, interpreted=False)
    compile_call(_triton_int8_kernel, call, arch)
    print("int8", dtype, m, arch)


assert attention(torch.bfloat16, 14, 2, 64, [1, 1, 1], 90) == 2      # InternVL2-1B decode: split, merged
assert attention(torch.bfloat16, 32, 8, 128, [1, 300], 90) == 1      # a mixed batch, head dim 128 (2B and up)
assert attention(torch.float16, 4, 2, 16, [1] * 64, 80) == 1         # the fixtures' head dim, fp16, A100
# GPT-OSS-20B (64 heads over 8 KV heads, head dim 64): sinks with and without its 128-position window
assert attention(torch.bfloat16, 64, 8, 64, [1], 90, sinks=True, window=128) == 2    # decode: split, merged
assert attention(torch.bfloat16, 64, 8, 64, [1, 300], 90, sinks=True, window=128) == 1
assert attention(torch.bfloat16, 64, 8, 64, [1] * 4, 80, sinks=True) == 2            # a full layer, A100
assert attention(torch.float16, 64, 8, 64, [1, 40], 80, sinks=True, window=128) == 1
int8(torch.bfloat16, 1, 4096, 4096, False, 90)            # decode
int8(torch.float16, 300, 4096, 4096, True, 80)            # prefill
print("ok")
"""


@pytest.mark.slow
def test_the_kernels_compile_for_sm90_and_sm80() -> None:
    compile_in_subprocess(_KERNELS)
