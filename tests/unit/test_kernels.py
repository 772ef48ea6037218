"""The native GEMV kernels (internvl_runtime.kernels) against an fp64 reference, on awkward shapes.

Every native path this CPU can run is checked (AVX2, AVX-512F, AVX-512 BF16), whatever the automatic
choice; the first test compiles the extension (~10 s, cached afterwards). Where no compiler / ninja is
installed the native tests are skipped and the torch fallback is still checked.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from internvl_runtime import kernels
from internvl_runtime.errors import UnsupportedFeature
from internvl_runtime.kernels import extension

# `extension` owns the loading state and the private names the tests patch (_State, _compile, ...).
NATIVE = ("avx2", "avx512", "avx512bf16")


@pytest.fixture(scope="module")
def native() -> None:
    """Compile (or load) the extension once; skip only where the toolchain is missing."""
    if not kernels.supported_paths():
        pytest.skip("this CPU has no AVX2/AVX-512")
    if extension._load() is None:      # not available(): $INTERNVL_CPU_KERNEL=torch must not fail this
        have_tools = shutil.which("c++") and (shutil.which("ninja") or _has_ninja_module())
        if have_tools:
            pytest.fail(f"a compiler and ninja are installed but the kernels did not build: {kernels.describe()}")
        pytest.skip(f"no toolchain to build the kernels: {kernels.describe()}")


def _has_ninja_module() -> bool:
    try:
        import ninja  # noqa: F401
    except ImportError:
        return False
    return True


def _require(path: str) -> None:
    if kernels.missing_flags(path):
        pytest.skip(f"CPU lacks {', '.join(kernels.missing_flags(path))} for path {path}")


def _data(m: int, n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(torch.bfloat16)
    b = torch.randn(n, generator=g).to(torch.bfloat16)
    return x, w, b


def _reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact (fp64) product and sum |x| |w| (the scale of the summation error)."""
    ref = F.linear(x.double(), w.double(), None if bias is None else bias.double())
    return ref, F.linear(x.double().abs(), w.double().abs())


def _check_close(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
                 compare_torch: bool = True, reference: tuple | None = None) -> None:
    """out must be the fp64 product rounded once to bf16 (up to fp32 accumulation error).

    reference: (exact product, sum |x||w|) from ``_reference``, optionally with torch's mean error third.
    """
    assert out.dtype == torch.bfloat16 and out.shape == (x.shape[0], w.shape[0])
    ref, scale = (reference if reference is not None else _reference(x, w, bias))[:2]
    err = (out.double() - ref).abs()
    # 1) the tolerance asked for: rtol 1e-2 (bf16 has 8 significant bits)
    torch.testing.assert_close(out.double(), ref, rtol=1e-2, atol=1e-5 * float(scale.max()) + 1e-6)
    # 2) stronger: half a bf16 ulp of the exact value plus an fp32 summation error bound
    _, exponent = torch.frexp(ref.float())
    half_ulp = torch.ldexp(torch.ones_like(ref), (exponent - 9).double())
    bound = half_ulp * 1.001 + 2 * x.shape[1] * 2.0 ** -24 * scale + 1e-30
    worst = float((err - bound).max())
    assert worst <= 0, f"error exceeds half a bf16 ulp + fp32 summation error by {worst}"
    # 3) at least as close as torch's own bf16 F.linear (both round once; allow ties to differ)
    if compare_torch and out.numel() >= 17:
        theirs = float((F.linear(x, w, bias).double() - ref).abs().mean()) if len(reference or ()) < 3 \
            else reference[2]
        assert float(err.mean()) <= 1.05 * theirs + 1e-7


SHAPES = [(m, n, k) for m in (1, 3, 16) for n in (1, 17, 1152) for k in (896, 4864, 1000, 7, 33)]


@functools.cache
def _case(i: int, with_bias: bool) -> tuple:
    """Shape i's data, fp64 reference and torch's bf16 mean error: computed once, shared by every path."""
    m, n, k = SHAPES[i]
    x, w, b = _data(m, n, k, seed=i)
    bias = b if with_bias else None
    ref, scale = _reference(x, w, bias)
    theirs = float((F.linear(x, w, bias).double() - ref).abs().mean())
    return x, w, bias, (ref, scale, theirs)


@pytest.mark.parametrize("path", NATIVE)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_linear_bf16_matches_reference(native: None, path: str, with_bias: bool) -> None:
    _require(path)
    for i, (m, n, k) in enumerate(SHAPES):
        x, w, bias, reference = _case(i, with_bias)
        out = kernels.linear_bf16(x, w, bias, path=path)
        try:
            _check_close(out, x, w, bias, reference=reference)
        except AssertionError as exc:
            raise AssertionError(f"path {path}, M={m} N={n} K={k} bias={with_bias}: {exc}") from None


@pytest.mark.parametrize("path", NATIVE)
@pytest.mark.parametrize("rows_per_pass", [2, 4])
def test_linear_bf16_rows_per_pass(native: None, path: str, rows_per_pass: int) -> None:
    """Two or four weight rows per pass at every M (the AVX2 tile's decode option): the shapes above (N = 1
    and 17: rows left over for the one-row tile; K tails; 1, 3, 16 activation rows) and an LM-head-like width
    shared out over threads, each as close to the exact product as one row per pass."""
    _require(path)
    with _rows_per_pass("bf16", rows_per_pass):
        for i, (m, n, k) in enumerate(SHAPES):
            x, w, bias, reference = _case(i, True)
            try:
                _check_close(kernels.linear_bf16(x, w, bias, path=path), x, w, bias, reference=reference)
            except AssertionError as exc:
                raise AssertionError(f"path {path}, {rows_per_pass} rows, M={m} N={n} K={k}: {exc}") from None
        x, w, b = _data(1, 20011, 896, seed=8)
        _check_close(kernels.linear_bf16(x, w, b, path=path), x, w, b)


WIDE_SHAPES = [(m, n, k) for m in (5, 7, 8, 9, 13, 16, 17, 35) for n in (1, 3, 6, 9, 131) for k in (7, 33, 896, 4864)]


