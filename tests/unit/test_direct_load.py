"""Loading straight onto the devices (``loading.build_on_devices``, ``weights.direct``, ``weights.staging``):
the same weights, bit for bit, as the old way (the whole model read on the CPU, then quantized and placed),
for every family's fused layouts, quantized or not, split or not, tied head or not; and the float weights
of the layers being quantized alive at once measured while loading: about one layer, never the model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from internvl_runtime import loading
from internvl_runtime.config import InternVLConfig
from internvl_runtime.models.internvl import meta_model
from internvl_runtime.placement import dispatch_model
from internvl_runtime.quantization import QuantizationConfig, quantize_model
from internvl_runtime.testing.checkpoints import make_config, write_checkpoint
from internvl_runtime.weights.staging import StagingBuffer
from paths import FIXTURES

CKPT = FIXTURES / "ckpt"
SPLIT = {"": "cpu:0", "language_model.model.layers.1": "cpu:1", "language_model.lm_head": "cpu:1"}


def reference(folder: Path, dtype: torch.dtype, quantization: str | None,
              device_map: dict[str, str] | None) -> nn.Module:
    """The model as loading built it before: everything read on the CPU, then quantized, then placed."""
    plan = loading.plan_load(folder, dtype=dtype, quantization=quantization, device_map=device_map)
    model = meta_model(plan.config, plan.dtype)
    model.to_empty(device="cpu")
    loading.read_checkpoint(model, folder)
    model.eval().requires_grad_(False)
    if plan.quantization is not None:
        quantize_model(model, plan.quantization)
    if plan.unit_devices is not None:
        dispatch_model(model, plan.unit_devices)
    return model


def assert_same(ours: nn.Module, theirs: nn.Module) -> None:
    assert [(n, type(m)) for n, m in ours.named_modules()] == [(n, type(m)) for n, m in theirs.named_modules()]
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].device == b[key].device, key
        assert torch.equal(a[key], b[key]), key
    assert not any(t.is_meta for t in (*ours.parameters(), *ours.buffers()))


@pytest.mark.parametrize("variant", ["1B", "2B", "4B"])          # Qwen2 q/k/v + bias, InternLM2 wqkv, Phi-3 fused
@pytest.mark.parametrize("quantization", [None, "int8", "int4:g32"])
@pytest.mark.parametrize("device_map", [None, SPLIT])
def test_same_weights_as_reading_on_the_cpu_first(variant: str, quantization: str | None,
                                                  device_map: dict[str, str] | None) -> None:
    folder = CKPT / f"tiny-{variant}"
    dtype = torch.bfloat16
    model = loading.load_model(folder, dtype=dtype, quantization=quantization, device_map=device_map)
    assert_same(model, reference(folder, dtype, quantization, device_map))
    if device_map is not None:
        assert model.hf_device_map["language_model.model.layers.1"] == "cpu:1"
        assert [str(d) for d in model.language_model.layer_devices] == ["cpu:0", "cpu:1"]


def deep_checkpoint(folder: Path, num_layers: int = 8, *, tied: bool = False) -> Path:
    """tiny-1B's shapes with more decoder layers (so that one layer is a small part of the model)."""
    llm = make_config("1B")["llm_config"]
    llm.update(num_hidden_layers=num_layers, max_window_layers=num_layers, tie_word_embeddings=tied)
    return write_checkpoint(folder, "1B", config_overrides={"llm_config": llm})


@pytest.mark.parametrize("quantization", ["int8", "int4:g32"])
def test_tied_head_is_quantized_from_the_embeddings(tmp_path: Path, quantization: str) -> None:
    folder = deep_checkpoint(tmp_path / "tied", 2, tied=True)
    model = loading.load_model(folder, dtype=torch.float32, quantization=quantization)
    assert_same(model, reference(folder, torch.float32, quantization, None))
    assert not isinstance(model.language_model.lm_head, nn.Linear)
    unquantized = loading.load_model(folder, dtype=torch.float32)
    assert unquantized.language_model.lm_head.weight is unquantized.language_model.model.embed_tokens.weight


class FloatWeightTracker:
    """Told of every parameter the loader allocates; holds only weak references to their storage, and at each
    allocation sums the bytes still alive of the linear weights that get quantized (the LLM's; their biases
    stay as they are)."""

    def __init__(self, model_config: InternVLConfig) -> None:
        self.alive: dict[str, tuple[StorageWeakRef, int]] = {}
        self.peak = 0
        self.allocated = 0

    def __call__(self, name: str, tensor: torch.Tensor) -> None:
        if not (name.startswith("language_model.") and name.endswith("weight")
                and ("_proj." in name or "lm_head." in name)):
            return
        self.alive[name] = (StorageWeakRef(tensor.untyped_storage()), tensor.numel() * tensor.element_size())
        self.allocated += tensor.numel() * tensor.element_size()
        self.peak = max(self.peak, self.alive_bytes())

    def alive_bytes(self) -> int:
        return sum(nbytes for ref, nbytes in self.alive.values() if not ref.expired())


def linear_bytes(model: nn.Module, prefix: str) -> int:
    return sum(m.weight.numel() * m.weight.element_size() for name, m in model.named_modules()
               if name.startswith(prefix) and isinstance(m, nn.Linear))


