"""LLMEngine: requests in, tokens out, with continuous batching over a paged KV cache.

``step()`` is the whole loop, nano-vllm style: schedule -> encode the images the step needs (batched
across requests, through the feature cache) -> run the model -> sample -> update -> detokenize -> emit.
The scheduler and block manager are plain Python; the runner is the only place that touches tensors.

Example::

    engine = LLMEngine.from_pretrained("pretrained/InternVL2-1B", dtype=torch.bfloat16)
    engine.add_request("r1", engine.processor.prepare([Message("user", "Describe it.", ["cat.jpg"])]),
                       SamplingParams(max_new_tokens=64, temperature=0))
    while engine.has_unfinished_requests():
        for out in engine.step():
            print(out.delta, end="")
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypedDict, TypeVar

import torch

from ..errors import InternVLError, InvalidRequest, PlaceholderMismatch, RequestFailed, UnsupportedFeature
from ..hardware import default_max_num_seqs
from ..hub import HubOptions
from ..loading import load_model
from ..placement import physical
from ..processing.inputs import ImageInput, InputProcessor, PreparedRequest
from ..processing.tokenization import AutoTokenizer
from .detokenizer import IncrementalDetokenizer
from .kv_groups import FULL_ATTENTION, KVCacheGroup, max_blocks_per_sequence
from .memory import cpu_kv_budget, measure_memory, placement_blocks, profile_worst_step
from .model_runner import ATTENTION_BACKENDS, ModelRunner, SequenceStep, model_kv_groups
from .sampler import Sampler, SamplingRow, TokenLogprobs, make_generator
from .sampling_params import SamplingParams
from .scheduler import Scheduler, SchedulerConfig
from .sequence import Sequence
from .structured_output import GrammarMatcher, StructuredOutputBackend, apply_token_bitmask
from .vision_cache import VisionFeatureCache

logger = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    """Engine knobs. The scheduling ones are ``SchedulerConfig``'s (its defaults, its checks: this class
    only passes them on), except ``max_num_seqs``: None takes ``hardware.default_max_num_seqs`` of the
    model's device (256 on a GPU, 16 on the CPU; at most ``max_num_batched_tokens``) when the engine starts.

    KV cache size: ``num_blocks`` if given; else ``kv_cache_bytes`` if given; else on CUDA vLLM's planning
    over every GPU of the placement (``engine.memory``: ``gpu_memory_utilization`` of each GPU's memory,
    less what the weights and a profiled worst-case step use, less ``image_cache_bytes`` on the vision
    GPU), on the CPU a quarter of the memory available at start-up; in every case at most enough for
    ``max_num_seqs`` full contexts (of up to 16k tokens)."""

    max_num_seqs: int | None = None
    max_num_batched_tokens: int = SchedulerConfig.max_num_batched_tokens
    block_size: int = SchedulerConfig.block_size
    num_blocks: int | None = None
    kv_cache_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = SchedulerConfig.enable_prefix_caching
    image_cache_bytes: int = 512 * 2**20
    max_images_per_request: int = 16
    max_model_len: int | None = None
    vision_batch_tiles: int = 32
    attention_backend: str = "auto"     # "auto" | "torch" | "triton" (model_runner.choose_attention_backend)
    enforce_eager: bool = False         # True: no CUDA graphs for decode steps (vLLM's name)
    #: True: sliding-window layers keep every block as full-attention ones do (one KV group, vLLM's name);
    #: False: they share the pool in their own KV groups and free their blocks past the window (kv_groups).
    disable_hybrid_kv_cache_manager: bool = False

    def __post_init__(self) -> None:
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise InvalidRequest(f"EngineConfig.attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, "
                                 f"got {self.attention_backend!r}")
        for name in ("max_images_per_request", "vision_batch_tiles"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise InvalidRequest(f"EngineConfig.{name} must be an integer >= 1, got {getattr(self, name)!r}")
        utilization = self.gpu_memory_utilization
        if isinstance(utilization, bool) or not isinstance(utilization, (int, float)) or not 0 < utilization <= 1:
            raise InvalidRequest(f"EngineConfig.gpu_memory_utilization must be in (0, 1], got {utilization!r}")
        self.scheduler_config(num_blocks=self.num_blocks or 1, max_model_len=self.max_model_len)  # its checks, now

    def for_device(self, device_type: str) -> EngineConfig:
        """This config with ``max_num_seqs`` set: as given, else the device's default (at most
        ``max_num_batched_tokens``, which every running sequence's decode must fit in)."""
        if self.max_num_seqs is not None:
            return self
        return replace(self, max_num_seqs=min(default_max_num_seqs(device_type), self.max_num_batched_tokens))

    def scheduler_config(self, *, num_blocks: int, max_model_len: int | None,
                         kv_groups: tuple[KVCacheGroup, ...] = FULL_ATTENTION) -> SchedulerConfig:
        """The scheduler's config for a pool of ``num_blocks`` and a context of ``max_model_len`` (an unset
        ``max_num_seqs`` is checked as 1: the engine sets it, ``for_device``, before it schedules)."""
        return SchedulerConfig(max_num_seqs=1 if self.max_num_seqs is None else self.max_num_seqs,
                               max_num_batched_tokens=self.max_num_batched_tokens,
                               block_size=self.block_size, num_blocks=num_blocks,
                               enable_prefix_caching=self.enable_prefix_caching, max_model_len=max_model_len,
                               kv_groups=kv_groups)