@pytest.mark.parametrize("shape", [0, 44, 82, 64, 83], ids=["auto", "4x4", "8x2", "6x4", "8x3"])
def test_linear_bf16_multi_row_tile(native: None, shape: int) -> None:
    """The AVX-512 BF16 multi-row tile (batched decode: 5+ activation rows; 4 rows x 4 weight rows, 8 x 2, 6 x 4
    or 8 x 3 (24 accumulators: a second, 8-result reduction), or chosen by K and M) on odd row counts 5-35
    (blocks of rows of even sizes with tails), N tails (weight rows past the last full tile: the one-row tiles)
    and K tails (masked loads below 32 columns, K under one step), with and without bias; every result the
    exact product rounded once to bf16 (up to fp32 summation error)."""
    _require("avx512bf16")
    previous = torch.ops.internvl_kernels._set_wide_bf16(5, shape)
    try:
        for i, (m, n, k) in enumerate(WIDE_SHAPES):
            x, w, b = _data(m, n, k, seed=300 + i)
            for bias in (None, b):
                out = kernels.linear_bf16(x, w, bias, path="avx512bf16")
                try:
                    _check_close(out, x, w, bias)
                except AssertionError as exc:
                    raise AssertionError(f"shape {shape}, M={m} N={n} K={k} bias={bias is not None}: {exc}") from None
        with pytest.raises(RuntimeError, match="shape 0, 44, 82, 64 or 83"):
            torch.ops.internvl_kernels._set_wide_bf16(5, 3)
    finally:
        torch.ops.internvl_kernels._set_wide_bf16(previous, 0)


def test_linear_bf16_multi_row_tile_epilogue(native: None) -> None:
    """The multi-row tile's vectorised epilogue: with small integer operands every sum is exact in any order, so
    each result must be exactly (sum + bias) rounded to bf16 to nearest even (ties included: sums past 256 are
    half-way between bf16 neighbours half the time), bias bf16, float32 or none, in every tile shape (2, 3 and 4
    weight rows; results 16-23 of the 24-accumulator tiles), row and weight-row tails; a NaN sum stores 0x7FC0
    (c10::BFloat16's NaN), as the scalar epilogue did."""
    _require("avx512bf16")
    generator = torch.Generator().manual_seed(21)
    try:
        for shape in (44, 82, 64, 83):
            torch.ops.internvl_kernels._set_wide_bf16(5, shape)
            for m in (5, 8, 13, 16):
                x = torch.randint(-8, 9, (m, 64), generator=generator).to(torch.bfloat16)
                w = torch.randint(-8, 9, (131, 64), generator=generator).to(torch.bfloat16)
                x[m - 1, 3] = float("nan")
                halves = torch.randint(-64, 65, (131,), generator=generator).float() / 2
                for bias in (None, halves.to(torch.bfloat16), halves + 0.25):
                    exact = x.double() @ w.double().T + (0 if bias is None else bias.double())
                    expected = exact.float().to(torch.bfloat16).view(torch.int16)
                    expected[exact.isnan()] = 0x7FC0
                    got = kernels.linear_bf16(x, w, bias, path="avx512bf16").view(torch.int16)
                    assert torch.equal(got, expected), (shape, m, None if bias is None else bias.dtype,
                                                        (got != expected).nonzero()[:5].tolist())
    finally:
        torch.ops.internvl_kernels._set_wide_bf16(5, 0)


def test_linear_bf16_multi_row_tile_prefetch(native: None) -> None:
    """The multi-row tile's software prefetch (none, into L1, into L2; 1 to 8 tiles ahead, past the last
    tile of a chunk and of the weights too) moves no result: every setting gives the same bits, at row
    counts with one and several row blocks over several threads' chunks; a bad setting is refused."""
    _require("avx512bf16")
    x, w, b = _data(16, 4099, 896, seed=12)
    x5 = x[:5].contiguous()
    reference = kernels.linear_bf16(x, w, b, path="avx512bf16")
    reference5 = kernels.linear_bf16(x5, w, b, path="avx512bf16")
    _check_close(reference, x, w, b)
    try:
        for tiles, level in ((1, 0), (1, 1), (1, 2), (8, 2), (3, 1)):
            torch.ops.internvl_kernels._set_wide_prefetch(tiles, level)
            assert torch.equal(kernels.linear_bf16(x, w, b, path="avx512bf16"), reference), (tiles, level)
            assert torch.equal(kernels.linear_bf16(x5, w, b, path="avx512bf16"), reference5), (tiles, level)
        with pytest.raises(RuntimeError, match="level 0, 1 or 2"):
            torch.ops.internvl_kernels._set_wide_prefetch(2, 3)
    finally:
        torch.ops.internvl_kernels._set_wide_prefetch(2, 2)


def test_linear_bf16_multi_row_tile_from_its_row_count(native: None) -> None:
    """Below the multi-row tile's row count the one-row / 4 x 4 tiles run, from it the multi-row tile: both the
    same products (switched off: the earlier tiles at every row count), and a large N over several threads'
    chunks."""
    _require("avx512bf16")
    x, w, b = _data(16, 4099, 896, seed=11)
    outs = {}
    for rows in (0, 5, 17):
        previous = torch.ops.internvl_kernels._set_wide_bf16(rows, 0)
        try:
            outs[rows] = kernels.linear_bf16(x, w, b, path="avx512bf16")
        finally:
            torch.ops.internvl_kernels._set_wide_bf16(previous, 0)
        _check_close(outs[rows], x, w, b)
    # fp32 sums in another order: at most one bf16 rounding step apart
    torch.testing.assert_close(outs[5].float(), outs[0].float(), rtol=2 ** -7, atol=1e-6)
    assert torch.equal(outs[17], outs[0])   # 16 rows < 17: the earlier tiles, bit for bit


PANEL_SHAPES = [(m, n, k) for m in (2, 3, 4, 5, 7, 16, 17) for n in (1, 3, 4, 5, 9, 131)
                for k in (7, 8, 24, 33, 896, 4864)]


@contextlib.contextmanager
def _avx2_panel(rows: int, kc: int) -> Iterator[None]:
    previous = torch.ops.internvl_kernels._set_avx2_panel(rows, kc)
    try:
        yield
    finally:
        torch.ops.internvl_kernels._set_avx2_panel(previous, 1024)


