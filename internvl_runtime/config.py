"""Typed views of an InternVL checkpoint's ``config.json``, in either of its two formats.

- The "GitHub format" (``architectures: ["InternVLChatModel"]``, ``model_type: internvl_chat``):
  ``vision_config`` + ``llm_config`` + the conversation ``template`` name.
- The "HF format" (``architectures: ["InternVLForConditionalGeneration"]``, ``model_type: internvl``:
  transformers' native InternVL, hub ids ending in ``-hf`` / ``-HF``): ``vision_config`` and ``text_config``
  under transformers' names, the tiling in ``preprocessor_config.json`` and the prompt format in the folder's
  Jinja chat template. :meth:`InternVLConfig.from_dict` maps it onto the same typed view (the one model).

Only the fields the runtime uses are parsed; each is checked where it is read, and a missing or
malformed field raises :class:`ConfigError` naming it and the file. The LLM class is looked up by the
exact ``llm_config.architectures[0]`` (HF format: ``text_config.architectures[0]``, else its
``model_type``) string (see ``models/registry.py``); nothing is guessed from folder names.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

_MISSING = object()


class _Reader:
    """Reads typed fields out of one JSON object, naming the field and file on error."""

    def __init__(self, data: dict[str, Any], where: str) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{where} must be a JSON object, got {type(data).__name__}")
        self.data = data
        self.where = where

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = _MISSING) -> Any:
        if key not in self.data or self.data[key] is None:
            if default is _MISSING:
                raise ConfigError(f"{self.where}: required field '{key}' is missing")
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = "/".join(k.__name__ for k in kinds)
            raise ConfigError(f"{self.where}: field '{key}' must be {names}, got {value!r}")
        return value

    def positive_int(self, key: str, default: Any = _MISSING) -> int:
        value = self.get(key, int, default)
        if value is not None and value <= 0:
            raise ConfigError(f"{self.where}: field '{key}' must be > 0, got {value}")
        return value


@dataclass(frozen=True)
class VisionConfig:
    """InternViT (300M: LayerNorm + qkv bias; 6B: RMSNorm + q/k norm, no qkv bias)."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_hidden_layers: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    norm_type: str = "rms_norm"
    layer_norm_eps: float = 1e-6
    qk_normalization: bool = False
    qkv_bias: bool = True
    hidden_act: str = "gelu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> VisionConfig:
        r = _Reader(data, where)
        cfg = cls(
            hidden_size=r.positive_int("hidden_size"),
            intermediate_size=r.positive_int("intermediate_size"),
            num_attention_heads=r.positive_int("num_attention_heads"),
            num_hidden_layers=r.positive_int("num_hidden_layers"),
            image_size=r.positive_int("image_size"),
            patch_size=r.positive_int("patch_size"),
            num_channels=r.positive_int("num_channels", 3),
            norm_type=r.get("norm_type", str, "rms_norm"),
            layer_norm_eps=r.get("layer_norm_eps", float, 1e-6),
            qk_normalization=r.get("qk_normalization", bool, False),
            qkv_bias=r.get("qkv_bias", bool, True),
            hidden_act=r.get("hidden_act", str, "gelu"),
        )
        if cfg.norm_type not in ("rms_norm", "layer_norm"):
            raise ConfigError(f"{where}: norm_type must be 'rms_norm' or 'layer_norm', got {cfg.norm_type!r}")
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ConfigError(f"{where}: hidden_size {cfg.hidden_size} is not divisible by "
                              f"num_attention_heads {cfg.num_attention_heads}")
        if cfg.hidden_act != "gelu":
            raise ConfigError(f"{where}: hidden_act {cfg.hidden_act!r} is not supported (only 'gelu')")
        return cfg


