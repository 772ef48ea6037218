"""The OpenAI chat message models, parsed in one place for the server and the offline pipeline.

A message is ``{"role": ..., "content": "text" | [parts]}`` with parts ``{"type": "text"}``,
``{"type": "image_url", "image_url": {"url": ...} | "url"}`` and ``{"type": "video_url", "video_url": {"url":
..., "num_segments": N}}``; assistant messages may carry ``tool_calls`` (and no content), ``tool`` messages
carry a tool's result for ``tool_call_id``. Models are :class:`LenientModel` s: ``null`` is the default, unknown
fields (``refusal``, ``cache_control``, ...) are accepted and logged once, types stay strict. LMDeploy's
``image_url.max_dynamic_patch`` sets one image's tile limit. The offline pipeline also takes LMDeploy's
``{"type": "image", "image": <path, URL, bytes or PIL image>}`` parts (:class:`PipelineMessage`); the server
does not.

Example::

    message = ChatMessage.model_validate({"role": "user", "content": [{"type": "text", "text": "hi"}]})
    message.text(), message.image_urls(), message.video()
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from .lenient_model import LenientModel

__all__ = ["ChatMessage", "ContentPart", "ImagePart", "ImageURL", "ObjectImagePart", "PipelineMessage", "TextPart",
           "ToolCallFunction", "ToolCallIn", "VideoPart", "VideoURL"]


class TextPart(LenientModel):
    """``{"type": "text", "text": "..."}``"""

    type: Literal["text"]
    text: str


class ImageURL(LenientModel):
    """An image: ``data:image/...;base64,...``, ``http(s)://...``, or ``file://`` / a path under the
    server's allowed local folder. ``detail`` is accepted and ignored (tiling follows max_dynamic_patch);
    ``max_dynamic_patch`` (LMDeploy's) caps this image's tiles."""

    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None
    max_dynamic_patch: int | None = Field(default=None, ge=1)


class ImagePart(LenientModel):
    """``{"type": "image_url", "image_url": {"url": "..."}}``"""

    type: Literal["image_url"]
    image_url: ImageURL

    @field_validator("image_url", mode="before")
    @classmethod
    def _bare_url(cls, value: Any) -> Any:
        """A bare string is the URL (as several clients send it)."""
        return {"url": value} if isinstance(value, str) else value


class VideoURL(LenientModel):
    """A video, from the same sources as an image; ``num_segments`` frames are sampled as the official
    ``load_video`` does (one tile each, ``Frame1: <image>`` prompt)."""

    url: str = Field(min_length=1)
    num_segments: int | None = Field(default=None, ge=1)


class VideoPart(LenientModel):
    """``{"type": "video_url", "video_url": {"url": "...", "num_segments": 8}}``"""

    type: Literal["video_url"]
    video_url: VideoURL


ContentPart = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class ToolCallFunction(LenientModel):
    """The function of an assistant's tool call: its name and its arguments as a JSON text (an object is
    accepted too, as some clients send one, and kept as its JSON text)."""

    name: str = Field(min_length=1)
    arguments: str = "{}"

    @field_validator("arguments", mode="before")
    @classmethod
    def _object_arguments(cls, value: Any) -> Any:
        return json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else value


class ToolCallIn(LenientModel):
    """One tool call of an assistant message in the history."""

    id: str = ""
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(LenientModel):
    """One message. ``developer`` is OpenAI's newer name for ``system``; ``tool`` carries a tool's result."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    #: An earlier answer's reasoning (this server's harmony answers send it): known, so that the history a client
    #: sends back is no unknown field, and not rendered (harmony drops past turns' analysis).
    reasoning_content: str | None = None

    @model_validator(mode="after")
    def _check(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        if self.content is None and self.role == "assistant" and not self.tool_calls:
            self.content = ""
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"only assistant messages may carry tool_calls, not {self.role} messages")
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
        return [image.url for image in self.image_parts()]

    def image_parts(self) -> list[ImageURL]:
        """The message's images in order, with their options (``max_dynamic_patch``)."""
        if not isinstance(self.content, list):
            return []
        return [p.image_url for p in self.content if isinstance(p, ImagePart)]

    def video(self) -> VideoURL | None:
        if not isinstance(self.content, list):
            return None
        return next((p.video_url for p in self.content if isinstance(p, VideoPart)), None)


class ObjectImagePart(LenientModel):
    """LMDeploy's ``{"type": "image", "image": <path, URL, bytes or PIL image>}`` (the pipeline only)."""

    model_config = ConfigDict(strict=True, extra="ignore", arbitrary_types_allowed=True)

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
