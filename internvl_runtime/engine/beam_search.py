"""Beam search equal to transformers 4.37.2's (``generate(num_beams>1, do_sample=False)``).

The official InternVL ``chat``/``batch_chat``/``generate`` hand ``num_beams`` to transformers'
``generate`` given embeddings; this module reproduces what that runs (``GenerationMixin.beam_search``
with a ``BeamSearchScorer``), step for step:

- scores: ``log_softmax`` of the last logits (float32), then the logits processors the official
  ``generate`` applies in beam mode (the repetition penalty over the bos and the generated ids,
  ``min_new_tokens`` masking the eos: ``Sampler.penalize``), plus the beam's running score; beams 1.. start
  at -1e9 so the first step expands beam 0 only;
- ``2 * num_beams`` candidates per prompt (``max(2, 1 + len(eos ids))``), best first; a candidate ending
  in eos becomes a finished hypothesis if it ranks among the first ``num_beams``, the others continue
  until ``num_beams`` beams are found;
- a hypothesis scores ``sum of logprobs / generated_len ** length_penalty``, where ``generated_len``
  counts the new tokens, its eos included (the official ``generate`` starts from the bos, its "prompt");
  the kept list and its worst score are maintained exactly as ``BeamHypotheses.add``;
- a prompt is done per ``early_stopping`` (True: ``num_beams`` hypotheses; False: the heuristic from the
  current length; ``"never"``: the bound from ``max_new_tokens`` when ``length_penalty > 0``);
- after ``max_new_tokens`` steps the open beams join the hypotheses; the best ``num_return_sequences``
  are returned, best first, with the eos appended where the padded width leaves room, as ``finalize``.

Prompts of a batch are independent (the reference batches them, but a row only masks its padding and
a finished row is merely padded), so each is searched on its own, their beams run side by side in
one model step.

Design (why not the scheduler): beam search reorders, forks and drops sequences every step, which the
engine's scheduler and ``BlockManager`` (admission, preemption, prefix caching) are not built for; so
this module drives a :class:`~internvl_runtime.engine.model_runner.ModelRunner` (handed in, with its
own paged KV cache) directly and keeps a small reference-counted block pool over that cache: the
prompt is computed once and its blocks are shared by every beam; a beam that forks shares all its
parent's blocks, and the block it next writes into is copied first if it is shared (copy on write),
so a step copies at most one block per beam.
"""

from __future__ import annotations

from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass

import torch

from internvl_runtime.engine.model_runner import ModelRunner, SequenceStep
from internvl_runtime.engine.sampler import Sampler, SamplingRow
from internvl_runtime.engine.sampling_params import SamplingParams
from internvl_runtime.errors import InvalidGenerationConfig

_UNREACHABLE = -1e9  # transformers' initial score of beams 1.. (only beam 0 is expanded first)


@dataclass
class BeamRequest:
    """One prompt: its token ids and the feature rows of its ``<IMG_CONTEXT>`` ids (in order), if any."""

    prompt_token_ids: list[int]
    image_features: torch.Tensor | None = None


@dataclass
class Hypothesis:
    """A returned sequence: its score (summed logprobs / length ** length_penalty) and new token ids
    (without the eos that ended it)."""

    score: float
    token_ids: list[int]


