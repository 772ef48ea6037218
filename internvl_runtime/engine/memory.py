"""How many KV blocks fit: vLLM's memory planning on GPUs, a share of the host's memory on the CPU.

On CUDA (vLLM's ``gpu_memory_utilization``), for every GPU of the placement::

    KV budget = utilization x total
                - memory in use once the weights are loaded (other processes included, as vLLM counts it)
                - the peak a profiled worst-case step adds (a vision batch of ``vision_batch_tiles`` tiles,
                  then a prefill chunk of ``max_num_batched_tokens`` tokens, then sampling ``max_num_seqs``
                  rows)
                - the vision feature cache's bound (``image_cache_bytes``) on the GPU that holds it

and, since every decoder layer has a pool of the same number of blocks, that GPU can hold
``budget // (its layers x bytes per layer per block)`` blocks: the pool is the smallest of these.
``kv_blocks_for_memory`` is that arithmetic (pure, unit-tested with numbers); ``measure_memory`` takes the
figures from the devices around a profile run (CUDA only). The CPU keeps its rule (``cpu_kv_budget``).

Mixture-of-experts decoders: every expert is a parameter (or, quantized, a buffer) resident on its device,
so "in use once the weights are loaded" counts all of them, as ``placement.estimate_unit_bytes`` does
before loading. What differs is the traffic of a step: a token goes through its k experts only.
``decoder_weight_counts`` / ``active_bytes_per_token`` say how much (pure functions of a decoder, which
may be on the meta device: the MoE benchmark prints them; the model cards' "activated parameters" are
``WeightCounts.active``).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InvalidRequest
from ..hardware import available_memory
from ..models.decoders.base import DecoderForCausalLM
from ..models.layers.moe import SparseMoE
from .model_runner import ModelRunner, SequenceStep
from .sampler import Sampler, SamplingRow
from .sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceMemory:
    """One GPU of the placement, in bytes (what ``kv_blocks_for_memory`` reads)."""

    name: str                 # for messages: "cuda:0"
    total: int                # the device's memory
    used_after_load: int      # in use once the weights are in (total - free, other processes included)
    profile_peak: int         # what the profiled worst-case step added at its peak
    num_layers: int           # decoder layers whose KV pools live here (0: vision or LM head only)
    cache_bytes: int = 0      # the vision feature cache's bound, on the device that holds it


def kv_budget(device: DeviceMemory, utilization: float) -> int:
    """Bytes of ``device`` left for the KV pools (negative when even the model and one step do not fit)."""
    return int(utilization * device.total) - device.used_after_load - device.profile_peak - device.cache_bytes


def kv_blocks_for_memory(devices: Sequence[DeviceMemory], *, utilization: float, bytes_per_layer_block: int) -> int:
    """The KV blocks every layer's pool can have: ``min`` over the devices holding layers of
    ``kv_budget // (num_layers x bytes_per_layer_block)``. A device without layers still has to fit its
    share (its budget must not be negative). ``InvalidRequest`` naming the device when not one block fits."""
    if not 0 < utilization <= 1:
        raise InvalidRequest(f"gpu_memory_utilization must be in (0, 1], got {utilization!r}")
    if bytes_per_layer_block < 1:
        raise InvalidRequest(f"bytes_per_layer_block must be >= 1, got {bytes_per_layer_block}")
    blocks: int | None = None
    for device in devices:
        budget = kv_budget(device, utilization)
        fits = budget // (device.num_layers * bytes_per_layer_block) if device.num_layers else None
        if budget < 0 or fits == 0:
            gib = 2**30
            raise InvalidRequest(
                f"no memory left for the KV cache on {device.name}: {utilization:g} x {device.total / gib:.2f} GiB "
                f"- {device.used_after_load / gib:.2f} GiB in use after loading - {device.profile_peak / gib:.2f} "
                f"GiB for the largest step - {device.cache_bytes / gib:.2f} GiB of image feature cache = "
                f"{budget / gib:.2f} GiB, under one block for its {device.num_layers} layers; raise "
                "gpu_memory_utilization, lower max_num_batched_tokens / vision_batch_tiles / image_cache_bytes, "
                "or quantize the model")
        if fits is not None:
            blocks = fits if blocks is None else min(blocks, fits)
    if blocks is None:
        raise InvalidRequest("no device of the placement holds a decoder layer")
    return blocks


def placement_blocks(layer_devices: Sequence[torch.device], vision_device: torch.device,
                     measured: Mapping[torch.device, Measured], *, utilization: float, image_cache_bytes: int,
                     bytes_per_layer_block: int, host_budget: int) -> tuple[int, list[DeviceMemory]]:
    """The pool size of a placement: ``kv_blocks_for_memory`` over the ``measured`` (CUDA) devices, each
    with the layers ``layer_devices`` puts there and the image cache on ``vision_device``; layers on a device
    not measured (the CPU of a spill) share ``host_budget`` bytes. Returns (blocks, the devices' figures)."""
    layers = Counter(layer_devices)
    devices = [DeviceMemory(str(device), m.total, m.used_after_load, m.profile_peak, layers.get(device, 0),
                            image_cache_bytes if device == vision_device else 0) for device, m in measured.items()]
    blocks = kv_blocks_for_memory(devices, utilization=utilization, bytes_per_layer_block=bytes_per_layer_block)
    host_layers = sum(n for device, n in layers.items() if device not in measured)
    if host_layers:
        blocks = min(blocks, host_budget // (host_layers * bytes_per_layer_block))
    return blocks, devices


@dataclass(frozen=True)
class WeightCounts:
    """A decoder's weights, as element counts (``total``, ``active``, ``embedding``) and as bytes stored
    (``*_bytes``: quantized codes and their scales as they are)."""

    total: int              # every weight (all experts)
    active: int             # what one token goes through: all but the experts it is not routed to
    embedding: int          # the input embedding table (of which a token reads one row)
    total_bytes: int
    active_bytes: int
    embedding_bytes: int


def _tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def decoder_weight_counts(language_model: DecoderForCausalLM) -> WeightCounts:
    """Count ``language_model``'s weights (parameters and buffers, meta tensors included; a tied head once).
    In each ``SparseMoE`` the experts count in full in ``total`` and as ``top_k / num_experts`` of them in
    ``active`` (the share of the stacks one token uses; the router counts in full)."""
    seen: set[int] = set()
    total = active = total_bytes = active_bytes = 0

    def unique(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        fresh = [t for t in tensors if id(t) not in seen]
        seen.update(id(t) for t in fresh)
        return fresh

    for module in language_model.modules():
        if not isinstance(module, SparseMoE):
            continue
        share = module.top_k / module.num_experts
        experts = unique(_tensors(module.experts))
        numel, nbytes = sum(t.numel() for t in experts), sum(t.numel() * t.element_size() for t in experts)
        total, total_bytes = total + numel, total_bytes + nbytes
        active, active_bytes = active + round(numel * share), active_bytes + round(nbytes * share)
    for tensor in unique(_tensors(language_model)):
        total, total_bytes = total + tensor.numel(), total_bytes + tensor.numel() * tensor.element_size()
        active, active_bytes = active + tensor.numel(), active_bytes + tensor.numel() * tensor.element_size()
    embed = language_model.get_input_embeddings().weight
    return WeightCounts(total=total, active=active, embedding=embed.numel(), total_bytes=total_bytes,
                        active_bytes=active_bytes, embedding_bytes=embed.numel() * embed.element_size())


def active_bytes_per_token(language_model: DecoderForCausalLM) -> int:
    """Bytes of weights one decode step reads per sequence when the batch is one token: the active weights
    as stored, the embedding table reduced to the one row a token reads. The memory traffic that bounds
    decode speed on a GPU (divide the bandwidth by it for an upper bound on tokens/s); for a dense decoder
    that is every weight but the embedding table."""
    counts = decoder_weight_counts(language_model)
    embed = language_model.get_input_embeddings().weight
    row = int(embed.shape[1]) * embed.element_size()
    return counts.active_bytes - counts.embedding_bytes + row


def cpu_kv_budget(reserved: int = 0) -> int:
    """The CPU's rule: a quarter of the memory available now, less ``reserved`` bytes the model will hold that
    the kernel's figure does not count as used (a vision encoder not loaded yet; weights mapped from the
    checkpoint file, which MemAvailable counts as reclaimable page cache)."""
    return max(0, available_memory() - reserved) // 4


@dataclass(frozen=True)
class Measured:
    """One CUDA device around a profile run."""

    total: int
    used_after_load: int
    profile_peak: int


def measure_memory(devices: Sequence[torch.device], profile: Callable[[], None]) -> dict[torch.device, Measured]:
    """CUDA only: each device's total and used memory now (after ``torch.cuda.empty_cache``, so the
    allocator's leftovers from loading do not count), then the peak that ``profile()`` adds above what was
    allocated before it (``reset_peak_memory_stats`` / ``max_memory_allocated``). Frees the profile's
    blocks after."""
    torch.cuda.empty_cache()
    before = {}
    for device in devices:
        torch.cuda.synchronize(device)
        free, total = torch.cuda.mem_get_info(device)
        torch.cuda.reset_peak_memory_stats(device)
        before[device] = (total, total - free, torch.cuda.memory_allocated(device))
    profile()
    measured = {}
    for device in devices:
        torch.cuda.synchronize(device)
        total, used, allocated = before[device]
        measured[device] = Measured(total, used, max(0, torch.cuda.max_memory_allocated(device) - allocated))
    torch.cuda.empty_cache()
    return measured


def profile_worst_step(model: Any, *, vision_batch_tiles: int, num_tokens: int, num_rows: int, block_size: int,
                       image_token_id: int | None, logits_device: torch.device,
                       attention_backend: str = "auto") -> None:
    """Run the largest step the engine can schedule, on dummy inputs, for ``measure_memory``: a vision
    batch of ``vision_batch_tiles`` tiles (its features held through the step, as the engine holds them),
    a prefill of ``num_tokens`` tokens through a runner with a pool just big enough, and the default
    sampler over ``num_rows`` rows of logits (top-k/top-p sort included). The prefill runs on the engine's
    ``attention_backend``, eagerly (decode graphs are captured later, in their own memory pool)."""
    size = model.config.image_size
    vision = model.vision_model.embeddings.patch_embedding.weight
    pixels = torch.zeros(vision_batch_tiles, 3, size, size, dtype=vision.dtype, device=vision.device)
    with torch.inference_mode():
        features = model.extract_feature(pixels)
        del pixels
        num_blocks = -(-num_tokens // block_size)
        runner = ModelRunner(model, num_blocks=num_blocks, block_size=block_size, image_token_id=image_token_id,
                             attention_backend=attention_backend, enforce_eager=True)
        runner.execute([SequenceStep(token_ids=[0] * num_tokens, num_computed=0, block_table=list(range(num_blocks)))])
        del runner
        logits = torch.zeros(num_rows, model.config.llm.vocab_size, device=logits_device)
        params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50)
        Sampler()(logits, [SamplingRow(params, [0], 0) for _ in range(num_rows)])
        del features
