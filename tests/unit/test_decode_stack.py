"""The native decode step (decode_stack.DecodeStack) against the Python layer loop it replaces.

Both run in bfloat16 on the tiny checkpoints of all seven variants (Qwen2 with q/k/v bias, InternLM2,
Phi-3, Yi/Llama, Llama-3), over a prefill and several decode steps of three sequences at once, one of
them on a fragmented block table (context gathered slot by slot). The native step rounds where the
torch modules round, so logits agree to the last bit in nearly every case; we require greedy tokens to
be identical and the logits within 1e-2 relative.
"""

from __future__ import annotations

import os

import pytest
import torch

from internvl_runtime import AutoModel, kernels
from internvl_runtime.compute_plan import MAX_NATIVE_DECODE_ROWS, MULTI_ROW_KERNEL_ROWS, decode_stack_rows
from internvl_runtime.decode_stack import DecodeStack
from internvl_runtime.engine.model_runner import ModelRunner, SequenceStep
from internvl_runtime.errors import UnsupportedFeature
from internvl_runtime.loading import load_model
from paths import FIXTURES

SHARED = FIXTURES
VARIANTS = ["tiny-1B", "tiny-2B", "tiny-4B", "tiny-8B", "tiny-26B", "tiny-40B", "tiny-76B"]
TABLES = [list(range(0, 8)), [20, 9, 30, 11], list(range(40, 48))]   # the second one fragmented


@pytest.fixture(scope="module", autouse=True)
def native() -> None:
    if os.environ.get(kernels.ENV_VAR, "").lower() == "torch" or not kernels.available():
        pytest.skip(f"no native kernels here: {kernels.describe()}")


def load(variant: str, pack_bf16: bool = False, **kwargs) -> torch.nn.Module:
    if pack_bf16:   # the loader's option (the official AutoModel keeps its signature)
        return load_model(SHARED / "ckpt" / variant, dtype=torch.bfloat16, pack_bf16=True).eval()
    return AutoModel.from_pretrained(SHARED / "ckpt" / variant, torch_dtype=torch.bfloat16, **kwargs).eval()


class Counting:
    """Wraps a DecodeStack and counts its calls."""

    def __init__(self, stack) -> None:
        self.stack, self.calls = stack, 0

    def applies(self, kv_cache) -> bool:
        return self.stack.applies(kv_cache)

    def __call__(self, *args):
        self.calls += 1
        return self.stack(*args)


def tables_for(count: int) -> list[list[int]]:
    """Block tables for ``count`` sequences: TABLES, then 5 blocks each (80 tokens) from block 64 on."""
    return TABLES[:count] + [list(range(64 + 5 * i, 69 + 5 * i)) for i in range(max(0, count - len(TABLES)))]


