"""Tensor parallelism on CPU with gloo: 2 (and 4) processes on every tiny architecture.

Against the single-process run: first-step logits (a prompt with an image, so the broadcast feature
rows are exercised) within float32 tolerance, greedy tokens identical. Also: each rank's decoder bytes
are ~1/N of the whole; a killed rank ends the group with a clear error in bounded time; bad sizes are
refused before any weight is read. One spawned group serves all variants (start-up dominates).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from internvl_runtime.config import InternVLConfig
from internvl_runtime.errors import ConfigError
from internvl_runtime.processing.inputs import Message
from paths import FIXTURES

SHARED = FIXTURES
CKPT = SHARED / "ckpt"
VARIANTS = ["tiny-1B", "tiny-2B", "tiny-4B", "tiny-8B", "tiny-26B", "tiny-40B", "tiny-76B"]
IMAGE = SHARED / "data" / "frame_000.png"
NEW_TOKENS = 8
pytestmark = pytest.mark.skipif(not (CKPT / "tiny-1B").is_dir(), reason="tiny checkpoints missing")


def _messages() -> list[Message]:
    return [Message("user", "Describe the image in detail.", [str(IMAGE)])]


def _run(engine, model) -> dict:
    """First-step logits (prefill, through ``engine.runner``) and greedy tokens, on any engine."""
    from internvl_runtime.engine.model_runner import SequenceStep
    from internvl_runtime.engine.sampling_params import SamplingParams

    request = engine.processor.prepare(_messages(), max_num=2)
    pixels = torch.cat([im.pixel_values for im in request.images])
    features = model.extract_feature(pixels).reshape(-1, model.config.llm.hidden_size)
    ids = request.prompt_token_ids
    # the last blocks of the pool, a separate run of them for each KV group (GPT-OSS: sliding layers share the pool)
    n, end = -(-len(ids) // 16), engine.runner.kv_cache.num_blocks
    tables = [list(range(end - (g + 1) * n, end - g * n)) for g in range(len(engine.runner.kv_groups))]
    logits = engine.runner.execute([SequenceStep(ids, 0, tables[0], features, other_block_tables=tables[1:])])
    out = engine.generate([request], SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0, ignore_eos=True))
    return {"logits": logits.clone(), "tokens": list(out[0].token_ids)}


def _tp_rank(rank: int, world: int, init_method: str, variants: list[str], out_dir: str) -> None:
    """One rank of the test group: for every variant build, measure, and run (rank 0 drives)."""
    from internvl_runtime.api.auto import InternVLChatModel
    from internvl_runtime.distributed.launch import (
        build_tensor_parallel_model,
        resident_weight_bytes,
    )
    from internvl_runtime.distributed.parallel_state import init_group
    from internvl_runtime.distributed.worker import TensorParallelRunner, run_worker
    from internvl_runtime.engine.engine import EngineConfig, LLMEngine
    from internvl_runtime.engine.model_runner import ModelRunner
    from internvl_runtime.models.internvl import InternVLModel
    from internvl_runtime.processing.tokenization import AutoTokenizer

    torch.set_num_threads(1)
    group = init_group(rank=rank, world_size=world, init_method=init_method, timeout_s=60)
    results = {}
    for variant in variants:
        path = CKPT / variant
        model = build_tensor_parallel_model(path, group, dtype=torch.float32,
                                            model_class=InternVLChatModel if rank == 0 else InternVLModel)
        entry = {"bytes": resident_weight_bytes(model), "llm_bytes": resident_weight_bytes(model.language_model)}
        if rank == 0:
            engine = LLMEngine(model, AutoTokenizer.from_pretrained(path), EngineConfig(num_blocks=64),
                               runner_factory=lambda m, **kw: TensorParallelRunner(ModelRunner(m, **kw), group))
            entry.update(_run(engine, model))
            engine.runner.close()
        else:
            run_worker(model, group)
        results[variant] = entry
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    group.barrier()
    os._exit(0)          # as launch._spawned_worker: skip gloo's teardown in a process that is exiting


def _spawn_group(world: int, variants: list[str], out_dir: Path) -> list[dict]:
    from internvl_runtime.distributed.launch import free_port

    ctx = mp.start_processes(_tp_rank, args=(world, f"tcp://127.0.0.1:{free_port()}", variants, str(out_dir)),
                             nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + 150
    while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for pid in ctx.pids():
                os.kill(pid, signal.SIGKILL)
            pytest.fail("the tensor-parallel group did not finish in 150 s")
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module")
def reference() -> dict:
    """Single-process logits and greedy tokens of every variant."""
    from internvl_runtime.engine.engine import EngineConfig, LLMEngine

    results = {}
    for variant in VARIANTS:
        engine = LLMEngine.from_pretrained(CKPT / variant, dtype=torch.float32, config=EngineConfig(num_blocks=64))
        entry = _run(engine, engine.model)
        entry["llm_bytes"] = sum(p.numel() * p.element_size() for p in engine.model.language_model.parameters())
        entry["bytes"] = sum(p.numel() * p.element_size() for p in engine.model.parameters())
        results[variant] = entry
    return results


@pytest.fixture(scope="module")
def tp2(tmp_path_factory) -> list[dict]:
    return _spawn_group(2, VARIANTS, tmp_path_factory.mktemp("tp2"))


@pytest.mark.parametrize("variant", VARIANTS)
def test_tp2_matches_single_process(variant: str, reference: dict, tp2: list[dict]) -> None:
    ours, ref = tp2[0][variant], reference[variant]
    assert ours["tokens"] == ref["tokens"]
    assert ours["logits"].shape == ref["logits"].shape       # padded vocabulary entries are cut off
    torch.testing.assert_close(ours["logits"], ref["logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_tp2_weight_bytes_per_rank(variant: str, reference: dict, tp2: list[dict]) -> None:
    whole_llm, whole = reference[variant]["llm_bytes"], reference[variant]["bytes"]
    for rank in (0, 1):
        # The decoder is split (norms replicated, vocabulary padded): about half each.
        assert 0.45 * whole_llm <= tp2[rank][variant]["llm_bytes"] <= 0.55 * whole_llm, (rank, variant)
    # Rank 0 alone holds the vision encoder and mlp1; the worker holds nothing else.
    assert tp2[1][variant]["bytes"] == tp2[1][variant]["llm_bytes"]
    assert tp2[0][variant]["bytes"] - tp2[0][variant]["llm_bytes"] == whole - whole_llm


def test_tp4_replicated_kv_heads(reference: dict, tmp_path: Path) -> None:
    """4 ranks over 2 KV heads: each KV head is replicated on two ranks (Qwen2 stacked q/k/v and
    InternLM2's grouped wqkv)."""
    results = _spawn_group(4, ["tiny-1B", "tiny-2B"], tmp_path)
    for variant in ("tiny-1B", "tiny-2B"):
        assert results[0][variant]["tokens"] == reference[variant]["tokens"]
        torch.testing.assert_close(results[0][variant]["logits"], reference[variant]["logits"], rtol=1e-5, atol=1e-5)


def test_pipeline_tensor_parallel_size(reference: dict) -> None:
    """``pipeline(..., tensor_parallel_size=2)`` spawns its worker and stops it on close()."""
    from internvl_runtime.api.pipeline import GenerationConfig, pipeline

    pipe = pipeline(CKPT / "tiny-8B", dtype="float32", tensor_parallel_size=2, num_blocks=64)
    workers = pipe.tp_workers
    try:
        out = pipe([{"role": "user", "content": [{"type": "text", "text": "Describe the image in detail."},
                                                 {"type": "image", "image": str(IMAGE)}]}],
                   GenerationConfig(max_new_tokens=NEW_TOKENS, ignore_eos=True, max_dynamic_patch=2))
    finally:
        pipe.close()
    assert out.token_ids == reference["tiny-8B"]["tokens"]
    assert [w.exitcode for w in workers] == [0]


# ---- failures ------------------------------------------------------------------------------------


def test_killed_worker_fails_rank0_quickly() -> None:
    from internvl_runtime.api.pipeline import GenerationConfig, pipeline
    from internvl_runtime.distributed.parallel_state import TensorParallelError

    pipe = pipeline(CKPT / "tiny-1B", dtype="float32", tensor_parallel_size=2, num_blocks=64)
    try:
        worker = pipe.tp_workers[0]
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(10)
        start = time.monotonic()
        with pytest.raises(TensorParallelError, match="died or timed out"):
            pipe("hello", GenerationConfig(max_new_tokens=4))
        assert time.monotonic() - start < 30
    finally:
        pipe.close()


RANK0_SCRIPT = """
import sys, time, torch
from internvl_runtime.distributed.launch import tensor_parallel_engine
from internvl_runtime.engine.engine import EngineConfig
group = tensor_parallel_engine(sys.argv[1], 2, dtype=torch.float32, engine_config=EngineConfig(num_blocks=64))
print("ready", group.workers[0].pid, flush=True)
time.sleep(120)
"""


def test_killed_rank0_ends_worker_with_clear_error() -> None:
    proc = subprocess.Popen([sys.executable, "-c", RANK0_SCRIPT, str(CKPT / "tiny-2B")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "INTERNVL_TP_TIMEOUT_S": "20"})
    try:
        line = proc.stdout.readline()
        assert line.startswith("ready"), (line, proc.stderr.read() if proc.poll() is not None else "")
        start = time.monotonic()
        proc.kill()
        proc.wait(10)
        # The worker inherited our stderr pipe: EOF means it has exited too.
        err = subprocess.run(["timeout", "30", "cat"], check=False, stdin=proc.stderr, capture_output=True,
                             text=True).stdout
        assert time.monotonic() - start < 30, "the worker outlived rank 0 by more than 30 s"
        assert "internvl tensor-parallel rank 1:" in err and "died or timed out" in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()


@pytest.mark.parametrize(("variant", "tp"), [("tiny-1B", 3), ("tiny-2B", 8), ("tiny-4B", 0)])
def test_bad_tensor_parallel_size_before_loading(variant: str, tp: int) -> None:
    from internvl_runtime.distributed.launch import tensor_parallel_engine

    start = time.monotonic()
    with pytest.raises(ConfigError, match="tensor_parallel_size"):
        tensor_parallel_engine(CKPT / variant, tp, dtype="float32")
    assert time.monotonic() - start < 5             # nothing spawned, no weight read


def test_launch_checks() -> None:
    from internvl_runtime.distributed.layers import check_tensor_parallel
    from internvl_runtime.distributed.parallel_state import check_launch

    with pytest.raises(ConfigError, match="must be equal"):
        check_launch(2, 4, device="cpu")                         # nodes disagree on the world size
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA device"):
            check_launch(2, 2, device="cuda")                    # more ranks than devices
    config = InternVLConfig.from_pretrained(CKPT / "tiny-26B")  # 8 heads / 2 KV heads
    for ok in (1, 2, 4, 8):
        check_tensor_parallel(config, ok)
    with pytest.raises(ConfigError, match="does not divide the 8 attention heads"):
        check_tensor_parallel(config, 3)


def test_serve_without_torchrun_is_a_clear_error() -> None:
    from internvl_runtime.distributed.launch import serve_tensor_parallel
    from internvl_runtime.distributed.parallel_state import TensorParallelError
    from internvl_runtime.serving.config import ServerConfig

    env = {k: os.environ.pop(k) for k in ("WORLD_SIZE", "RANK") if k in os.environ}
    try:
        with pytest.raises(TensorParallelError, match="torchrun --nproc-per-node 2"):
            serve_tensor_parallel(ServerConfig(model=str(CKPT / "tiny-1B"), tensor_parallel_size=2))
    finally:
        os.environ.update(env)
