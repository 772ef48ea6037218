"""Tensor names of the "HF format" (transformers' native ``InternVLForConditionalGeneration``) -> ours.

Data, not code per name: a prefix table (the layout of each part), a substring table inside the vision
tower and the projector, and the vision attention's three projections packed into our fused ``qkv``
(shards q, k, v in that order: the order the official converter splits ``attn.qkv`` into). The mapping
is the official converter's (OpenGVLab/InternVL ``internvl_chat/tools/internvl_custom2hf.py``, commit
5d8ab0e) read the other way; the older layout transformers still loads (``language_model.model.*``,
``vision_tower.*``, ``multi_modal_projector.*``, ``language_model.lm_head.*``: its
``_checkpoint_conversion_mapping``, which its ``save_pretrained`` undoes: folders saved by transformers
4.55 are in it, the tiny HF-format GPT-OSS for one) maps too. The result is a GitHub-format name, which
the decoder family's own tables then resolve as for any InternVL checkpoint: the text model's names are
transformers' own in both formats (GPT-OSS's ``self_attn.sinks``, ``mlp.router.*`` and stacked
``mlp.experts.*`` included), so the language model needs no table here.
"""

from __future__ import annotations

import re

#: (pattern at the start of a name, our prefix); the first that matches applies.
PREFIXES: tuple[tuple[re.Pattern[str], str], ...] = tuple((re.compile(p), ours) for p, ours in (
    (r"^(?:model\.)?vision_tower\.", "vision_model."),
    (r"^(?:model\.)?multi_modal_projector\.", "mlp1."),
    (r"^model\.language_model\.", "language_model.model."),
    (r"^language_model\.model\.", "language_model.model."),
    (r"^(?:language_model\.)?lm_head\.", "language_model.lm_head."),
))

#: (their substring, ours) in the vision tower and projector, applied in order.
RENAMES: tuple[tuple[str, str], ...] = (
    ("embeddings.cls_token", "embeddings.class_embedding"),
    ("embeddings.patch_embeddings.projection.", "embeddings.patch_embedding."),
    ("embeddings.position_embeddings", "embeddings.position_embedding"),
    ("encoder.layer.", "encoder.layers."),
    (".attention.projection_layer.", ".attn.proj."),
    (".attention.q_norm.", ".attn.q_norm."),
    (".attention.k_norm.", ".attn.k_norm."),
    (".layernorm_before.", ".norm1."),
    (".layernorm_after.", ".norm2."),
    (".lambda_1", ".ls1"),
    (".lambda_2", ".ls2"),
    ("mlp1.layer_norm.", "mlp1.0."),
    ("mlp1.linear_1.", "mlp1.1."),
    ("mlp1.linear_2.", "mlp1.3."),
)

#: (their projection, our fused projection, shard id): the vision attention's q/k/v.
STACKED: tuple[tuple[str, str, str], ...] = (
    (".attention.q_proj.", ".attn.qkv.", "q"),
    (".attention.k_proj.", ".attn.qkv.", "k"),
    (".attention.v_proj.", ".attn.qkv.", "v"),
)


def github_name(name: str) -> tuple[str, str | None] | None:
    """An HF-format tensor name -> (the GitHub-format name, the shard of a fused parameter it fills), or
    None for a name outside the layout (the loader reports it as unexpected)."""
    for pattern, ours in PREFIXES:
        if pattern.match(name):
            name = pattern.sub(ours, name, count=1)
            break
    else:
        return None
    if name.startswith("language_model."):
        return name, None
    for theirs, ours in RENAMES:
        name = name.replace(theirs, ours)
    for theirs, ours, shard in STACKED:
        if theirs in name:
            return name.replace(theirs, ours), shard
    return name, None
