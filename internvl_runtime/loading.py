"""The one loader: a checkpoint folder (or a Hugging Face Hub id: ``hub``) -> a model ready to run, below the engine.

``load_model`` is what ``LLMEngine.from_pretrained`` (and through it the server, the CLI, the pipeline
and every tensor-parallel rank) and ``AutoModel.from_pretrained`` call. In order:

1. ``plan_load`` decides everything before any weight is read, and checks it: the quantization
   (``quantization.resolve_quantization``), the folder (a hub id is fetched into its cache:
   ``hub.resolve_checkpoint``) and its ``config.json``, where each part goes
   (one device, ``"auto"``, or a dict such as the official ``split_model``'s: ``placement``), the dtype
   (``"auto"`` follows the checkpoint, but float16 for bfloat16 on a GPU before sm80 and float32 on a CPU
   without fast bf16: ``hardware.auto_dtype``),
   that every device used can compute in it, and that a 4-bit kernel exists wherever 4-bit goes.
2. The weights are read tensor by tensor (``weights.loader.load_weights``), with a tqdm bar over the
   checkpoint's bytes when ``progress`` is on, straight onto their devices whatever the layout
   (``build_on_devices``): each module allocated on its device when its first tensor arrives, each linear layer
   quantized there as soon as its weights are in. Peak host memory: about one tensor.
3. The compute plan for the host is set on the model (``compute_plan``).

A tensor-parallel rank passes ``build``: its own builder, which reads only this rank's rows. It gets the
plan and the progress hook, and what it returns gets no compute plan (the native decode stack knows
nothing of the all-reduces between sliced layers; TP layers run on torch, as they always have).

Example::

    model = load_model("pretrained/InternVL2-1B", dtype="auto", device_map="cpu", progress=True)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeAlias

import torch

from . import kernels
from .compute_plan import apply_plan, choose_plan
from .config import InternVLConfig
from .errors import InvalidRequest, UnsupportedFeature
from .hardware import auto_dtype, available_memory, cuda_supports_bf16
from .hub import HubOptions, resolve_checkpoint
from .models.internvl import InternVLModel, meta_model
from .placement import (
    EMBED,
    auto_device_map,
    dispatch_model,
    estimate_unit_bytes,
    normalize_device,
    physical,
    placement_units,
    resolve_device_map,
)
from .quantization import LayerPacker, LayerQuantizer, QuantizationConfig, int4_backend, resolve_quantization
from .weights.direct import DirectSink, Watch
from .weights.loader import Progress, Resolver, WeightSink, checkpoint_files, checkpoint_nbytes, load_weights
from .weights.mapping import FileMappings, advise_sparse, checkpoint_mappings, is_mapped_from

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16, "fp16": torch.float16}


@dataclass(frozen=True)
class LoadPlan:
    """Everything decided (and checked) before any weight is read."""

    folder: Path
    config: InternVLConfig
    dtype: torch.dtype
    device: torch.device                              # the embeddings' device; the only one unless spread
    unit_devices: dict[str, torch.device] | None      # placement unit -> device, when spread over several
    quantization: QuantizationConfig | None
    record_map: bool                                  # set ``hf_device_map`` (a dict was given, or "auto" spread)

    @property
    def units(self) -> dict[str, torch.device]:
        """Every placement unit's device."""
        return self.unit_devices or dict.fromkeys(placement_units(self.config.llm.num_hidden_layers), self.device)


#: ``build(plan, progress) -> model``: a builder of its own (tensor parallelism) instead of the default.
ModelBuilder = Callable[[LoadPlan, "Progress | None"], InternVLModel]

#: ``dtype=``: a ``torch.dtype``, its name ("bfloat16", "torch.float16"), "auto", or None (float32).
DTypeSpec: TypeAlias = "torch.dtype | str | None"
#: ``device_map=``: None (CPU), a device (``torch.device``, "cuda:1", a CUDA ordinal), "auto", or
#: {module name or prefix: device}.
DeviceMapSpec: TypeAlias = "torch.device | str | int | Mapping[str, torch.device | str | int] | None"
#: ``quantization=``: "int8", "int4", "int4:g64", a dict, a ``QuantizationConfig``, or None.
QuantizationSpec: TypeAlias = "str | Mapping[str, Any] | QuantizationConfig | None"


# ---------------------------------------------------------------------------------------------------
# Deciding
# ---------------------------------------------------------------------------------------------------


