"""The fast image paths: the exact one bit for bit against the reference functions (serial and threaded),
and the opt-in device path within its documented bounds (docs/image_preprocessing.md)."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from internvl_runtime import AutoModel, AutoTokenizer
from internvl_runtime.errors import InvalidRequest
from internvl_runtime.processing.image import build_transform, dynamic_preprocess, load_image
from internvl_runtime.processing.image_device import device_pixel_values
from internvl_runtime.processing.image_preprocessor import ImagePreprocessor
from internvl_runtime.processing.image_tiles import normalize_tiles, pixel_table, tile_pixel_values
from internvl_runtime.processing.inputs import InputProcessor, Message
from paths import FIXTURES

TINY_1B = FIXTURES / "ckpt" / "tiny-1B"
#: One uint8 step after normalisation is 1 / 255 / std: 0.0171 to 0.0175 (docs/image_preprocessing.md).
STEP = 1 / 255 / 0.224
#: The documented bounds of the device path against the exact one.
DEVICE_MAX_STEPS = 4
DEVICE_MEAN_ABS = 2e-3
DEVICE_LOGITS_REL_ERR = 2e-3


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colour fields plus noise: every uint8 value occurs, edges and flat parts alike."""
    rng = np.random.default_rng(seed)
    coarse = (rng.random((height // 8 + 1, width // 8 + 1, 3)) * 255).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR), np.int16)
    return Image.fromarray(np.clip(smooth + rng.integers(-20, 21, smooth.shape), 0, 255).astype(np.uint8))


def reference(image: Image.Image, max_num: int, size: int = 448, use_thumbnail: bool = True) -> torch.Tensor:
    """The official steps: dynamic_preprocess, the per-tile transform, stack."""
    transform = build_transform(size)
    tiles = dynamic_preprocess(image, max_num=max_num, image_size=size, use_thumbnail=use_thumbnail)
    return torch.stack([transform(t) for t in tiles])


@pytest.fixture(scope="module")
def pool() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    with concurrent.futures.ThreadPoolExecutor(3) as executor:
        yield executor


# ------------------------------------------------------------------------------------------------ exact
def test_pixel_table_is_the_transform_on_every_value() -> None:
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)          # every value, in every channel
    channels = np.stack([values, values.T, np.roll(values, 7)], axis=-1)
    want = build_transform(16)(Image.fromarray(channels))            # 16x16: no resize, the transform alone
    table = pixel_table()
    assert table.dtype == np.float32 and table.shape == (3, 256)
    for c in range(3):
        assert torch.equal(torch.from_numpy(table[c][channels[..., c]]), want[c])


def test_normalize_tiles_matches_the_transform(pool: concurrent.futures.Executor) -> None:
    tiles = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    want = torch.stack([build_transform(32)(Image.fromarray(t)) for t in tiles])
    assert torch.equal(normalize_tiles(tiles), want)
    assert torch.equal(normalize_tiles(tiles, executor=pool), want)
    with pytest.raises(InvalidRequest):
        normalize_tiles(tiles.astype(np.int16))


@pytest.mark.parametrize(("width", "height", "max_num"), [
    (448, 448, 12), (1024, 768, 12), (1920, 1080, 12), (800, 600, 6), (33, 1000, 12), (2000, 97, 12),
    (449, 447, 1), (1000, 1000, 40),
    (835, 2448, 12), (2117, 695, 12), (29, 2013, 12),    # sizes whose resize PIL 13 runs vertical pass first
])
def test_tile_pixel_values_equal_the_reference(width: int, height: int, max_num: int,
                                               pool: concurrent.futures.Executor) -> None:
    image = photo(width, height, seed=width)
    want = reference(image, max_num)
    serial = tile_pixel_values(image, max_num=max_num, image_size=448)
    threaded = tile_pixel_values(image, max_num=max_num, image_size=448, executor=pool)
    assert torch.equal(serial.pixel_values, want)
    assert torch.equal(threaded.pixel_values, want)
    assert serial.content_hash == threaded.content_hash


def test_tile_size_224_without_thumbnail_and_other_modes() -> None:
    image = photo(700, 300).convert("L")          # not RGB: converted first, as the official code does
    want = reference(image.convert("RGB"), 6, size=224, use_thumbnail=False)
    got = tile_pixel_values(image, max_num=6, image_size=224, use_thumbnail=False)
    assert torch.equal(got.pixel_values, want)


def test_load_image_is_the_reference() -> None:
    path = FIXTURES / "data" / "img_800x600.png"
    with Image.open(path) as image:
        want = reference(image.convert("RGB"), 12)
    assert torch.equal(load_image(path, max_num=12), want)


def test_content_hash_tells_images_and_modes_apart() -> None:
    a, b = photo(640, 480, seed=1), photo(640, 480, seed=2)
    exact_a = tile_pixel_values(a, max_num=6, image_size=448)
    assert tile_pixel_values(a.copy(), max_num=6, image_size=448).content_hash == exact_a.content_hash
    assert tile_pixel_values(b, max_num=6, image_size=448).content_hash != exact_a.content_hash
    assert tile_pixel_values(a, max_num=2, image_size=448).content_hash != exact_a.content_hash
    assert device_pixel_values(a, max_num=6, image_size=448).content_hash != exact_a.content_hash


# ------------------------------------------------------------------------------------------------ device
@pytest.mark.parametrize(("width", "height"), [(448, 448), (1024, 768), (1920, 1080), (5000, 300), (120, 90),
                                               (157, 764), (315, 1180)])     # the last two: the largest measured
def test_device_path_within_documented_bounds(width: int, height: int) -> None:
    image = photo(width, height, seed=3)
    exact = tile_pixel_values(image, max_num=12, image_size=448).pixel_values
    device = device_pixel_values(image, max_num=12, image_size=448, device="cpu").pixel_values
    assert device.shape == exact.shape and device.dtype == torch.float32
    diff = (device - exact).abs()
    assert float(diff.max()) <= DEVICE_MAX_STEPS * STEP + 1e-6
    assert float(diff.mean()) <= DEVICE_MEAN_ABS
    if (width, height) == (448, 448):             # no resize at all: the same values
        assert torch.equal(device, exact)


def test_device_path_first_step_logits_within_documented_bound() -> None:
    model = AutoModel.from_pretrained(TINY_1B, torch_dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(TINY_1B)
    processor = InputProcessor.for_model(model, tokenizer)
    on_device = processor.with_images(ImagePreprocessor(processor.image_size, mode="device", device="cpu"))
    image = photo(1024, 768, seed=4)
    logits = []
    for proc in (processor, on_device):
        prepared = proc.prepare([Message("user", "Describe the image.", [image])], max_num=6)
        pixels = torch.cat([im.pixel_values for im in prepared.images])
        model.img_context_token_id = proc.img_context_id
        with torch.inference_mode():
            out = model(pixel_values=pixels, input_ids=torch.tensor(prepared.prompt_token_ids))
        logits.append(out.logits[0, -1])
    exact, device = logits
    rel = float((device - exact).norm() / exact.norm())
    assert 0 < rel <= DEVICE_LOGITS_REL_ERR            # not the same pixels, and close


def test_preprocessor_modes() -> None:
    with pytest.raises(InvalidRequest, match="exact, device"):
        ImagePreprocessor(448, mode="gpu")
    image = photo(900, 500)
    exact = ImagePreprocessor(448)(image, max_num=4)
    assert torch.equal(exact.pixel_values, reference(image, 4))
    device = ImagePreprocessor(448, mode="device", device="cpu")(image, max_num=4)
    assert device.pixel_values.shape == exact.pixel_values.shape
    assert "device on cpu" in ImagePreprocessor(448, mode="device").describe()
