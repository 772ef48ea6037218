"""InternVLChatModel = vision_model + mlp1 + language_model, composed (not inherited).

Attribute names equal the checkpoint prefixes, so top-level names load as they are; the decoder
family's declared tables handle the rest. The official user-facing methods (``chat``,
``batch_chat``, ``generate``) live in ``api/chat.py`` and are mixed in by ``api/auto.py``.
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..config import InternVLConfig
from ..errors import InvalidRequest, PlaceholderMismatch, UnsupportedFeature
from ..weights.loader import Transform, checkpoint_files, load_weights
from . import hf_format
from .decoders.base import DecoderForCausalLM
from .layers.attention import AttentionMetadata, KVCache
from .outputs import ModelOutput
from .projector import Projector, pixel_shuffle
from .registry import decoder_class
from .vision.intern_vit import InternVisionModel

_FORWARD_BLOCK = 16  # KV block size of forward()'s one-off cache

#: On the CPU the encoder runs at most this many tiles at once (``extract_feature``): a 7-tile image encoded
#: in one batch holds ~190 MiB of activations at InternVL2-1B's shapes in bf16 (~400 MiB under the upcast
#: plan's float32), two tiles at a time 40 (130), at the same speed per tile on both plans, with every feature
#: bit for bit the one-batch value (each tile's rows meet the same products; benchmarks/RESULTS.md, sixth
#: session). Other devices run the whole batch: a GPU wants the large products.
CPU_TILES_PER_FORWARD = 2


@dataclass
class CausalLMOutput(ModelOutput):
    """What the official ``forward`` returns (transformers' ``CausalLMOutputWithPast``): ``logits``
    (B, T, vocab) float32, and ``loss`` when labels were given. Read by attribute, by key
    (``out["logits"]``) or by position over the fields that are set (``out[0]``), as a ``ModelOutput``."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: Any = None
    hidden_states: Any = None
    attentions: Any = None


class InternVLModel(nn.Module):
    """The network. ``extract_feature`` maps tiles to LLM embeddings; ``embed`` merges them into a
    prompt's token embeddings at the ``<IMG_CONTEXT>`` positions; ``forward`` is the official
    ``InternVLChatModel.forward`` (all positions' logits, for scoring).

    The official model's attributes are here too: ``device`` and ``dtype`` (transformers': the first
    parameter's device; the LLM embeddings' dtype, never quantized), ``template`` (settable, as the
    official attribute: ``chat`` uses it), ``ps_version``, ``downsample_ratio``, ``select_layer`` (read
    from the config), ``num_image_token``."""

    def __init__(self, config: InternVLConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_model = InternVisionModel(config.vision)
        self.mlp1 = Projector(config.vision.hidden_size, config.llm.hidden_size, config.downsample_ratio)
        self.language_model: DecoderForCausalLM = decoder_class(config.llm.architecture, config.source)(config.llm)
        self.num_image_token = config.num_image_token
        # The official model's attribute, set by its chat()/batch_chat() (api/chat.py) for callers that read it;
        # nothing here reads it: the runner is given the image token id.
        self.img_context_token_id: int | None = config.image_token_id   # the HF format names it in config.json
        self.compute_plan: object | None = None      # set_compute_plan
        self._template = config.template
        self._vision_loader: Callable[[], None] | None = None   # defer_vision
        self._vision_pending = 0
        self._vision_lock = threading.Lock()
        self._mapped_bytes = 0                        # record_mapped_bytes

    # ---- the official model's attributes --------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """The first parameter's device, as transformers', skipping a vision encoder not loaded yet (meta)."""
        first = None
        for param in self.parameters():
            if not param.is_meta:
                return param.device
            first = first or param.device
        assert first is not None
        return first

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.get_input_embeddings().weight.dtype

    @property
    def template(self) -> str | None:
        """The conversation template's name (None for an HF-format checkpoint); setting it changes the
        prompts ``chat`` builds."""
        return self._template

    @template.setter
    def template(self, name: str | None) -> None:
        self._template = name

    @property
    def ps_version(self) -> str:
        return self.config.ps_version

    @property
    def downsample_ratio(self) -> float:
        return self.config.downsample_ratio

    @property
    def select_layer(self) -> int:
        return self.config.select_layer

    def set_compute_plan(self, plan: object) -> None:
        """Record the host's compute plan (``compute_plan.ComputePlan``, chosen by the loader) for
        ``internvl info`` and callers that ask; applying it is the plan's job (``compute_plan.apply_plan``)."""
        self.compute_plan = plan

    # ---- loading -------------------------------------------------------------------------------
    def defer_vision(self, load: Callable[[], None], nbytes: int) -> None:
        """The loader left ``vision_model`` and ``mlp1`` on the meta device: ``load()`` fills them (once, on the
        first ``load_vision``); ``nbytes``: the memory they will take (the engine's KV plan reserves it)."""
        self._vision_loader, self._vision_pending = load, nbytes

    @property
    def vision_loaded(self) -> bool:
        """Whether the vision encoder and ``mlp1`` hold their weights (False only while deferred)."""
        return self._vision_loader is None

    @property
    def vision_pending_bytes(self) -> int:
        """Bytes the deferred vision encoder will take once loaded (0 once loaded, or never deferred)."""
        return 0 if self._vision_loader is None else self._vision_pending

    def load_vision(self) -> None:
        """Load a deferred vision encoder now; nothing if it is loaded. Thread-safe and once: concurrent
        callers wait for the one load; a load that raises leaves it deferred (the next call tries again)."""
        if self._vision_loader is None:
            return
        with self._vision_lock:
            load = self._vision_loader
            if load is None:
                return
            load()
            self._vision_loader, self._vision_pending = None, 0

    def record_mapped_bytes(self, nbytes: int) -> None:
        """The loader made ``nbytes`` more of the weights read-only views of the checkpoint file."""
        self._mapped_bytes += nbytes

    @property
    def mapped_bytes(self) -> int:
        """Bytes of weights that are views of the checkpoint file (page cache, not this process's own memory)."""
        return self._mapped_bytes

    def resolve_checkpoint_name(self, name: str) -> tuple[str, object, Transform | None] | None:
        """Checkpoint tensor name -> (our parameter name, shard id, transform) per the family tables (an
        HF-format name is first mapped to its GitHub-format name by ``hf_format``'s tables)."""
        shard: object = None
        if self.config.checkpoint_format == "hf":
            mapped = hf_format.github_name(name)
            if mapped is None:
                return None
            name, shard = mapped
        if not name.startswith("language_model."):
            return name, shard, None
        lm = self.language_model
        for old, new in lm.renames:
            name = name.replace(old, new)
        for ours, theirs, shard_id in lm.stacked_params:
            if f".{theirs}." in name:
                name, shard = name.replace(f".{theirs}.", f".{ours}."), shard_id
                break
        for ours, theirs, part in lm.expert_params:
            head, _, tail = theirs.partition("{e}")
            match = re.search(rf"\.{re.escape(head)}(\d+){re.escape(tail)}\.", name)
            if match:
                name = name[:match.start()] + f".{ours}." + name[match.end():]
                shard = (int(match.group(1)), part)
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
        """(tiles, 3, H, W) -> (tiles, num_image_token, llm_hidden). Loads a deferred encoder first. On the
        CPU the tiles go through in groups of ``CPU_TILES_PER_FORWARD`` (the same features, less memory)."""
        self.load_vision()
        device = self.vision_model.embeddings.patch_embedding.weight.device
        if device.type == "cpu" and pixel_values.shape[0] > CPU_TILES_PER_FORWARD:
            return torch.cat([self._features(group, device) for group in pixel_values.split(CPU_TILES_PER_FORWARD)])
        return self._features(pixel_values, device)

    def _features(self, pixel_values: torch.Tensor, device: torch.device) -> torch.Tensor:
        """One batch of tiles through the encoder, the pixel shuffle and mlp1."""
        x = self.vision_model(pixel_values.to(device=device, dtype=self.vision_dtype),
                              select_layer=self.config.select_layer)
        x = x[:, 1:, :]                                                   # drop the class token
        side = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], side, side, -1)
        x = pixel_shuffle(x, self.config.downsample_ratio, self.config.ps_version)
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        # float32 activations under the upcast plan's fast path (intern_vit's docstring): rounded once here
        return self.mlp1(x).to(self.vision_dtype)

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


    # ---- the official forward --------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                image_flags: torch.Tensor | None = None, past_key_values: Any = None,
                labels: torch.Tensor | None = None, use_cache: bool | None = None,
                output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None) -> CausalLMOutput | tuple[Any, ...]:
        """The official ``InternVLChatModel.forward``: logits (B, T, vocab) float32 for every position.

        The tiles of ``pixel_values`` whose ``image_flags`` is 1 (all when None) are encoded, and their
        rows fill the ``<IMG_CONTEXT>`` ids (``img_context_token_id``, set by ``chat`` or by hand) of the
        flattened batch in order. Each row runs on its own over its ``attention_mask`` ones, at positions
        ``position_ids`` (default 0..T-1, as transformers' decoders when none are given); a masked
        position's logits are 0 (the reference's mean nothing there). ``labels``: the loss is
        transformers' shifted cross-entropy (-100 ignored). Inference only (no gradients); no KV cache is
        returned (``use_cache`` accepted); ``past_key_values``, ``output_attentions`` and
        ``output_hidden_states`` raise ``UnsupportedFeature``. ``return_dict=False`` gives the tuple."""
        if input_ids is None:
            raise InvalidRequest("forward() needs input_ids")
        if past_key_values is not None or output_attentions or output_hidden_states:
            raise UnsupportedFeature("forward() returns logits (and the loss) only: past_key_values, "
                                     "output_attentions and output_hidden_states are not supported")
        ids = input_ids if input_ids.dim() == 2 else input_ids[None]
        mask = (attention_mask if attention_mask is not None else torch.ones_like(ids)).reshape(ids.shape).bool()
        positions = (position_ids.reshape(ids.shape) if position_ids is not None
                     else torch.arange(ids.shape[1]).expand(ids.shape))
        features = None
        if pixel_values is not None:
            vit = self.extract_feature(pixel_values)
            if image_flags is not None:
                vit = vit[image_flags.reshape(-1).to(vit.device) == 1]
            features = vit.reshape(-1, vit.shape[-1])
        token_id = self.img_context_token_id
        counts = [int((row == token_id).sum()) if token_id is not None else 0 for row in ids.cpu()]
        if features is not None and sum(counts) != features.shape[0]:
            raise PlaceholderMismatch(f"input_ids hold {sum(counts)} <IMG_CONTEXT> tokens (img_context_token_id="
                                      f"{token_id}) but the flagged tiles give {features.shape[0]} feature rows")
        lm = self.language_model
        logits = torch.zeros(*ids.shape, self.config.llm.vocab_size, dtype=torch.float32,
                             device=lm.get_input_embeddings().weight.device)
        longest = int(mask.sum(dim=1).max()) if ids.numel() else 0
        cache = self._forward_cache(longest)
        start = 0
        for b in range(ids.shape[0]):
            row_features = features[start:start + counts[b]] if features is not None and counts[b] else None
            start += counts[b]
            keep = mask[b].cpu()
            n = int(keep.sum())
            if n == 0:
                continue
            embeds = self.embed(ids[b], row_features, image_token_id=token_id)[keep.to(logits.device)]
            meta = AttentionMetadata(query_lens=[n], seq_lens=[n], slot_mapping=torch.arange(n, device=logits.device),
                                     context_slots=[None], context_ranges=[(0, n)])
            hidden = lm(embeds, positions[b][keep].to(logits.device), meta, cache)
            logits[b, keep.to(logits.device)] = lm.compute_logits(hidden).to(logits.device)
        loss = None
        if labels is not None:
            shift_logits = logits[..., :-1, :].reshape(-1, logits.shape[-1])
            shift_labels = labels[..., 1:].reshape(-1).to(logits.device)
            loss = nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
        output = CausalLMOutput(loss=loss, logits=logits)
        return output if return_dict is not False else output.to_tuple()

    def _forward_cache(self, num_tokens: int) -> KVCache:
        """A KV cache for one ``forward`` row of ``num_tokens``, each layer's pool on its layer's device."""
        llm = self.config.llm
        lm = self.language_model
        devices = lm.layer_devices or lm.get_input_embeddings().weight.device
        layer = lm.model.decoder_layers[0].self_attn
        return KVCache.allocate(num_layers=llm.num_hidden_layers, num_blocks=max(1, -(-num_tokens // _FORWARD_BLOCK)),
                                block_size=_FORWARD_BLOCK, num_kv_heads=layer.num_kv_heads, head_dim=llm.head_dim,
                                dtype=lm.get_input_embeddings().weight.dtype, device=devices)


#: The in-place initialisers ``nn`` layers call in their constructors: nothing to do on meta tensors.
_INITIALISERS = frozenset({"normal_", "uniform_", "zero_", "fill_", "trunc_normal_", "constant_", "ones_", "zeros_",
                           "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_"})


class _SkipMetaInit(TorchFunctionMode):
    """Skips the random initialisation of meta parameters while a model is built: on meta tensors it computes
    nothing, yet torch runs it through Python references that import ``torch._dynamo`` and the inductor
    (~150 MB resident in every process that loads a model, for nothing)."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in _INITIALISERS:
            target = args[0] if args else kwargs.get("tensor", kwargs.get("self"))
            if isinstance(target, torch.Tensor) and target.is_meta:
                return target
        return func(*args, **kwargs)


def meta_model(config: InternVLConfig, dtype: torch.dtype,
               model_class: type[InternVLModel] = InternVLModel) -> InternVLModel:
    """The model on the meta device with ``dtype`` parameters: shapes and names, no memory."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"), _SkipMetaInit():
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
