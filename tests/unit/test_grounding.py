"""``parse_grounding``: InternVL2's ``<ref>``/``<box>``/``<quad>`` answers -> regions, in 0-1000 coordinates or
in pixels of the original image as the official demo maps them (``int(x / 1000 * width)``)."""

from __future__ import annotations

import pytest

from internvl_runtime import Grounding, parse_grounding


def test_one_ref_one_box_raw_and_in_pixels() -> None:
    text = "<ref>the red car</ref><box>[[100, 200, 500, 1000]]</box>"
    assert parse_grounding(text) == [Grounding(ref="the red car", boxes=[[100, 200, 500, 1000]])]
    assert parse_grounding(text, (640, 480)) == [Grounding(ref="the red car", boxes=[[64, 96, 320, 480]])]


def test_pixels_truncate_as_the_official_demo() -> None:
    # 333 / 1000 * 101 = 33.633 -> 33; 999 / 1000 * 7 = 6.993 -> 6 (truncated, not rounded); 1000 -> the edge
    [region] = parse_grounding("<ref>a</ref><box>[[333, 999, 1000, 1000]]</box>", image_size=(101, 7))
    assert region.boxes == [[33, 6, 101, 7]]
    assert all(isinstance(v, int) for v in region.boxes[0])


def test_several_refs_with_several_boxes_each() -> None:
    text = ("In the image, <ref>two dogs</ref><box>[[10, 20, 30, 40], [50, 60, 70, 80]]</box> sit next to "
            "<ref>a cat</ref> <box>[[0, 0, 1000, 500]]</box>.")
    regions = parse_grounding(text, image_size=(200, 100))
    assert [r.ref for r in regions] == ["two dogs", "a cat"]
    assert regions[0].boxes == [[2, 2, 6, 4], [10, 6, 14, 8]]
    assert regions[1].boxes == [[0, 0, 200, 50]]
    assert [r.to_json() for r in regions] == [
        {"ref": "two dogs", "boxes": [[2, 2, 6, 4], [10, 6, 14, 8]], "image_index": 0},
        {"ref": "a cat", "boxes": [[0, 0, 200, 50]], "image_index": 0}]


def test_boxes_in_consecutive_tags_belong_to_the_same_ref() -> None:
    regions = parse_grounding("<ref>cars</ref><box>[[1, 2, 3, 4]]</box>\n<box>[[5, 6, 7, 8]]</box>")
    assert regions == [Grounding(ref="cars", boxes=[[1, 2, 3, 4], [5, 6, 7, 8]])]


def test_box_without_a_ref_and_box_after_text() -> None:
    text = "<box>[[1, 2, 3, 4]]</box> and <ref>x</ref> is here: <box>[[5, 6, 7, 8]]</box>"
    # the second box is not right after its ref (text between): a region of its own, as the demo's regex
    assert parse_grounding(text) == [Grounding(ref=None, boxes=[[1, 2, 3, 4]]),
                                     Grounding(ref=None, boxes=[[5, 6, 7, 8]])]


def test_whitespace_and_fractions_are_tolerated() -> None:
    text = "<ref>  a  dog \n</ref>\n <box> [ [ 12.5 ,20, 30 , 40 ] ] </box>"
    [region] = parse_grounding(text)
    assert region.ref == "a  dog"
    assert region.boxes == [[12.5, 20, 30, 40]]
    assert parse_grounding(text, image_size=(1000, 1000))[0].boxes == [[12, 20, 30, 40]]


def test_quads() -> None:
    text = ("<ref>the sign</ref><quad>[[100, 100, 900, 120, 880, 400, 90, 380]]</quad> "
            "<quad>[[0, 0], [10, 0], [10, 10], [0, 10]]</quad>")
    [region] = parse_grounding(text, image_size=(500, 200))
    assert region.ref == "the sign"
    assert region.boxes == []
    assert region.quads == [[50, 20, 450, 24, 440, 80, 45, 76], [0, 0, 5, 0, 5, 2, 0, 2]]
    assert region.to_json()["quads"] == region.quads


def test_image_index_is_carried() -> None:
    [region] = parse_grounding("<box>[[1, 2, 3, 4]]</box>", image_index=2)
    assert region.image_index == 2
    assert parse_grounding("<box>[[1, 2, 3, 4]]</box>", image_index=None)[0].to_json()["image_index"] is None


@pytest.mark.parametrize("text", [
    "",
    "no tags at all",
    "<ref>a ref without a box</ref>",
    "<ref>a</ref><box>[[1, 2, 3]]</box>",                     # three numbers
    "<ref>a</ref><box>[[1, 2, 3, 4, 5]]</box>",               # five
    "<ref>a</ref><box>[[1, 2, 3, 4]]",                        # cut off before </box>
    "<ref>a</ref><box>[[1, 2, 3, 4</box>",                    # the list not closed
    "<box>[[a, b, c, d]]</box>",
    "<quad>[[1, 2, 3, 4]]</quad>",                            # four numbers are no quad
    "<ref>a</ref></box>[[1, 2, 3, 4]]<box>",
    "<box><box>[[1, 2, 3, 4]]</ref></box>",
    "<ref><box>[[1, 2, 3, 4]]</ref></box>",
])
def test_malformed_output_gives_no_region_and_never_raises(text: str) -> None:
    assert parse_grounding(text) == []
    assert parse_grounding(text, image_size=(10, 10)) == []


def test_malformed_parts_are_skipped_and_the_rest_kept() -> None:
    text = ("<ref>a<ref>b</ref><box>[[1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11]]</box> "
            "<ref>c</ref><box>[[1, 2]]</box><box>[[4, 3, 2, 1]]</box>")
    assert parse_grounding(text) == [Grounding(ref="b", boxes=[[1, 2, 3, 4], [8, 9, 10, 11]]),
                                     Grounding(ref=None, boxes=[[4, 3, 2, 1]])]
