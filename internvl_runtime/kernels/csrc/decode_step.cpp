// The decoder layers of one decode step in one call: no Python between the layers.
//
//   decode_layers(x (M, hidden) bf16, per-layer weight lists, KV pools, cos/sin (M, head_dim) bf16,
//                 new-token slots (M,), context slots (flat) + offsets (M + 1), ...) -> x' (M, hidden) bf16
//
// or the same with x, norms, KV pools, cos/sin and every weight float32 (a float32 model: the stack in
// fp32 end to end, products on the fp32 GEMV kernels). Each of the M rows is one sequence's new token.
// Per layer, exactly the Llama-family computation of models/decoders/base.py, rounding to bf16 where the
// torch modules do in a bf16 stack (RMSNorm statistics in fp32; each product accumulated in fp32 and
// rounded once; rope, residual adds and silu*up rounded per op; attention scores rounded, soft-maxed in
// fp32, probabilities rounded), and nowhere in a float32 one:
//
//   h = rmsnorm(x) ; q,k,v = h Wqkv (+b) ; [Qwen3: q,k = rmsnorm per head (q_norm, k_norm)] ; rope(q, k) ; pool[slot] = k, v ; a = attend(q, pool[context])
//   x = x + a Wo ; h = rmsnorm(x) ; g,u = h Wgate_up ; x = x + (silu(g) * u) Wdown
//
// Products go to the GEMV kernels of gemv.cpp (bf16, int8 with per-row scales, or int4, per matrix; fp32), which
// read each weight row once per step for all M rows; from `gemm_rows` rows on (the caller's choice: where
// the host has fast 16-bit GEMMs; always, for fp32), bf16 / fp32 products go to torch's GEMM (at::mm / addmm, oneDNN) instead,
// which is compute-efficient at many rows, still inside this one call. The attention of each
// (sequence, KV head) pair is one task on torch's thread pool. Anything this op does
// not cover (other dtypes, other layer types) stays on the Python path, which decides before calling.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "gemv.h"
#include "packed_bf16.h"

using namespace internvl_kernels;

namespace {

inline uint16_t f32_to_bf16(float f) { return c10::BFloat16(f).x; }  // round to nearest even, like torch
inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

// The activation type of a stack, T: uint16_t (bf16 bits: every op rounds to bf16, as the torch modules in
// bfloat16) or float (float32 modules: no rounding beyond fp32's own). Load widens, store and round narrow.
template <typename T>
struct Act;
template <>
struct Act<uint16_t> {
  static float load(uint16_t v) { return bf16_to_f32(v); }
  static uint16_t store(float f) { return f32_to_bf16(f); }
  static float round(float f) { return round_bf16(f); }
  static constexpr at::ScalarType dtype = at::kBFloat16;
};
template <>
struct Act<float> {
  static float load(float v) { return v; }
  static float store(float f) { return f; }
  static float round(float f) { return f; }
  static constexpr at::ScalarType dtype = at::kFloat;
};

enum Format { kWeightBf16, kWeightInt8, kWeightInt4, kWeightF32, kWeightBf16Packed };

struct Matrix {
  const at::Tensor* weight = nullptr;   // the tensor itself, for the GEMM route
  const at::Tensor* bias_tensor = nullptr;
  const void* w = nullptr;
  Format format = kWeightBf16;
  int64_t group = 0;             // int4: columns per scale/zero group
  const void* scale = nullptr;
  int scale_kind = kNone;
  const void* bias = nullptr;
  int bias_kind = kNone;
  int64_t N = 0, K = 0;
  PackedBf16 packed;             // packed bf16: the blob's views
};

int kind_of(const at::Tensor& t, const char* what, int64_t layer) {
  if (t.scalar_type() == at::kBFloat16) return kBf16;
  TORCH_CHECK(t.scalar_type() == at::kFloat, "decode_layers: ", what, "[", layer,
              "] must be bfloat16 or float32, got ", t.scalar_type());
  return kF32;
}

void check_vector(const at::Tensor& t, int64_t n, const char* what, int64_t layer) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 1 && t.size(0) == n && t.is_contiguous(), "decode_layers: ", what,
              "[", layer, "] must be a contiguous CPU (", n, ",) tensor, got ", t.sizes());
}

// A projection's optional (N,) bias, bf16 or float32.
void set_bias(Matrix& m, const at::Tensor* bias, int64_t layer) {
  if (bias == nullptr) return;
  check_vector(*bias, m.N, "bias", layer);
  m.bias = bias->data_ptr();
  m.bias_kind = kind_of(*bias, "bias", layer);
  m.bias_tensor = bias;
}

