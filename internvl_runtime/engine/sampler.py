"""Logits -> next token ids, one row per sequence (torch).

See :class:`Sampler` for the order of operations. The only host-device synchronisation is the final
``.tolist()`` that hands the token ids (and logprobs) back to Python.
"""

from __future__ import annotations

from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from internvl_runtime.engine.sampling_params import SamplingParams


class SamplingRow(NamedTuple):
    """What the sampler needs to know about one row of the logits.

    Attributes:
        params: the request's sampling options.
        token_ids: the prompt then the tokens generated so far (the last ``num_output_tokens`` of them).
            The repetition penalty looks at all of them, or at the generated ones only, after
            ``params.repetition_penalty_prefix_ids``, per ``params.repetition_penalty_scope``.
        num_output_tokens: tokens generated before this one (for ``min_new_tokens`` and the penalty scope).
        generator: the request's own generator (see :func:`make_generator`), best on the logits' device
            (another device works: see :func:`draw_uniform`); None uses torch's global RNG.
        eos_token_ids: end tokens masked with ``stop_token_ids`` while ``min_new_tokens`` is not reached
            (unless ``params.ignore_eos``).
    """

    params: SamplingParams
    token_ids: SequenceABC[int]
    num_output_tokens: int
    generator: torch.Generator | None = None
    eos_token_ids: SequenceABC[int] = ()


@dataclass
class TokenLogprobs:
    """Log-probabilities of one step of one row: the chosen token's and the ``top`` most likely."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), most likely first


@dataclass
class SamplerOutput:
    """The sampled token of every row, and the logprobs of the rows that asked for them (else None)."""

    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


def make_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A generator seeded with ``params.seed`` on ``device``, or None when the request has no seed.

    Create it once per request, on the device the logits will be on (the engine passes its
    ``logits_device``), and pass it on every step: a request's samples then depend only on its seed and
    its logits, not on the other rows of the batch. (CPU and CUDA generators give different numbers for
    one seed: a seed reproduces its answers on the same kind of device.)
    """
    if params.seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed)
    return generator


def _penalty_history(row: SamplingRow) -> SequenceABC[int]:
    """The ids the repetition penalty counts as seen in ``row`` (see ``SamplingParams.repetition_penalty_scope``)."""
    p = row.params
    if p.repetition_penalty_scope == "all":
        return row.token_ids
    return [*p.repetition_penalty_prefix_ids, *_generated(row)]


def _generated(row: SamplingRow) -> SequenceABC[int]:
    """The tokens generated so far in ``row`` (the last ``num_output_tokens`` of ``token_ids``)."""
    assert 0 <= row.num_output_tokens <= len(row.token_ids), (row.num_output_tokens, len(row.token_ids))
    return row.token_ids[len(row.token_ids) - row.num_output_tokens:]


def _needs_processing(row: SamplingRow) -> bool:
    p = row.params
    return (
        p.repetition_penalty != 1.0
        or p.presence_penalty != 0.0
        or p.frequency_penalty != 0.0
        or bool(p.logit_bias)
        or row.num_output_tokens < p.min_new_tokens
        or p.logprobs is not None
        or p.no_repeat_ngram_size > 0
        or not p.is_greedy
    )


def banned_ngram_tokens(history: SequenceABC[int], n: int) -> list[int]:
    """transformers' ``NoRepeatNGramLogitsProcessor`` for one row: the tokens that would complete an
    ``n``-gram already in ``history`` (the ids that follow an earlier occurrence of its last ``n - 1``)."""
    if n <= 0 or len(history) + 1 < n:
        return []
    ids = list(history)
    prefix = tuple(ids[len(ids) - n + 1:]) if n > 1 else ()
    return sorted({ids[start + n - 1] for start in range(len(ids) - n + 1)
                   if tuple(ids[start:start + n - 1]) == prefix})