@dataclass
class RequestOutput:
    """What one step produced for one request (``delta`` and ``new_token_ids`` are this step's)."""

    request_id: str
    delta: str
    text: str
    new_token_ids: list[int]
    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int = 0
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    first_token_time: float | None = None
    arrival_time: float = 0.0
    error: BaseException | None = None      # set when the request failed (finish_reason "error")


class EngineStats(TypedDict):
    """The engine's counters, the only ones (``AsyncEngine`` serves them on /metrics). The engine's thread
    adds to them; a reader on another thread copies them (``engine.stats.copy()``) and never waits."""

    requests_added: int          # accepted by add_request
    requests_refused: int        # refused by add_request (context, a duplicate id...)
    requests_failed: int         # ended with an error inside the engine (the rest of the batch went on)
    requests_aborted: int        # ended by abort_request before they finished (a client gone)
    requests_finished: int       # finished by a stop token, a stop string or their length
    prompt_tokens: int           # prompt tokens computed, prefix-cache hits included (again after a preemption)
    cached_prompt_tokens: int    # of those, found in the prefix cache
    generated_tokens: int
    vision_tiles_encoded: int    # tiles run through the vision encoder (feature-cache misses)


@dataclass
class _RequestState:
    seq: Sequence
    images: list[ImageInput]
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None
    matcher: GrammarMatcher | None = None            # the request's structured-output state, if constrained
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    first_token_time: float | None = None
    features: dict[str, torch.Tensor] = field(default_factory=dict)  # held until the prompt is computed


T = TypeVar("T")
R = TypeVar("R")


def one_by_one_on_failure(items: list[T], run: Callable[[list[T]], R], failed: dict[str, BaseException], *,
                          key: Callable[[T], str]) -> list[R]:
    """``[run(items)]``; if that raises, ``run([item])`` for each item instead, and each item that raises on
    its own is recorded in ``failed`` under ``key(item)`` (a lone item that raises is not run twice). How a
    step keeps one request's failure from ending the others."""
    try:
        return [run(items)]
    except Exception as exc:  # noqa: BLE001 - find whose part fails
        if len(items) == 1:
            failed[key(items[0])] = exc
            return []
        logger.warning("a batch of %d failed (%r); running it item by item", len(items), exc)
    results = []
    for item in items:
        try:
            results.append(run([item]))
        except Exception as exc:  # noqa: BLE001
            failed[key(item)] = exc
    return results


def logits_device(model: Any) -> torch.device:
    """The device ``compute_logits`` leaves the logits on: the LM head's (the last unit of a spread model;
    a quantized head holds buffers, not parameters)."""
    head = model.language_model.lm_head
    first: torch.Tensor | None = next(itertools.chain(head.parameters(), head.buffers()), None)
    embed: torch.Tensor = model.language_model.get_input_embeddings().weight
    return first.device if first is not None else embed.device


