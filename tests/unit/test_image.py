"""Image preprocessing: pixel-exact against the official goldens, tiling rules, inputs and bad input."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image

from internvl_runtime.errors import ImageDecodeError, InvalidRequest
from internvl_runtime.processing.image import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_transform,
    candidate_grids,
    count_tiles,
    dynamic_preprocess,
    find_closest_aspect_ratio,
    load_image,
    open_image,
    select_grid,
)
from paths import FIXTURES

VARIANTS = ["tiny-1B", "tiny-2B", "tiny-4B", "tiny-8B", "tiny-26B", "tiny-40B", "tiny-76B"]


# --------------------------------------------------------------------------------------------------
# Goldens
# --------------------------------------------------------------------------------------------------


@functools.cache
def _official_tiles(path: str, input_size: int, max_num: int) -> np.ndarray:
    return load_image(path, input_size=input_size, max_num=max_num).numpy()


def _ref_path(fixtures: Path, ref: str) -> Path:
    if ref.startswith("frame:"):
        return fixtures / "data" / f"frame_{int(ref.split(':')[1]):03d}.png"
    return fixtures / "data" / f"{ref}.png"


@pytest.mark.parametrize("variant", VARIANTS)
def test_pixel_values_match_official_sha256(variant: str) -> None:
    fixtures = FIXTURES
    cases = {c["id"]: c for c in json.loads((fixtures / "cases.json").read_text())["cases"]}
    golden_files = sorted((fixtures / "goldens" / variant).glob("*.json"))
    assert golden_files, f"no goldens for {variant}"
    checked, mismatches = 0, []
    for golden_file in golden_files:
        golden = json.loads(golden_file.read_text())
        expected = golden.get("pixel_values")
        if not expected:  # text-only cases
            continue
        case = cases[golden["id"]]
        items = case.get("images") or case.get("items")
        size = golden["input_size"]
        parts = [_official_tiles(str(_ref_path(fixtures, it["ref"])), size, it["max_num"]) for it in items]
        # Several images: the official pixel_values is the concatenation of each load_image output.
        pixel_values = np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)
        counts = [p.shape[0] for p in parts]
        expected_counts = golden.get("image_tile_counts") or golden["num_patches_list_arg"]
        predicted_counts = []
        for it in items:
            with Image.open(_ref_path(fixtures, it["ref"])) as im:
                w, h = im.size
            predicted_counts.append(
                count_tiles(w, h, min_num=1, max_num=it["max_num"], use_thumbnail=True, image_size=size)
            )
        digest = hashlib.sha256(pixel_values.tobytes()).hexdigest()
        if (
            digest != expected["sha256"]
            or list(pixel_values.shape) != expected["shape"]
            or counts != expected_counts
            or predicted_counts != expected_counts
        ):
            mismatches.append((golden["id"], pixel_values.shape, counts, predicted_counts, expected_counts))
        assert abs(float(pixel_values.sum(dtype=np.float64)) - expected["sum"]) <= 1e-6 * expected["abs_sum"]
        checked += 1
    assert not mismatches, mismatches
    assert checked >= 12, f"only {checked} image cases checked for {variant}"


def test_tiny_2b_uses_224_and_its_tie_rule() -> None:
    # 448x448 at tile size 224: (1,1), (2,2), (3,3) tie; the area rule takes (2,2) but not (3,3).
    assert select_grid(448, 448, max_num=12, image_size=224) == (2, 2)
    assert count_tiles(448, 448, min_num=1, max_num=12, use_thumbnail=True, image_size=224) == 5
    # ... at tile size 448 the image is too small for (2,2): a single tile, no thumbnail.
    assert select_grid(448, 448, max_num=12, image_size=448) == (1, 1)
    assert count_tiles(448, 448, min_num=1, max_num=12, use_thumbnail=True, image_size=448) == 1


# --------------------------------------------------------------------------------------------------
# Transform
# --------------------------------------------------------------------------------------------------


def _reference_transform(image: Image.Image, size: int) -> np.ndarray:
    """ToTensor + Normalize with numpy float32 arithmetic (IEEE, so bit-identical to torch on CPU)."""
    rgb = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    x = np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)[:, None, None]
    std = np.asarray(IMAGENET_STD, dtype=np.float32)[:, None, None]
    return (x - mean) / std


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "CMYK"])
def test_transform_is_bit_exact(mode: str) -> None:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8), "RGB").convert(mode)
    out = build_transform(32)(image)
    assert out.dtype == torch.float32 and out.shape == (3, 32, 32) and out.is_contiguous()
    np.testing.assert_array_equal(out.numpy(), _reference_transform(image, 32))
    same_size = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), "RGB")
    np.testing.assert_array_equal(build_transform(32)(same_size).numpy(), _reference_transform(same_size, 32))


def test_transform_rejects_bad_size() -> None:
    with pytest.raises(InvalidRequest, match="input_size"):
        build_transform(0)


# --------------------------------------------------------------------------------------------------
# Tiling
# --------------------------------------------------------------------------------------------------


def test_candidate_grids_sorted_by_area() -> None:
    grids = candidate_grids(1, 12)
    areas = [c * r for c, r in grids]
    assert areas == sorted(areas)
    assert set(grids) == {(c, r) for c in range(1, 13) for r in range(1, 13) if 1 <= c * r <= 12}
    assert len(grids) == len(set(grids))
    assert set(candidate_grids(3, 4)) == {(1, 3), (3, 1), (1, 4), (4, 1), (2, 2)}
    with pytest.raises(InvalidRequest, match="max_num"):
        candidate_grids(1, 0)
    with pytest.raises(InvalidRequest, match="min_num"):
        candidate_grids(5, 4)


def test_find_closest_aspect_ratio_tie_rule() -> None:
    ratios = [(1, 1), (2, 2)]
    # Equal distance: the later grid wins only if area > 0.5 * size^2 * cols * rows.
    assert find_closest_aspect_ratio(1.0, ratios, 100, 100, 10) == (2, 2)  # 10000 > 200
    assert find_closest_aspect_ratio(1.0, ratios, 10, 10, 10) == (1, 1)  # 100 > 200 is false
    assert find_closest_aspect_ratio(1.0, ratios, 20, 10, 10) == (1, 1)  # 200 > 200 is false
    assert find_closest_aspect_ratio(2.0, [(1, 1), (2, 1), (4, 2)], 10, 5, 100) == (2, 1)
    assert find_closest_aspect_ratio(1.0, [], 10, 10, 10) == (1, 1)


@pytest.mark.parametrize(
    ("size", "max_num", "grid"),
    [
        ((800, 600), 12, (4, 3)),
        ((800, 600), 1, (1, 1)),
        ((300, 1200), 6, (1, 4)),
        ((2000, 500), 12, (4, 1)),
        ((500, 400), 6, (1, 1)),
        ((640, 427), 6, (3, 2)),
    ],
)
def test_select_grid_known_images(size: tuple[int, int], max_num: int, grid: tuple[int, int]) -> None:
    assert select_grid(*size, max_num=max_num) == grid


def test_dynamic_preprocess_row_major_and_thumbnail() -> None:
    s = 8
    cells = np.zeros((2 * s, 3 * s, 3), dtype=np.uint8)
    colours = {}
    for r in range(2):
        for c in range(3):
            colours[(c, r)] = (40 * (c + 1), 100 * r, 7)
            cells[r * s : (r + 1) * s, c * s : (c + 1) * s] = colours[(c, r)]
    image = Image.fromarray(cells, "RGB")  # already 3s x 2s: the resize is the identity
    tiles = dynamic_preprocess(image, max_num=6, image_size=s, use_thumbnail=True)
    assert len(tiles) == 7
    order = [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)]
    for tile, cell in zip(tiles[:-1], order, strict=True):     # the last tile is the thumbnail
        assert tile.size == (s, s)
        assert np.all(np.asarray(tile) == np.asarray(colours[cell], dtype=np.uint8))
    assert tiles[-1].size == (s, s)
    np.testing.assert_array_equal(np.asarray(tiles[-1]), np.asarray(image.resize((s, s), Image.Resampling.BICUBIC)))
    # A single tile never gets a thumbnail.
    assert len(dynamic_preprocess(image, max_num=1, image_size=s, use_thumbnail=True)) == 1
    assert len(dynamic_preprocess(image, max_num=6, image_size=s, use_thumbnail=False)) == 6


def test_dynamic_preprocess_resizes_with_bicubic() -> None:
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8), "RGB")
    tiles = dynamic_preprocess(image, max_num=4, image_size=16)
    resized = image.resize((32, 16), Image.Resampling.BICUBIC)
    assert len(tiles) == 2
    np.testing.assert_array_equal(np.asarray(tiles[0]), np.asarray(resized.crop((0, 0, 16, 16))))
    np.testing.assert_array_equal(np.asarray(tiles[1]), np.asarray(resized.crop((16, 0, 32, 16))))


@pytest.mark.parametrize("use_thumbnail", [False, True])
def test_count_tiles_agrees_with_dynamic_preprocess(use_thumbnail: bool) -> None:
    size = 4
    for w, h in [(1, 1), (4, 4), (8, 8), (9, 8), (3, 30), (30, 3), (17, 5), (40, 40), (6, 13), (100, 7)]:
        image = Image.new("RGB", (w, h))
        for min_num, max_num in [(1, 1), (1, 6), (1, 12), (2, 6), (3, 9)]:
            tiles = dynamic_preprocess(image, min_num, max_num, size, use_thumbnail)
            n = count_tiles(w, h, min_num=min_num, max_num=max_num, use_thumbnail=use_thumbnail, image_size=size)
            assert n == len(tiles), (w, h, min_num, max_num)


def test_count_tiles_rejects_bad_arguments() -> None:
    with pytest.raises(InvalidRequest, match="max_num"):
        count_tiles(10, 10, min_num=1, max_num=0, use_thumbnail=True)
    with pytest.raises(ImageDecodeError, match="empty"):
        count_tiles(0, 10, min_num=1, max_num=6, use_thumbnail=True)


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------


def _png_bytes(w: int = 60, h: int = 40, mode: str = "RGB", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB").convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: ClassVar[dict[str, tuple[int, bytes]]] = {}     # path -> (status, body); each fixture subclasses

    def do_GET(self) -> None:  # http.server's naming
        status, body = self.routes.get(self.path, (404, b"not found"))
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # keep the test output clean
        pass


@pytest.fixture()
def http_server() -> Iterator[tuple[str, dict[str, tuple[int, bytes]]]]:
    routes: dict[str, tuple[int, bytes]] = {}
    handler = type("Handler", (_Handler,), {"routes": routes})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", routes
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_load_image_accepts_every_input_kind(
    tmp_path: Path, http_server: tuple[str, dict[str, tuple[int, bytes]]]
) -> None:
    data = _png_bytes()
    path = tmp_path / "a.png"
    path.write_bytes(data)
    base, routes = http_server
    routes["/a.png"] = (200, data)
    with Image.open(path) as im:
        pil = im.copy()
    import base64

    data_url = "data:image/png;base64," + base64.b64encode(data).decode()
    reference = load_image(str(path), input_size=16, max_num=6)
    assert reference.shape == (7, 3, 16, 16)  # 60x40 -> (3,2) grid + thumbnail
    for source in (path, data, bytearray(data), pil, f"{base}/a.png", data_url):
        torch.testing.assert_close(load_image(source, input_size=16, max_num=6), reference, rtol=0, atol=0)
    assert pil.mode == "RGB" and pil.size == (60, 40)  # the caller's image is untouched


def test_load_image_converts_modes_like_official(tmp_path: Path) -> None:
    for mode in ("L", "RGBA", "P"):
        data = _png_bytes(mode=mode)
        with Image.open(io.BytesIO(data)) as im:
            expected = im.convert("RGB")
        out = load_image(data, input_size=20, max_num=1)
        np.testing.assert_array_equal(out[0].numpy(), _reference_transform(expected, 20))


def test_url_errors(http_server: tuple[str, dict[str, tuple[int, bytes]]]) -> None:
    base, routes = http_server
    routes["/big.png"] = (200, _png_bytes(200, 200))
    routes["/text"] = (200, b"hello")
    with pytest.raises(ImageDecodeError, match=r"missing\.png: HTTP 404"):
        load_image(f"{base}/missing.png")
    with pytest.raises(ImageDecodeError, match="too large to download"):
        load_image(f"{base}/big.png", max_bytes=100)
    with pytest.raises(ImageDecodeError, match="not a recognised image") as info:
        load_image(f"{base}/text")
    assert f"{base}/text" in str(info.value)
    with pytest.raises(InvalidRequest, match="unsupported URL scheme"):
        load_image("ftp://example.com/a.png")
    with pytest.raises(ImageDecodeError, match="malformed data URL"):
        load_image("data:image/png;base64")


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


def test_missing_file_and_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nope.png"
    with pytest.raises(ImageDecodeError, match="no such file") as info:
        load_image(missing)
    assert str(missing) in str(info.value)
    with pytest.raises(ImageDecodeError, match="directory"):
        load_image(tmp_path)


def test_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("this is not an image")
    with pytest.raises(ImageDecodeError, match="not a recognised image format") as info:
        load_image(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, InvalidRequest)
    with pytest.raises(ImageDecodeError):
        load_image(b"")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image(tmp_path: Path, fmt: str) -> None:
    rng = np.random.default_rng(3)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "RGB").save(buffer, format=fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageDecodeError, match="cannot decode image") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_zero_size_image() -> None:
    with pytest.raises(ImageDecodeError, match="empty"):
        load_image(Image.new("RGB", (0, 5)))
    with pytest.raises(ImageDecodeError, match="empty"):
        dynamic_preprocess(Image.new("RGB", (5, 0)))


def test_decompression_bomb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_bytes(60, 40))  # 2400 pixels
    # Over twice the limit: PIL raises DecompressionBombError.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageDecodeError, match="too large") as info:
        load_image(path)
    assert str(path) in str(info.value)
    # Between the limit and twice it PIL only warns: pytest turns that warning into an exception...
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)
    with pytest.raises(ImageDecodeError, match="too large"):
        load_image(path)
    # ... and where warnings are ignored, our own check still refuses it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ImageDecodeError, match="decompression-bomb limit"):
            load_image(path)


def test_max_pixels_guard(tmp_path: Path) -> None:
    data = _png_bytes(60, 40)
    with pytest.raises(ImageDecodeError, match=r"too large.*2400 pixels"):
        load_image(data, max_pixels=2399)
    assert load_image(data, input_size=8, max_pixels=2400).shape[1:] == (3, 8, 8)
    with pytest.raises(ImageDecodeError, match="too large"):
        open_image(Image.new("RGB", (60, 40)), max_pixels=100)
    with pytest.raises(InvalidRequest, match="max_pixels"):
        load_image(data, max_pixels=0)


def test_bad_arguments() -> None:
    data = _png_bytes()
    with pytest.raises(InvalidRequest, match="max_num"):
        load_image(data, max_num=0)
    with pytest.raises(InvalidRequest, match="input_size"):
        load_image(data, input_size=0)
    with pytest.raises(InvalidRequest, match="unsupported image input"):
        load_image(12345)  # type: ignore[arg-type]