def generate(model, stack, prompts: list[list[int]], steps: int = 8) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy tokens and per-step logits with ``stack`` as the decode stack (None: the Python loop)."""
    model.language_model.decode_stack = stack
    tables = tables_for(len(prompts))
    runner = ModelRunner(model, num_blocks=max(64, max(max(t) for t in tables) + 1))
    logits = runner.execute([SequenceStep(p, 0, t) for p, t in zip(prompts, tables, strict=True)])
    tokens = [[int(t)] for t in logits.argmax(-1)]
    history = [logits]
    for i in range(steps):
        logits = runner.execute([SequenceStep([tok[-1]], len(p) + i, t)
                                 for p, tok, t in zip(prompts, tokens, tables, strict=True)])
        history.append(logits)
        for tok, t in zip(tokens, logits.argmax(-1), strict=True):
            tok.append(int(t))
    return tokens, history


def prompts_for(model, lengths=(37, 5, 60)) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    vocab = model.config.llm.vocab_size
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def assert_same(model, prompts, rows_expected: bool = True) -> None:
    stack = model.language_model.decode_stack
    assert stack is not None, model.compute_plan.decode_layers
    python_tokens, python_logits = generate(model, None, prompts)
    counting = Counting(stack)
    native_tokens, native_logits = generate(model, counting, prompts)
    model.language_model.decode_stack = stack
    assert (counting.calls > 0) == rows_expected
    assert native_tokens == python_tokens
    for a, b in zip(python_logits, native_logits, strict=True):
        assert float((a - b).norm() / a.norm()) <= 1e-2


@pytest.mark.parametrize("variant", VARIANTS)
def test_native_decode_equals_python_loop(variant: str) -> None:
    model = load(variant)
    assert "decode layers: native" in model.compute_plan.describe()
    assert_same(model, prompts_for(model))


@pytest.mark.parametrize("variant", ["tiny-1B", "tiny-2B"])     # Qwen2 (q/k/v bias), InternLM2
@pytest.mark.parametrize("quantization", ["int8", "int4:g32"])
def test_native_decode_quantized(variant: str, quantization: str) -> None:
    model = load(variant, quantization=quantization)
    assert model.compute_plan.decode_layers.startswith("native"), model.compute_plan.decode_layers
    assert_same(model, prompts_for(model))


@pytest.mark.parametrize("path", ["avx2", "avx512", "avx512bf16"])
@pytest.mark.parametrize("variant", ["tiny-1B", "tiny-2B"])     # Qwen2 (q/k/v bias), InternLM2
def test_native_decode_packed_bf16(variant: str, path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """pack_bf16=True: the stack reads the packed blobs (fused tile on AVX-512 BF16, unpacked rows elsewhere);
    the same tokens as the Python loop over the packed layers, and as the unpacked model."""
    if kernels.missing_flags(path):
        pytest.skip(f"CPU lacks {kernels.missing_flags(path)}")
    monkeypatch.setenv(kernels.ENV_VAR, path)
    model = load(variant, pack_bf16=True)
    assert type(model.language_model.model.decoder_layers[0].mlp.down_proj).__name__ == "PackedBf16Linear"
    assert model.compute_plan.decode_layers.startswith("native"), model.compute_plan.decode_layers
    prompts = prompts_for(model)
    assert_same(model, prompts)
    plain = load(variant)
    packed_tokens, packed_logits = generate(model, model.language_model.decode_stack, prompts)
    plain_tokens, plain_logits = generate(plain, plain.language_model.decode_stack, prompts)
    assert packed_tokens == plain_tokens
    for a, b in zip(plain_logits, packed_logits, strict=True):
        assert float((a - b).norm() / a.norm()) <= 1e-2


@pytest.mark.parametrize("gemm_rows", [0, 5], ids=["gemv", "gemm"])
def test_native_decode_packed_bf16_many_rows(gemm_rows: int) -> None:
    """18 packed sequences in one step: the unpacked-rows path of the multi-row tiles, or the matrix unpacked
    for torch's GEMM inside the call."""
    model = load("tiny-1B", pack_bf16=True)
    stack = DecodeStack.build(model.language_model, gemm_rows)
    assert isinstance(stack, DecodeStack)
    model.language_model.set_decode_stack(stack, MAX_NATIVE_DECODE_ROWS)
    assert_same(model, prompts_for(model, lengths=[37, 5, 60] + [3 + 4 * i for i in range(15)]))


