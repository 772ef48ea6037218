"""Runs one model step for a batch of sequences over the paged KV cache.

The runner knows nothing of scheduling: it is handed, per sequence, the new tokens of this step, how
many tokens were already computed, the KV block table, and any image feature rows that fill the new
``<IMG_CONTEXT>`` tokens. It returns the float32 logits of each sequence's last new token (only for
the sequences that asked for them: a non-final prefill chunk does not).

Per step it plans every integer on the host and copies them to the device at once (``step_inputs``),
runs one step function (embedding + decoder) either eagerly or, for decode steps on the "triton"
attention backend, through the CUDA graph of the batch's bucket (``cuda_graphs``), and computes the
logits of the rows that want them outside any graph.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..errors import InvalidRequest, UnsupportedFeature
from ..kernels.triton_attention import triton_available
from ..models.internvl import InternVLModel
from ..models.layers.attention import AttentionMetadata, KVCache
from ..models.layers.moe import SparseMoE
from ..placement import layer_devices
from .cuda_graphs import DecodeGraphs, batch_buckets
from .kv_groups import KVCacheGroup, distinct_pools, kv_cache_groups, layer_slots
from .step_inputs import SequenceStep, StepPlan, StepTensors, plan_step

__all__ = ["ATTENTION_BACKENDS", "ModelRunner", "SequenceStep", "choose_attention_backend", "local_kv_heads",
           "model_kv_groups"]

#: EngineConfig.attention_backend's values: "torch" (SDPA and small matmuls per sequence, the CPU
#: default), "triton" (one paged-attention kernel per layer for the whole step, the GPU default).
ATTENTION_BACKENDS = ("auto", "torch", "triton")


def choose_attention_backend(requested: str, *, device_type: str, has_triton: bool) -> str:
    """The backend a runner uses: "auto" is "triton" on a CUDA device where triton imports, else "torch"."""
    if requested not in ATTENTION_BACKENDS:
        raise InvalidRequest(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {requested!r}")
    if requested == "auto":
        return "triton" if device_type == "cuda" and has_triton else "torch"
    if requested == "triton" and not has_triton:
        raise UnsupportedFeature("attention_backend='triton' needs the triton package (pip install triton)")
    return requested


def local_kv_heads(model: InternVLModel) -> int:
    """KV heads this process caches: all of them, or its share under tensor parallelism."""
    return model.language_model.model.decoder_layers[0].self_attn.num_kv_heads


def model_kv_groups(model: InternVLModel, *, hybrid: bool = True) -> tuple[KVCacheGroup, ...]:
    """The KV groups of the model's decoder (``kv_groups.kv_cache_groups`` of its layers' windows); with
    ``hybrid=False``, one group of every layer (sliding layers keep every block, as full ones do)."""
    windows = model.language_model.attention_windows()
    return kv_cache_groups(windows) if hybrid else (KVCacheGroup(tuple(range(len(windows)))),)


class ModelRunner:
    """Owns the KV cache for one model and executes steps."""

    def __init__(self, model: InternVLModel, *, num_blocks: int, block_size: int = 16,
                 kv_dtype: torch.dtype | None = None, image_token_id: int | None = None,
                 attention_backend: str = "auto", enforce_eager: bool = False, max_model_len: int | None = None,
                 max_num_seqs: int = 256, kv_groups: tuple[KVCacheGroup, ...] | None = None) -> None:
        """``image_token_id``: the ``<IMG_CONTEXT>`` id whose positions take image features (needed only
        by steps that carry image features). ``attention_backend``: see ``choose_attention_backend``.
        Decode steps of at most ``max_num_seqs`` sequences of at most ``max_model_len`` tokens run on
        batch-bucket graphs (``cuda_graphs``) unless ``enforce_eager``, on the triton backend with the
        model on one device: captured on a GPU, emulated (padding, static buffers) elsewhere. (Tensor
        parallelism's runners pass ``enforce_eager``: its all-reduces are not captured.) Graphs reserve one
        extra KV block, past ``num_blocks``, for padded rows. ``kv_groups``: the KV cache's layer groups
        (``model_kv_groups``; None: one group of every layer): several groups (sliding-window layers freeing
        their blocks) share pool tensors, and each sequence then brings a block table per group; block
        ``num_blocks`` is then the null block freed positions point at (never written), and the graphs'
        scratch block the next one."""
        self.model = model
        self.image_token_id = image_token_id
        llm = model.config.llm
        self.block_size = block_size
        embed = model.language_model.get_input_embeddings().weight
        self.device = embed.device
        self.dtype = kv_dtype or embed.dtype
        self.rotary = model.language_model.rotary
        # triton is asked about only where it could be chosen: importing it costs ~70 MB resident (its
        # library's pages), for nothing on a CPU runner under "auto" or "torch"
        wants_triton = attention_backend == "triton" or (attention_backend == "auto" and self.device.type == "cuda")
        self.attention_backend = choose_attention_backend(attention_backend, device_type=self.device.type,
                                                          has_triton=wants_triton and triton_available())
        devices = layer_devices(model.language_model)
        one_device = len({str(d) for d in devices}) == 1 and str(devices[0]) == str(self.device)
        # a layer that reads back to the host (a mixture of experts on its per-expert path) cannot be captured
        capturable = all(m.capturable(self.device) for m in model.modules() if isinstance(m, SparseMoE))
        self.kv_groups = kv_groups or model_kv_groups(model, hybrid=False)
        group_of, pool_of = layer_slots(self.kv_groups, llm.num_hidden_layers)
        use_graphs = self.attention_backend == "triton" and not enforce_eager and one_device and capturable
        null_blocks = 1 if len(self.kv_groups) > 1 else 0       # BlockManager.null_block, block num_blocks
        self.kv_cache = KVCache.allocate(num_layers=llm.num_hidden_layers, num_blocks=num_blocks,
                                         block_size=block_size, num_kv_heads=local_kv_heads(model),
                                         head_dim=llm.head_dim, dtype=self.dtype, device=devices,
                                         scratch_blocks=null_blocks + (1 if use_graphs else 0),
                                         layer_groups=group_of if len(self.kv_groups) > 1 else (),
                                         layer_pools=pool_of)
        self.graphs: DecodeGraphs | None = None
        if use_graphs:
            max_len = max_model_len or llm.max_position_embeddings
            self.graphs = DecodeGraphs(self._step, buckets=batch_buckets(max_num_seqs),
                                       max_blocks_per_seq=-(-max_len // block_size), block_size=block_size,
                                       scratch_block=num_blocks + null_blocks, device=self.device,
                                       num_groups=len(self.kv_groups),
                                       capture=self.device.type == "cuda")

    @staticmethod
    def kv_bytes_per_block(model: InternVLModel, block_size: int, dtype: torch.dtype,
                           kv_groups: tuple[KVCacheGroup, ...] | None = None) -> int:
        """Bytes one block id costs: keys and values of every pool tensor (a layer each, or with several
        KV groups one per layer of a group, per device: ``kv_groups.distinct_pools``)."""
        llm = model.config.llm
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * len(ModelRunner.kv_pool_devices(model, kv_groups)) * block_size * local_kv_heads(model) \
            * llm.head_dim * elem

    @staticmethod
    def kv_pool_devices(model: InternVLModel, kv_groups: tuple[KVCacheGroup, ...] | None = None
                        ) -> list[torch.device]:
        """The device of each KV pool tensor (keys and values each) the runner allocates for ``kv_groups``."""
        groups = kv_groups or model_kv_groups(model, hybrid=False)
        _, pool_of = layer_slots(groups, model.config.llm.num_hidden_layers)
        devices = layer_devices(model.language_model)
        by_name = {str(d): d for d in devices}
        return [by_name[str(name)] for _, name in distinct_pools(pool_of, [str(d) for d in devices])]

    def _step(self, tensors: StepTensors, meta: AttentionMetadata,
              features: list[torch.Tensor | None] | None = None) -> torch.Tensor:
        """The one step function (eager and graph paths): embed the tokens (image feature rows written
        per sequence, a prefill matter) and run the decoder -> hidden states (T, hidden)."""
        if features is None or all(f is None for f in features):
            x = self.model.embed(tensors.input_ids)
        else:
            pieces, start = [], 0
            for n, rows in zip(meta.query_lens, features, strict=True):
                pieces.append(self.model.embed(tensors.input_ids[start:start + n], rows,
                                               image_token_id=self.image_token_id))
                start += n
            x = torch.cat(pieces, dim=0)
        hidden: torch.Tensor = self.model.language_model(x, tensors.positions, meta, self.kv_cache)
        return hidden

    def _metadata(self, plan: StepPlan, tensors: StepTensors, steps: list[SequenceStep]) -> AttentionMetadata:
        """Group 0's metadata, with the later KV groups' in ``group_metadata``."""
        groups = [self._group_metadata(plan, tensors, steps, g) for g in range(plan.num_groups)]
        if len(groups) == 1:
            return groups[0]
        return replace(groups[0], group_metadata=tuple(groups[1:]))

    def _group_metadata(self, plan: StepPlan, tensors: StepTensors, steps: list[SequenceStep],
                        group: int) -> AttentionMetadata:
        ranges = plan.context_ranges if group == 0 else plan.other_context_ranges[group - 1]
        slot_mapping = tensors.slot_mapping if group == 0 else tensors.other_slot_mappings[group - 1]
        block_tables = tensors.block_tables if group == 0 else tensors.other_block_tables[group - 1]
        context_slots: list[torch.Tensor | None] = [None] * len(steps)
        if self.device.type == "cpu" and self.attention_backend == "torch":
            # The CPU paths (torch attention, the native decode stack) read a fragmented context's slots.
            bs = self.block_size
            for i, step in enumerate(steps):
                if ranges[i] is None:
                    table = torch.tensor(step.block_tables[group][: -(-step.seq_len // bs)], dtype=torch.long)
                    context_slots[i] = (table[:, None] * bs + torch.arange(bs)).flatten()[: step.seq_len]
        return AttentionMetadata(query_lens=plan.query_lens, seq_lens=plan.seq_lens,
                                 slot_mapping=slot_mapping, context_slots=context_slots,
                                 context_ranges=ranges, attention_backend=self.attention_backend,
                                 block_tables=block_tables, seq_lens_tensor=tensors.seq_lens,
                                 query_start_loc=tensors.query_start_loc, block_size=self.block_size,
                                 rope_rows=tensors.rope_rows, rope_extra_bases=plan.rope.extra_bases)

    def _graph_plan(self, steps: list[SequenceStep]) -> StepPlan | None:
        """The step planned for its graph bucket, or None when it is not a decode step a graph can run."""
        graphs = self.graphs
        if graphs is None or any(len(s.token_ids) != 1 or s.image_features is not None for s in steps):
            return None
        bucket = graphs.fits(len(steps), max(-(-s.seq_len // self.block_size) for s in steps))
        if bucket is None:
            return None
        plan = plan_step(steps, block_size=self.block_size, rotary=self.rotary, pin=self.device.type == "cuda",
                         pad_to=bucket, scratch_block=graphs.scratch_block)
        return None if plan.rope.extra_bases else plan    # a rope row past the static table: eager

    @torch.inference_mode()
    def execute(self, steps: list[SequenceStep]) -> torch.Tensor:
        """Run the step; returns logits (num sequences wanting logits, vocab) float32."""
        assert all(len(s.block_tables) == len(self.kv_groups) for s in steps), "one block table per KV group"
        plan = self._graph_plan(steps) if steps else None
        if plan is not None:
            assert self.graphs is not None
            tensors = plan.to_device(self.device)
            hidden = self.graphs.run(plan, tensors)
        else:
            plan = plan_step(steps, block_size=self.block_size, rotary=self.rotary, pin=self.device.type == "cuda")
            tensors = plan.to_device(self.device)
            meta = self._metadata(plan, tensors, steps)
            hidden = self._step(tensors, meta, [s.image_features for s in steps])
        if plan.num_logits == 0:
            return torch.empty((0, self.model.config.llm.vocab_size))
        return self.model.language_model.compute_logits(hidden.index_select(0, tensors.logits_rows))