class LLMEngine:
    def __init__(self, model: Any, tokenizer: Any, config: EngineConfig | None = None,
                 processor: InputProcessor | None = None, sampler: Sampler | None = None,
                 runner_factory: Callable[..., Any] = ModelRunner,
                 structured_output: StructuredOutputBackend | None = None) -> None:
        """``sampler``: the logits -> token step (default ``Sampler()``); pass another to observe or
        replace it, e.g. one that records the logits it is given. ``runner_factory``: called like
        ``ModelRunner(model, num_blocks=, block_size=, image_token_id=, attention_backend=, enforce_eager=,
        max_model_len=, max_num_seqs=)`` to build the runner (tensor
        parallelism passes one whose runner drives the other ranks). ``structured_output``: the grammar
        engine set up for this tokenizer; default: built at the first constrained request (reading the
        token bytes of a 151k vocabulary takes about a second), with the template's stop ids as its EOS."""
        self.model = model
        self.tokenizer = tokenizer
        embed = model.language_model.get_input_embeddings().weight
        self.config = (config or EngineConfig()).for_device(embed.device.type)
        cfg = self.config
        self.processor = processor or InputProcessor.for_model(model, tokenizer,
                                                               max_images=cfg.max_images_per_request)
        llm = model.config.llm
        self.max_model_len: int = min(cfg.max_model_len or llm.max_position_embeddings, llm.max_position_embeddings)
        #: the KV cache's layer groups: one, unless sliding-window layers free their blocks (engine.kv_groups)
        self.kv_groups = model_kv_groups(model, hybrid=not cfg.disable_hybrid_kv_cache_manager)
        per_block = ModelRunner.kv_bytes_per_block(model, cfg.block_size, embed.dtype, self.kv_groups)
        #: Where the runner leaves the logits: seeded requests' generators are made there (sampling never
        #: moves a row to another device, and torch draws with a generator only on its own device).
        self.logits_device = logits_device(model)
        # A runner of another kind (tensor parallelism: its steps are collectives of every rank) is not
        # profiled here; it gets the unprofiled rule.
        num_blocks = cfg.num_blocks or self._auto_num_blocks(per_block, embed.device,
                                                             profile=runner_factory is ModelRunner)
        self.runner = runner_factory(model, num_blocks=num_blocks, block_size=cfg.block_size,
                                     image_token_id=self.processor.img_context_id,
                                     attention_backend=cfg.attention_backend, enforce_eager=cfg.enforce_eager,
                                     max_model_len=self.max_model_len, max_num_seqs=cfg.max_num_seqs,
                                     kv_groups=self.kv_groups)
        self.scheduler = Scheduler(cfg.scheduler_config(num_blocks=num_blocks, max_model_len=self.max_model_len,
                                                        kv_groups=self.kv_groups))
        if len(self.kv_groups) > 1:
            self._log_kv_capacity(num_blocks)
        self.vision_cache = VisionFeatureCache(cfg.image_cache_bytes)
        self.sampler = sampler if sampler is not None else Sampler()
        self.vocab_size: int = llm.vocab_size
        self._structured_output = structured_output
        # Never sample an id the tokenizer cannot decode (embedding rows past the tokenizer's end).
        self._decodable = len(tokenizer) if len(tokenizer) < llm.vocab_size else None
        self._states: dict[str, _RequestState] = {}
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        self._special_tokens: dict[int, str] = {i: getattr(t, "content", str(t)) for i, t in added.items()}
        self.stats = EngineStats(requests_added=0, requests_refused=0, requests_failed=0, requests_aborted=0,
                                 requests_finished=0, prompt_tokens=0, cached_prompt_tokens=0, generated_tokens=0,
                                 vision_tiles_encoded=0)
        self.ttft_seconds: deque[float] = deque(maxlen=1000)   # arrival to first token, the last 1000 requests

    def _auto_num_blocks(self, per_block: int, device: torch.device, *, profile: bool) -> int:
        """KV blocks when ``num_blocks`` is not given (see ``EngineConfig``); ``profile``: plan a CUDA
        placement from a profiled step (else 80% of the embedding GPU's free memory, the old rule)."""
        cfg = self.config
        assert cfg.max_num_seqs is not None
        wanted = cfg.max_num_seqs * max_blocks_per_sequence(self.kv_groups, min(self.max_model_len, 16384),
                                                            cfg.block_size, cfg.max_num_batched_tokens)
        if cfg.kv_cache_bytes is not None:
            return int(max(16, min(cfg.kv_cache_bytes // per_block, wanted)))
        if device.type == "cuda":
            self.model.load_vision()     # a deferred encoder on a GPU: in memory before its free memory is read
        if device.type == "cuda" and profile:
            return min(self._planned_gpu_blocks(per_block), wanted)
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return int(max(16, min(int(free * 0.8) // per_block, wanted)))
        return int(max(16, min(cpu_kv_budget(self._host_reserved()) // per_block, wanted)))

    def _host_reserved(self) -> int:
        """Host bytes the model holds or will hold that MemAvailable does not show as used (see
        ``cpu_kv_budget``)."""
        return int(self.model.vision_pending_bytes + self.model.mapped_bytes)

    def _planned_gpu_blocks(self, per_block: int) -> int:
        """``engine.memory``'s plan over every device of the placement: the CUDA ones measured around a
        profiled worst-case step, layers on the CPU (a spill) within the CPU's rule."""
        cfg, model = self.config, self.model
        assert cfg.max_num_seqs is not None
        model.load_vision()          # a deferred encoder: its memory is in the plan, measured like the rest
        layers = [physical(d) for d in ModelRunner.kv_pool_devices(model, self.kv_groups)]   # one per KV pool
        vision = physical(next(model.mlp1.parameters()).device)
        cuda = sorted({d for d in (*layers, vision, self.logits_device) if d.type == "cuda"}, key=str)
        tokens = min(cfg.max_num_batched_tokens, self.max_model_len)
        rows = min(cfg.max_num_seqs, tokens)
        measured = measure_memory(cuda, lambda: profile_worst_step(
            model, vision_batch_tiles=cfg.vision_batch_tiles, num_tokens=tokens,
            num_rows=rows, block_size=cfg.block_size,
            image_token_id=self.processor.img_context_id, logits_device=self.logits_device,
            attention_backend=cfg.attention_backend))
        blocks, devices = placement_blocks(layers, vision, measured, utilization=cfg.gpu_memory_utilization,
                                           image_cache_bytes=cfg.image_cache_bytes,
                                           bytes_per_layer_block=per_block // len(layers),
                                           host_budget=cpu_kv_budget(self._host_reserved()))
        for device in devices:
            logger.info("KV cache plan on %s: %.2f GiB total, %.2f GiB in use after loading, %.2f GiB step "
                        "peak, %.2f GiB image cache, %d layers", device.name, device.total / 2**30,
                        device.used_after_load / 2**30, device.profile_peak / 2**30, device.cache_bytes / 2**30,
                        device.num_layers)
        logger.info("KV cache: %d blocks of %d tokens (gpu_memory_utilization %g)", blocks, cfg.block_size,
                    cfg.gpu_memory_utilization)
        return max(1, blocks)

    def _log_kv_capacity(self, num_blocks: int) -> None:
        """Log how many sequences of the context length fit in the pool with the KV groups, and as many
        bytes would hold with one group (every layer keeping every block)."""
        cfg = self.config
        length = min(self.max_model_len, 16384)
        per_seq = max_blocks_per_sequence(self.kv_groups, length, cfg.block_size, cfg.max_num_batched_tokens)
        one_group = ModelRunner.kv_bytes_per_block(self.model, cfg.block_size, self.runner.dtype)
        per_block = ModelRunner.kv_bytes_per_block(self.model, cfg.block_size, self.runner.dtype, self.kv_groups)
        before = num_blocks * per_block // one_group // -(-length // cfg.block_size)
        logger.info("KV cache: %d groups (%s); %d sequences of %d tokens fit in %d blocks (%d with every layer "
                    "keeping every block)", len(self.kv_groups),
                    ", ".join(f"{len(g.layers)} layers {'full' if g.window is None else f'window {g.window}'}"
                              for g in self.kv_groups), num_blocks // per_seq, length, num_blocks, before)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype | str | None = None, device: Any = "cpu",
                        config: EngineConfig | None = None, progress: bool = False, quantization: Any = None,
                        allow_pickle: bool = False, build: Any = None,
                        runner_factory: Callable[..., Any] = ModelRunner, hub: HubOptions | None = None,
                        mmap: bool = True, vision: str = "eager", pack_bf16: bool = False,
                        **config_kwargs: Any) -> LLMEngine:
        """Load a checkpoint folder (or a Hugging Face Hub id, fetched with ``hub``'s revision, cache and
        token) and build the engine: the model through the one loader
        (``loading.load_model``: ``dtype``, ``device`` as a device, "auto" or a device map, ``quantization``,
        a tqdm bar over the weights when ``progress``), its tokenizer, and the KV cache.

        ``config`` (else ``EngineConfig(**config_kwargs)``) sizes the engine. Tensor parallelism passes
        ``build`` (the rank's slice-reading builder) and ``runner_factory`` (builds the runner that drives
        the other ranks); both come from ``distributed``, which this layer never imports. ``mmap``, ``pack_bf16``
        and ``vision`` ("eager", "lazy", "auto"): the loader's (``loading.load_model``); a lazy vision encoder
        is loaded on the engine thread by the first step with an image, and the CPU's KV budget reserves its
        memory before that."""
        model = load_model(path, dtype=dtype, device_map=device, quantization=quantization, allow_pickle=allow_pickle,
                           progress=progress, build=build, hub=hub, mmap=mmap, vision=vision, pack_bf16=pack_bf16)
        tokenizer = AutoTokenizer.from_pretrained(path, **asdict(hub or HubOptions()))
        return cls(model, tokenizer, config or EngineConfig(**config_kwargs), runner_factory=runner_factory)

    # -- requests --------------------------------------------------------------------------------
    def add_request(self, request_id: str, request: PreparedRequest, params: SamplingParams | None = None,
                    arrival_time: float | None = None, *,
                    image_features: Mapping[str, torch.Tensor] | None = None) -> None:
        """Queue a prepared request. Raises before any work if it cannot be served.

        ``image_features``: feature rows computed by the caller, by span content hash, each
        ``(span length, hidden)``; those spans take them instead of encoding ``request.images`` (the
        official ``generate()`` encodes all tiles of a batch in one call, and takes ``visual_features``).
        Like encoded features they are held until the prompt is computed and offered to the feature
        cache, so the hashes must identify the features, as ``ImageInput``'s do.
        """
        params = params or SamplingParams()
        given = self._given_features(request, image_features)
        try:
            if request_id in self._states:
                raise InvalidRequest(f"request id {request_id!r} is already in use")
            if params.num_beams != 1:  # beam search runs in engine.beam_search (api.chat's generate)
                raise UnsupportedFeature(f"num_beams={params.num_beams}: the engine does not run beam search")
            out_of_vocab = sorted(t for t in params.logit_bias if t >= self.vocab_size)
            if out_of_vocab:
                raise InvalidRequest(f"logit_bias has token ids outside the vocabulary (0..{self.vocab_size - 1}): "
                                     f"{out_of_vocab[:10]}")
            matcher = (self.structured_output_backend.matcher(params.structured_output)
                       if params.structured_output is not None else None)    # InvalidRequest if it won't compile
            seq = Sequence(request_id, request.prompt_token_ids, params, mm_spans=request.mm_spans,
                           eos_token_ids=self.processor.stop_token_ids, arrival_time=arrival_time)
            self.scheduler.add(seq)   # raises ContextLengthExceeded (max_new_tokens_for)
            detok = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids,
                                           skip_special_tokens=params.skip_special_tokens, stop=params.stop,
                                           include_stop_str=params.include_stop_str_in_output,
                                           special_tokens=self._special_tokens)
        except Exception:
            self.stats["requests_refused"] += 1
            raise
        self._states[request_id] = _RequestState(seq, list(request.images), detok,
                                                 make_generator(params, self.logits_device), matcher)
        for content_hash, features in given.items():
            self._states[request_id].features[content_hash] = features
            self.vision_cache.put(content_hash, features)
        self.stats["requests_added"] += 1

    @property
    def structured_output_backend(self) -> StructuredOutputBackend:
        """The grammar engine for this tokenizer (built on first use)."""
        if self._structured_output is None:
            self._structured_output = StructuredOutputBackend(self.tokenizer, self.processor.stop_token_ids,
                                                              self.vocab_size)
        return self._structured_output

    def abort_all(self) -> int:
        """Cancel every live request (their KV blocks are freed); returns how many there were."""
        return sum(self.abort_request(request_id) for request_id in list(self._states))

    def abort_request(self, request_id: str) -> bool:
        """Cancel a request; its KV blocks are freed at once. False if it is not live."""
        state = self._states.pop(request_id, None)
        if state is None:
            return False
        self.scheduler.abort(request_id)
        self.stats["requests_aborted"] += 1
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_free_blocks(self) -> int:
        return self.scheduler.block_manager.num_free_blocks

    @property
    def num_blocks(self) -> int:
        """KV blocks in the pool."""
        return self.scheduler.config.num_blocks

    @property
    def kv_capacity(self) -> int:
        """Token slots in the whole KV pool."""
        return self.scheduler.kv_capacity

    def max_new_tokens_for(self, num_prompt_tokens: int, max_new_tokens: int | None = None, *,
                           default: int | None = None, name: str = "max_new_tokens") -> int:
        """The tokens a request of ``num_prompt_tokens`` may generate, or ContextLengthExceeded: the
        scheduler's one context rule (``Scheduler.max_new_tokens_for``, which ``add_request`` applies too).
        Reads only the fixed configuration: any thread may call it."""
        return self.scheduler.max_new_tokens_for(num_prompt_tokens, max_new_tokens, default=default, name=name)

    # -- the loop --------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """One step of every scheduled request. A failure that belongs to one request (its images will
        not encode, the model or the sampler raises on its rows) ends that request alone, with an output
        whose ``error`` is set; the rest of the batch goes on. Only a failure outside any request
        (the scheduler itself) propagates."""
        batch = self.scheduler.schedule()
        if not batch.scheduled:
            return []
        failed: dict[str, BaseException] = {}
        needs_features = [seq for seq, n in batch.scheduled
                          if seq.mm_spans_in(seq.num_computed_tokens, seq.num_computed_tokens + n)]
        failed.update(self._encode_images(needs_features))
        entries = [(seq, n, samples) for (seq, n), samples in zip(batch.scheduled, batch.samples, strict=True)
                   if seq.request_id not in failed]
        parts = self._execute_isolated(entries, failed)    # (request ids, their logits rows), for those that sample
        rows = {request_id: part[i] for ids, part in parts for i, request_id in enumerate(ids)}
        sampling_seqs = [seq for seq, _, samples in entries if samples and seq.request_id in rows]
        sampled: dict[str, int] = {}
        if sampling_seqs:
            ids = [seq.request_id for seq in sampling_seqs]
            # the runner's own tensor when it holds exactly these rows in this order (the usual case): no copy
            # of rows x vocabulary floats (16 x 151655 x 4 bytes: ~6 ms a step on one core)
            logits = parts[0][1] if len(parts) == 1 and parts[0][0] == ids else torch.stack([rows[i] for i in ids])
            if self._decodable is not None:
                logits[:, self._decodable:] = float("-inf")
            self._apply_grammar(logits, sampling_seqs, failed)
            if any(seq.request_id in failed for seq in sampling_seqs):     # a matcher failed: drop its row
                keep = [i for i, seq in enumerate(sampling_seqs) if seq.request_id not in failed]
                logits, sampling_seqs = logits[keep], [sampling_seqs[i] for i in keep]
            for seq, token, record in self._sample_isolated(logits, sampling_seqs, failed):
                sampled[seq.request_id] = token
                if record is not None:
                    self._states[seq.request_id].logprobs.append(record)
            self._advance_grammar(sampled, failed)
            sampling_seqs = [seq for seq in sampling_seqs if seq.request_id in sampled]
        outputs = [self._fail(request_id, error) for request_id, error in failed.items()]
        prompt_done = {seq.request_id for seq, n, _ in entries
                       if seq.num_computed_tokens < seq.num_prompt_tokens <= seq.num_computed_tokens + n}
        for seq, _, _ in entries:
            if seq.request_id in prompt_done and seq.request_id not in failed:
                self.stats["prompt_tokens"] += seq.num_prompt_tokens
                self.stats["cached_prompt_tokens"] += seq.num_cached_tokens
                self._states[seq.request_id].features.clear()  # the cache keeps them, bounded
        finished = {s.request_id for s in self.scheduler.update(batch, sampled)}   # skips the failed (aborted)
        now = time.monotonic()
        for seq in sampling_seqs:
            state = self._states.get(seq.request_id)
            if state is None:
                continue
            if state.matcher is not None and state.matcher.is_terminated and seq.request_id not in finished:
                self.scheduler.finish(seq, "stop")     # the constrained output is complete (its last token is text)
                finished.add(seq.request_id)
            try:
                outputs.append(self._output(seq, state, sampled[seq.request_id], finished, now))
            except Exception as exc:  # noqa: BLE001 - this request's text failed: end it alone
                outputs.append(self._fail(seq.request_id, exc))
        return outputs

    def _output(self, seq: Sequence, state: _RequestState, token: int, finished: set[str], now: float
                ) -> RequestOutput:
        self.stats["generated_tokens"] += 1
        if state.first_token_time is None:
            state.first_token_time = now
            self.ttft_seconds.append(now - seq.arrival_time)
        # The stop token that ended the output is not part of its text (as vLLM), unless asked for.
        stopped_by_token = seq.request_id in finished and seq.finish_reason == "stop" and seq.stop_reason == token
        keep = not stopped_by_token or seq.sampling_params.include_stop_str_in_output
        delta = state.detokenizer.add([token] if keep else [])
        if state.detokenizer.stopped_by is not None and seq.request_id not in finished:
            self.scheduler.finish(seq, "stop", state.detokenizer.stopped_by)
            finished.add(seq.request_id)
        is_done = seq.request_id in finished
        if is_done:
            delta += state.detokenizer.flush()
            del self._states[seq.request_id]
            self.stats["requests_finished"] += 1
        return RequestOutput(
            request_id=seq.request_id, delta=delta, text=state.detokenizer.text, new_token_ids=[token],
            token_ids=list(seq.output_token_ids), finished=is_done, finish_reason=seq.finish_reason,
            num_prompt_tokens=seq.num_prompt_tokens, num_cached_tokens=seq.num_cached_tokens,
            logprobs=list(state.logprobs), first_token_time=state.first_token_time,
            arrival_time=seq.arrival_time)

    def _fail(self, request_id: str, error: BaseException) -> RequestOutput:
        """End one request with ``error`` (its KV blocks freed) and return its last output."""
        logger.error("request %s failed in the engine: %r", request_id, error,
                     exc_info=None if isinstance(error, InternVLError) else error)
        state = self._states.pop(request_id, None)
        seq = self.scheduler.abort(request_id) if state is not None else None
        self.stats["requests_failed"] += 1
        if not isinstance(error, InternVLError):
            error = RequestFailed(f"the request failed inside the engine: {type(error).__name__}: {error}")
        return RequestOutput(
            request_id=request_id, delta="", text=state.detokenizer.text if state else "", new_token_ids=[],
            token_ids=list(seq.output_token_ids) if seq else [], finished=True, finish_reason="error",
            num_prompt_tokens=seq.num_prompt_tokens if seq else 0, arrival_time=seq.arrival_time if seq else 0.0,
            error=error)

    def _apply_grammar(self, logits: torch.Tensor, seqs: list[Sequence], failed: dict[str, BaseException]) -> None:
        """Mask the logits rows of the constrained sequences with their grammars' next allowed tokens: one
        batched bitmask fill, one masked update of those rows. A matcher that fails here fails its request."""
        constrained = [(i, matcher) for i, seq in enumerate(seqs)
                       if (matcher := self._states[seq.request_id].matcher) is not None]
        if not constrained:
            return
        try:
            bitmask = self.structured_output_backend.fill_bitmask([matcher for _, matcher in constrained])
        except Exception as exc:  # noqa: BLE001 - the grammar engine failed: the constrained requests end, not the step
            for i, _ in constrained:
                failed[seqs[i].request_id] = RequestFailed(f"structured output failed: {type(exc).__name__}: {exc}")
            return
        for row, (i, matcher) in enumerate(constrained):
            if matcher.error is not None:
                failed[seqs[i].request_id] = RequestFailed(f"structured output failed: {matcher.error}")
            elif seqs[i].sampling_params.max_new_tokens - seqs[i].num_output_tokens <= matcher.endgame_tokens:
                self.structured_output_backend.narrow(bitmask[row])   # finish within the budget
        if len(constrained) == len(seqs):
            apply_token_bitmask(logits, bitmask)
        else:
            index = torch.tensor([i for i, _ in constrained], device=logits.device)
            rows = logits.index_select(0, index)
            apply_token_bitmask(rows, bitmask)
            logits.index_copy_(0, index, rows)

    def _advance_grammar(self, sampled: dict[str, int], failed: dict[str, BaseException]) -> None:
        """Advance each constrained request's matcher by its sampled token; a token the grammar rejects
        (it cannot be sampled after the mask, short of a failure elsewhere) fails that request alone."""
        for request_id in list(sampled):
            matcher = self._states[request_id].matcher
            if matcher is not None and not matcher.accept(sampled[request_id]):
                failed[request_id] = RequestFailed(
                    f"structured output: the grammar rejected token {sampled[request_id]}: {matcher.error}")
                del sampled[request_id]

    def _execute_isolated(self, entries: list[tuple[Sequence, int, bool]], failed: dict[str, BaseException]
                          ) -> list[tuple[list[str], torch.Tensor]]:
        """Run the model on the batch, each sequence alone if the batch raises (``one_by_one_on_failure``:
        the survivors' KV slots are rewritten with the same values). Returns, per run that succeeded, the
        request ids of its surviving sequences that asked for logits and their logits (one row each)."""
        if not entries:
            return []
        return one_by_one_on_failure(entries, self._execute, failed, key=lambda entry: entry[0].request_id)

    def _execute(self, entries: list[tuple[Sequence, int, bool]]) -> tuple[list[str], torch.Tensor]:
        steps = []
        for seq, n, samples in entries:
            start = seq.num_computed_tokens
            steps.append(SequenceStep(token_ids=seq.token_ids[start:start + n], num_computed=start,
                                      block_table=seq.block_tables[0], other_block_tables=seq.block_tables[1:],
                                      image_features=self._features_for(seq, start, n), want_logits=samples))
        logits = self.runner.execute(steps)
        wanting = [seq.request_id for seq, _, samples in entries if samples]
        if len(wanting) != logits.shape[0]:
            raise RuntimeError(f"the runner returned {logits.shape[0]} logits rows for {len(wanting)} sequences")
        return wanting, logits

    def _sample_isolated(self, logits: torch.Tensor, seqs: list[Sequence], failed: dict[str, BaseException]
                         ) -> list[tuple[Sequence, int, TokenLogprobs | None]]:
        """Sample one token per sequence, row by row if the batch raises (the rows that raise alone fail)."""
        def sample(index: list[int]) -> list[tuple[Sequence, int, TokenLogprobs | None]]:
            chosen = [seqs[i] for i in index]
            rows = [SamplingRow(seq.sampling_params, seq.token_ids, seq.num_output_tokens,
                                self._states[seq.request_id].generator, seq.eos_token_ids) for seq in chosen]
            result = self.sampler(logits if len(index) == len(seqs) else logits[index], rows)   # all: no copy
            return list(zip(chosen, result.token_ids, result.logprobs, strict=True))

        parts = one_by_one_on_failure(list(range(len(seqs))), sample, failed, key=lambda i: seqs[i].request_id)
        return [picked for part in parts for picked in part]

    def _encode_images(self, seqs: list[Sequence]) -> dict[str, BaseException]:
        """Give each sequence's state the features of its images: from the cache, or encoded here in
        batches of up to ``vision_batch_tiles`` tiles across all requests of the step. Returns the
        requests whose images failed to encode (a failing batch is retried image by image)."""
        todo: dict[str, ImageInput] = {}
        for seq in seqs:
            state = self._states[seq.request_id]
            for image in state.images:
                if image.content_hash in state.features:
                    continue
                cached = self.vision_cache.get(image.content_hash)
                if cached is not None:
                    state.features[image.content_hash] = cached
                else:
                    todo.setdefault(image.content_hash, image)
        encoded: dict[str, torch.Tensor] = {}
        errors: dict[str, BaseException] = {}      # content hash -> error
        group: list[ImageInput] = []
        for pending in [*todo.values(), None]:
            if group and (pending is None or sum(im.num_tiles for im in group) + pending.num_tiles
                          > self.config.vision_batch_tiles):
                for part in one_by_one_on_failure(group, self._encode_group, errors,
                                                  key=lambda image: image.content_hash):
                    encoded.update(part)
                group = []
            if pending is not None:
                group.append(pending)
        failed: dict[str, BaseException] = {}
        for seq in seqs:
            state = self._states[seq.request_id]
            for image in state.images:
                if image.content_hash in errors:
                    failed[seq.request_id] = errors[image.content_hash]
                elif image.content_hash in encoded:
                    state.features[image.content_hash] = encoded[image.content_hash]
        return failed

    def _encode_group(self, group: list[ImageInput]) -> dict[str, torch.Tensor]:
        pixels = torch.cat([im.pixel_values for im in group])
        with torch.inference_mode():
            features = self.model.extract_feature(pixels)          # (tiles, 256, hidden)
        self.stats["vision_tiles_encoded"] += pixels.shape[0]
        encoded = {}
        start = 0
        for im in group:
            encoded[im.content_hash] = features[start:start + im.num_tiles].reshape(-1, features.shape[-1])
            self.vision_cache.put(im.content_hash, encoded[im.content_hash])
            start += im.num_tiles
        return encoded

    def _features_for(self, seq: Sequence, start: int, n: int) -> torch.Tensor | None:
        """Feature rows for the image tokens among positions [start, start + n) of the sequence."""
        features = self._states[seq.request_id].features
        parts = [features[span.content_hash][lo:hi] for span, lo, hi in seq.mm_spans_in(start, start + n)]
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _given_features(self, request: PreparedRequest, image_features: Mapping[str, torch.Tensor] | None
                        ) -> dict[str, torch.Tensor]:
        """``add_request``'s ``image_features``, checked against the request's spans: (rows, hidden) each."""
        if not image_features:
            return {}
        lengths = {span.content_hash: span.length for span in request.mm_spans}
        hidden = self.model.config.llm.hidden_size
        given = {}
        for content_hash, features in image_features.items():
            if content_hash not in lengths:
                raise InvalidRequest(f"image_features for {content_hash!r}, which no image span of the prompt has")
            if features.dim() != 2 or tuple(features.shape) != (lengths[content_hash], hidden):
                raise PlaceholderMismatch(
                    f"image span {content_hash!r} has {lengths[content_hash]} <IMG_CONTEXT> tokens but its "
                    f"features are {tuple(features.shape)}, not ({lengths[content_hash]}, {hidden})")
            given[content_hash] = features
        return given

    # -- offline convenience ---------------------------------------------------------------------
    def generate(self, requests: list[PreparedRequest], params: SamplingParams | list[SamplingParams] | None = None,
                 *, image_features: list[Mapping[str, torch.Tensor] | None] | None = None,
                 on_output: Callable[[int, RequestOutput], None] | None = None) -> list[RequestOutput]:
        """Run requests to completion; returns their final outputs in order.

        ``image_features``: per request, as ``add_request``'s. ``on_output(i, output)`` is called with
        every output of ``requests[i]`` as the steps produce it (streaming); what it raises ends the run.
        A request that fails raises its error; the others are aborted.
        """
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(requests)
        features_list = image_features if image_features is not None else [None] * len(requests)
        ids = [f"gen-{time.monotonic_ns()}-{i}" for i in range(len(requests))]
        index = {rid: i for i, rid in enumerate(ids)}
        final: dict[str, RequestOutput] = {}
        try:
            for rid, req, p, feats in zip(ids, requests, params_list, features_list, strict=True):
                self.add_request(rid, req, p, image_features=feats)
            while len(final) < len(ids):
                for out in self.step():
                    if out.error is not None:
                        raise out.error
                    if on_output is not None:
                        on_output(index[out.request_id], out)
                    if out.finished:
                        final[out.request_id] = out
        finally:
            for rid in ids:
                if rid not in final:
                    self.abort_request(rid)
        return [final[rid] for rid in ids]
