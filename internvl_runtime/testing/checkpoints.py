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
#: The successors on the same decoders (issue #20): InternVL2.5-1B (Qwen2.5), InternVL2.5-8B (InternLM2.5),
#: InternVL3-1B (Qwen2.5); their configs are in ``real_configs_2_5_3.json``.
VARIANTS_2_5_3 = ("2_5-1B", "2_5-8B", "3-1B")
#: Every released size of InternVL2.5 and InternVL3 on these decoders (``real_config`` only; InternVL3-9B's
#: InternLM3 decoder is not supported).
RELEASED_2_5_3 = ("2_5-1B", "2_5-2B", "2_5-4B", "2_5-8B", "2_5-26B", "2_5-38B", "2_5-78B",
                  "3-1B", "3-2B", "3-8B", "3-14B", "3-38B", "3-78B")
#: InternVL3.5 with a Qwen3-MoE decoder (issue #20); its released config is in ``real_configs_3_5_moe.json``.
VARIANTS_3_5_MOE = ("3_5-30B-A3B",)
#: InternVL3.5 dense (issue #20): InternVL3.5-1B (Qwen3-0.6B, tied embeddings); config in ``real_configs_3_5.json``.
VARIANTS_3_5 = ("3_5-1B",)
ALL_VARIANTS = VARIANTS + VARIANTS_2_5_3 + VARIANTS_3_5 + VARIANTS_3_5_MOE

#: Put before every answer of a random-weight (--demo) checkpoint, by the server and by the CLI.
DEMO_LABEL = "[random-weight demo model] "

_HERE = Path(__file__).resolve().parent
# Per variant: bos/eos/pad ids of the vendored tokenizer (its vocab is tiny; see tokenizers/<v>/).
_TOKEN_IDS = {
    "1B": (700, 702, None, 712), "2B": (1, 2, 2, 609), "4B": (1, 600, 600, 620), "8B": (1, 2, 2, 609),
    "26B": (1, 2, 2, 609), "40B": (1, 7, 0, 609), "76B": (700, 703, None, 725),
    "2_5-1B": (700, 702, None, 731), "2_5-8B": (1, 2, 2, 609), "3-1B": (700, 702, None, 731),
    # the released vocab is padded past the tokenizer; random weights would generate the padding ids
    "3_5-30B-A3B": (700, 702, None, 735),
    "3_5-1B": (700, 702, None, 735),
}
# The tokenizer folder of a variant, where it shares another's (InternVL2.5-8B: InternLM2.5 as InternVL2-8B).
_TOKENIZER_DIR = {"2_5-8B": "8B", "3-1B": "2_5-1B"}
# The file of released configs that holds each variant.
_CONFIG_FILE = {**{v: "real_configs.json" for v in VARIANTS},
                **{v: "real_configs_2_5_3.json" for v in RELEASED_2_5_3},
                **{v: "real_configs_3_5.json" for v in VARIANTS_3_5},
                **{v: "real_configs_3_5_moe.json" for v in VARIANTS_3_5_MOE}}


def real_config(variant: str) -> dict[str, Any]:
    """The released config.json of InternVL2-<variant> (``real_configs.json`` beside this module), or of
    InternVL2.5 / InternVL3 for "2_5-*" / "3-*" (``real_configs_2_5_3.json``), of InternVL3.5 dense for "3_5-1B"
    (``real_configs_3_5.json``), or of InternVL3.5-<size> with a Qwen3-MoE decoder for "3_5-*-A*B"
    (``real_configs_3_5_moe.json``)."""
    if variant not in _CONFIG_FILE:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(ALL_VARIANTS)}")
    configs = json.loads((_HERE / _CONFIG_FILE[variant]).read_text(encoding="utf-8"))
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
    if "head_dim" in llm:   # Qwen3: heads x head_dim is not hidden_size (32 x 128 = 4096 vs 2048 in 30B-A3B)
        llm["head_dim"] = 2 * 64 // heads
    if "num_experts" in llm:   # Qwen3-MoE: a few experts, top-2 (decoder_sparse_step / mlp_only_layers as released)
        llm.update(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32)
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
    if arch == "GptOssForCausalLM":
        shapes.update(gpt_oss_tensor_shapes(llm))
        return shapes
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
        sparse = arch == "Qwen3MoeForCausalLM" and _qwen3_moe_sparse(llm, i)
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
        if arch == "Qwen3MoeForCausalLM":
            shapes.update({p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)})
        if sparse:
            # no dense MLP: the router, then each expert's gated MLP under its index, as the checkpoint stores them
            for part in ("gate_proj", "up_proj", "down_proj"):
                del shapes[f"{p}mlp.{part}.weight"]
            experts, width = llm["num_experts"], llm["moe_intermediate_size"]
            shapes[p + "mlp.gate.weight"] = (experts, h)
            for e in range(experts):
                shapes.update({f"{p}mlp.experts.{e}.gate_proj.weight": (width, h),
                               f"{p}mlp.experts.{e}.up_proj.weight": (width, h),
                               f"{p}mlp.experts.{e}.down_proj.weight": (h, width)})
    return shapes