@pytest.mark.parametrize("kc", [0, 16], ids=["kc-default", "kc16"])
def test_avx2_panel_tile_bf16(native: None, kc: int) -> None:
    """The AVX2 panel tiles (2+ activation rows: 4 weight rows widened once, 3 x 4 register tile) on 2-17 rows
    (blocks of 3 with 1- and 2-row tails), N tails (the one-row tiles past the last 4-row tile), K tails (masked
    below 8 columns, K under one step) and, with kc 16, K in many blocks whose partial sums carry over; with and
    without bias, every result the exact product rounded once to bf16 (up to fp32 summation error)."""
    _require("avx2")
    with _avx2_panel(2, kc):
        for i, (m, n, k) in enumerate(PANEL_SHAPES):
            x, w, b = _data(m, n, k, seed=500 + i)
            for bias in (None, b):
                try:
                    _check_close(kernels.linear_bf16(x, w, bias, path="avx2"), x, w, bias)
                except AssertionError as exc:
                    raise AssertionError(f"kc {kc}, M={m} N={n} K={k} bias={bias is not None}: {exc}") from None
    with pytest.raises(RuntimeError, match="kc 0 or at least 16"):
        torch.ops.internvl_kernels._set_avx2_panel(2, 8)


@pytest.mark.parametrize("kc", [0, 16], ids=["kc-default", "kc16"])
def test_avx2_panel_tile_f32(native: None, kc: int) -> None:
    """The same panel tiles over float32 weights (read where they are stored, no widening): the same shapes,
    every result within the fp32 summation bound of the exact product."""
    _require("avx2")
    with _avx2_panel(2, kc):
        for i, (m, n, k) in enumerate(PANEL_SHAPES):
            g = torch.Generator().manual_seed(700 + i)
            x = torch.randn(m, k, generator=g)
            w = torch.randn(n, k, generator=g) / k ** 0.5
            for bias in (None, torch.randn(n, generator=g)):
                try:
                    _check_f32(kernels.linear_f32(x, w, bias, path="avx2"), x, w, bias)
                except AssertionError as exc:
                    raise AssertionError(f"kc {kc}, M={m} N={n} K={k} bias={bias is not None}: {exc}") from None


def test_avx2_panel_tile_epilogue(native: None) -> None:
    """The panel tiles' vectorised epilogue: with small integer operands every sum is exact in any order, so
    each bf16 result must be exactly (sum + bias) rounded to nearest even (ties included: sums past 256 are
    half-way between bf16 neighbours half the time), bias bf16, float32 or none, row tails and weight-row
    tails (the one-row tiles' scalar epilogue); a NaN sum stores 0x7FC0 (c10::BFloat16's NaN); fp32 weights
    store the exact sums."""
    _require("avx2")
    generator = torch.Generator().manual_seed(22)
    with _avx2_panel(2, 0):
        for m in (2, 4, 16, 17):
            x = torch.randint(-8, 9, (m, 64), generator=generator).to(torch.bfloat16)
            w = torch.randint(-8, 9, (131, 64), generator=generator).to(torch.bfloat16)
            x[m - 1, 3] = float("nan")
            halves = torch.randint(-64, 65, (131,), generator=generator).float() / 2
            for bias in (None, halves.to(torch.bfloat16), halves + 0.25):
                exact = x.double() @ w.double().T + (0 if bias is None else bias.double())
                expected = exact.float().to(torch.bfloat16).view(torch.int16)
                expected[exact.isnan()] = 0x7FC0
                got = kernels.linear_bf16(x, w, bias, path="avx2").view(torch.int16)
                assert torch.equal(got, expected), (m, None if bias is None else bias.dtype,
                                                    (got != expected).nonzero()[:5].tolist())
                got32 = kernels.linear_f32(x.float(), w.float(), bias, path="avx2")
                torch.testing.assert_close(got32, exact.float(), rtol=0, atol=0, equal_nan=True)


def test_avx2_panel_tile_from_its_row_count(native: None) -> None:
    """Below the panel tiles' row count the stream tiles run, from it (or from 2 rows whose activations outgrow
    L1) the panel tiles: the same products (off, or 2 / 4 weight rows per pass asked for: the stream tiles, bit
    for bit), over several threads' chunks and packed bf16 weights (unpacked per chunk, then the same tiles: the
    same bits)."""
    _require("avx2")
    x, w, b = _data(16, 4099, 896, seed=13)
    outs = {}
    for rows in (0, 3):
        with _avx2_panel(rows, 0):
            outs[rows] = kernels.linear_bf16(x, w, b, path="avx2")
            if rows == 3:
                with _rows_per_pass("bf16", 2):
                    stream2 = kernels.linear_bf16(x, w, b, path="avx2")
                packed = kernels.linear_bf16_packed(x, kernels.pack_bf16(w, path="avx2"), b, path="avx2")
        _check_close(outs[rows], x, w, b)
    assert torch.equal(packed, outs[3])   # the same tiles on the same values
    torch.testing.assert_close(outs[3].float(), outs[0].float(), rtol=2 ** -7, atol=1e-6)
    with _rows_per_pass("bf16", 2), _avx2_panel(0, 0):
        assert torch.equal(stream2, kernels.linear_bf16(x, w, b, path="avx2"))
    # 2 rows: K = 896 fits L1 (the stream tiles, as switched off), K = 4864 does not (the panel tiles, as from 2)
    for k, tiles in ((896, "stream"), (4864, "panel")):
        x2, w2, b2 = _data(2, 131, k, seed=14)
        with _avx2_panel(3, 0):
            out = kernels.linear_bf16(x2, w2, b2, path="avx2")
        with _avx2_panel(0 if tiles == "stream" else 2, 0):
            assert torch.equal(out, kernels.linear_bf16(x2, w2, b2, path="avx2")), k
        _check_close(out, x2, w2, b2)


@pytest.fixture(scope="module")
def lm_head() -> tuple:
    """The InternVL2-1B LM head shape (151655 x 896, M=1), its fp64 reference computed once."""
    x, w, b = _data(1, 151655, 896, seed=7)
    return x, w, b, _reference(x, w, b)


