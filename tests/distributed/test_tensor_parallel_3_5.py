"""Tensor parallelism (2 ranks, gloo, CPU) on InternVL3.5 dense (Qwen3): explicit head_dim (heads x head_dim is
not hidden_size), the per-head q/k norms replicated on every rank, tied embeddings split by vocabulary rows.
Against the single process: first-step logits within float32 tolerance and identical greedy tokens (the
group and the measurements are those of ``test_tensor_parallel.py``)."""

from __future__ import annotations

import pytest
import test_tensor_parallel as tp
import torch

VARIANT = "tiny-3_5-1B"


@pytest.fixture(scope="module")
def reference() -> dict:
    from internvl_runtime.engine.engine import EngineConfig, LLMEngine

    engine = LLMEngine.from_pretrained(tp.CKPT / VARIANT, dtype=torch.float32, config=EngineConfig(num_blocks=64))
    return tp._run(engine, engine.model)


def test_tp2_matches_single_process(reference: dict, tmp_path) -> None:
    ranks = tp._spawn_group(2, [VARIANT], tmp_path)
    ours = ranks[0][VARIANT]
    assert ours["tokens"] == reference["tokens"]
    assert ours["logits"].shape == reference["logits"].shape
    torch.testing.assert_close(ours["logits"], reference["logits"], rtol=1e-5, atol=1e-5)
