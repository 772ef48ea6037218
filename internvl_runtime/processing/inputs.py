"""Request -> engine input: conversation rendering, image tiling, tokenization, image spans.

This is the work the HTTP handlers (or the pipeline's caller thread) do before a request reaches the
engine loop: nothing here touches the model or the KV cache.

Conversation rules (the official ones, extended to several images and messages):
- a user message with images and no ``<image>`` in its text gets ``<image>\\n`` before its text for one
  image, or ``Image-1: <image>\\nImage-2: <image>\\n...`` for several (the model card's multi-image form);
  video frames get ``Frame1: <image>\\n...``;
- ``<IMAGE_TOKEN>`` (LMDeploy's placeholder) in a message with images marks where they go, as ``<image>`` does;
- a system message replaces the template's default system message;
- tools, assistant tool calls and tool results are written in the template's tool format
  (``tool_calls.py``); a final assistant message can be continued (prefill); a harmony template's (GPT-OSS)
  earlier answers sent back as plain text are final-channel messages (``harmony_tools.history_answer``);
- a Jinja chat template (``chat_template.py``), when given, renders instead of the official template; an
  HF-format checkpoint (transformers' native InternVL) has no official template and renders with the chat
  template of its folder, where several images are each ``<image>\n`` in order, unnumbered (its template
  writes one ``<IMG_CONTEXT>\n`` per image part; transformers' processor expands each as we expand
  ``<image>``);
- an image may carry its own tile limit (``ImageWithTiles``: LMDeploy's per-image ``max_dynamic_patch``);
- every ``<image>`` of the rendered prompt is replaced in order by ``<img>`` + 256 x tiles ``<IMG_CONTEXT>``
  + ``</img>``; the run of ``<IMG_CONTEXT>`` tokens of each image is one :class:`MultiModalSpan`, hashed by
  the content of its pixel tiles so prefix caching never confuses two images.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeAlias

import torch
from PIL import Image

from ..config import InternVLConfig
from ..errors import ConfigError, InvalidRequest, PlaceholderMismatch
from . import hf_video
from .chat_template import ChatTemplate
from .harmony import answers_in_harmony, uses_harmony
from .harmony_tools import history_answer
from .image import ImageSource, open_image
from .image_preprocessor import ImagePreprocessor
from .spans import MultiModalSpan
from .template import (
    IMAGE_PLACEHOLDER,
    IMG_CONTEXT_TOKEN,
    LMDEPLOY_IMAGE_TOKEN,
    expand_image_placeholders,
    get_template,
    render_turns,
)
from .tokenization import Tokenizer
from .tool_calls import FORMATS, ToolCall, ToolCallFormat, ToolPlan, ToolResult, plan_tools
from .video import FrameRule, get_index


@dataclass
class ImageInput:
    """One image as the model sees it: its tiles and a content hash of them."""

    pixel_values: torch.Tensor          # (tiles, 3, H, W) float32; on the CPU unless --image-preprocess device
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


@dataclass(frozen=True)
class ImageWithTiles:
    """An image with its own tile limit (LMDeploy's per-image ``max_dynamic_patch``), which wins over the
    request's."""

    image: ImageSource | torch.Tensor | ImageInput
    max_dynamic_patch: int


@dataclass
class Message:
    """One chat message.

    Attributes:
        role: 'system', 'user', 'assistant' or 'tool' (a tool result).
        text: the message's text (a tool result's content).
        images: the user's images (``ImageWithTiles`` for a per-image tile limit).
        is_video: the images are video frames (which changes the automatic prefix; one tile each).
        tool_calls: an assistant message's calls (its text may then be empty).
        tool_call_id: the call a tool result answers.
        name: a tool result's function name.
    """

    role: str
    text: str
    images: Sequence[MessageImage | ImageWithTiles] = field(default_factory=list)
    is_video: bool = False
    tool_calls: Sequence[ToolCall] = ()
    tool_call_id: str | None = None
    name: str | None = None


@dataclass
class PreparedRequest:
    """Everything the engine needs: token ids, image spans and their tiles, and the rendered prompt."""

    prompt: str
    prompt_token_ids: list[int]
    images: list[ImageInput]
    mm_spans: list[MultiModalSpan]
    tool_plan: ToolPlan | None = None      # the request's tools: how to parse the answer, what to force


class HasInternVLConfig(Protocol):
    """What :meth:`InputProcessor.for_model` reads of a model: its config (``InternVLModel``, a layer above)."""

    @property
    def config(self) -> InternVLConfig: ...


class InputProcessor:
    """Turns messages (text + images) into a :class:`PreparedRequest` for one model/tokenizer."""

    def __init__(self, tokenizer: Tokenizer, *, template: str | None, image_size: int, num_image_token: int,
                 max_dynamic_patch: int = 12, use_thumbnail: bool = True, system_message: str | None = None,
                 max_images: int = 16, encode: Callable[[str], list[int]] | None = None,
                 chat_template: ChatTemplate | None = None, images: ImagePreprocessor | None = None,
                 numbered_images: bool = True, image_token_id: int | None = None, hf_video: bool = False,
                 extra_stop_token_ids: Sequence[int] = (), llm_architecture: str | None = None) -> None:
        """``template``: the official template's name (None: an HF-format checkpoint, which needs
        ``chat_template``); ``chat_template``: a Jinja template used instead of the official one
        (``--chat-template``, or an HF-format folder's own); ``images``: how images become tiles (default: the
        exact path on the calling thread); ``numbered_images``: several images of a message get the official
        ``Image-1: <image>\\n`` prefix (False: ``<image>\\n`` each, the HF format's); ``image_token_id``: the
        checkpoint's own id of ``<IMG_CONTEXT>`` (the HF format's config.json), checked against the tokenizer's;
        ``hf_video``: video frames become tiles as transformers' InternVL video processor makes them
        (``hf_video.frame_pixels``: an HF-format folder); ``extra_stop_token_ids``: more ids that end an answer
        (an HF-format folder's generation_config.json eos ids, where transformers' ``generate`` stops);
        ``llm_architecture``: the decoder's architecture string (with the template it decides
        ``harmony_answers``: ``harmony.answers_in_harmony``)."""
        if template is None and chat_template is None:
            raise ConfigError("a checkpoint without an official conversation template needs a chat template")
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.encode = encode or tokenizer.encode      # the server passes a PromptEncoder's (bounded, off-thread)
        self.template = template
        #: whether answers are harmony messages, for the server to parse (GPT-OSS in either format)
        self.harmony_answers = answers_in_harmony(template, llm_architecture)
        self.image_size = image_size
        self.num_image_token = num_image_token
        self.max_dynamic_patch = max_dynamic_patch
        self.use_thumbnail = use_thumbnail
        self.system_message = system_message
        self.max_images = max_images
        self.images = images or ImagePreprocessor(image_size, use_thumbnail=use_thumbnail)
        self.numbered_images = numbered_images
        self.hf_video = hf_video
        self.extra_stop_token_ids = tuple(extra_stop_token_ids)
        self.img_context_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
        if image_token_id is not None and image_token_id != self.img_context_id:
            raise ConfigError(f"the checkpoint's image_token_id is {image_token_id} but the tokenizer's "
                              f"{IMG_CONTEXT_TOKEN} is {self.img_context_id}")
        # the official template's separator ends an answer; an HF-format checkpoint's answers end at its eos
        self.sep: str | None = get_template(template).stop_str if template is not None else None
        self.sep_id: int | None = tokenizer.convert_tokens_to_ids(self.sep) if self.sep is not None else None

    @classmethod
    def for_model(cls, model: HasInternVLConfig, tokenizer: Tokenizer, **overrides: Any) -> InputProcessor:
        config = model.config
        kwargs: dict[str, Any] = dict(template=config.template, image_size=config.image_size,
                                      num_image_token=config.num_image_token,
                                      max_dynamic_patch=config.max_dynamic_patch, use_thumbnail=config.use_thumbnail,
                                      system_message=config.system_message, llm_architecture=config.llm.architecture)
        if config.chat_template is not None:        # the HF format: its folder's template, its image prefix
            kwargs.update(chat_template=ChatTemplate(config.chat_template, origin=f"{config.source}'s chat template"),
                          numbered_images=False, image_token_id=config.image_token_id,
                          hf_video=config.checkpoint_format == "hf",
                          extra_stop_token_ids=config.generation_eos_token_ids)
        kwargs.update(overrides)
        return cls(tokenizer, **kwargs)

    def with_encoder(self, encode: Callable[[str], list[int]]) -> InputProcessor:
        """A copy of this processor that tokenizes prompts with ``encode``."""
        clone = copy.copy(self)
        clone.encode = encode
        return clone

    def with_images(self, images: ImagePreprocessor) -> InputProcessor:
        """A copy of this processor that tiles images with ``images`` (mode, device, threads)."""
        assert (images.image_size, images.use_thumbnail) == (self.image_size, self.use_thumbnail), \
            "the image preprocessor must make this model's tiles"
        clone = copy.copy(self)
        clone.images = images
        return clone

    def with_chat_template(self, chat_template: ChatTemplate | None) -> InputProcessor:
        """A copy of this processor that renders with ``chat_template`` (None: the official template)."""
        if chat_template is None and self.template is None:
            raise ConfigError("this checkpoint has no official conversation template: it needs a chat template")
        clone = copy.copy(self)
        clone.chat_template = chat_template
        return clone

    @property
    def video_frame_rule(self) -> FrameRule:
        """Which frames of a clip this checkpoint is given: transformers' choice for an HF-format folder
        (``hf_video.frame_indices``), else the official ``load_video``'s (``video.get_index``)."""
        return hf_video.frame_indices if self.hf_video else get_index

    @property
    def tool_format(self) -> ToolCallFormat | None:
        """The checkpoint template's tool-call format (None for a template without one)."""
        return FORMATS.get(self.template) if self.template is not None else None

    @property
    def stop_token_ids(self) -> list[int]:
        """The template separator ends an answer (as the official chat); the tokenizer's eos too, and an
        HF-format folder's generation_config.json eos ids (as transformers' ``generate``)."""
        ids: list[int] = []
        for token_id in (self.sep_id, self.tokenizer.eos_token_id, *self.extra_stop_token_ids):
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
            given = ImageInput.from_tiles(image)
            if self.images.mode == "device":     # beside the device path's images: one batch, one device
                return ImageInput(given.pixel_values.to(self.images.device), given.content_hash)
            return given
        max_num = self.max_dynamic_patch if max_num is None else max_num
        if not isinstance(max_num, int) or max_num < 1:
            raise InvalidRequest(f"max_dynamic_patch must be an integer >= 1, got {max_num!r}")
        pil = image if isinstance(image, Image.Image) else open_image(image)
        if pil.mode != "RGB":
            pil = pil.convert("RGB")
        tiled = self.images(pil, max_num=max_num)
        return ImageInput(tiled.pixel_values, tiled.content_hash)

    # -- conversation ----------------------------------------------------------------------------
    def prepare(self, messages: Sequence[Message], *, max_num: int | None = None, tools: Sequence[Any] | None = None,
                tool_choice: Any = "auto", parallel_tool_calls: bool = True, add_generation_prompt: bool = True,
                continue_final_message: bool = False, template_kwargs: Mapping[str, Any] | None = None
                ) -> PreparedRequest:
        """Render, tile, tokenize (the names of the options are vLLM's request fields).

        Args:
            max_num: tiles per image (``max_dynamic_patch``) unless an image says otherwise (``ImageWithTiles``).
            tools, tool_choice, parallel_tool_calls: OpenAI's; the tools are offered in the template's tool
                format (``tool_calls``), and ``PreparedRequest.tool_plan`` says how to parse the answer and,
                for "required" or a named function, the constraint that forces the calls.
            add_generation_prompt: end with the assistant's header (the last message must then be the user's
                or a tool result); False: end after the last message.
            continue_final_message: the last message is the assistant's and its text is the start of the
                answer (prefill: no separator after it); it wins over ``add_generation_prompt``.
            template_kwargs: ``chat_template_kwargs``, passed to a Jinja template; the official template
                takes none, so it accepts and ignores them.
        """
        if not messages:
            raise InvalidRequest("the conversation is empty")
        for m in messages:
            if m.role not in ("system", "user", "assistant", "tool"):
                raise InvalidRequest(f"unknown message role {m.role!r}; use system, user, assistant or tool")
            if m.images and m.role != "user":
                raise InvalidRequest(f"{m.role} messages cannot carry images")
            if m.tool_calls and m.role != "assistant":
                raise InvalidRequest("only assistant messages carry tool_calls")
        last = messages[-1]
        if continue_final_message:
            if last.role != "assistant" or last.tool_calls:
                raise InvalidRequest("continue_final_message needs a final assistant message (with text, no "
                                     "tool_calls) to continue")
        elif add_generation_prompt and last.role not in ("user", "tool"):
            raise InvalidRequest("the last message must come from the user (or be a tool result); to continue "
                                 "an assistant message, set continue_final_message")
        plan = plan_tools(self.tool_format, tools, tool_choice, parallel_tool_calls=parallel_tool_calls)
        images: list[ImageInput] = []
        num_still_images = 0   # video frames are limited by the caller's frame limit, not max_images
        for m in messages:
            if m.role == "user":
                images.extend(self._message_image(img, max_num, m.is_video) for img in m.images)
                num_still_images += 0 if m.is_video else len(m.images)
        if num_still_images > self.max_images:
            raise InvalidRequest(f"{num_still_images} images in one request; the limit is {self.max_images}")
        if self.chat_template is not None:
            prompt = self._render_jinja(messages, plan, add_generation_prompt, continue_final_message,
                                        template_kwargs)
        else:
            prompt = self._render_official(messages, plan, add_generation_prompt, continue_final_message)
        prepared = self.prepare_prompt(prompt, images)
        prepared.tool_plan = plan
        return prepared

    def _message_image(self, image: MessageImage | ImageWithTiles, max_num: int | None, is_video: bool
                       ) -> ImageInput:
        if isinstance(image, ImageWithTiles):
            return self.image_input(image.image, max_num=1 if is_video else image.max_dynamic_patch)
        if is_video and self.hf_video and not isinstance(image, (ImageInput, torch.Tensor)):
            pil = image if isinstance(image, Image.Image) else open_image(image)
            return self.image_input(hf_video.frame_pixels(pil, self.image_size))
        return self.image_input(image, max_num=1 if is_video else max_num)

    def _history_format(self) -> ToolCallFormat:
        fmt = FORMATS.get(self.template) if self.template is not None else None
        if fmt is None:
            raise InvalidRequest(f"the {self.template!r} conversation template has no tool-call format, so it "
                                 "cannot show tool calls or tool results")
        return fmt

    def _render_official(self, messages: Sequence[Message], plan: ToolPlan | None, add_generation_prompt: bool,
                         continue_final_message: bool) -> str:
        """The official template, extended: consecutive user messages are joined by a newline (as one turn),
        an answer without a question gets an empty user turn (the official history pairs), tools and tool
        results in the template's tool format. Without tools, tool messages and prefill this is the official
        prompt, byte for byte."""
        template = self.template
        if template is None:
            raise ConfigError("this checkpoint has no official conversation template: it needs a chat template")
        user_role, bot_role = get_template(template).roles
        system = self.system_message
        for m in messages:
            if m.role == "system":
                system = m.text
        turns: list[tuple[str, str | None]] = []
        if plan is not None:
            base = system if system is not None else get_template(template).system_message
            system = plan.format.system_message(base, plan.tools)
            turns.extend(plan.format.tool_turns(plan.tools))
        pending_user: str | None = None
        results: list[ToolResult] = []
        after_results = False
        called: dict[str, str] = {}       # the history's call ids -> function names (a result may name neither)
        last_called: str | None = None

        def flush() -> None:
            nonlocal pending_user
            if pending_user is not None:
                turns.append((user_role, pending_user))
                pending_user = None
            if results:
                turns.extend(self._history_format().result_turns(results, user_role))
                results.clear()

        for m in messages:
            if m.role == "user":
                if results:
                    flush()
                text = self._user_text(m)
                pending_user = text if pending_user is None else pending_user + "\n" + text
                after_results = False
            elif m.role == "tool":
                if pending_user is not None:
                    flush()
                name = m.name or called.get(m.tool_call_id or "", last_called)
                results.append(ToolResult(m.text or "", m.tool_call_id, name))
                after_results = True
            elif m.role == "assistant":
                if pending_user is None and not after_results:
                    pending_user = ""         # the official history pairs: an answer without a question
                flush()
                if m.tool_calls:
                    turns.extend(self._history_format().assistant_turns(bot_role, m.text, m.tool_calls))
                    called.update((call.id, call.name) for call in m.tool_calls)
                    last_called = m.tool_calls[-1].name
                else:
                    turns.append((bot_role, history_answer(m.text) if uses_harmony(template) else m.text))
                after_results = False
        flush()
        if continue_final_message:
            return render_turns(template, turns, system, open_last=True)
        if add_generation_prompt:
            turns.append((bot_role, None))
        return render_turns(template, turns, system)

    def _render_jinja(self, messages: Sequence[Message], plan: ToolPlan | None, add_generation_prompt: bool,
                      continue_final_message: bool, template_kwargs: Mapping[str, Any] | None) -> str:
        """The Jinja template (see ``processing.chat_template`` for what it sees); a prefill is the rendered
        conversation cut right after the final message's text (as vLLM)."""
        assert self.chat_template is not None
        dicts: list[dict[str, Any]] = []
        for m in messages:
            entry: dict[str, Any] = {"role": m.role, "content": self._user_text(m) if m.role == "user" else m.text}
            if m.tool_calls:
                entry["tool_calls"] = [{"id": c.id, "type": "function",
                                        "function": {"name": c.name, "arguments": c.arguments_object()}}
                                       for c in m.tool_calls]
            if m.role == "tool":
                entry["tool_call_id"] = m.tool_call_id
                if m.name is not None:
                    entry["name"] = m.name
            dicts.append(entry)
        prompt = self.chat_template.render(
            dicts, tools=[t.to_openai() for t in plan.tools] if plan is not None else None,
            add_generation_prompt=add_generation_prompt and not continue_final_message,
            bos_token=self.tokenizer.bos_token, eos_token=self.tokenizer.eos_token, template_kwargs=template_kwargs)
        if continue_final_message:
            final = messages[-1].text
            cut = prompt.rfind(final)
            if not final or cut < 0:
                raise InvalidRequest("continue_final_message: the chat template does not show the final "
                                     "assistant message's text")
            prompt = prompt[:cut + len(final)]
        return prompt

    def prepare_prompt(self, prompt: str, images: Sequence[ImageInput]) -> PreparedRequest:
        """A rendered prompt with ``<image>`` placeholders plus its images, in order."""
        expanded = expand_image_placeholders(prompt, [im.num_tiles for im in images], self.num_image_token)
        ids = self.encode(expanded)
        spans = self._spans(ids, images)
        return PreparedRequest(expanded, ids, list(images), spans)

    def _user_text(self, m: Message) -> str:
        """The text with its images' ``<image>`` placeholders: where the text has ``<image>`` (or LMDeploy's
        ``<IMAGE_TOKEN>``), else the official prefix."""
        text = m.text or ""
        if not m.images:
            return text
        text = text.replace(LMDEPLOY_IMAGE_TOKEN, IMAGE_PLACEHOLDER)
        if IMAGE_PLACEHOLDER in text:
            return text
        if m.is_video:
            prefix = "".join(f"Frame{i + 1}: {IMAGE_PLACEHOLDER}\n" for i in range(len(m.images)))
        elif len(m.images) == 1 or not self.numbered_images:
            prefix = (IMAGE_PLACEHOLDER + "\n") * len(m.images)
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
