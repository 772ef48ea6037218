"""The OpenAI chat message models, parsed in one place for the server and the offline pipeline.

A message is ``{"role": ..., "content": "text" | [parts]}`` with parts ``{"type": "text"}``,
``{"type": "image_url", "image_url": {"url": ...}}`` and ``{"type": "video_url", "video_url": {"url": ...,
"num_segments": N}}``. Parsing is strict (``"5"`` is not an integer) and unknown fields are refused, so a
typo is an error naming the field. The offline pipeline also takes LMDeploy's ``{"type": "image",
"image": <path, URL, bytes or PIL image>}`` parts (:class:`PipelineMessage`); the server does not.

Example::

    message = ChatMessage.model_validate({"role": "user", "content": [{"type": "text", "text": "hi"}]})
    message.text(), message.image_urls(), message.video()
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["ChatMessage", "ContentPart", "ImagePart", "ImageURL", "ObjectImagePart", "PipelineMessage", "TextPart",
           "VideoPart", "VideoURL"]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class TextPart(_Strict):
    """``{"type": "text", "text": "..."}``"""

    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    """An image: ``data:image/...;base64,...``, ``http(s)://...``, or ``file://`` / a path under the
    server's allowed local folder. ``detail`` is accepted and ignored (tiling follows max_dynamic_patch)."""

    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Strict):
    """``{"type": "image_url", "image_url": {"url": "..."}}``"""

    type: Literal["image_url"]
    image_url: ImageURL


class VideoURL(_Strict):
    """A video, from the same sources as an image; ``num_segments`` frames are sampled as the official
    ``load_video`` does (one tile each, ``Frame1: <image>`` prompt)."""

    url: str = Field(min_length=1)
    num_segments: int | None = Field(default=None, ge=1)


class VideoPart(_Strict):
    """``{"type": "video_url", "video_url": {"url": "...", "num_segments": 8}}``"""

    type: Literal["video_url"]
    video_url: VideoURL


ContentPart = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class ChatMessage(_Strict):
    """One message. ``developer`` is OpenAI's newer name for ``system``."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _check(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        if self.role != "user" and isinstance(self.content, list) \
                and any(isinstance(p, (ImagePart, VideoPart)) for p in self.content):
            raise ValueError(f"only user messages may carry images or videos, not {self.role} messages")
        if isinstance(self.content, list):
            videos = sum(isinstance(p, VideoPart) for p in self.content)
            if videos > 1 or (videos and any(isinstance(p, ImagePart) for p in self.content)):
                raise ValueError("a message may carry one video and no images beside it")
        return self

    def text(self) -> str:
        """The text parts, joined by newlines."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text for p in self.content if isinstance(p, TextPart))

    def image_urls(self) -> list[str]:
        if not isinstance(self.content, list):
            return []
        return [p.image_url.url for p in self.content if isinstance(p, ImagePart)]

    def video(self) -> VideoURL | None:
        if not isinstance(self.content, list):
            return None
        return next((p.video_url for p in self.content if isinstance(p, VideoPart)), None)


class ObjectImagePart(_Strict):
    """LMDeploy's ``{"type": "image", "image": <path, URL, bytes or PIL image>}`` (the pipeline only)."""

    model_config = ConfigDict(strict=True, extra="forbid", arbitrary_types_allowed=True)

    type: Literal["image"]
    image: Any


PipelineContentPart = Annotated[TextPart | ImagePart | VideoPart | ObjectImagePart, Field(discriminator="type")]


class PipelineMessage(ChatMessage):
    """A message as the offline pipeline takes it: the server's, plus :class:`ObjectImagePart` parts."""

    content: str | list[PipelineContentPart] | None = None  # type: ignore[assignment]

    def images(self) -> list[Any]:
        """The message's images in order: image URLs as given, image objects as they are."""
        if not isinstance(self.content, list):
            return []
        return [p.image_url.url if isinstance(p, ImagePart) else p.image for p in self.content
                if isinstance(p, (ImagePart, ObjectImagePart))]
