"""CUDA graphs of the decode step, one per batch bucket (nano-vllm's ``capture_cudagraph``, vLLM's design).

A decode step (every sequence adds one token, no image) is padded up to the next bucket (1, 2, 4, 8, 16,
... up to max_num_seqs) and run over static input buffers: the step's integers are copied into them,
then the bucket's graph is replayed. A padded row has seq_len 0, writes its key/value into the runner's
scratch KV block (never handed to a sequence) and its logits are dropped. The graph covers embedding and
decoder layers with the "triton" attention backend (device tensors only); the LM head and sampling run
outside it. Graphs are captured lazily, the first time a bucket is used, sharing one memory pool.

KV groups (sliding-window layers with their own block tables, ``engine.kv_groups``): each group after the
first has its own static slot mapping and block-table buffer, and the bucket's metadata its own
``group_metadata`` over them.

The same step function serves the eager path; without a GPU (``capture=False``) this class emulates the
graph path exactly (static buffers, padding, the bucket's fixed metadata) without capturing, so the
padding is tested on the CPU.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

from ..models.layers.attention import AttentionMetadata
from .step_inputs import StepPlan, StepTensors

logger = logging.getLogger(__name__)

StepFunction = Callable[[StepTensors, AttentionMetadata], torch.Tensor]


def batch_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, ... below ``max_num_seqs``, then ``max_num_seqs`` itself."""
    buckets, size = [], 1
    while size < max_num_seqs:
        buckets.append(size)
        size *= 2
    return [*buckets, max_num_seqs]


def bucket_for(num_seqs: int, buckets: list[int]) -> int | None:
    """The smallest bucket holding ``num_seqs`` sequences (None: too many)."""
    return next((b for b in buckets if b >= num_seqs), None)