def resolve_dtype(torch_dtype: DTypeSpec, config: InternVLConfig, device: torch.device | None = None) -> torch.dtype:
    """``torch_dtype`` as transformers takes it: a dtype, its name, or "auto" (the config's, but float16
    for bfloat16 on a GPU before sm80, float32 on a CPU without fast bf16 instructions; see
    ``hardware.auto_dtype``)."""
    if torch_dtype is None:
        return torch.float32  # transformers' default when no dtype is given
    if torch_dtype == "auto":
        return auto_dtype(config.torch_dtype, device or torch.device("cpu"))
    if isinstance(torch_dtype, torch.dtype):
        dtype = torch_dtype
    elif isinstance(torch_dtype, str):
        name = torch_dtype
        if name.removeprefix("torch.") not in _DTYPES:
            raise InvalidRequest(f"torch_dtype {torch_dtype!r} is not one of {', '.join(_DTYPES)} or 'auto'")
        dtype = _DTYPES[name.removeprefix("torch.")]
    else:
        raise InvalidRequest(f"torch_dtype must be a torch.dtype or a string, got {torch_dtype!r}")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise InvalidRequest(f"torch_dtype {dtype} is not supported (float32, bfloat16, float16)")
    return dtype


def resolve_device(device_map: DeviceMapSpec) -> torch.device:
    """A single device from ``device_map`` (None, "auto", or a device); a dict goes through
    ``placement.resolve_device_map`` instead."""
    if device_map is None:
        return torch.device("cpu")
    if isinstance(device_map, (str, torch.device, int)) and not isinstance(device_map, bool):
        if device_map == "auto":
            return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        return normalize_device(device_map)
    raise InvalidRequest(f"device_map must be None, 'auto', a device or a dict, got {device_map!r}")


def check_dtype_runs(dtype: torch.dtype, device: torch.device, capability: tuple[int, int] | None = None) -> None:
    """``InvalidRequest`` for a dtype the device cannot compute in (bfloat16 before CUDA compute
    capability 8.0: ``hardware.cuda_supports_bf16``, the rule "auto" follows too, so "auto" always passes).
    ``capability``: the CUDA device's, read from it when not given. CPUs run all three; without
    avx512_bf16/AMX, 16-bit is slow (see ``hardware``)."""
    if device.type == "cuda" and dtype == torch.bfloat16:
        major, minor = capability or torch.cuda.get_device_capability(device)
        if not cuda_supports_bf16((major, minor)):
            raise InvalidRequest(f"bfloat16 on {device} needs CUDA compute capability 8.0+, this GPU is "
                                 f"{major}.{minor}; use torch_dtype=torch.float16 (what 'auto' picks there) or "
                                 "torch.float32")


def _auto_map(config: InternVLConfig, dtype: torch.dtype,
              quantization: QuantizationConfig | None) -> dict[str, torch.device] | None:
    """``device_map="auto"`` with CUDA: None (GPU 0 alone) when the whole model fits in 90% of GPU 0's free
    memory; else ``placement.auto_device_map`` over every GPU (budgets: 90% of each one's free memory, so
    the layers spread in proportion to it), with the CPU for what fits on no GPU."""
    skeleton = meta_model(config, dtype)
    sizes = estimate_unit_bytes(skeleton, dtype, quantization.bits if quantization else None)
    budgets = [(torch.device("cuda", i), int(torch.cuda.mem_get_info(i)[0] * 0.9))
               for i in range(torch.cuda.device_count())]
    if sum(sizes.values()) <= budgets[0][1]:
        return None
    return auto_device_map(sizes, budgets, overflow=(torch.device("cpu"), int(available_memory() * 0.9)))