// A projection's weights: bf16 (N, K) without scales; int8 (N, K) with (N,) scales; int4 (N, K/2) uint8
// (kernels.pack_int4's layout) with (N, K/group, 2) bf16 scales and zeros; in a float32 stack (`act` float)
// fp32 (N, K) without scales, and nothing else.
Matrix matrix(const at::Tensor& w, const at::Tensor* scale, const at::Tensor* bias, int64_t N, int64_t K,
              const char* what, int64_t layer, at::ScalarType act) {
  if (w.scalar_type() == at::kByte && w.dim() == 1) {   // packed bf16 (packed_bf16.cpp): one blob
    TORCH_CHECK(act == at::kBFloat16 && scale == nullptr, "decode_layers: packed ", what, "[", layer,
                "] belongs to a bf16 stack, without scales");
    Matrix m;
    m.packed = packed_view(w);
    TORCH_CHECK(m.packed.N == N && m.packed.K == K, "decode_layers: packed ", what, "[", layer, "] is (",
                m.packed.N, ", ", m.packed.K, "), not (", N, ", ", K, ")");
    m.N = N;
    m.K = K;
    m.weight = &w;
    m.format = kWeightBf16Packed;
    set_bias(m, bias, layer);
    return m;
  }
  const bool int4 = w.scalar_type() == at::kByte;
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 2 && w.size(0) == N && w.size(1) == (int4 ? K / 2 : K) &&
                  w.is_contiguous(),
              "decode_layers: ", what, "[", layer, "] must be a contiguous CPU (", N, ", ", (int4 ? K / 2 : K),
              ") matrix, got ", w.sizes());
  Matrix m;
  m.N = N;
  m.K = K;
  m.w = w.data_ptr();
  m.weight = &w;
  if (act == at::kFloat) {
    TORCH_CHECK(scale == nullptr && w.scalar_type() == at::kFloat, "decode_layers: ", what, "[", layer,
                "] must be float32 without scales in a float32 stack, got ", w.scalar_type());
    m.format = kWeightF32;
  } else if (scale != nullptr) {
    if (int4) {
      TORCH_CHECK(scale->scalar_type() == at::kBFloat16 && scale->dim() == 3 && scale->size(0) == N &&
                      scale->size(1) > 0 && K % scale->size(1) == 0 && (K / scale->size(1)) % 32 == 0 &&
                      scale->size(2) == 2 && scale->is_contiguous(),
                  "decode_layers: int4 ", what, "[", layer, "] needs (N, K/group, 2) bf16 scales and zeros");
      m.format = kWeightInt4;
      m.group = K / scale->size(1);
      m.scale = scale->data_ptr();
    } else {
      TORCH_CHECK(w.scalar_type() == at::kChar, "decode_layers: ", what, "[", layer, "] has scales but is ",
                  w.scalar_type(), ", not int8 or int4 (uint8)");
      check_vector(*scale, N, "scales of ", layer);
      m.format = kWeightInt8;
      m.scale = scale->data_ptr();
      m.scale_kind = kind_of(*scale, "scales", layer);
    }
  } else {
    TORCH_CHECK(w.scalar_type() == at::kBFloat16, "decode_layers: ", what, "[", layer, "] must be bfloat16, got ",
                w.scalar_type());
  }
  set_bias(m, bias, layer);
  return m;
}

// torch's GEMM on the stored weight (as F.linear does: fp32 accumulation, one rounding to T); packed weights
// unpacked first (the same bf16 values).
template <typename T>
void gemm(const Matrix& m, const T* x, int64_t M, T* out, int64_t path) {
  const auto opts = at::TensorOptions().dtype(Act<T>::dtype);
  const at::Tensor xt = at::from_blob(const_cast<T*>(x), {M, m.K}, opts);
  at::Tensor ot = at::from_blob(out, {M, m.N}, opts);
  at::Tensor unpacked;
  if (m.format == kWeightBf16Packed) {
    unpacked = at::empty({m.N, m.K}, opts);
    unpack_bf16_matrix(m.packed, static_cast<uint16_t*>(unpacked.data_ptr()), path);
  }
  const at::Tensor& w = m.format == kWeightBf16Packed ? unpacked : *m.weight;
  if (m.bias_tensor != nullptr)
    at::addmm_out(ot, m.bias_tensor->to(Act<T>::dtype), xt, w.t());
  else
    at::mm_out(ot, xt, w.t());
}

