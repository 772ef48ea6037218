"""Whole-sequence forward passes for what LMDeploy returns besides answers: ``Pipeline.get_ppl`` (the mean
cross-entropy loss of a token sequence) and ``GenerationConfig.output_logits`` (the logits of a prompt and
its answer).

Position ``i`` predicts token ``i + 1``. ``get_ppl`` sums the loss over the ``len(ids) - 1`` predictions and
divides by their number, as LMDeploy's ``async_get_ppl`` returns it (the loss, not its exponential). A
sequence runs in one prefill over a KV cache of its own (the engine's pool and its requests are not
touched), its images encoded as the engine encodes them, and the logits are computed in slices so that a
long sequence never holds more than the rows asked for.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..engine.model_runner import ModelRunner
from ..errors import InvalidRequest
from ..models.internvl import InternVLModel
from ..models.layers.attention import AttentionMetadata
from ..processing.inputs import PreparedRequest

_BLOCK_SIZE = 16
_LOGIT_ROWS = 512          # logits computed this many positions at a time


def check_ids(ids: object, vocab_size: int) -> list[int]:
    """A list of at least two token ids in the vocabulary, else InvalidRequest."""
    if not isinstance(ids, list) or len(ids) < 2:
        raise InvalidRequest(f"get_ppl needs lists of at least 2 token ids, got {ids!r:.80}")
    for token in ids:
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
            raise InvalidRequest(f"get_ppl: token id {token!r} is not in the vocabulary [0, {vocab_size})")
    return ids


def _hidden(model: InternVLModel, ids: Sequence[int], image_features: torch.Tensor | None = None,
            image_token_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(final hidden states (n, hidden), the ids as a tensor) of one prefill of ``ids``."""
    n = len(ids)
    runner = ModelRunner(model, num_blocks=math.ceil(n / _BLOCK_SIZE), block_size=_BLOCK_SIZE,
                         image_token_id=image_token_id)
    device = runner.device
    tokens = torch.tensor(list(ids), dtype=torch.long, device=device)
    meta = AttentionMetadata(query_lens=[n], seq_lens=[n], slot_mapping=torch.arange(n, device=device),
                             context_slots=[None], context_ranges=[(0, n)])
    embeds = model.embed(tokens, image_features, image_token_id=image_token_id)
    return model.language_model(embeds, torch.arange(n, device=device), meta, runner.kv_cache), tokens


@torch.inference_mode()
def mean_cross_entropy(model: InternVLModel, ids: list[int]) -> float:
    """The summed next-token cross-entropy of ``ids`` divided by ``len(ids) - 1``."""
    hidden, tokens = _hidden(model, ids)
    n = len(ids)
    total = 0.0
    for start in range(0, n - 1, _LOGIT_ROWS):
        stop = min(start + _LOGIT_ROWS, n - 1)
        logits = model.language_model.compute_logits(hidden[start:stop])
        total += float(F.cross_entropy(logits, tokens[start + 1:stop + 1].to(logits.device), reduction="sum"))
    return total / (n - 1)


@torch.inference_mode()
def answer_logits(model: InternVLModel, request: PreparedRequest, answer_ids: Sequence[int], which: str,
                  image_token_id: int | None) -> torch.Tensor:
    """LMDeploy's ``output_logits``, float32 on the CPU: ``"generation"`` one row per answer token, the logits
    it was chosen from; ``"all"`` the rows of every prompt position and then those, ``(P + G - 1, vocab)``.
    They are recomputed by one prefill of the prompt and the answer (equal to the sampler's up to rounding)."""
    if not answer_ids:
        return torch.empty((0, model.config.llm.vocab_size))
    features = None
    if request.images:
        by_hash = {}
        for image in request.images:
            rows = model.extract_feature(image.pixel_values)
            by_hash[image.content_hash] = rows.reshape(-1, rows.shape[-1])
        features = torch.cat([by_hash[span.content_hash] for span in request.mm_spans])
    ids = [*request.prompt_token_ids, *answer_ids]
    hidden, _ = _hidden(model, ids, features, image_token_id)
    first = 0 if which == "all" else len(request.prompt_token_ids) - 1
    last = len(ids) - 1
    return torch.cat([model.language_model.compute_logits(hidden[s:min(s + _LOGIT_ROWS, last)]).cpu()
                      for s in range(first, last, _LOGIT_ROWS)])
