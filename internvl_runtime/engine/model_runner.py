"""Runs one model step for a batch of sequences over the paged KV cache.

The runner knows nothing of scheduling: it is handed, per sequence, the new tokens of this step, how
many tokens were already computed, the KV block table, and any image feature rows that fill the new
``<IMG_CONTEXT>`` tokens. It returns the float32 logits of each sequence's last new token (only for
the sequences that asked for them: a non-final prefill chunk does not).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..models.internvl import InternVLModel
from ..models.layers.attention import AttentionMetadata, KVCache
from ..placement import layer_devices


@dataclass
class SequenceStep:
    """One sequence's share of a step.

    token_ids: the new tokens; num_computed: tokens already in the KV cache (their positions precede);
    block_table: KV blocks of the sequence, enough for num_computed + len(token_ids) tokens;
    image_features: (rows, hidden) for the ``<IMG_CONTEXT>`` tokens among token_ids, in order;
    want_logits: whether this step's last token needs logits.
    """

    token_ids: list[int]
    num_computed: int
    block_table: list[int]
    image_features: torch.Tensor | None = None
    want_logits: bool = True
    positions: list[int] | None = field(default=None)

    @property
    def seq_len(self) -> int:
        return self.num_computed + len(self.token_ids)


def local_kv_heads(model: InternVLModel) -> int:
    """KV heads this process caches: all of them, or its share under tensor parallelism."""
    return model.language_model.model.decoder_layers[0].self_attn.num_kv_heads


class ModelRunner:
    """Owns the KV cache for one model and executes steps."""

    def __init__(self, model: InternVLModel, *, num_blocks: int, block_size: int = 16,
                 kv_dtype: torch.dtype | None = None, image_token_id: int | None = None) -> None:
        """``image_token_id``: the ``<IMG_CONTEXT>`` id whose positions take image features (needed only
        by steps that carry image features)."""
        self.model = model
        self.image_token_id = image_token_id
        llm = model.config.llm
        self.block_size = block_size
        embed = model.language_model.get_input_embeddings().weight
        self.device = embed.device
        self.dtype = kv_dtype or embed.dtype
        self.kv_cache = KVCache.allocate(num_layers=llm.num_hidden_layers, num_blocks=num_blocks,
                                         block_size=block_size, num_kv_heads=local_kv_heads(model),
                                         head_dim=llm.head_dim, dtype=self.dtype,
                                         device=layer_devices(model.language_model))

    @staticmethod
    def kv_bytes_per_block(model: InternVLModel, block_size: int, dtype: torch.dtype) -> int:
        llm = model.config.llm
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * llm.num_hidden_layers * block_size * local_kv_heads(model) * llm.head_dim * elem

    def _layout(self, step: SequenceStep) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, int] | None]:
        """(slots of the new tokens, slots of the whole context or None, contiguous run or None)."""
        bs = self.block_size
        blocks = step.block_table[: -(-step.seq_len // bs)]
        assert len(blocks) * bs >= step.seq_len, "block table too short for the step"
        if all(b == blocks[0] + i for i, b in enumerate(blocks)):
            first = blocks[0] * bs
            new = torch.arange(first + step.num_computed, first + step.seq_len, dtype=torch.long)
            return new, None, (first, step.seq_len)
        table = torch.tensor(blocks, dtype=torch.long)
        context = (table[:, None] * bs + torch.arange(bs)).flatten()[: step.seq_len]
        return context[step.num_computed:], context.to(self.device), None

    @torch.inference_mode()
    def execute(self, steps: list[SequenceStep]) -> torch.Tensor:
        """Run the step; returns logits (num sequences wanting logits, vocab) float32."""
        device = self.device
        ids, positions, new_slots, context_slots, context_ranges, embeds = [], [], [], [], [], []
        for step in steps:
            ids.extend(step.token_ids)
            if step.positions is not None:
                positions.extend(step.positions)
            else:
                positions.extend(range(step.num_computed, step.seq_len))
            new, context, run = self._layout(step)
            new_slots.append(new)
            context_slots.append(context)
            context_ranges.append(run)
        input_ids = torch.tensor(ids, dtype=torch.long, device=device)
        start = 0
        for step in steps:
            n = len(step.token_ids)
            embeds.append(self.model.embed(input_ids[start:start + n], step.image_features,
                                           image_token_id=self.image_token_id))
            start += n
        x = embeds[0] if len(embeds) == 1 else torch.cat(embeds, dim=0)
        slot_mapping = new_slots[0] if len(new_slots) == 1 else torch.cat(new_slots)
        meta = AttentionMetadata(query_lens=[len(s.token_ids) for s in steps],
                                 seq_lens=[s.seq_len for s in steps],
                                 slot_mapping=slot_mapping.to(device), context_slots=context_slots,
                                 context_ranges=context_ranges)
        pos = torch.tensor(positions, dtype=torch.long, device=device)
        hidden = self.model.language_model(x, pos, meta, self.kv_cache)
        last_rows = []
        end = 0
        for step in steps:
            end += len(step.token_ids)
            if step.want_logits:
                last_rows.append(end - 1)
        if not last_rows:
            return torch.empty((0, self.model.config.llm.vocab_size))
        return self.model.language_model.compute_logits(hidden[last_rows])