@dataclass(frozen=True)
class RopeScaling:
    """``rope_scaling`` of the LLM: None, dynamic NTK (InternLM2), linear, or Phi-3's "su"/"longrope"."""

    type: str
    factor: float = 1.0
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    #: YaRN (GPT-OSS): the keys transformers' ``_compute_yarn_parameters`` reads, None where the config has none.
    yarn: YarnParams | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, where: str) -> RopeScaling | None:
        if data is None:
            return None
        r = _Reader(data, where + ".rope_scaling")
        kind = data.get("type", data.get("rope_type"))
        if kind in ("dynamic", "linear"):
            return cls(type=kind, factor=r.get("factor", float))
        if kind in ("su", "longrope"):
            return cls(type="su", short_factor=tuple(float(x) for x in r.get("short_factor", list)),
                       long_factor=tuple(float(x) for x in r.get("long_factor", list)))
        if kind == "yarn":
            return cls(type="yarn", factor=r.get("factor", float), yarn=YarnParams(
                original_max_position_embeddings=r.get("original_max_position_embeddings", int, None),
                attention_factor=r.get("attention_factor", float, None), beta_fast=r.get("beta_fast", float, None),
                beta_slow=r.get("beta_slow", float, None), mscale=r.get("mscale", float, None),
                mscale_all_dim=r.get("mscale_all_dim", float, None), truncate=r.get("truncate", bool, True)))
        raise ConfigError(f"{where}.rope_scaling: unknown type {kind!r} (known: dynamic, linear, su, yarn)")


@dataclass(frozen=True)
class YarnParams:
    """The optional keys of a YaRN ``rope_scaling`` (GPT-OSS: beta_fast 32, beta_slow 1, truncate false,
    original_max_position_embeddings 4096), as the config has them (None: transformers' default)."""

    original_max_position_embeddings: int | None = None
    attention_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class MoEConfig:
    """A mixture-of-experts decoder's routing and expert shapes, read from each family's own config names
    (Qwen3-MoE: ``num_experts``, ``moe_intermediate_size``, ``norm_topk_prob``, ``decoder_sparse_step``,
    ``mlp_only_layers``; GPT-OSS: ``num_local_experts``, every layer sparse, experts ``intermediate_size`` wide)."""

    num_experts: int
    experts_per_token: int
    expert_intermediate_size: int
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()

    def is_sparse(self, layer_index: int) -> bool:
        """Whether layer ``layer_index`` has experts (else a dense MLP), as Qwen3-MoE decides it."""
        return (layer_index not in self.mlp_only_layers
                and (layer_index + 1) % self.decoder_sparse_step == 0)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> MoEConfig | None:
        r = _Reader(data, where)
        experts = r.get("num_experts", int, None) or r.get("num_local_experts", int, None)
        if not experts:
            return None
        per_token = r.get("num_experts_per_tok", int, None) or r.get("experts_per_token", int, None)
        if not per_token or per_token > experts:
            raise ConfigError(f"{where}: num_experts_per_tok must be in 1..{experts} (got {per_token!r})")
        width = r.get("moe_intermediate_size", int, None) or r.positive_int("intermediate_size")
        return cls(num_experts=experts, experts_per_token=per_token, expert_intermediate_size=width,
                   norm_topk_prob=r.get("norm_topk_prob", bool, False),
                   decoder_sparse_step=r.get("decoder_sparse_step", int, 1) or 1,
                   mlp_only_layers=tuple(int(i) for i in r.get("mlp_only_layers", list, None) or ()))