@pytest.mark.parametrize("path", NATIVE)
def test_linear_bf16_lm_head(native: None, lm_head: tuple, path: str) -> None:
    _require(path)
    x, w, b, reference = lm_head
    _check_close(kernels.linear_bf16(x, w, b, path=path), x, w, b, reference=reference)


@pytest.mark.parametrize("path", NATIVE)
def test_linear_bf16_float_bias_strided_input_and_batch_dims(native: None, path: str) -> None:
    _require(path)
    x, w, b = _data(6, 40, 70, seed=3)
    bias32 = torch.randn(40, dtype=torch.float32)
    ref = (F.linear(x.double(), w.double()) + bias32.double()).to(torch.bfloat16)
    torch.testing.assert_close(kernels.linear_bf16(x, w, bias32, path=path), ref, rtol=1e-2, atol=1e-2)
    wide = torch.randn(70, 6, dtype=torch.bfloat16)        # non-contiguous x (a transposed view)
    _check_close(kernels.linear_bf16(wide.t(), w, b, path=path), wide.t().contiguous(), w, b)
    x3 = x.reshape(2, 3, 70)
    out3 = kernels.linear_bf16(x3, w, b, path=path)
    assert out3.shape == (2, 3, 40)
    torch.testing.assert_close(out3.reshape(6, 40), kernels.linear_bf16(x, w, b, path=path), rtol=0, atol=0)
    x1 = x[0]                                               # a 1-D vector
    assert kernels.linear_bf16(x1, w, b, path=path).shape == (40,)
    empty = kernels.linear_bf16(x[:0], w, b, path=path)
    assert empty.shape == (0, 40)


def _quantize_x(x: torch.Tensor, block: int) -> torch.Tensor:
    """x as the integer kernels see it: int8 per block of ``block`` columns (the last one may be shorter),
    scale max|x| / 127 in fp32 (1 for an all-zero block), q = round-half-even(x * (1 / scale)) in fp32;
    returns q * scale (float64)."""
    xf = x.float()
    parts = []
    for start in range(0, x.shape[1], block):
        part = xf[:, start:start + block]
        sx = part.abs().amax(-1, keepdim=True) / 127
        sx = torch.where(sx > 0, sx, torch.ones_like(sx))
        parts.append(torch.round(part * (1 / sx)).double() * sx.double())
    return torch.cat(parts, dim=1)


@contextlib.contextmanager
def _int8_activations(on: bool) -> Iterator[None]:
    """Switch the integer dot-product kernels (8-bit activations) on or off for the block."""
    previous = torch.ops.internvl_kernels._set_int8_activations(on)
    try:
        yield
    finally:
        torch.ops.internvl_kernels._set_int8_activations(previous)


@contextlib.contextmanager
def _rows_per_pass(weights: str, rows: int) -> Iterator[None]:
    """Have the products over ``weights`` ("bf16", "f32", "int8", "int4") read ``rows`` weight rows per pass."""
    previous = torch.ops.internvl_kernels._set_rows_per_pass(weights, rows)
    try:
        yield
    finally:
        torch.ops.internvl_kernels._set_rows_per_pass(weights, previous)


INT8_SHAPES = [(1, 17, 896), (3, 1152, 1000), (16, 5, 33), (1, 3, 7), (9, 303, 4864), (2, 9, 96), (11, 64, 4896)]


@pytest.mark.parametrize("path", NATIVE)
@pytest.mark.parametrize("xdtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("eight_bit_x", [True, False], ids=["int8x", "exactx"])
def test_linear_int8_matches_reference(native: None, path: str, xdtype: torch.dtype, eight_bit_x: bool) -> None:
    """Every path, with 8-bit activations (the default: integer dot products, x quantized per 32 columns,
    as llama.cpp's q8_0) and without (fp32 activations): the product of the x the kernel defines, up to
    fp32 summation and one rounding of the output. K = 7, 33, 1000 leave partial blocks of 32 and 64."""
    _require(path)
    g = torch.Generator().manual_seed(11)
    for m, n, k in INT8_SHAPES:
        x = torch.randn(m, k, generator=g).to(xdtype)
        q = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)   # -128 too: exact either way
        scales = (torch.rand(n, generator=g) / 127).to(torch.bfloat16)
        bias = torch.randn(n, generator=g)
        xd = _quantize_x(x, 32) if eight_bit_x else x.double()
        for b in (None, bias):
            with _int8_activations(eight_bit_x):
                out = kernels.linear_int8(x, q, scales, b, path=path)
            assert out.dtype == xdtype and out.shape == (m, n)
            ref = F.linear(xd, q.double()) * scales.double() + (0 if b is None else b.double())
            absprod = F.linear(xd.abs(), q.double().abs()) * scales.double()
            rtol = 1e-2 if xdtype == torch.bfloat16 else 1e-5     # bf16 output: one rounding
            atol = 2 * k * 2.0 ** -24 * float(absprod.max()) + 1e-6   # fp32 summation error
            torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol,
                                       msg=lambda e: f"path {path} M={m} N={n} K={k}: {e}")  # noqa: B023


@pytest.mark.parametrize("path", NATIVE)
@pytest.mark.parametrize("rows_per_pass", [2, 4])
@pytest.mark.parametrize("eight_bit_x", [True, False], ids=["int8x", "exactx"])
def test_linear_int8_rows_per_pass(native: None, path: str, rows_per_pass: int, eight_bit_x: bool) -> None:
    """int8 weights read 2 or 4 rows per pass: the same sums as one row per pass (exact integer sums scaled per
    block; fp32 on exact activations up to summation order), N tails (17, 303, 5, 3) and K tails included."""
    _require(path)
    g = torch.Generator().manual_seed(12)
    for m, n, k in INT8_SHAPES:
        x = torch.randn(m, k, generator=g).to(torch.bfloat16)
        q = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
        scales = (torch.rand(n, generator=g) / 127).to(torch.bfloat16)
        with _int8_activations(eight_bit_x):
            one = kernels.linear_int8(x.float(), q, scales, path=path)
            with _rows_per_pass("int8", rows_per_pass):
                out = kernels.linear_int8(x.float(), q, scales, path=path)
        absprod = F.linear(x.double().abs(), q.double().abs()) * scales.double()
        torch.testing.assert_close(out.double(), one.double(), rtol=0,
                                   atol=4 * k * 2.0 ** -24 * float(absprod.max()) + 1e-6,
                                   msg=lambda e: f"path {path} {rows_per_pass} rows M={m} N={n} K={k}: {e}")  # noqa: B023


