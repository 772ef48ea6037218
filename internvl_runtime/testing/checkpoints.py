"""Random-weight InternVL2 checkpoints in the exact official layout, for tests, benchmarks and --demo.

``write_checkpoint(folder, "1B")`` writes what a downloaded ``OpenGVLab/InternVL2-1B`` folder holds:
config.json (the real config's schema and flags; widths shrunk unless ``scale="real"``),
generation_config.json, safetensors weights under the official names (Qwen2/Llama q/k/v/gate/up,
Phi-3 fused qkv/gate_up, InternLM2 grouped ``wqkv``/w1/w2/w3; optionally sharded with
``model.safetensors.index.json``), and tokenizer files of the real kind (byte-level BPE for 1B and
76B, sentencepiece for the others; small vocabularies with the official special and InternVL tokens).
The weight names here are written from the official layout, independently of our model classes, so
loading them is a real test of the name tables.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import torch

VARIANTS = ("1B", "2B", "4B", "8B", "26B", "40B", "76B")
#: InternVL3.5 dense (issue #20): InternVL3.5-1B (Qwen3-0.6B, tied embeddings); config in ``real_configs_3_5.json``.
VARIANTS_3_5 = ("3_5-1B",)

#: Put before every answer of a random-weight (--demo) checkpoint, by the server and by the CLI.
DEMO_LABEL = "[random-weight demo model] "

_HERE = Path(__file__).resolve().parent
# Per variant: bos/eos/pad ids of the vendored tokenizer (its vocab is tiny; see tokenizers/<v>/).
_TOKEN_IDS = {
    "1B": (700, 702, None, 712), "2B": (1, 2, 2, 609), "4B": (1, 600, 600, 620), "8B": (1, 2, 2, 609),
    "26B": (1, 2, 2, 609), "40B": (1, 7, 0, 609), "76B": (700, 703, None, 725),
    "3_5-1B": (700, 702, None, 735),
}


def real_config(variant: str) -> dict[str, Any]:
    """The released config.json of InternVL2-<variant> (``real_configs.json`` beside this module), or of
    InternVL3.5 for "3_5-*" (``real_configs_3_5.json``)."""
    if variant not in VARIANTS + VARIANTS_3_5:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS + VARIANTS_3_5)}")
    file = "real_configs_3_5.json" if variant in VARIANTS_3_5 else "real_configs.json"
    configs = json.loads((_HERE / file).read_text(encoding="utf-8"))
    return copy.deepcopy(configs[variant])


def make_config(variant: str, scale: str = "tiny") -> dict[str, Any]:
    """config.json for a variant: ``scale='real'`` keeps every width, ``'tiny'`` shrinks widths and
    depth (keeping patch and image size, head-count divisibility quirks such as InternViT-6B's
    non-power-of-two heads, and every flag)."""
    config = real_config(variant)
    bos, eos, pad, vocab = _TOKEN_IDS[variant]
    llm, vit = config["llm_config"], config["vision_config"]
    llm.update(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    if scale == "real":
        return config
    if scale != "tiny":
        raise ValueError(f"scale must be 'tiny' or 'real', got {scale!r}")
    six_b = vit["norm_type"] == "rms_norm"
    vit.update(hidden_size=40 if six_b else 64, num_attention_heads=5 if six_b else 4,
               intermediate_size=160 if six_b else 128, num_hidden_layers=2)
    heads, kv = (4, 4) if llm["architectures"][0] == "Phi3ForCausalLM" else (8, 2)
    llm.update(hidden_size=64, num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=128,
               num_hidden_layers=2, vocab_size=vocab)
    if "max_window_layers" in llm:
        llm["max_window_layers"] = 2
    if "head_dim" in llm:  # Qwen3 states head_dim; as in the real ones, heads x head_dim != hidden_size
        llm["head_dim"] = 16
    scaling = llm.get("rope_scaling") or {}
    if scaling.get("type") == "su":
        half = 64 // heads // 2
        step = len(scaling["short_factor"]) // half
        scaling["short_factor"] = scaling["short_factor"][::step][:half]
        scaling["long_factor"] = scaling["long_factor"][::step][:half]
    config["torch_dtype"] = llm["torch_dtype"] = vit["torch_dtype"] = "float32"
    return config


def official_tensor_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor names and shapes, in the official layout of the config's LLM family."""
    vit, llm = config["vision_config"], config["llm_config"]
    d, inter = vit["hidden_size"], vit["intermediate_size"]
    grid = (config.get("force_image_size") or vit["image_size"]) // vit["patch_size"]
    shapes: dict[str, tuple[int, ...]] = {
        "vision_model.embeddings.class_embedding": (1, 1, d),
        "vision_model.embeddings.patch_embedding.weight": (d, 3, vit["patch_size"], vit["patch_size"]),
        "vision_model.embeddings.patch_embedding.bias": (d,),
        "vision_model.embeddings.position_embedding": (1, grid * grid + 1, d),
    }
    layer_norm = vit["norm_type"] == "layer_norm"
    for i in range(vit["num_hidden_layers"]):
        p = f"vision_model.encoder.layers.{i}."
        shapes.update({p + "attn.qkv.weight": (3 * d, d), p + "attn.proj.weight": (d, d), p + "attn.proj.bias": (d,),
                       p + "ls1": (d,), p + "ls2": (d,), p + "mlp.fc1.weight": (inter, d), p + "mlp.fc1.bias": (inter,),
                       p + "mlp.fc2.weight": (d, inter), p + "mlp.fc2.bias": (d,),
                       p + "norm1.weight": (d,), p + "norm2.weight": (d,)})
        if vit["qkv_bias"]:
            shapes[p + "attn.qkv.bias"] = (3 * d,)
        if layer_norm:
            shapes[p + "norm1.bias"] = (d,)
            shapes[p + "norm2.bias"] = (d,)
        if vit["qk_normalization"]:
            shapes[p + "attn.q_norm.weight"] = (d,)
            shapes[p + "attn.k_norm.weight"] = (d,)
    width = d * round(1 / config["downsample_ratio"]) ** 2
    h = llm["hidden_size"]
    shapes.update({"mlp1.0.weight": (width,), "mlp1.0.bias": (width,), "mlp1.1.weight": (h, width),
                   "mlp1.1.bias": (h,), "mlp1.3.weight": (h, h), "mlp1.3.bias": (h,)})

    arch = llm["architectures"][0]
    heads, kv, vocab = llm["num_attention_heads"], llm["num_key_value_heads"], llm["vocab_size"]
    hd, ff = llm.get("head_dim") or h // heads, llm["intermediate_size"]
    lm = "language_model."
    if arch == "InternLM2ForCausalLM":
        shapes[lm + "model.tok_embeddings.weight"] = (vocab, h)
        shapes[lm + "output.weight"] = (vocab, h)
        shapes[lm + "model.norm.weight"] = (h,)
        for i in range(llm["num_hidden_layers"]):
            p = f"{lm}model.layers.{i}."
            shapes.update({p + "attention.wqkv.weight": ((heads + 2 * kv) * hd, h), p + "attention.wo.weight": (h, h),
                           p + "feed_forward.w1.weight": (ff, h), p + "feed_forward.w3.weight": (ff, h),
                           p + "feed_forward.w2.weight": (h, ff), p + "attention_norm.weight": (h,),
                           p + "ffn_norm.weight": (h,)})
        return shapes
    shapes[lm + "model.embed_tokens.weight"] = (vocab, h)
    if not llm.get("tie_word_embeddings", False):
        shapes[lm + "lm_head.weight"] = (vocab, h)
    shapes[lm + "model.norm.weight"] = (h,)
    for i in range(llm["num_hidden_layers"]):
        p = f"{lm}model.layers.{i}."
        shapes.update({p + "self_attn.o_proj.weight": (h, heads * hd), p + "mlp.down_proj.weight": (h, ff),
                       p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)})
        if arch == "Phi3ForCausalLM":
            shapes[p + "self_attn.qkv_proj.weight"] = ((heads + 2 * kv) * hd, h)
            shapes[p + "mlp.gate_up_proj.weight"] = (2 * ff, h)
            continue
        shapes.update({p + "self_attn.q_proj.weight": (heads * hd, h), p + "self_attn.k_proj.weight": (kv * hd, h),
                       p + "self_attn.v_proj.weight": (kv * hd, h), p + "mlp.gate_proj.weight": (ff, h),
                       p + "mlp.up_proj.weight": (ff, h)})
        if arch == "Qwen3ForCausalLM":
            shapes.update({p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)})
        if arch == "Qwen2ForCausalLM" or llm.get("attention_bias"):
            shapes.update({p + "self_attn.q_proj.bias": (heads * hd,), p + "self_attn.k_proj.bias": (kv * hd,),
                           p + "self_attn.v_proj.bias": (kv * hd,)})
    return shapes


