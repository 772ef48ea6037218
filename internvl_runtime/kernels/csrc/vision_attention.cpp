// Softmax attention on the AVX-512 BF16 path, bf16 in and out: the vision encoder's (non-causal) and the
// language model's prefill (causal, grouped-query).
//
//   vision_attention(q (N,L,H,D), k (N,S,H,D), v (N,S,H,D) bf16, scale, path) -> (N, L, H*D) bf16
//   causal_attention(q (N,L,H,D), k (N,S,KV,D), v (N,S,KV,D) bf16, scale, path) -> (N, L, H*D) bf16
//
// q, k and v may have any strides as long as the head dimension D is contiguous, so the three views of
// the fused qkv projection (N, L, 3, H, D), or a paged cache's context, are read in place, and the result is
// laid out as the output projection reads it (no transposes or copies around the call). out = softmax(scale *
// q k^T) v per (batch, head): over all S keys (vision_attention), or (causal_attention) query i, at position
// S - L + i (the keys before the first query are a cached prefix), over keys 0 .. S - L + i, query head h
// reading key / value head h / (H / KV).
//
// Why: torch's CPU flash kernel spends ~2x the time at the InternViT-300M shape (1025 tokens, 16 heads
// of 64), ~3-5x at a prefill's (a few hundred tokens, 14 heads of 64 over 2 key heads; RESULTS.md), and at
// up to a few thousand keys the score rows of a block of queries fit in L2, so no online (rescaled) softmax
// is needed. Per (batch, key head) K and V are packed once; each work item then takes a block of 48 queries:
//   1. S = scale * Q K^T in fp32 (vdpbf16ps: bf16 products, fp32 sums; exact products), over the keys the
//      block's last query sees;
//   2. exact row softmax over the keys the row sees: P = exp(S - rowmax) rounded to bf16, with its row sum
//      taken over the rounded values, so the weights the next step applies sum to exactly 1 after the
//      division; P is zero for the keys it does not see;
//   3. O = P V in fp32 (vdpbf16ps again), divided by the row sum and rounded once to bf16.
// The only roundings beyond torch's float32 path are the bf16 probabilities (relative 2^-9 each,
// unbiased, so they average out over the keys; the official eager attention rounds them too); the output
// is rounded to bf16 in both.
//
// Packed layouts (per batch and key head; keys past S are zero):
// - K: tiles of 64 keys; within a tile [D/2 pairs][64 keys][2 dims], so one pair step of a micro tile
//   reads 256 contiguous bytes (4 vectors of 16 keys x 2 dims).
// - V: [S/2 key pairs][Dv dims][2 keys], Dv = D rounded up to 16: one pair step reads 16 dims x 2 keys per
//   vector, which vdpbf16ps multiplies with a broadcast pair of probabilities (p_2i, p_2i+1).
// Micro tiles keep 6 query rows x 4 vectors (24 of the 32 zmm registers) as accumulators.
//
// Work items (batch, head, query block) are taken from a shared counter, the last (causal: the largest)
// query blocks first, so a thread slowed down by another process does not hold up the others. Only an
// AVX-512 BF16 path exists (`path` 2, the numbering of gemv.h); Python falls back to torch's SDPA elsewhere.
// As in gemv.cpp the file is compiled without -march and the ISA-specific code lives in a `#pragma GCC
// target` region.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <immintrin.h>

#include "gemv.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

using namespace internvl_kernels;

