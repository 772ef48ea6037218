"""The operators: each one native where ``extension.py`` chose a path, else torch computing the same thing.

Why: at batch 1 every decode step streams all weights once, so it runs at the speed the GEMV reads them,
and torch's own bf16 GEMV reads them well below the DRAM bandwidth (``benchmarks/gemv.py`` measures both;
runs in ``benchmarks/RESULTS.md``). These kernels keep the weights as stored, widen
them in registers (AVX-512 BF16 ``vdpbf16ps``; AVX-512F / AVX2 shift-and-FMA) and stream each row once,
threads taking chunks of rows from a shared counter. See ``csrc/gemv.cpp`` and ``benchmarks/gemv.py``.

- ``linear_bf16`` / ``linear_f32`` / ``linear_int8`` / ``linear_int4``: matrix products over the weights as
  stored (``csrc/gemv.cpp``); ``dequantize_int4``: the weight an int4 layer computes with.
- ``pack_bf16`` / ``unpack_bf16`` / ``linear_bf16_packed``: bf16 weights kept losslessly in ~12 bits a weight
  (``csrc/packed_bf16.cpp``): 3/4 of the bytes a decode step streams, every value kept.
- ``vision_attention`` / ``causal_attention``: the vision encoder's attention and the language model's
  prefill attention (``csrc/vision_attention.cpp``).
- ``decode_layers``: every decoder layer of one decode step in one call (``csrc/decode_step.cpp``); no
  torch fallback (the caller keeps its Python layer loop where it does not apply).

``path`` (where taken) overrides ``$INTERNVL_CPU_KERNEL`` and the automatic choice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import UnsupportedFeature
from . import extension
from .packing import unpack_int4

logger = logging.getLogger(__name__)


def _native() -> Any:
    """The native operators, or None where they do not run ($INTERNVL_CPU_KERNEL=torch, or no usable library)."""
    if extension._forced() == "torch" or extension._load() is None:
        return None
    return extension._State.ops


def _native_ops(what: str) -> Any:
    """The native operators for an operator without a torch fallback: ``UnsupportedFeature`` where they do not run."""
    ops = _native()
    if ops is None:
        raise UnsupportedFeature(f"{what} needs the native kernels ({extension.describe()})")
    return ops


def _native_path(what: str, path: str | None) -> tuple[Any, int]:
    """The native operators and the id of the ISA path (``path``, else the selected one) for an operator with no
    torch version (packing, unpacking): ``UnsupportedFeature`` where the kernels do not run or for path='torch'."""
    ops = _native_ops(what)
    chosen = extension._resolve(path)
    if chosen == "torch":
        raise UnsupportedFeature(f"{what} needs a native path (there is no torch version), not path='torch'")
    return ops, extension._PATH_ID[chosen]


def _flatten(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x


# ------------------------------------------------------------------------------------------ GEMV

def _linear(op: str, dtype: torch.dtype, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            path: str | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` on the native operator ``op`` where x and weight are ``dtype`` CPU tensors
    without autograd and the bias (if any) a bf16 / float32 CPU tensor; anything else goes to ``F.linear``."""
    chosen = extension._resolve(path)
    if (chosen == "torch" or x.dtype != dtype or weight.dtype != dtype
            or x.device.type != "cpu" or weight.device.type != "cpu" or weight.dim() != 2
            or (bias is not None and (bias.device.type != "cpu" or bias.dtype not in (torch.bfloat16, torch.float32)))
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                             or (bias is not None and bias.requires_grad)))):
        return F.linear(x, weight, bias.to(x.dtype) if bias is not None and bias.dtype != x.dtype else bias)
    if not weight.is_contiguous():
        weight = weight.contiguous()
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    out = getattr(extension._State.ops, op)(_flatten(x), weight, bias, extension._PATH_ID[chosen])
    return out.reshape(*x.shape[:-1], weight.shape[0]) if x.dim() != 2 else out


