"""The official InternVL2 model API: ``chat``, ``batch_chat`` and ``generate``, same semantics.

Reference behaviours reproduced (OpenGVLab/InternVL ``modeling_internvl_chat.py``, 2024-08):
- ``<image>\\n`` is prefixed only when there is no history, pixel values are given and the question
  has no ``<image>``; every ``<image>`` of the prompt (history included) becomes one
  ``<img>`` + 256 x tiles ``<IMG_CONTEXT>`` + ``</img>`` block, in order of ``num_patches_list``.
- generation stops at the template separator token (``<|im_end|>`` / ``<|end|>``), not the LLM's eos;
  the response is the decoded text (special tokens skipped) cut at the separator and stripped.
- ``generate`` returns the LLM's bos id followed by the new tokens (what transformers' ``generate``
  returns when given only embeddings); finished rows are padded with the pad id.
- batch rows are independent: left padding in the reference only masks, so we run rows unpadded.

``generate`` (and so ``chat``/``batch_chat``) runs on the engine (``LLMEngine``), the loop that serves:
each row is one request, its image features computed here as the reference does (all tiles in one
``extract_feature`` call, or ``visual_features``) and handed to the engine by span. transformers'
``generate`` semantics are kept by the ``SamplingParams`` that ``from_generation_config`` builds: stop
only at ``eos_token_id``, ``min_new_tokens`` counted as its ``MinNewTokensLengthLogitsProcessor`` does,
the repetition penalty over the bos and the generated ids only. The engine refuses a prompt plus
``max_new_tokens`` longer than the LLM's context (``ContextLengthExceeded``), where the reference would
run past it.

``num_beams > 1`` runs transformers' beam search instead (``engine.beam_search``, on a runner with its own
KV cache that this object keeps): the same hypotheses, scores and returned rows as the
reference's ``generate``, with ``length_penalty``, ``early_stopping`` and ``num_return_sequences``
(``chat`` answers with the first, ``batch_chat`` returns them all, as the reference).

transformers' other generation keys: ``max_length`` (the bos plus the new tokens, as transformers counts
for the reference, whose prompt is embeddings), ``no_repeat_ngram_size`` (in ``Sampler.penalize``, so in
beam search too), ``use_cache`` (accepted), and ``return_dict_in_generate`` / ``output_scores``
(``GenerateOutput``: ``sequences``, per-step ``scores`` recorded by ``ScoreRecorder``, beam search's
``sequences_scores``). The object also carries the official model's attributes: a settable
``system_message`` (VLMEvalKit and the streamlit worker set it), ``conv_template``; ``to()``/``cuda()``/
``cpu()`` drop the engines built for the old device or dtype (``_apply``).
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..compute_plan import apply_plan, choose_plan
from ..config import InternVLConfig
from ..engine.beam_search import BeamRequest, beam_search, blocks_needed, check_beam_params
from ..engine.engine import EngineConfig, LLMEngine, RequestOutput
from ..engine.kv_groups import max_blocks_per_sequence
from ..engine.model_runner import ModelRunner, model_kv_groups
from ..engine.sampler import Sampler, SamplerOutput, SamplingRow
from ..engine.sampling_params import SamplingParams
from ..errors import (
    ContextLengthExceeded,
    InvalidGenerationConfig,
    InvalidRequest,
    PlaceholderMismatch,
    UnsupportedFeature,
)
from ..models.decoders.base import DecoderForCausalLM
from ..models.outputs import ModelOutput
from ..processing.inputs import PreparedRequest
from ..processing.spans import MultiModalSpan
from ..processing.template import (
    IMAGE_PLACEHOLDER,
    IMG_CONTEXT_TOKEN,
    build_prompt,
    expand_image_placeholders,
    get_template,
)
from .hf_generation_config import GenerationConfig
from .official_rules import official_chat_rules

# transformers' default max_length (20) counts the bos that generate() starts from (4.55: the prompt).
DEFAULT_MAX_NEW_TOKENS = 19
_BLOCK_SIZE = 16  # KV block size of the engine behind chat/generate


class IdsOnlyVocabulary:
    """The tokenizer side of the engine behind ``generate()``, which takes ids and no tokenizer (as the
    reference's). Every id of the LLM's vocabulary may be sampled, as in the reference (an engine built on
    a tokenizer masks ids past its end); the engine's incremental text is empty (``chat`` decodes the
    returned ids with its own tokenizer, as the reference); and the engine needs no end-token id, since
    the requests stop only at their ``eos_token_id`` (``ignore_eos``, see ``from_generation_config``).
    """

    eos_token_id = None

    def __init__(self, vocab_size: int, img_context_token_id: int) -> None:
        self.vocab_size = vocab_size
        self.img_context_token_id = img_context_token_id

    def __len__(self) -> int:
        return self.vocab_size

    def convert_tokens_to_ids(self, token: str) -> int | None:
        """``<IMG_CONTEXT>``'s id; None for any other token (no end token, no template separator)."""
        return self.img_context_token_id if token == IMG_CONTEXT_TOKEN else None

    def encode(self, text: str) -> list[int]:
        raise InvalidRequest("generate() takes token ids; tokenize with the checkpoint's tokenizer")

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return ""


