"""InternVLConfig: the seven tiny fixture configs, the seven released configs, and every bad input."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from internvl_runtime.config import InternVLConfig
from internvl_runtime.errors import ConfigError, InternVLError, UnknownArchitectureError
from internvl_runtime.models.internvl import build_model
from internvl_runtime.testing.checkpoints import VARIANTS, make_config
from paths import FIXTURES

SHARED = FIXTURES
CKPT = SHARED / "ckpt"

# variant -> (LLM architecture, template, LLM head_dim, ViT head_dim, rope scaling type) of the released models
REAL = {
    "1B": ("Qwen2ForCausalLM", "Hermes-2", 64, 64, None),
    "2B": ("InternLM2ForCausalLM", "internlm2-chat", 128, 64, "dynamic"),
    "4B": ("Phi3ForCausalLM", "phi3-chat", 96, 64, "su"),
    "8B": ("InternLM2ForCausalLM", "internlm2-chat", 128, 64, "dynamic"),
    "26B": ("InternLM2ForCausalLM", "internlm2-chat", 128, 128, "dynamic"),
    "40B": ("LlamaForCausalLM", "Hermes-2", 128, 128, None),
    "76B": ("LlamaForCausalLM", "internlm2-chat", 128, 128, None),
}


# --------------------------------------------------------------------------------------------------
# Good configs
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_tiny_fixture_configs_parse(variant: str) -> None:
    folder = CKPT / f"tiny-{variant}"
    raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    cfg = InternVLConfig.from_pretrained(folder)
    arch, template, _, _, rope = REAL[variant]
    assert cfg.llm.architecture == arch == raw["llm_config"]["architectures"][0]
    assert cfg.template == template == raw["template"]
    assert cfg.source == str(folder / "config.json")
    assert cfg.llm.hidden_size == raw["llm_config"]["hidden_size"]
    assert cfg.llm.num_attention_heads == raw["llm_config"]["num_attention_heads"]
    assert cfg.llm.num_key_value_heads == raw["llm_config"]["num_key_value_heads"]
    assert cfg.llm.vocab_size == raw["llm_config"]["vocab_size"]
    assert cfg.llm.head_dim * cfg.llm.num_attention_heads == cfg.llm.hidden_size
    assert cfg.vision.head_dim * cfg.vision.num_attention_heads == cfg.vision.hidden_size
    assert cfg.vision.norm_type == raw["vision_config"]["norm_type"]
    assert cfg.ps_version == raw["ps_version"]
    assert cfg.select_layer == raw["select_layer"]
    assert cfg.image_size == (raw.get("force_image_size") or raw["vision_config"]["image_size"])
    # 448-pixel tiles give 256 tokens; tiny-2B uses 224-pixel tiles, 64 tokens
    assert cfg.num_image_token == (64 if variant == "2B" else 256)
    assert (cfg.llm.rope_scaling.type if cfg.llm.rope_scaling else None) == rope
    assert cfg.raw == raw


@pytest.mark.parametrize("variant", VARIANTS)
def test_real_configs_parse(variant: str) -> None:
    raw = make_config(variant, "real")
    cfg = InternVLConfig.from_dict(raw, f"InternVL2-{variant}/config.json")
    arch, template, llm_head_dim, vit_head_dim, rope = REAL[variant]
    assert cfg.num_image_token == 256
    assert cfg.image_size == 448
    assert cfg.llm.architecture == arch
    assert cfg.template == template
    assert cfg.llm.head_dim == llm_head_dim
    assert cfg.vision.head_dim == vit_head_dim
    assert cfg.llm.num_attention_heads % cfg.llm.num_key_value_heads == 0
    if rope is None:
        assert cfg.llm.rope_scaling is None
    else:
        assert cfg.llm.rope_scaling is not None and cfg.llm.rope_scaling.type == rope
    if rope == "dynamic":
        assert cfg.llm.rope_scaling.factor >= 1.0
    if rope == "su":
        half = llm_head_dim // 2
        assert len(cfg.llm.rope_scaling.short_factor) == len(cfg.llm.rope_scaling.long_factor) == half
        assert cfg.llm.original_max_position_embeddings == 4096
    # the 6B ViT (26B/40B/76B) has RMSNorm + q/k norm and no qkv bias; the 300M one LayerNorm + bias
    six_b = variant in ("26B", "40B", "76B")
    assert cfg.vision.norm_type == ("rms_norm" if six_b else "layer_norm")
    assert cfg.vision.qk_normalization is six_b
    assert cfg.vision.qkv_bias is not six_b


def test_defaults_for_optional_fields() -> None:
    raw = make_config("1B")
    for key in ("ps_version", "select_layer", "downsample_ratio", "force_image_size", "max_dynamic_patch",
                "min_dynamic_patch", "use_thumbnail", "dynamic_image_size", "torch_dtype"):
        raw.pop(key, None)
    cfg = InternVLConfig.from_dict(raw)
    assert (cfg.ps_version, cfg.select_layer, cfg.downsample_ratio) == ("v1", -1, 0.5)
    assert (cfg.min_dynamic_patch, cfg.max_dynamic_patch, cfg.use_thumbnail) == (1, 6, True)
    assert cfg.image_size == raw["vision_config"]["image_size"]
    assert cfg.torch_dtype is None


def test_integer_accepted_for_float_field() -> None:
    raw = make_config("1B")
    raw["llm_config"]["rope_theta"] = 10000
    assert InternVLConfig.from_dict(raw).llm.rope_theta == 10000.0


# --------------------------------------------------------------------------------------------------
# Bad folders and files
# --------------------------------------------------------------------------------------------------

def _write(folder: Path, data: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(data), encoding="utf-8")
    return folder


def _error(folder: Path, *fragments: str, kind: type[Exception] = ConfigError) -> str:
    with pytest.raises(kind) as info:
        InternVLConfig.from_pretrained(folder)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def test_folder_missing(tmp_path: Path) -> None:
    _error(tmp_path / "nowhere", str(tmp_path / "nowhere"), "does not exist")


def test_folder_is_a_file(tmp_path: Path) -> None:
    file = tmp_path / "a_file"
    file.write_text("x")
    _error(file, str(file))


def test_no_config_json(tmp_path: Path) -> None:
    shutil.copytree(CKPT / "tiny-1B", tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").unlink()
    _error(tmp_path / "ckpt", str(tmp_path / "ckpt"), "config.json")


@pytest.mark.parametrize("text", ["{not json", "", "\xff\xfe garbage"])
def test_invalid_json(tmp_path: Path, text: str) -> None:
    (tmp_path / "config.json").write_bytes(text.encode("latin-1"))
    _error(tmp_path, str(tmp_path / "config.json"), "JSON")


def test_top_level_not_an_object(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("[1, 2]", encoding="utf-8")
    _error(tmp_path, str(tmp_path / "config.json"), "JSON object")


def test_model_type_wrong(tmp_path: Path) -> None:
    raw = make_config("1B")
    raw["model_type"] = "llava"
    _error(_write(tmp_path, raw), str(tmp_path / "config.json"), "model_type", "llava")


@pytest.mark.parametrize("key", ["llm_config", "vision_config", "template"])
def test_missing_top_level_section(tmp_path: Path, key: str) -> None:
    raw = make_config("8B")
    del raw[key]
    _error(_write(tmp_path, raw), str(tmp_path / "config.json"), f"'{key}'", "missing")


@pytest.mark.parametrize("key", ["llm_config", "vision_config"])
def test_section_of_wrong_type(tmp_path: Path, key: str) -> None:
    raw = make_config("1B")
    raw[key] = "oops"
    _error(_write(tmp_path, raw), str(tmp_path / "config.json"), f"'{key}'")


@pytest.mark.parametrize(("section", "key"), [
    ("llm_config", "hidden_size"), ("llm_config", "num_attention_heads"), ("llm_config", "num_hidden_layers"),
    ("llm_config", "vocab_size"), ("llm_config", "intermediate_size"),
    ("vision_config", "hidden_size"), ("vision_config", "patch_size"), ("vision_config", "image_size"),
    ("vision_config", "num_hidden_layers"),
])
def test_required_numeric_field_missing(tmp_path: Path, section: str, key: str) -> None:
    raw = make_config("1B")
    del raw[section][key]
    _error(_write(tmp_path, raw), str(tmp_path / "config.json"), section, f"'{key}'", "missing")


@pytest.mark.parametrize(("section", "key", "value"), [
    ("llm_config", "hidden_size", "64"),
    ("llm_config", "hidden_size", 64.0),
    ("llm_config", "num_hidden_layers", True),
    ("llm_config", "vocab_size", [712]),
    ("llm_config", "rms_norm_eps", "1e-6"),
    ("vision_config", "patch_size", 14.5),
    ("vision_config", "image_size", "448"),
    ("vision_config", "qkv_bias", 1),
])
def test_field_of_wrong_type(tmp_path: Path, section: str, key: str, value: Any) -> None:
    raw = make_config("1B")
    raw[section][key] = value
    _error(_write(tmp_path, raw), str(tmp_path / "config.json"), section, f"'{key}'", "must be")


@pytest.mark.parametrize(("key", "value"), [("select_layer", "-1"), ("downsample_ratio", "0.5"),
                                            ("max_dynamic_patch", 6.0), ("template", 2)])
def test_top_level_field_of_wrong_type(tmp_path: Path, key: str, value: Any) -> None:
    raw = make_config("1B")
    raw[key] = value
    _error(_write(tmp_path, raw), str(tmp_path / "config.json"), f"'{key}'", "must be")


@pytest.mark.parametrize(("section", "key"), [("llm_config", "hidden_size"), ("llm_config", "num_hidden_layers"),
                                              ("vision_config", "patch_size"), ("llm_config", "vocab_size")])
def test_non_positive_size(tmp_path: Path, section: str, key: str) -> None:
    raw = make_config("1B")
    raw[section][key] = 0
    _error(_write(tmp_path, raw), str(tmp_path / "config.json"), f"'{key}'", "> 0")


def test_architectures_empty(tmp_path: Path) -> None:
    raw = make_config("1B")
    raw["llm_config"]["architectures"] = []
    _error(_write(tmp_path, raw), str(tmp_path / "config.json"), "architectures")


def test_unknown_architecture(tmp_path: Path) -> None:
    """Parsing keeps the exact string; building the model looks it up and names it, the field and the file."""
    raw = make_config("1B")
    raw["llm_config"]["architectures"] = ["MistralForCausalLM"]
    folder = _write(tmp_path, raw)
    assert InternVLConfig.from_pretrained(folder).llm.architecture == "MistralForCausalLM"
    with pytest.raises(UnknownArchitectureError) as info:
        build_model(folder)
    message = str(info.value)
    assert isinstance(info.value, ConfigError)
    for fragment in ("MistralForCausalLM", "architectures", str(folder / "config.json"), "Qwen2ForCausalLM"):
        assert fragment in message, (fragment, message)


def test_no_fuzzy_architecture_match(tmp_path: Path) -> None:
    raw = make_config("1B")
    raw["llm_config"]["architectures"] = ["qwen2forcausallm"]
    with pytest.raises(UnknownArchitectureError, match="qwen2forcausallm"):
        build_model(_write(tmp_path, raw))


@pytest.mark.parametrize("section", ["llm_config", "vision_config"])
def test_heads_not_dividing_hidden(tmp_path: Path, section: str) -> None:
    raw = make_config("1B")
    raw[section]["num_attention_heads"] = 5 if raw[section]["hidden_size"] % 5 else 7
    _error(_write(tmp_path, raw), str(tmp_path / "config.json"), section, "hidden_size", "num_attention_heads")


def test_kv_heads_not_dividing_heads(tmp_path: Path) -> None:
    raw = make_config("8B")
    raw["llm_config"]["num_key_value_heads"] = 3
    _error(_write(tmp_path, raw), str(tmp_path / "config.json"), "llm_config", "num_key_value_heads")


def test_ps_version_unknown(tmp_path: Path) -> None:
    raw = make_config("1B")
    raw["ps_version"] = "v3"
    _error(_write(tmp_path, raw), str(tmp_path / "config.json"), "ps_version", "v3")


@pytest.mark.parametrize("select_layer", [3, -4, 100, -100])
def test_select_layer_out_of_range(tmp_path: Path, select_layer: int) -> None:
    raw = make_config("1B")  # tiny ViT: 2 layers -> 3 hidden states, indices -3..2
    assert raw["vision_config"]["num_hidden_layers"] == 2
    raw["select_layer"] = select_layer
    _error(_write(tmp_path, raw), str(tmp_path / "config.json"), "select_layer", str(select_layer))


@pytest.mark.parametrize("select_layer", [-3, -1, 0, 2])
def test_select_layer_in_range(tmp_path: Path, select_layer: int) -> None:
    raw = make_config("1B")
    raw["select_layer"] = select_layer
    assert InternVLConfig.from_pretrained(_write(tmp_path, raw)).select_layer == select_layer


@pytest.mark.parametrize("ratio", [0.3, 0, -0.5])
def test_downsample_ratio_invalid(tmp_path: Path, ratio: float) -> None:
    raw = make_config("1B")
    raw["downsample_ratio"] = ratio
    _error(_write(tmp_path, raw), str(tmp_path / "config.json"), "downsample_ratio")


@pytest.mark.parametrize("name", ["short_factor", "long_factor"])
def test_su_rope_factor_length_wrong(tmp_path: Path, name: str) -> None:
    raw = make_config("4B")
    raw["llm_config"]["rope_scaling"][name] = raw["llm_config"]["rope_scaling"][name][:-1]
    _error(_write(tmp_path, raw), str(tmp_path / "config.json"), "rope_scaling", name)


def test_su_rope_without_original_max(tmp_path: Path) -> None:
    raw = make_config("4B")
    del raw["llm_config"]["original_max_position_embeddings"]
    _error(_write(tmp_path, raw), str(tmp_path / "config.json"), "original_max_position_embeddings")


def test_rope_scaling_unknown_type(tmp_path: Path) -> None:
    raw = make_config("8B")
    raw["llm_config"]["rope_scaling"] = {"type": "llama3", "factor": 2.0}   # yarn is known since GPT-OSS
    _error(_write(tmp_path, raw), str(tmp_path / "config.json"), "rope_scaling", "llama3")


def test_rope_scaling_missing_factor(tmp_path: Path) -> None:
    raw = make_config("8B")
    raw["llm_config"]["rope_scaling"] = {"type": "dynamic"}
    _error(_write(tmp_path, raw), str(tmp_path / "config.json"), "rope_scaling", "'factor'")


@pytest.mark.parametrize(("section", "key", "value"), [("llm_config", "hidden_act", "gelu"),
                                                       ("vision_config", "hidden_act", "relu"),
                                                       ("vision_config", "norm_type", "batch_norm")])
def test_unsupported_values(tmp_path: Path, section: str, key: str, value: str) -> None:
    raw = make_config("1B")
    raw[section][key] = value
    _error(_write(tmp_path, raw), str(tmp_path / "config.json"), section, key, value)


def test_min_patch_above_max(tmp_path: Path) -> None:
    raw = make_config("1B")
    raw["min_dynamic_patch"], raw["max_dynamic_patch"] = 8, 4
    _error(_write(tmp_path, raw), str(tmp_path / "config.json"), "min_dynamic_patch")


def test_errors_belong_to_the_tree() -> None:
    assert issubclass(ConfigError, InternVLError)
    assert issubclass(UnknownArchitectureError, ConfigError)
    raw = copy.deepcopy(make_config("1B"))
    del raw["llm_config"]
    with pytest.raises(InternVLError):
        InternVLConfig.from_dict(raw)
