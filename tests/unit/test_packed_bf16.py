"""``pack_bf16=True``: the language model's bf16 linear layers kept losslessly packed (quantization.packed_bf16).

What must hold: the packed layers hold the checkpoint's exact weights (unpacked bit for bit); prefill-sized
products are exactly the unpacked layer's; a packed model answers as the unpacked one; what cannot be packed
stays as it was (the vision encoder, embeddings, norms; a tied LM head); a load that cannot pack says why.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from internvl_runtime import kernels, loading
from internvl_runtime.engine.engine import EngineConfig, LLMEngine
from internvl_runtime.engine.sampling_params import SamplingParams
from internvl_runtime.errors import UnsupportedFeature
from internvl_runtime.loading import load_model
from internvl_runtime.processing.inputs import Message
from internvl_runtime.quantization import PackedBf16Linear
from internvl_runtime.testing.checkpoints import write_checkpoint
from internvl_runtime.weights.mapping import is_mapped_from, mapped_ranges
from paths import FIXTURES
from resident import resident_kib

CKPT = FIXTURES / "ckpt"


@pytest.fixture(scope="module", autouse=True)
def native() -> None:
    if os.environ.get(kernels.ENV_VAR, "").lower() == "torch" or not kernels.available():
        pytest.skip(f"no native kernels here: {kernels.describe()}")


def _checkpoint_tensor(folder, name: str) -> torch.Tensor:
    """A checkpoint tensor as the bf16 model holds it (the tiny checkpoints store some in float32)."""
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return f.get_tensor(name).to(torch.bfloat16)


def test_packed_layers_hold_the_checkpoint_weights_exactly() -> None:
    model = load_model(CKPT / "tiny-1B", dtype=torch.bfloat16, pack_bf16=True)
    lm = model.language_model
    layer = lm.model.decoder_layers[0]
    packed = {"down_proj": layer.mlp.down_proj, "o_proj": layer.self_attn.o_proj, "lm_head": lm.lm_head}
    for module in packed.values():
        assert isinstance(module, PackedBf16Linear)
    prefix = "language_model.model.layers.0."
    down = _checkpoint_tensor(CKPT / "tiny-1B", prefix + "mlp.down_proj.weight")
    assert torch.equal(packed["down_proj"].unpacked_weight().view(torch.int16), down.view(torch.int16))
    head = _checkpoint_tensor(CKPT / "tiny-1B", "language_model.lm_head.weight")
    assert torch.equal(packed["lm_head"].unpacked_weight().view(torch.int16), head.view(torch.int16))
    # fused q/k/v: the three checkpoint tensors, in order, with the bias kept as it was
    qkv = layer.self_attn.qkv_proj
    parts = [_checkpoint_tensor(CKPT / "tiny-1B", prefix + f"self_attn.{p}_proj.weight") for p in "qkv"]
    assert torch.equal(qkv.unpacked_weight().view(torch.int16), torch.cat(parts).view(torch.int16))
    assert qkv.bias is not None and qkv.bias.dtype == torch.bfloat16
    # not packed: embeddings, norms, the vision encoder and mlp1
    assert lm.get_input_embeddings().weight.dtype == torch.bfloat16
    assert not any(isinstance(m, PackedBf16Linear) for m in model.vision_model.modules())
    assert not any(isinstance(m, PackedBf16Linear) for m in model.mlp1.modules())



def test_packing_at_load_reads_the_file_mapping_and_drops_its_pages(tmp_path) -> None:
    """A bf16 checkpoint: each weight to pack is read from a view of the file (a fused one from its scratch copy),
    its pages dropped once packed, and the packed model is the one packed from weights read into memory."""
    llm = json.loads((CKPT / "tiny-1B" / "config.json").read_text())["llm_config"]
    llm.update(hidden_size=512, intermediate_size=2048)        # weights of many pages: what is dropped shows
    folder = write_checkpoint(tmp_path / "bf16", "1B", dtype=torch.bfloat16, config_overrides={"llm_config": llm})
    file = folder / "model.safetensors"
    packed_source = 0
    viewed: dict[str, bool] = {}

    def watch(name: str, tensor: torch.Tensor) -> None:
        nonlocal packed_source
        viewed[name] = is_mapped_from(tensor, mapped_ranges(file))
        if viewed[name] and name.endswith(("proj.weight", "lm_head.weight")):
            packed_source += tensor.numel() * tensor.element_size()

    plan = loading.plan_load(folder, dtype=torch.bfloat16)
    model = loading.build_on_devices(plan, watch=watch, pack_bf16=True)
    prefix = "language_model.model.layers.0."
    assert viewed["language_model.lm_head.weight"] and viewed[prefix + "mlp.down_proj.weight"]
    assert viewed[prefix + "self_attn.o_proj.weight"]
    assert not viewed[prefix + "self_attn.qkv_proj.weight"] and not viewed[prefix + "mlp.gate_up_proj.weight"]
    # what packing read is out of the process again (what stays: pages shared with neighbours, never read views)
    assert resident_kib(file) * 1024 < packed_source / 4, (resident_kib(file), packed_source)
    read = load_model(folder, dtype=torch.bfloat16, pack_bf16=True, mmap=False)
    packed = {n: m for n, m in model.named_modules() if isinstance(m, PackedBf16Linear)}
    packed_read = {n: m for n, m in read.named_modules() if isinstance(m, PackedBf16Linear)}
    assert packed.keys() == packed_read.keys() and len(packed) == 2 * 4 + 1    # 2 layers of 4, the LM head
    for name, layer in packed.items():
        other = packed_read[name]
        assert torch.equal(layer.packed, other.packed), name
        assert (layer.bias is None) == (other.bias is None)
        assert layer.bias is None or torch.equal(layer.bias, other.bias)
        assert layer.bias is None or not is_mapped_from(layer.bias, mapped_ranges(file))   # the layer's own copy


def test_prefill_rows_are_exactly_the_unpacked_layer() -> None:
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(128, 96, bias=True, dtype=torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(96, 128, generator=g) * 0.05)
        linear.bias.copy_(torch.randn(96, generator=g))
    packed = PackedBf16Linear.from_linear(linear)
    x = torch.randn(2, 40, 128, generator=g).to(torch.bfloat16)   # 80 rows: above the kernel's
    with torch.no_grad():
        assert torch.equal(packed(x).view(torch.int16), linear(x).view(torch.int16))
        few = torch.randn(3, 128, generator=g).to(torch.bfloat16)
        torch.testing.assert_close(packed(few), F.linear(few, linear.weight, linear.bias), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("variant", ["tiny-1B", "tiny-2B", "tiny-4B"])
def test_packed_model_answers_as_the_unpacked_one(variant: str) -> None:
    outputs = {}
    for pack in (False, True):
        engine = LLMEngine.from_pretrained(CKPT / variant, dtype="bfloat16", pack_bf16=pack,
                                           config=EngineConfig(max_num_seqs=4))
        requests = [engine.processor.prepare([Message("user", text)])
                    for text in ("hello there, tell me a story", "count to ten", "x")]
        results = engine.generate(requests, SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True))
        alone = engine.generate(requests[:1], SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True))
        outputs[pack] = [r.token_ids for r in results] + [alone[0].token_ids]
    assert outputs[True] == outputs[False]


def test_a_tied_head_stays_the_embedding() -> None:
    model = load_model(CKPT / "tiny-3_5-1B", dtype=torch.bfloat16, pack_bf16=True)
    lm = model.language_model
    assert model.config.llm.tie_word_embeddings
    assert not isinstance(lm.lm_head, PackedBf16Linear)
    assert lm.lm_head.weight is lm.get_input_embeddings().weight
    assert isinstance(lm.model.decoder_layers[0].mlp.down_proj, PackedBf16Linear)


@pytest.mark.parametrize(("kwargs", "why"), [
    ({"dtype": torch.float32}, "float32, not bfloat16"),
    ({"dtype": torch.bfloat16, "quantization": "int8"}, "quantized"),
])
def test_loads_that_cannot_pack_say_why(kwargs: dict, why: str) -> None:
    with pytest.raises(UnsupportedFeature, match=why):
        load_model(CKPT / "tiny-1B", pack_bf16=True, **kwargs)


def test_without_native_kernels_packing_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(kernels.ENV_VAR, "torch")
    with pytest.raises(UnsupportedFeature, match="native kernels"):
        load_model(CKPT / "tiny-1B", dtype=torch.bfloat16, pack_bf16=True)


def test_a_bad_bias_is_refused_as_the_plain_product_refuses_it() -> None:
    """One bias check (gemv.cpp's ``checked_bias``) for the packed and the plain products."""
    w = torch.randn(96, 128).to(torch.bfloat16)
    x = torch.randn(2, 128).to(torch.bfloat16)
    blob = kernels.pack_bf16(w)
    for bias in (torch.zeros(95, dtype=torch.bfloat16), torch.zeros(96, 1, dtype=torch.float32)):
        messages = []
        for product in (lambda b: kernels.linear_bf16(x, w, b, path="avx2"),
                        lambda b: kernels.linear_bf16_packed(x, blob, b, path="avx2")):
            with pytest.raises(RuntimeError) as raised:
                product(bias)
            messages.append(str(raised.value).splitlines()[0])
        assert messages[0] == messages[1] and "bias" in messages[0], messages