def plan_load(path: str | Path, *, dtype: DTypeSpec = None, device_map: DeviceMapSpec = None,
              quantization: QuantizationSpec = None,
              load_in_8bit: bool = False, load_in_4bit: bool = False, hub: HubOptions | None = None) -> LoadPlan:
    """Decide and check everything ``load_model`` does, reading only ``config.json``.

    ``path``: a checkpoint folder, or a Hugging Face Hub id fetched into its cache first (``hub.resolve_checkpoint``,
    with ``hub``'s revision, cache and token); a missing folder that is no hub id raises ``CheckpointNotFound``.

    ``dtype``: a ``torch.dtype``, its name, "auto", or None (float32, transformers' default).
    ``device_map``: None (CPU), a device, "auto", or {module name: device}. ``quantization``: "int8", "int4",
    "int4:g64", a dict or a ``QuantizationConfig`` (``load_in_8bit``/``load_in_4bit``: the official spellings)."""
    quant = resolve_quantization(quantization, load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit)
    folder = resolve_checkpoint(path, hub, files="config")
    config = InternVLConfig.from_pretrained(folder)
    unit_devices: dict[str, torch.device] | None = None
    if isinstance(device_map, Mapping):
        unit_devices = resolve_device_map(device_map, config.llm.num_hidden_layers)
        device = unit_devices[EMBED]
        if len(set(unit_devices.values())) == 1:
            unit_devices = None
    else:
        if device_map is None and quant is not None and torch.cuda.is_available():
            device_map = torch.cuda.current_device()   # transformers' default for 8/4-bit loading
        device = resolve_device(device_map)
    resolved = resolve_dtype(dtype, config, device)
    if device_map == "auto" and device.type == "cuda":
        unit_devices = _auto_map(config, resolved, quant)
    if dtype == "auto" and resolved == torch.bfloat16 and any(
            used.type == "cuda" and not cuda_supports_bf16(torch.cuda.get_device_capability(used))
            for used in (unit_devices or {}).values()):
        resolved = torch.float16      # "auto" over a split: one pre-sm80 GPU makes it fp16 for all (as on it alone)
    plan = LoadPlan(folder, config, resolved, device, unit_devices, quant,
                    record_map=isinstance(device_map, Mapping) or unit_devices is not None)
    for used in set(plan.units.values()):
        check_dtype_runs(resolved, physical(used))
    if quant is not None and quant.mode == "int4":
        for unit, used in plan.units.items():
            if unit.startswith("language_model.") or quant.include_vision:
                int4_backend(physical(used))
    return plan


# ---------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------


def read_checkpoint(model: InternVLModel, folder: Path, *, allow_pickle: bool = False,
                    resolve: Resolver | None = None, skip: Callable[[str], bool] | None = None,
                    progress: Progress | None = None, sink: WeightSink | None = None) -> None:
    """Fill ``model`` from ``folder``, strictly (every key accounted for), then tie the LM head.

    ``resolve`` defaults to the model's own name tables; a tensor-parallel rank passes one that slices,
    and ``skip`` for what it does not hold (``weights.loader.load_weights``). ``sink``: where the tensors
    go (default: the model's parameters as allocated; ``build_on_devices`` passes a ``DirectSink``)."""
    tied = model.config.llm.tie_word_embeddings
    load_weights(model, checkpoint_files(folder, allow_pickle=allow_pickle), resolve or model.resolve_checkpoint_name,
                 optional=lambda name: tied and name == "language_model.lm_head.weight",
                 skip=skip or (lambda name: False), progress=progress, sink=sink)
    model.language_model.tie_weights()


@contextmanager
def progress_bar(folder: Path, enabled: bool, *, allow_pickle: bool = False) -> Iterator[Progress | None]:
    """A tqdm bar over the bytes of ``folder``'s checkpoint (on stderr) and the hook that advances it;
    None when not ``enabled``."""
    if not enabled:
        yield None
        return
    from tqdm.auto import tqdm

    total = checkpoint_nbytes(checkpoint_files(folder, allow_pickle=allow_pickle))
    with tqdm(total=total, desc=f"loading {folder.name}", unit="B", unit_scale=True, unit_divisor=1024,
              leave=True) as bar:
        def advance(nbytes: int) -> None:
            bar.update(nbytes)

        yield advance


#: ``vision=``: "eager" (loaded with the rest), "lazy" (on the first image: ``InternVLModel.load_vision``), or
#: "auto" (lazy when the whole model is on the CPU, eager otherwise).
VISION_LOADS = ("eager", "lazy", "auto")
_VISION_PREFIXES = ("vision_model.", "mlp1.")


def is_vision_name(name: str) -> bool:
    """Whether a parameter or module name is part of the vision encoder or the projector (``mlp1``)."""
    return (name + ".").startswith(_VISION_PREFIXES)


def lazy_vision(vision: str, plan: LoadPlan) -> bool:
    """``vision`` ("eager", "lazy", "auto": see ``VISION_LOADS``) for this plan: True to defer the encoder.
    A placement spread over several devices loads it eagerly (its hooks are set once, over a complete model)."""
    if vision not in VISION_LOADS:
        raise InvalidRequest(f"vision={vision!r}: use one of {', '.join(VISION_LOADS)}")
    if vision == "eager":
        return False
    if plan.unit_devices is not None:
        if vision == "lazy":
            logger.info("vision encoder loaded eagerly: the model is spread over several devices")
        return False
    return vision == "lazy" or physical(plan.device).type == "cpu"