class ScoreRecorder(Sampler):
    """The sampler of the engine behind ``generate()``: samples as ``Sampler``, and for the requests whose
    params are watched (``output_scores``) keeps every step's scores as transformers' ``generate``
    records them: the logits after the logits processors (repetition penalty, ``min_new_tokens``,
    ``no_repeat_ngram_size``: ``Sampler.penalize``), and for sampled rows after the warpers too
    (temperature, top-k, top-p: ``Sampler.warp``)."""

    def __init__(self) -> None:
        super().__init__()
        self.watched: dict[int, list[torch.Tensor]] = {}  # id(params) -> the request's scores, step by step

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SamplerOutput:
        picked = [i for i, row in enumerate(rows) if id(row.params) in self.watched]
        if picked:
            chosen = [rows[i] for i in picked]
            scores = self.penalize(logits[picked], chosen)
            for j, row in enumerate(chosen):
                kept = scores[j:j + 1]
                if not row.params.is_greedy:
                    kept = self.warp(kept.clone(), [row])
                self.watched[id(row.params)].append(kept[0].cpu())
        return super().__call__(logits, rows)


@dataclasses.dataclass
class GenerateOutput(ModelOutput):
    """``generate(..., return_dict_in_generate=True)``: transformers' ``GenerateDecoderOnlyOutput`` /
    ``GenerateBeamDecoderOnlyOutput`` fields we fill. ``sequences``: what ``generate`` returns otherwise.
    ``scores`` (``output_scores``, greedy and sampling): one (rows, vocab) float32 tensor per step, the
    processed scores transformers records (``ScoreRecorder``); a row that has already finished holds -inf
    there (transformers runs it on its pad token; those values mean nothing). Beam search:
    ``sequences_scores`` (each returned hypothesis's score, ``beam_search.Hypothesis.score``) and no
    per-step ``scores``. Read by attribute, key or position, as a ``ModelOutput``."""

    sequences: torch.Tensor
    scores: tuple[torch.Tensor, ...] | None = None
    sequences_scores: torch.Tensor | None = None


def image_runs(ids: Sequence[int], img_context_token_id: int) -> list[tuple[int, int]]:
    """(offset, length) of each run of consecutive ``<IMG_CONTEXT>`` ids, in order: one image's span."""
    runs: list[tuple[int, int]] = []
    for position, token in enumerate(ids):
        if token != img_context_token_id:
            continue
        if runs and runs[-1][0] + runs[-1][1] == position:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((position, 1))
    return runs