namespace {

constexpr int64_t kKeyTile = 64;     // keys per packed K tile (4 vectors of 16 fp32 scores)
constexpr int64_t kQueryBlock = 48;  // query rows per work item
constexpr int kTileRows = 6;         // query rows per micro tile
constexpr int64_t kColGroup = 64;    // output columns per P.V micro tile (4 vectors of 16)

// A (N, L or S, H, D) bf16 operand: element (b, t, h, d) at p[b * sb + t * st + h * sh + d].
struct Operand {
  const uint16_t* p;
  int64_t sb, st, sh;
  const uint16_t* row(int64_t b, int64_t t, int64_t h) const { return p + b * sb + t * st + h * sh; }
};

// Runs f() on `threads` threads (the caller's included) and returns when all have finished; f shares out
// its work itself (an atomic counter). at::parallel_for is an inline OpenMP region in torch's headers: it
// only spreads work when this file is compiled with -fopenmp and otherwise runs serially, so without
// OpenMP plain std::threads are started instead (tens of microseconds, against milliseconds of work).
// Those compete with torch's OpenMP workers, which spin for a while after each parallel region (the qkv
// matmul just before): 18.7 ms per InternViT-300M layer on 2 Zen 4 threads against 14.2 ms on torch's
// pool (-fopenmp) or with OMP_WAIT_POLICY=passive.
template <class F>
void run_on_threads(int64_t threads, const F& f) {
#ifdef _OPENMP
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) { f(); });
#else
  if (threads <= 1 || at::in_parallel_region()) {
    f();
    return;
  }
  std::exception_ptr error;
  std::mutex error_lock;
  auto guarded = [&] {
    try {
      f();
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_lock);
      if (!error) error = std::current_exception();
    }
  };
  std::vector<std::thread> helpers;
  helpers.reserve(threads - 1);
  for (int64_t t = 1; t < threads; ++t) helpers.emplace_back(guarded);
  guarded();
  for (auto& t : helpers) t.join();
  if (error) std::rethrow_exception(error);
#endif
}

struct Dims {
  int64_t N, L, S, H, D;
  int64_t KV;        // key / value heads (H for vision_attention; H a multiple of it)
  bool causal;       // query i sees keys 0 .. S - L + i (else all S)
  int64_t pairs;     // ceil(D / 2): bf16 pairs per q / k row
  int64_t Dv;        // D rounded up to 16: packed V row width
  int64_t S16;       // S rounded up to 16: keys with scores computed
  int64_t k_stride;  // elements of packed K per (batch, key head)
  int64_t v_stride;  // elements of packed V per (batch, key head)
  // keys query i sees (1-based count)
  int64_t seen(int64_t i) const { return causal ? std::min(S, S - L + i + 1) : S; }
};

}  // namespace

// ---------------------------------------------------------------------------------------------------
// AVX-512 BF16 (vdpbf16ps; AVX-512BW for 16-bit masked loads/stores and the V interleave).
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16")
namespace {

// exp(x) for x <= 0 (Cephes-style: x = n ln2 + r, |r| <= ln2 / 2, degree-6 polynomial, 2^n by scalef);
// ~2 ulp. Inputs below -87 give exp(-87) ~ 1.6e-38 instead of a denormal or 0, which no sum notices.
// NaN propagates (the max keeps its second operand when that is NaN).
inline __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-87.0f), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r);
  return _mm512_scalef_ps(_mm512_add_ps(p, _mm512_set1_ps(1.0f)), n);
}

inline __m256i to_bf16(__m512 x) { return (__m256i)_mm512_cvtneps_pbh(x); }  // round to nearest even

inline __m512 from_bf16(__m256i x) {  // exact
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(x), 16));
}

// Two adjacent bf16 values (one 32-bit lane) broadcast to all 16 lanes.
inline __m512bh broadcast_pair(const uint16_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return (__m512bh)_mm512_set1_epi32(v);
}

inline __mmask16 first_bits16(int64_t n) {  // the n lowest bits, n clamped to [0, 16]
  return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
}

inline __mmask32 first_bits32(int64_t n) {
  return n >= 32 ? ~__mmask32(0) : n <= 0 ? __mmask32(0) : __mmask32((1u << n) - 1);
}