def build_on_devices(plan: LoadPlan, progress: Progress | None = None, *,
                     model_class: type[InternVLModel] = InternVLModel, allow_pickle: bool = False,
                     watch: Watch | None = None, mmap: bool = True, vision: str = "eager",
                     pack_bf16: bool = False) -> InternVLModel:
    """The default builder: every layout loaded straight onto its devices (``weights.direct``).

    The model is built on the meta device; each module is allocated on its placement unit's device when its
    first checkpoint tensor arrives, each tensor is read alone and copied there (through a pinned buffer on
    CUDA), and with quantization each linear layer is quantized on its device as soon as its weights (every
    shard of a fused one) are in. Host memory: about one checkpoint tensor; never the whole model in 16 bits.
    ``watch(name, tensor)`` is told of every parameter allocated or mapped (see ``weights.direct``).

    ``mmap``: a weight going to the CPU in its stored dtype, whole (not one shard of a fused parameter, not
    transformed) and in a module that is not quantized, becomes a read-only view of the checkpoint file
    (``weights.mapping``: no copy, pages shared with the page cache); in a module quantized on the CPU, it is
    quantized from such a view and the view's pages are then dropped from the process (``weights.direct``:
    no 16-bit copy, and no file pages left resident); False reads every tensor into memory.
    ``vision``: "lazy" leaves the vision encoder and ``mlp1`` on the meta device, read on the first call that
    needs them (``InternVLModel.load_vision``, thread-safe, once); "auto" is lazy on a CPU placement (see
    ``lazy_vision``). ``pack_bf16``: the language model's bf16 linear layers kept losslessly packed
    (``quantization.packed_bf16``; ``check_pack_bf16`` says where it applies)."""
    model = meta_model(plan.config, plan.dtype, model_class)
    units = plan.units

    def device_for(module_name: str) -> torch.device:
        unit = max((u for u in units if module_name == u or module_name.startswith(u + ".")), key=len, default=None)
        return physical(units[unit] if unit is not None else plan.device)

    # the file mappings of this load: the sink views weights through them, and the quantizer and the packer drop the
    # pages of each row chunk they have read from such a view (a 16-bit LM head is never resident whole)
    mappings = FileMappings()
    release = mappings.drop_pages if mmap else None
    quantizer = (LayerQuantizer(plan.quantization, release=release) if plan.quantization is not None else None)
    packer = LayerPacker(tied_head=plan.config.llm.tie_word_embeddings, release=release) if pack_bf16 else None

    def finish(name: str, module: torch.nn.Module) -> torch.nn.Module | None:
        if quantizer is not None and quantizer.wants(name, module):
            return quantizer.quantize(name, module, device_for(name))
        if packer is not None and packer.wants(name, module):
            return packer.pack(name, module, device_for(name))
        return None

    def replaced(owner: str) -> bool:             # on the CPU: its weights read once, by the quantizer or the packer
        module = model.get_submodule(owner)
        return ((quantizer is not None and quantizer.wants(owner, module))
                or (packer is not None and packer.packs(owner, module)))

    def may_map(param_name: str) -> bool:
        owner = param_name.rpartition(".")[0]
        return device_for(owner).type == "cpu" and not replaced(owner)

    def may_view(param_name: str) -> bool:        # read from the file to be quantized or packed, then its pages dropped
        owner = param_name.rpartition(".")[0]
        return device_for(owner).type == "cpu" and replaced(owner)

    def read(part: Callable[[str], bool], hook: Progress | None, finished: set[str]) -> None:
        sink = DirectSink(model, device_for, finish=finish, watch=watch, may_map=may_map if mmap else None,
                          may_view=may_view if mmap else None, mappings=mappings, finished=finished)
        read_checkpoint(model, plan.folder, allow_pickle=allow_pickle, progress=hook, sink=sink,
                        skip=lambda name: not part(name))
        sink.close()                               # the tied head, if any; the last copy landed
        model.record_mapped_bytes(sink.mapped_bytes)

    deferred = lazy_vision(vision, plan)
    read((lambda name: not is_vision_name(name)) if deferred else (lambda name: True), progress, set())
    model.eval().requires_grad_(False)
    if deferred:
        def load_vision() -> None:
            read(is_vision_name, None, {name for name, _ in model.named_modules() if not is_vision_name(name)})
            model.vision_model.requires_grad_(False)
            model.mlp1.requires_grad_(False)
            logger.info("vision encoder loaded (%s)", "mapped" if mmap else "read")

        pending = sum(p.numel() * p.element_size() for name, p in model.named_parameters() if is_vision_name(name))
        model.defer_vision(load_vision, pending)
    if mmap:
        advise_sparse_tables(model)
    if quantizer is not None:
        quantizer.report()
        model.quantization = plan.quantization  # type: ignore[assignment]
    if packer is not None:
        packer.report()
    if plan.unit_devices is not None:             # everything is in place already: the hooks and the map
        dispatch_model(model, plan.unit_devices)
    return model