def engine_requests(rows: list[list[int]], features: torch.Tensor | None, img_context_token_id: int
                    ) -> list[tuple[PreparedRequest, dict[str, torch.Tensor]]]:
    """The rows of a ``generate()`` batch as engine requests with their image features by span hash.

    ``features`` (rows, hidden) fill the ``<IMG_CONTEXT>`` ids of all rows in order, row after row (the
    reference writes them at ``input_ids == img_context_token_id`` of the flattened batch).
    """
    counts = [sum(1 for t in row if t == img_context_token_id) for row in rows]
    if features is None:
        if any(counts):
            raise PlaceholderMismatch("the prompt has <IMG_CONTEXT> tokens but no pixel_values were given")
    elif sum(counts) != features.shape[0]:
        raise PlaceholderMismatch(
            f"the prompts hold {sum(counts)} <IMG_CONTEXT> tokens but pixel_values give {features.shape[0]} "
            f"feature rows")
    call = uuid.uuid4().hex  # span hashes name this call's features only (the engine caches no features)
    requests, start = [], 0
    for index, row in enumerate(rows):
        spans, by_hash = [], {}
        for number, (offset, length) in enumerate(image_runs(row, img_context_token_id)):
            assert features is not None
            key = f"generate:{call}:{index}:{number}"
            spans.append(MultiModalSpan(offset, length, key))
            by_hash[key] = features[start:start + length]
            start += length
        requests.append((PreparedRequest(prompt="", prompt_token_ids=row, images=[], mm_spans=spans), by_hash))
    return requests


