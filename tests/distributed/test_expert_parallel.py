"""Expert parallelism on the tensor-parallel ranks (CPU, gloo): a tiny Qwen3-MoE InternVL (``moe_checkpoint``)
on 2 ranks equals the single process.

Each rank holds 4 of the 8 experts of every sparse layer (its own checkpoint tensors only: the others
resolve to ``ELSEWHERE`` and are never read), the router replicated, attention and the layer without
experts split as before; one all-reduce after the experts. Checked: first-step logits (a prompt with an
image) within float32 tolerance and greedy tokens identical; each rank's stacks are exactly its experts of
the whole model's; the resolver's answers per expert; sizes that cannot split the experts are refused.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from internvl_runtime.config import InternVLConfig
from internvl_runtime.errors import ConfigError
from internvl_runtime.processing.inputs import Message
from moe_checkpoint import write_tiny_qwen3_moe
from paths import FIXTURES

IMAGE = FIXTURES / "data" / "frame_000.png"
NEW_TOKENS = 6
STACKS = ("mlp.experts.gate_up_proj.weight", "mlp.experts.down_proj.weight")


def _run(engine, model) -> dict:
    """First-step logits (prefill with an image) and greedy tokens."""
    from internvl_runtime.engine.model_runner import SequenceStep
    from internvl_runtime.engine.sampling_params import SamplingParams

    request = engine.processor.prepare([Message("user", "Describe the image.", [str(IMAGE)])], max_num=1)
    pixels = torch.cat([im.pixel_values for im in request.images])
    features = model.extract_feature(pixels).reshape(-1, model.config.llm.hidden_size)
    ids = request.prompt_token_ids
    blocks = list(range(engine.runner.kv_cache.num_blocks - (-(-len(ids) // 16)), engine.runner.kv_cache.num_blocks))
    logits = engine.runner.execute([SequenceStep(ids, 0, blocks, features)])
    out = engine.generate([request], SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0, ignore_eos=True))
    return {"logits": logits.clone(), "tokens": list(out[0].token_ids)}


def _stacks(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.language_model.named_parameters() if name.endswith(STACKS)}


def _ep_rank(rank: int, world: int, init_method: str, folder: str, out_dir: str) -> None:
    from internvl_runtime.api.auto import InternVLChatModel
    from internvl_runtime.distributed.launch import build_tensor_parallel_model
    from internvl_runtime.distributed.parallel_state import init_group
    from internvl_runtime.distributed.worker import TensorParallelRunner, run_worker
    from internvl_runtime.engine.engine import EngineConfig, LLMEngine
    from internvl_runtime.engine.model_runner import ModelRunner
    from internvl_runtime.models.internvl import InternVLModel
    from internvl_runtime.processing.tokenization import AutoTokenizer

    torch.set_num_threads(1)
    group = init_group(rank=rank, world_size=world, init_method=init_method, timeout_s=60)
    model = build_tensor_parallel_model(folder, group, dtype=torch.float32,
                                        model_class=InternVLChatModel if rank == 0 else InternVLModel)
    result: dict = {"stacks": _stacks(model)}
    if rank == 0:
        engine = LLMEngine(model, AutoTokenizer.from_pretrained(folder), EngineConfig(num_blocks=64),
                           runner_factory=lambda m, **kw: TensorParallelRunner(ModelRunner(m, **kw), group))
        result.update(_run(engine, model))
        engine.runner.close()
    else:
        run_worker(model, group)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    group.barrier()
    os._exit(0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_tiny_qwen3_moe(tmp_path_factory.mktemp("qwen3moe"))


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> dict:
    from internvl_runtime.engine.engine import EngineConfig, LLMEngine

    engine = LLMEngine.from_pretrained(checkpoint, dtype=torch.float32, config=EngineConfig(num_blocks=64))
    return {**_run(engine, engine.model), "stacks": _stacks(engine.model)}


@pytest.fixture(scope="module")
def ep2(checkpoint: Path, tmp_path_factory) -> list[dict]:
    from internvl_runtime.distributed.launch import free_port

    out_dir = tmp_path_factory.mktemp("ep2")
    ctx = mp.start_processes(_ep_rank, args=(2, f"tcp://127.0.0.1:{free_port()}", str(checkpoint), str(out_dir)),
                             nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 150
    while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for pid in ctx.pids():
                os.kill(pid, signal.SIGKILL)
            pytest.fail("the expert-parallel group did not finish in 150 s")
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(2)]


def test_two_ranks_equal_one(reference: dict, ep2: list[dict]) -> None:
    ours = ep2[0]
    assert ours["tokens"] == reference["tokens"]
    torch.testing.assert_close(ours["logits"], reference["logits"], rtol=1e-5, atol=1e-5)


def test_each_rank_holds_its_half_of_the_experts(reference: dict, ep2: list[dict]) -> None:
    whole = reference["stacks"]
    assert len(whole) == 2 * 2                                       # two sparse layers, two stacks each
    for rank, result in enumerate(ep2):
        assert result["stacks"].keys() == whole.keys()
        for name, full in whole.items():
            per_expert = full.view(8, -1, full.shape[-1])
            assert torch.equal(result["stacks"][name].view(4, -1, full.shape[-1]), per_expert[rank * 4:(rank + 1) * 4])


def test_the_resolver_reads_only_this_ranks_experts(checkpoint: Path) -> None:
    from internvl_runtime.distributed.layers import (
        ShardPlan,
        check_family,
        make_tensor_parallel,
        shard_plan,
        tp_resolver,
    )
    from internvl_runtime.models.internvl import InternVLModel
    from internvl_runtime.weights.loader import ELSEWHERE

    config = InternVLConfig.from_pretrained(checkpoint)
    plan: ShardPlan = shard_plan(config.llm, 2, 1)
    assert (plan.num_experts, plan.experts_per_rank, plan.expert_range()) == (8, 4, (4, 4))
    with torch.device("meta"):
        model = InternVLModel(config)
        check_family(model.language_model)
        make_tensor_parallel(model.language_model, plan, group=None)     # type: ignore[arg-type]  (not run)
    resolve = tp_resolver(model.resolve_checkpoint_name, model.language_model, plan)
    name = "language_model.model.layers.0.mlp.experts.{}.up_proj.weight"
    assert resolve(name.format(3)) == ELSEWHERE
    assert resolve(name.format(5)) == ("language_model.model.layers.0.mlp.experts.gate_up_proj.weight", (1, 1), None)
    router = resolve("language_model.model.layers.0.mlp.gate.weight")
    assert router == ("language_model.model.layers.0.mlp.gate.weight", None, None)        # replicated


def test_sizes_that_cannot_split_the_experts_are_refused(checkpoint: Path) -> None:
    from internvl_runtime.distributed.layers import check_tensor_parallel

    config = InternVLConfig.from_pretrained(checkpoint)
    llm = config.llm
    six = type(llm.moe)(**{**llm.moe.__dict__, "num_experts": 6})
    with pytest.raises(ConfigError, match="6 experts"):
        check_tensor_parallel(type(llm)(**{**llm.__dict__, "moe": six}), 4)