// out (M, N) fp32 = x (M, K) fp32 . W^T (+ bias), W fp32: the GEMV kernels, or torch's GEMM from gemm_rows rows.
void matvec(const Matrix& m, const float* x, int64_t M, float* out, int64_t path, int64_t gemm_rows) {
  if (gemm_rows > 0 && M >= gemm_rows) return gemm(m, x, M, out, path);
  matvec_f32(x, M, m.K, static_cast<const float*>(m.w), m.N, m.bias, m.bias_kind, out, kF32, path);
}

// out (M, N) bf16 = x (M, K) bf16 . W^T (+ bias). gemm_rows > 0: bf16 weights with M >= gemm_rows go to
// torch's GEMM (as F.linear does: fp32 accumulation, one rounding), the others to the GEMV kernels.
void matvec(const Matrix& m, const uint16_t* x, int64_t M, uint16_t* out, int64_t path, int64_t gemm_rows) {
  if ((m.format == kWeightBf16 || m.format == kWeightBf16Packed) && gemm_rows > 0 && M >= gemm_rows)
    return gemm(m, x, M, out, path);
  switch (m.format) {
    case kWeightBf16Packed:
      matvec_bf16_packed(x, M, m.packed, m.bias, m.bias_kind, out, kBf16, path);
      break;
    case kWeightInt8:
      matvec_int8(x, M, m.K, static_cast<const int8_t*>(m.w), m.scale, m.scale_kind, m.N, m.bias, m.bias_kind, out,
                  kBf16, path);
      break;
    case kWeightInt4:
      matvec_int4(x, M, m.K, static_cast<const uint8_t*>(m.w), static_cast<const uint16_t*>(m.scale), m.group, m.N,
                  m.bias, m.bias_kind, out, kBf16, path);
      break;
    default:
      matvec_bf16(x, M, m.K, static_cast<const uint16_t*>(m.w), m.N, m.bias, m.bias_kind, out, kBf16, path);
  }
}

// RMSNorm as the reference: statistics in fp32, the normalised value rounded to T, then times the weight.
template <typename T>
void rms_norm(const T* x, const T* w, int64_t M, int64_t H, float eps, T* out) {
  using A = Act<T>;
  for (int64_t m = 0; m < M; ++m) {
    const T* row = x + m * H;
    float ss[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t h = 0;
    for (; h + 8 <= H; h += 8)
      for (int t = 0; t < 8; ++t) {
        const float v = A::load(row[h + t]);
        ss[t] += v * v;
      }
    for (; h < H; ++h) {
      const float v = A::load(row[h]);
      ss[0] += v * v;
    }
    const float total = ((ss[0] + ss[1]) + (ss[2] + ss[3])) + ((ss[4] + ss[5]) + (ss[6] + ss[7]));
    const float r = 1.0f / std::sqrt(total / static_cast<float>(H) + eps);
    for (h = 0; h < H; ++h)
      out[m * H + h] = A::store(A::load(w[h]) * A::round(A::load(row[h]) * r));
  }
}

// x = x + y, rounded per element (the residual add of two T tensors).
template <typename T>
void add_into(T* x, const T* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = Act<T>::store(Act<T>::load(x[i]) + Act<T>::load(y[i]));
}

// Rotary embedding of `heads` rows of D values in place: x*cos + rotate_half(x)*sin, each op rounded.
template <typename T>
void rope(T* x, int64_t heads, int64_t D, const T* cos, const T* sin) {
  using A = Act<T>;
  const int64_t half = D / 2;
  std::vector<float> a(static_cast<size_t>(D));
  for (int64_t h = 0; h < heads; ++h) {
    T* row = x + h * D;
    for (int64_t d = 0; d < D; ++d) a[d] = A::load(row[d]);
    for (int64_t d = 0; d < D; ++d) {
      const float rotated = d < half ? -a[d + half] : a[d - half];
      row[d] = A::store(A::round(a[d] * A::load(cos[d])) + A::round(rotated * A::load(sin[d])));
    }
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
// Attention of G query heads sharing one KV head over S context tokens (AVX2 + FMA, which every host
// with a native path has). D must be a multiple of 8.
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace {

inline __m256 load8_bf16(const uint16_t* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// exp(x) for 8 floats: 2^n * e^r with n = round(x / ln 2), |r| <= ln2 / 2, e^r by its Taylor series to
// degree 7 (relative error < 1e-8, under fp32's own rounding); overflow gives inf, underflow 0.
inline __m256 exp8(__m256 x) {
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  // 2^n in two factors, so n down to -252 (results under fp32's normal range) stays exact
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i half = _mm256_srai_epi32(ni, 1);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, _mm256_set1_epi32(127)), 23));
  const __m256 s2 = _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, half), _mm256_set1_epi32(127)), 23));
  __m256 y = _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
  y = _mm256_blendv_ps(y, _mm256_set1_ps(std::numeric_limits<float>::infinity()),
                       _mm256_cmp_ps(x, _mm256_set1_ps(88.7228394f), _CMP_GT_OQ));
  y = _mm256_blendv_ps(y, _mm256_setzero_ps(), _mm256_cmp_ps(x, _mm256_set1_ps(-103.972084f), _CMP_LT_OQ));
  return _mm256_blendv_ps(y, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));   // NaN stays NaN
}

