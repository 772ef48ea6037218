"""Quantizing at load from the checkpoint's read-only mapping (issue #18, peak memory of int8 / int4 processes):
each weight to quantize is read from a view of the file and its pages dropped chunk by chunk once read; a fused
weight's shards are assembled in a scratch mapping of its own. What is checked: the products are the same bit for
bit as reading the weights into memory (``mmap=False``) and as the old way (read whole, then quantize); the
embeddings of a quantized model stay a read-only view of the file with the same rows; the pages dropped are only
ever those of file views, and their bytes read the same afterwards; every row of a weight is handed to ``release``
once; a scratch tensor's mapping is gone once the tensor is freed; two models loaded in one process stay intact.

The tiny checkpoints store float32, so a float32 load on the CPU is the "stored format = compute format" case
(bf16 checkpoints loaded in bf16 take the same path).
"""

from __future__ import annotations

import gc
import itertools
import mmap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from internvl_runtime import loading
from internvl_runtime.quantization import linear as qlinear
from internvl_runtime.quantization.linear import Int4Linear, Int8Linear
from internvl_runtime.weights.loader import LazyTensor, iter_checkpoint_lazy
from internvl_runtime.weights.mapping import FileMappings, anonymous_empty, is_mapped_from, mapped_ranges
from paths import FIXTURES
from resident import resident_kib

CKPT = FIXTURES / "ckpt" / "tiny-1B"
FILE = CKPT / "model.safetensors"