def _random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype,
                   embed_std: float = 0.5) -> torch.Tensor:
    """Drawn on the generator's device (a CUDA generator writes an 8B checkpoint in seconds), returned on the CPU.
    ``embed_std``: the scale of the token embeddings (smaller where they are tied to the LM head)."""
    def randn() -> torch.Tensor:
        return torch.randn(shape, generator=generator, device=generator.device)

    if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "layernorm.weight", "mlp1.0.weight",
                      "attention_norm.weight", "ffn_norm.weight")):
        return (1.0 + 0.1 * randn()).to(dtype).cpu()
    if name.endswith(("ls1", "ls2")):
        return (0.1 + 0.05 * randn()).to(dtype).cpu()
    std = 0.02 if len(shape) < 2 else min(0.5, 1.0 / (shape[-1] ** 0.5))
    if "embed" in name or "position_embedding" in name or "class_embedding" in name:
        std = embed_std if name.endswith("embed_tokens.weight") else 0.5
    return (std * randn()).to(dtype).cpu()


def write_checkpoint(folder: str | Path, variant: str = "1B", *, scale: str = "tiny", seed: int = 0,
                     num_shards: int = 1, dtype: torch.dtype | None = None,
                     config_overrides: dict[str, Any] | None = None, device: str | torch.device = "cpu") -> Path:
    """Write a random-weight checkpoint folder; returns its path. ``dtype`` defaults to float32 for
    tiny and bfloat16 (as released) for real scale. ``device``: where the values are drawn (``cuda``: the
    real 8B shapes in seconds instead of minutes; other values than the CPU's for the same seed)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = make_config(variant, scale)
    for key, value in (config_overrides or {}).items():
        config[key] = value
    dtype = dtype or (torch.float32 if scale == "tiny" else torch.bfloat16)
    dtype_name = str(dtype).removeprefix("torch.")
    config["torch_dtype"] = config["llm_config"]["torch_dtype"] = config["vision_config"]["torch_dtype"] = dtype_name
    (folder / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    llm = config["llm_config"]
    generation = {"_from_model_config": True, "bos_token_id": llm["bos_token_id"],
                  "eos_token_id": llm["eos_token_id"], "transformers_version": "4.37.2"}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2), encoding="utf-8")
    for file in (_HERE / "tokenizers" / variant).iterdir():
        shutil.copyfile(file, folder / file.name)

    generator = torch.Generator(device=device).manual_seed(seed)
    shapes = official_tensor_shapes(config)
    # Tied to the LM head, token embeddings at 0.5 make each token's own logit dominate: greedy answers repeat
    # the prompt's last token. At Qwen's initializer range the answers of a random model stay varied.
    embed_std = 0.02 if llm.get("tie_word_embeddings", False) else 0.5
    names = list(shapes)
    num_shards = max(1, min(num_shards, len(names)))
    per_shard = -(-len(names) // num_shards)
    weight_map, total = {}, 0
    for s in range(num_shards):
        chunk = names[s * per_shard:(s + 1) * per_shard]
        tensors = {n: _random_tensor(n, shapes[n], generator, dtype, embed_std) for n in chunk}
        if variant in VARIANTS_3_5:
            # The InternVL3.5 code builds mlp1 in bfloat16 (``.to(torch.bfloat16)`` in __init__), so the values
            # it loads are bf16 values whatever the stored dtype: stored as such, a float32 run loses nothing.
            tensors.update({n: t.to(torch.bfloat16).to(dtype) for n, t in tensors.items() if n.startswith("mlp1.")})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        shard = "model.safetensors" if num_shards == 1 else f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors"
        save_file(tensors, str(folder / shard), metadata={"format": "pt"})
        weight_map.update({n: shard for n in chunk})
        del tensors
    if num_shards > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return folder