@pytest.mark.parametrize("path", ["avx2", "avx512", "avx512bf16"])
def test_native_decode_every_isa_path(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if kernels.missing_flags(path):
        pytest.skip(f"CPU lacks {kernels.missing_flags(path)}")
    monkeypatch.setenv(kernels.ENV_VAR, path)
    model = load("tiny-4B")
    assert model.language_model.decode_stack.path == path
    assert_same(model, prompts_for(model))


@pytest.mark.parametrize("path", ["avx2", "avx512bf16"])
@pytest.mark.parametrize("gemm_rows", [0, 5], ids=["gemv", "gemm"])
def test_native_decode_many_rows(path: str, gemm_rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """18 sequences in one native step (more than the GEMV kernels' row tiles, 4 / 8): weights read once
    for all rows by the kernels' multi-row tiles (gemm_rows 0), or torch's GEMM inside the native call
    from 5 rows (the plan's choice where the CPU has bf16 instructions); the same tokens as the Python loop."""
    if kernels.missing_flags(path):
        pytest.skip(f"CPU lacks {kernels.missing_flags(path)}")
    monkeypatch.setenv(kernels.ENV_VAR, path)
    model = load("tiny-1B")
    stack = DecodeStack.build(model.language_model, gemm_rows)
    assert isinstance(stack, DecodeStack) and stack.path == path
    model.language_model.set_decode_stack(stack, MAX_NATIVE_DECODE_ROWS)
    assert_same(model, prompts_for(model, lengths=[37, 5, 60] + [3 + 4 * i for i in range(15)]))


def test_decode_stack_rows_per_host_kind() -> None:
    """Every decode step goes native; bf16 products switch to torch's GEMM from 5 rows only where the CPU
    has fast 16-bit instructions (elsewhere torch's bf16 is far slower than the kernels), and beyond the
    multi-row tile's rows where the bf16 kernel has it (AVX-512 BF16)."""
    assert decode_stack_rows(True) == (MAX_NATIVE_DECODE_ROWS, 5)
    assert decode_stack_rows(False) == (MAX_NATIVE_DECODE_ROWS, 0)
    assert decode_stack_rows(True, multi_row=True) == (MAX_NATIVE_DECODE_ROWS, MULTI_ROW_KERNEL_ROWS + 1)
    assert MAX_NATIVE_DECODE_ROWS >= 256 and MULTI_ROW_KERNEL_ROWS >= 16


@pytest.mark.parametrize("compute", ["native", "upcast"])
def test_bf16_plan_keeps_batched_rows_on_the_multi_row_tile(compute: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bf16 model on the AVX-512 BF16 path keeps decode steps of up to MULTI_ROW_KERNEL_ROWS sequences (the
    layers and the LM head) on the kernels' multi-row tile, torch's GEMM beyond; under the upcast plan (an AVX2
    host's, forced here) torch's bf16 GEMM is never used: the kernels take every row count, the LM head up to 16."""
    if kernels.missing_flags("avx512bf16"):
        pytest.skip(f"CPU lacks {kernels.missing_flags('avx512bf16')}")
    monkeypatch.setenv(kernels.ENV_VAR, "avx512bf16")
    monkeypatch.setenv("INTERNVL_COMPUTE", compute)
    model = load("tiny-1B")
    plan = model.language_model.lm_head.plan
    assert plan is not None and plan.small_row_kernel is kernels.linear_bf16
    if compute == "native":
        assert model.language_model.decode_stack.gemm_rows == MULTI_ROW_KERNEL_ROWS + 1
        assert plan.max_kernel_rows == MULTI_ROW_KERNEL_ROWS
        assert f"GEMM from {MULTI_ROW_KERNEL_ROWS + 1} sequences" in model.compute_plan.decode_layers
    else:
        assert model.language_model.decode_stack.gemm_rows == 0 and plan.max_kernel_rows == 16


def test_more_rows_than_the_stack_takes_use_the_python_loop() -> None:
    model = load("tiny-1B")
    model.language_model.decode_stack_rows = 2
    assert_same(model, prompts_for(model), rows_expected=False)     # 3 sequences > 2


def test_plan_says_why_not_native(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(kernels.ENV_VAR, "torch")
    model = load("tiny-1B")
    assert model.language_model.decode_stack is None
    assert model.compute_plan.decode_layers.startswith("python (no native kernel")
    fp32 = AutoModel.from_pretrained(SHARED / "ckpt" / "tiny-1B", torch_dtype=torch.float32)
    assert fp32.language_model.decode_stack is None


def test_bad_arguments_are_named() -> None:
    model = load("tiny-1B")
    stack = model.language_model.decode_stack
    p = stack.projections
    x = torch.zeros(1, model.config.llm.hidden_size, dtype=torch.bfloat16)
    d = stack.head_dim
    cache = [torch.zeros(16, stack.num_kv_heads, d, dtype=torch.bfloat16) for _ in stack.ln1]
    args = [x, stack.ln1, stack.ln2[:-1], p["qkv"].weights, p["qkv"].scales, p["qkv"].biases, p["o"].weights,
            p["o"].scales, p["gate_up"].weights, p["gate_up"].scales, p["down"].weights, p["down"].scales, cache,
            cache, torch.zeros(1, d, dtype=torch.bfloat16), torch.zeros(1, d, dtype=torch.bfloat16),
            torch.tensor([0]), torch.tensor([0]), torch.tensor([0, 1])]
    sizes = {"num_heads": stack.num_heads, "num_kv_heads": stack.num_kv_heads, "eps": 1e-6, "scale": 0.125}
    with pytest.raises(RuntimeError, match="ln2 has 1 entries for 2 layers"):
        kernels.decode_layers(*args, **sizes, path=stack.path)
    args[2] = stack.ln2
    args[16] = torch.tensor([99])
    with pytest.raises(RuntimeError, match="slot 99 out of range"):
        kernels.decode_layers(*args, **sizes, path=stack.path)
    with pytest.raises(UnsupportedFeature, match="needs the native kernels"):   # no torch fallback
        kernels.decode_layers(*args, **sizes, path="torch")


# ------------------------------------------------------------------------------------------ float32

def load_fp32(variant: str, **kwargs) -> torch.nn.Module:
    return AutoModel.from_pretrained(SHARED / "ckpt" / variant, torch_dtype=torch.float32, **kwargs).eval()


def assert_same_fp32(model, prompts, rows_expected: bool = True) -> None:
    """A float32 stack rounds nowhere beyond fp32's own: the same greedy tokens as the Python loop and
    logits within 1e-5 relative (the products sum in another order than torch's; nothing else differs)."""
    stack = model.language_model.decode_stack
    assert stack is not None and stack.dtype == torch.float32, model.compute_plan.decode_layers
    python_tokens, python_logits = generate(model, None, prompts)
    counting = Counting(stack)
    native_tokens, native_logits = generate(model, counting, prompts)
    model.language_model.decode_stack = stack
    assert (counting.calls > 0) == rows_expected
    assert native_tokens == python_tokens
    for a, b in zip(python_logits, native_logits, strict=True):
        assert float((a - b).norm() / a.norm()) <= 1e-5


@pytest.mark.parametrize("variant", VARIANTS)
def test_native_decode_float32_equals_python_loop(variant: str) -> None:
    """float32 models (the official path's dtype) decode through the native stack, fp32 end to end."""
    model = load_fp32(variant)
    plan = model.compute_plan
    assert plan.decode_layers.startswith("native"), plan.decode_layers
    assert "float32 weights: the" in plan.decode_kernel and "fp32 GEMV" in plan.decode_kernel
    assert model.language_model.decode_stack.projections["qkv"].weights[0].dtype == torch.float32
    assert_same_fp32(model, prompts_for(model))


@pytest.mark.parametrize("path", ["avx2", "avx512", "avx512bf16"])
@pytest.mark.parametrize("gemm_rows", [0, 5], ids=["gemv", "gemm"])
def test_native_decode_float32_every_isa_path_and_many_rows(path: str, gemm_rows: int,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Each ISA path (avx2: the AVX2+FMA fp32 tile; both AVX-512 paths: the AVX-512F one), 18 sequences in
    one step on the kernels' multi-row tiles (gemm_rows 0) or torch's fp32 GEMM from 5 rows (the plan's
    choice for float32 on every host)."""
    if kernels.missing_flags(path):
        pytest.skip(f"CPU lacks {kernels.missing_flags(path)}")
    monkeypatch.setenv(kernels.ENV_VAR, path)
    model = load_fp32("tiny-2B")
    tile = "AVX2+FMA" if path == "avx2" else "AVX-512F"
    assert f"the {tile} fp32 GEMV" in model.compute_plan.decode_kernel
    stack = DecodeStack.build(model.language_model, gemm_rows)
    assert isinstance(stack, DecodeStack) and stack.path == path and stack.dtype == torch.float32
    model.language_model.set_decode_stack(stack, MAX_NATIVE_DECODE_ROWS)
    assert_same_fp32(model, prompts_for(model, lengths=[37, 5, 60] + [3 + 4 * i for i in range(15)]))


def test_float32_plan_rows_and_lm_head_kernel() -> None:
    """float32: torch's GEMM is fast on every host, so products switch to it from 5 rows inside the stack,
    and the small-row kernel (the LM head's at decode) is the fp32 GEMV up to 4 rows."""
    model = load_fp32("tiny-1B")
    assert model.language_model.decode_stack.gemm_rows == decode_stack_rows(True)[1] == 5
    assert "float32 products on torch's GEMM from 5 sequences" in model.compute_plan.decode_layers
    plan = model.language_model.lm_head.plan
    assert plan is not None and plan.small_row_kernel is kernels.linear_f32 and plan.max_kernel_rows == 4


def test_float32_model_with_quantized_layers_keeps_the_python_loop() -> None:
    """int8 layers in a float32 model: the native stack is bf16-or-float32 only; the plan says why."""
    model = load_fp32("tiny-1B", quantization="int8")
    assert model.language_model.decode_stack is None
    assert "Int8Linear in a torch.float32 model" in model.compute_plan.decode_layers


def test_float32_stack_refuses_mixed_dtypes() -> None:
    """The op names a bf16 KV pool handed to a float32 stack instead of reading it as float32."""
    model = load_fp32("tiny-1B")
    stack = model.language_model.decode_stack
    p = stack.projections
    d = stack.head_dim
    x = torch.zeros(1, model.config.llm.hidden_size)
    cache = [torch.zeros(16, stack.num_kv_heads, d, dtype=torch.bfloat16) for _ in stack.ln1]
    args = [x, stack.ln1, stack.ln2, p["qkv"].weights, p["qkv"].scales, p["qkv"].biases, p["o"].weights,
            p["o"].scales, p["gate_up"].weights, p["gate_up"].scales, p["down"].weights, p["down"].scales, cache,
            cache, torch.zeros(1, d), torch.zeros(1, d), torch.tensor([0]), torch.tensor([0]), torch.tensor([0, 1])]
    sizes = {"num_heads": stack.num_heads, "num_kv_heads": stack.num_kv_heads, "eps": 1e-6, "scale": 0.125}
    with pytest.raises(RuntimeError, match="KV pool 0 must be"):
        kernels.decode_layers(*args, **sizes, path=stack.path)
    assert not stack.applies(type("KV", (), {"keys": cache})())
