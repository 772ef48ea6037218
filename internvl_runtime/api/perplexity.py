"""LMDeploy's ``Pipeline.get_ppl``: the mean cross-entropy loss of a token sequence under the model.

Position ``i`` predicts token ``i + 1``; the loss is summed over the ``len(ids) - 1`` predictions and divided by
their number, as LMDeploy's ``async_get_ppl`` returns it (the loss, not its exponential). The sequence runs in
one prefill over a KV cache of its own (the engine's pool and its requests are not touched), and the logits are
computed in slices so that a long sequence never holds ``len x vocab`` floats at once.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..engine.model_runner import ModelRunner
from ..errors import InvalidRequest
from ..models.internvl import InternVLModel
from ..models.layers.attention import AttentionMetadata

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


@torch.inference_mode()
def mean_cross_entropy(model: InternVLModel, ids: list[int]) -> float:
    """The summed next-token cross-entropy of ``ids`` divided by ``len(ids) - 1``."""
    n = len(ids)
    runner = ModelRunner(model, num_blocks=math.ceil(n / _BLOCK_SIZE), block_size=_BLOCK_SIZE)
    device = runner.device
    tokens = torch.tensor(ids, dtype=torch.long, device=device)
    meta = AttentionMetadata(query_lens=[n], seq_lens=[n], slot_mapping=torch.arange(n, device=device),
                             context_slots=[None], context_ranges=[(0, n)])
    hidden = model.language_model(model.embed(tokens), torch.arange(n, device=device), meta, runner.kv_cache)
    total = 0.0
    for start in range(0, n - 1, _LOGIT_ROWS):
        stop = min(start + _LOGIT_ROWS, n - 1)
        logits = model.language_model.compute_logits(hidden[start:stop])
        total += float(F.cross_entropy(logits, tokens[start + 1:stop + 1].to(logits.device), reduction="sum"))
    return total / (n - 1)
