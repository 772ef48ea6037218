"""The request's tile budget: many images share it instead of meeting a small count limit."""

from __future__ import annotations

import pytest

from internvl_runtime.errors import InvalidRequest
from internvl_runtime.processing.chat_messages import ImageURL
from internvl_runtime.serving.config import ServerConfig
from internvl_runtime.serving.routes.chat import image_tile_limits

CONFIG = ServerConfig(model="m", max_tiles_per_request=64, max_tiles_per_image=12)


def images(*limits: int | None) -> list[ImageURL]:
    return [ImageURL(url="x", max_dynamic_patch=limit) for limit in limits]


def test_one_image_gets_the_model_default():
    assert image_tile_limits(images(None), None, 12, 0, CONFIG) == [12]


def test_many_images_share_the_budget():
    assert image_tile_limits(images(*[None] * 10), None, 12, 0, CONFIG) == [5] * 10    # 10 x (5 + thumbnail) <= 64
    assert image_tile_limits(images(*[None] * 32), None, 12, 0, CONFIG) == [1] * 32    # one tile each, no 400
    assert image_tile_limits(images(*[None] * 64), None, 12, 0, CONFIG) == [1] * 64


def test_video_frames_count_against_it():
    assert image_tile_limits(images(None), None, 12, 60, CONFIG) == [3]               # 4 tiles left
    with pytest.raises(InvalidRequest, match="max_tiles_per_request"):
        image_tile_limits(images(None, None), None, 12, 63, CONFIG)


def test_explicit_limits_win_and_are_bounded():
    assert image_tile_limits(images(2, None), None, 12, 0, CONFIG) == [2, 12]
    assert image_tile_limits(images(None, 1), 6, 12, 0, CONFIG) == [6, 1]               # per image over per request
    with pytest.raises(InvalidRequest, match="at most 12 tiles per image"):
        image_tile_limits(images(13), None, 12, 0, CONFIG)
    with pytest.raises(InvalidRequest, match="max_tiles_per_request"):
        image_tile_limits(images(*[12] * 5), None, 12, 0, CONFIG)                        # 5 x 13 > 64
