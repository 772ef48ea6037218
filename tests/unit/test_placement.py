"""Multi-device placement on CPU: the official ``split_model`` maps, map checks and errors, ``"auto"``,
a model split over several bookkept CPU devices (``cpu:0``, ``cpu:1``, ...) giving the unsplit logits,
activations moved at every unit boundary, per-layer KV pools, and the dtypes each device runs."""

from __future__ import annotations

import pytest
import torch

from internvl_runtime import AutoModel, AutoTokenizer, InvalidRequest, UnsupportedFeature, loading, placement
from internvl_runtime.engine.model_runner import ModelRunner, SequenceStep
from internvl_runtime.models.layers.attention import AttentionMetadata, KVCache
from internvl_runtime.placement import (
    EMBED,
    LM_HEAD,
    NORM,
    OFFICIAL_NUM_LAYERS,
    auto_device_map,
    layer_devices,
    metadata_to,
    resolve_device_map,
    split_model,
)
from paths import FIXTURES

CKPT = FIXTURES / "ckpt"
NAMED = ["vision_model", "mlp1", "language_model.model.tok_embeddings", EMBED, "language_model.output", NORM, LM_HEAD]


def layers_on(device_map: dict, device: int) -> list[int]:
    prefix = "language_model.model.layers."
    return sorted(int(k.rsplit(".", 1)[1]) for k, v in device_map.items() if k.startswith(prefix) and v == device)


# ---- split_model: the model card's maps (worked out by hand from its arithmetic) ------------------
@pytest.mark.parametrize(("name", "world", "expected"), [
    # 76B on 4 GPUs: ceil(80 / 3.5) = 23 per GPU, GPU 0 ceil(23 / 2) = 12; 81 slots, so a key for layer 80
    ("InternVL2-Llama3-76B", 4, {0: [*range(12), 79], 1: list(range(12, 35)), 2: list(range(35, 58)),
                                 3: [*range(58, 79), 80]}),
    ("InternVL2-26B", 2, {0: [*range(16), 47], 1: list(range(16, 47))}),            # 32 per GPU, 16 on GPU 0
    ("InternVL2-40B", 3, {0: [*range(12), 59], 1: list(range(12, 36)), 2: list(range(36, 59))}),
    ("InternVL2-2B", 2, {0: [*range(8), 23], 1: list(range(8, 23))}),
    ("InternVL2-8B", 1, {0: list(range(32))}),
    ("InternVL2-1B", 8, {0: [0, 1, 23], 1: [2, 3, 4, 5], 2: [6, 7, 8, 9], 3: [10, 11, 12, 13], 4: [14, 15, 16, 17],
                         5: [18, 19, 20, 21], 6: [22, 24, 25], 7: [26, 27, 28, 29]}),       # 30 slots for 24 layers
])
def test_split_model_matches_model_card(name: str, world: int, expected: dict[int, list[int]]) -> None:
    device_map = split_model(name, world)
    for device, layers in expected.items():
        assert layers_on(device_map, device) == layers
    for key in NAMED:
        assert device_map[key] == 0
    assert len(device_map) == sum(len(v) for v in expected.values()) + len(NAMED)
    assert split_model(f"OpenGVLab/{name}", world) == device_map
    assert split_model(OFFICIAL_NUM_LAYERS[name], world) == device_map


@pytest.mark.parametrize("name", list(OFFICIAL_NUM_LAYERS))
@pytest.mark.parametrize("world", range(1, 9))
def test_split_model_places_every_layer(name: str, world: int) -> None:
    num_layers = OFFICIAL_NUM_LAYERS[name]
    device_map = split_model(name, world)
    as_cpu = {k: f"cpu:{v}" for k, v in device_map.items()}
    placed = resolve_device_map(as_cpu, num_layers)
    assert placed[f"language_model.model.layers.{num_layers - 1}"] == placed["vision_model"] == torch.device("cpu", 0)
    assert len({d for d in placed.values()}) <= world


@pytest.mark.parametrize(("args", "message"), [(("InternVL2-3B", 2), "unknown model"), ((0, 2), "positive"),
                                               (("InternVL2-1B", 0), "at least one CUDA device")])
