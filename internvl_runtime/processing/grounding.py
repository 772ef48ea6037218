"""Grounding in InternVL2 answers: ``<ref>`` / ``<box>`` / ``<quad>`` tags -> boxes (and quadrilaterals).

InternVL2 is trained to answer a grounding prompt (for example "Please provide the bounding box coordinate of
the region this sentence describes: <ref>the red car</ref>") with the referring text followed by its boxes::

    <ref>the red car</ref><box>[[x1, y1, x2, y2], [x1, y1, x2, y2]]</box>

in coordinates normalised to 0-1000 of the image (the special tokens are the official ``REF_START_TOKEN`` ...
``QUAD_END_TOKEN``; a ``<quad>`` carries four corners, eight numbers). The official demo
(``streamlit_demo/app.py``: ``find_bounding_boxes``) maps a box onto the last image of the conversation as
``int(x / 1000 * width)``, ``int(y / 1000 * height)``: truncated, not clamped; :func:`parse_grounding` does the
same with ``image_size``.

Model output is never trusted to be well formed: a tag that is not closed, a box with other than four numbers,
a ``<ref>`` without a box are skipped; the parser never raises on text.

Example::

    >>> parse_grounding("<ref>cat</ref><box>[[100, 200, 500, 1000]]</box>", image_size=(640, 480))
    [Grounding(ref='cat', boxes=[[64, 96, 320, 480]], image_index=0, quads=[])]
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Grounding", "parse_grounding"]

#: The scale of the coordinates InternVL2 writes (0-1000 of the image's width and height).
COORDINATE_SCALE = 1000

_TAG_BODY = r"((?:(?!</?(?:ref|box|quad)>).)*?)"      # a tag's text, never running into another tag
_TAGS = re.compile(rf"<(ref|box|quad)>{_TAG_BODY}</\1>", re.DOTALL)
_INNERMOST_LIST = re.compile(r"\[([^\[\]]*)\]")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass
class Grounding:
    """One referred region of an answer: its text (``None`` for boxes written without a ``<ref>``), its boxes
    ``[x1, y1, x2, y2]`` (top-left, bottom-right) and quadrilaterals ``[x1, y1, ..., x4, y4]``, in 0-1000
    coordinates or in pixels of the image ``image_index`` (see :func:`parse_grounding`)."""

    ref: str | None
    boxes: list[list[float]] = field(default_factory=list)
    image_index: int | None = 0
    quads: list[list[float]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The JSON object of the server's ``grounding`` extension (``quads`` only where there are some)."""
        out: dict[str, Any] = {"ref": self.ref, "boxes": self.boxes, "image_index": self.image_index}
        if self.quads:
            out["quads"] = self.quads
        return out


def parse_grounding(text: str, image_size: tuple[int, int] | None = None, *, image_index: int | None = 0
                    ) -> list[Grounding]:
    """The grounded regions of an answer, in the order they appear.

    Args:
        text: the model's answer.
        image_size: ``(width, height)`` of the original image the answer refers to: the coordinates come back
            in its pixels, as the official demo computes them (``int(x / 1000 * width)``); without it, the raw
            0-1000 numbers the model wrote.
        image_index: which image of the request the boxes belong to, carried on each result (the server
            passes the index of the request's last image, as the official demo draws on the last image).

    A ``<box>`` or ``<quad>`` right after a ``<ref>`` (only whitespace between) belongs to it, and so do the
    ones right after those; any other is a region of its own with ``ref=None``. Boxes are the lists of four
    numbers in a ``<box>``; quads the lists of eight numbers (or of four ``[x, y]`` corners) in a ``<quad>``;
    other lists, and tags with none left, are skipped.
    """
    results: list[Grounding] = []
    pending_ref: str | None = None        # a <ref> waiting for its first box
    current: Grounding | None = None      # the region the next adjacent box still extends
    last_end = 0
    for match in _TAGS.finditer(text):
        adjacent = not text[last_end:match.start()].strip()
        last_end = match.end()
        kind, body = match.group(1), match.group(2)
        if kind == "ref":
            pending_ref, current = body.strip(), None
            continue
        boxes = _boxes(body) if kind == "box" else []
        quads = _quads(body) if kind == "quad" else []
        if not boxes and not quads:
            pending_ref, current = None, None
            continue
        if not adjacent:
            pending_ref, current = None, None
        if current is None:
            current = Grounding(ref=pending_ref, image_index=image_index)
            results.append(current)
            pending_ref = None
        current.boxes.extend(_to_pixels(box, image_size) for box in boxes)
        current.quads.extend(_to_pixels(quad, image_size) for quad in quads)
    return results


def _numbers(text: str) -> list[float]:
    """The numbers of a list's text, as ``int`` where written without a fraction."""
    return [float(n) if "." in n else int(n) for n in _NUMBER.findall(text)]


def _lists(body: str) -> list[list[float]]:
    """The innermost ``[...]`` lists of a tag's body; a body without brackets is one list."""
    inner = _INNERMOST_LIST.findall(body)
    return [_numbers(item) for item in inner] if inner or "[" in body else [_numbers(body)]


def _boxes(body: str) -> list[list[float]]:
    return [numbers for numbers in _lists(body) if len(numbers) == 4]


def _quads(body: str) -> list[list[float]]:
    lists = _lists(body)
    quads = [numbers for numbers in lists if len(numbers) == 8]
    if not quads and lists and all(len(numbers) == 2 for numbers in lists) and len(lists) % 4 == 0:
        corners = [value for numbers in lists for value in numbers]       # [[x, y], [x, y], ...] corners
        quads = [corners[i:i + 8] for i in range(0, len(corners), 8)]
    return quads


def _to_pixels(values: list[float], image_size: tuple[int, int] | None) -> list[float]:
    """``[x, y, x, y, ...]`` in 0-1000 -> pixels of ``(width, height)`` as the official demo: ``int(x / 1000 *
    width)`` (truncated toward zero, not clamped to the image)."""
    if image_size is None:
        return list(values)
    width, height = image_size
    return [int(float(v) / COORDINATE_SCALE * (width if i % 2 == 0 else height)) for i, v in enumerate(values)]