def _states_equal(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("variant", ["1B", "2B", "4B"])          # Qwen2 q/k/v + bias, InternLM2 wqkv, Phi-3 fused
@pytest.mark.parametrize("quantization", ["int8", "int4:g32"])
def test_quantized_from_the_mapping_equals_reading_into_memory(variant: str, quantization: str) -> None:
    folder = FIXTURES / "ckpt" / f"tiny-{variant}"
    mapped = loading.load_model(folder, dtype=torch.float32, quantization=quantization)
    read = loading.load_model(folder, dtype=torch.float32, quantization=quantization, mmap=False)
    _states_equal(mapped, read)
    assert mapped.mapped_bytes > 0 and read.mapped_bytes == 0


def test_the_embeddings_of_a_quantized_model_are_a_read_only_view_with_the_same_rows() -> None:
    model = loading.load_model(CKPT, dtype=torch.float32, quantization="int8")
    read = loading.load_model(CKPT, dtype=torch.float32, quantization="int8", mmap=False)
    ranges = mapped_ranges(FILE)
    embed = model.language_model.get_input_embeddings().weight
    assert is_mapped_from(embed, ranges)
    assert not is_mapped_from(read.language_model.get_input_embeddings().weight, ranges)
    rows = torch.tensor([0, 5, 17, embed.shape[0] - 1])
    assert torch.equal(model.language_model.get_input_embeddings()(rows),
                       read.language_model.get_input_embeddings()(rows))
    quantized = [m for m in model.language_model.modules() if isinstance(m, Int8Linear)]
    assert quantized and not any(is_mapped_from(m.weight, ranges) for m in quantized)   # new tensors
    # mapped_bytes counts the views that stay (the embeddings, norms, the vision encoder), not those read to quantize
    kept = sum(p.numel() * p.element_size() for p in model.parameters() if is_mapped_from(p, ranges))
    assert model.mapped_bytes == kept


def test_two_quantized_models_in_one_process_stay_intact() -> None:
    """Dropping the pages of one load's views never changes what another model reads from the same file."""
    first = loading.load_model(CKPT, dtype=torch.float32, quantization="int8")
    second = loading.load_model(CKPT, dtype=torch.float32, quantization="int8")
    _states_equal(first, second)
    del first
    gc.collect()
    _states_equal(second, loading.load_model(CKPT, dtype=torch.float32, quantization="int8", mmap=False))


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_every_row_is_released_once_in_order(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    monkeypatch.setattr(qlinear, "_ROW_CHUNK_ELEMS", 64 * 7)      # several chunks of 7 rows
    linear = nn.Linear(64, 50, bias=False)
    released: list[tuple[int, int]] = []
    base = linear.weight.data_ptr()
    row = linear.weight.stride(0) * linear.weight.element_size()

    def release(rows: torch.Tensor) -> None:
        start = (rows.data_ptr() - base) // row
        released.append((start, start + rows.shape[0]))

    plain = Int8Linear.from_linear(linear) if kind == "int8" else Int4Linear.from_linear(linear, 32)
    told = (Int8Linear.from_linear(linear, release=release) if kind == "int8"
            else Int4Linear.from_linear(linear, 32, release=release))
    assert len(released) > 1
    assert [r for pair in released for r in pair] == sorted(r for pair in released for r in pair)
    assert released[0][0] == 0 and released[-1][1] == 50
    assert all(a[1] == b[0] for a, b in itertools.pairwise(released))
    _states_equal(plain, told)                                  # telling changes nothing


def _big_file(tmp_path: Path) -> tuple[Path, torch.Tensor, LazyTensor]:
    tensor = torch.arange(64 * mmap.PAGESIZE // 4, dtype=torch.float32)
    path = tmp_path / "one.safetensors"
    save_file({"t": tensor}, path)
    return path, tensor, next(lazy for _, lazy in iter_checkpoint_lazy([path]))



def test_drop_pages_takes_a_views_pages_out_and_its_bytes_read_the_same(tmp_path: Path) -> None:
    path, tensor, lazy = _big_file(tmp_path)
    mappings = FileMappings()
    view = lazy.mapped(mappings)
    assert view is not None and torch.equal(view, tensor)      # every page read: resident
    assert resident_kib(path) * 1024 >= 60 * mmap.PAGESIZE
    dropped = mappings.drop_pages(view)
    assert tensor.numel() * 4 <= dropped < tensor.numel() * 4 + 2 * mmap.PAGESIZE   # whole pages, to the file end
    assert resident_kib(path) * 1024 <= 2 * mmap.PAGESIZE    # out of the process (the header page may stay)
    assert torch.equal(view, tensor)                           # faulted in again from the file, same bytes


def test_drop_pages_leaves_any_other_memory_alone(tmp_path: Path) -> None:
    _, tensor, lazy = _big_file(tmp_path)
    mappings = FileMappings()
    assert lazy.mapped(mappings) is not None
    private = tensor.clone()
    scratch = anonymous_empty(tensor.shape, torch.float32)
    scratch.copy_(tensor)
    assert mappings.drop_pages(private) == 0 and mappings.drop_pages(scratch) == 0
    assert torch.equal(private, tensor) and torch.equal(scratch, tensor)
    mappings.release()
    assert FileMappings().drop_pages(tensor) == 0


def _anonymous_ranges() -> set[tuple[int, int]]:
    ranges = set()
    with open("/proc/self/maps", encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 5:                                # no path: anonymous
                start, end = (int(x, 16) for x in parts[0].split("-"))
                ranges.add((start, end))
    return ranges


def test_a_scratch_tensor_is_a_mapping_of_its_own_unmapped_when_freed() -> None:
    scratch = anonymous_empty((300, 1024), torch.bfloat16)
    scratch.fill_(1.5)
    assert scratch.shape == (300, 1024) and scratch.dtype == torch.bfloat16 and float(scratch.sum()) == 1.5 * 300 * 1024
    start = scratch.data_ptr()
    assert any(lo <= start < hi for lo, hi in _anonymous_ranges())
    del scratch
    gc.collect()
    assert not any(lo <= start < hi for lo, hi in _anonymous_ranges())


def test_the_int8_prefill_path_is_the_dequantized_gemm_bit_for_bit() -> None:
    """Rows above the GEMV's limit dequantize the layer (now scaled in place): the same products as scaling into
    a new tensor."""
    torch.manual_seed(0)
    linear = nn.Linear(128, 96, bias=True).to(torch.bfloat16)
    layer = Int8Linear.from_linear(linear)
    x = torch.randn(Int8Linear.KERNEL_MAX_ROWS + 9, 128, dtype=torch.bfloat16)
    dtype = torch.float32 if qlinear._cpu_16bit_slow() else torch.bfloat16
    weight = layer.weight.to(dtype) * layer.scales.to(dtype)[:, None]
    want = F.linear(x.to(dtype), weight).to(x.dtype) + layer.bias
    assert torch.equal(layer(x), want)