// fp32 -> bf16 with round to nearest even (NaN inputs are not expected here), 8 at a time.
inline __m256i round_bits8(__m256 v) {
  const __m256i b = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  return _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
}

inline __m256 round8(__m256 v) { return _mm256_castsi256_ps(_mm256_slli_epi32(round_bits8(v), 16)); }

inline void store8_bf16(uint16_t* p, __m256 v) {
  const __m256i b = round_bits8(v);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1)));
}

// The same three for either activation type (float: plain loads and stores, no rounding).
inline __m256 load8(const uint16_t* p) { return load8_bf16(p); }
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline void store8(uint16_t* p, __m256 v) { store8_bf16(p, v); }
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
template <typename T>
inline __m256 round8_as(__m256 v) { return std::is_same<T, float>::value ? v : round8(v); }

// silu(gate) * up over one row of the fused gate_up output (gate first), each op rounded like torch's:
// silu in fp32 as x / (1 + exp(-x)), rounded; times up, rounded.
template <typename T>
void silu_mul(const T* gate_up, int64_t I, T* out) {
  using A = Act<T>;
  int64_t i = 0;
  for (; i + 8 <= I; i += 8) {
    const __m256 g = load8(gate_up + i);
    const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
    const __m256 s = round8_as<T>(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e)));
    store8(out + i, _mm256_mul_ps(s, load8(gate_up + I + i)));
  }
  for (; i < I; ++i) {
    const float g = A::load(gate_up[i]);
    const float s = A::round(g / (1.0f + std::exp(-g)));
    out[i] = A::store(s * A::load(gate_up[I + i]));
  }
}

// The totals of 4 vectors, each summed in hsum8's order ((v0 + v4) + (v2 + v6)) + ((v1 + v5) + (v3 + v7)), so
// each is bit for bit hsum8 of its vector: lanes 0-3 of the result are the totals of a, b, c, d.
inline __m128 hsum8x4(__m256 a, __m256 b, __m256 c, __m256 d) {
  // per vector v: lanes i + i+4 (hsum8's first add), two vectors per register (v in the low half, w high)
  const __m256 ab = _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
  const __m256 cd = _mm256_add_ps(_mm256_permute2f128_ps(c, d, 0x20), _mm256_permute2f128_ps(c, d, 0x31));
  // lanes 0 + 2 and 1 + 3 of each half (its movehl add): [a02, a13, c02, c13 | b02, b13, d02, d13]
  const __m256 u = _mm256_add_ps(_mm256_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm256_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));
  // (02) + (13) (its movehdup add): [a, c, a, c | b, d, b, d]
  const __m256 t = _mm256_add_ps(_mm256_shuffle_ps(u, u, _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm256_shuffle_ps(u, u, _MM_SHUFFLE(3, 1, 3, 1)));
  const __m128 ac = _mm256_castps256_ps128(t), bd = _mm256_extractf128_ps(t, 1);
  return _mm_unpacklo_ps(ac, bd);   // [a, b, c, d]
}

