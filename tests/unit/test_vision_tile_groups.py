"""On the CPU ``extract_feature`` runs the encoder on at most ``CPU_TILES_PER_FORWARD`` tiles at a time (the
activations of a many-tile image bounded by a few tiles'), and the features are those of one batch."""

from __future__ import annotations

import pytest
import torch

from internvl_runtime import loading
from internvl_runtime.models import internvl
from paths import FIXTURES

CKPT = FIXTURES / "ckpt" / "tiny-1B"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiles_go_through_in_groups_with_the_one_batch_features(dtype: torch.dtype) -> None:
    model = loading.load_model(CKPT, dtype=dtype)
    pixels = torch.randn(5, 3, 448, 448, generator=torch.Generator().manual_seed(0)).to(dtype)
    batches: list[int] = []
    hook = model.vision_model.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    with torch.inference_mode():
        grouped = model.extract_feature(pixels)
        hook.remove()
        one_batch = model._features(pixels, torch.device("cpu"))     # all five tiles in one forward
    step = internvl.CPU_TILES_PER_FORWARD
    assert len(batches) > 1 and batches == [min(step, 5 - i) for i in range(0, 5, step)]
    assert grouped.shape == one_batch.shape == (5, model.num_image_token, model.config.llm.hidden_size)
    # each tile's rows meet the same products in either case (bit for bit at InternVL2-1B's shapes on the
    # hosts measured); a BLAS may block a smaller batch otherwise, so the test allows float rounding
    torch.testing.assert_close(grouped, one_batch)


def test_a_batch_within_one_group_is_one_forward() -> None:
    model = loading.load_model(CKPT, dtype=torch.float32)
    batches: list[int] = []
    model.vision_model.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    with torch.inference_mode():
        model.extract_feature(torch.zeros(internvl.CPU_TILES_PER_FORWARD, 3, 448, 448))
    assert batches == [internvl.CPU_TILES_PER_FORWARD]
