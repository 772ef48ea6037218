"""The GPU decode step, exercised on the CPU: the step's integers planned on the host and copied at once,
rope rows chosen on the host (bit-equal to the per-sequence computation they replace), the "triton"
attention backend (under TRITON_INTERPRET on CPU tensors) against the torch one, and the padded
batch-bucket path of CUDA graphs in its emulation mode (no capture without a GPU) against eager steps.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import pytest
import torch

from internvl_runtime import AutoModel, AutoTokenizer
from internvl_runtime.config import InternVLConfig, LLMConfig, RopeScaling
from internvl_runtime.engine.cuda_graphs import DecodeGraphs, batch_buckets, bucket_for
from internvl_runtime.engine.engine import EngineConfig, LLMEngine
from internvl_runtime.engine.model_runner import SequenceStep, choose_attention_backend
from internvl_runtime.engine.sampling_params import SamplingParams
from internvl_runtime.engine.step_inputs import plan_step
from internvl_runtime.errors import InvalidRequest, UnsupportedFeature
from internvl_runtime.kernels.triton_attention import triton_available
from internvl_runtime.models.layers.rotary import RotaryEmbedding
from internvl_runtime.processing.inputs import ImageWithTiles, Message
from paths import FIXTURES

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


# ---- pure decisions ---------------------------------------------------------------------------------
def test_attention_backend_choice() -> None:
    assert choose_attention_backend("auto", device_type="cuda", has_triton=True) == "triton"
    assert choose_attention_backend("auto", device_type="cuda", has_triton=False) == "torch"
    assert choose_attention_backend("auto", device_type="cpu", has_triton=True) == "torch"
    assert choose_attention_backend("torch", device_type="cuda", has_triton=True) == "torch"
    assert choose_attention_backend("triton", device_type="cpu", has_triton=True) == "triton"
    with pytest.raises(UnsupportedFeature, match="triton"):
        choose_attention_backend("triton", device_type="cuda", has_triton=False)
    with pytest.raises(InvalidRequest, match="attention_backend"):
        choose_attention_backend("flash", device_type="cuda", has_triton=True)
    with pytest.raises(InvalidRequest, match="attention_backend"):
        EngineConfig(attention_backend="flash")


def test_batch_buckets() -> None:
    assert batch_buckets(1) == [1]
    assert batch_buckets(16) == [1, 2, 4, 8, 16]
    assert batch_buckets(48) == [1, 2, 4, 8, 16, 32, 48]
    assert [bucket_for(n, batch_buckets(48)) for n in (1, 3, 8, 9, 33, 48, 49)] == [1, 4, 8, 16, 48, 48, None]
    graphs = DecodeGraphs(lambda t, m: t.input_ids, buckets=batch_buckets(8), max_blocks_per_seq=4, block_size=16,
                          scratch_block=99, device=torch.device("cpu"), capture=False)
    assert graphs.fits(3, 4) == 4                 # 3 sequences of up to 64 tokens: bucket 4
    assert graphs.fits(3, 5) is None              # longer than the static block tables: eager
    assert graphs.fits(9, 1) is None              # more sequences than the largest bucket: eager


# ---- the step planned on the host -------------------------------------------------------------------
def _llm(variant: str) -> LLMConfig:
    return InternVLConfig.from_pretrained(FIXTURES / "ckpt" / variant).llm


def test_plan_packs_slots_lengths_tables_and_padding() -> None:
    rotary = RotaryEmbedding(_llm("tiny-1B"))
    steps = [SequenceStep([5, 6, 7], 0, [3, 4]),                # contiguous, a prefill
             SequenceStep([8], 17, [9, 2, 30], want_logits=True),  # fragmented, a decode at position 17
             SequenceStep([1, 2], 4, [6], want_logits=False)]   # a prefill chunk wanting no logits
    plan = plan_step(steps, block_size=16, rotary=rotary, pad_to=5, scratch_block=40)
    t = plan.to_device(torch.device("cpu"))
    assert t.input_ids.tolist() == [5, 6, 7, 8, 1, 2, 0, 0]
    assert t.positions.tolist() == [0, 1, 2, 17, 4, 5, 0, 0]
    assert t.slot_mapping.tolist() == [48, 49, 50, 2 * 16 + 1, 100, 101, 640, 640]
    assert t.logits_rows.tolist() == [2, 3]
    assert t.seq_lens.tolist() == [3, 18, 6, 0, 0] and t.seq_lens.dtype == torch.int32
    assert t.query_start_loc.tolist() == [0, 3, 4, 6, 7, 8]
    assert t.block_tables.tolist() == [[3, 0], [9, 2], [6, 0], [40, 0], [40, 0]]
    assert plan.query_lens == [3, 1, 2] and plan.seq_lens == [3, 18, 6]
    assert plan.context_ranges == [(48, 3), None, (96, 6)]


# ---- rope: rows chosen on the host, bit-equal to the per-sequence computation ----------------------
def reference_cos_sin(config: LLMConfig, positions: torch.Tensor, query_lens: Sequence[int],
                      seq_lens: Sequence[int], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The computation the host-planned rows replace: one group per sequence, the rope parameters from
    its length (Phi-3: its largest position + 1 read back), cos/sin per group, concatenated."""
    dim, base0, s = config.head_dim, float(config.rope_theta), config.rope_scaling
    cos_parts, sin_parts, start = [], [], 0
    for qlen, slen in zip(query_lens, seq_lens, strict=True):
        pos = positions[start:start + qlen]
        start += qlen
        base, factors, divisor, mult = base0, None, 1.0, 1.0
        if s is not None and s.type == "dynamic" and slen > config.max_position_embeddings:
            base = base0 * ((s.factor * slen / config.max_position_embeddings) - (s.factor - 1)) ** (dim / (dim - 2))
        elif s is not None and s.type == "linear":
            divisor = s.factor
        elif s is not None and s.type == "su":
            length = int(pos.max().item()) + 1
            assert config.original_max_position_embeddings is not None
            original = config.original_max_position_embeddings
            factors = s.long_factor if length > original else s.short_factor
            scale = config.max_position_embeddings / original
            mult = 1.0 if scale <= 1.0 else math.sqrt(1 + math.log(scale) / math.log(original))
        exponent = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
        inv = 1.0 / (base ** exponent) if factors is None else \
            1.0 / (torch.tensor(factors, dtype=torch.float32) * base ** exponent)
        t = pos.float()
        if divisor != 1.0:
            t = t / divisor
        freqs = t[:, None] * inv[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if mult != 1.0:
            cos, sin = cos * mult, sin * mult
        cos_parts.append(cos)
        sin_parts.append(sin)
    return torch.cat(cos_parts).to(dtype), torch.cat(sin_parts).to(dtype)


def _rope_configs() -> dict[str, LLMConfig]:
    qwen, internlm, phi3 = _llm("tiny-1B"), _llm("tiny-2B"), _llm("tiny-4B")
    return {
        "plain": qwen,
        "linear": dataclasses.replace(qwen, rope_scaling=RopeScaling(type="linear", factor=2.0)),
        # small limits so that one batch mixes sequences on both sides of them
        "dynamic": dataclasses.replace(internlm, max_position_embeddings=40),
        "su": dataclasses.replace(phi3, original_max_position_embeddings=40),
    }


@pytest.mark.parametrize("variant", ["plain", "linear", "dynamic", "su"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_rows_bit_equal_to_per_sequence_rope(variant: str, dtype: torch.dtype) -> None:
    config = _rope_configs()[variant]
    rotary = RotaryEmbedding(config)
    batches = [
        [SequenceStep([1] * 30, 0, list(range(4)))],                                   # one prefill, short
        [SequenceStep([1] * 50, 0, list(range(4)))],                                   # one prefill, past the limit
        [SequenceStep([1], 20, [0, 1]), SequenceStep([1], 60, [2, 3, 4, 5]),           # decodes both sides,
         SequenceStep([1], 39, [6, 7, 8]), SequenceStep([1], 45, [9, 10, 11])],        # at and past the limit
        [SequenceStep([1] * 12, 30, [0, 1, 2]), SequenceStep([1], 70, [3, 4, 5, 6, 7]),  # a mixed batch
         SequenceStep([1] * 5, 0, [8]), SequenceStep([1] * 3, 38, [9, 10, 11])],
        [SequenceStep([1] * 4, 0, [0], positions=[0, 1, 45, 46]),                      # explicit positions
         SequenceStep([1] * 3, 0, [1], positions=[5, 6, 7])],
    ]
    for steps in batches:
        plan = plan_step(steps, block_size=16, rotary=rotary)
        t = plan.to_device(torch.device("cpu"))
        cos, sin = rotary.cos_sin(t.positions, t.rope_rows, dtype, plan.rope.extra_bases)
        ref_cos, ref_sin = reference_cos_sin(config, t.positions, plan.query_lens, plan.seq_lens, dtype)
        assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin), (variant, [s.seq_len for s in steps])
        # a forward that did not plan rows (the official forward, scoring) derives the same ones
        rows, extra = rotary.rows_from_positions(t.positions, plan.query_lens, plan.seq_lens)
        cos2, sin2 = rotary.cos_sin(t.positions, rows, dtype, extra)
        assert torch.equal(cos2, ref_cos) and torch.equal(sin2, ref_sin)
    if variant in ("dynamic", "su"):   # the limits were crossed: several rows were in use
        plan = plan_step(batches[2], block_size=16, rotary=rotary)
        assert len(set(plan.rope.rows)) >= 2


# ---- the engine: triton backend and graph buckets against the torch backend ------------------------
@functools.lru_cache(maxsize=2)
def _loaded(variant: str):
    path = FIXTURES / "ckpt" / variant
    return AutoModel.from_pretrained(path, torch_dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def _engine(variant: str, **kwargs) -> LLMEngine:
    model, tokenizer = _loaded(variant)
    kwargs.setdefault("num_blocks", 256)
    return LLMEngine(model, tokenizer, EngineConfig(**kwargs))


GREEDY = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
QUESTIONS = ["Hello, who are you?", "Count: one two three four five six seven eight nine ten eleven twelve",
             "Describe the weather " * 6, "Hi"]


def _run(engine: LLMEngine) -> list[list[int]]:
    """A mixed batch (prompts of different lengths, one with an image, arriving at once, so prefills and
    decodes share steps), then a second turn of the first conversation (a prefix-cache hit)."""
    prepared = [engine.processor.prepare([Message("user", q)]) for q in QUESTIONS]
    image = ImageWithTiles(FIXTURES / "data" / "frame_000.png", max_dynamic_patch=1)   # a 256-token image span
    prepared.insert(2, engine.processor.prepare([Message("user", "What is in the image?", [image])]))
    first = [out.token_ids for out in engine.generate(prepared, GREEDY)]
    answer = engine.tokenizer.decode(first[0])
    second = engine.processor.prepare([Message("user", QUESTIONS[0]), Message("assistant", answer),
                                       Message("user", "And then?")])
    before = engine.stats["cached_prompt_tokens"]
    again = engine.generate([second], GREEDY)[0].token_ids
    assert engine.stats["cached_prompt_tokens"] > before, "the second turn should hit the prefix cache"
    return [*first, again]


@needs_triton
@pytest.mark.parametrize("variant", ["tiny-1B", "tiny-4B", "tiny-2B"])
def test_triton_backend_greedy_equals_torch_backend(variant: str) -> None:
    # a small token budget: prefills are chunked, and chunks share steps with other sequences' decodes
    torch_tokens = _run(_engine(variant, attention_backend="torch", max_num_batched_tokens=24))
    engine = _engine(variant, attention_backend="triton", enforce_eager=True, max_num_batched_tokens=24)
    assert engine.runner.attention_backend == "triton" and engine.runner.graphs is None
    assert _run(engine) == torch_tokens


@needs_triton
def test_padded_bucket_path_equals_eager() -> None:
    eager = _engine("tiny-1B", attention_backend="triton", enforce_eager=True, max_num_batched_tokens=24)
    expected = _run(eager)
    engine = _engine("tiny-1B", attention_backend="triton", max_num_batched_tokens=24, max_num_seqs=6)
    graphs = engine.runner.graphs
    assert graphs is not None and not graphs.capture     # emulation: no GPU here
    assert graphs.buckets == [1, 2, 4, 6]
    # one block past the scheduler's pool is the padded rows' scratch block; no sequence can get it
    assert engine.runner.kv_cache.num_blocks == engine.num_blocks == 256
    assert engine.runner.kv_cache.scratch_blocks == 1 and graphs.scratch_block == 256
    assert _run(engine) == expected
    padded = {(n, bucket) for n, bucket in graphs.runs if n < bucket}
    assert padded, graphs.runs              # some decode steps ran padded up to their bucket
    assert {bucket for _, bucket in graphs.runs} >= {1, 4}, graphs.runs


class _RecordOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every ATen op called while active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func))
        return func(*args, **(kwargs or {}))


# The ops that read a device value back to the host (item, tolist, bool(tensor), data-dependent shapes):
# each one is a synchronisation, and none may run inside a captured CUDA graph.
HOST_READS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default",
              "aten.unique_consecutive.default", "aten._unique2.default", "aten.equal.default"}


@needs_triton
@pytest.mark.parametrize("variant", ["tiny-1B", "tiny-4B", "tiny-2B"])   # plain, Phi-3 "su", dynamic NTK rope
def test_the_graph_step_reads_nothing_back_to_the_host(variant: str) -> None:
    engine = _engine(variant, attention_backend="triton", max_num_seqs=4)
    engine.generate([engine.processor.prepare([Message("user", q)]) for q in QUESTIONS[:3]], GREEDY)
    graphs = engine.runner.graphs
    assert graphs is not None and graphs._metas, "decode steps should have run through the bucket path"
    for bucket in sorted(graphs._metas):
        view, meta = graphs._view(bucket)          # the static buffers as the last step of this bucket left them
        with _RecordOps() as recorded:
            hidden = graphs.step(view, meta)
        assert hidden.shape[0] == bucket
        assert not recorded.ops & HOST_READS, sorted(recorded.ops & HOST_READS)
        assert "aten.index_copy_.default" in recorded.ops or "aten.index_put_.default" in recorded.ops, \
            "the recorder should see the step's own ops (the KV writes)"