// Scores of J consecutive context tokens (4 in the blocks, 1 in the tail) against each of the G query heads
// (fp32 rows qf, the tokens' widened key rows from k0), written to probs[g * S + s + j]: (q . k) rounded, then
// * scale rounded (two bf16 ops in the reference). Per score two accumulators over D (a0: the first 8 of every
// 16, and the tail; a1: the second 8), then hsum8(a0 + a1); hsum8x4 totals 4 vectors each in hsum8's order, so
// a token's score is the same in a block or in the tail.
template <typename T, int J>
inline void score_tokens(const float* qf, const float* k0, int64_t G, int64_t D, int64_t S, int64_t s, float scale,
                         float* probs) {
  static_assert(J == 1 || J == 4, "score_tokens: blocks of 4 tokens, or 1");
  using A = Act<T>;
  for (int64_t g = 0; g < G; ++g) {
    const float* qg = qf + g * D;
    __m256 a0[J], a1[J];
    for (int j = 0; j < J; ++j) a0[j] = a1[j] = _mm256_setzero_ps();
    int64_t d = 0;
    for (; d + 16 <= D; d += 16) {
      const __m256 q0 = _mm256_loadu_ps(qg + d), q1 = _mm256_loadu_ps(qg + d + 8);
      for (int j = 0; j < J; ++j) {
        a0[j] = _mm256_fmadd_ps(q0, _mm256_loadu_ps(k0 + j * D + d), a0[j]);
        a1[j] = _mm256_fmadd_ps(q1, _mm256_loadu_ps(k0 + j * D + d + 8), a1[j]);
      }
    }
    if (d < D) {
      const __m256 q0 = _mm256_loadu_ps(qg + d);
      for (int j = 0; j < J; ++j) a0[j] = _mm256_fmadd_ps(q0, _mm256_loadu_ps(k0 + j * D + d), a0[j]);
    }
    alignas(16) float sums[4];
    if constexpr (J == 4)
      _mm_store_ps(sums, hsum8x4(_mm256_add_ps(a0[0], a1[0]), _mm256_add_ps(a0[1], a1[1]),
                                 _mm256_add_ps(a0[2], a1[2]), _mm256_add_ps(a0[3], a1[3])));
    else
      sums[0] = hsum8(_mm256_add_ps(a0[0], a1[0]));
    for (int j = 0; j < J; ++j) probs[g * S + s + j] = A::round(A::round(sums[j]) * scale);
  }
}

// q: G rows of D (T, already rotated); keys/values: pools with `stride` elements per slot, this head's
// values at +offset; slots: the S context slots in order. out: G rows of D T. work: >= G*(S + 2*D) + 2*S*D
// floats. The context's keys and values are first widened to fp32 rows (kf, vf); then blocks of 4 context
// tokens (their rows in L1) meet every query head: 4 dot products per head at once, totalled by hsum8x4; each
// head's output is accumulated over the value rows in registers, 64 lanes at a time. Every value is computed as
// by the one-token-at-a-time loop this replaced (same products, same sums in the same order; 16 rows x 24
// layers of InternVL2-1B: ~12% of a 16-row decode step there, its accumulators loaded and stored per token).
template <typename T>
void attend(const T* q, int64_t G, int64_t D, const T* keys, const T* values, int64_t stride,
            int64_t offset, const int64_t* slots, int64_t S, float scale, T* out, float* work) {
  using A = Act<T>;
  float* qf = work;              // G x D
  float* probs = qf + G * D;     // G x S
  float* acc = probs + G * S;    // G x D
  float* kf = acc + G * D;       // S x D
  float* vf = kf + S * D;        // S x D
  for (int64_t i = 0; i < G * D; ++i) qf[i] = A::load(q[i]);
  for (int64_t s = 0; s < S; ++s) {
    const T* k = keys + slots[s] * stride + offset;
    const T* v = values + slots[s] * stride + offset;
    for (int64_t d = 0; d < D; d += 8) {
      _mm256_storeu_ps(kf + s * D + d, load8(k + d));
      _mm256_storeu_ps(vf + s * D + d, load8(v + d));
    }
  }
  int64_t s = 0;
  for (; s + 4 <= S; s += 4) score_tokens<T, 4>(qf, kf + s * D, G, D, S, s, scale, probs);
  for (; s < S; ++s) score_tokens<T, 1>(qf, kf + s * D, G, D, S, s, scale, probs);
  for (int64_t g = 0; g < G; ++g) {   // softmax in fp32, probabilities rounded to T
    float* p = probs + g * S;
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t s = 0; s < S; ++s) mx = std::max(mx, p[s]);
    __m256 vsum = _mm256_setzero_ps();
    const __m256 vmx = _mm256_set1_ps(mx);
    int64_t s = 0;
    for (; s + 8 <= S; s += 8) {
      const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + s), vmx));
      _mm256_storeu_ps(p + s, e);
      vsum = _mm256_add_ps(vsum, e);
    }
    float sum = hsum8(vsum);
    for (; s < S; ++s) {
      p[s] = std::exp(p[s] - mx);
      sum += p[s];
    }
    const float inv = 1.0f / sum;
    const __m256 vinv = _mm256_set1_ps(inv);
    for (s = 0; s + 8 <= S; s += 8)
      _mm256_storeu_ps(p + s, round8_as<T>(_mm256_mul_ps(_mm256_loadu_ps(p + s), vinv)));
    for (; s < S; ++s) p[s] = A::round(p[s] * inv);
  }
  // out = probs . V: acc (per head, D floats) = sum over the tokens in order of p * v, from 0; 64 lanes of D at
  // a time in 8 registers (8 independent chains of FMAs: one chain at a time waited on each FMA's latency)
  for (int64_t g = 0; g < G; ++g) {
    const float* pg = probs + g * S;
    float* ag = acc + g * D;
    int64_t d0 = 0;
    for (; d0 + 64 <= D; d0 += 64) {
      __m256 a[8];
      for (int c = 0; c < 8; ++c) a[c] = _mm256_setzero_ps();
      for (int64_t t = 0; t < S; ++t) {
        const __m256 pt = _mm256_set1_ps(pg[t]);
        const float* v = vf + t * D + d0;
        for (int c = 0; c < 8; ++c) a[c] = _mm256_fmadd_ps(pt, _mm256_loadu_ps(v + 8 * c), a[c]);
      }
      for (int c = 0; c < 8; ++c) _mm256_storeu_ps(ag + d0 + 8 * c, a[c]);
    }
    for (; d0 < D; d0 += 8) {
      __m256 a = _mm256_setzero_ps();
      for (int64_t t = 0; t < S; ++t) a = _mm256_fmadd_ps(_mm256_set1_ps(pg[t]), _mm256_loadu_ps(vf + t * D + d0), a);
      _mm256_storeu_ps(ag + d0, a);
    }
  }
  for (int64_t i = 0; i < G * D; ++i) out[i] = A::store(acc[i]);
}

}  // namespace
#pragma GCC pop_options