def _qwen3_moe_sparse(llm: dict[str, Any], i: int) -> bool:
    """Whether Qwen3-MoE's layer ``i`` has experts (transformers' Qwen3MoeDecoderLayer rule)."""
    return (i not in (llm.get("mlp_only_layers") or [])
            and llm["num_experts"] > 0 and (i + 1) % llm["decoder_sparse_step"] == 0)


def _random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype,
                   embed_std: float = 0.5) -> torch.Tensor:
    """Drawn on the generator's device (a CUDA generator writes an 8B checkpoint in seconds), returned on the CPU.
    ``embed_std``: the scale of the token embeddings (smaller where they are tied to the LM head)."""
    def randn() -> torch.Tensor:
        return torch.randn(shape, generator=generator, device=generator.device)

    if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "layernorm.weight", "mlp1.0.weight",
                      "attention_norm.weight", "ffn_norm.weight",
                      # the HF format's names of the same tensors
                      "layernorm_before.weight", "layernorm_after.weight", "multi_modal_projector.layer_norm.weight")):
        return (1.0 + 0.1 * randn()).to(dtype).cpu()
    if name.endswith(("ls1", "ls2", "lambda_1", "lambda_2")):
        return (0.1 + 0.05 * randn()).to(dtype).cpu()
    std = 0.02 if len(shape) < 2 else min(0.5, 1.0 / (shape[-1] ** 0.5))
    if "embed" in name or "position_embedding" in name or "class_embedding" in name or "cls_token" in name:
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
    for file in (_HERE / "tokenizers" / _TOKENIZER_DIR.get(variant, variant)).iterdir():
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


# ---- InternVL3.5-GPT-OSS (issue #20) ------------------------------------------------------------------------
#: The GPT-OSS variant: InternVL3.5-GPT-OSS-20B-A4B-Preview (config in ``real_configs_gpt_oss.json``; tokenizer
#: of the real kind, o200k pre-tokenizer and the harmony special tokens, in ``tokenizers/3_5-20B-A4B``).
GPT_OSS_VARIANTS = ("3_5-20B-A4B",)
# bos, eos, pad ids and vocab size of the tiny tokenizer (the real ones minus 199298: <|startoftext|> 700,
# <|return|> 704, <|endoftext|> 701); the vocabulary rounded up to 736 as the real one is padded.
_GPT_OSS_TOKEN_IDS = {"3_5-20B-A4B": (700, 704, 701, 736)}