@pytest.mark.parametrize("path", NATIVE)
def test_int8_activation_error_is_small(native: None, path: str) -> None:
    """The error 8-bit activations add, stated: on random data (x ~ N(0, 1), K = 896) the product's
    relative error (norm) against exact activations is ~0.5% (half a step of max|x| / 127 per
    element); int8 weights' own error (~0.4% of W) is of the same size."""
    _require(path)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 896, generator=g).to(torch.bfloat16)
    q = torch.randint(-127, 128, (512, 896), generator=g, dtype=torch.int8)
    scales = torch.full((512,), 0.01)
    with _int8_activations(True):
        fast = kernels.linear_int8(x, q, scales, path=path).double()
    exact = F.linear(x.double(), q.double()) * 0.01
    rel = float((fast - exact).norm() / exact.norm())
    assert 1e-4 < rel < 1e-2, rel


# int4: (M, N, K, group): 1 row, N not a multiple of 8/16, every group size, more rows than a tile takes
# (N odd: rows left over for the one-row tile at 2 and 4 rows per pass; groups of 192 = 3 x 64: the VNNI tile's
# 64-column steps, 128 / 256 its 128-column ones; 32 and 96: the 32-column AVX2 tile)
INT4_SHAPES = [(1, 1, 32, 32), (1, 17, 896, 128), (3, 1152, 896, 64), (5, 7, 4864, 128), (16, 40, 256, 256),
               (2, 33, 96, 32), (3, 9, 576, 192), (1, 5, 384, 128), (4, 11, 192, 96), (7, 3, 1024, 512)]


