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
- YaRN (GPT-OSS): one static inv_freq row blending interpolated (base * factor) and extrapolated
  frequencies by a linear ramp between the correction dimensions of ``beta_fast`` / ``beta_slow``, and
  cos/sin scaled by the attention factor (0.1 ln(factor) + 1 unless the config gives it), exactly as
  transformers' ``_compute_yarn_parameters`` (where ``original_max_position_embeddings`` is in
  ``rope_scaling``, the factor is max_position_embeddings / it).

What varies between the sequences of a step is only the inv_freq row (Phi-3's short or long factors, a
dynamic-NTK base). The caller that knows each sequence's length on the host (the model runner) picks
the rows there (``RotaryEmbedding.plan``) and hands one row index per token, so cos/sin is one
vectorised computation for the whole step with no host sync: the forward never reads a position
back. The table of rows always starts with the fixed ones (the default row; Phi-3's short then long),
a static tensor per device that a CUDA graph can capture; a dynamic-NTK base beyond
``max_position_embeddings`` adds a row for that step only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

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


@dataclass(frozen=True)
class RopePlan:
    """A step's choice of inv_freq rows: ``rows[i]`` for sequence i, indexing the table made of the fixed
    rows followed by one row per ``extra_bases`` entry (dynamic-NTK bases of this step)."""

    rows: list[int]
    extra_bases: tuple[float, ...] = ()


class RotaryEmbedding:
    """Computes (cos, sin) of shape (T, head_dim) for a step's flattened tokens."""

    def __init__(self, config: LLMConfig) -> None:
        self.dim = config.head_dim
        self.base = float(config.rope_theta)
        self.max_positions = config.max_position_embeddings
        self.scaling = config.rope_scaling
        self.original_max = config.original_max_position_embeddings
        s = self.scaling
        self.divisor = s.factor if s is not None and s.type == "linear" else 1.0
        self.multiplier = 1.0
        #: (base, per-dim factors) of the fixed rows of the table: the default, and for Phi-3 the long factors.
        self.fixed_rows: tuple[tuple[float, tuple[float, ...] | None], ...] = ((self.base, None),)
        if s is not None and s.type == "su":
            assert self.original_max is not None
            self.fixed_rows = ((self.base, s.short_factor), (self.base, s.long_factor))
            scale = self.max_positions / self.original_max
            if scale > 1.0:
                self.multiplier = math.sqrt(1 + math.log(scale) / math.log(self.original_max))
        if s is not None and s.type == "yarn":
            self.multiplier = self._yarn_attention_factor()
        self._tables: dict[str, torch.Tensor] = {}    # the fixed rows per device, never evicted

    def _yarn_factor(self) -> tuple[float, int]:
        """(factor, original max positions) as transformers reads them."""
        s = self.scaling
        assert s is not None and s.yarn is not None
        original = s.yarn.original_max_position_embeddings
        if original is not None:
            return self.max_positions / original, original
        return s.factor, self.max_positions

    def _yarn_attention_factor(self) -> float:
        s = self.scaling
        assert s is not None and s.yarn is not None
        if s.yarn.attention_factor is not None:
            return s.yarn.attention_factor
        factor, _ = self._yarn_factor()

        def get_mscale(scale: float, mscale: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

        if s.yarn.mscale and s.yarn.mscale_all_dim:
            return float(get_mscale(factor, s.yarn.mscale) / get_mscale(factor, s.yarn.mscale_all_dim))
        return get_mscale(factor)

    def _yarn_inv_freq(self, device: torch.device) -> torch.Tensor:
        s = self.scaling
        assert s is not None and s.yarn is not None
        factor, original = self._yarn_factor()
        dim, base = self.dim, self.base
        beta_fast, beta_slow = s.yarn.beta_fast or 32, s.yarn.beta_slow or 1

        def correction_dim(rotations: float) -> float:
            return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if s.yarn.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001                           # as transformers: no division by zero
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1).to(device)
        pos_freqs = base ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float) / dim)
        extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
        extrapolation_factor = 1 - ramp
        return interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor

    def _inv_freq(self, base: float, factors: tuple[float, ...] | None, device: torch.device) -> torch.Tensor:
        if self.scaling is not None and self.scaling.type == "yarn":
            return self._yarn_inv_freq(device)
        exponent = torch.arange(0, self.dim, 2, dtype=torch.int64, device=device).float() / self.dim
        if factors is None:
            return 1.0 / (base ** exponent)
        return 1.0 / (torch.tensor(factors, dtype=torch.float32, device=device) * base ** exponent)

    def table(self, device: torch.device, extra_bases: tuple[float, ...] = ()) -> torch.Tensor:
        """(rows, head_dim / 2) float32 inv_freq: the fixed rows (one static tensor per device), then one
        row per extra base."""
        fixed = self._tables.get(str(device))
        if fixed is None:
            fixed = torch.stack([self._inv_freq(base, factors, device) for base, factors in self.fixed_rows])
            self._tables[str(device)] = fixed
        if not extra_bases:
            return fixed
        return torch.cat([fixed, torch.stack([self._inv_freq(b, None, device) for b in extra_bases])])

    def scaled_length(self, seq_len: int, max_position: int) -> int:
        """The length that picks a sequence's rope parameters: its total length after the step (dynamic
        NTK), or, as the Phi-3 reference, the largest position among its tokens in this forward, plus one."""
        if self.scaling is not None and self.scaling.type == "su":
            return max_position + 1
        return seq_len

    def plan(self, lengths: Sequence[int]) -> RopePlan:
        """Rows for sequences of the given ``scaled_length``s (host only)."""
        s = self.scaling
        if s is None or s.type in ("linear", "yarn"):
            return RopePlan([0] * len(lengths))
        if s.type == "su":
            assert self.original_max is not None
            return RopePlan([1 if n > self.original_max else 0 for n in lengths])
        rows, extra = [], []   # dynamic NTK: an enlarged base past max_position_embeddings
        for n in lengths:
            if n <= self.max_positions:
                rows.append(0)
                continue
            base = self.base * ((s.factor * n / self.max_positions) - (s.factor - 1)) ** (self.dim / (self.dim - 2))
            if base not in extra:
                extra.append(base)
            rows.append(len(self.fixed_rows) + extra.index(base))
        return RopePlan(rows, tuple(extra))

    def cos_sin(self, positions: torch.Tensor, rows: torch.Tensor | None, dtype: torch.dtype,
                extra_bases: tuple[float, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: (T,) long; rows: (T,) long, each token's row of ``table`` (None: all row 0)."""
        table = self.table(positions.device, extra_bases)
        t = positions.float()
        if self.divisor != 1.0:
            t = t / self.divisor
        if rows is None or table.shape[0] == 1:
            freqs = t[:, None] * table[0][None, :]
        else:
            freqs = t[:, None] * table.index_select(0, rows)       # (T, head_dim / 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.multiplier != 1.0:
            cos, sin = cos * self.multiplier, sin * self.multiplier
        return cos.to(dtype), sin.to(dtype)

    def rows_from_positions(self, positions: torch.Tensor, query_lens: Sequence[int],
                            seq_lens: Sequence[int]) -> tuple[torch.Tensor | None, tuple[float, ...]]:
        """Per-token rows for a caller that did not plan them (a forward outside the model runner): Phi-3
        reads each sequence's largest position back from the device here, once per forward."""
        if self.scaling is None or self.scaling.type in ("linear", "yarn"):
            return None, ()
        if self.scaling.type == "su":
            lengths, start = [], 0
            for qlen in query_lens:
                piece = positions[start:start + qlen]
                lengths.append(int(piece.max().item()) + 1 if qlen else 0)
                start += qlen
        else:
            lengths = list(seq_lens)
        plan = self.plan(lengths)
        per_token = [row for row, qlen in zip(plan.rows, query_lens, strict=True) for _ in range(qlen)]
        return torch.tensor(per_token, dtype=torch.long, device=positions.device), plan.extra_bases