def gpt_oss_tensor_shapes(llm: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """transformers' GptOssForCausalLM names and shapes under ``language_model.`` (experts stacked as
    parameters: gate_up_proj (E, hidden, 2I) with interleaved gate/up columns, down_proj (E, I, hidden))."""
    h, heads, kv, hd = llm["hidden_size"], llm["num_attention_heads"], llm["num_key_value_heads"], llm["head_dim"]
    e, ff, vocab = llm["num_local_experts"], llm["intermediate_size"], llm["vocab_size"]
    lm = "language_model."
    shapes: dict[str, tuple[int, ...]] = {lm + "model.embed_tokens.weight": (vocab, h),
                                          lm + "lm_head.weight": (vocab, h), lm + "model.norm.weight": (h,)}
    for i in range(llm["num_hidden_layers"]):
        p = f"{lm}model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (heads * hd, h), p + "self_attn.q_proj.bias": (heads * hd,),
            p + "self_attn.k_proj.weight": (kv * hd, h), p + "self_attn.k_proj.bias": (kv * hd,),
            p + "self_attn.v_proj.weight": (kv * hd, h), p + "self_attn.v_proj.bias": (kv * hd,),
            p + "self_attn.o_proj.weight": (h, heads * hd), p + "self_attn.o_proj.bias": (h,),
            p + "self_attn.sinks": (heads,),
            p + "mlp.router.weight": (e, h), p + "mlp.router.bias": (e,),
            p + "mlp.experts.gate_up_proj": (e, h, 2 * ff), p + "mlp.experts.gate_up_proj_bias": (e, 2 * ff),
            p + "mlp.experts.down_proj": (e, ff, h), p + "mlp.experts.down_proj_bias": (e, h),
        })
    return shapes


def make_gpt_oss_config(variant: str = "3_5-20B-A4B", scale: str = "tiny") -> dict[str, Any]:
    """config.json of the GPT-OSS variant: ``'real'`` as released; ``'tiny'``: widths shrunk (heads x head_dim
    kept unequal to hidden_size, as in the release), 4 experts of which 2 per token, 4 layers alternating
    sliding / full as released, and a window of 8 so that every test prompt crosses it."""
    if variant not in GPT_OSS_VARIANTS:
        raise ValueError(f"unknown GPT-OSS variant {variant!r}; choose one of {', '.join(GPT_OSS_VARIANTS)}")
    configs = json.loads((_HERE / "real_configs_gpt_oss.json").read_text(encoding="utf-8"))
    config = copy.deepcopy(configs[variant])
    llm, vit = config["llm_config"], config["vision_config"]
    _, eos, pad, vocab = _GPT_OSS_TOKEN_IDS[variant]
    if scale == "real":
        return config
    if scale != "tiny":
        raise ValueError(f"scale must be 'tiny' or 'real', got {scale!r}")
    vit.update(hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=2)
    llm.update(hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=32,
               num_local_experts=4, num_experts_per_tok=2, experts_per_token=2, num_hidden_layers=4,
               layer_types=llm["layer_types"][:4], sliding_window=8, vocab_size=vocab, eos_token_id=eos,
               pad_token_id=pad)
    config["torch_dtype"] = llm["torch_dtype"] = vit["torch_dtype"] = "float32"
    return config


def _gpt_oss_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Random values where GPT-OSS's own parts do something visible: sinks of the size of attention logits,
    expert gate/up wide enough that the clamp at 7 bites, router biases that move the top-k."""
    randn = torch.randn(shape, generator=generator)
    if name.endswith("self_attn.sinks"):
        return 1.5 * randn
    if name.endswith("mlp.experts.gate_up_proj"):
        return 4.0 / shape[1] ** 0.5 * randn
    if name.endswith("mlp.experts.down_proj"):
        return randn / shape[1] ** 0.5
    if name.endswith(("_proj_bias", "router.bias")):
        return 0.5 * randn
    return _random_tensor(name, shape, generator, torch.float32)


def write_gpt_oss_checkpoint(folder: str | Path, variant: str = "3_5-20B-A4B", *, seed: int = 0) -> Path:
    """Write the tiny random-weight GPT-OSS checkpoint (float32, one safetensors file); returns its path."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = make_gpt_oss_config(variant, "tiny")
    (folder / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    bos, eos, pad, _ = _GPT_OSS_TOKEN_IDS[variant]
    generation = {"bos_token_id": bos, "eos_token_id": [eos, pad, 714], "pad_token_id": pad,
                  "transformers_version": "4.55.0"}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2), encoding="utf-8")
    for file in (_HERE / "tokenizers" / variant).iterdir():
        shutil.copyfile(file, folder / file.name)
    generator = torch.Generator().manual_seed(seed)
    tensors = {n: _gpt_oss_tensor(n, shape, generator).contiguous()
               for n, shape in official_tensor_shapes(config).items()}
    # The official InternVLChatModel (internvl_chat_gpt_oss) builds mlp1 in bfloat16 and loads into it whatever
    # the checkpoint's dtype: values representable in bfloat16 load the same there and here.
    for name in [n for n in tensors if n.startswith("mlp1.")]:
        tensors[name] = tensors[name].to(torch.bfloat16).float()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