class Sampler:
    """Turns logits (B, V) into one token id per row.

    Order of operations (vLLM's: logit bias and min-tokens, penalties, greedy choice, temperature, min-p,
    top-k/top-p, sample). A structured-output mask, if any, was applied to the logits before (the engine
    does it: ``engine.structured_output``), so every step below sees the disallowed tokens at -inf.

    1. ``logit_bias``: each listed token's bias is added to its logit (ids past the logits' width are
       ignored; the engine refuses them at ``add_request``).
    2. ``min_new_tokens``: while fewer tokens have been generated, the stop ids (``stop_token_ids``,
       and ``eos_token_ids`` unless ``ignore_eos``) get -inf.
    3. Repetition penalty (transformers' ``RepetitionPenaltyLogitsProcessor``): a logit of a token seen
       before is divided by the penalty if positive, multiplied if negative. "Seen" is the row's
       ``token_ids`` (prompt and output) with ``repetition_penalty_scope="all"``, or the prefix ids and
       the output alone with ``"generated"`` (the official InternVL ``generate()``, see ``SamplingParams``).
    4. Frequency and presence penalties (OpenAI's, as vLLM): with ``count`` the times a token was
       generated so far (the prompt does not count), ``logit -= frequency_penalty * count +
       presence_penalty * (count > 0)``. One scatter-add over the batch, no per-token Python. Then
       ``no_repeat_ngram_size`` (transformers' ``NoRepeatNGramLogitsProcessor``, over the ids the
       repetition penalty counts as seen): a token completing an n-gram seen before gets -inf. Beam search
       runs this step too (``engine.beam_search`` calls ``penalize``).
    5. Greedy rows (``params.is_greedy``) take the argmax of these logits; steps 6-9 do not apply.
    6. Temperature: divide by ``temperature``.
    7. Min-p (vLLM's): drop the tokens whose probability (after temperature) is below ``min_p`` times
       the largest probability of the row; 0 = off.
    8. Top-k: keep logits >= the k-th largest (ties kept, as ``TopKLogitsWarper``); 0 or -1 = off.
    9. Top-p: sort ascending, drop the tokens whose cumulative probability is <= 1 - top_p, always
       keeping the most likely one (``TopPLogitsWarper``); the kept set is the smallest whose
       probability sums to at least ``top_p``.
    10. Sample from the softmax by inverting its cumulative sum at one uniform draw per row (a
       multinomial draw, with no sync), the draw taken from the row's own generator when it has one,
       so a seeded request is reproducible whatever else is in the batch. One number per row instead
       of a vocabulary-sized noise tensor: drawing Exp(1) noise for 151655 logits cost ~3 ms a row.

    Logprobs (rows with ``params.logprobs`` set) are the log-softmax of the logits after steps 1-4 and
    before 6-9: the model's biased and penalised distribution, not the temperature-warped one, so a greedy
    choice is always the top entry. ``top`` lists the ``params.logprobs`` most likely tokens.

    A batch whose rows are all greedy without bias, penalties, min_new_tokens or logprobs takes a fast
    path: one argmax over the batch, no per-row Python work.
    """

    def __call__(self, logits: torch.Tensor, rows: SequenceABC[SamplingRow]) -> SamplerOutput:
        """Sample one token per row of ``logits`` (B, V)."""
        assert logits.dim() == 2 and logits.shape[0] == len(rows), (tuple(logits.shape), len(rows))
        if not any(_needs_processing(row) for row in rows):
            return SamplerOutput(logits.argmax(dim=-1).tolist(), [None] * len(rows))

        processed = self.penalize(logits, rows)  # (B, V) float32, steps 1-4
        sample_rows = [i for i, row in enumerate(rows) if not row.params.is_greedy]
        logprob_rows = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
        every_row_samples = len(sample_rows) == len(rows)
        # step 5 (greedy rows); with every row sampling its choice is overwritten below: not computed
        tokens = (torch.zeros(len(rows), dtype=torch.long, device=logits.device) if every_row_samples
                  else processed.argmax(dim=-1))
        if sample_rows:
            index = torch.tensor(sample_rows, device=logits.device)
            # warped in place: ``processed`` itself when nothing reads it afterwards (no copy of S x V floats)
            chosen_rows = processed if every_row_samples and not logprob_rows else processed[index]
            warped = self.warp(chosen_rows, [rows[i] for i in sample_rows])  # (S, V) steps 6-9
            probs = torch.softmax(warped, dim=-1)
            uniform = self._uniform([rows[i] for i in sample_rows], probs.device)  # (S, 1) in [0, 1)
            cdf = probs.cumsum_(dim=-1)
            chosen = torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True).clamp_(max=cdf.shape[-1] - 1)
            tokens = tokens.index_copy(0, index, chosen.squeeze(1))  # step 10

        records: list[TokenLogprobs | None] = [None] * len(rows)
        token_list: list[int] = tokens.tolist()
        if logprob_rows:
            index = torch.tensor(logprob_rows, device=logits.device)
            logprobs = torch.log_softmax(processed[index], dim=-1)  # (L, V)
            chosen_logprobs: list[float] = logprobs.gather(1, tokens[index].unsqueeze(1)).squeeze(1).tolist()
            max_top = max(rows[i].params.logprobs or 0 for i in logprob_rows)
            top_values, top_ids = logprobs.topk(max_top, dim=-1)  # (L, max_top), most likely first
            top_values_list, top_ids_list = top_values.tolist(), top_ids.tolist()
            for j, i in enumerate(logprob_rows):
                n_top = rows[i].params.logprobs or 0
                top = list(zip(top_ids_list[j][:n_top], top_values_list[j][:n_top], strict=True))
                records[i] = TokenLogprobs(token_list[i], chosen_logprobs[j], top)
        return SamplerOutput(token_list, records)

    @staticmethod
    def penalize(logits: torch.Tensor, rows: SequenceABC[SamplingRow]) -> torch.Tensor:
        """Steps 1-4 on a float32 copy of ``logits`` (B, V)."""
        out = logits.to(torch.float32, copy=True)
        Sampler._add_logit_bias(out, rows)
        Sampler._mask_stop_ids(out, rows)
        histories = {i: _penalty_history(row) for i, row in enumerate(rows) if row.params.repetition_penalty != 1.0}
        penalized = [i for i, history in histories.items() if len(history)]
        if penalized:
            width = max(len(histories[i]) for i in penalized)
            # Pad each history with its own first id: a repeated id gathers and scatters the same value.
            ids = [list(histories[i]) + [histories[i][0]] * (width - len(histories[i])) for i in penalized]
            history = torch.tensor(ids, device=out.device)  # (P, width)
            index = torch.tensor(penalized, device=out.device)
            penalty = torch.tensor([rows[i].params.repetition_penalty for i in penalized], device=out.device)
            penalty = penalty.unsqueeze(1)  # (P, 1)
            sub = out[index]
            seen = sub.gather(1, history)
            seen = torch.where(seen < 0, seen * penalty, seen / penalty)
            out[index] = sub.scatter_(1, history, seen)
        Sampler._apply_frequency_presence(out, rows)
        Sampler._ban_repeated_ngrams(out, rows)
        return out

    @staticmethod
    def _ban_repeated_ngrams(out: torch.Tensor, rows: SequenceABC[SamplingRow]) -> None:
        """Step 4, last: -inf for the tokens ``banned_ngram_tokens`` names in each row that asks for it."""
        for i, row in enumerate(rows):
            n = row.params.no_repeat_ngram_size
            if n > 0:
                banned = [t for t in banned_ngram_tokens(_penalty_history(row), n) if t < out.shape[-1]]
                if banned:
                    out[i, banned] = float("-inf")

    @staticmethod
    def _add_logit_bias(out: torch.Tensor, rows: SequenceABC[SamplingRow]) -> None:
        """Step 1: ``out[i, token] += bias`` for every (row, token, bias), in one ``index_put_``."""
        vocab = out.shape[-1]
        entries = [(i, token, bias) for i, row in enumerate(rows)
                   for token, bias in row.params.logit_bias.items() if token < vocab]
        if not entries:
            return
        row_index, token_index, values = zip(*entries, strict=True)
        out.index_put_((torch.tensor(row_index, device=out.device), torch.tensor(token_index, device=out.device)),
                       torch.tensor(values, dtype=out.dtype, device=out.device), accumulate=True)

    @staticmethod
    def _mask_stop_ids(out: torch.Tensor, rows: SequenceABC[SamplingRow]) -> None:
        """Step 2: the stop ids of rows short of ``min_new_tokens`` get -inf."""
        for i, row in enumerate(rows):
            p = row.params
            if row.num_output_tokens < p.min_new_tokens:
                stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else set(row.eos_token_ids))
                in_vocab = sorted(t for t in stop_ids if t < out.shape[-1])  # a stop id past the vocab never comes
                if in_vocab:
                    out[i, in_vocab] = float("-inf")

    @staticmethod
    def _apply_frequency_presence(out: torch.Tensor, rows: SequenceABC[SamplingRow]) -> None:
        """Step 4: count each row's generated tokens with one scatter-add over the penalised rows (padded
        with an extra column that is dropped), then ``out -= frequency * count + presence * (count > 0)``."""
        penalized = [i for i, row in enumerate(rows)
                     if (row.params.presence_penalty != 0.0 or row.params.frequency_penalty != 0.0)
                     and row.num_output_tokens > 0]
        if not penalized:
            return
        vocab = out.shape[-1]
        generated = [_generated(rows[i]) for i in penalized]
        width = max(len(g) for g in generated)
        ids = torch.tensor([[min(t, vocab) for t in g] + [vocab] * (width - len(g)) for g in generated],
                           device=out.device)  # (P, width); an id past the logits counts in the pad column
        counts = torch.zeros(len(penalized), vocab + 1, dtype=out.dtype, device=out.device)
        counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=out.dtype))
        counts = counts[:, :vocab]
        frequency = torch.tensor([rows[i].params.frequency_penalty for i in penalized], device=out.device)
        presence = torch.tensor([rows[i].params.presence_penalty for i in penalized], device=out.device)
        index = torch.tensor(penalized, device=out.device)
        out[index] -= frequency.unsqueeze(1) * counts + presence.unsqueeze(1) * (counts > 0).to(out.dtype)

    @staticmethod
    def warp(logits: torch.Tensor, rows: SequenceABC[SamplingRow]) -> torch.Tensor:
        """Steps 6-9 (temperature, min-p, top-k, top-p) on penalised logits (S, V) of sampling rows, in place."""
        device = logits.device
        vocab = logits.shape[-1]
        temperature = torch.tensor([row.params.temperature for row in rows], device=device).unsqueeze(1)
        logits.div_(temperature)

        if any(row.params.min_p > 0.0 for row in rows):
            min_p = torch.tensor([row.params.min_p for row in rows], device=device).unsqueeze(1)
            probs = logits.softmax(dim=-1)
            threshold = probs.amax(dim=-1, keepdim=True) * min_p
            logits.masked_fill_(probs < threshold, float("-inf"))

        top_k = [min(row.params.top_k, vocab) if row.params.top_k > 0 else 0 for row in rows]
        if any(0 < k < vocab for k in top_k):
            k = torch.tensor(top_k, device=device)
            values = logits.topk(max(top_k), dim=-1).values  # (S, max_k), descending
            kth = values.gather(1, (k.clamp(min=1) - 1).unsqueeze(1))  # (S, 1)
            kth = torch.where(k.unsqueeze(1) > 0, kth, torch.full_like(kth, float("-inf")))
            logits.masked_fill_(logits < kth, float("-inf"))

        if any(row.params.top_p < 1.0 for row in rows):
            top_p = torch.tensor([row.params.top_p for row in rows], device=device).unsqueeze(1)
            sorted_logits, sorted_index = logits.sort(dim=-1)  # ascending
            cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            drop_sorted = (cumulative <= 1 - top_p) & (top_p < 1.0)
            drop_sorted[:, -1] = False  # always keep the most likely token
            drop = drop_sorted.scatter(1, sorted_index, drop_sorted)
            logits.masked_fill_(drop, float("-inf"))
        return logits

    @staticmethod
    def _uniform(rows: SequenceABC[SamplingRow], device: torch.device) -> torch.Tensor:
        """One U[0, 1) draw per row (S, 1) on ``device``: each seeded row from its own generator (see
        ``draw_uniform``), the others from the global RNG of ``device``."""
        draws = torch.rand(len(rows), 1, device=device)
        seeded = [(i, row.generator) for i, row in enumerate(rows) if row.generator is not None]
        if seeded:
            values = torch.cat([draw_uniform(generator, device) for _, generator in seeded])  # (G,)
            index = torch.tensor([i for i, _ in seeded], device=device)
            draws.index_copy_(0, index, values.unsqueeze(1))
        return draws


def draw_uniform(generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """One U[0, 1) number (shape (1,)) from ``generator``, on ``device``.

    torch draws with a generator only on the generator's own device (``torch.rand(..., generator=cpu_gen,
    device=cuda)`` raises), so the draw is taken there and moved: the engine makes each generator on the
    logits' device (no copy), and a generator made elsewhere (a caller's CPU generator with CUDA logits)
    still samples, at the cost of one tiny host-to-device copy. Either way the number depends only on the
    generator's state, so a seeded request draws the same sequence wherever its logits are."""
    value = torch.rand(1, generator=generator, device=generator.device)
    if value.device == device:
        return value
    return value.to(device, non_blocking=value.device.type == "cpu" and device.type == "cuda")
