"""``kernels.pack_bf16``'s blob, byte for byte, against an independent numpy writing of the format
(``csrc/packed_bf16.cpp``'s header comment), on both native packing paths (AVX2, AVX-512BW).

The reference is written from the format's description alone: each row's window [base, base + 14] is the
first of the windows with the most exponents in 1..254; a weight's code is its exponent - base inside the
window, else 15; outside the window a nonzero exponent (inf / NaN included) is an escape: sign and mantissa 0,
its column and bf16 bits listed in row order; sections 64-byte aligned, the padding zero. The rows tested
force every case: escapes above and below the window, zeros and subnormals (exponent 0, kept exactly), inf and
NaN, random bit patterns (every exponent), rows whose exponents just fit one window or just do not (the packer
takes the window directly where they fit), at the lowest and highest exponents, a constant row, K = 64 and K
large. Packing in row chunks with a
``release`` (the loader's way, reading the weight from the file's mapping) gives the same blob and tells each
row once, in order.
"""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
import torch

from internvl_runtime import kernels
from internvl_runtime.errors import UnsupportedFeature

MAGIC = 0x3231464236314642      # "BF16BF12"
PATHS = [p for p in ("avx2", "avx512") if not kernels.missing_flags(p)]


@pytest.fixture(scope="module", autouse=True)
def native() -> None:
    if os.environ.get(kernels.ENV_VAR, "").lower() == "torch" or not kernels.available():
        pytest.skip(f"no native kernels here: {kernels.describe()}")


def _align64(n: int) -> int:
    return (n + 63) // 64 * 64


