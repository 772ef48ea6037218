"""A tiny Qwen3-MoE InternVL checkpoint written at test time, for the expert tests (quantized experts,
expert parallelism, memory): the vision encoder, ``mlp1`` and tokenizer of the committed ``tiny-1B``
(InternViT-300M, a Qwen2 tokenizer: Qwen3's kind), and a Qwen3-MoE decoder with random weights in the
official per-expert layout (``mlp.experts.{e}.{gate,up,down}_proj``, ``mlp.gate`` router, q/k norms, an
explicit ``head_dim`` wider than hidden / heads). Widths shrunk from Qwen3-30B-A3B's config (128 experts,
8 per token, norm_topk_prob); one layer without experts (``mlp_only_layers``) so both kinds of layer meet.

Not a golden fixture (that is the Qwen3-MoE variant's own work): only self-consistency is tested on it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from paths import FIXTURES

BASE = FIXTURES / "ckpt" / "tiny-1B"

LLM_CONFIG = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "attention_bias": False,
    "bos_token_id": 700, "eos_token_id": 702, "hidden_act": "silu", "hidden_size": 64, "head_dim": 32,
    "intermediate_size": 96, "max_position_embeddings": 40960, "moe_intermediate_size": 32,
    "norm_topk_prob": True, "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts": 8,
    "num_experts_per_tok": 2, "decoder_sparse_step": 1, "mlp_only_layers": [1], "num_hidden_layers": 3,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": False, "vocab_size": 712,
    "torch_dtype": "float32",
}


def llm_shapes(llm: dict) -> dict[str, tuple[int, ...]]:
    h, heads, kv, d = llm["hidden_size"], llm["num_attention_heads"], llm["num_key_value_heads"], llm["head_dim"]
    lm = "language_model."
    shapes = {lm + "model.embed_tokens.weight": (llm["vocab_size"], h), lm + "lm_head.weight": (llm["vocab_size"], h),
              lm + "model.norm.weight": (h,)}
    for i in range(llm["num_hidden_layers"]):
        p = f"{lm}model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (heads * d, h), p + "self_attn.k_proj.weight": (kv * d, h),
                       p + "self_attn.v_proj.weight": (kv * d, h), p + "self_attn.o_proj.weight": (h, heads * d),
                       p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,),
                       p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)})
        if i in llm["mlp_only_layers"]:
            ff = llm["intermediate_size"]
            shapes.update({p + "mlp.gate_proj.weight": (ff, h), p + "mlp.up_proj.weight": (ff, h),
                           p + "mlp.down_proj.weight": (h, ff)})
            continue
        ff = llm["moe_intermediate_size"]
        shapes[p + "mlp.gate.weight"] = (llm["num_experts"], h)
        for e in range(llm["num_experts"]):
            expert = f"{p}mlp.experts.{e}."
            shapes.update({expert + "gate_proj.weight": (ff, h), expert + "up_proj.weight": (ff, h),
                           expert + "down_proj.weight": (h, ff)})
    return shapes


def write_tiny_qwen3_moe(folder: Path, seed: int = 0, **llm_overrides: object) -> Path:
    """The checkpoint folder (see the module docstring); ``llm_overrides`` change ``llm_config`` keys."""
    folder.mkdir(parents=True, exist_ok=True)
    for file in BASE.iterdir():
        if file.name not in ("config.json", "model.safetensors"):
            shutil.copyfile(file, folder / file.name)
    config = json.loads((BASE / "config.json").read_text())
    config["llm_config"] = llm = {**LLM_CONFIG, **llm_overrides}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tensors = {k: v for k, v in load_file(BASE / "model.safetensors").items() if not k.startswith("language_model.")}
    g = torch.Generator().manual_seed(seed)
    for name, shape in llm_shapes(llm).items():
        if name.endswith("norm.weight"):
            tensors[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            std = 0.5 if "embed" in name else 1.0 / shape[-1] ** 0.5
            tensors[name] = std * torch.randn(shape, generator=g)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder
