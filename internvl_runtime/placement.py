"""Placing one model over several devices: the official ``split_model``, ``device_map="auto"``, checks,
and running a placed model (parameters on their devices, activations moved at unit boundaries).

The unit of placement is what the official maps name: ``vision_model``, ``mlp1``, the token
embeddings, each decoder layer, the final norm and the LM head. A map is a dict {name: device}; a name
may also be a prefix of units ("" for everything, ``language_model``), and the most specific name
wins. Names are the checkpoint's (``language_model.model.tok_embeddings`` / ``language_model.output``
for InternLM2) or ours (``embed_tokens`` / ``lm_head``); names of modules that do not exist in this
model are ignored, as transformers does with the official map (it names both families' embeddings
and, for some GPU counts, layers past the last one). Devices are ints (CUDA ordinals, as the official
function returns), strings or ``torch.device``s. ``cpu:N`` is accepted and kept as bookkeeping: the
tensors live on the CPU, but the map, the hooks and the KV cache treat ``cpu:0`` and ``cpu:1`` as two
devices (this is how the CPU test suite exercises a split).

Running a split model: each unit gets a forward pre-hook that moves its tensor inputs (and the step's
``AttentionMetadata``, once per device per step) to its device, so the decoder loop, the vision
encoder and ``compute_logits`` run unchanged; each layer's KV pool is allocated on its layer's device
(``layer_devices``, read by the model runner).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .errors import InvalidRequest, UnsupportedFeature
from .models.decoders.base import DecoderForCausalLM
from .models.internvl import InternVLModel
from .models.layers.attention import AttentionMetadata
from .quantization.apply import quantizable

logger = logging.getLogger(__name__)

#: LLM depth of each InternVL2 size, as in the model card's ``split_model``.
OFFICIAL_NUM_LAYERS = {
    "InternVL2-1B": 24, "InternVL2-2B": 24, "InternVL2-4B": 32, "InternVL2-8B": 32,
    "InternVL2-26B": 48, "InternVL2-40B": 60, "InternVL2-Llama3-76B": 80,
}

EMBED = "language_model.model.embed_tokens"
NORM = "language_model.model.norm"
LM_HEAD = "language_model.lm_head"
LAYER = "language_model.model.layers."
#: Where a map's checkpoint-style names point in our module tree (InternLM2's names; see its renames).
_ALIASES = {"language_model.model.tok_embeddings": EMBED, "language_model.output": LM_HEAD}


# ---- the official map -------------------------------------------------------------------------------
def split_model(model_name_or_num_layers: str | int, world_size: int | None = None, *,
                vit_alpha: float = 0.5) -> dict[str, int]:
    """The model card's multi-GPU device map, key for key (ints are CUDA ordinals).

    GPU 0 also holds the vision encoder, so it counts as ``1 - vit_alpha`` of a GPU: every GPU gets
    ceil(layers / (world_size - vit_alpha)) decoder layers in order, GPU 0 only ceil(that * (1 -
    vit_alpha)); then the vision encoder, projector, embeddings, final norm, LM head *and the last
    decoder layer* go to GPU 0, so the first and last LLM steps share a device. As in the original,
    rounding up can name layers past the last one (ignored when the map is applied).

    model_name_or_num_layers: an InternVL2 name (``OFFICIAL_NUM_LAYERS``, with or without the
    "OpenGVLab/" prefix) or the LLM depth. world_size: default ``torch.cuda.device_count()``.
    """
    if isinstance(model_name_or_num_layers, int) and not isinstance(model_name_or_num_layers, bool):
        num_layers = model_name_or_num_layers
    else:
        name = str(model_name_or_num_layers).rstrip("/").rsplit("/", 1)[-1]
        if name not in OFFICIAL_NUM_LAYERS:
            raise InvalidRequest(f"split_model: unknown model {model_name_or_num_layers!r}; known: "
                                 f"{', '.join(OFFICIAL_NUM_LAYERS)} (or pass the number of LLM layers)")
        num_layers = OFFICIAL_NUM_LAYERS[name]
    if num_layers < 1:
        raise InvalidRequest(f"split_model: the number of layers must be positive, got {num_layers}")
    world_size = torch.cuda.device_count() if world_size is None else world_size
    if world_size < 1:
        raise InvalidRequest("split_model needs at least one CUDA device (none found); pass world_size= to "
                             "compute a map anyway")
    per_device = math.ceil(num_layers / (world_size - vit_alpha))
    counts = [math.ceil(per_device * (1 - vit_alpha))] + [per_device] * (world_size - 1)
    device_map: dict[str, int] = {}
    first = 0
    for device, count in enumerate(counts):
        device_map.update({f"{LAYER}{i}": device for i in range(first, first + count)})
        first += count
    for name in ("vision_model", "mlp1", "language_model.model.tok_embeddings", EMBED, "language_model.output",
                 NORM, LM_HEAD, f"{LAYER}{num_layers - 1}"):
        device_map[name] = 0
    return device_map


# ---- units, devices, checks -------------------------------------------------------------------------
def placement_units(num_layers: int) -> list[str]:
    """The modules a map places, in execution order."""
    return ["vision_model", "mlp1", EMBED, *(f"{LAYER}{i}" for i in range(num_layers)), NORM, LM_HEAD]


def physical(device: torch.device) -> torch.device:
    """Where tensors for ``device`` really live: ``cpu:N`` is bookkeeping for ``cpu``."""
    return torch.device("cpu") if device.type == "cpu" else device


def normalize_device(value: Any, *, name: str = "device_map") -> torch.device:
    """An int (CUDA ordinal), string or ``torch.device`` -> a device that exists here, else an error."""
    if isinstance(value, bool):
        raise InvalidRequest(f"{name}: {value!r} is not a device")
    try:
        device = torch.device(f"cuda:{value}" if isinstance(value, int) else value)
    except (RuntimeError, TypeError):
        raise InvalidRequest(f"{name}: {value!r} is not a device (use 'cpu', 'cuda:N' or an int)") from None
    if device.type in ("meta", "disk"):
        raise UnsupportedFeature(f"{name}: device {str(device)!r} cannot hold weights (no offloading); "
                                 "use a real device")
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidRequest(f"{name} asks for {device} but CUDA is not available on this machine")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise InvalidRequest(f"{name} asks for {device} but this machine has {count} CUDA device(s)")
        return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise InvalidRequest(f"{name} asks for {device} but MPS is not available on this machine")
        return device
    raise InvalidRequest(f"{name}: device type {device.type!r} is not supported (cpu, cuda, mps)")


def resolve_device_map(device_map: Mapping[str, Any], num_layers: int) -> dict[str, torch.device]:
    """{name or prefix: device} -> {unit: device} for every unit, checked. ``InvalidRequest`` names a
    device that does not exist and every unit the map leaves unplaced; ``UnsupportedFeature`` names a
    key that would split inside a unit."""
    if not isinstance(device_map, Mapping) or not device_map:
        raise InvalidRequest(f"device_map must be a non-empty dict, got {device_map!r}")
    units = placement_units(num_layers)
    keys: dict[str, torch.device] = {}
    for key, value in device_map.items():
        if not isinstance(key, str):
            raise InvalidRequest(f"device_map keys must be module names, got {key!r}")
        keys[_ALIASES.get(key, key)] = normalize_device(value, name=f"device_map[{key!r}]")
    placed: dict[str, torch.device] = {}
    unplaced = []
    for unit in units:
        covering = [k for k in keys if k == "" or k == unit or unit.startswith(k + ".")]
        if covering:
            placed[unit] = keys[max(covering, key=len)]
        else:
            unplaced.append(unit)
    for key in keys:
        inner = next((u for u in units if key.startswith(u + ".")), None)
        if inner is not None:
            raise UnsupportedFeature(f"device_map key {key!r} splits inside {inner!r}; place the whole module")
    unused = [k for k in keys if k and not any(k == u or u.startswith(k + ".") for u in units)]
    if unused:
        logger.debug("device_map keys naming no module of this model (ignored): %s", unused)
    if unplaced:
        shown = ", ".join(unplaced[:6]) + (f" and {len(unplaced) - 6} more" if len(unplaced) > 6 else "")
        hint = f" (keys matching nothing here: {', '.join(map(repr, unused))})" if unused else ""
        raise InvalidRequest(f"device_map leaves {shown} unplaced{hint}")
    return placed


def auto_device_map(unit_bytes: Mapping[str, int], budgets: Sequence[tuple[torch.device, int]],
                    overflow: tuple[torch.device, int] | None = None) -> dict[str, torch.device]:
    """``device_map="auto"`` over the GPUs of ``budgets`` ((device, bytes it may hold), in order), balanced.

    The units before the decoder layers (vision encoder, projector, embeddings) go on the first GPU, the
    ones after (final norm, LM head) on the last, as a pipeline runs; the decoder layers, in order, are
    spread in proportion to the budgets: each layer goes to the GPU whose share of the model (its budget's
    share of all budgets) holds the layer's middle byte. Every GPU then ends about equally full, so each keeps
    about the same share of its memory for its layers' KV pools (the pool size is set by the fullest).
    When rounding or the pinned units put a GPU over its budget, the layers fill the GPUs in order instead,
    and what fits on none goes to ``overflow`` (the CPU: device, bytes) when given. ``InvalidRequest`` when the
    model does not fit."""
    units = list(unit_bytes)
    layers = [u for u in units if u.startswith(LAYER)]
    head = units[:units.index(layers[0])] if layers else units
    tail = units[units.index(layers[-1]) + 1:] if layers else []
    devices = [device for device, _ in budgets]
    caps = [budget for _, budget in budgets]
    pinned = {**dict.fromkeys(head, devices[0]), **dict.fromkeys(tail, devices[-1])}
    fixed = [0] * len(budgets)
    fixed[0] += sum(unit_bytes[u] for u in head)
    fixed[-1] += sum(unit_bytes[u] for u in tail)
    total = sum(unit_bytes.values())
    if total <= sum(caps):
        placed = _spread(layers, unit_bytes, caps, start=fixed[0], total=total)
        used = list(fixed)
        for unit in layers:
            used[placed[unit]] += unit_bytes[unit]
        if all(u <= c for u, c in zip(used, caps, strict=True)):
            return {u: pinned[u] if u in pinned else devices[placed[u]] for u in units}
    return _fill(units, layers, unit_bytes, budgets, overflow, pinned, fixed)


def _spread(layers: Sequence[str], unit_bytes: Mapping[str, int], caps: Sequence[int], *, start: int,
            total: int) -> dict[str, int]:
    """Each layer's GPU index: the GPU whose proportional share of ``total`` holds the layer's middle byte
    (``start``: the bytes before the first layer, on GPU 0)."""
    scale = total / sum(caps)
    ends = list(itertools.accumulate(c * scale for c in caps))        # where each GPU's share ends
    placed = {}
    position, index = start, 0
    for unit in layers:
        middle = position + unit_bytes[unit] / 2
        while index + 1 < len(caps) and middle > ends[index]:
            index += 1
        placed[unit] = index
        position += unit_bytes[unit]
    return placed


def _fill(units: Sequence[str], layers: Sequence[str], unit_bytes: Mapping[str, int],
          budgets: Sequence[tuple[torch.device, int]], overflow: tuple[torch.device, int] | None,
          pinned: Mapping[str, torch.device], fixed: Sequence[int]) -> dict[str, torch.device]:
    """The layers fill the GPUs in order (each up to its budget), then ``overflow``; the pinned units stay."""
    slots = [*budgets, *([overflow] if overflow is not None else [])]
    used = [*fixed, *([0] if overflow is not None else [])]
    placed = dict(pinned)
    index = 0
    for unit in layers:
        while used[index] + unit_bytes[unit] > slots[index][1] and index + 1 < len(slots):
            index += 1
        placed[unit] = slots[index][0]
        used[index] += unit_bytes[unit]
    if any(u > b for u, (_, b) in zip(used, slots, strict=True)):
        need = sum(unit_bytes.values()) / 2**30
        have = ", ".join(f"{d}: {b / 2**30:.1f} GiB" for d, b in slots)
        raise InvalidRequest(f"device_map='auto': the model needs {need:.1f} GiB but the devices offer {have}; "
                             f"quantize it (load_in_8bit / load_in_4bit) or add devices")
    return {u: placed[u] for u in units}


def estimate_unit_bytes(model: InternVLModel, dtype: torch.dtype, bits: int | None = None) -> dict[str, int]:
    """Bytes per unit of ``model`` (built on the meta device) in ``dtype``; with ``bits`` (8 or 4) the
    LLM's linear weights and expert stacks count as quantized (plus about 3% for scales), a mixture-of-experts
    router as it stays (``quantization.quantizable``). Every expert counts: all are resident."""
    element = torch.empty((), dtype=dtype).element_size()
    sizes = {}
    num_layers = len(model.language_model.model.layers)
    for unit in placement_units(num_layers):
        module = model.get_submodule(unit)
        total = 0
        for sub_name, sub in module.named_modules(prefix=unit):
            for tensor in sub.parameters(recurse=False):
                quantized = quantizable(sub) and sub_name.startswith("language_model.")
                total += int(tensor.numel() * (bits / 8 * 1.03 if bits and quantized else element))
        sizes[unit] = total
    return sizes


# ---- running a placed model -----------------------------------------------------------------------
def _move(obj: Any, device: torch.device, cache: dict | None) -> Any:
    """A hook argument on ``device``: tensors copied (once per step per device when a cache is given),
    ``AttentionMetadata`` rebuilt with its tensors there, anything else as is."""
    target = physical(device)
    if isinstance(obj, torch.Tensor):
        if obj.device == target:
            return obj
        if cache is None:
            return _copy(obj, target)
        key = (id(obj), target)
        if key not in cache:
            cache[key] = (obj, _copy(obj, target))   # keep obj alive: its id stays unique
        return cache[key][1]
    if isinstance(obj, AttentionMetadata):
        return metadata_to(obj, target, cache)
    return obj


def _copy(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    # asynchronous only host -> GPU; a GPU -> pageable-host copy must complete before the CPU reads it
    return tensor.to(device, non_blocking=device.type == "cuda")


def _tensors_to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return _copy(value, device)
    if isinstance(value, (list, tuple)):
        return type(value)(_tensors_to(v, device) for v in value)
    return value


def metadata_to(meta: AttentionMetadata, device: torch.device, cache: dict | None = None) -> AttentionMetadata:
    """The step's metadata with every tensor field on ``device`` (derived fields are recomputed)."""
    if meta.slot_mapping.device == device:
        return meta
    key = (id(meta), device)
    if cache is not None and key in cache:
        return cache[key][1]
    fields = {f.name: _tensors_to(getattr(meta, f.name), device) for f in dataclasses.fields(meta) if f.init}
    moved = type(meta)(**fields)
    if cache is not None:
        cache[key] = (meta, moved)
    return moved