// s[r][0 : 16 NK] = scale * q_r . k_j for R query rows (q: `pairs` bf16 pairs per row, ldq apart) and the
// first 16 NK keys of one packed K tile.
template <int R, int NK>
void qk_tile(const uint16_t* q, int64_t ldq, const uint16_t* kt, int64_t pairs, float scale, float* s, int64_t lds) {
  __m512 acc[R][NK];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NK; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    const uint16_t* kp = kt + p * 2 * kKeyTile;
    __m512bh kv[NK];
#pragma GCC unroll 4
    for (int c = 0; c < NK; ++c) kv[c] = (__m512bh)_mm512_loadu_si512(kp + c * 32);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512bh qv = broadcast_pair(q + r * ldq + 2 * p);
#pragma GCC unroll 4
      for (int c = 0; c < NK; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], qv, kv[c]);
    }
  }
  const __m512 vs = _mm512_set1_ps(scale);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NK; ++c) _mm512_storeu_ps(s + r * lds + c * 16, _mm512_mul_ps(acc[r][c], vs));
}

// out[r][0 : cols] = bf16(inv[r] * sum_i P[r][i] V[i][0 : cols]) for R rows of P (bf16, ldp apart) over
// `kpairs` key pairs of packed V (pair rows ldv apart, already offset to this column group);
// cols <= 16 NC, the last vector masked.
template <int R, int NC>
void pv_tile(const uint16_t* p, int64_t ldp, const uint16_t* vp, int64_t ldv, int64_t kpairs, const float* inv,
             uint16_t* out, int64_t ldo, int64_t cols) {
  __m512 acc[R][NC];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NC; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t i = 0; i < kpairs; ++i) {
    const uint16_t* v = vp + i * ldv;
    __m512bh vv[NC];
#pragma GCC unroll 4
    for (int c = 0; c < NC; ++c) vv[c] = (__m512bh)_mm512_loadu_si512(v + c * 32);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512bh pv = broadcast_pair(p + r * ldp + 2 * i);
#pragma GCC unroll 4
      for (int c = 0; c < NC; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], pv, vv[c]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const __m512 vi = _mm512_set1_ps(inv[r]);
#pragma GCC unroll 4
    for (int c = 0; c < NC; ++c)
      _mm256_mask_storeu_epi16(out + r * ldo + c * 16, first_bits16(cols - c * 16),
                               to_bf16(_mm512_mul_ps(acc[r][c], vi)));
  }
}

using QkFn = void (*)(const uint16_t*, int64_t, const uint16_t*, int64_t, float, float*, int64_t);
using PvFn = void (*)(const uint16_t*, int64_t, const uint16_t*, int64_t, int64_t, const float*, uint16_t*, int64_t,
                      int64_t);

#define ROWS(F, N) {F<1, N>, F<2, N>, F<3, N>, F<4, N>, F<5, N>, F<6, N>}
const QkFn kQk[4][kTileRows] = {ROWS(qk_tile, 1), ROWS(qk_tile, 2), ROWS(qk_tile, 3), ROWS(qk_tile, 4)};
const PvFn kPv[4][kTileRows] = {ROWS(pv_tile, 1), ROWS(pv_tile, 2), ROWS(pv_tile, 3), ROWS(pv_tile, 4)};
#undef ROWS

// K of one (batch, head) into tiles of 64 keys, [pair][key in tile][2]; keys S..S16 and the odd-D pad are 0.
void pack_k(const Operand& k, int64_t b, int64_t h, const Dims& d, uint16_t* kp) {
  for (int64_t n = 0; n < d.S16; ++n) {
    uint16_t* dst = kp + (n / kKeyTile) * d.pairs * 2 * kKeyTile + 2 * (n % kKeyTile);
    if (n >= d.S) {
      for (int64_t p = 0; p < d.pairs; ++p) dst[p * 2 * kKeyTile] = dst[p * 2 * kKeyTile + 1] = 0;
      continue;
    }
    const uint16_t* src = k.row(b, n, h);
    for (int64_t p = 0; p < d.D / 2; ++p) std::memcpy(dst + p * 2 * kKeyTile, src + 2 * p, 2 * sizeof(uint16_t));
    if (d.D % 2) {
      dst[(d.pairs - 1) * 2 * kKeyTile] = src[d.D - 1];
      dst[(d.pairs - 1) * 2 * kKeyTile + 1] = 0;
    }
  }
}