def linear_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                path: str | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for bf16 ``x`` (..., K) and bf16 ``weight`` (N, K) on CPU.

    Accumulates in fp32 and rounds to bf16 once, like torch. ``bias`` may be bf16 or float32 (added in
    fp32). Made for few rows (decode, M <= 16); it is correct for any M but slower than torch's GEMM for
    many. Anything the kernel does not handle (other dtypes or devices, autograd) goes to ``F.linear``.
    """
    return _linear("linear_bf16", torch.bfloat16, x, weight, bias, path)


def linear_f32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
               path: str | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for float32 ``x`` (..., K) and float32 ``weight`` (N, K) on CPU.

    The weights are streamed as stored, one row after another (a float32 model's decode reads twice the
    bytes of a bf16 one, so it is as bandwidth-bound), accumulated in fp32: the same sums as torch's up to
    their order. ``bias`` float32 or bf16. Made for few rows (decode); correct for any M. Anything the
    kernel does not handle (other dtypes or devices, autograd) goes to ``F.linear``. All AVX-512 paths run
    the AVX-512F tile (nothing 16-bit is involved).
    """
    return _linear("linear_f32", torch.float32, x, weight, bias, path)


def linear_int8(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None, *,
                path: str | None = None) -> torch.Tensor:
    """``(x @ weight.T) * scales + bias`` for int8 ``weight`` (N, K) with one scale per output row.

    The same semantics as the weight-only int8 layers (``quantization.Int8Linear``: W ~= q * scale[:, None]).
    ``x`` bf16 or float32 (the result has its dtype); ``scales`` and ``bias`` bf16 or float32. Accumulates in
    fp32 and rounds once. On every native path x meets the weights as int8, quantized once per call per
    block of 32 columns (scale max|x| / 127, round half to even, as llama.cpp's q8_0 activations), in
    integer dot products (AVX2 ``vpmaddubsw``/``vpmaddwd``; AVX-512 VNNI ``vpdpbusd`` where the CPU has
    it): ~0.5% relative error on random data, the size of int8 weights' own error; the sums are exact, so
    every path gives the same result. Falls back to a dequantizing torch expression where no native path
    runs.
    """
    chosen = extension._resolve(path)
    if (chosen == "torch" or x.dtype not in (torch.bfloat16, torch.float32) or weight.dtype != torch.int8
            or weight.dim() != 2 or scales.dtype not in (torch.bfloat16, torch.float32)
            or any(t.device.type != "cpu" for t in (x, weight, scales))
            or (bias is not None and (bias.device.type != "cpu" or bias.dtype not in (torch.bfloat16, torch.float32)))
            or (torch.is_grad_enabled() and x.requires_grad)):
        out = F.linear(x.float(), weight.float()) * scales.float()
        if bias is not None:
            out = out + bias.float()
        return out.to(x.dtype)
    weight = weight.contiguous()
    scales = scales.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    out = extension._State.ops.linear_int8(_flatten(x), weight, scales, bias, extension._PATH_ID[chosen])
    return out.reshape(*x.shape[:-1], weight.shape[0]) if x.dim() != 2 else out