# ---- the "HF format" (transformers' native InternVLForConditionalGeneration) -------------------------------

#: HF-format variants: InternVL3 / InternVL3.5 as released under hub ids ending in ``-hf`` / ``-HF``.
HF_VARIANTS = ("3-1B-hf", "3_5-1B-HF", "3_5-30B-A3B-HF", "3_5-20B-A4B-HF")

#: Per HF variant: bos/eos/pad ids and vocab size of the vendored tokenizer (tokenizers/<v>/, with ``<video>``;
#: the GPT-OSS one is the GitHub-format GPT-OSS tokenizer with ``<video>`` added at 736).
_HF_TOKEN_IDS = {"3-1B-hf": (700, 702, None, 713), "3_5-1B-HF": (700, 702, None, 713),
                 "3_5-30B-A3B-HF": (700, 702, None, 713), "3_5-20B-A4B-HF": (700, 704, 701, 737)}
#: ``<IMG_CONTEXT>`` of each HF variant's vendored tokenizer (config.json's ``image_token_id`` in the tiny).
_HF_IMAGE_TOKEN_ID = {"3-1B-hf": 705, "3_5-1B-HF": 705, "3_5-30B-A3B-HF": 705, "3_5-20B-A4B-HF": 717}

#: The layout ``save_pretrained`` of transformers 4.55 writes (its ``_checkpoint_conversion_mapping`` undone on
#: save): (the module path of the loaded model, the saved name's prefix). The GPT-OSS variant is written so.
_SAVED_LAYOUT = (("model.language_model.", "language_model.model."), ("model.vision_tower.", "vision_tower."),
                 ("model.multi_modal_projector.", "multi_modal_projector."), ("lm_head.", "language_model.lm_head."))
#: HF variants whose weights are written in transformers 4.55's saved layout (the others: the module paths).
_HF_SAVED_LAYOUT_VARIANTS = ("3_5-20B-A4B-HF",)


def real_hf_config(variant: str) -> dict[str, Any]:
    """The config.json of an HF-format variant (``real_configs_hf.json``; see tests/fixtures/README.md for
    where each came from)."""
    if variant not in HF_VARIANTS:
        raise ValueError(f"unknown HF variant {variant!r}; choose one of {', '.join(HF_VARIANTS)}")
    configs = json.loads((_HERE / "real_configs_hf.json").read_text(encoding="utf-8"))
    return copy.deepcopy(configs[variant])


def make_hf_config(variant: str, scale: str = "tiny") -> dict[str, Any]:
    """config.json of an HF-format variant; ``'tiny'`` shrinks widths and depth as :func:`make_config` does
    (and points ``image_token_id`` at the vendored tokenizer's ``<IMG_CONTEXT>``)."""
    config = real_hf_config(variant)
    bos, eos, pad, vocab = _HF_TOKEN_IDS[variant]
    text, vit = config["text_config"], config["vision_config"]
    if scale == "real":
        return config
    if scale != "tiny":
        raise ValueError(f"scale must be 'tiny' or 'real', got {scale!r}")
    vit.update(hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=2)
    config["image_token_id"] = _HF_IMAGE_TOKEN_ID[variant]      # <IMG_CONTEXT> of the vendored tokenizer
    config["torch_dtype"] = text["torch_dtype"] = vit["torch_dtype"] = "float32"
    if text["model_type"] == "gpt_oss":     # the GitHub-format tiny GPT-OSS's widths (make_gpt_oss_config)
        text.update(hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=32,
                    num_local_experts=4, num_experts_per_tok=2, experts_per_token=2, num_hidden_layers=4,
                    layer_types=text["layer_types"][:4], sliding_window=8, vocab_size=vocab, eos_token_id=eos,
                    pad_token_id=pad)
        return config
    text.update(bos_token_id=bos, eos_token_id=eos, hidden_size=64, num_attention_heads=8, num_key_value_heads=2,
                intermediate_size=128, num_hidden_layers=2, max_window_layers=2, vocab_size=vocab)
    if "head_dim" in text:      # Qwen3 states it: keep heads x head_dim apart from hidden_size, as released
        text.update(num_attention_heads=4, head_dim=32)
    if "layer_types" in text:
        text["layer_types"] = text["layer_types"][:2]
    if "num_experts" in text:   # Qwen3-MoE: a few narrow experts, still more than are routed to
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    if pad is not None:
        text["pad_token_id"] = pad
    return config