// V of one (batch, head) as [key pair][Dv][2]: rows 2i and 2i+1 interleaved 32 dims at a time.
void pack_v(const Operand& v, int64_t b, int64_t h, const Dims& d, uint16_t* vp) {
  alignas(64) static const uint16_t kLo[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                               8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i lo_idx = _mm512_load_si512(kLo);
  const __m512i hi_idx = _mm512_add_epi16(lo_idx, _mm512_set1_epi16(16));
  const int64_t kpairs = (d.S + 1) / 2;
  for (int64_t i = 0; i < kpairs; ++i) {
    const uint16_t* r0 = v.row(b, 2 * i, h);
    const uint16_t* r1 = 2 * i + 1 < d.S ? v.row(b, 2 * i + 1, h) : nullptr;
    uint16_t* dst = vp + i * 2 * d.Dv;
    for (int64_t c = 0; c < d.Dv; c += 32) {
      const __mmask32 m = first_bits32(d.D - c);
      const __m512i a = _mm512_maskz_loadu_epi16(m, r0 + c);
      const __m512i z = r1 ? _mm512_maskz_loadu_epi16(m, r1 + c) : _mm512_setzero_si512();
      _mm512_storeu_si512(dst + 2 * c, _mm512_permutex2var_epi16(a, lo_idx, z));
      if (c + 16 < d.Dv) _mm512_storeu_si512(dst + 2 * c + 32, _mm512_permutex2var_epi16(a, hi_idx, z));
    }
  }
}

struct Scratch {
  std::vector<uint16_t> q;  // kQueryBlock x 2 pairs
  std::vector<float> s;     // kQueryBlock x S16 scores
  std::vector<uint16_t> p;  // kQueryBlock x S16 probabilities (bf16)
  float inv[kQueryBlock];   // 1 / row sums
};

// Rows m0 .. m0 + rows of query block for (b, h) -> out rows (ldo apart, at this head's columns); kp / vp: the
// packed K / V of the head's key head.
void attend_block(const Operand& q, int64_t b, int64_t h, int64_t m0, int64_t rows, const uint16_t* kp,
                  const uint16_t* vp, const Dims& d, float scale, Scratch& w, uint16_t* out, int64_t ldo) {
  const int64_t ldq = 2 * d.pairs, lds = d.S16;
  const int64_t keys = d.seen(m0 + rows - 1);          // the keys the block's last query sees
  const int64_t keys16 = (keys + 15) / 16 * 16;
  // Q rows of the block, zero-padded to whole pairs
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(w.q.data() + r * ldq, q.row(b, m0 + r, h), d.D * sizeof(uint16_t));
    if (d.D % 2) w.q[r * ldq + d.D] = 0;
  }
  // 1. scores
  for (int64_t n0 = 0; n0 < keys16; n0 += kKeyTile) {
    const int64_t nk = std::min<int64_t>(kKeyTile, keys16 - n0) / 16;
    const uint16_t* kt = kp + (n0 / kKeyTile) * d.pairs * 2 * kKeyTile;
    for (int64_t r = 0; r < rows; r += kTileRows) {
      const int64_t mr = std::min<int64_t>(kTileRows, rows - r);
      kQk[nk - 1][mr - 1](w.q.data() + r * ldq, ldq, kt, d.pairs, scale, w.s.data() + r * lds + n0, lds);
    }
  }
  // 2. softmax over the keys each row sees; P is zero for the others up to keys16
  for (int64_t r = 0; r < rows; ++r) {
    const float* s = w.s.data() + r * lds;
    uint16_t* pr = w.p.data() + r * lds;
    const int64_t seen = d.seen(m0 + r), full = seen / 16 * 16;
    const __mmask16 tail = first_bits16(seen - full);
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int64_t n = 0; n < full; n += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(s + n));
    if (tail) mx = _mm512_mask_max_ps(mx, tail, mx, _mm512_loadu_ps(s + full));
    const __m512 vm = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t n = 0; n < full; n += 16) {
      const __m256i e = to_bf16(exp_ps(_mm512_sub_ps(_mm512_loadu_ps(s + n), vm)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(pr + n), e);
      sum = _mm512_add_ps(sum, from_bf16(e));
    }
    int64_t n = full;
    if (tail) {
      const __m512 x = _mm512_maskz_sub_ps(tail, _mm512_loadu_ps(s + full), vm);
      const __m256i e = to_bf16(_mm512_maskz_mov_ps(tail, exp_ps(x)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(pr + full), e);
      sum = _mm512_add_ps(sum, from_bf16(e));
      n += 16;
    }
    for (; n < keys16; n += 16) _mm256_storeu_si256(reinterpret_cast<__m256i*>(pr + n), _mm256_setzero_si256());
    w.inv[r] = 1.0f / _mm512_reduce_add_ps(sum);
  }
  // 3. out = P V / row sum, one group of 64 output columns at a time
  const int64_t kpairs = (keys + 1) / 2;
  for (int64_t c0 = 0; c0 < d.D; c0 += kColGroup) {
    const int64_t cols = std::min<int64_t>(kColGroup, d.D - c0);
    const int64_t nc = (cols + 15) / 16;
    for (int64_t r = 0; r < rows; r += kTileRows) {
      const int64_t mr = std::min<int64_t>(kTileRows, rows - r);
      kPv[nc - 1][mr - 1](w.p.data() + r * lds, lds, vp + 2 * c0, 2 * d.Dv, kpairs, w.inv + r,
                          out + r * ldo + c0, ldo, cols);
    }
  }
}