def dequantize_int4(packed: torch.Tensor, scales_and_zeros: torch.Tensor, group: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight an int4 layer computes with, W = (q - 8) * scale + zero, from the native layout
    (``packing.pack_int4``; ``scales_and_zeros`` (N, K // group, 2)).

    One native pass where the kernels run (prefill dequantizes a layer per call: ~20x faster than the
    torch expression below, which remains the fallback and the reference)."""
    ops = _native() if dtype in (torch.bfloat16, torch.float32) and packed.device.type == "cpu" else None
    if (ops is not None and packed.is_contiguous() and scales_and_zeros.is_contiguous()
            and scales_and_zeros.dtype == torch.bfloat16):
        return ops.dequantize_int4(packed, scales_and_zeros, group, dtype)
    q = unpack_int4(packed).float()
    n, k = q.shape
    sz = scales_and_zeros.float()                                         # (N, G, 2)
    w = (q.reshape(n, k // group, group) - 8) * sz[..., :1] + sz[..., 1:]
    return w.reshape(n, k).to(dtype)


def linear_int4(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group: int,
                bias: torch.Tensor | None = None, *, path: str | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` for int4 weights in the native layout (``pack_int4``), fp32 accumulation.

    ``x`` (..., K) is taken in bf16 (the result has x's dtype). On every native path the ``(q - 8) * scale``
    part meets x quantized to int8 per weight group (scale max|x| / 127, as llama.cpp's q8_0 activations;
    ~0.7% of the output's scale on random data, small next to int4's own weight error) in integer dot
    products (AVX-512 VNNI for groups of a multiple of 64 columns where the CPU has it, else AVX2's
    ``vpmaddubsw``; the same sums either way); the ``zero`` part uses x exactly. Where no native path
    runs, the weight is dequantized and one matmul runs (exact up to bf16 rounding).
    """
    chosen = extension._resolve(path)
    if chosen == "torch" or x.device.type != "cpu" or (torch.is_grad_enabled() and x.requires_grad):
        out = F.linear(x.float(), dequantize_int4(packed, scales_and_zeros, group))
        if bias is not None:
            out = out + bias.float()
        return out.to(x.dtype)
    x2 = _flatten(x).to(torch.bfloat16)
    if bias is not None and (bias.dtype not in (torch.bfloat16, torch.float32) or not bias.is_contiguous()):
        bias = bias.float().contiguous()
    out = extension._State.ops.linear_int4(x2, packed, scales_and_zeros, group, bias,
                                        extension._PATH_ID[chosen]).to(x.dtype)
    return out.reshape(*x.shape[:-1], packed.shape[0]) if x.dim() != 2 else out


# --------------------------------------------------------------------------------- packed bf16

PACKED_BF16_COLUMNS = 64   # in_features must be a multiple of this to pack
_PACK_CHUNK_ELEMS = 1 << 24  # weights packed between two ``release`` calls (32 MiB of bf16 read)


def pack_bf16(weight: torch.Tensor, *, path: str | None = None,
              release: Callable[[torch.Tensor], object] | None = None, chunk_rows: int | None = None) -> torch.Tensor:
    """bf16 ``weight`` (N, K), K a multiple of 64, stored losslessly in ~12 bits a weight: a 1-D uint8 blob
    (``csrc/packed_bf16.cpp`` describes it). ``unpack_bf16`` gives back every value bit for bit. Native only:
    raises ``UnsupportedFeature`` where the kernels do not run; every path writes the same bytes.

    ``release(rows)``: told of each chunk of rows (``chunk_rows`` of them, default about 1M weights) once packing
    has read it for good, so that a weight viewed from the checkpoint's mapping can have its pages dropped as it
    goes (the loader's ``FileMappings.drop_pages``; as the quantizers' ``Release``). Each row is read twice:
    all rows for their windows and escape counts (the blob's size), then chunk by chunk for the bytes."""
    ops, path_id = _native_path("pack_bf16", path)
    weight = weight.detach().contiguous()
    if release is None:
        return ops.pack_bf16(weight, path_id)
    blob = ops.pack_bf16_begin(weight, path_id)
    n, k = weight.shape
    step = chunk_rows or max(1, _PACK_CHUNK_ELEMS // k)
    for start in range(0, n, step):
        rows = weight[start:start + step]
        ops.pack_bf16_rows(rows, blob, start, path_id)
        release(rows)
    return blob


def unpack_bf16(blob: torch.Tensor, *, path: str | None = None) -> torch.Tensor:
    """The bf16 (N, K) matrix of a ``pack_bf16`` blob, bit for bit (every path gives the same bits)."""
    ops, path_id = _native_path("unpack_bf16", path)
    return ops.unpack_bf16(blob, path_id)


def packed_bf16_shape(blob: torch.Tensor) -> tuple[int, int]:
    """(N, K) of a ``pack_bf16`` blob, from its header."""
    n, k = blob[16:32].view(torch.int64).tolist()
    return int(n), int(k)


def linear_bf16_packed(x: torch.Tensor, blob: torch.Tensor, bias: torch.Tensor | None = None, *,
                       path: str | None = None) -> torch.Tensor:
    """``F.linear(x, unpack_bf16(blob), bias)`` for bf16 ``x`` (..., K) without unpacking the matrix: up to 8
    rows (AVX-512 BF16) or 4 (AVX2, AVX-512F) the weights are unpacked in registers (fp32 accumulation in
    another order than ``linear_bf16``'s: the same exact products, sums rounded once); beyond, each thread's
    rows are unpacked into a small buffer for ``linear_bf16``'s tiles (the same result as ``linear_bf16``)."""
    chosen = extension._resolve(path)
    if (chosen == "torch" or x.dtype != torch.bfloat16 or x.device.type != "cpu"
            or (torch.is_grad_enabled() and x.requires_grad)
            or (bias is not None and bias.dtype not in (torch.bfloat16, torch.float32))):
        return F.linear(x, unpack_bf16(blob).to(x.dtype), None if bias is None else bias.to(x.dtype))
    out = extension._State.ops.linear_bf16_packed(_flatten(x), blob, None if bias is None else bias.contiguous(),
                                                  extension._PATH_ID[chosen])
    return out.reshape(*x.shape[:-1], out.shape[-1]) if x.dim() != 2 else out


# ------------------------------------------------------------------------------------- attention

def _attention_ops(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, path: str | None = None) -> Any:
    """The native operators where attention operator ``name`` runs on these tensors (bf16 CPU tensors, no
    autograd, at least one key, the avx512bf16 path), else None."""
    if (all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in (q, k, v)) and k.shape[-3] > 0
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))
            and extension._resolve(path) == "avx512bf16" and extension.has_operator(name)):
        return extension._State.ops
    return None


def _attention_failed(name: str, exc: RuntimeError) -> None:
    if not extension._State.attention_warned:     # not expected: the callers' checks mirror the operator's
        extension._State.attention_warned = True
        logger.warning("internvl_runtime.kernels: %s failed (%s); using torch's SDPA", name, extension._summary(exc))


def vision_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, *,
                     path: str | None = None) -> torch.Tensor:
    """Non-causal softmax attention, q (N, L, heads, D), k and v (N, S, heads, D) -> (N, L, heads * D).

    The vision encoder's attention (``csrc/vision_attention.cpp``): any strides with a contiguous last
    dimension, so the q / k / v views of a fused qkv output (N, L, 3, heads, D) are read in place, and the
    result comes in the layout the output projection reads. ``scale`` defaults to D ** -0.5. Native only on
    the avx512bf16 path for bf16 CPU tensors without autograd (fp32 scores, exact softmax, bf16
    probabilities: see the source); anything else, or a native failure (logged), runs torch's SDPA on
    float32 copies of q, k and v and rounds the result to q's dtype.
    """
    if (q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0]
            or q.shape[2:] != k.shape[2:]):
        raise ValueError(f"vision_attention: q (N, L, heads, D) and k, v (N, S, heads, D) expected, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    n, length, heads, dim = q.shape
    scale = dim ** -0.5 if scale is None else float(scale)
    if ops := _attention_ops("vision_attention", q, k, v, path):
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        try:
            return ops.vision_attention(q, k, v, scale, extension._PATH_ID["avx512bf16"])
        except RuntimeError as exc:
            _attention_failed("vision_attention", exc)
    out = F.scaled_dot_product_attention(q.float().transpose(1, 2), k.float().transpose(1, 2),
                                         v.float().transpose(1, 2), scale=scale)
    return out.transpose(1, 2).reshape(n, length, heads * dim).to(q.dtype)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One sequence's causal attention: q (L, heads, D) at positions S - L .. S - 1 over k, v (S, kv_heads, D)
    (a cached prefix, then the queries' own keys) -> (L, heads, D); query head h reads key head
    h // (heads // kv_heads).

    Native (``csrc/vision_attention.cpp``) on the avx512bf16 path for bf16 CPU tensors without autograd: fp32
    scores, exact softmax, bf16 probabilities (as the official eager attention rounds them), any strides with
    a contiguous last dimension (a paged cache's context read in place); 3-5x torch's flash kernel at a
    prefill's shapes (benchmarks/RESULTS.md). Anything else, or a native failure (logged), runs torch's SDPA
    in q's dtype (``is_causal`` where there is no prefix, else the mask).
    """
    length, heads, dim = q.shape
    if k.dim() != 3 or k.shape != v.shape or k.shape[2] != dim or k.shape[0] < length or heads % k.shape[1]:
        raise ValueError(f"causal_attention: q (L, heads, D) and k, v (S >= L, kv_heads dividing heads, D) "
                         f"expected, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if ops := _attention_ops("causal_attention", q, k, v):
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        try:
            out = ops.causal_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), scale,
                                       extension._PATH_ID["avx512bf16"])
            return out.view(length, heads, dim)
        except RuntimeError as exc:
            _attention_failed("causal_attention", exc)
    query = q.transpose(0, 1).unsqueeze(0)                                   # (1, H, L, D)
    keys, values = (t.transpose(0, 1).unsqueeze(0) for t in (k, v))          # (1, KV, S, D)
    gqa = heads != k.shape[1]
    if k.shape[0] == length:
        out = F.scaled_dot_product_attention(query, keys, values, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        slen = k.shape[0]
        rows = torch.arange(length, device=q.device)[:, None] + (slen - length)
        mask = torch.arange(slen, device=q.device)[None, :] <= rows             # (L, S)
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out.squeeze(0).transpose(0, 1)                                    # (L, H, D)


# ---------------------------------------------------------------------------------- decode step

def decode_layers(x: torch.Tensor, ln1: list[torch.Tensor], ln2: list[torch.Tensor],
                  qkv_w: list[torch.Tensor], qkv_s: list[torch.Tensor], qkv_b: list[torch.Tensor],
                  o_w: list[torch.Tensor], o_s: list[torch.Tensor],
                  gate_up_w: list[torch.Tensor], gate_up_s: list[torch.Tensor],
                  down_w: list[torch.Tensor], down_s: list[torch.Tensor],
                  key_cache: list[torch.Tensor], value_cache: list[torch.Tensor],
                  cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
                  ctx_slots: torch.Tensor, ctx_offsets: torch.Tensor, *,
                  num_heads: int, num_kv_heads: int, eps: float, scale: float, gemm_rows: int = 0,
                  path: str | None = None, q_norm: list[torch.Tensor] | None = None,
                  k_norm: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Every Llama-family decoder layer of one decode step, M sequences one new token each -> x (M, hidden).

    Per layer (see ``csrc/decode_step.cpp``, rounding to bf16 where the torch modules round in a bf16 stack;
    a float32 stack, where ``x`` is float32, rounds nowhere beyond fp32's own): RMSNorm
    (``ln1``), the qkv product (+ bias), with ``q_norm`` / ``k_norm`` (per layer a (head_dim,) weight of x's
    dtype; Qwen3) an RMSNorm over each head's query and key values, rope, the new keys / values written to
    ``key_cache`` /
    ``value_cache`` at ``slots`` (in place), attention over each sequence's context, the o product and
    residual, RMSNorm (``ln2``), gate_up, silu * up, down and residual.

    - ``x`` (M, hidden) bf16 or float32: the stack's dtype, which the norms, KV pools, ``cos``/``sin`` and
      (float32) every weight share; ``cos``, ``sin`` (M, head_dim); ``slots`` (M,): each new token's slot.
    - per-layer lists: norm weights (hidden,) of x's dtype; weights bf16 (N, K), int8 (N, K) or packed
      int4 (N, K // 2, ``packing.pack_int4``) in a bf16 stack, float32 (N, K) in a float32 one; the
      matching ``*_s`` list empty (bf16, float32), per-row scales (int8) or (N, K // group, 2) scales and
      zeros (int4); ``qkv_b`` empty or one bias per layer.
    - ``key_cache``, ``value_cache``: per layer a (num_slots, num_kv_heads, head_dim) pool of x's dtype.
    - ``ctx_slots`` (flat) and ``ctx_offsets`` (M + 1,): sequence i attends to the slots
      ``ctx_slots[ctx_offsets[i]:ctx_offsets[i + 1]]`` (its new token included).
    - ``gemm_rows``: from this many rows on (0: never), bf16 / float32 products run on torch's GEMM inside the call
      (oneDNN: compute-efficient at many rows where the CPU has 16-bit instructions) instead of the GEMV
      kernels, which read each weight row once for all rows but compute at a fraction of the GEMM's rate.

    There is no torch fallback: raises ``UnsupportedFeature`` where no native path runs (the caller decides
    beforehand, with ``has_operator("decode_layers")``), and RuntimeError naming a bad argument.
    """
    chosen = extension._resolve(path)
    if chosen == "torch":
        raise UnsupportedFeature(f"decode_layers needs the native kernels ({extension.describe()})")
    return extension._State.ops.decode_layers(
        x.contiguous(), ln1, ln2, qkv_w, qkv_s, qkv_b, q_norm or [], k_norm or [],
        o_w, o_s, gate_up_w, gate_up_s, down_w, down_s,
        key_cache, value_cache, cos.contiguous(), sin.contiguous(), slots.to(torch.long).contiguous(),
        ctx_slots.to(torch.long).contiguous(), ctx_offsets.to(torch.long).contiguous(), num_heads, num_kv_heads,
        eps, scale, int(gemm_rows), extension._PATH_ID[chosen])