namespace {

const at::Tensor* optional_at(at::TensorList list, int64_t i) {
  return list.empty() ? nullptr : &list[static_cast<size_t>(i)];
}

template <typename T>
at::Tensor decode_layers_as(const at::Tensor& x_in, at::TensorList ln1,
                         at::TensorList ln2, at::TensorList qkv_w,
                         at::TensorList qkv_s, at::TensorList qkv_b,
                         at::TensorList q_norm, at::TensorList k_norm,
                         at::TensorList o_w, at::TensorList o_s,
                         at::TensorList gate_up_w, at::TensorList gate_up_s,
                         at::TensorList down_w, at::TensorList down_s,
                         at::TensorList key_cache, at::TensorList value_cache,
                         const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& slots,
                         const at::Tensor& ctx_slots, const at::Tensor& ctx_offsets, int64_t num_heads,
                         int64_t num_kv_heads, double eps, double scale, int64_t gemm_rows, int64_t path) {
  TORCH_CHECK(path == kAvx2 || path == kAvx512 || path == kAvx512Bf16, "decode_layers: unknown path ", path);
  const int64_t L = static_cast<int64_t>(ln1.size());
  const auto same = [L](at::TensorList v, bool optional, const char* what) {
    TORCH_CHECK(static_cast<int64_t>(v.size()) == L || (optional && v.empty()), "decode_layers: ", what, " has ",
                v.size(), " entries for ", L, " layers");
  };
  same(ln2, false, "ln2");
  same(qkv_w, false, "qkv_w");
  same(qkv_s, true, "qkv_s");
  same(qkv_b, true, "qkv_b");
  same(q_norm, true, "q_norm");
  same(k_norm, true, "k_norm");
  TORCH_CHECK(q_norm.empty() == k_norm.empty(), "decode_layers: q_norm and k_norm come together");
  const bool qk_norm = !q_norm.empty();
  same(o_w, false, "o_w");
  same(o_s, true, "o_s");
  same(gate_up_w, false, "gate_up_w");
  same(gate_up_s, true, "gate_up_s");
  same(down_w, false, "down_w");
  same(down_s, true, "down_s");
  same(key_cache, false, "key_cache");
  same(value_cache, false, "value_cache");

  TORCH_CHECK(x_in.device().is_cpu() && x_in.dim() == 2 && x_in.scalar_type() == Act<T>::dtype,
              "decode_layers: x must be a (M, hidden) CPU tensor of the stack's dtype");
  const int64_t M = x_in.size(0), H = x_in.size(1);
  TORCH_CHECK(num_heads > 0 && num_kv_heads > 0 && num_heads % num_kv_heads == 0,
              "decode_layers: num_heads must be a multiple of num_kv_heads");
  TORCH_CHECK(L > 0, "decode_layers: no layers");
  const int64_t D = key_cache[0].size(-1);
  TORCH_CHECK(D % 8 == 0 && D % 2 == 0, "decode_layers: head_dim must be a multiple of 8, got ", D);
  const int64_t G = num_heads / num_kv_heads, QS = num_heads * D, KS = num_kv_heads * D, QKV = QS + 2 * KS;
  const int64_t I2 = gate_up_w[0].dim() == 1 ? packed_view(gate_up_w[0]).N : gate_up_w[0].size(0), I = I2 / 2;
  for (const at::Tensor* t : {&cos, &sin})
    TORCH_CHECK(t->scalar_type() == Act<T>::dtype && t->dim() == 2 && t->size(0) == M && t->size(1) == D &&
                    t->is_contiguous(),
                "decode_layers: cos/sin must be contiguous (M, head_dim), of x's dtype");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.numel() == M && slots.is_contiguous(),
              "decode_layers: slots must be (M,) int64");
  TORCH_CHECK(ctx_offsets.scalar_type() == at::kLong && ctx_offsets.numel() == M + 1 && ctx_offsets.is_contiguous(),
              "decode_layers: ctx_offsets must be (M + 1,) int64");
  TORCH_CHECK(ctx_slots.scalar_type() == at::kLong && ctx_slots.is_contiguous(), "decode_layers: ctx_slots must be int64");
  const int64_t num_slots = key_cache[0].size(0);
  for (int64_t l = 0; l < L; ++l)
    for (const at::Tensor* c : {&key_cache[l], &value_cache[l]})
      TORCH_CHECK(c->scalar_type() == Act<T>::dtype && c->dim() == 3 && c->size(0) == num_slots &&
                      c->size(1) == num_kv_heads && c->size(2) == D && c->is_contiguous(),
                  "decode_layers: KV pool ", l, " must be a contiguous (", num_slots, ", ", num_kv_heads, ", ", D,
                  ") tensor of x's dtype");
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t* offs = ctx_offsets.data_ptr<int64_t>();
  const int64_t* ctx = ctx_slots.data_ptr<int64_t>();
  TORCH_CHECK(offs[0] == 0 && offs[M] == ctx_slots.numel(), "decode_layers: ctx_offsets do not span ctx_slots");
  int64_t max_ctx = 0;
  for (int64_t m = 0; m < M; ++m) {
    TORCH_CHECK(slot[m] >= 0 && slot[m] < num_slots, "decode_layers: slot ", slot[m], " out of range");
    TORCH_CHECK(offs[m + 1] > offs[m], "decode_layers: empty context for row ", m);
    max_ctx = std::max(max_ctx, offs[m + 1] - offs[m]);
  }
  for (int64_t i = 0; i < ctx_slots.numel(); ++i)
    TORCH_CHECK(ctx[i] >= 0 && ctx[i] < num_slots, "decode_layers: context slot ", ctx[i], " out of range");

