"""The upcast plan's product (``layers.linear.upcast_linear``): float32 from 16-bit weights, widened a chunk of
output rows at a time, gives what one whole-matrix float32 product rounded to the input's dtype gives."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from internvl_runtime.models.layers import linear
from internvl_runtime.models.layers.linear import LinearPlan, planned_linear, upcast_linear


def _whole(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x.float(), w.float(), None if b is None else b.float()).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 64), (5, 64), (2, 37, 64)], ids=["1", "5", "2x37"])
def test_chunks_give_the_whole_product(monkeypatch, dtype, with_bias, shape) -> None:
    # 100 output rows of 64 inputs; chunks of 7 rows (7 x 64 x 4 bytes), the last one 2 rows
    monkeypatch.setattr(linear, "UPCAST_CHUNK_BYTES", 7 * 64 * 4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g).to(dtype)
    w = (torch.randn(100, 64, generator=g) / 8).to(dtype)
    b = torch.randn(100, generator=g).to(dtype) if with_bias else None
    out = upcast_linear(x, w, b)
    assert out.shape == (*shape[:-1], 100) and out.dtype == dtype
    torch.testing.assert_close(out, _whole(x, w, b), rtol=2 ** -7, atol=1e-3)
    # every chunk lands in its own columns: a weight row zeroed shows in its column only
    w2 = w.clone()
    w2[50] = 0
    out2 = upcast_linear(x, w2, None)
    assert torch.equal(out2[..., 50], torch.zeros_like(out2[..., 50]))
    assert torch.equal(torch.cat([out2[..., :50], out2[..., 51:]], -1),
                       torch.cat([upcast_linear(x, w, None)[..., :50], upcast_linear(x, w, None)[..., 51:]], -1))


def test_the_plan_takes_it_for_16_bit_weights_only(monkeypatch) -> None:
    monkeypatch.setattr(linear, "UPCAST_CHUNK_BYTES", 16 * 64 * 4)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 64, generator=g).bfloat16()
    w = torch.randn(40, 64, generator=g).bfloat16()
    plan = LinearPlan(upcast=True, max_kernel_rows=0)
    assert torch.equal(planned_linear(plan, x, w), upcast_linear(x, w))
    x32, w32 = x.float(), w.float()
    assert torch.equal(planned_linear(plan, x32, w32), F.linear(x32, w32))
