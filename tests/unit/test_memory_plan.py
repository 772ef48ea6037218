"""KV-cache planning as vLLM's (``engine.memory``): the arithmetic with numbers, the config knobs, and the
profiled step's code path run on the CPU. (Measuring a GPU, ``measure_memory``, needs one: not run here.)"""

from __future__ import annotations

import functools

import pytest
import torch

from internvl_runtime import AutoModel, AutoTokenizer
from internvl_runtime.cli import build_parser
from internvl_runtime.engine.engine import EngineConfig, LLMEngine
from internvl_runtime.engine.memory import (
    DeviceMemory,
    Measured,
    kv_blocks_for_memory,
    kv_budget,
    placement_blocks,
    profile_worst_step,
)
from internvl_runtime.engine.model_runner import ModelRunner
from internvl_runtime.errors import InvalidRequest
from internvl_runtime.serving.config import ServerConfig
from paths import FIXTURES

GiB = 2**30
CKPT = FIXTURES / "ckpt" / "tiny-1B"
# InternVL2-8B's decoder: 32 layers, 8 KV heads of 128, bf16, blocks of 16 tokens: K and V per layer per block
PER_LAYER_BLOCK_8B = 2 * 16 * 8 * 128 * 2


def test_one_gpu_gets_utilization_less_weights_step_and_cache() -> None:
    h200 = DeviceMemory("cuda:0", total=141 * GiB, used_after_load=17 * GiB, profile_peak=3 * GiB, num_layers=32,
                        cache_bytes=GiB // 2)
    budget = int(0.9 * 141 * GiB) - 17 * GiB - 3 * GiB - GiB // 2
    assert kv_budget(h200, 0.9) == budget
    blocks = kv_blocks_for_memory([h200], utilization=0.9, bytes_per_layer_block=PER_LAYER_BLOCK_8B)
    assert blocks == budget // (32 * PER_LAYER_BLOCK_8B) == 54476
    # every term counts: more utilization, more blocks; a bigger step or cache, fewer
    assert kv_blocks_for_memory([h200], utilization=0.95, bytes_per_layer_block=PER_LAYER_BLOCK_8B) > blocks
    no_cache = DeviceMemory("cuda:0", 141 * GiB, 17 * GiB, 3 * GiB, 32)
    assert kv_blocks_for_memory([no_cache], utilization=0.9, bytes_per_layer_block=PER_LAYER_BLOCK_8B) > blocks


def test_a_split_takes_the_smallest_pool_any_gpu_can_hold() -> None:
    # 80 layers of the 76B over two GPUs: 36 beside the vision encoder, 44 on the second
    first = DeviceMemory("cuda:0", 80 * GiB, 60 * GiB, 4 * GiB, num_layers=36, cache_bytes=GiB)
    second = DeviceMemory("cuda:1", 80 * GiB, 64 * GiB, 2 * GiB, num_layers=44)
    per = PER_LAYER_BLOCK_8B
    expected = min(kv_budget(first, 0.9) // (36 * per), kv_budget(second, 0.9) // (44 * per))
    assert expected == kv_budget(second, 0.9) // (44 * per)       # the fuller GPU decides
    assert kv_blocks_for_memory([first, second], utilization=0.9, bytes_per_layer_block=per) == expected
    # a GPU holding no layer (the LM head alone) does not bound the pool, as long as its share fits
    head_only = DeviceMemory("cuda:2", 80 * GiB, 10 * GiB, GiB, num_layers=0)
    assert kv_blocks_for_memory([first, second, head_only], utilization=0.9, bytes_per_layer_block=per) == expected


def test_no_room_for_one_block_names_the_device() -> None:
    full = DeviceMemory("cuda:1", 24 * GiB, 21 * GiB, 2 * GiB, num_layers=32)
    with pytest.raises(InvalidRequest, match=r"cuda:1.*gpu_memory_utilization"):
        kv_blocks_for_memory([full], utilization=0.9, bytes_per_layer_block=PER_LAYER_BLOCK_8B)
    assert kv_blocks_for_memory([full], utilization=1.0, bytes_per_layer_block=PER_LAYER_BLOCK_8B) > 0
    over = DeviceMemory("cuda:0", 24 * GiB, 23 * GiB, 2 * GiB, num_layers=0)     # no layers, still over
    with pytest.raises(InvalidRequest, match="cuda:0"):
        kv_blocks_for_memory([over, DeviceMemory("cuda:1", 80 * GiB, 0, 0, 8)], utilization=0.9,
                             bytes_per_layer_block=PER_LAYER_BLOCK_8B)
    for bad in (0, 1.5, -0.1):
        with pytest.raises(InvalidRequest, match="gpu_memory_utilization"):
            kv_blocks_for_memory([full], utilization=bad, bytes_per_layer_block=PER_LAYER_BLOCK_8B)


def test_a_placement_counts_each_gpus_layers_the_cache_on_the_vision_gpu_and_a_cpu_spill() -> None:
    gpu0, gpu1, cpu = torch.device("cuda", 0), torch.device("cuda", 1), torch.device("cpu")
    layers = [gpu0] * 10 + [gpu1] * 14 + [cpu] * 2
    measured = {gpu0: Measured(total=24 * GiB, used_after_load=12 * GiB, profile_peak=2 * GiB),
                gpu1: Measured(total=24 * GiB, used_after_load=14 * GiB, profile_peak=GiB)}
    per = PER_LAYER_BLOCK_8B
    blocks, devices = placement_blocks(layers, gpu0, measured, utilization=0.9, image_cache_bytes=GiB,
                                       bytes_per_layer_block=per, host_budget=100 * GiB)
    assert [(d.name, d.num_layers, d.cache_bytes) for d in devices] == [("cuda:0", 10, GiB), ("cuda:1", 14, 0)]
    gpu_bound = min((int(0.9 * 24 * GiB) - 15 * GiB) // (10 * per), (int(0.9 * 24 * GiB) - 15 * GiB) // (14 * per))
    assert blocks == gpu_bound == (int(0.9 * 24 * GiB) - 15 * GiB) // (14 * per)
    # the two layers spilled to the CPU bound the pool by the host's budget when it is the smaller
    small_host, _ = placement_blocks(layers, gpu0, measured, utilization=0.9, image_cache_bytes=GiB,
                                     bytes_per_layer_block=per, host_budget=GiB // 2)
    assert small_host == (GiB // 2) // (2 * per) < gpu_bound


def test_engine_config_memory_knobs_and_device_default_max_num_seqs() -> None:
    assert EngineConfig().gpu_memory_utilization == 0.9
    for bad in (0, 1.01, True, "0.5"):
        with pytest.raises(InvalidRequest, match="gpu_memory_utilization"):
            EngineConfig(gpu_memory_utilization=bad)
    assert EngineConfig().max_num_seqs is None
    assert EngineConfig().for_device("cuda").max_num_seqs == 256
    assert EngineConfig().for_device("cpu").max_num_seqs == 16
    assert EngineConfig(max_num_batched_tokens=128).for_device("cuda").max_num_seqs == 128
    assert EngineConfig(max_num_seqs=7).for_device("cuda").max_num_seqs == 7


def test_server_flag_reaches_the_engine_config() -> None:
    args = build_parser().parse_args(["serve", str(CKPT), "--gpu-memory-utilization", "0.5"])
    config = ServerConfig(model=str(CKPT), **{name: getattr(args, name) for name in
                                              ("gpu_memory_utilization", "max_num_seqs")})
    kwargs = config.engine_kwargs()
    assert kwargs["gpu_memory_utilization"] == 0.5 and "max_num_seqs" not in kwargs
    assert EngineConfig(**kwargs).gpu_memory_utilization == 0.5
    assert ServerConfig(model=str(CKPT), max_num_seqs=3).engine_kwargs()["max_num_seqs"] == 3
    with pytest.raises(InvalidRequest, match="gpu_memory_utilization"):
        ServerConfig(model=str(CKPT), gpu_memory_utilization=0)


def test_hybrid_kv_cache_flag_reaches_the_engine_config() -> None:
    args = build_parser().parse_args(["serve", str(CKPT), "--disable-hybrid-kv-cache-manager"])
    config = ServerConfig(model=str(CKPT), disable_hybrid_kv_cache_manager=args.disable_hybrid_kv_cache_manager)
    assert EngineConfig(**config.engine_kwargs()).disable_hybrid_kv_cache_manager is True
    assert EngineConfig(**ServerConfig(model=str(CKPT)).engine_kwargs()).disable_hybrid_kv_cache_manager is False


@functools.lru_cache(maxsize=1)
def _loaded():
    return AutoModel.from_pretrained(CKPT), AutoTokenizer.from_pretrained(CKPT)


def test_engine_on_the_cpu_keeps_its_rules() -> None:
    model, tokenizer = _loaded()
    per_block = ModelRunner.kv_bytes_per_block(model, 16, model.language_model.get_input_embeddings().weight.dtype)
    engine = LLMEngine(model, tokenizer, EngineConfig(kv_cache_bytes=40 * per_block + 1))
    assert engine.config.max_num_seqs == 16                      # the CPU's default
    assert engine.num_blocks == 40                               # kv_cache_bytes as before
    assert LLMEngine(model, tokenizer, EngineConfig(kv_cache_bytes=per_block)).num_blocks == 16   # the floor
    assert LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=3)).config.max_num_seqs == 3


def test_profiled_step_runs_at_small_sizes() -> None:
    """The worst-case step the GPU plan measures, run on the CPU: vision batch, prefill chunk, sampler."""
    model, tokenizer = _loaded()
    engine = LLMEngine(model, tokenizer, EngineConfig(num_blocks=64))
    profile_worst_step(model, vision_batch_tiles=2, num_tokens=40, num_rows=4, block_size=16,
                       image_token_id=engine.processor.img_context_id, logits_device=torch.device("cpu"))
