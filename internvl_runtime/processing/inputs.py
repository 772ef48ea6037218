"""Request -> engine input: conversation rendering, image tiling, tokenization, image spans.

This is the work the HTTP handlers (or the pipeline's caller thread) do before a request reaches the
engine loop: nothing here touches the model or the KV cache.

Conversation rules (the official ones, extended to several images and messages):
- a user message with images and no ``<image>`` in its text gets ``<image>\\n`` before its text for one
  image, or ``Image-1: <image>\\nImage-2: <image>\\n...`` for several (the model card's multi-image form);
  video frames get ``Frame1: <image>\\n...``;
- a system message replaces the template's default system message;
- every ``<image>`` of the rendered prompt is replaced in order by ``<img>`` + 256 x tiles ``<IMG_CONTEXT>``
  + ``</img>``; the run of ``<IMG_CONTEXT>`` tokens of each image is one :class:`MultiModalSpan`, hashed by
  the content of its pixel tiles so prefix caching never confuses two images.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeAlias

import torch
from PIL import Image

from ..config import InternVLConfig
from ..errors import InvalidRequest, PlaceholderMismatch
from .image import ImageSource, build_transform, dynamic_preprocess, open_image
from .spans import MultiModalSpan
from .template import IMAGE_PLACEHOLDER, IMG_CONTEXT_TOKEN, build_prompt, expand_image_placeholders, get_template
from .tokenization import Tokenizer


@dataclass
class ImageInput:
    """One image as the model sees it: its tiles and a content hash of them."""

    pixel_values: torch.Tensor          # (tiles, 3, H, W) float32
    content_hash: str

    @property
    def num_tiles(self) -> int:
        return int(self.pixel_values.shape[0])

    @classmethod
    def from_tiles(cls, pixel_values: torch.Tensor) -> ImageInput:
        data = pixel_values.detach().to("cpu", torch.float32).contiguous()
        digest = hashlib.blake2b(data.numpy().tobytes(), digest_size=16).hexdigest()
        return cls(data, digest)


#: An image of a message: a path, URL, encoded bytes or PIL image, an already tiled (tiles, 3, H, W) tensor,
#: or an ImageInput.
MessageImage: TypeAlias = ImageSource | torch.Tensor | ImageInput


@dataclass
class Message:
    """One chat message: role ('system' | 'user' | 'assistant'), text, images, and whether the images
    are video frames (which changes the automatic prefix)."""

    role: str
    text: str
    images: Sequence[MessageImage] = field(default_factory=list)
    is_video: bool = False


@dataclass
class PreparedRequest:
    """Everything the engine needs: token ids, image spans and their tiles, and the rendered prompt."""

    prompt: str
    prompt_token_ids: list[int]
    images: list[ImageInput]
    mm_spans: list[MultiModalSpan]


class HasInternVLConfig(Protocol):
    """What :meth:`InputProcessor.for_model` reads of a model: its config (``InternVLModel``, a layer above)."""

    @property
    def config(self) -> InternVLConfig: ...


class InputProcessor:
    """Turns messages (text + images) into a :class:`PreparedRequest` for one model/tokenizer."""

    def __init__(self, tokenizer: Tokenizer, *, template: str, image_size: int, num_image_token: int,
                 max_dynamic_patch: int = 12, use_thumbnail: bool = True, system_message: str | None = None,
                 max_images: int = 16, encode: Callable[[str], list[int]] | None = None) -> None:
        self.tokenizer = tokenizer
        self.encode = encode or tokenizer.encode      # the server passes a PromptEncoder's (bounded, off-thread)
        self.template = template
        self.image_size = image_size
        self.num_image_token = num_image_token
        self.max_dynamic_patch = max_dynamic_patch
        self.use_thumbnail = use_thumbnail
        self.system_message = system_message
        self.max_images = max_images
        self.transform = build_transform(image_size)
        self.img_context_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
        self.sep = get_template(template).sep
        self.sep_id = tokenizer.convert_tokens_to_ids(self.sep)

    @classmethod
    def for_model(cls, model: HasInternVLConfig, tokenizer: Tokenizer, **overrides: Any) -> InputProcessor:
        config = model.config
        kwargs: dict[str, Any] = dict(template=config.template, image_size=config.image_size,
                                      num_image_token=config.num_image_token,
                                      max_dynamic_patch=config.max_dynamic_patch, use_thumbnail=config.use_thumbnail,
                                      system_message=config.system_message)
        kwargs.update(overrides)
        return cls(tokenizer, **kwargs)

    def with_encoder(self, encode: Callable[[str], list[int]]) -> InputProcessor:
        """A copy of this processor that tokenizes prompts with ``encode``."""
        clone = copy.copy(self)
        clone.encode = encode
        return clone

    @property
    def stop_token_ids(self) -> list[int]:
        """The template separator ends an answer (as the official chat); the tokenizer's eos too."""
        ids: list[int] = []
        for token_id in (self.sep_id, self.tokenizer.eos_token_id):
            if token_id is not None and token_id not in ids:
                ids.append(token_id)
        return ids

    # -- images ----------------------------------------------------------------------------------
    def image_input(self, image: MessageImage, max_num: int | None = None) -> ImageInput:
        """A path, URL, bytes, PIL image, or an already tiled (tiles, 3, H, W) tensor -> ImageInput."""
        if isinstance(image, ImageInput):
            return image
        if isinstance(image, torch.Tensor):
            if image.dim() != 4 or tuple(image.shape[1:]) != (3, self.image_size, self.image_size):
                raise InvalidRequest(f"a tiled image tensor must be (tiles, 3, {self.image_size}, "
                                     f"{self.image_size}), got {tuple(image.shape)}")
            return ImageInput.from_tiles(image)
        max_num = self.max_dynamic_patch if max_num is None else max_num
        if not isinstance(max_num, int) or max_num < 1:
            raise InvalidRequest(f"max_dynamic_patch must be an integer >= 1, got {max_num!r}")
        pil = image if isinstance(image, Image.Image) else open_image(image)
        if pil.mode != "RGB":
            pil = pil.convert("RGB")
        tiles = dynamic_preprocess(pil, min_num=1, max_num=max_num, image_size=self.image_size,
                                   use_thumbnail=self.use_thumbnail)
        return ImageInput.from_tiles(torch.stack([self.transform(t) for t in tiles]))

    # -- conversation ----------------------------------------------------------------------------
    def prepare(self, messages: Sequence[Message], *, max_num: int | None = None) -> PreparedRequest:
        """Render, tile, tokenize. The last message must be the user's."""
        if not messages:
            raise InvalidRequest("the conversation is empty")
        system = self.system_message
        turns: list[Message] = []
        for m in messages:
            if m.role == "system":
                if m.images:
                    raise InvalidRequest("a system message cannot carry images")
                system = m.text
            elif m.role in ("user", "assistant"):
                turns.append(m)
            else:
                raise InvalidRequest(f"unknown message role {m.role!r}; use system, user or assistant")
        if not turns or turns[-1].role != "user":
            raise InvalidRequest("the last message must come from the user")
        images: list[ImageInput] = []
        num_still_images = 0   # video frames are limited by the caller's frame limit, not max_images
        history: list[tuple[str, str]] = []
        pending_user: str | None = None
        for m in turns:
            if m.role == "user":
                text = self._user_text(m)
                images.extend(self.image_input(img, max_num=1 if m.is_video else max_num) for img in m.images)
                num_still_images += 0 if m.is_video else len(m.images)
                pending_user = text if pending_user is None else pending_user + "\n" + text
            else:
                if m.images:
                    raise InvalidRequest("assistant messages cannot carry images")
                history.append((pending_user or "", m.text))
                pending_user = None
        if num_still_images > self.max_images:
            raise InvalidRequest(f"{num_still_images} images in one request; the limit is {self.max_images}")
        prompt = build_prompt(self.template, pending_user or "", history, system)
        return self.prepare_prompt(prompt, images)

    def prepare_prompt(self, prompt: str, images: Sequence[ImageInput]) -> PreparedRequest:
        """A rendered prompt with ``<image>`` placeholders plus its images, in order."""
        expanded = expand_image_placeholders(prompt, [im.num_tiles for im in images], self.num_image_token)
        ids = self.encode(expanded)
        spans = self._spans(ids, images)
        return PreparedRequest(expanded, ids, list(images), spans)

    def _user_text(self, m: Message) -> str:
        text = m.text or ""
        if not m.images or IMAGE_PLACEHOLDER in text:
            return text
        if m.is_video:
            prefix = "".join(f"Frame{i + 1}: {IMAGE_PLACEHOLDER}\n" for i in range(len(m.images)))
        elif len(m.images) == 1:
            prefix = IMAGE_PLACEHOLDER + "\n"
        else:
            prefix = "".join(f"Image-{i + 1}: {IMAGE_PLACEHOLDER}\n" for i in range(len(m.images)))
        return prefix + text

    def _spans(self, ids: list[int], images: Sequence[ImageInput]) -> list[MultiModalSpan]:
        spans, i = [], 0
        runs = []
        while i < len(ids):
            if ids[i] == self.img_context_id:
                j = i
                while j < len(ids) and ids[j] == self.img_context_id:
                    j += 1
                runs.append((i, j - i))
                i = j
            else:
                i += 1
        if len(runs) != len(images):
            raise PlaceholderMismatch(f"the tokenized prompt has {len(runs)} image token runs for {len(images)} images")
        for (offset, length), image in zip(runs, images, strict=True):
            if length != image.num_tiles * self.num_image_token:
                raise PlaceholderMismatch(f"image token run of {length} tokens for {image.num_tiles} tiles")
            spans.append(MultiModalSpan(offset, length, image.content_hash))
        return spans