def advise_sparse_tables(model: torch.nn.Module) -> None:
    """Parameters viewed from a checkpoint's mapping that no linear layer streams whole (norms, biases, an embedding
    table whose LM head is a quantized copy or untied) are advised against huge pages
    (``weights.mapping.advise_sparse``): a checkpoint cached in 2 MiB folios would otherwise make 2 MiB resident for
    each row looked up, or for each norm read between weights that were quantized and dropped."""
    streamed = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    files = checkpoint_mappings()
    for param in model.parameters():
        if id(param) not in streamed and param.device.type == "cpu" and is_mapped_from(param, files):
            advise_sparse(param)


def check_pack_bf16(plan: LoadPlan, build: ModelBuilder | None = None) -> None:
    """Raise ``UnsupportedFeature`` naming why ``pack_bf16`` cannot apply to this load: it needs bf16 weights
    on the CPU, no quantization, the default builder and the native kernels."""
    why = None
    if plan.dtype != torch.bfloat16:
        why = (f"the weights load as {str(plan.dtype).removeprefix('torch.')}, not bfloat16 (ask for bfloat16: "
               "dtype=torch.bfloat16, --dtype bfloat16)")
    elif plan.unit_devices is not None or physical(plan.device).type != "cpu":
        why = "the model is not on the CPU alone"
    elif plan.quantization is not None:
        why = "the weights are quantized"
    elif build is not None:
        why = "tensor parallelism loads its own way"
    elif not kernels.available():
        why = f"the native kernels do not run here ({kernels.describe()})"
    if why:
        raise UnsupportedFeature(f"pack_bf16: {why}; packing keeps bf16 weights of a CPU model losslessly")


def load_model(path: str | Path, *, dtype: DTypeSpec = None, device_map: DeviceMapSpec = None,
               quantization: QuantizationSpec = None,
               load_in_8bit: bool = False, load_in_4bit: bool = False, allow_pickle: bool = False,
               model_class: type[InternVLModel] = InternVLModel, progress: bool = False,
               build: ModelBuilder | None = None, hub: HubOptions | None = None, mmap: bool = True,
               vision: str = "eager", pack_bf16: bool = False) -> InternVLModel:
    """Load a checkpoint folder or hub id (arguments as ``plan_load``; ``allow_pickle`` reads
    ``pytorch_model*.bin`` with ``weights_only=True``, and fetches them from the hub when a revision has no
    safetensors). ``progress``: a tqdm bar counting the checkpoint's bytes as they are read (the hub's
    download has its own bars). ``build``: a builder of its own (see the module docstring); it takes one
    device and no quantization. ``mmap``: weights stored in their compute format on the CPU are read-only views
    of the checkpoint file (False: every tensor read into memory, as llama.cpp's ``--no-mmap``). ``vision``:
    "eager" (default), "lazy" or "auto" (see ``build_on_devices``). ``pack_bf16``: keep the language model's
    bf16 linear weights losslessly packed, ~3/4 of the bytes a batch-1 decode step streams (bf16 on the CPU,
    no quantization, the native kernels; ``UnsupportedFeature`` otherwise). All three apply to the default
    builder only."""
    plan = plan_load(path, dtype=dtype, device_map=device_map, quantization=quantization,
                     load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit, hub=hub)
    if plan.folder != Path(path):   # a hub id, checked on its config.json: now the rest, at the same commit
        resolve_checkpoint(path, replace(hub or HubOptions(), revision=plan.folder.name), allow_pickle=allow_pickle)
    if pack_bf16:
        check_pack_bf16(plan, build)
    if build is not None and (plan.quantization is not None or plan.unit_devices is not None):
        raise UnsupportedFeature("tensor parallelism loads onto one device per rank, unquantized; "
                                 "drop quantization / a multi-device device_map")
    with progress_bar(plan.folder, progress, allow_pickle=allow_pickle) as hook:
        model = (build(plan, hook) if build is not None
                 else build_on_devices(plan, hook, model_class=model_class, allow_pickle=allow_pickle, mmap=mmap,
                                       vision=vision, pack_bf16=pack_bf16))
    if build is None:
        apply_plan(model, choose_plan(plan.dtype, plan.device))
    if plan.record_map:
        model.hf_device_map = {unit: str(used) for unit, used in plan.units.items()}  # type: ignore[assignment]
    logger.info("loaded %s (%s) in %s on %s%s", plan.folder, plan.config.llm.architecture, plan.dtype,
                plan.device if plan.unit_devices is None else sorted({str(d) for d in plan.unit_devices.values()}),
                f", {plan.quantization.mode}" if plan.quantization else "")
    return model