@dataclass(frozen=True)
class LLMConfig:
    """The language model half (``llm_config``): fields common to the decoder families, and the optional
    parts some families add (explicit ``head_dim``, experts, sliding-window layers)."""

    architecture: str
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    num_hidden_layers: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    rope_scaling: RopeScaling | None = None
    original_max_position_embeddings: int | None = None
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    #: ``head_dim`` when the config states it (Qwen3, GPT-OSS: heads x head_dim need not be hidden_size).
    explicit_head_dim: int | None = None
    moe: MoEConfig | None = None
    #: Sliding-window attention: the window, and per layer "sliding_attention" / "full_attention" (GPT-OSS).
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    #: Every key the config has, for a family that reads a name of its own (``family_value``).
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim or self.hidden_size // self.num_attention_heads

    def family_value(self, name: str, kind: type, default: Any) -> Any:
        """A config key only one family reads (GPT-OSS's ``swiglu_limit``), type-checked as every field is."""
        return _Reader(self.raw, "llm_config").get(name, kind, default)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> LLMConfig:
        r = _Reader(data, where)
        archs = r.get("architectures", list)
        if not archs or not isinstance(archs[0], str):
            raise ConfigError(f"{where}: 'architectures' must be a non-empty list of strings")
        heads = r.positive_int("num_attention_heads")
        cfg = cls(
            architecture=archs[0],
            hidden_size=r.positive_int("hidden_size"),
            intermediate_size=r.positive_int("intermediate_size"),
            num_attention_heads=heads,
            num_key_value_heads=r.positive_int("num_key_value_heads", heads),
            num_hidden_layers=r.positive_int("num_hidden_layers"),
            vocab_size=r.positive_int("vocab_size"),
            rms_norm_eps=r.get("rms_norm_eps", float, 1e-6),
            rope_theta=r.get("rope_theta", float, 10000.0),
            max_position_embeddings=r.positive_int("max_position_embeddings", 2048),
            tie_word_embeddings=r.get("tie_word_embeddings", bool, False),
            hidden_act=r.get("hidden_act", str, "silu"),
            rope_scaling=RopeScaling.from_dict(data.get("rope_scaling"), where),
            original_max_position_embeddings=r.get("original_max_position_embeddings", int, None),
            # Qwen2 always has q/k/v biases; InternLM2 calls the flag 'bias'; Llama 'attention_bias'.
            attention_bias=bool(r.get("attention_bias", bool, False) or r.get("bias", bool, False)),
            bos_token_id=r.get("bos_token_id", int, None),
            eos_token_id=r.get("eos_token_id", (int, list), None),
            pad_token_id=r.get("pad_token_id", int, None),
            explicit_head_dim=r.get("head_dim", int, None),
            moe=MoEConfig.from_dict(data, where),
            # A window only where the config says which layers slide (GPT-OSS); Qwen2's and Phi-3's
            # ``sliding_window`` is not applied by their official eager attention.
            sliding_window=r.get("sliding_window", int, None) if data.get("layer_types") else None,
            layer_types=tuple(r.get("layer_types", list, None) or ()) or None,
            raw=copy.deepcopy(data),
        )
        if cfg.explicit_head_dim is None and cfg.hidden_size % heads:
            raise ConfigError(f"{where}: hidden_size {cfg.hidden_size} not divisible by num_attention_heads {heads}")
        if heads % cfg.num_key_value_heads:
            raise ConfigError(f"{where}: num_attention_heads {heads} not divisible by "
                              f"num_key_value_heads {cfg.num_key_value_heads}")
        if cfg.hidden_act != "silu":
            raise ConfigError(f"{where}: hidden_act {cfg.hidden_act!r} is not supported (only 'silu')")
        if cfg.rope_scaling is not None and cfg.rope_scaling.type == "su":
            if cfg.original_max_position_embeddings is None:
                raise ConfigError(f"{where}: rope_scaling type 'su' needs original_max_position_embeddings")
            half = cfg.head_dim // 2
            for name in ("short_factor", "long_factor"):
                if len(getattr(cfg.rope_scaling, name)) != half:
                    raise ConfigError(f"{where}.rope_scaling.{name} must have head_dim/2 = {half} values")
        return cfg


