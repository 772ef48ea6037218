"""Weights viewed from the checkpoint's read-only memory map (issue #18): which are, that they are no copy,
that the outputs are the same bit for bit, and that writing one stops the process instead of the file changing.

The tiny checkpoints store float32, so a float32 load on the CPU is the "stored format = compute format" case.
"""

from __future__ import annotations

import hashlib
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from internvl_runtime import loading
from internvl_runtime.weights.mapping import is_mapped_from, mapped_ranges
from paths import FIXTURES

CKPT = FIXTURES / "ckpt" / "tiny-1B"
FILE = CKPT / "model.safetensors"
#: parameters that are several checkpoint tensors (or a transformed one): filled by copies, never views
FUSED = (".qkv_proj.", ".gate_up_proj.")


def _mapped(model: torch.nn.Module, file: Path = FILE) -> dict[str, bool]:
    ranges = mapped_ranges(file)
    return {name: is_mapped_from(p, ranges) for name, p in model.named_parameters() if not p.is_meta}


def test_weights_in_their_stored_format_are_views_of_the_file() -> None:
    model = loading.load_model(CKPT, dtype=torch.float32)
    mapped = _mapped(model)
    assert mapped and all(mapped[name] != any(f in name for f in FUSED) for name in mapped), \
        sorted(name for name, m in mapped.items() if m == any(f in name for f in FUSED))
    nbytes = sum(p.numel() * p.element_size() for name, p in model.named_parameters() if mapped[name])
    assert model.mapped_bytes == nbytes > 0


def test_no_mmap_reads_every_weight() -> None:
    model = loading.load_model(CKPT, dtype=torch.float32, mmap=False)
    assert not any(_mapped(model).values())
    assert model.mapped_bytes == 0


def test_a_cast_or_quantized_weight_is_a_copy() -> None:
    cast = loading.load_model(CKPT, dtype=torch.bfloat16)            # stored float32: converted, so copied
    assert not any(_mapped(cast).values())
    int8 = loading.load_model(CKPT, dtype=torch.float32, quantization="int8")
    mapped = _mapped(int8)
    assert not any(m for name, m in mapped.items() if name.startswith("language_model.model.layers.")
                   and "_proj." in name)                             # quantized: new tensors
    assert mapped["language_model.model.layers.0.input_layernorm.weight"]
    assert mapped["vision_model.encoder.layers.0.attn.qkv.weight"]   # the vision encoder is not quantized