  std::vector<Matrix> qkv(L), o(L), gate_up(L), down(L);
  for (int64_t l = 0; l < L; ++l) {
    check_vector(ln1[l], H, "ln1", l);
    check_vector(ln2[l], H, "ln2", l);
    if (qk_norm) {
      check_vector(q_norm[l], D, "q_norm", l);
      check_vector(k_norm[l], D, "k_norm", l);
      TORCH_CHECK(q_norm[l].scalar_type() == Act<T>::dtype && k_norm[l].scalar_type() == Act<T>::dtype,
                  "decode_layers: q/k norm weights must have x's dtype");
    }
    TORCH_CHECK(ln1[l].scalar_type() == Act<T>::dtype && ln2[l].scalar_type() == Act<T>::dtype,
                "decode_layers: norm weights must have x's dtype");
    qkv[l] = matrix(qkv_w[l], optional_at(qkv_s, l), optional_at(qkv_b, l), QKV, H, "qkv_w", l, Act<T>::dtype);
    o[l] = matrix(o_w[l], optional_at(o_s, l), nullptr, H, QS, "o_w", l, Act<T>::dtype);
    gate_up[l] = matrix(gate_up_w[l], optional_at(gate_up_s, l), nullptr, 2 * I, H, "gate_up_w", l, Act<T>::dtype);
    down[l] = matrix(down_w[l], optional_at(down_s, l), nullptr, H, I, "down_w", l, Act<T>::dtype);
  }

  at::Tensor x_out = x_in.clone();
  T* x = static_cast<T*>(x_out.data_ptr());
  const T* cs = static_cast<const T*>(cos.data_ptr());
  const T* sn = static_cast<const T*>(sin.data_ptr());
  std::vector<T> h(M * H), qkv_out(M * QKV), attn(M * QS), proj(M * H), gu(M * 2 * I), act(M * I);
  const int64_t tasks = M * num_kv_heads;
  const float sc = static_cast<float>(scale);