def _step_cache(args: tuple, kwargs: dict) -> dict | None:
    """A per-step dict of copies, kept on the step's AttentionMetadata (so it dies with the step)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, AttentionMetadata):
            cache = value.__dict__.get("_placement_copies")
            if cache is None:
                cache = {}
                value.__dict__["_placement_copies"] = cache
            return cache
    return None


class _MoveInputs:
    """Forward pre-hook: the unit's inputs go to its device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        cache = _step_cache(args, kwargs)
        return (tuple(_move(a, self.device, cache) for a in args),
                {k: _move(v, self.device, cache) for k, v in kwargs.items()})


def dispatch_model(model: InternVLModel, unit_devices: Mapping[str, torch.device]) -> InternVLModel:
    """Move each unit of a loaded model to its device and install the hooks that carry activations
    across. Records ``model.hf_device_map`` ({unit: device string}, as transformers does) and
    ``model.language_model.layer_devices``."""
    for handle in getattr(model, "_placement_hooks", []):
        handle.remove()
    handles = []
    split = len(set(unit_devices.values())) > 1
    for unit, device in unit_devices.items():
        module = model.get_submodule(unit)
        module.to(physical(device))
        if split:
            handles.append(module.register_forward_pre_hook(_MoveInputs(device), with_kwargs=True))
    model._placement_hooks = handles  # type: ignore[assignment]
    model.hf_device_map = {unit: str(device) for unit, device in unit_devices.items()}  # type: ignore[assignment]
    lm = model.language_model
    lm.layer_devices = [unit_devices[f"{LAYER}{i}"] for i in range(len(lm.model.layers))]
    return model


def layer_devices(language_model: DecoderForCausalLM) -> list[torch.device]:
    """The device of each decoder layer (what its KV pool is allocated on): the placed map's, else the
    device of the layer's first tensor."""
    recorded = language_model.layer_devices
    if recorded is not None:
        return list(recorded)
    return [next(iter((*layer.parameters(), *layer.buffers()))).device for layer in language_model.model.layers]