def hf_tensor_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor names and shapes in the HF layout (``model.vision_tower.*``,
    ``model.multi_modal_projector.*``, ``model.language_model.*``, ``lm_head.*``; the vision attention's
    q/k/v as three projections), for a Qwen2/Qwen3/Llama-style text model, Qwen3-MoE's experts and GPT-OSS."""
    vit, text = config["vision_config"], config["text_config"]
    d, inter = vit["hidden_size"], vit["intermediate_size"]
    patch = vit["patch_size"][0] if isinstance(vit["patch_size"], list) else vit["patch_size"]
    side = vit["image_size"][0] if isinstance(vit["image_size"], list) else vit["image_size"]
    grid = side // patch
    v = "model.vision_tower."
    shapes: dict[str, tuple[int, ...]] = {
        v + "embeddings.cls_token": (1, 1, d),
        v + "embeddings.patch_embeddings.projection.weight": (d, 3, patch, patch),
        v + "embeddings.patch_embeddings.projection.bias": (d,),
        v + "embeddings.position_embeddings": (1, grid * grid + 1, d),
    }
    for i in range(vit["num_hidden_layers"]):
        p = f"{v}encoder.layer.{i}."
        for proj in ("q_proj", "k_proj", "v_proj"):
            shapes[f"{p}attention.{proj}.weight"] = (d, d)
            if vit["attention_bias"]:
                shapes[f"{p}attention.{proj}.bias"] = (d,)
        shapes.update({p + "attention.projection_layer.weight": (d, d), p + "attention.projection_layer.bias": (d,),
                       p + "lambda_1": (d,), p + "lambda_2": (d,), p + "mlp.fc1.weight": (inter, d),
                       p + "mlp.fc1.bias": (inter,), p + "mlp.fc2.weight": (d, inter), p + "mlp.fc2.bias": (d,),
                       p + "layernorm_before.weight": (d,), p + "layernorm_after.weight": (d,)})
        if vit["norm_type"] == "layer_norm":
            shapes[p + "layernorm_before.bias"] = (d,)
            shapes[p + "layernorm_after.bias"] = (d,)
        if vit["use_qk_norm"]:
            shapes[p + "attention.q_norm.weight"] = (d,)
            shapes[p + "attention.k_norm.weight"] = (d,)
    width = d * round(1 / config["downsample_ratio"]) ** 2
    h = text["hidden_size"]
    m = "model.multi_modal_projector."
    shapes.update({m + "layer_norm.weight": (width,), m + "layer_norm.bias": (width,),
                   m + "linear_1.weight": (h, width), m + "linear_1.bias": (h,),
                   m + "linear_2.weight": (h, h), m + "linear_2.bias": (h,)})
    if text["model_type"] == "gpt_oss":     # GptOssForCausalLM's own names (experts stacked), under the HF prefixes
        for name, shape in gpt_oss_tensor_shapes(text).items():
            shapes[name.replace("language_model.model.", "model.language_model.")
                   .replace("language_model.lm_head.", "lm_head.")] = shape
        return shapes
    heads, kv, vocab = text["num_attention_heads"], text["num_key_value_heads"], text["vocab_size"]
    hd, ff = text.get("head_dim") or h // heads, text["intermediate_size"]
    lm = "model.language_model."
    shapes[lm + "embed_tokens.weight"] = (vocab, h)
    shapes[lm + "norm.weight"] = (h,)
    if not text.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (vocab, h)
    for i in range(text["num_hidden_layers"]):
        p = f"{lm}layers.{i}."
        attention = {p + "self_attn.q_proj.weight": (heads * hd, h), p + "self_attn.k_proj.weight": (kv * hd, h),
                     p + "self_attn.v_proj.weight": (kv * hd, h), p + "self_attn.o_proj.weight": (h, heads * hd)}
        norms = {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}
        experts = text.get("num_experts", 0)
        sparse = experts and i not in text.get("mlp_only_layers", []) and (i + 1) % text["decoder_sparse_step"] == 0
        if sparse:               # Qwen3-MoE: the router, then each expert's gated MLP under its own names
            e_ff = text["moe_intermediate_size"]
            shapes.update({**attention, **norms, p + "mlp.gate.weight": (experts, h)})
            for e in range(experts):
                shapes.update({f"{p}mlp.experts.{e}.gate_proj.weight": (e_ff, h),
                               f"{p}mlp.experts.{e}.up_proj.weight": (e_ff, h),
                               f"{p}mlp.experts.{e}.down_proj.weight": (h, e_ff)})
        else:                    # (the order of the names is the order the random values are drawn in)
            shapes.update({**attention, p + "mlp.gate_proj.weight": (ff, h), p + "mlp.up_proj.weight": (ff, h),
                           p + "mlp.down_proj.weight": (h, ff), **norms})
        if text["architectures"][0] in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"):
            shapes.update({p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)})
        if text["architectures"][0] == "Qwen2ForCausalLM" or text.get("attention_bias"):
            shapes.update({p + "self_attn.q_proj.bias": (heads * hd,), p + "self_attn.k_proj.bias": (kv * hd,),
                           p + "self_attn.v_proj.bias": (kv * hd,)})
    return shapes