def reference_pack(w: torch.Tensor) -> bytes:
    """The blob of a (N, K) bf16 matrix, written with numpy from the format's description."""
    bits = w.contiguous().view(torch.int16).numpy().view(np.uint16).astype(np.int64)
    n, k = bits.shape
    exponent = (bits >> 7) & 0xFF
    hist = np.zeros((n, 256), dtype=np.int64)
    np.add.at(hist, (np.repeat(np.arange(n), k), exponent.ravel()), 1)
    bases = np.arange(1, 241)                                   # windows [b, b + 14] within 1..254
    windows = np.stack([hist[:, b:b + 15].sum(axis=1) for b in bases], axis=1)
    base = bases[np.argmax(windows, axis=1)][:, None]           # argmax: the first of the best
    inside = (exponent >= base) & (exponent <= base + 14)
    escape = ~inside & (exponent != 0)
    code = np.where(inside, exponent - base, 15)
    sm = np.where(escape, 0, ((bits >> 8) & 0x80) | (bits & 0x7F)).astype(np.uint8)
    blocks = code.reshape(n, k // 64, 64)
    codes = (blocks[..., :32] | (blocks[..., 32:] << 4)).astype(np.uint8).reshape(n, k // 2)
    rows, cols = np.nonzero(escape)                             # row-major: each row's escapes by column
    esc_ptr = np.concatenate([[0], np.cumsum(escape.sum(axis=1))]).astype(np.int64)
    e = len(rows)
    sections = [
        (np.array([MAGIC, 1, n, k, e], dtype=np.int64).tobytes(), 64),
        (sm.tobytes(), 1), (codes.tobytes(), 1), (base.astype(np.uint8).tobytes(), 1), (esc_ptr.tobytes(), 1),
        (cols.astype(np.int32).tobytes(), 1), (bits[rows, cols].astype(np.uint16).tobytes(), 1),
    ]
    out = bytearray()
    for data, _ in sections:
        out += data
        out += bytes(_align64(len(out)) - len(out))
    return bytes(out)


def _rows_with_every_case(n: int, k: int, seed: int) -> torch.Tensor:
    """Normal rows of a few scales with zeros, subnormals, inf, NaN and escapes above and below the window."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * torch.logspace(-3, 1, n)[:, None]).to(torch.bfloat16)
    bits = w.view(torch.int16)
    for r in range(n):
        cols = torch.randperm(k, generator=g)[:min(k, 40)]
        bits[r, cols[0:4]] = 0                                       # +0
        bits[r, cols[4:6]] = -32768                                  # -0
        bits[r, cols[6:12]] = torch.randint(1, 128, (6,), generator=g, dtype=torch.int32).to(torch.int16)
        bits[r, cols[12:14]] = 0x7F80                                # +inf
        bits[r, cols[14:16]] = 0x7FC1                                # NaN
        bits[r, cols[16:20]] = torch.tensor([0x7F00, 0x7E80, 0x6000, -0x0100], dtype=torch.int16)  # huge
        bits[r, cols[20:24]] = torch.tensor([0x0080, 0x0100, 0x8180 - 0x10000, 0x0200], dtype=torch.int16)   # tiny
    return w


def _with_tiny_outliers(n: int, k: int, seed: int) -> torch.Tensor:
    """Normal rows (no specials) with three values far below the rest: the top window holds all but them."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    w.view(torch.int16)[:, 5:8] = torch.tensor([0x0180, 0x8200 - 0x10000, 0x1000], dtype=torch.int16)
    return w


def _random_bits(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-32768, 32768, (n, k), generator=g, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)


def _exponent_rows(specs: list[tuple[int, int]], k: int = 128) -> torch.Tensor:
    """One row per (lowest exponent, count): exponents lo .. lo + count - 1 in turn, random signs and mantissas
    (the window's edges: 15 exponents fit one window exactly, 16 do not; at the lowest and highest exponents)."""
    g = torch.Generator().manual_seed(7)
    rows = []
    for lo, count in specs:
        exponent = lo + torch.arange(k) % count
        rest = torch.randint(0, 256, (k,), generator=g)                 # sign << 7 | mantissa
        rows.append(((rest >> 7) << 15) | (exponent << 7) | (rest & 0x7F))
    return torch.stack(rows).to(torch.int32).to(torch.int16).view(torch.bfloat16)


def _narrow_rows_with_specials(n: int, k: int, seed: int) -> torch.Tensor:
    """Rows whose exponents fit one window (normal values, few columns), with zeros, inf and NaN among them."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g).abs() + 1).to(torch.bfloat16)  # exponents 127..129
    bits = w.view(torch.int16)
    bits[:, 3] = 0x7F80
    bits[::2, 9] = 0x7FC1
    bits[1::3, 11] = 0
    bits[:, 17] = 0x0011                                                # subnormal
    return w


def _counted_rows(specs: list[dict[int, int]], k: int = 64) -> torch.Tensor:
    """One row per {exponent: count} (counts summing to k, in turn), random signs and mantissas: rows whose top
    exponent's weights are more, as many, or fewer than those below the top window (which window wins then)."""
    g = torch.Generator().manual_seed(11)
    rows = []
    for spec in specs:
        exponent = torch.tensor([e for e, count in spec.items() for _ in range(count)])
        assert len(exponent) == k
        rest = torch.randint(0, 256, (k,), generator=g)
        rows.append(((rest >> 7) << 15) | (exponent[torch.randperm(k, generator=g)] << 7) | (rest & 0x7F))
    return torch.stack(rows).to(torch.int32).to(torch.int16).view(torch.bfloat16)


CASES = {
    "every case, K=64": lambda: _rows_with_every_case(9, 64, 0),
    "every case, K=896": lambda: _rows_with_every_case(37, 896, 1),
    "every case, K=8192": lambda: _rows_with_every_case(5, 8192, 2),
    "random bits, K=64": lambda: _random_bits(11, 64, 3),
    "random bits, K=4864": lambda: _random_bits(7, 4864, 4),
    "constant rows": lambda: torch.full((3, 128), 0.375, dtype=torch.bfloat16),
    "zeros": lambda: torch.zeros(4, 192, dtype=torch.bfloat16),
    "one row": lambda: (torch.randn(1, 320, generator=torch.Generator().manual_seed(5)) * 7).to(torch.bfloat16),
    "narrow rows with inf / NaN": lambda: _narrow_rows_with_specials(6, 128, 8),
    "window edges": lambda: _exponent_rows([(100, 15), (100, 16), (1, 15), (1, 16), (240, 15), (239, 16), (200, 1),
                                            (1, 254), (254, 1)]),
    "tiny outliers": lambda: _with_tiny_outliers(7, 896, 10),
    "top against below": lambda: _counted_rows([{150: 4, 140: 57, 130: 3}, {150: 4, 140: 56, 130: 4},
                                                {150: 4, 140: 55, 130: 5}, {150: 2, 137: 2, 136: 58, 121: 2},
                                                {150: 1, 149: 30, 120: 33}, {150: 1, 120: 30, 110: 33}]),
    # 2 exponents tie for several windows: the first window holding both wins
    "ties": lambda: torch.tensor([[1.0, 2.0 ** -20] * 32, [2.0 ** 30, 2.0 ** -30] * 32], dtype=torch.bfloat16),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", list(CASES))
def test_the_blob_is_the_reference_byte_for_byte(case: str, path: str) -> None:
    w = CASES[case]()
    blob = kernels.pack_bf16(w, path=path)
    assert blob.dtype == torch.uint8 and blob.dim() == 1
    assert bytes(blob.numpy()) == reference_pack(w)
    assert torch.equal(kernels.unpack_bf16(blob, path=path).view(torch.int16), w.view(torch.int16))


def test_the_reference_sees_escapes_exponent_zero_and_specials() -> None:
    """The cases exercise what they are meant to: escapes, exponent-0 codes and inf / NaN escapes."""
    w = CASES["every case, K=896"]()
    blob = reference_pack(w)
    e = int(np.frombuffer(blob[32:40], dtype=np.int64)[0])
    assert e >= 8 * w.shape[0]                                   # inf, NaN, huge and tiny in every row
    exponent = (w.view(torch.int16).numpy().view(np.uint16) >> 7) & 0xFF
    assert (exponent == 0).sum() >= 12 * w.shape[0] and (exponent == 255).sum() == 4 * w.shape[0]


@pytest.mark.parametrize("path", PATHS)
def test_packing_in_row_chunks_gives_the_same_blob_and_tells_each_row_once(path: str) -> None:
    w = _rows_with_every_case(50, 128, 6)
    released: list[tuple[int, int]] = []
    row_bytes = w.stride(0) * w.element_size()

    def release(rows: torch.Tensor) -> None:
        start = (rows.data_ptr() - w.data_ptr()) // row_bytes
        released.append((start, start + rows.shape[0]))

    blob = kernels.pack_bf16(w, path=path, release=release, chunk_rows=7)
    assert bytes(blob.numpy()) == reference_pack(w)
    assert released[0][0] == 0 and released[-1][1] == 50 and len(released) == 8
    assert all(a[1] == b[0] for a, b in itertools.pairwise(released))


def test_packing_and_unpacking_have_no_torch_path() -> None:
    with pytest.raises(UnsupportedFeature, match="native path"):
        kernels.pack_bf16(torch.zeros(2, 64, dtype=torch.bfloat16), path="torch")
    blob = kernels.pack_bf16(torch.zeros(2, 64, dtype=torch.bfloat16))
    with pytest.raises(UnsupportedFeature, match="native path"):
        kernels.unpack_bf16(blob, path="torch")


def test_a_bad_weight_is_refused() -> None:
    with pytest.raises(RuntimeError, match="multiple of 64"):
        kernels.pack_bf16(torch.zeros(2, 96, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="bfloat16"):
        kernels.pack_bf16(torch.zeros(2, 64))


def test_filling_rows_other_than_those_planned_is_refused() -> None:
    """The fill writes at most the escapes each row was planned with, and says so when a row changed since."""
    w = _rows_with_every_case(4, 128, 9)

    def release(rows: torch.Tensor) -> None:                           # after row 0: row 2 gets 40 more escapes
        w.view(torch.int16)[2, :40] = 0x7F80

    with pytest.raises(RuntimeError, match="row 2 has"):
        kernels.pack_bf16(w, release=release, chunk_rows=1)
