"""A step's inputs: planned on the host from the sequences, sent to the device in one copy.

The runner is handed, per sequence, its new tokens, how many were computed before and its block table.
``plan_step`` turns that into every integer the forward needs (token ids, positions, KV slots, rope rows,
lengths, query starts, block tables, the rows whose logits are wanted), packed into ONE int64 host
tensor (pinned when the device is a GPU). ``StepPlan.to_device`` copies it with one non-blocking
transfer and hands out views: the forward never builds a tensor from a Python list, and never reads a
device value back. The per-sequence host lists the torch attention backend plans with come along.

KV groups (``engine.kv_groups``: a model with sliding-window layers has several): each sequence brings one
block table per group, and the plan has each group's KV slots, block tables and contiguous runs; group 0's
are the unprefixed fields, the others follow in ``other_*`` (empty for a model with one group).

Padding (``pad_to``, for a CUDA-graph batch bucket) adds rows with token 0 at position 0, seq_len 0,
their KV write sent to ``scratch_block``'s first slot and their block table row pointing at that block;
they want no logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..models.layers.rotary import RopePlan, RotaryEmbedding


@dataclass
class SequenceStep:
    """One sequence's share of a step.

    token_ids: the new tokens; num_computed: tokens already in the KV cache (their positions precede);
    block_table: KV blocks of the sequence, enough for num_computed + len(token_ids) tokens (its first KV
    group's; ``other_block_tables``: those of the groups after it, when the runner has several);
    image_features: (rows, hidden) for the ``<IMG_CONTEXT>`` tokens among token_ids, in order;
    want_logits: whether this step's last token needs logits.
    """

    token_ids: list[int]
    num_computed: int
    block_table: list[int]
    image_features: torch.Tensor | None = None
    want_logits: bool = True
    positions: list[int] | None = field(default=None)
    other_block_tables: list[list[int]] = field(default_factory=list)

    @property
    def block_tables(self) -> list[list[int]]:
        """Every KV group's block table, the first group's first."""
        return [self.block_table, *self.other_block_tables]

    @property
    def seq_len(self) -> int:
        return self.num_computed + len(self.token_ids)


@dataclass
class StepTensors:
    """The step's integers on the device, views of one copied tensor. T tokens, B sequences (padding
    included), L rows wanting logits, W block-table columns."""

    input_ids: torch.Tensor        # (T,) long
    positions: torch.Tensor        # (T,) long
    slot_mapping: torch.Tensor     # (T,) long
    rope_rows: torch.Tensor        # (T,) long
    logits_rows: torch.Tensor      # (L,) long
    seq_lens: torch.Tensor         # (B,) int32
    query_start_loc: torch.Tensor  # (B + 1,) int32
    block_tables: torch.Tensor     # (B, W) int32
    other_slot_mappings: tuple[torch.Tensor, ...] = ()   # per KV group after the first: (T,) long
    other_block_tables: tuple[torch.Tensor, ...] = ()    # per KV group after the first: (B, W) int32


@dataclass
class StepPlan:
    """The host side of a step: the packed integers and the per-sequence lists (real sequences only)."""

    packed: torch.Tensor                       # int64, layout of ``to_device``
    num_tokens: int                            # T, padding included
    num_seqs: int                              # B, padding included
    num_logits: int
    width: int
    query_lens: list[int]
    seq_lens: list[int]
    context_ranges: list[tuple[int, int] | None]
    rope: RopePlan
    other_context_ranges: list[list[tuple[int, int] | None]] = field(default_factory=list)

    @property
    def num_groups(self) -> int:
        """KV groups planned (1 + the other ones)."""
        return 1 + len(self.other_context_ranges)

    def to_device(self, device: torch.device) -> StepTensors:
        """One (non-blocking) host -> device copy, then views; the int32 part is cast on the device."""
        packed = self.packed.to(device, non_blocking=True)
        t, b, n, g, w = self.num_tokens, self.num_seqs, self.num_logits, self.num_groups, self.width
        longs = packed[: 4 * t + n + (g - 1) * t]
        ints = packed[longs.shape[0]:].to(torch.int32)
        tables = ints[2 * b + 1:].view(g, b, w)
        return StepTensors(input_ids=longs[:t], positions=longs[t:2 * t], slot_mapping=longs[2 * t:3 * t],
                           rope_rows=longs[3 * t:4 * t], logits_rows=longs[4 * t:4 * t + n],
                           seq_lens=ints[:b], query_start_loc=ints[b:2 * b + 1], block_tables=tables[0],
                           other_slot_mappings=tuple(longs[4 * t + n + i * t:4 * t + n + (i + 1) * t]
                                                     for i in range(g - 1)),
                           other_block_tables=tuple(tables[1:]))


def plan_step(steps: Sequence[SequenceStep], *, block_size: int, rotary: RotaryEmbedding, pin: bool = False,
              pad_to: int | None = None, scratch_block: int | None = None) -> StepPlan:
    """Lay the step out on the host (see the module docstring). ``pin``: page-locked, for a GPU copy."""
    bs = block_size
    num_groups = len(steps[0].block_tables) if steps else 1
    ids: list[int] = []
    positions: list[int] = []
    slots: list[list[int]] = [[] for _ in range(num_groups)]
    rope_lengths: list[int] = []
    logits_rows: list[int] = []
    seq_lens: list[int] = []
    query_lens: list[int] = []
    starts = [0]
    tables: list[list[list[int]]] = [[] for _ in range(num_groups)]
    ranges: list[list[tuple[int, int] | None]] = [[] for _ in range(num_groups)]
    for step in steps:
        n, total, done = len(step.token_ids), step.seq_len, step.num_computed
        assert len(step.block_tables) == num_groups, "every sequence of a step has one table per KV group"
        ids += step.token_ids
        if step.positions is None:
            positions += range(done, total)
            last = total - 1
        else:
            positions += step.positions
            last = max(step.positions, default=-1)
        for group, table in enumerate(step.block_tables):
            blocks = table[: -(-total // bs)]
            assert len(blocks) * bs >= total, "block table too short for the step"
            first = blocks[0] if blocks else 0
            if all(b == first + i for i, b in enumerate(blocks)):
                slots[group] += range(first * bs + done, first * bs + total)
                ranges[group].append((first * bs, total))
            else:
                slots[group] += [blocks[p // bs] * bs + p % bs for p in range(done, total)]
                ranges[group].append(None)
            tables[group].append(blocks)
        rope_lengths.append(rotary.scaled_length(total, last))
        seq_lens.append(total)
        query_lens.append(n)
        starts.append(starts[-1] + n)
        if step.want_logits:
            logits_rows.append(starts[-1] - 1)
    rope = rotary.plan(rope_lengths)
    rope_rows = [row for row, n in zip(rope.rows, query_lens, strict=True) for _ in range(n)]
    num_seqs, num_tokens = len(steps), starts[-1]
    if pad_to is not None and pad_to > num_seqs:
        assert scratch_block is not None, "padding needs a scratch block"
        extra = pad_to - num_seqs
        ids += [0] * extra
        positions += [0] * extra
        for group in range(num_groups):
            slots[group] += [scratch_block * bs] * extra
            tables[group] = tables[group] + [[scratch_block]] * extra
        rope_rows += [0] * extra
        all_lens = seq_lens + [0] * extra
        all_starts = starts + list(range(num_tokens + 1, num_tokens + extra + 1))
        num_seqs, num_tokens = pad_to, num_tokens + extra
    else:
        all_lens, all_starts = seq_lens, starts
    width = max((len(t) for group_tables in tables for t in group_tables), default=1) or 1
    flat: list[int] = []
    for group_tables in tables:
        for row in group_tables:
            flat += row
            flat += [0] * (width - len(row))
    other_slots = [slot for group_slots in slots[1:] for slot in group_slots]
    packed = torch.tensor(ids + positions + slots[0] + rope_rows + logits_rows + other_slots + all_lens + all_starts
                          + flat, dtype=torch.long, pin_memory=pin)
    return StepPlan(packed=packed, num_tokens=num_tokens, num_seqs=num_seqs, num_logits=len(logits_rows),
                    width=width, query_lens=query_lens, seq_lens=seq_lens, context_ranges=ranges[0], rope=rope,
                    other_context_ranges=ranges[1:])