class ConfigView:
    """Attribute access to one section of ``config.json`` as the file has it (``vision_config``,
    ``llm_config``), what code written for transformers' ``PretrainedConfig`` reads (the official
    ``split_model`` reads ``config.llm_config.num_hidden_layers``). A read-only copy: changing it does
    not change the loaded model."""

    def __init__(self, data: dict[str, Any]) -> None:
        self._data = copy.deepcopy(data)

    def __getattr__(self, name: str) -> Any:
        data = self.__dict__.get("_data", {})
        if name not in data:
            raise AttributeError(f"config has no field {name!r}")
        value = data[name]
        return ConfigView(value) if isinstance(value, dict) else copy.deepcopy(value)

    def __contains__(self, name: object) -> bool:
        return name in self._data

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._data)

    def __repr__(self) -> str:
        return f"ConfigView({self._data!r})"


@dataclass(frozen=True)
class InternVLConfig:
    """The whole checkpoint: vision encoder, projector settings, LLM, template and tiling defaults.

    ``vision_config``, ``llm_config`` and ``to_dict()`` give the file's own fields, as transformers'
    ``InternVLChatConfig`` does, for code that reads them by their file names."""

    vision: VisionConfig
    llm: LLMConfig
    template: str | None             # the official template's name; None in the HF format (chat_template)
    downsample_ratio: float = 0.5
    ps_version: str = "v1"
    select_layer: int = -1
    force_image_size: int | None = None
    dynamic_image_size: bool = True
    use_thumbnail: bool = True
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 6
    torch_dtype: str | None = None
    system_message: str | None = None
    checkpoint_format: str = "github"      # "github" (InternVLChatModel) or "hf" (InternVLForConditionalGeneration)
    image_token_id: int | None = None      # HF format: config.json's image_token_id (<IMG_CONTEXT>)
    chat_template: str | None = None       # HF format: the folder's Jinja chat template (renders every prompt)
    #: HF format: generation_config.json's ``eos_token_id`` (one id or a list): transformers' ``generate`` on the
    #: folder stops at each (GPT-OSS: ``<|return|>``, ``<|endoftext|>``, ``<|call|>``); empty otherwise.
    generation_eos_token_ids: tuple[int, ...] = ()
    source: str = "<dict>"
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def vision_config(self) -> ConfigView:
        """The file's ``vision_config`` section (``num_hidden_layers``, ``image_size``, ...)."""
        return ConfigView(self.raw.get("vision_config", {}))

    @property
    def llm_config(self) -> ConfigView:
        """The file's ``llm_config`` section (``num_hidden_layers``, ``architectures``, ...); the HF format's
        ``text_config``."""
        return ConfigView(self.raw.get("llm_config", self.raw.get("text_config", {})))

    def to_dict(self) -> dict[str, Any]:
        """A copy of the whole ``config.json`` as read."""
        return copy.deepcopy(self.raw)

    @property
    def image_size(self) -> int:
        """Tile side in pixels (``force_image_size`` or the ViT's ``image_size``)."""
        return self.force_image_size or self.vision.image_size

    @property
    def num_image_token(self) -> int:
        """Tokens per tile after pixel shuffle: (448 / 14)^2 * 0.5^2 = 256."""
        return int((self.image_size // self.vision.patch_size) ** 2 * (self.downsample_ratio ** 2))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>",
                  processor: dict[str, Any] | None = None, chat_template: str | None = None) -> InternVLConfig:
        """The typed view of a config.json. The HF format (chosen by ``architectures[0] ==
        "InternVLForConditionalGeneration"``) also reads ``processor`` (preprocessor_config.json, tiling) and
        ``chat_template`` (the folder's Jinja template); :meth:`from_pretrained` finds both in the folder."""
        r = _Reader(data, source)
        archs = data.get("architectures")
        if isinstance(archs, list) and archs and archs[0] == HF_ARCHITECTURE:
            return _from_hf_dict(data, source, processor or {}, chat_template)
        model_type = r.get("model_type", str, "internvl_chat")
        if model_type != "internvl_chat":
            raise ConfigError(f"{source}: model_type is {model_type!r}, expected 'internvl_chat'")
        vision = VisionConfig.from_dict(r.get("vision_config", dict), f"{source}: vision_config")
        llm = LLMConfig.from_dict(r.get("llm_config", dict), f"{source}: llm_config")
        cfg = cls(
            vision=vision,
            llm=llm,
            template=r.get("template", str),
            downsample_ratio=r.get("downsample_ratio", float, 0.5),
            ps_version=r.get("ps_version", str, "v1"),
            select_layer=r.get("select_layer", int, -1),
            force_image_size=r.get("force_image_size", int, None),
            dynamic_image_size=r.get("dynamic_image_size", bool, True),
            use_thumbnail=r.get("use_thumbnail", bool, True),
            min_dynamic_patch=r.positive_int("min_dynamic_patch", 1),
            max_dynamic_patch=r.positive_int("max_dynamic_patch", 6),
            torch_dtype=r.get("torch_dtype", str, None),
            system_message=r.get("system_message", str, None),
            source=source,
            raw=data,
        )
        if cfg.ps_version not in ("v1", "v2"):
            raise ConfigError(f"{source}: ps_version must be 'v1' or 'v2', got {cfg.ps_version!r}")
        inverse = 1 / cfg.downsample_ratio if cfg.downsample_ratio > 0 else 0.0
        if inverse < 1 or not math.isclose(inverse, round(inverse)):
            raise ConfigError(f"{source}: downsample_ratio {cfg.downsample_ratio} must be 1/k for an integer k")
        if not -vision.num_hidden_layers - 1 <= cfg.select_layer <= vision.num_hidden_layers:
            raise ConfigError(f"{source}: select_layer {cfg.select_layer} is outside the "
                              f"{vision.num_hidden_layers}-layer vision encoder")
        if cfg.min_dynamic_patch > cfg.max_dynamic_patch:
            raise ConfigError(f"{source}: min_dynamic_patch > max_dynamic_patch")
        return cfg

    @classmethod
    def from_pretrained(cls, path: str | Path) -> InternVLConfig:
        folder = Path(path)
        file = folder / "config.json"
        if not folder.is_dir():
            raise ConfigError(f"checkpoint folder {str(folder)!r} does not exist")
        if not file.is_file():
            raise ConfigError(f"{str(folder)!r} has no config.json: not a Hugging Face checkpoint folder")
        data = _read_json(file)
        archs = data.get("architectures") if isinstance(data, dict) else None
        if isinstance(archs, list) and archs and archs[0] == HF_ARCHITECTURE:
            processor_file = folder / "preprocessor_config.json"
            processor = _read_json(processor_file) if processor_file.is_file() else {}
            _check_hf_image_tokens(folder)
            config = cls.from_dict(data, str(file), processor=processor, chat_template=hf_chat_template(folder))
            _check_hf_image_seq_length(folder, config.num_image_token)
            return dataclasses.replace(config, generation_eos_token_ids=hf_generation_eos(folder))
        return cls.from_dict(data, str(file))


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{file}: cannot be parsed as JSON ({exc})") from exc


# ---- the HF format ----------------------------------------------------------------------------------------

#: ``architectures[0]`` of the HF format (transformers' native InternVL).
HF_ARCHITECTURE = "InternVLForConditionalGeneration"

#: ``text_config.model_type`` -> the decoder's architecture string, for a text_config without
#: ``architectures`` (transformers' config classes do not write it); exact names, as the registry.
HF_TEXT_ARCHITECTURES = {
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "llama": "LlamaForCausalLM",
    "gpt_oss": "GptOssForCausalLM",
}

#: The ImageNet mean/std our tiling normalises with (``processing/image.py``), as preprocessor_config.json has them.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def hf_chat_template(folder: Path) -> str | None:
    """The HF-format folder's Jinja chat template: chat_template.jinja, else chat_template.json's
    ``chat_template`` (the processor's), else tokenizer_config.json's ``chat_template`` (as transformers looks)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{jinja}: cannot be read ({exc})") from exc
    for name in ("chat_template.json", "tokenizer_config.json"):
        file = folder / name
        if file.is_file():
            template = _read_json(file).get("chat_template")
            if isinstance(template, str):
                return template
    return None


def hf_generation_eos(folder: Path) -> tuple[int, ...]:
    """generation_config.json's ``eos_token_id`` (an id or a list of ids; none without the file or the key): the
    ids transformers' ``generate`` stops at on an HF-format folder."""
    file = folder / "generation_config.json"
    if not file.is_file():
        return ()
    eos = _Reader(_read_json(file), str(file)).get("eos_token_id", (int, list), None)
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ConfigError(f"{file}: eos_token_id must be a token id or a list of token ids, got {eos!r}")
    return tuple(ids)


#: The image tokens InternVL's prompts are built from (``processing/template.py``), by the names an HF-format
#: tokenizer_config.json gives them in ``extra_special_tokens`` (read by transformers' ``InternVLProcessor``).
HF_IMAGE_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>"}


def _check_hf_image_tokens(folder: Path) -> None:
    """The folder's image tokens must be InternVL's: the runtime writes ``<img>``, ``<IMG_CONTEXT>``, ``</img>``."""
    file = folder / "tokenizer_config.json"
    if not file.is_file():
        return
    extra = _read_json(file).get("extra_special_tokens")
    if not isinstance(extra, dict):
        return
    for name, ours in HF_IMAGE_TOKENS.items():
        theirs = extra.get(name, ours)
        if theirs != ours:
            raise ConfigError(f"{file}: extra_special_tokens.{name} is {theirs!r}; only InternVL's {ours!r} is "
                              "supported")


def _check_hf_image_seq_length(folder: Path, num_image_token: int) -> None:
    """processor_config.json's ``image_seq_length`` (tokens per tile the processor writes) must be what the
    vision tower gives: (image_size / patch_size)^2 x downsample_ratio^2."""
    file = folder / "processor_config.json"
    if not file.is_file():
        return
    length = _read_json(file).get("image_seq_length", num_image_token)
    if length != num_image_token:
        raise ConfigError(f"{file}: image_seq_length {length} differs from the {num_image_token} tokens a tile "
                          "gives (config.json's image and patch size, downsample_ratio)")


def _square(value: Any, key: str, where: str) -> Any:
    """transformers writes image_size / patch_size as [h, w]; the runtime's tiles are square."""
    if isinstance(value, list):
        if len(value) != 2 or value[0] != value[1]:
            raise ConfigError(f"{where}: {key} {value} is not square")
        return value[0]
    return value


def _from_hf_dict(data: dict[str, Any], source: str, processor: dict[str, Any],
                  chat_template: str | None) -> InternVLConfig:
    """transformers' ``InternVLConfig`` (+ its processor's settings) -> the runtime's typed view.

    Names mapped (theirs -> ours): vision ``attention_bias`` -> ``qkv_bias``, ``use_qk_norm`` ->
    ``qk_normalization``; ``text_config`` -> the LLM; ``vision_feature_layer`` -> ``select_layer``; the
    processor's ``min_patches``/``max_patches`` -> the tile limits. transformers' pixel shuffle is the
    reference's ``ps_version`` "v2"; ``vision_feature_select_strategy`` "default" drops the class token as
    the reference does. What transformers' model can do and ours cannot is refused by name.
    """
    r = _Reader(data, source)
    vision_data = dict(r.get("vision_config", dict))
    where_v = f"{source}: vision_config"
    rv = _Reader(vision_data, where_v)
    for flag, expected in (("use_mean_pooling", True), ("use_absolute_position_embeddings", True),
                           ("use_mask_token", False)):
        if rv.get(flag, bool, expected) is not expected:
            raise ConfigError(f"{where_v}: {flag}={not expected} is not supported (InternViT has {flag}={expected})")
    vision = VisionConfig.from_dict({
        "hidden_size": vision_data.get("hidden_size"), "intermediate_size": vision_data.get("intermediate_size"),
        "num_attention_heads": vision_data.get("num_attention_heads"),
        "num_hidden_layers": vision_data.get("num_hidden_layers"),
        "image_size": _square(vision_data.get("image_size", 448), "image_size", where_v),
        "patch_size": _square(vision_data.get("patch_size", 14), "patch_size", where_v),
        "num_channels": vision_data.get("num_channels", 3), "norm_type": vision_data.get("norm_type", "layer_norm"),
        "layer_norm_eps": vision_data.get("layer_norm_eps", 1e-6),
        "qk_normalization": vision_data.get("use_qk_norm", False),
        "qkv_bias": vision_data.get("attention_bias", False), "hidden_act": vision_data.get("hidden_act", "gelu"),
    }, where_v)
    text = dict(r.get("text_config", dict))
    where_t = f"{source}: text_config"
    if not text.get("architectures"):
        model_type = text.get("model_type")
        if model_type not in HF_TEXT_ARCHITECTURES:
            raise ConfigError(f"{where_t}: no 'architectures' and model_type {model_type!r} is not one of "
                              f"{', '.join(sorted(HF_TEXT_ARCHITECTURES))}")
        text["architectures"] = [HF_TEXT_ARCHITECTURES[model_type]]
    llm = LLMConfig.from_dict(text, where_t)
    strategy = r.get("vision_feature_select_strategy", str, "default")
    if strategy != "default":
        raise ConfigError(f"{source}: vision_feature_select_strategy {strategy!r} is not supported (only 'default')")
    layer = r.get("vision_feature_layer", int, -1)
    if layer != -1:   # transformers' own model reads another layer through a missing attribute: -1 only
        raise ConfigError(f"{source}: vision_feature_layer {layer} is not supported (only -1)")
    act = r.get("projector_hidden_act", str, "gelu")
    if act != "gelu":
        raise ConfigError(f"{source}: projector_hidden_act {act!r} is not supported (only 'gelu')")
    where_p = f"{source}: preprocessor_config.json"
    rp = _Reader(processor, where_p)
    size = rp.get("size", dict, {"height": vision.image_size, "width": vision.image_size})
    if (size.get("height"), size.get("width")) != (vision.image_size, vision.image_size):
        raise ConfigError(f"{where_p}: size {size} differs from the vision tower's {vision.image_size}px tiles")
    for key, wanted in (("image_mean", _IMAGENET_MEAN), ("image_std", _IMAGENET_STD)):
        value = rp.get(key, list, list(wanted))
        if tuple(float(x) for x in value) != wanted:
            raise ConfigError(f"{where_p}: {key} {value} is not supported (only ImageNet's {list(wanted)})")
    if chat_template is None:
        raise ConfigError(f"{source}: an HF-format checkpoint needs its chat template (chat_template.jinja, "
                          "chat_template.json or tokenizer_config.json's chat_template) beside config.json")
    cfg = InternVLConfig(
        vision=vision, llm=llm, template=None,
        downsample_ratio=r.get("downsample_ratio", float, 0.5), ps_version="v2", select_layer=-1,
        force_image_size=None, dynamic_image_size=True, use_thumbnail=True,
        min_dynamic_patch=rp.positive_int("min_patches", 1), max_dynamic_patch=rp.positive_int("max_patches", 12),
        torch_dtype=r.get("torch_dtype", str, None), system_message=None, checkpoint_format="hf",
        image_token_id=r.get("image_token_id", int, None), chat_template=chat_template, source=source, raw=data,
    )
    if cfg.min_dynamic_patch > cfg.max_dynamic_patch:
        raise ConfigError(f"{where_p}: min_patches > max_patches")
    inverse = 1 / cfg.downsample_ratio if cfg.downsample_ratio > 0 else 0.0
    if inverse < 1 or not math.isclose(inverse, round(inverse)):
        raise ConfigError(f"{source}: downsample_ratio {cfg.downsample_ratio} must be 1/k for an integer k")
    return cfg
