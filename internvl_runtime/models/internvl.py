"""InternVLChatModel = vision_model + mlp1 + language_model, composed (not inherited).

Attribute names equal the checkpoint prefixes, so top-level names load as they are; the decoder
family's declared tables handle the rest. The official user-facing methods (``chat``,
``batch_chat``, ``generate``) live in ``api/chat.py`` and are mixed in by ``api/auto.py``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn

from ..config import InternVLConfig
from ..errors import PlaceholderMismatch
from ..weights.loader import Transform, checkpoint_files, load_weights
from .decoders.base import DecoderForCausalLM
from .projector import Projector, pixel_shuffle
from .registry import decoder_class
from .vision.intern_vit import InternVisionModel


class InternVLModel(nn.Module):
    """The network. ``extract_feature`` maps tiles to LLM embeddings; ``embed`` merges them into a
    prompt's token embeddings at the ``<IMG_CONTEXT>`` positions."""

    def __init__(self, config: InternVLConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_model = InternVisionModel(config.vision)
        self.mlp1 = Projector(config.vision.hidden_size, config.llm.hidden_size, config.downsample_ratio)
        self.language_model: DecoderForCausalLM = decoder_class(config.llm.architecture, config.source)(config.llm)
        self.num_image_token = config.num_image_token
        # The official model's attribute, set by its chat()/batch_chat() (api/chat.py) for callers that read it;
        # nothing here reads it: the runner is given the image token id.
        self.img_context_token_id: int | None = None
        self.compute_plan: object | None = None      # set_compute_plan

    def set_compute_plan(self, plan: object) -> None:
        """Record the host's compute plan (``compute_plan.ComputePlan``, chosen by the loader) for
        ``internvl info`` and callers that ask; applying it is the plan's job (``compute_plan.apply_plan``)."""
        self.compute_plan = plan

    # ---- loading -------------------------------------------------------------------------------
    def resolve_checkpoint_name(self, name: str) -> tuple[str, object, Transform | None] | None:
        """Checkpoint tensor name -> (our parameter name, shard id, transform) per the family tables."""
        if not name.startswith("language_model."):
            return name, None, None
        lm = self.language_model
        for old, new in lm.renames:
            name = name.replace(old, new)
        shard: object = None
        for ours, theirs, shard_id in lm.stacked_params:
            if f".{theirs}." in name:
                name, shard = name.replace(f".{theirs}.", f".{ours}."), shard_id
                break
        transform: Transform | None = None
        for suffix, fn in lm.tensor_transforms.items():
            if name.endswith(suffix):
                transform = functools.partial(fn, lm.config)
        return name, shard, transform

    def load_checkpoint(self, folder: str | Path, *, allow_pickle: bool = False) -> None:
        files = checkpoint_files(folder, allow_pickle=allow_pickle)
        tied = self.config.llm.tie_word_embeddings
        load_weights(self, files, self.resolve_checkpoint_name,
                     optional=lambda n: tied and n == "language_model.lm_head.weight")
        self.language_model.tie_weights()

    # ---- vision --------------------------------------------------------------------------------
    @property
    def vision_dtype(self) -> torch.dtype:
        return self.vision_model.embeddings.patch_embedding.weight.dtype

    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(tiles, 3, H, W) -> (tiles, num_image_token, llm_hidden)."""
        device = self.vision_model.embeddings.patch_embedding.weight.device
        x = self.vision_model(pixel_values.to(device=device, dtype=self.vision_dtype),
                              select_layer=self.config.select_layer)
        x = x[:, 1:, :]                                                   # drop the class token
        side = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], side, side, -1)
        x = pixel_shuffle(x, self.config.downsample_ratio, self.config.ps_version)
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        return self.mlp1(x)

    # ---- text + image embeddings ---------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None = None, *,
              image_token_id: int | None = None) -> torch.Tensor:
        """input_ids (T,) -> (T, hidden), image feature rows written at the ``image_token_id``
        (``<IMG_CONTEXT>``) positions in order."""
        embed_tokens = self.language_model.get_input_embeddings()
        embeds = embed_tokens(input_ids.to(embed_tokens.weight.device))
        if image_features is None:
            return embeds
        if image_token_id is None:
            raise PlaceholderMismatch("image features were given without the image token id to place them at")
        selected = input_ids.to(embeds.device) == image_token_id
        rows = image_features.reshape(-1, embeds.shape[-1])
        num_slots = int(selected.sum())
        if num_slots != rows.shape[0]:
            raise PlaceholderMismatch(
                f"the prompt has {num_slots} <IMG_CONTEXT> tokens but the images give {rows.shape[0]} "
                f"feature rows ({rows.shape[0] // max(self.num_image_token, 1)} tiles x {self.num_image_token})")
        embeds[selected] = rows.to(device=embeds.device, dtype=embeds.dtype)
        return embeds


def meta_model(config: InternVLConfig, dtype: torch.dtype,
               model_class: type[InternVLModel] = InternVLModel) -> InternVLModel:
    """The model on the meta device with ``dtype`` parameters: shapes and names, no memory."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            return model_class(config)
    finally:
        torch.set_default_dtype(previous)


def build_model(folder: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                config: InternVLConfig | None = None, allow_pickle: bool = False,
                model_class: type[InternVLModel] = InternVLModel) -> InternVLModel:
    """Construct on the meta device (no memory), allocate once in ``dtype`` on ``device``, then fill
    from the checkpoint tensor by tensor. Peak memory ~ the model's size in ``dtype``."""
    config = config or InternVLConfig.from_pretrained(folder)
    model = meta_model(config, dtype, model_class)
    model.to_empty(device=device)
    model.load_checkpoint(folder, allow_pickle=allow_pickle)
    return model.eval().requires_grad_(False)
