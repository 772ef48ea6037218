"""The HF format's config mapping and tensor-name table (``config.py``, ``models/hf_format.py``) on the tiny
InternVL3-1B-hf folder: both tensor layouts transformers loads, and what is refused by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from internvl_runtime import AutoModel, AutoTokenizer
from internvl_runtime.config import InternVLConfig
from internvl_runtime.errors import ConfigError, WeightMismatchError
from internvl_runtime.models.hf_format import github_name
from internvl_runtime.models.internvl import build_model
from internvl_runtime.processing.inputs import InputProcessor
from internvl_runtime.testing.checkpoints import HF_VARIANTS, write_hf_checkpoint
from paths import FIXTURES

CHECKPOINT = FIXTURES / "ckpt" / "tiny-3-1B-hf"

# transformers' older layout (what it still loads through InternVLForConditionalGeneration's
# _checkpoint_conversion_mapping): ours -> theirs
_OLD_LAYOUT = (("model.language_model.", "language_model.model."), ("model.vision_tower.", "vision_tower."),
               ("model.multi_modal_projector.", "multi_modal_projector."), ("lm_head.", "language_model.lm_head."))


def _copy(tmp_path: Path) -> Path:
    folder = tmp_path / "ckpt"
    shutil.copytree(CHECKPOINT, folder)
    return folder


def _edit_config(folder: Path, edit) -> None:
    file = folder / "config.json"
    config = json.loads(file.read_text(encoding="utf-8"))
    edit(config)
    file.write_text(json.dumps(config), encoding="utf-8")


def test_config_maps_the_hf_names() -> None:
    config = InternVLConfig.from_pretrained(CHECKPOINT)
    assert config.checkpoint_format == "hf" and config.template is None
    assert config.llm.architecture == "Qwen2ForCausalLM"
    assert (config.vision.qkv_bias, config.vision.qk_normalization, config.vision.image_size) == (True, False, 448)
    assert (config.ps_version, config.select_layer, config.num_image_token) == ("v2", -1, 256)
    assert (config.min_dynamic_patch, config.max_dynamic_patch) == (1, 12)       # preprocessor_config.json
    assert config.image_token_id == 705
    assert config.chat_template == (CHECKPOINT / "chat_template.jinja").read_text(encoding="utf-8")
    assert config.llm_config.num_hidden_layers == 2                                # text_config, by the old name


def test_the_qwen3_text_config_keeps_its_head_dim() -> None:
    """InternVL3.5-1B-HF: Qwen3 with heads x head_dim (4 x 32) apart from hidden_size (64), q/k norms loaded."""
    config = InternVLConfig.from_pretrained(FIXTURES / "ckpt" / "tiny-3_5-1B-HF")
    assert (config.llm.architecture, config.llm.head_dim, config.llm.hidden_size) == ("Qwen3ForCausalLM", 32, 64)
    state = build_model(FIXTURES / "ckpt" / "tiny-3_5-1B-HF").state_dict()
    tensors = load_file(str(FIXTURES / "ckpt" / "tiny-3_5-1B-HF" / "model.safetensors"))
    assert torch.equal(state["language_model.model.layers.1.self_attn.k_norm.weight"],
                       tensors["model.language_model.layers.1.self_attn.k_norm.weight"])


def test_every_tensor_name_maps_and_the_older_layout_loads_the_same(tmp_path: Path) -> None:
    tensors = load_file(str(CHECKPOINT / "model.safetensors"))
    mapped = {name: github_name(name) for name in tensors}
    assert all(m is not None for m in mapped.values())
    assert mapped["model.vision_tower.encoder.layer.1.attention.k_proj.bias"] == (
        "vision_model.encoder.layers.1.attn.qkv.bias", "k")
    assert mapped["model.multi_modal_projector.linear_2.weight"] == ("mlp1.3.weight", None)
    assert mapped["lm_head.weight"] == ("language_model.lm_head.weight", None)

    folder = _copy(tmp_path)
    old = {}
    for name, tensor in tensors.items():
        for ours, theirs in _OLD_LAYOUT:
            if name.startswith(ours):
                name = theirs + name[len(ours):]
                break
        old[name] = tensor
    save_file(old, str(folder / "model.safetensors"))
    new_state = build_model(CHECKPOINT).state_dict()
    old_state = build_model(folder).state_dict()
    assert new_state.keys() == old_state.keys()
    assert all(torch.equal(new_state[k], old_state[k]) for k in new_state)
    # the fused vision qkv holds q, k, v in that order
    qkv = new_state["vision_model.encoder.layers.0.attn.qkv.weight"]
    q = tensors["model.vision_tower.encoder.layer.0.attention.q_proj.weight"]
    v = tensors["model.vision_tower.encoder.layer.0.attention.v_proj.weight"]
    assert torch.equal(qkv[:q.shape[0]], q) and torch.equal(qkv[-v.shape[0]:], v)


def test_a_tensor_outside_the_layout_is_named(tmp_path: Path) -> None:
    folder = _copy(tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.vision_tower.encoder.layer.0.attention.extra.weight"] = torch.zeros(2)
    tensors["something_else.weight"] = torch.zeros(2)
    del tensors["model.vision_tower.encoder.layer.1.attention.v_proj.bias"]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(WeightMismatchError) as info:
        build_model(folder)
    message = str(info.value)
    assert "something_else.weight" in message and "attention.extra.weight" in message
    assert "vision_model.encoder.layers.1.attn.qkv.bias (shards ['v'])" in message


@pytest.mark.parametrize(("edit", "words"), [
    (lambda c: c["vision_config"].update(use_mean_pooling=False), "use_mean_pooling"),
    (lambda c: c.update(vision_feature_layer=-2), "vision_feature_layer"),
    (lambda c: c.update(vision_feature_select_strategy="full"), "vision_feature_select_strategy"),
    (lambda c: c["vision_config"].update(image_size=[448, 224]), "not square"),
    (lambda c: c["text_config"].update(architectures=None, model_type="mamba"), "model_type 'mamba'"),
])
def test_what_the_runtime_cannot_do_is_refused_by_name(tmp_path: Path, edit, words: str) -> None:
    folder = _copy(tmp_path)
    _edit_config(folder, edit)
    with pytest.raises(ConfigError, match=words):
        InternVLConfig.from_pretrained(folder)


def test_text_config_without_architectures_uses_its_model_type(tmp_path: Path) -> None:
    folder = _copy(tmp_path)
    _edit_config(folder, lambda c: c["text_config"].pop("architectures"))
    assert InternVLConfig.from_pretrained(folder).llm.architecture == "Qwen2ForCausalLM"


def test_processor_settings_and_the_chat_template_come_from_the_folder(tmp_path: Path) -> None:
    folder = _copy(tmp_path)
    processor = json.loads((folder / "preprocessor_config.json").read_text(encoding="utf-8"))
    (folder / "preprocessor_config.json").write_text(json.dumps({**processor, "max_patches": 4}), encoding="utf-8")
    template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    (folder / "chat_template.jinja").unlink()
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": template}), encoding="utf-8")
    config = InternVLConfig.from_pretrained(folder)
    assert config.max_dynamic_patch == 4 and config.chat_template == template
    (folder / "chat_template.json").unlink()
    (folder / "preprocessor_config.json").write_text(json.dumps({**processor, "image_mean": [0.5, 0.5, 0.5]}),
                                                     encoding="utf-8")
    with pytest.raises(ConfigError, match="image_mean"):
        InternVLConfig.from_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(processor), encoding="utf-8")
    with pytest.raises(ConfigError, match="chat template"):        # none left in the folder
        InternVLConfig.from_pretrained(folder)


def test_the_official_chat_needs_an_official_template() -> None:
    """``chat()`` builds the GitHub format's prompts; an HF-format folder has no template for them."""
    model = AutoModel.from_pretrained(CHECKPOINT, torch_dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(CHECKPOINT)
    with pytest.raises(ConfigError, match="chat template"):
        model.chat(tokenizer, None, "Hello", {"max_new_tokens": 2})


def test_image_tokens_must_be_internvls(tmp_path: Path) -> None:
    """The folder names its image tokens (tokenizer_config.json's extra_special_tokens) and config.json the
    image token's id: both must agree with the prompts the runtime writes."""
    folder = _copy(tmp_path)
    file = folder / "tokenizer_config.json"
    tokenizer_config = json.loads(file.read_text(encoding="utf-8"))
    tokenizer_config["extra_special_tokens"]["context_image_token"] = "<IMAGE>"
    file.write_text(json.dumps(tokenizer_config), encoding="utf-8")
    with pytest.raises(ConfigError, match="context_image_token"):
        InternVLConfig.from_pretrained(folder)

    folder = _copy(tmp_path / "second")
    (folder / "processor_config.json").write_text(json.dumps({"image_seq_length": 64}), encoding="utf-8")
    with pytest.raises(ConfigError, match="image_seq_length 64"):
        InternVLConfig.from_pretrained(folder)
    (folder / "processor_config.json").unlink()
    _edit_config(folder, lambda c: c.update(image_token_id=704))        # </img>'s id, not <IMG_CONTEXT>'s
    model = build_model(folder)
    with pytest.raises(ConfigError, match="image_token_id is 704"):
        InputProcessor.for_model(model, AutoTokenizer.from_pretrained(folder))


@pytest.mark.parametrize("variant", HF_VARIANTS)
def test_the_writer_reproduces_the_committed_tiny_folders(tmp_path: Path, variant: str) -> None:
    """The goldens belong to these exact files: ``write_hf_checkpoint`` must still write them, byte for byte."""
    folder = write_hf_checkpoint(tmp_path / variant, variant, seed=7)
    committed = FIXTURES / "ckpt" / f"tiny-{variant}"
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in committed.iterdir())
    for file in folder.iterdir():
        assert file.read_bytes() == (committed / file.name).read_bytes(), file.name