class OfficialChatMixin:
    """Mixed into the model class returned by ``AutoModel.from_pretrained``.

    ``generate`` runs on an engine this object builds on first use and keeps (``generation_engine``),
    with a KV cache sized for the largest call so far and rebuilt when a call needs more, when the
    model moved to another dtype or device, or when ``img_context_token_id`` changed. Calls on one model
    must not overlap (one engine, one loop).
    """

    _generation_engine: LLMEngine | None = None
    _beam_runner: ModelRunner | None = None
    # What the model class this is mixed into (InternVLModel) provides.
    config: InternVLConfig
    language_model: DecoderForCausalLM
    num_image_token: int
    img_context_token_id: int | None
    extract_feature: Callable[[torch.Tensor], torch.Tensor]

    _system_message: str | None = None
    _score_recorder: ScoreRecorder | None = None
    template: str | None
    compute_plan: object | None
    generation_config: GenerationConfig | None = None     # generation_config.json (AutoModel.from_pretrained)

    # -- helpers ---------------------------------------------------------------------------------
    @property
    def conv_template(self):  # the official streaming snippet reads model.conv_template.sep
        return get_template(self.template)

    @property
    def system_message(self) -> str:
        """The system prompt ``chat``/``batch_chat`` build with: the config's ``system_message``, else the
        template's. Settable, as the official attribute (VLMEvalKit and the streamlit worker set it)."""
        if self._system_message is not None:
            return self._system_message
        return self.config.system_message or get_template(self.template).system_message

    @system_message.setter
    def system_message(self, value: str) -> None:
        if not isinstance(value, str):
            raise InvalidRequest(f"system_message must be a string, got {type(value).__name__}")
        self._system_message = value

    def _refuse_cast_if_quantized(self, dtype: torch.dtype | None) -> None:
        if dtype is not None and getattr(self, "quantization", None) is not None:
            raise UnsupportedFeature(f"casting a quantized model to {dtype} is not supported (its int8/int4 "
                                     f"weights and their scales keep their formats); load it with torch_dtype={dtype}")

    def to(self, *args: Any, **kwargs: Any) -> Any:
        """``nn.Module.to``; a dtype cast of a quantized model raises ``UnsupportedFeature`` (as transformers
        refuses it for bitsandbytes models), a move is fine."""
        self._refuse_cast_if_quantized(torch._C._nn._parse_to(*args, **kwargs)[1])
        return super().to(*args, **kwargs)  # type: ignore[misc]

    def half(self) -> Any:
        self._refuse_cast_if_quantized(torch.float16)
        return super().half()  # type: ignore[misc]

    def float(self) -> Any:
        self._refuse_cast_if_quantized(torch.float32)
        return super().float()  # type: ignore[misc]

    def bfloat16(self) -> Any:
        self._refuse_cast_if_quantized(torch.bfloat16)
        return super().bfloat16()  # type: ignore[misc]

    def double(self) -> Any:
        self._refuse_cast_if_quantized(torch.float64)
        return super().double()  # type: ignore[misc]

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        """``to()``, ``cuda()``, ``cpu()``, ``half()``... move or cast every parameter and buffer (nn.Module's
        work), then drop what was built for the old device or dtype: the engine behind ``generate`` and the
        beam-search runner with their KV caches (rebuilt at the next call), and the compute plan is chosen
        again for where the model now is. Returns ``self``, as ``nn.Module``'s."""
        result = super()._apply(fn, recurse)  # type: ignore[misc]
        self._generation_engine = None
        self._beam_runner = None
        if self.compute_plan is not None:  # a loaded model (not the meta skeleton being allocated)
            weight = self.language_model.get_input_embeddings().weight
            apply_plan(self, choose_plan(weight.dtype, weight.device))  # type: ignore[arg-type]
        return result

    @property
    def generation_engine(self) -> LLMEngine | None:
        """The engine ``chat``/``batch_chat``/``generate`` ran on last (None before the first call)."""
        return self._generation_engine

    def _engine_for(self, prompt_lens: list[int], max_new_tokens: int) -> LLMEngine:
        """The engine, (re)built if it cannot run these rows side by side from start to end: all prompts
        in one step (as the reference's batch), and KV for every row's whole length, so no row is ever
        preempted and recomputed."""
        # The scheduler keeps one free block per running row at admission: one spare block each. A row
        # longer than the context is refused by the engine (its rule): no cache beyond the context for it.
        # A row's blocks in every KV group (sliding-window layers hold at most their window's: engine.kv_groups).
        context = self.config.llm.max_position_embeddings
        chunk = max(sum(prompt_lens), len(prompt_lens))
        groups = model_kv_groups(self)  # type: ignore[arg-type]
        wanted: dict[str, Any] = {"max_num_seqs": len(prompt_lens), "max_num_batched_tokens": chunk,
                                  "num_blocks": sum(max_blocks_per_sequence(groups, min(n + max_new_tokens, context),
                                                                            _BLOCK_SIZE, chunk) + 1
                                                    for n in prompt_lens)}
        embed = self.language_model.get_input_embeddings().weight
        engine = self._generation_engine
        if (engine is not None and engine.runner.dtype == embed.dtype and engine.runner.device == embed.device
                and engine.processor.img_context_id == self.img_context_token_id):
            have = {name: getattr(engine.config, name) for name in wanted}
            if all(have[name] >= wanted[name] for name in wanted):
                return engine
            wanted = {name: max(have[name], wanted[name]) for name in wanted}  # grow, never shrink
        self._generation_engine = None  # free the old KV cache before allocating the new one
        assert self.img_context_token_id is not None      # generate() checks it before it asks for an engine
        vocabulary = IdsOnlyVocabulary(self.config.llm.vocab_size, self.img_context_token_id)
        config = EngineConfig(block_size=_BLOCK_SIZE, enable_prefix_caching=False, image_cache_bytes=0, **wanted)
        self._score_recorder = ScoreRecorder()
        self._generation_engine = LLMEngine(self, vocabulary, config, sampler=self._score_recorder)
        return self._generation_engine

    # -- generate --------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, pixel_values: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, visual_features: torch.Tensor | None = None,
                 **generation_config: Any) -> torch.Tensor | GenerateOutput:
        """As the reference ``generate``: embeddings with image features merged, then decoding.
        Returns (B, 1 + new tokens): the LLM bos id, then the generated ids (pad id after a row ends);
        with ``return_dict_in_generate`` a ``GenerateOutput`` holding them (and the scores with
        ``output_scores``). ``max_length`` counts the bos and the new tokens, as transformers does for the
        reference (its prompt arrives as embeddings).

        An HF-format checkpoint is transformers' ``InternVLForConditionalGeneration``, given ``input_ids``:
        it returns (B, prompt + new tokens), the ids as given (left padding included) then the generated ones;
        its repetition penalty sees the prompt and the generated ids; without ``eos_token_id`` it stops at its
        generation_config.json's."""
        if input_ids is None:
            raise InvalidRequest("generate() needs input_ids")
        if self.img_context_token_id is None:
            raise InvalidRequest("img_context_token_id is not set: call chat()/batch_chat() or set it")
        return_dict = generation_config.pop("return_dict_in_generate", None)
        output_scores = generation_config.pop("output_scores", None)
        for name, flag in (("return_dict_in_generate", return_dict), ("output_scores", output_scores)):
            if flag is not None and not isinstance(flag, bool):
                raise InvalidGenerationConfig(f"{name} must be true or false, got {flag!r}")
        rules = official_chat_rules(self.config)
        native = self.config.checkpoint_format == "hf"      # transformers' own model, given input_ids
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if native and generation_config.get("eos_token_id") is None and self.generation_config is not None:
            generation_config["eos_token_id"] = self.generation_config.to_dict().get("eos_token_id")
        if generation_config.get("max_length") is None and generation_config.get("max_new_tokens") is None:
            if rules.leading_bos or native:
                generation_config["max_new_tokens"] = DEFAULT_MAX_NEW_TOKENS
            else:  # transformers 4.55: the default max_length (20) counts the prompt's embeddings too
                generation_config["max_length"] = DEFAULT_MAX_NEW_TOKENS + 1
        # transformers' length count: the prompt's ids (given input_ids), else the bos it starts from (4.37) or
        # the prompt's embeddings (4.55).
        counted = input_ids.shape[-1] if native or not rules.leading_bos else 1
        params, streamer = SamplingParams.from_generation_config(generation_config, input_ids_length=counted)
        llm = self.config.llm
        bos = llm.bos_token_id if llm.bos_token_id is not None else 0
        if native:   # the prompt's ids are seen by the penalty (transformers given input_ids)
            params = dataclasses.replace(params, repetition_penalty_scope="all", repetition_penalty_prefix_ids=[])
        else:        # transformers' generate given embeddings tracks (and penalises) bos + generated ids (4.37;
            # 4.55: none)
            params = dataclasses.replace(params, repetition_penalty_prefix_ids=[bos] if rules.leading_bos else [])
        pad = generation_config.get("pad_token_id")
        if pad is None:
            pad = llm.pad_token_id
        if pad is None:  # transformers falls back to the (first) eos id
            pad = params.stop_token_ids[0] if params.stop_token_ids else bos
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        rows = [ids[m.bool()].tolist() for ids, m in zip(input_ids.cpu(), mask.cpu(), strict=True)]

        features = None
        size = self.config.image_size
        if pixel_values is not None and tuple(pixel_values.shape[-2:]) != (size, size):
            raise InvalidRequest(
                f"pixel_values tiles are {tuple(pixel_values.shape[-2:])} but this checkpoint expects {size}x{size} "
                f"tiles (force_image_size); use load_image(..., input_size={size})")
        if visual_features is not None:          # the reference prefers given features to pixel values
            features = visual_features.reshape(-1, visual_features.shape[-1])
        elif pixel_values is not None:
            encoded = self.extract_feature(pixel_values)
            features = encoded.reshape(-1, encoded.shape[-1])
        requests = engine_requests(rows, features, self.img_context_token_id)
        if params.num_beams > 1:
            check_beam_params(params, streaming=streamer is not None)
            sequences, sequence_scores = self._beam_search(requests, params, bos, pad)
            if not rules.leading_bos:
                sequences = sequences[:, 1:]
            if not return_dict:
                return sequences
            return GenerateOutput(sequences, sequences_scores=sequence_scores if output_scores else None)
        # One params object per row: the score recorder knows a row by its params.
        params_list = [dataclasses.replace(params) for _ in requests] if output_scores else [params] * len(requests)
        outputs, steps = self._run_engine(requests, params_list, streamer, bos if rules.leading_bos else None, pad,
                                          bool(output_scores))
        width = max(len(o) for o in outputs)
        if native:
            prefix = input_ids.cpu().long()
        else:     # the bos generate() starts from (4.37), or nothing (4.55)
            prefix = torch.full((len(rows), 1 if rules.leading_bos else 0), bos, dtype=torch.long)
        result = torch.full((len(rows), prefix.shape[1] + width), pad, dtype=torch.long)
        result[:, :prefix.shape[1]] = prefix
        for i, out in enumerate(outputs):
            result[i, prefix.shape[1]:prefix.shape[1] + len(out)] = torch.tensor(out, dtype=torch.long)
        if not return_dict:
            return result
        scores = None
        if output_scores:
            vocab = self.config.llm.vocab_size
            scores = tuple(torch.stack([row[s] if s < len(row) else torch.full((vocab,), float("-inf"))
                                        for row in steps]) for s in range(width))
        return GenerateOutput(result, scores=scores)

    def _beam_runner_for(self, num_blocks: int) -> ModelRunner:
        """The runner beam search drives, with a KV cache of at least ``num_blocks`` blocks (kept, grown
        when a call needs more, rebuilt when the model moved or ``img_context_token_id`` changed)."""
        embed = self.language_model.get_input_embeddings().weight
        runner = self._beam_runner
        if (runner is None or runner.kv_cache.num_blocks < num_blocks or runner.dtype != embed.dtype
                or runner.device != embed.device or runner.image_token_id != self.img_context_token_id):
            self._beam_runner = None  # free the old KV cache before allocating the new one
            runner = ModelRunner(self, num_blocks=num_blocks, block_size=_BLOCK_SIZE,  # type: ignore[arg-type]
                                 image_token_id=self.img_context_token_id)
            self._beam_runner = runner
        return runner

    def _beam_search(self, requests: list[tuple[PreparedRequest, dict[str, torch.Tensor]]], params: SamplingParams,
                     bos: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
        """transformers' beam search (``engine.beam_search``); returns what its ``finalize`` returns: per
        prompt the ``num_return_sequences`` best, best first, each the bos, the new ids, then the eos
        where the width leaves room, rows padded with ``pad`` when their lengths differ."""
        beams = []
        for request, by_hash in requests:
            rows = [by_hash[span.content_hash] for span in request.mm_spans]
            beams.append(BeamRequest(list(request.prompt_token_ids), torch.cat(rows) if rows else None))
        context = self.config.llm.max_position_embeddings
        longest = max(len(b.prompt_token_ids) for b in beams) + params.max_new_tokens
        if longest > context:
            raise ContextLengthExceeded(f"prompt plus max_new_tokens is {longest} tokens, more than the "
                                        f"model's context of {context}")
        num_blocks = blocks_needed([len(b.prompt_token_ids) for b in beams], params.num_beams,
                                   params.max_new_tokens, _BLOCK_SIZE)
        found = beam_search(self._beam_runner_for(num_blocks), beams, params)
        hypotheses = [h for per_prompt in found for h in per_prompt]
        lengths = [1 + len(h.token_ids) for h in hypotheses]
        width = min(max(lengths) + 1, 1 + params.max_new_tokens)
        result = torch.full((len(hypotheses), width), pad, dtype=torch.long)
        result[:, 0] = bos
        for i, (h, length) in enumerate(zip(hypotheses, lengths, strict=True)):
            result[i, 1:length] = torch.tensor(h.token_ids, dtype=torch.long)
            if length < width:
                result[i, length] = params.stop_token_ids[0]
        return result, torch.tensor([h.score for h in hypotheses], dtype=torch.float32)

    def _run_engine(self, requests: list[tuple[PreparedRequest, dict[str, torch.Tensor]]],
                    params: list[SamplingParams], streamer: Any, bos: int | None, pad: int,
                    record_scores: bool = False
                    ) -> tuple[list[list[int]], list[list[torch.Tensor]]]:
        """Every row to its end on the engine (row i with ``params[i]``); returns the generated ids of each
        row, and with ``record_scores`` each row's per-step scores (``ScoreRecorder``; the params must be
        distinct objects). A streamer gets what transformers' ``generate`` gives it: the bos column, then
        one (B,) column of ids per step, finished rows padded, then ``end()``."""
        engine = self._engine_for([len(r.prompt_token_ids) for r, _ in requests], params[0].max_new_tokens)
        recorder = self._score_recorder
        assert recorder is not None  # built with the engine
        if record_scores:
            recorder.watched = {id(p): [] for p in params}
        num_rows = len(requests)
        streamed: list[list[int]] = [[] for _ in requests]
        done = [False] * num_rows
        num_columns = 0

        def put_columns() -> None:
            """Put every column that all rows have reached (a finished row gives its pad id)."""
            nonlocal num_columns
            while (any(len(s) > num_columns for s in streamed)
                   and all(done[i] or len(streamed[i]) > num_columns for i in range(num_rows))):
                streamer.put(torch.tensor([s[num_columns] if len(s) > num_columns else pad for s in streamed]))
                num_columns += 1

        def on_output(index: int, output: RequestOutput) -> None:
            streamed[index].extend(output.new_token_ids)
            done[index] = output.finished
            put_columns()

        if streamer is not None and bos is not None:
            streamer.put(torch.full((num_rows, 1), bos, dtype=torch.long))
        try:
            finals = engine.generate([r for r, _ in requests], params, image_features=[f for _, f in requests],
                                     on_output=on_output if streamer is not None else None)
            scores = [recorder.watched.get(id(p), []) for p in params] if record_scores else []
        except BaseException:
            if engine.has_unfinished_requests():  # stopped inside a step: do not reuse it
                self._generation_engine = None
            raise
        finally:
            recorder.watched = {}
        if streamer is not None:
            put_columns()
            streamer.end()
        return [out.token_ids for out in finals], scores

    # -- chat ------------------------------------------------------------------------------------
    def build_chat_query(self, pixel_values: torch.Tensor | None, question: str,
                         history: Sequence[tuple[str, str]] | None = None,
                         num_patches_list: Sequence[int] | None = None) -> tuple[str, str]:
        """(question as recorded in history, full prompt string) exactly as the reference ``chat``."""
        if not isinstance(question, str):
            raise InvalidRequest(f"question must be a string, got {type(question).__name__}")
        if history is None and pixel_values is not None and IMAGE_PLACEHOLDER not in question:
            question = IMAGE_PLACEHOLDER + "\n" + question
        if num_patches_list is None:
            num_patches_list = [pixel_values.shape[0]] if pixel_values is not None else []
        num_patches_list = list(num_patches_list)
        num_tiles = 0 if pixel_values is None else pixel_values.shape[0]
        if sum(num_patches_list) != num_tiles:
            raise PlaceholderMismatch(f"num_patches_list {num_patches_list} sums to {sum(num_patches_list)} "
                                      f"but pixel_values holds {num_tiles} tiles")
        query = build_prompt(self.template, question, list(history or ()), self.system_message)
        return question, expand_image_placeholders(query, num_patches_list, self.num_image_token)

    def chat(self, tokenizer, pixel_values: torch.Tensor | None, question: str, generation_config: dict,
             history: Sequence[tuple[str, str]] | None = None, return_history: bool = False,
             num_patches_list: Sequence[int] | None = None, IMG_START_TOKEN: str = "<img>",
             IMG_END_TOKEN: str = "</img>", IMG_CONTEXT_TOKEN: str = IMG_CONTEXT_TOKEN, verbose: bool = False):
        """One turn of conversation; with ``return_history`` returns (response, history)."""
        self.img_context_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
        template = get_template(self.template)
        question, query = self.build_chat_query(pixel_values, question, history, num_patches_list)
        history = [] if history is None else [(str(h[0]), str(h[1])) for h in history]
        if verbose and pixel_values is not None:
            print(f"dynamic ViT batch size: {pixel_values.shape[0]}")
        inputs = tokenizer(query, return_tensors="pt")
        rules = official_chat_rules(self.config)
        stop = rules.stop_text(template)
        config = dict(generation_config)
        config["eos_token_id"] = tokenizer.convert_tokens_to_ids(stop)
        output = self.generate(pixel_values=pixel_values, input_ids=inputs["input_ids"],
                               attention_mask=inputs["attention_mask"], **config)
        if isinstance(output, GenerateOutput):
            output = output.sequences
        response = tokenizer.batch_decode(output, skip_special_tokens=rules.skip_special_tokens)[0]
        response = response.split(stop)[0].strip()
        history.append((question, response))
        if return_history:
            return response, history
        if verbose:
            shown = query.replace(IMG_CONTEXT_TOKEN, "").replace(f"{IMG_START_TOKEN}{IMG_END_TOKEN}", "<image>")
            print(shown, response)
        return response

    def batch_chat(self, tokenizer, pixel_values: torch.Tensor | None, questions: Sequence[str],
                   generation_config: dict, num_patches_list: Sequence[int] | None = None, history=None,
                   return_history: bool = False, IMG_START_TOKEN: str = "<img>", IMG_END_TOKEN: str = "</img>",
                   IMG_CONTEXT_TOKEN: str = IMG_CONTEXT_TOKEN, verbose: bool = False,
                   image_counts: Sequence[int] | None = None) -> list[str]:
        """One answer per question; question i uses num_patches_list[i] tiles of pixel_values."""
        if history is not None or return_history:
            raise UnsupportedFeature("batch_chat does not support multi-turn history (as the reference)")
        if image_counts is not None:
            num_patches_list = image_counts
        if num_patches_list is None:
            raise InvalidRequest("batch_chat needs num_patches_list (tiles per question)")
        num_patches_list = list(num_patches_list)
        if len(num_patches_list) != len(questions):
            raise PlaceholderMismatch(f"{len(questions)} questions but num_patches_list has "
                                      f"{len(num_patches_list)} entries")
        num_tiles = 0 if pixel_values is None else pixel_values.shape[0]
        if pixel_values is not None and sum(num_patches_list) != num_tiles:
            raise PlaceholderMismatch(f"num_patches_list {num_patches_list} sums to {sum(num_patches_list)} "
                                      f"but pixel_values holds {num_tiles} tiles")
        self.img_context_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
        template = get_template(self.template)
        queries = []
        for question, num_patches in zip(questions, num_patches_list, strict=True):
            if pixel_values is not None and IMAGE_PLACEHOLDER not in question:
                question = IMAGE_PLACEHOLDER + "\n" + question
            query = build_prompt(self.template, question, (), self.system_message)
            queries.append(expand_image_placeholders(query, [num_patches] if pixel_values is not None else [],
                                                     self.num_image_token))
        previous_side = tokenizer.padding_side
        tokenizer.padding_side = "left"
        try:
            inputs = tokenizer(queries, return_tensors="pt", padding=True)
        finally:
            tokenizer.padding_side = previous_side
        rules = official_chat_rules(self.config)
        stop = rules.stop_text(template)
        config = dict(generation_config)
        config["eos_token_id"] = tokenizer.convert_tokens_to_ids(stop)
        output = self.generate(pixel_values=pixel_values, input_ids=inputs["input_ids"],
                               attention_mask=inputs["attention_mask"], **config)
        if isinstance(output, GenerateOutput):
            output = output.sequences
        responses = tokenizer.batch_decode(output, skip_special_tokens=rules.skip_special_tokens)
        return [r.split(stop)[0].strip() for r in responses]
