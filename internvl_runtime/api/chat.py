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
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ..engine.model_runner import ModelRunner, SequenceStep
from ..engine.sampler import Sampler, SamplingRow, make_generator
from ..engine.sampling_params import SamplingParams
from ..errors import InvalidRequest, PlaceholderMismatch, UnsupportedFeature
from ..processing.template import (IMAGE_PLACEHOLDER, IMG_CONTEXT_TOKEN, build_prompt,
                                   expand_image_placeholders, get_template)

# transformers' default max_length (20) counts the bos that generate() starts from.
DEFAULT_MAX_NEW_TOKENS = 19


class OfficialChatMixin:
    """Mixed into the model class returned by ``AutoModel.from_pretrained``."""

    block_size = 16

    # -- helpers ---------------------------------------------------------------------------------
    @property
    def conv_template(self):  # the official streaming snippet reads model.conv_template.sep
        return get_template(self.config.template)

    @property
    def system_message(self) -> str:
        return self.config.system_message or get_template(self.config.template).system_message

    def _runner(self, num_blocks: int) -> ModelRunner:
        runner: ModelRunner | None = getattr(self, "_chat_runner", None)
        embed = self.language_model.get_input_embeddings().weight
        if (runner is None or runner.kv_cache.num_blocks < num_blocks or runner.device != embed.device
                or runner.dtype != embed.dtype):
            self._chat_runner = None  # free the old pool before allocating the new one
            runner = ModelRunner(self, num_blocks=max(num_blocks, 8), block_size=self.block_size)
            self._chat_runner = runner
        return runner

    # -- generate --------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, pixel_values: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, visual_features: torch.Tensor | None = None,
                 **generation_config: Any) -> torch.Tensor:
        """As the reference ``generate``: embeddings with image features merged, then decoding.
        Returns (B, 1 + new tokens): the LLM bos id, then the generated ids (pad id after a row ends)."""
        if input_ids is None:
            raise InvalidRequest("generate() needs input_ids")
        if self.img_context_token_id is None:
            raise InvalidRequest("img_context_token_id is not set: call chat()/batch_chat() or set it")
        generation_config.setdefault("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        params, streamer = SamplingParams.from_generation_config(generation_config)
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        rows = [ids[m.bool()].tolist() for ids, m in zip(input_ids.cpu(), mask.cpu())]

        features = None
        size = self.config.image_size
        if pixel_values is not None and tuple(pixel_values.shape[-2:]) != (size, size):
            raise InvalidRequest(
                f"pixel_values tiles are {tuple(pixel_values.shape[-2:])} but this checkpoint expects {size}x{size} "
                f"tiles (force_image_size); use load_image(..., input_size={size})")
        if pixel_values is not None or visual_features is not None:
            features = visual_features if visual_features is not None else self.extract_feature(pixel_values)
            features = features.reshape(-1, features.shape[-1])
        row_features = self._split_features(rows, features)
        return self._decode_rows(rows, row_features, params, streamer)

    def _split_features(self, rows: list[list[int]], features: torch.Tensor | None) -> list[torch.Tensor | None]:
        counts = [sum(1 for t in row if t == self.img_context_token_id) for row in rows]
        if features is None:
            if any(counts):
                raise PlaceholderMismatch("the prompt has <IMG_CONTEXT> tokens but no pixel_values were given")
            return [None] * len(rows)
        if sum(counts) != features.shape[0]:
            raise PlaceholderMismatch(
                f"the prompts hold {sum(counts)} <IMG_CONTEXT> tokens but pixel_values give "
                f"{features.shape[0]} feature rows ({features.shape[0] // self.num_image_token} tiles)")
        out, start = [], 0
        for n in counts:
            out.append(features[start:start + n] if n else None)
            start += n
        return out

    def _decode_rows(self, rows: list[list[int]], row_features: list[torch.Tensor | None],
                     params: SamplingParams, streamer: Any) -> torch.Tensor:
        llm = self.config.llm
        max_new = params.max_new_tokens
        blocks_per_row = [math.ceil((len(r) + max_new) / self.block_size) for r in rows]
        runner = self._runner(sum(blocks_per_row))
        tables, next_block = [], 0
        for n in blocks_per_row:
            tables.append(list(range(next_block, next_block + n)))
            next_block += n
        bos = llm.bos_token_id if llm.bos_token_id is not None else 0
        pad = llm.pad_token_id
        stop_ids = set(params.stop_token_ids)
        if pad is None:  # transformers falls back to the (first) eos id
            pad = params.stop_token_ids[0] if params.stop_token_ids else bos
        sampler = Sampler()
        generators = [make_generator(params) for _ in rows]
        # The reference penalises repetition over generate()'s input_ids: bos + generated tokens.
        histories: list[list[int]] = [[bos] for _ in rows]
        outputs: list[list[int]] = [[] for _ in rows]
        finished = [False] * len(rows)
        if streamer is not None:
            streamer.put(torch.tensor([[bos] * len(rows)]).T if len(rows) > 1 else torch.tensor([[bos]]))

        steps = [SequenceStep(token_ids=row, num_computed=0, block_table=tables[i], image_features=row_features[i])
                 for i, row in enumerate(rows)]
        active = list(range(len(rows)))
        for step_index in range(max_new):
            logits = runner.execute([steps[i] for i in active])
            tokens = sampler(logits, [SamplingRow(params, histories[i], len(outputs[i]), generators[i])
                                      for i in active]).token_ids
            emitted = []
            for i, token in zip(active, tokens):
                outputs[i].append(token)
                histories[i].append(token)
                emitted.append(token)
                if token in stop_ids and len(outputs[i]) >= params.min_new_tokens:
                    finished[i] = True
            if streamer is not None:
                streamer.put(torch.tensor(emitted if len(rows) > 1 else emitted[:1]))
            still = [i for i in active if not finished[i]]
            if not still:
                break
            for i in still:
                steps[i] = SequenceStep(token_ids=[outputs[i][-1]], num_computed=steps[i].seq_len,
                                        block_table=tables[i])
            active = still
        if streamer is not None:
            streamer.end()
        width = max(len(o) for o in outputs)
        result = torch.full((len(rows), 1 + width), pad, dtype=torch.long)
        result[:, 0] = bos
        for i, out in enumerate(outputs):
            result[i, 1:1 + len(out)] = torch.tensor(out, dtype=torch.long)
        return result

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
        query = build_prompt(self.config.template, question, list(history or ()), self.system_message)
        return question, expand_image_placeholders(query, num_patches_list, self.num_image_token)

    def chat(self, tokenizer, pixel_values: torch.Tensor | None, question: str, generation_config: dict,
             history: Sequence[tuple[str, str]] | None = None, return_history: bool = False,
             num_patches_list: Sequence[int] | None = None, IMG_START_TOKEN: str = "<img>",
             IMG_END_TOKEN: str = "</img>", IMG_CONTEXT_TOKEN: str = IMG_CONTEXT_TOKEN, verbose: bool = False):
        """One turn of conversation; with ``return_history`` returns (response, history)."""
        self.img_context_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
        template = get_template(self.config.template)
        question, query = self.build_chat_query(pixel_values, question, history, num_patches_list)
        history = [] if history is None else [tuple(h) for h in history]
        if verbose and pixel_values is not None:
            print(f"dynamic ViT batch size: {pixel_values.shape[0]}")
        inputs = tokenizer(query, return_tensors="pt")
        config = dict(generation_config)
        config["eos_token_id"] = tokenizer.convert_tokens_to_ids(template.sep)
        output = self.generate(pixel_values=pixel_values, input_ids=inputs["input_ids"],
                               attention_mask=inputs["attention_mask"], **config)
        response = tokenizer.batch_decode(output, skip_special_tokens=True)[0]
        response = response.split(template.sep)[0].strip()
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
        template = get_template(self.config.template)
        queries = []
        for question, num_patches in zip(questions, num_patches_list):
            if pixel_values is not None and IMAGE_PLACEHOLDER not in question:
                question = IMAGE_PLACEHOLDER + "\n" + question
            query = build_prompt(self.config.template, question, (), self.system_message)
            queries.append(expand_image_placeholders(query, [num_patches] if pixel_values is not None else [],
                                                     self.num_image_token))
        previous_side = tokenizer.padding_side
        tokenizer.padding_side = "left"
        try:
            inputs = tokenizer(queries, return_tensors="pt", padding=True)
        finally:
            tokenizer.padding_side = previous_side
        config = dict(generation_config)
        config["eos_token_id"] = tokenizer.convert_tokens_to_ids(template.sep)
        output = self.generate(pixel_values=pixel_values, input_ids=inputs["input_ids"],
                               attention_mask=inputs["attention_mask"], **config)
        responses = tokenizer.batch_decode(output, skip_special_tokens=True)
        return [r.split(template.sep)[0].strip() for r in responses]
