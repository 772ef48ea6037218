"""Rotary position embeddings for the four decoder families, computed per step for the tokens in it.

Rope variants, all reproducing the reference formulas (float32 angles, cast to the activation dtype):
- plain (Qwen2, Llama, Yi, Llama-3): inv_freq = 1 / base^(2i/d).
- dynamic NTK (InternLM2 ``rope_scaling.type == 'dynamic'``): when a sequence's total length L exceeds
  ``max_position_embeddings``, base becomes base * (f*L/max - (f-1))^(d/(d-2)). The reference keeps that
  enlarged table in module state; we compute it per sequence from its current length, which equals the
  reference on a freshly loaded model.
- linear: positions divided by the factor.
- Phi-3 "su": short or long per-dimension factors, chosen from the largest position in the forward
  (``max(position_ids) + 1 > original_max_position_embeddings``), and cos/sin scaled by
  sqrt(1 + ln(max/original) / ln(original)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ...config import LLMConfig


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (T, heads, head_dim); cos/sin: (T, head_dim) -> rotated x, same shape."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return (x * cos) + (rotate_half(x) * sin)


class RotaryEmbedding:
    """Computes (cos, sin) of shape (T, head_dim) for a step's flattened tokens."""

    def __init__(self, config: LLMConfig) -> None:
        self.dim = config.head_dim
        self.base = float(config.rope_theta)
        self.max_positions = config.max_position_embeddings
        self.scaling = config.rope_scaling
        self.original_max = config.original_max_position_embeddings
        self._inv_freq_cache: dict[tuple, torch.Tensor] = {}

    def _inv_freq(self, base: float, factors: tuple[float, ...] | None, device: torch.device) -> torch.Tensor:
        key = (base, factors, str(device))
        inv = self._inv_freq_cache.get(key)
        if inv is None:
            exponent = torch.arange(0, self.dim, 2, dtype=torch.int64, device=device).float() / self.dim
            if factors is None:
                inv = 1.0 / (base ** exponent)
            else:
                inv = 1.0 / (torch.tensor(factors, dtype=torch.float32, device=device) * base ** exponent)
            if len(self._inv_freq_cache) > 64:
                self._inv_freq_cache.clear()
            self._inv_freq_cache[key] = inv
        return inv

    def _sequence_params(self, seq_len: int) -> tuple[float, tuple[float, ...] | None, float, float]:
        """(base, per-dim factors, position divisor, cos/sin multiplier) for one sequence."""
        s = self.scaling
        if s is None:
            return self.base, None, 1.0, 1.0
        if s.type == "dynamic":
            base = self.base
            if seq_len > self.max_positions:
                base = self.base * ((s.factor * seq_len / self.max_positions) - (s.factor - 1)) ** (
                    self.dim / (self.dim - 2))
            return base, None, 1.0, 1.0
        if s.type == "linear":
            return self.base, None, s.factor, 1.0
        # Phi-3 "su"
        assert self.original_max is not None
        factors = s.long_factor if seq_len > self.original_max else s.short_factor
        scale = self.max_positions / self.original_max
        mult = 1.0 if scale <= 1.0 else math.sqrt(1 + math.log(scale) / math.log(self.original_max))
        return self.base, factors, 1.0, mult

    def cos_sin(self, positions: torch.Tensor, query_lens: Sequence[int], seq_lens: Sequence[int],
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: (T,) long, the tokens of each sequence contiguous; query_lens[i] tokens of
        sequence i, whose total length after this step is seq_lens[i]."""
        device = positions.device
        pieces = []
        if self.scaling is None or len(query_lens) == 1:
            groups = [(0, positions.shape[0], self._group_len(positions, seq_lens))]
        else:
            groups = []
            start = 0
            for qlen, slen in zip(query_lens, seq_lens, strict=True):
                groups.append((start, start + qlen, self._group_len(positions[start:start + qlen], [slen])))
                start += qlen
        for start, end, group_len in groups:
            base, factors, divisor, mult = self._sequence_params(group_len)
            inv = self._inv_freq(base, factors, device)
            t = positions[start:end].float()
            if divisor != 1.0:
                t = t / divisor
            freqs = t[:, None] * inv[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos(), emb.sin()
            if mult != 1.0:
                cos, sin = cos * mult, sin * mult
            pieces.append((cos, sin))
        if len(pieces) == 1:
            cos, sin = pieces[0]
        else:
            cos = torch.cat([p[0] for p in pieces])
            sin = torch.cat([p[1] for p in pieces])
        return cos.to(dtype), sin.to(dtype)

    def _group_len(self, positions: torch.Tensor, seq_lens: Sequence[int]) -> int:
        if self.scaling is None:
            return 0
        if self.scaling.type == "su":
            # Reference: seq_len = max(position_ids) + 1 of this forward.
            return int(positions.max().item()) + 1 if positions.numel() else 0
        return max(seq_lens)
