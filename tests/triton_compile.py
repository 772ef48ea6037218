"""Compile the package's Triton launches to cubins for sm_90 / sm_80 on a machine without a GPU (test helper).

``compile_in_subprocess(body)`` runs ``PRELUDE + body`` in a fresh interpreter without ``TRITON_INTERPRET``
(which the interpreter test modules set, and which must be unset when the kernels are defined). The prelude
defines ``compile_call(module, call, arch)``: the launch's exact arguments and constants (a ``KernelCall`` of
the package) compiled by triton down to a cubin with the ptxas triton ships; no driver and no device needed.
The body must print ``ok`` last.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PRELUDE = r'''
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int8: "i8", torch.int32: "i32"}


def kind(arg):
    if isinstance(arg, torch.Tensor):
        return "*" + TYPES[arg.dtype]
    return {bool: "i1", int: "i32", float: "fp32"}[type(arg)]


def compile_call(module, call, arch):
    assert not module.INTERPRETED
    fn = getattr(module, call.kernel)
    signature = {name: kind(arg) for name, arg in zip(fn.arg_names, call.args)}
    signature.update({name: "constexpr" for name in call.constants})
    assert list(signature) == fn.arg_names, (list(signature), fn.arg_names)
    compiled = triton.compile(ASTSource(fn, signature, call.constants), target=GPUTarget("cuda", arch, 32),
                              options={"enable_fp_fusion": True})
    assert compiled.asm["cubin"]
    return compiled
'''


def compile_in_subprocess(body: str) -> None:
    """Run the prelude and ``body`` without the Triton interpreter; fail with its output unless it ends in ok."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run([sys.executable, "-c", PRELUDE + body], capture_output=True, text=True, env=env,
                            cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("ok"), result.stdout