class _Hypotheses:
    """transformers' ``BeamHypotheses``: the ``num_beams`` best finished hypotheses of one prompt."""

    def __init__(self, num_beams: int, length_penalty: float, early_stopping: bool | str, max_new_tokens: int):
        self.num_beams = num_beams
        self.length_penalty = length_penalty
        self.early_stopping = early_stopping
        self.max_new_tokens = max_new_tokens
        self.beams: list[tuple[float, list[int]]] = []
        self.worst_score = 1e9

    def add(self, token_ids: list[int], sum_logprobs: float, generated_len: int) -> None:
        score = sum_logprobs / float(generated_len) ** self.length_penalty
        if len(self.beams) < self.num_beams or score > self.worst_score:
            self.beams.append((score, token_ids))
            if len(self.beams) > self.num_beams:
                ranked = sorted([(s, index) for index, (s, _) in enumerate(self.beams)])
                del self.beams[ranked[0][1]]
                self.worst_score = ranked[1][0]
            else:
                self.worst_score = min(score, self.worst_score)

    def is_done(self, best_sum_logprobs: float, generated_len: int) -> bool:
        """``generated_len``: new tokens once this step's token is added (``cur_len - prompt_len``)."""
        if len(self.beams) < self.num_beams:
            return False
        if self.early_stopping is True:
            return True
        if self.early_stopping is False or self.length_penalty <= 0.0:
            best = best_sum_logprobs / float(generated_len) ** self.length_penalty
        else:  # "never" with a positive length penalty: the longest possible hypothesis bounds the score
            best = best_sum_logprobs / float(self.max_new_tokens) ** self.length_penalty
        return bool(self.worst_score >= best)


class _BlockPool:
    """Reference-counted KV blocks of a runner's cache, with copy on write."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.block_size = runner.block_size
        self._refs = [0] * runner.kv_cache.num_blocks
        self._free = list(range(runner.kv_cache.num_blocks - 1, -1, -1))

    def take(self) -> int:
        if not self._free:
            raise RuntimeError("beam search ran out of KV blocks (the pool was sized too small)")
        block = self._free.pop()
        self._refs[block] = 1
        return block

    def share(self, table: list[int]) -> list[int]:
        for block in table:
            self._refs[block] += 1
        return list(table)

    def release(self, table: list[int]) -> None:
        for block in table:
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free.append(block)

    def make_writable(self, table: list[int], position: int) -> None:
        """Give ``table`` a block of its own for ``position``: a fresh one past its end, a copy if shared."""
        index = position // self.block_size
        if index == len(table):
            table.append(self.take())
            return
        block = table[index]
        if self._refs[block] == 1:
            return
        copy = self.take()
        cache, size = self.runner.kv_cache, self.block_size
        for pool in (*cache.keys, *cache.values):
            pool[copy * size:(copy + 1) * size].copy_(pool[block * size:(block + 1) * size])
        self._refs[block] -= 1
        table[index] = copy


def blocks_needed(prompt_lens: SequenceABC[int], num_beams: int, max_new_tokens: int, block_size: int) -> int:
    """KV blocks :func:`beam_search` needs at most: each prompt's blocks once, and per beam the blocks
    its new tokens reach (the shared partial prompt block copied included)."""
    per_beam = -(-max_new_tokens // block_size) + 2
    return sum(-(-n // block_size) + num_beams * per_beam for n in prompt_lens)


def check_beam_params(params: SamplingParams, streaming: bool) -> None:
    """Refuse what transformers' ``generate`` refuses, or runs other than by beam search."""
    if params.do_sample:
        raise InvalidGenerationConfig("num_beams > 1 with do_sample=True (beam sampling) is not supported")
    if not params.stop_token_ids:
        raise InvalidGenerationConfig("beam search needs an eos_token_id")
    if streaming:
        raise InvalidGenerationConfig("a streamer cannot be used with beam search (as in transformers)")


class _Prompt:
    """The search state of one prompt: its beams (KV block tables, new ids, scores) and hypotheses."""

    def __init__(self, request: BeamRequest, params: SamplingParams) -> None:
        self.prompt = request.prompt_token_ids
        self.hyps = _Hypotheses(params.num_beams, params.length_penalty, params.early_stopping,
                                params.max_new_tokens)
        self.tables: list[list[int]] = []
        self.generated: list[list[int]] = [[] for _ in range(params.num_beams)]
        self.scores = torch.full((params.num_beams,), _UNREACHABLE, dtype=torch.float32)
        self.scores[0] = 0.0
        self.done = False


