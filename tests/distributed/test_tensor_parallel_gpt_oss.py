"""Tensor parallelism (2 ranks, gloo, CPU) on InternVL3.5-GPT-OSS (tiny-3_5-20B-A4B: sinks, sliding windows,
attention biases, stacked experts with biases) against the single process: first-step logits (a prompt with an
image) within float32 tolerance and identical greedy tokens (the group and the measurements are those of
``test_tensor_parallel.py``).

How it splits (``distributed/layers.py``): each rank keeps its 2 of the 4 query heads with their sinks
(``self_attn.sinks`` sliced per head) and 1 of the 2 KV heads; o_proj's bias is added once, after the
all-reduce; each rank holds 2 of the 4 experts of every layer, read from the checkpoint's stacked (E, ...)
tensors as those experts' rows only, then put through the family's transform; the router is replicated.
"""

from __future__ import annotations

import pytest
import test_tensor_parallel as tp
import torch

from internvl_runtime.config import InternVLConfig

VARIANT = "tiny-3_5-20B-A4B"
STACKS = ("mlp.experts.gate_up_proj.weight", "mlp.experts.gate_up_proj.bias", "mlp.experts.down_proj.weight",
          "mlp.experts.down_proj.bias")


@pytest.fixture(scope="module")
def single() -> dict:
    from internvl_runtime.engine.engine import EngineConfig, LLMEngine

    engine = LLMEngine.from_pretrained(tp.CKPT / VARIANT, dtype=torch.float32, config=EngineConfig(num_blocks=64))
    llm = engine.model.language_model
    return {**tp._run(engine, engine.model),
            "llm_bytes": sum(p.numel() * p.element_size() for p in llm.parameters()),
            "params": {name: p.detach().clone() for name, p in llm.named_parameters()}}


@pytest.fixture(scope="module")
def tp2(tmp_path_factory) -> list[dict]:
    return tp._spawn_group(2, [VARIANT], tmp_path_factory.mktemp("tp2gptoss"))


def test_tp2_matches_single_process(single: dict, tp2: list[dict]) -> None:
    ours = tp2[0][VARIANT]
    assert ours["tokens"] == single["tokens"]
    assert ours["logits"].shape == single["logits"].shape
    torch.testing.assert_close(ours["logits"], single["logits"], rtol=1e-5, atol=1e-5)


def test_tp2_weight_bytes_per_rank(single: dict, tp2: list[dict]) -> None:
    """Heads, experts and vocabulary split: about half of the decoder per rank (norms, router replicated)."""
    for rank in (0, 1):
        assert 0.45 * single["llm_bytes"] <= tp2[rank][VARIANT]["llm_bytes"] <= 0.55 * single["llm_bytes"]


def _rank_model(rank: int):
    """This rank's decoder, built on the meta device as ``build_tensor_parallel_model`` does (not loaded)."""
    from internvl_runtime.distributed.layers import check_family, make_tensor_parallel, shard_plan
    from internvl_runtime.models.internvl import InternVLModel

    config = InternVLConfig.from_pretrained(tp.CKPT / VARIANT)
    plan = shard_plan(config.llm, 2, rank)
    with torch.device("meta"):
        model = InternVLModel(config)
        check_family(model.language_model)
        make_tensor_parallel(model.language_model, plan, group=None)     # type: ignore[arg-type]  (not run)
    return model, plan


@pytest.mark.parametrize("rank", [0, 1])
def test_each_rank_reads_its_heads_sinks_and_experts(single: dict, rank: int) -> None:
    """Load this rank's slices through the resolver (no group needed) and compare them with the whole model's
    parameters: sinks of its heads, o_proj's columns and whole bias, its experts' rows of every stack."""
    from internvl_runtime.distributed.layers import tp_resolver
    from internvl_runtime.weights.loader import checkpoint_files, load_weights

    model, plan = _rank_model(rank)
    model.to_empty(device="cpu")
    resolve = tp_resolver(model.resolve_checkpoint_name, model.language_model, plan)
    load_weights(model, checkpoint_files(tp.CKPT / VARIANT), resolve)
    whole = single["params"]
    ours = dict(model.language_model.named_parameters())
    heads = slice(2 * rank, 2 * rank + 2)
    for i in range(4):
        attn = f"model.layers.{i}.self_attn."
        assert ours[attn + "sinks"].shape == (2,)
        assert torch.equal(ours[attn + "sinks"], whole[attn + "sinks"][heads])
        assert torch.equal(ours[attn + "o_proj.weight"], whole[attn + "o_proj.weight"][:, 32 * rank:32 * rank + 32])
        assert torch.equal(ours[attn + "o_proj.bias"], whole[attn + "o_proj.bias"])
        assert torch.equal(ours[f"model.layers.{i}.mlp.gate.weight"], whole[f"model.layers.{i}.mlp.gate.weight"])
        for stack in STACKS:
            name = f"model.layers.{i}.{stack}"
            per_expert = whole[name].view(4, -1)
            assert torch.equal(ours[name].view(2, -1), per_expert[2 * rank:2 * rank + 2]), name


def test_the_stacked_experts_are_read_as_this_ranks_rows_only() -> None:
    """The resolver's reader for a stacked (E, ...) checkpoint tensor touches rows [first, first + count) only."""
    from internvl_runtime.distributed.layers import tp_resolver
    from internvl_runtime.weights.loader import LazyTransform

    model, plan = _rank_model(1)
    resolve = tp_resolver(model.resolve_checkpoint_name, model.language_model, plan)
    target = resolve("language_model.model.layers.0.mlp.experts.down_proj")
    assert target is not None
    name, shard, reader = target
    assert name == "language_model.model.layers.0.mlp.experts.down_proj.weight" and shard is None
    assert isinstance(reader, LazyTransform)

    class Rows:
        """A stand-in for a memory-mapped (E, I, hidden) tensor that records which rows are read."""

        shape = (4, 32, 48)

        def __init__(self) -> None:
            self.read: list[slice] = []

        def __getitem__(self, index: slice) -> torch.Tensor:
            self.read.append(index)
            return torch.arange(4 * 32 * 48, dtype=torch.float32).view(self.shape)[index]

    rows = Rows()
    out = reader.read(rows)                                          # type: ignore[arg-type]
    assert rows.read == [slice(2, 4)]
    assert out.shape == (2 * 48, 32)