def test_outputs_are_bit_equal_mapped_or_read() -> None:
    from PIL import Image

    from internvl_runtime import AutoTokenizer
    from internvl_runtime.engine.engine import EngineConfig, LLMEngine
    from internvl_runtime.engine.sampling_params import SamplingParams
    from internvl_runtime.processing.inputs import Message

    image = Image.open(FIXTURES / "data" / "img_640x427.png")
    answers, states = [], []
    for mmap in (True, False):
        model = loading.load_model(CKPT, dtype=torch.float32, mmap=mmap)
        states.append(model.state_dict())
        engine = LLMEngine(model, AutoTokenizer.from_pretrained(CKPT), EngineConfig(num_blocks=64))
        requests = [engine.processor.prepare([Message("user", "Hello, who are you?")]),
                    engine.processor.prepare([Message("user", "Describe the image.", [image.convert("RGB")])],
                                             max_num=2)]
        outputs = engine.generate(requests, SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True))
        answers.append([out.token_ids for out in outputs])
    assert answers[0] == answers[1]
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_writing_a_mapped_weight_stops_the_process_and_leaves_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    shutil.copytree(CKPT, folder)
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    script = textwrap.dedent(f"""
        import torch
        from internvl_runtime import loading
        model = loading.load_model({str(folder)!r}, dtype=torch.float32)
        weight = model.language_model.model.layers[0].self_attn.o_proj.weight
        print("loaded", flush=True)
        with torch.no_grad():
            weight.add_(1.0)
        print("written", flush=True)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "loaded" in done.stdout, done.stderr
    assert "written" not in done.stdout
    assert done.returncode in (-signal.SIGSEGV, -signal.SIGBUS), (done.returncode, done.stderr[-2000:])
    assert hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest() == digest


@pytest.mark.parametrize("mmap", [True, False])
def test_lazy_vision_reads_nothing_of_the_encoder_until_an_image(mmap: bool) -> None:
    """The loader's ``watch`` hook sees every tensor allocated or mapped: none of the encoder's before the first
    image, each exactly once after it, and the features equal an eager model's bit for bit."""
    seen: list[str] = []
    plan = loading.plan_load(CKPT, dtype=torch.float32)
    lazy = loading.build_on_devices(plan, watch=lambda name, tensor: seen.append(name), mmap=mmap, vision="lazy")
    vision_names = [n for n, _ in lazy.named_parameters() if loading.is_vision_name(n)]
    assert vision_names and not any(loading.is_vision_name(n) for n in seen)
    assert not lazy.vision_loaded and lazy.vision_pending_bytes > 0
    assert all(p.is_meta for n, p in lazy.named_parameters() if loading.is_vision_name(n))
    assert lazy.device == torch.device("cpu")                       # the first loaded parameter's
    eager = loading.load_model(CKPT, dtype=torch.float32, mmap=mmap)
    pixels = torch.randn(2, 3, 448, 448, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        got = lazy.extract_feature(pixels)
        want = eager.extract_feature(pixels)
    assert torch.equal(got, want)
    assert lazy.vision_loaded and lazy.vision_pending_bytes == 0
    assert sorted(n for n in seen if loading.is_vision_name(n)) == sorted(vision_names)


def test_lazy_vision_loads_once_under_concurrent_callers() -> None:
    import threading

    seen: list[str] = []
    plan = loading.plan_load(CKPT, dtype=torch.float32)
    model = loading.build_on_devices(plan, watch=lambda name, tensor: seen.append(name), vision="lazy")
    barrier = threading.Barrier(4)

    def call() -> None:
        barrier.wait()
        model.load_vision()

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    vision = [n for n in seen if loading.is_vision_name(n)]
    assert vision and len(vision) == len(set(vision))


def test_vision_auto_is_lazy_on_the_cpu_and_names_are_checked() -> None:
    plan = loading.plan_load(CKPT, dtype=torch.float32)
    assert loading.lazy_vision("auto", plan) and loading.lazy_vision("lazy", plan)
    assert not loading.lazy_vision("eager", plan)
    from internvl_runtime.errors import InvalidRequest

    with pytest.raises(InvalidRequest):
        loading.lazy_vision("sometimes", plan)


def test_bf16_mapped_weights_through_the_native_decode_stack(tmp_path: Path) -> None:
    """bf16 stored, bf16 computed (the case of the real checkpoints): the native kernels read the mapped
    weights (any alignment the file gives) and produce the same tokens as from copies."""
    from safetensors.torch import load_file, save_file

    from internvl_runtime import AutoTokenizer
    from internvl_runtime.engine.engine import EngineConfig, LLMEngine
    from internvl_runtime.engine.sampling_params import SamplingParams
    from internvl_runtime.processing.inputs import Message

    folder = tmp_path / "bf16"
    shutil.copytree(CKPT, folder)
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(FILE).items()}, folder / "model.safetensors")
    answers = []
    for mmap in (True, False):
        model = loading.load_model(folder, dtype=torch.bfloat16, mmap=mmap)
        assert any(_mapped(model, folder / "model.safetensors").values()) == mmap
        engine = LLMEngine(model, AutoTokenizer.from_pretrained(folder), EngineConfig(num_blocks=64))
        request = engine.processor.prepare([Message("user", "Hello, who are you?")])
        answers.append(engine.generate([request], SamplingParams(max_new_tokens=8, temperature=0,
                                                                 ignore_eos=True))[0].token_ids)
    assert answers[0] == answers[1]


def test_the_cpu_kv_budget_reserves_what_memavailable_does_not_show() -> None:
    from internvl_runtime.engine.memory import cpu_kv_budget

    assert cpu_kv_budget(1 << 60) == 0
    assert cpu_kv_budget() > 0
    model = loading.load_model(CKPT, dtype=torch.float32, vision="lazy")
    assert model.vision_pending_bytes == sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                                             if loading.is_vision_name(n))