def test_float_weights_alive_while_quantizing_are_one_layer(tmp_path: Path) -> None:
    folder = deep_checkpoint(tmp_path / "deep", 8)
    plan = loading.plan_load(folder, dtype=torch.float32, quantization="int8")
    tracker = FloatWeightTracker(plan.config)
    progress: list[int] = []
    model = loading.build_on_devices(plan, progress.append, watch=tracker)

    skeleton = meta_model(plan.config, torch.float32)
    total = linear_bytes(skeleton, "language_model.")
    layer = max(linear_bytes(skeleton, f"language_model.model.layers.{i}.") for i in range(8))
    head = linear_bytes(skeleton, "language_model.lm_head")
    assert tracker.allocated == total                # every float weight of the LLM's linears went through it
    assert 0 < tracker.peak <= max(layer, head)      # at most one layer's (or the head's) at a time
    assert tracker.peak * 4 < total                  # ... never the model's
    assert tracker.alive_bytes() == 0                # and none is left once loaded
    assert len(progress) > 8 * 7
    assert not any(isinstance(m, nn.Linear) for n, m in model.named_modules() if n.startswith("language_model."))

    # the old way holds every float weight of the model at once before the first layer is quantized
    old = FloatWeightTracker(plan.config)
    everything = meta_model(plan.config, torch.float32)
    everything.to_empty(device="cpu")
    for name, param in everything.named_parameters():
        old(name, param)
    loading.read_checkpoint(everything, folder)
    quantize_model(everything, QuantizationConfig("int8"))
    assert old.peak == total


@pytest.mark.parametrize(("src_dtype", "dest_dtype"), [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                                      (torch.bfloat16, torch.float16), (torch.float16, torch.float16)])
def test_staged_copies_equal_a_plain_cast(src_dtype: torch.dtype, dest_dtype: torch.dtype) -> None:
    staging = StagingBuffer(stage_cpu=True)
    generator = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (33,), (), (0, 4), (2, 3, 4), (7, 5)]
    for shape in shapes:
        src = (torch.randn(shape, generator=generator) * 1e3).to(src_dtype)
        dest = torch.empty(shape, dtype=dest_dtype)
        staging.copy(dest, src)
        assert torch.equal(dest, src.to(dest_dtype))
    assert staging.staged == len(shapes)
    element = torch.empty((), dtype=dest_dtype).element_size()
    assert staging.capacity == 35 * element           # grown to the largest tensor (7 x 5), reused for the rest
    staging.release()
    assert staging.capacity == 0


def test_cpu_targets_skip_the_buffer() -> None:
    staging = StagingBuffer()
    dest = torch.empty(4, dtype=torch.float16)
    staging.copy(dest, torch.arange(4, dtype=torch.float32))
    assert dest.tolist() == [0, 1, 2, 3] and staging.staged == 0 and staging.capacity == 0


def test_checkpoint_tensors_read_straight_into_place(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from internvl_runtime.weights.loader import iter_checkpoint_lazy

    generator = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(7, 5, generator=generator).to(torch.bfloat16), "b": torch.randn(3, generator=generator),
               "c": torch.randn((), generator=generator).to(torch.float16), "d": torch.zeros(0, 4)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    staging = StagingBuffer(stage_cpu=True)
    for name, lazy in iter_checkpoint_lazy([tmp_path / "model.safetensors"]):
        same = torch.full(lazy.shape, 7.0, dtype=tensors[name].dtype)
        assert lazy.read_into(same) and torch.equal(same, tensors[name])          # the bytes, in place
        assert not lazy.read_into(torch.empty(lazy.shape, dtype=torch.float64))   # a cast: not read
        for dtype in (tensors[name].dtype, torch.float32):                        # through the buffer
            dest = torch.empty(lazy.shape, dtype=dtype)
            staging.copy(dest, lazy)
            assert torch.equal(dest, tensors[name].to(dtype))
            plain = torch.empty(lazy.shape, dtype=dtype)
            StagingBuffer().copy(plain, lazy)                                     # straight into a CPU target
            assert torch.equal(plain, tensors[name].to(dtype))


def test_units_on_another_device_cost_the_host_nothing() -> None:
    """Layers placed on a device other than the CPU (here "meta", which holds no memory, standing in for a GPU)
    are allocated there, and quantized there: no tensor of theirs is ever allocated on the host."""
    import dataclasses

    plan = loading.plan_load(CKPT / "tiny-1B", dtype=torch.float32, quantization="int8")
    meta = torch.device("meta")
    units = {u: (meta if u.startswith("language_model.model.layers.") else torch.device("cpu")) for u in plan.units}
    plan = dataclasses.replace(plan, unit_devices=units)
    seen: dict[str, torch.device] = {}
    model = loading.build_on_devices(plan, watch=lambda name, tensor: seen.setdefault(name, tensor.device))
    on_layers = {n: d for n, d in seen.items() if n.startswith("language_model.model.layers.")}
    assert on_layers and set(on_layers.values()) == {meta}
    assert {d for n, d in seen.items() if n not in on_layers} == {torch.device("cpu")}
    layer = model.language_model.model.layers[0]
    assert all(t.is_meta for t in (*layer.parameters(), *layer.buffers()))
    assert type(layer.self_attn.qkv_proj).__name__ == "Int8Linear"            # quantized on its device
    assert not model.vision_model.embeddings.patch_embedding.weight.is_meta