def beam_search(runner: ModelRunner, requests: SequenceABC[BeamRequest], params: SamplingParams
                ) -> list[list[Hypothesis]]:
    """Search every prompt; returns per prompt its ``num_return_sequences`` best hypotheses, best first.

    ``runner``'s KV cache must hold :func:`blocks_needed` blocks and is overwritten. ``params``: a
    ``SamplingParams`` with ``num_beams > 1``, its ``stop_token_ids`` the eos ids (the first is the one
    the reference appends), greedy (checked by :func:`check_beam_params`); its repetition penalty sees
    ``repetition_penalty_prefix_ids`` (the bos transformers' ``input_ids`` start from) and the new ids.
    """
    pool = _BlockPool(runner)
    num_beams = params.num_beams
    eos = set(params.stop_token_ids)
    num_candidates = max(2, 1 + len(params.stop_token_ids)) * num_beams
    prompts = [_Prompt(r, params) for r in requests]

    # Step 1: each prompt computed once, its blocks shared by all its beams.
    logits_rows = []
    for request, state in zip(requests, prompts, strict=True):
        table = [pool.take() for _ in range(-(-len(request.prompt_token_ids) // pool.block_size))]
        step = SequenceStep(token_ids=list(request.prompt_token_ids), num_computed=0, block_table=table,
                            image_features=request.image_features)
        logits_rows.append(runner.execute([step])[0].expand(num_beams, -1))
        state.tables = [pool.share(table) for _ in range(num_beams)]
        pool.release(table)

    for new_len in range(1, params.max_new_tokens + 1):
        live = [state for state in prompts if not state.done]
        if new_len > 1:
            steps = []
            for state in live:
                position = len(state.prompt) + new_len - 2  # the last chosen token, not yet in the cache
                for table, ids in zip(state.tables, state.generated, strict=True):
                    pool.make_writable(table, position)
                    steps.append(SequenceStep(token_ids=[ids[-1]], num_computed=position, block_table=table))
            logits = runner.execute(steps)
            logits_rows = [logits[i * num_beams:(i + 1) * num_beams] for i in range(len(live))]
        for state, logits_row in zip(live, logits_rows, strict=True):
            _advance(state, logits_row, params, eos, num_candidates, new_len, pool)
        if all(state.done for state in prompts):
            break

    results = []
    for state in prompts:
        if not state.done:  # the open beams join the hypotheses
            for index in range(num_beams):
                ids = state.generated[index]
                state.hyps.add(ids, float(state.scores[index].item()), len(ids))
        ranked = sorted(state.hyps.beams, key=lambda beam: beam[0])
        results.append([Hypothesis(*ranked.pop()) for _ in range(params.num_return_sequences)])
        for table in state.tables:
            pool.release(table)
    return results


def _advance(state: _Prompt, logits: torch.Tensor, params: SamplingParams, eos: set[int], num_candidates: int,
             new_len: int, pool: _BlockPool) -> None:
    """One ``BeamSearchScorer.process`` for one prompt; ``logits`` (num_beams, vocab)."""
    num_beams = params.num_beams
    scores = torch.nn.functional.log_softmax(logits.to(torch.float32), dim=-1)
    rows = [SamplingRow(params, [*state.prompt, *ids], new_len - 1) for ids in state.generated]
    scores = Sampler.penalize(scores, rows) + state.scores[:, None]
    vocab = scores.shape[-1]
    top_scores, top_ids = torch.topk(scores.view(-1), num_candidates, largest=True, sorted=True)
    chosen: list[tuple[float, int, int]] = []   # (score, token, parent beam)
    for rank, (score, flat) in enumerate(zip(top_scores.tolist(), top_ids.tolist(), strict=True)):
        parent, token = divmod(flat, vocab)
        if token in eos:
            if rank >= num_beams:
                continue
            state.hyps.add(list(state.generated[parent]), score, new_len)
        else:
            chosen.append((score, token, parent))
        if len(chosen) == num_beams:
            break
    state.done = state.hyps.is_done(float(top_scores.max().item()), new_len)
    tables = [pool.share(state.tables[parent]) for _, _, parent in chosen]
    for table in state.tables:
        pool.release(table)
    state.tables = tables
    state.generated = [[*state.generated[parent], token] for _, token, parent in chosen]
    state.scores = top_scores.new_tensor([score for score, _, _ in chosen])