  for (int64_t l = 0; l < L; ++l) {
    rms_norm(x, static_cast<const T*>(ln1[l].data_ptr()), M, H, static_cast<float>(eps), h.data());
    matvec(qkv[l], h.data(), M, qkv_out.data(), path, gemm_rows);
    T* kp = static_cast<T*>(key_cache[l].data_ptr());
    T* vp = static_cast<T*>(value_cache[l].data_ptr());
    for (int64_t m = 0; m < M; ++m) {
      T* row = qkv_out.data() + m * QKV;
      if (qk_norm) {  // Qwen3: RMSNorm over each head's D values (in place), before the rotary embedding
        rms_norm(row, static_cast<const T*>(q_norm[l].data_ptr()), num_heads, D, static_cast<float>(eps), row);
        rms_norm(row + QS, static_cast<const T*>(k_norm[l].data_ptr()), num_kv_heads, D,
                 static_cast<float>(eps), row + QS);
      }
      rope(row, num_heads, D, cs + m * D, sn + m * D);
      rope(row + QS, num_kv_heads, D, cs + m * D, sn + m * D);
      std::memcpy(kp + slot[m] * KS, row + QS, KS * sizeof(T));
      std::memcpy(vp + slot[m] * KS, row + QS + KS, KS * sizeof(T));
    }
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> work(static_cast<size_t>(G * (max_ctx + 2 * D) + 2 * max_ctx * D));
      for (int64_t t = begin; t < end; ++t) {
        const int64_t m = t / num_kv_heads, kvh = t % num_kv_heads;
        attend(qkv_out.data() + m * QKV + kvh * G * D, G, D, kp, vp, KS, kvh * D, ctx + offs[m],
               offs[m + 1] - offs[m], sc, attn.data() + m * QS + kvh * G * D, work.data());
      }
    });
    matvec(o[l], attn.data(), M, proj.data(), path, gemm_rows);
    add_into(x, proj.data(), M * H);
    rms_norm(x, static_cast<const T*>(ln2[l].data_ptr()), M, H, static_cast<float>(eps), h.data());
    matvec(gate_up[l], h.data(), M, gu.data(), path, gemm_rows);
    at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) silu_mul(gu.data() + m * 2 * I, I, act.data() + m * I);
    });
    matvec(down[l], act.data(), M, proj.data(), path, gemm_rows);
    add_into(x, proj.data(), M * H);
  }
  return x_out;
}


// bf16 stacks (x bfloat16) and float32 stacks (x float32): the same computation, rounded as each dtype's
// torch modules round.
at::Tensor decode_layers(const at::Tensor& x_in, at::TensorList ln1,
                         at::TensorList ln2, at::TensorList qkv_w,
                         at::TensorList qkv_s, at::TensorList qkv_b,
                         at::TensorList q_norm, at::TensorList k_norm,
                         at::TensorList o_w, at::TensorList o_s,
                         at::TensorList gate_up_w, at::TensorList gate_up_s,
                         at::TensorList down_w, at::TensorList down_s,
                         at::TensorList key_cache, at::TensorList value_cache,
                         const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& slots,
                         const at::Tensor& ctx_slots, const at::Tensor& ctx_offsets, int64_t num_heads,
                         int64_t num_kv_heads, double eps, double scale, int64_t gemm_rows, int64_t path) {
  TORCH_CHECK(x_in.scalar_type() == at::kBFloat16 || x_in.scalar_type() == at::kFloat,
              "decode_layers: x must be bfloat16 or float32, got ", x_in.scalar_type());
  auto run = x_in.scalar_type() == at::kFloat ? &decode_layers_as<float> : &decode_layers_as<uint16_t>;
  return run(x_in, ln1, ln2, qkv_w, qkv_s, qkv_b, q_norm, k_norm, o_w, o_s, gate_up_w, gate_up_s, down_w, down_s, key_cache,
             value_cache, cos, sin, slots, ctx_slots, ctx_offsets, num_heads, num_kv_heads, eps, scale, gemm_rows,
             path);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(internvl_kernels, m) {
  // The KV pools are written in place (the new tokens' keys and values).
  m.def(
      "decode_layers(Tensor x, Tensor[] ln1, Tensor[] ln2, Tensor[] qkv_w, Tensor[] qkv_s, Tensor[] qkv_b, "
      "Tensor[] q_norm, Tensor[] k_norm, "
      "Tensor[] o_w, Tensor[] o_s, Tensor[] gate_up_w, Tensor[] gate_up_s, Tensor[] down_w, Tensor[] down_s, "
      "Tensor(a!)[] key_cache, Tensor(b!)[] value_cache, Tensor cos, Tensor sin, Tensor slots, Tensor ctx_slots, "
      "Tensor ctx_offsets, int num_heads, int num_kv_heads, float eps, float scale, int gemm_rows, int path) -> Tensor");
}

TORCH_LIBRARY_IMPL(internvl_kernels, CPU, m) { m.impl("decode_layers", &decode_layers); }