def _int4_case(m: int, n: int, k: int, group: int, seed: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scales = (torch.rand(n, k // group, generator=g) * 0.02 + 1e-3)
    zeros = torch.randn(n, k // group, generator=g) * 0.01
    sz = torch.stack([scales, zeros], dim=-1).to(torch.bfloat16).contiguous()
    return x, q, sz


def _int4_reference(x: torch.Tensor, q: torch.Tensor, sz: torch.Tensor, group: int, bias=None,
                    eight_bit_x: bool = False) -> tuple:
    """The exact product; with ``eight_bit_x``, as the integer kernels define it: the (q - 8) * scale part
    meets x quantized to int8 per group (scale max|x| / 127, round half to even), the zero part exact x."""
    n, k = q.shape
    scales, zeros = sz.double()[..., 0], sz.double()[..., 1]                       # (N, G)
    codes = q.double().reshape(n, k // group, group) - 8
    xd = x.double().reshape(x.shape[0], k // group, group)
    xq = xd
    if eight_bit_x:
        sx = xd.abs().amax(-1, keepdim=True) / 127
        sx = torch.where(sx > 0, sx.float().double(), torch.ones_like(sx))
        xq = torch.round((xd.float() * (1 / sx.float())).double()) * sx
    ref = torch.einsum("mgc,ngc,ng->mn", xq, codes, scales) + torch.einsum("mgc,ng->mn", xd, zeros)
    ref = ref + (0 if bias is None else bias.double())
    w = (codes * scales[..., None] + zeros[..., None]).reshape(n, k)
    return ref, F.linear(x.double().abs(), w.abs())


def test_int4_pack_roundtrip_and_layout() -> None:
    q = torch.randint(0, 16, (3, 64), dtype=torch.uint8)
    packed = kernels.pack_int4(q)
    assert packed.shape == (3, 32) and packed.dtype == torch.uint8
    assert torch.equal(kernels.unpack_int4(packed), q)
    # byte j of each 32-column block: column j in the low nibble, column 16 + j in the high one
    assert int(packed[1, 3]) == int(q[1, 3]) | (int(q[1, 19]) << 4)
    assert int(packed[2, 16 + 5]) == int(q[2, 32 + 5]) | (int(q[2, 48 + 5]) << 4)
    with pytest.raises(ValueError, match="multiple of 32"):
        kernels.pack_int4(torch.zeros(2, 48, dtype=torch.uint8))


@pytest.mark.parametrize("path", NATIVE)
@pytest.mark.parametrize("rows_per_pass", [1, 2, 4])
def test_linear_int4_matches_reference(native: None, path: str, rows_per_pass: int) -> None:
    _require(path)
    for i, (m, n, k, group) in enumerate(INT4_SHAPES):
        x, q, sz = _int4_case(m, n, k, group, seed=20 + i)
        packed = kernels.pack_int4(q)
        bias = torch.randn(n)
        for b in (None, bias, bias.to(torch.bfloat16)):
            with _rows_per_pass("int4", rows_per_pass):
                out = kernels.linear_int4(x, packed, sz, group, b, path=path)
            assert out.dtype == torch.bfloat16 and out.shape == (m, n)
            ref, absprod = _int4_reference(x, q, sz, group, b, eight_bit_x=True)
            atol = 4 * k * 2.0 ** -24 * float(absprod.max()) + 1e-6     # fp32 summation error
            torch.testing.assert_close(out.double(), ref, rtol=1e-2, atol=atol,
                                       # called at once by assert_close, inside this iteration
                                       msg=lambda e: f"path {path} M={m} N={n} K={k} g={group}: {e}")  # noqa: B023
        # the fallback (dequantize + matmul) computes the same
        fallback = kernels.linear_int4(x, packed, sz, group, path="torch")
        torch.testing.assert_close(fallback.double(), _int4_reference(x, q, sz, group)[0], rtol=1e-2,
                                   atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dequantize_int4_native_equals_torch(native: None, dtype: torch.dtype,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    _, q, sz = _int4_case(1, 37, 256, 64, seed=9)
    packed = kernels.pack_int4(q)
    native_w = kernels.dequantize_int4(packed, sz, 64, dtype)
    monkeypatch.setenv(kernels.ENV_VAR, "torch")
    torch_w = kernels.dequantize_int4(packed, sz, 64, dtype)
    assert native_w.dtype == dtype and torch.equal(native_w, torch_w)
    exact = (q.float().reshape(37, 4, 64) - 8) * sz.float()[..., :1] + sz.float()[..., 1:]
    assert torch.equal(torch_w, exact.reshape(37, 256).to(dtype))


@pytest.mark.parametrize("path", NATIVE)
def test_linear_int4_lm_head(native: None, path: str) -> None:
    _require(path)
    x, q, sz = _int4_case(1, 151655, 896, 128, seed=5)
    out = kernels.linear_int4(x, kernels.pack_int4(q), sz, 128, path=path)
    ref, absprod = _int4_reference(x, q, sz, 128, eight_bit_x=True)
    torch.testing.assert_close(out.double(), ref, rtol=1e-2, atol=4 * 896 * 2.0 ** -24 * float(absprod.max()))


@pytest.mark.parametrize("path", NATIVE)
def test_int4_integer_and_exact_paths_agree(native: None, path: str) -> None:
    """The integer dot-product kernels (8-bit activations) against the kernels on exact activations (fp32
    on AVX2 / AVX-512F, bf16 dot products on AVX-512 BF16): the same product up to the activations' 8-bit
    rounding (~0.7% of the output's scale on random data, small next to int4's own weight error)."""
    _require(path)
    x, q, sz = _int4_case(3, 300, 896, 128, seed=12)
    packed = kernels.pack_int4(q)
    fast = kernels.linear_int4(x, packed, sz, 128, path=path)
    with _int8_activations(False):
        exact = kernels.linear_int4(x, packed, sz, 128, path=path)
    assert not torch.equal(fast, exact)
    assert float((fast.double() - exact.double()).norm() / exact.double().norm()) < 2e-2
    torch.testing.assert_close(exact.double(), _int4_reference(x, q, sz, 128)[0], rtol=1e-2, atol=1e-3)


def test_linear_int4_bad_input(native: None) -> None:
    x, q, sz = _int4_case(1, 4, 64, 32, seed=1)
    packed = kernels.pack_int4(q)
    with pytest.raises(RuntimeError, match="group 48 must be a multiple of 32"):
        kernels.linear_int4(x, packed, sz, 48)
    with pytest.raises(RuntimeError, match=r"\(N, K/group, 2\)"):
        kernels.linear_int4(x, packed, sz[:, :1].contiguous(), 32)
    with pytest.raises(RuntimeError, match=r"\(N, K/2\) uint8"):
        kernels.linear_int4(x, packed.to(torch.int8), sz, 32)


def test_auto_path_is_best_supported(native: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    assert kernels.selected_path() == kernels.supported_paths()[0]
    assert kernels.describe().startswith(kernels.selected_path() + ":")
    x, w, b = _data(1, 64, 96, seed=5)
    _check_close(kernels.linear_bf16(x, w, b), x, w, b)
    from torch._subclasses.fake_tensor import (
        FakeTensorMode,  # shape-only impls for torch.compile
    )
    with FakeTensorMode():
        fx, fw = torch.empty(3, 96, dtype=torch.bfloat16), torch.empty(64, 96, dtype=torch.bfloat16)
        assert torch.ops.internvl_kernels.linear_bf16(fx, fw, None, 0).shape == (3, 64)


def test_forced_unsupported_path_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(extension, "cpu_flags", lambda: frozenset({"sse2", "avx2", "fma"}))
    monkeypatch.setattr(extension, "_is_x86", lambda: True)
    x, w, _ = _data(1, 8, 32, seed=1)
    with pytest.raises(UnsupportedFeature, match="avx512_bf16"):
        kernels.linear_bf16(x, w, path="avx512bf16")
    monkeypatch.setenv(kernels.ENV_VAR, "avx512")
    with pytest.raises(UnsupportedFeature, match="avx512f"):
        kernels.linear_bf16(x, w)
    monkeypatch.setenv(kernels.ENV_VAR, "avx9000")
    with pytest.raises(UnsupportedFeature, match="INTERNVL_CPU_KERNEL"):
        kernels.linear_bf16(x, w)
    assert kernels.missing_flags("avx2") == ()
    assert kernels.supported_paths() == ("avx2",)


def test_env_torch_forces_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(kernels.ENV_VAR, "torch")
    x, w, b = _data(3, 17, 33, seed=2)
    assert kernels.selected_path() == "torch" and not kernels.available()
    assert "forced" in kernels.describe()
    torch.testing.assert_close(kernels.linear_bf16(x, w, b), F.linear(x, w, b), rtol=0, atol=0)


def _fresh_state(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (("ops", None), ("tried", False), ("error", None), ("build_seconds", None),
                        ("library", None), ("best", "torch")):
        monkeypatch.setattr(extension._State, name, value)
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)


def test_fallback_when_build_fails_is_logged_once_and_thread_safe(monkeypatch: pytest.MonkeyPatch,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    _fresh_state(monkeypatch)
    calls = []

    def broken_compile() -> str:
        calls.append(1)
        time.sleep(0.05)
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(extension, "_compile", broken_compile)
    monkeypatch.setattr(extension, "supported_paths", lambda: ("avx2",))
    x, w, b = _data(2, 9, 40, seed=4)
    results: list[torch.Tensor] = []
    with caplog.at_level(logging.WARNING, logger="internvl_runtime.kernels"):
        threads = [threading.Thread(target=lambda: results.append(kernels.linear_bf16(x, w, b))) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        kernels.linear_bf16(x, w, b)
    assert len(calls) == 1 and len(results) == 4
    for r in results:
        torch.testing.assert_close(r, F.linear(x, w, b), rtol=0, atol=0)
    assert not kernels.available()
    assert "Ninja is required" in kernels.describe() and kernels.describe().startswith("torch")
    warnings_logged = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings_logged) == 1 and "Ninja" in warnings_logged[0].getMessage()
    # a forced native path on a host where the build failed also falls back (no crash)
    torch.testing.assert_close(kernels.linear_bf16(x, w, b, path="avx2"), F.linear(x, w, b), rtol=0, atol=0)


def test_build_lock_timeout_falls_back_with_its_own_message(monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    _fresh_state(monkeypatch)
    message = "waited 2 s for the native kernels' build by pid 7 on host h; set INTERNVL_KERNEL_BUILD_TIMEOUT"

    def waited_compile() -> str:
        raise kernels.BuildLockTimeout(message)

    monkeypatch.setattr(extension, "_compile", waited_compile)
    monkeypatch.setattr(extension, "supported_paths", lambda: ("avx2",))
    with caplog.at_level(logging.WARNING, logger="internvl_runtime.kernels"):
        assert not kernels.available()
    assert kernels.describe() == f"torch: F.linear ({message})"    # not "building ... failed"
    assert [r.getMessage() for r in caplog.records] == [
        f"internvl_runtime.kernels: {message}; using torch's F.linear instead"]


def test_no_native_path_on_other_architectures(monkeypatch: pytest.MonkeyPatch) -> None:
    _fresh_state(monkeypatch)
    monkeypatch.setattr(extension, "_is_x86", lambda: False)
    monkeypatch.setattr(extension, "_compile", lambda: pytest.fail("must not compile"))
    x, w, b = _data(1, 5, 16, seed=6)
    torch.testing.assert_close(kernels.linear_bf16(x, w, b), F.linear(x, w, b), rtol=0, atol=0)
    assert kernels.supported_paths() == ()
    with pytest.raises(UnsupportedFeature, match="x86-64"):
        kernels.linear_bf16(x, w, path="avx2")


def test_int8_fallback_matches_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(kernels.ENV_VAR, "torch")
    x = torch.randn(2, 48, dtype=torch.bfloat16)
    q = torch.randint(-127, 128, (6, 48), dtype=torch.int8)
    s = torch.rand(6) / 100
    out = kernels.linear_int8(x, q, s)
    ref = (F.linear(x.double(), q.double()) * s.double()).to(torch.bfloat16)
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-3)


def test_import_has_no_side_effects() -> None:
    code = ("import sys, internvl_runtime.kernels, internvl_runtime.decode_stack; "
            "from internvl_runtime.kernels import extension; from internvl_runtime.hardware import cpu_flags; "
            "print(extension._State.tried, 'torch.utils.cpp_extension' in sys.modules, "
            "cpu_flags.cache_info().currsize)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.split() == ["False", "False", "0"], out.stdout + out.stderr


def test_linear_bf16_leaves_what_it_does_not_handle_to_torch(native: None) -> None:
    """float32 products and products that need autograd go to F.linear, on every path."""
    torch.manual_seed(0)
    x32, w32, b32 = torch.randn(1, 96), torch.randn(40, 96), torch.randn(40)
    torch.testing.assert_close(kernels.linear_bf16(x32, w32, b32), F.linear(x32, w32, b32), rtol=0, atol=0)
    w = torch.randn(4, 16, dtype=torch.bfloat16, requires_grad=True)
    x = torch.randn(1, 16, dtype=torch.bfloat16)
    out = kernels.linear_bf16(x, w)
    torch.testing.assert_close(out, F.linear(x, w), rtol=0, atol=0)
    out.float().sum().backward()
    assert w.grad is not None


# ------------------------------------------------------------------------------------------ float32

def _check_f32(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> None:
    """out must be the fp64 product up to an fp32 summation error bound, and as close as torch's F.linear."""
    assert out.dtype == torch.float32 and out.shape == (x.shape[0], w.shape[0])
    ref, scale = _reference(x, w, bias)
    err = (out.double() - ref).abs()
    # fp32 accumulation over K terms (any order): |err| <= K * 2^-24 * sum |x||w| (+ the bias add's rounding)
    bound = x.shape[1] * 2.0 ** -24 * scale + 2.0 ** -24 * ref.abs() + 1e-30
    worst = float((err - bound).max()) if err.numel() else 0.0
    assert worst <= 0, f"error exceeds the fp32 summation bound by {worst}"
    if out.numel() >= 17:   # typically closer than the bound: about torch's own error (both sum in fp32)
        theirs = float((F.linear(x, w, bias).double() - ref).abs().mean())
        assert float(err.mean()) <= 2.0 * theirs + 1e-9


@pytest.mark.parametrize("path", NATIVE)
@pytest.mark.parametrize("rows_per_pass", [1, 2, 4])
def test_linear_f32_matches_reference(native: None, path: str, rows_per_pass: int) -> None:
    """The fp32 GEMV (float32 models' decode) on every path, the awkward shapes of the bf16 test (K tails
    below the 16 / 32 columns of a step, 1-16 rows: one-row and multi-row tiles), with and without bias;
    reading 1 (the default), 2 or 4 weight rows per pass (the benchmarks' knob: N tails of each)."""
    _require(path)
    with _rows_per_pass("f32", rows_per_pass):
        for i, (m, n, k) in enumerate(SHAPES):
            g = torch.Generator().manual_seed(100 + i)
            x = torch.randn(m, k, generator=g)
            w = torch.randn(n, k, generator=g) / k ** 0.5
            for bias in (None, torch.randn(n, generator=g)):
                out = kernels.linear_f32(x, w, bias, path=path)
                try:
                    _check_f32(out, x, w, bias)
                except AssertionError as exc:
                    raise AssertionError(f"path {path}, M={m} N={n} K={k} bias={bias is not None}: {exc}") from None
    with pytest.raises(RuntimeError, match="1, 2 or 4 rows"):
        torch.ops.internvl_kernels._set_rows_per_pass("f32", 3)
    with pytest.raises(RuntimeError, match="bf16, f32, int8 or int4"):
        torch.ops.internvl_kernels._set_rows_per_pass("fp8", 2)


@pytest.mark.parametrize("path", NATIVE)
def test_linear_f32_lm_head_bf16_bias_and_shapes(native: None, path: str) -> None:
    """A wide LM-head-like matrix (rows shared out over threads in chunks), a bf16 bias, strided and 3-D x."""
    _require(path)
    g = torch.Generator().manual_seed(11)
    x, w = torch.randn(1, 896, generator=g), torch.randn(20011, 896, generator=g) / 30
    _check_f32(kernels.linear_f32(x, w, path=path), x, w, None)
    b16 = torch.randn(20011, generator=g).to(torch.bfloat16)
    _check_f32(kernels.linear_f32(x, w, b16, path=path), x, w, b16.float())
    wide = torch.randn(896, 6, generator=g)                  # non-contiguous x (a transposed view)
    _check_f32(kernels.linear_f32(wide.t(), w[:40], path=path), wide.t().contiguous(), w[:40], None)
    x3 = wide.t().reshape(2, 3, 896)
    out3 = kernels.linear_f32(x3, w[:40], path=path)
    assert out3.shape == (2, 3, 40)
    torch.testing.assert_close(out3.reshape(6, 40), kernels.linear_f32(wide.t(), w[:40], path=path), rtol=0, atol=0)
    assert kernels.linear_f32(x[0], w[:40], path=path).shape == (40,)
    assert kernels.linear_f32(x[:0], w[:40], path=path).shape == (0, 40)


def test_linear_f32_leaves_what_it_does_not_handle_to_torch(native: None) -> None:
    """bf16 products, autograd and the torch path go to F.linear."""
    torch.manual_seed(0)
    x16, w16 = torch.randn(1, 96, dtype=torch.bfloat16), torch.randn(40, 96, dtype=torch.bfloat16)
    torch.testing.assert_close(kernels.linear_f32(x16, w16), F.linear(x16, w16), rtol=0, atol=0)
    w = torch.randn(4, 16, requires_grad=True)
    x = torch.randn(1, 16)
    out = kernels.linear_f32(x, w)
    out.sum().backward()
    assert w.grad is not None
    x, w = torch.randn(2, 96), torch.randn(40, 96)
    torch.testing.assert_close(kernels.linear_f32(x, w, path="torch"), F.linear(x, w), rtol=0, atol=0)


# ----------------------------------------------------------------------------------- packed bf16

def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16)


def _awkward_weights(n: int, k: int, seed: int) -> torch.Tensor:
    """Normal weights plus every kind of value the format must keep: zeros of both signs, subnormals,
    infinities, NaNs, huge and tiny exponents (escapes), and rows whose exponents spread over all 254."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 0.02).to(torch.bfloat16)
    flat = w.view(-1)
    specials = torch.tensor([0.0, -0.0, 1e-39, -3e-40, float("inf"), float("-inf"), float("nan"), 3e38, -2e-38,
                             1e-20, 6e4, 1.0, -1.0], dtype=torch.bfloat16)
    flat[torch.randint(0, flat.numel(), (max(1, flat.numel() // 40),), generator=g)] = specials[
        torch.randint(0, len(specials), (max(1, flat.numel() // 40),), generator=g)]
    if n > 2:   # one row of every exponent, one of zeros only
        exps = torch.arange(k) % 256
        w[1] = ((exps << 7) | (torch.arange(k) % 128)).to(torch.int16).view(torch.bfloat16)
        w[2] = 0
    return w


@pytest.mark.parametrize("shape", [(1, 64), (7, 128), (37, 896), (5, 4864), (300, 192)])
def test_pack_bf16_roundtrip_is_bit_exact(native: None, shape: tuple[int, int]) -> None:
    w = _awkward_weights(*shape, seed=shape[0])
    blob = kernels.pack_bf16(w)
    assert blob.dtype == torch.uint8 and blob.dim() == 1
    assert kernels.packed_bf16_shape(blob) == shape
    assert torch.equal(_bits(kernels.unpack_bf16(blob)), _bits(w))


def test_pack_bf16_takes_three_quarters_of_the_bytes_of_normal_weights(native: None) -> None:
    w = (torch.randn(1024, 896, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    blob = kernels.pack_bf16(w)
    assert blob.numel() < 0.76 * w.numel() * 2
    assert torch.equal(_bits(kernels.unpack_bf16(blob)), _bits(w))


def test_pack_bf16_refuses_what_it_cannot_pack(native: None) -> None:
    with pytest.raises(RuntimeError, match="multiple of 64"):
        kernels.pack_bf16(torch.zeros(4, 96, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="bfloat16"):
        kernels.pack_bf16(torch.zeros(4, 64))
    blob = kernels.pack_bf16(torch.ones(4, 64, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="size"):
        kernels.unpack_bf16(blob[:-64].clone())
    bad = blob.clone()
    bad[0] ^= 1
    with pytest.raises(RuntimeError, match="blob"):
        kernels.unpack_bf16(bad)


@pytest.mark.parametrize("path", NATIVE)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 16, 33])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_linear_bf16_packed(native: None, path: str, rows: int, with_bias: bool) -> None:
    """On the packed weights: the unpacked matrix's product. Where the rows are unpacked into scratch for
    linear_bf16's tiles (beyond the fused tiles' rows), bit for bit linear_bf16's result; the fused tiles
    (AVX-512 BF16: up to 8 rows; AVX2: 4) sum in another order: the exact product rounded once, within fp32
    summation error, escapes (huge and tiny weights) included."""
    _require(path)
    x, _, b = _data(rows, 131, 896, seed=rows)
    w = _awkward_weights(131, 896, seed=rows)
    w[~torch.isfinite(w) | (w.float().abs() > 1e5)] = 6e4   # escapes still, but finite products
    bias = b if with_bias else None
    blob = kernels.pack_bf16(w)
    out = kernels.linear_bf16_packed(x, blob, bias, path=path)
    if path == "avx512bf16" and rows <= 8:
        # vdpbf16ps takes subnormals as zero (both tiles alike): compare with them flushed
        flushed = torch.where(w.float().abs() < 2.0 ** -126, torch.zeros_like(w), w)
        _check_close(out, x, flushed, bias, compare_torch=False)
    elif rows <= 4:
        _check_close(out, x, w, bias, compare_torch=False)
    else:
        assert torch.equal(_bits(out), _bits(kernels.linear_bf16(x, w, bias, path=path)))


def test_linear_bf16_packed_batch_dims_and_fallback(native: None) -> None:
    x, w, b = _data(6, 64, 128, seed=3)
    blob = kernels.pack_bf16(w)
    out = kernels.linear_bf16_packed(x.reshape(2, 3, 128), blob, b)
    assert out.shape == (2, 3, 64)
    assert torch.equal(_bits(out.reshape(6, 64)), _bits(kernels.linear_bf16(x, w, b)))
    # float32 activations: F.linear on the unpacked weights
    assert torch.equal(kernels.linear_bf16_packed(x.float(), blob, b), F.linear(x.float(), w.float(), b.float()))