def write_hf_checkpoint(folder: str | Path, variant: str = "3-1B-hf", *, scale: str = "tiny", seed: int = 0,
                        dtype: torch.dtype | None = None) -> Path:
    """Write a random-weight HF-format checkpoint folder (config.json, generation_config.json,
    model.safetensors, the tokenizer and the processor files: preprocessor_config.json,
    processor_config.json, chat_template.jinja); returns its path."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = make_hf_config(variant, scale)
    dtype = dtype or (torch.float32 if scale == "tiny" else torch.bfloat16)
    dtype_name = str(dtype).removeprefix("torch.")
    config["torch_dtype"] = config["text_config"]["torch_dtype"] = config["vision_config"]["torch_dtype"] = dtype_name
    (folder / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    text = config["text_config"]
    if text["model_type"] == "gpt_oss":     # the GitHub-format GPT-OSS's (gpt-oss-20b's: <|return|>, pad, <|call|>)
        bos, eos, pad, _ = _HF_TOKEN_IDS[variant]
        generation = {"bos_token_id": bos, "eos_token_id": [eos, pad, 714], "pad_token_id": pad,
                      "transformers_version": "4.55.0"}
    else:
        generation = {"bos_token_id": text["bos_token_id"], "eos_token_id": text["eos_token_id"],
                      "transformers_version": "4.52.0.dev0"}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2), encoding="utf-8")
    for file in (_HERE / "tokenizers" / variant).iterdir():
        shutil.copyfile(file, folder / file.name)
    generator = torch.Generator().manual_seed(seed)
    shapes = hf_tensor_shapes(config)
    gpt_oss = text["model_type"] == "gpt_oss"
    tensors = {n: (_gpt_oss_tensor(n, shape, generator).to(dtype) if gpt_oss and "language_model." in n
                   else _random_tensor(n, shape, generator, dtype)) for n, shape in shapes.items()}
    if variant in _HF_SAVED_LAYOUT_VARIANTS:
        tensors = {saved_name(n): t for n, t in tensors.items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def saved_name(name: str) -> str:
    """A module-path name of transformers' InternVLForConditionalGeneration -> the name its ``save_pretrained``
    writes (transformers 4.55)."""
    for module_prefix, saved_prefix in _SAVED_LAYOUT:
        if name.startswith(module_prefix):
            return saved_prefix + name[len(module_prefix):]
    return name