void attention_bf16(const Operand& q, const Operand& k, const Operand& v, const Dims& d, float scale,
                    uint16_t* out) {
  const int64_t heads = d.N * d.H, kv_heads = d.N * d.KV, group = d.H / d.KV;
  std::unique_ptr<uint16_t[]> kbuf(new uint16_t[kv_heads * d.k_stride]);  // uninitialised: every read
  std::unique_ptr<uint16_t[]> vbuf(new uint16_t[kv_heads * d.v_stride]);  // element is written by the packing
  const int64_t blocks = (d.L + kQueryBlock - 1) / kQueryBlock;
  const int64_t items = heads * blocks;
  // one thread below ~0.1 ms of work (2^21 pair products ~ 16 heads of 64 tokens x 64): starting more costs more
  const int64_t pair_products = heads * d.L * d.S * d.pairs / (d.causal ? 2 : 1);
  const int64_t threads =
      pair_products < (int64_t(1) << 21) ? 1 : std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items));
  std::atomic<int64_t> next_head{0};
  run_on_threads(std::min(threads, kv_heads), [&] {
    for (int64_t bg; (bg = next_head.fetch_add(1, std::memory_order_relaxed)) < kv_heads;) {
      pack_k(k, bg / d.KV, bg % d.KV, d, kbuf.get() + bg * d.k_stride);
      pack_v(v, bg / d.KV, bg % d.KV, d, vbuf.get() + bg * d.v_stride);
    }
  });
  const int64_t ldo = d.H * d.D;
  std::atomic<int64_t> next{0};
  run_on_threads(threads, [&] {
    Scratch w;
    w.q.resize(kQueryBlock * 2 * d.pairs);
    w.s.resize(kQueryBlock * d.S16);
    w.p.resize(kQueryBlock * d.S16);
    for (;;) {
      const int64_t item = next.fetch_add(1, std::memory_order_relaxed);
      if (item >= items) break;
      // the last query blocks first: under the causal mask they are the largest
      const int64_t bh = item % heads, m0 = (blocks - 1 - item / heads) * kQueryBlock;
      const int64_t b = bh / d.H, h = bh % d.H, bg = b * d.KV + h / group;
      attend_block(q, b, h, m0, std::min(kQueryBlock, d.L - m0), kbuf.get() + bg * d.k_stride,
                   vbuf.get() + bg * d.v_stride, d, scale, w, out + (b * d.L + m0) * ldo + h * d.D, ldo);
    }
  });
}

}  // namespace
#pragma GCC pop_options