def test_split_model_errors(args: tuple, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        split_model(*args)


# ---- map checks ----------------------------------------------------------------------------------
def test_resolve_prefixes_aliases_and_extra_keys() -> None:
    placed = resolve_device_map({"": "cpu:0", "language_model.model.layers": "cpu:1", "language_model.output": "cpu:2",
                                 "language_model.model.layers.5": "cpu:3", "language_model.model.rotary_emb": "cpu:0"},
                                3)
    assert placed[LM_HEAD] == torch.device("cpu", 2)          # InternLM2's name for the LM head
    assert placed["language_model.model.layers.0"] == torch.device("cpu", 1)
    assert placed["vision_model"] == placed[EMBED] == placed[NORM] == torch.device("cpu", 0)
    assert "language_model.model.layers.5" not in placed        # past the last layer: ignored


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when CUDA is absent")
@pytest.mark.parametrize(("device_map", "error", "message"), [
    ({"": "cuda:0"}, InvalidRequest, "CUDA is not available"),
    ({"": 0}, InvalidRequest, "CUDA is not available"),
    ({"": "gpu0"}, InvalidRequest, "not a device"),
    ({"": True}, InvalidRequest, "not a device"),
    ({"": "meta"}, UnsupportedFeature, "cannot hold weights"),
    ({"": "cpu", "language_model.model.layers.1": "xla"}, InvalidRequest, "not supported"),
    ({"vision_model": "cpu", "mlp1": "cpu", "language_model.model": "cpu:1", "language_model.model.layers.1": "cpu:2"},
     InvalidRequest, "lm_head unplaced"),
    ({"vision_model": "cpu", "mlp1": "cpu", "language_model.model.embed_tokens": "cpu",
      "language_model.model.norm": "cpu", "language_model.lm_head": "cpu", "language_model.model.layers.0": "cpu"},
     InvalidRequest,
     "language_model.model.layers.1 unplaced"),
    ({"vison_model": "cpu", "mlp1": "cpu", "language_model": "cpu"}, InvalidRequest,
     "vision_model unplaced.*'vison_model'"),
    ({"": "cpu", "language_model.model.layers.0.mlp": "cpu:1"}, UnsupportedFeature, "splits inside"),
    ({}, InvalidRequest, "non-empty"),
])
def test_bad_maps_fail_before_loading(monkeypatch, device_map: dict, error: type, message: str) -> None:
    monkeypatch.setattr(loading, "load_weights", lambda *a, **k: pytest.fail("weights were read"))
    with pytest.raises(error, match=message):
        AutoModel.from_pretrained(CKPT / "tiny-1B", device_map=device_map)


GPU0, GPU1, GPU2, CPU = torch.device("cuda", 0), torch.device("cuda", 1), torch.device("cuda", 2), torch.device("cpu")


def layer_sizes(num_layers: int, layer: int = 10, *, vision: int = 30, head: int = 19) -> dict[str, int]:
    sizes = dict.fromkeys(placement.placement_units(num_layers), layer)
    sizes.update({"vision_model": vision, NORM: 1, LM_HEAD: head})
    return sizes


def per_device(placed: dict[str, torch.device], sizes: dict[str, int]) -> dict[torch.device, int]:
    used: dict[torch.device, int] = {}
    for unit, device in placed.items():
        used[device] = used.get(device, 0) + sizes[unit]
    return used


def test_auto_device_map_balances_equal_gpus_with_vision_first_and_head_last() -> None:
    sizes = layer_sizes(8)       # 50 before the layers (vision 30, mlp1, embeddings), 80 of layers, 20 after
    placed = auto_device_map(sizes, [(GPU0, 100), (GPU1, 100)])
    assert placed["vision_model"] == placed["mlp1"] == placed[EMBED] == GPU0
    assert placed[NORM] == placed[LM_HEAD] == GPU1
    # shares of 75 each: layers 0-2 (middles at 55, 65, 75) on GPU 0, the rest on GPU 1
    assert [placed[f"language_model.model.layers.{i}"] for i in range(8)] == [GPU0] * 3 + [GPU1] * 5
    assert per_device(placed, sizes) == {GPU0: 80, GPU1: 70}    # the old rule filled GPU 0 to its budget first


@pytest.mark.parametrize(("budgets", "expected_layers"), [
    ([300, 100], [18, 6]),            # in proportion to the budgets (each GPU's free memory)
    ([100, 100, 100], [8, 8, 8]),
    ([200, 100, 100], [12, 6, 6]),
])
def test_auto_device_map_spreads_layers_in_proportion_to_the_budgets(budgets: list[int],
                                                                    expected_layers: list[int]) -> None:
    sizes = layer_sizes(24, layer=10, vision=0, head=0)
    sizes.update(dict.fromkeys(["mlp1", EMBED, NORM], 0))
    devices = [torch.device("cuda", i) for i in range(len(budgets))]
    placed = auto_device_map(sizes, list(zip(devices, budgets, strict=True)))
    counts = [sum(1 for u, d in placed.items() if u.startswith("language_model.model.layers.") and d == device)
              for device in devices]
    assert counts == expected_layers
    order = [devices.index(placed[f"language_model.model.layers.{i}"]) for i in range(24)]
    assert order == sorted(order)                                # in execution order: a pipeline


def test_auto_device_map_moves_layers_off_a_gpu_its_pinned_units_fill() -> None:
    # the first GPU's share (68 of 140) is taken by the vision encoder and embeddings: every layer goes on
    sizes = layer_sizes(4, vision=60)       # 80 before the layers, 40 of layers, 20 after: 140
    placed = auto_device_map(sizes, [(GPU0, 85), (GPU1, 90)])
    assert per_device(placed, sizes)[GPU0] <= 85 and per_device(placed, sizes)[GPU1] <= 90
    assert [placed[f"language_model.model.layers.{i}"] for i in range(4)] == [GPU1] * 4
    assert placed["vision_model"] == GPU0 and placed[LM_HEAD] == GPU1


def test_auto_device_map_spills_layers_to_the_cpu_and_says_when_nothing_fits() -> None:
    sizes = layer_sizes(6)                  # 50 + 60 + 20 = 130
    placed = auto_device_map(sizes, [(GPU0, 60), (GPU1, 40)], overflow=(CPU, 100))
    assert placed["vision_model"] == GPU0 and placed[LM_HEAD] == GPU1
    assert [placed[f"language_model.model.layers.{i}"] for i in range(6)] == [GPU0, GPU1, GPU1, CPU, CPU, CPU]
    used = per_device(placed, sizes)
    assert used[GPU0] <= 60 and used[GPU1] <= 40
    with pytest.raises(InvalidRequest, match="needs"):
        auto_device_map(sizes, [(GPU0, 60), (GPU1, 40)])
    with pytest.raises(InvalidRequest, match="needs"):
        auto_device_map(sizes, [(GPU0, 60), (GPU1, 40)], overflow=(CPU, 20))


def test_auto_device_map_on_one_gpu_places_everything_there() -> None:
    sizes = layer_sizes(4)
    assert set(auto_device_map(sizes, [(GPU2, 1000)]).values()) == {GPU2}


def test_estimate_unit_bytes_counts_quantized_linears() -> None:
    from internvl_runtime.config import InternVLConfig
    from internvl_runtime.models.internvl import InternVLModel
    with torch.device("meta"):
        skeleton = InternVLModel(InternVLConfig.from_pretrained(CKPT / "tiny-1B"))
    full = placement.estimate_unit_bytes(skeleton, torch.bfloat16)
    int8 = placement.estimate_unit_bytes(skeleton, torch.bfloat16, bits=8)
    assert int8["vision_model"] == full["vision_model"]
    assert int8["language_model.model.layers.0"] < 0.6 * full["language_model.model.layers.0"]
    assert int8[EMBED] == full[EMBED]


# ---- a split model on bookkept CPU devices --------------------------------------------------------
def three_way_map(num_layers: int) -> dict[str, str]:
    """vision on cpu:0, projector on cpu:1, layers alternating cpu:1 / cpu:2, embeddings + head on cpu:0."""
    device_map = {"vision_model": "cpu:0", "mlp1": "cpu:1", "language_model.model.embed_tokens": "cpu:0",
                  "language_model.model.norm": "cpu:0", "language_model.lm_head": "cpu:0"}
    device_map.update({f"language_model.model.layers.{i}": f"cpu:{1 + i % 2}" for i in range(num_layers)})
    return device_map


def run_steps(model, ids: list[int]) -> torch.Tensor:
    runner = ModelRunner(model, num_blocks=8)
    out = [runner.execute([SequenceStep(ids, 0, [0, 1, 2, 3])])]
    for step, token in enumerate([11, 12]):
        out.append(runner.execute([SequenceStep([token], len(ids) + step, [0, 1, 2, 3])]))
    return torch.cat(out)


@pytest.mark.parametrize("variant", ["tiny-1B", "tiny-26B"])
def test_split_model_logits_equal_unsplit(monkeypatch, variant: str) -> None:
    base = AutoModel.from_pretrained(CKPT / variant, torch_dtype=torch.float32)
    device_map = three_way_map(base.config.llm.num_hidden_layers)
    if variant == "tiny-26B":                                       # InternLM2: the checkpoint's names
        device_map["language_model.model.tok_embeddings"] = device_map.pop(EMBED)
        device_map["language_model.output"] = device_map.pop(LM_HEAD)
    split = AutoModel.from_pretrained(CKPT / variant, torch_dtype=torch.float32, device_map=device_map)
    assert split.hf_device_map["mlp1"] == "cpu:1"
    assert layer_devices(split.language_model) == [torch.device("cpu", 1 + i % 2)
                                                   for i in range(base.config.llm.num_hidden_layers)]
    moves: list[tuple[str, torch.device]] = []
    original = placement._move

    def spy(obj, device, cache):
        moves.append((type(obj).__name__, device))
        return original(obj, device, cache)

    monkeypatch.setattr(placement, "_move", spy)
    ids = list(range(3, 40))
    assert torch.equal(run_steps(split, ids), run_steps(base, ids))
    # every layer call sends its hidden states and the step's metadata to the layer's device
    layer_moves = [d for kind, d in moves if kind == "AttentionMetadata"]
    assert layer_moves[:2] == [torch.device("cpu", 1), torch.device("cpu", 2)]
    assert ("Tensor", torch.device("cpu", 0)) in moves               # norm / LM head back on cpu:0


def test_split_model_chat_with_image_equals_unsplit() -> None:
    path = CKPT / "tiny-1B"
    tokenizer = AutoTokenizer.from_pretrained(path)
    pixel_values = torch.randn(2, 3, 448, 448, generator=torch.Generator().manual_seed(0))
    config = dict(max_new_tokens=6, do_sample=False)
    question = "<image>\nDescribe the image."
    base = AutoModel.from_pretrained(path, torch_dtype=torch.float32)
    split = AutoModel.from_pretrained(path, torch_dtype=torch.float32, device_map=three_way_map(2))
    assert split.chat(tokenizer, pixel_values, question, config) == base.chat(tokenizer, pixel_values, question, config)
    assert torch.equal(split.extract_feature(pixel_values), base.extract_feature(pixel_values))


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_split_and_quantized(quantization: str) -> None:
    path = CKPT / "tiny-1B"
    ids = list(range(3, 40))
    plain = AutoModel.from_pretrained(path, torch_dtype=torch.bfloat16, quantization=quantization)
    split = AutoModel.from_pretrained(path, torch_dtype=torch.bfloat16, quantization=quantization,
                                      device_map=three_way_map(2))
    assert torch.equal(run_steps(split, ids), run_steps(plain, ids))


def test_kv_pools_follow_layer_devices() -> None:
    cache = KVCache.allocate(num_layers=3, num_blocks=2, block_size=4, num_kv_heads=1, head_dim=8, dtype=torch.float32,
                             device=["cpu", "meta", torch.device("cpu", 1)])
    assert [k.device.type for k in cache.keys] == ["cpu", "meta", "cpu"]
    assert [v.device.type for v in cache.values] == ["cpu", "meta", "cpu"]


def test_metadata_moves_every_tensor() -> None:
    meta = AttentionMetadata(query_lens=[2, 1], seq_lens=[2, 3], slot_mapping=torch.tensor([0, 1, 6]),
                             context_slots=[torch.tensor([0, 1]), torch.tensor([4, 5, 6])])
    moved = metadata_to(meta, torch.device("meta"))
    assert moved.slot_mapping.device.type == "meta"
    assert all(c.device.type == "meta" for c in moved.context_slots)
    assert moved.query_lens == [2, 1] and moved.query_starts == [0, 2]
    assert metadata_to(meta, torch.device("cpu")) is meta


# ---- dtypes ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 0.0), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_every_dtype_runs_on_cpu(dtype: torch.dtype, tolerance: float) -> None:
    reference = run_steps(AutoModel.from_pretrained(CKPT / "tiny-1B", torch_dtype=torch.float32), list(range(3, 30)))
    model = AutoModel.from_pretrained(CKPT / "tiny-1B", torch_dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    logits = run_steps(model, list(range(3, 30)))
    assert float((logits - reference).norm() / reference.norm()) <= tolerance


def test_bfloat16_on_old_gpu_is_refused(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    with pytest.raises(InvalidRequest, match=r"compute capability 8\.0"):
        loading.check_dtype_runs(torch.bfloat16, torch.device("cuda", 0))
    loading.check_dtype_runs(torch.float16, torch.device("cuda", 0))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        loading.check_dtype_runs(dtype, torch.device("cpu"))