class DecodeGraphs:
    """Static buffers for the largest bucket, a fixed metadata object per bucket, and (when ``capture``)
    one CUDA graph per bucket replayed over them."""

    def __init__(self, step: StepFunction, *, buckets: list[int], max_blocks_per_seq: int, block_size: int,
                 scratch_block: int, device: torch.device, capture: bool, num_groups: int = 1) -> None:
        self.step = step
        self.buckets = buckets
        self.max_blocks_per_seq = max_blocks_per_seq
        self.block_size = block_size
        self.scratch_block = scratch_block
        self.device = device
        self.capture = capture
        self.num_groups = num_groups
        self._static: StepTensors | None = None
        self._metas: dict[int, AttentionMetadata] = {}
        self._graphs: dict[int, tuple[Any, torch.Tensor]] = {}   # bucket -> (CUDAGraph, its output)
        self._pool: Any = None
        #: (sequences, bucket) -> decode steps run so (what the padding did; for tests and logs)
        self.runs: Counter[tuple[int, int]] = Counter()

    def _buffers(self) -> StepTensors:
        """The static inputs, sized for the largest bucket and filled as padding (allocated on first use)."""
        if self._static is None:
            n, dev = self.buckets[-1], self.device

            def slots() -> torch.Tensor:
                return torch.full((n,), self.scratch_block * self.block_size, dtype=torch.long, device=dev)

            def tables() -> torch.Tensor:
                return torch.full((n, self.max_blocks_per_seq), self.scratch_block, dtype=torch.int32, device=dev)

            others = range(self.num_groups - 1)
            self._static = StepTensors(
                input_ids=torch.zeros(n, dtype=torch.long, device=dev),
                positions=torch.zeros(n, dtype=torch.long, device=dev),
                slot_mapping=slots(),
                rope_rows=torch.zeros(n, dtype=torch.long, device=dev),
                logits_rows=torch.zeros(0, dtype=torch.long, device=dev),
                seq_lens=torch.zeros(n, dtype=torch.int32, device=dev),
                query_start_loc=torch.arange(n + 1, dtype=torch.int32, device=dev),
                block_tables=tables(),
                other_slot_mappings=tuple(slots() for _ in others),
                other_block_tables=tuple(tables() for _ in others))
        return self._static

    def _view(self, bucket: int) -> tuple[StepTensors, AttentionMetadata]:
        s = self._buffers()
        view = StepTensors(input_ids=s.input_ids[:bucket], positions=s.positions[:bucket],
                           slot_mapping=s.slot_mapping[:bucket], rope_rows=s.rope_rows[:bucket],
                           logits_rows=s.logits_rows, seq_lens=s.seq_lens[:bucket],
                           query_start_loc=s.query_start_loc[:bucket + 1], block_tables=s.block_tables[:bucket],
                           other_slot_mappings=tuple(t[:bucket] for t in s.other_slot_mappings),
                           other_block_tables=tuple(t[:bucket] for t in s.other_block_tables))
        meta = self._metas.get(bucket)
        if meta is None:
            # The host lists are placeholders: under a graph only the tensors change from step to step.
            def group(slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                      others: tuple[AttentionMetadata, ...] = ()) -> AttentionMetadata:
                return AttentionMetadata(query_lens=[1] * bucket, seq_lens=[1] * bucket, slot_mapping=slot_mapping,
                                         attention_backend="triton", block_tables=block_tables,
                                         seq_lens_tensor=view.seq_lens, query_start_loc=view.query_start_loc,
                                         block_size=self.block_size, rope_rows=view.rope_rows,
                                         group_metadata=others)

            others = tuple(group(slots, tables) for slots, tables
                           in zip(view.other_slot_mappings, view.other_block_tables, strict=True))
            meta = group(view.slot_mapping, view.block_tables, others)
            self._metas[bucket] = meta
        return view, meta

    def fits(self, num_seqs: int, max_blocks: int) -> int | None:
        """The bucket for a decode step of ``num_seqs`` sequences whose longest needs ``max_blocks``
        blocks, or None when the eager path must run it."""
        if max_blocks > self.max_blocks_per_seq:
            return None
        return bucket_for(num_seqs, self.buckets)

    def run(self, plan: StepPlan, tensors: StepTensors) -> torch.Tensor:
        """Hidden states (bucket, hidden) of a step planned with ``pad_to`` = its bucket: the step's
        integers copied into the static buffers, then the graph replayed (or the step function run)."""
        bucket = plan.num_seqs
        self.runs[len(plan.seq_lens), bucket] += 1
        view, meta = self._view(bucket)
        for name in ("input_ids", "positions", "slot_mapping", "rope_rows", "seq_lens"):
            getattr(view, name).copy_(getattr(tensors, name))
        view.query_start_loc.copy_(tensors.query_start_loc)
        view.block_tables[:, : plan.width].copy_(tensors.block_tables)
        for static, given in zip(view.other_slot_mappings, tensors.other_slot_mappings, strict=True):
            static.copy_(given)
        for static, given in zip(view.other_block_tables, tensors.other_block_tables, strict=True):
            static[:, : plan.width].copy_(given)
        if not self.capture:
            return self.step(view, meta)
        entry = self._graphs.get(bucket)
        if entry is None:
            try:
                entry = self._capture(view, meta)
            except Exception as exc:  # noqa: BLE001 - a layer that cannot be captured: stay correct, eagerly
                logger.warning("CUDA graph capture failed for a batch of %d (%r); decode steps run eagerly "
                               "from now on (enforce_eager=True avoids trying)", bucket, exc)
                self.capture = False
                return self.step(view, meta)
            self._graphs[bucket] = entry
        graph, out = entry
        graph.replay()
        return out

    def _capture(self, view: StepTensors, meta: AttentionMetadata) -> tuple[Any, torch.Tensor]:
        # A warm-up run first (lazy allocations such as the rope table happen outside the graph); it
        # computes the current step, and the replay recomputes it identically (same KV writes).
        self.step(view, meta)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self.step(view, meta)
        if self._pool is None:
            self._pool = graph.pool()
        torch.cuda.synchronize(self.device)
        return graph, out