// ---------------------------------------------------------------------------------------------------
// Operator (no ISA-specific code below this line).
namespace {

Operand operand(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kBFloat16, op, ": ", name, " must be bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be (N, tokens, heads, head_dim), got ", t.dim(), " dimensions");
  TORCH_CHECK(t.stride(3) == 1 || t.size(3) == 1, op, ": ", name, " must have a contiguous last (head_dim) dimension");
  return {static_cast<const uint16_t*>(t.data_ptr()), t.stride(0), t.stride(1), t.stride(2)};
}

at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, bool causal,
                     int64_t path, const char* op) {
  const Operand qo = operand(q, op, "q"), ko = operand(k, op, "k"), vo = operand(v, op, "v");
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k and v must have the same shape, got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(3) == k.size(3), op, ": q ", q.sizes(), " and k ", k.sizes(),
              " differ in batch or head_dim");
  if (causal) {
    TORCH_CHECK(k.size(2) > 0 && q.size(2) % k.size(2) == 0 && k.size(1) >= q.size(1), op, ": q ", q.sizes(),
                " and k ", k.sizes(), ": the query heads must be a multiple of the key heads and the keys at least as "
                "many as the queries");
  } else {
    TORCH_CHECK(q.size(2) == k.size(2), op, ": q ", q.sizes(), " and k ", k.sizes(), " differ in heads");
  }
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  TORCH_CHECK(path == kAvx512Bf16, op, ": only the AVX-512 BF16 path (", int64_t(kAvx512Bf16),
              ") is native, got path ", path);
  Dims d{};
  d.N = q.size(0);
  d.L = q.size(1);
  d.S = k.size(1);
  d.H = q.size(2);
  d.D = q.size(3);
  d.KV = k.size(2);
  d.causal = causal;
  TORCH_CHECK(d.S > 0 || d.L == 0 || d.N == 0 || d.H == 0 || d.D == 0, op, ": no keys to attend to (k has 0 tokens)");
  at::Tensor out = at::empty({d.N, d.L, d.H * d.D}, q.options());
  if (out.numel() == 0) return out;
  d.pairs = (d.D + 1) / 2;
  d.Dv = (d.D + 15) / 16 * 16;
  d.S16 = (d.S + 15) / 16 * 16;
  d.k_stride = (d.S + kKeyTile - 1) / kKeyTile * kKeyTile * 2 * d.pairs;
  d.v_stride = (d.S + 1) / 2 * 2 * d.Dv;
  attention_bf16(qo, ko, vo, d, static_cast<float>(scale), static_cast<uint16_t*>(out.data_ptr()));
  return out;
}

at::Tensor vision_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                            int64_t path) {
  return attention(q, k, v, scale, false, path, "vision_attention");
}

at::Tensor causal_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                            int64_t path) {
  return attention(q, k, v, scale, true, path, "causal_attention");
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(internvl_kernels, m) {
  m.def("vision_attention(Tensor q, Tensor k, Tensor v, float scale, int path) -> Tensor");
  m.def("causal_attention(Tensor q, Tensor k, Tensor v, float scale, int path) -> Tensor");
}

TORCH_LIBRARY_IMPL(internvl_kernels, CPU, m) {
  m.impl("vision_attention", &vision_attention);
  m.impl("causal_attention", &causal_attention);
}
