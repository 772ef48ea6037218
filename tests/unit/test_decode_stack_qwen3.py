"""The native decode step with Qwen3's per-head q/k RMSNorm (InternVL3.5 dense, tiny-3_5-1B: explicit head_dim)
against the Python layer loop, as ``test_decode_stack.py`` checks the other families: bf16, int8 and int4, a
prefill and several decode steps of three sequences, one on a fragmented block table."""

from __future__ import annotations

import os

import pytest
import test_decode_stack as base

from internvl_runtime import kernels

VARIANT = "tiny-3_5-1B"


@pytest.fixture(scope="module", autouse=True)
def native() -> None:
    if os.environ.get(kernels.ENV_VAR, "").lower() == "torch" or not kernels.available():
        pytest.skip(f"no native kernels here: {kernels.describe()}")


@pytest.mark.parametrize("quantization", [None, "int8", "int4:g32"])
def test_native_decode_with_qk_norm_equals_python_loop(quantization: str | None) -> None:
    model = base.load(VARIANT, **({"quantization": quantization} if quantization else {}))
    assert model.compute_plan.decode_layers.startswith("native"), model.compute_plan.decode_layers
    assert len(model.language_model.decode_stack.q_norm) == model.config.llm.num_hidden_layers
    base.assert_same(model, base.prompts_for(model))
