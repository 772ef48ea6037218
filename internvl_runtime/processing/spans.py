"""Where a prompt's image features go: one run of ``<IMG_CONTEXT>`` positions per image (pure Python).

The input processor records one :class:`MultiModalSpan` per image of a prepared request; the engine's
sequences carry them, the block manager hashes them into the prefix cache keys (two different images with
identical placeholder ids hash differently), and the runner writes each image's feature rows there.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MultiModalSpan:
    """Prompt positions ``[offset, offset + length)`` whose embeddings are one image's features.

    ``content_hash`` identifies the image's pixels (and tiling), e.g. a sha256 of the pixel tensor.
    """

    offset: int
    length: int
    content_hash: str

    @property
    def end(self) -> int:
        """One past the last position of the span."""
        return self.offset + self.length
