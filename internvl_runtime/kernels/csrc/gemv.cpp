// Matrix-vector (few-row matrix-matrix) products over weights kept in their stored format.
//
//   linear_bf16(x (M,K) bf16, w (N,K) bf16, bias (N,)? bf16|f32, path) -> (M,N) bf16
//   linear_f32(x (M,K) f32, w (N,K) f32, bias (N,)? bf16|f32, path) -> (M,N) f32
//   linear_int8(x (M,K) bf16|f32, w (N,K) int8, scales (N,) bf16|f32, bias?, path) -> (M,N) x.dtype
//
// Decode at batch 1 is bound by streaming the weights from DRAM, so each kernel reads every weight
// row exactly once, widens it to fp32 in registers and accumulates in fp32 (rounded once, at the end).
// Output rows are cut into chunks of ~128 KiB of weights that the threads take from a shared atomic
// counter (as llama.cpp does), so a thread slowed by another process does not hold the others up.
//
// One binary serves every x86-64 host: the file is compiled without -march flags and each ISA path
// lives in a `#pragma GCC target` region; Python picks the path from /proc/cpuinfo and passes it in
// (`path`: 0 = AVX2+FMA, 1 = AVX-512F, 2 = AVX-512 BF16), so no instruction the CPU lacks ever runs.
//
// Headers are kept to the minimum (no <torch/extension.h>, no pybind11): the operators are registered
// with TORCH_LIBRARY and called as torch.ops.internvl_kernels.*, which keeps the first compile short.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <immintrin.h>

#include "gemv.h"
#include "packed_bf16.h"

#include <algorithm>
#include <cmath>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

using namespace internvl_kernels;

namespace {

inline float load_kind(const void* p, int kind, int64_t i) {
  return kind == kBf16 ? bf16_to_f32(static_cast<const uint16_t*>(p)[i]) : static_cast<const float*>(p)[i];
}

// res[i * NB + j]: raw fp32 dot product of x row m0 + i (i < MB) with weight row n0 + j (j < NB) (the
// multi-row tiles of weights_outside kernels store their results in p.out themselves, res unused).
using TileFn = void (*)(const Problem&, int64_t m0, int64_t n0, float* res);
// Output columns n0 .. n0 + 3 of every one of the M rows, bias added, stored (weights without scales).
using PanelFn = void (*)(const Problem&, int64_t n0);

constexpr int kMaxMB = 8;
constexpr int kMaxNB = 4;

struct Kernel {
  TileFn one[kMaxMB];   // NB = 1, MB = 1..max_mb_one (M = 1, and the last N % nb_many rows)
  int max_mb_one;
  TileFn many[kMaxMB];  // NB = nb_many, MB = 1..max_mb_many (M > 1, activations too big for L1)
  int max_mb_many;
  int nb_many;
  bool many_always = false;  // the nb_many-row tiles at any M (several weight rows per pass even at M = 1)
  bool weights_outside = false;  // run_rows_wide's order: each weight tile meets every activation row
  PanelFn panel = nullptr;  // M > 1: 4 weight rows at a time against all M rows (run_rows_panel), `one` for the rest
};

}  // namespace

// A tile computes MB activation rows x NB weight rows over the whole of K.
// - M = 1 (decode) and, generally, while the activations fit in L1 (M x K x 2 or 4 bytes <= 24 KiB):
//   tiles take ONE weight row (NB = 1), read front to back, so each thread reads the weights as a
//   single sequential stream. (Reading 4 rows side by side, each only 1.8 KB long at K=896, ran at
//   a third of the speed on Zen 4: the hardware prefetcher follows one long stream far better than 4
//   short interleaved ones; 2 activation rows: 29 GB/s one-row vs 10 GB/s 4-row, single thread.)
// - Larger activations (e.g. 4+ rows at K=4864) would be re-read from L2 for every weight row, so
//   tiles take 4 weight rows and up to 4 (AVX-512) / 2 (AVX2) activation rows: 4 rows at K=4864
//   went from 8 to 13 GB/s.
// - 2 or 4 weight rows side by side at every M (_set_rows_per_pass, per weight format) stay selectable: on
//   Zen 4 (2026-12-05, RESULTS.md) two rows per pass were slower from DRAM for bf16, int8 and int4 alike
//   (bf16 AVX2 gate_up 23 -> 9 GB/s, one thread), so one row is the default everywhere.
// U independent accumulator sets hide the FMA / dot-product latency when MB x NB is small.
// Beyond ~8 rows these kernels are compute-bound and torch's packed GEMM (on avx512_bf16 hosts) wins.

// Software prefetch distance (bytes ahead in each weight row) of the AVX2 stream tiles (every weight format);
// 0: none (the hardware prefetcher alone; 256 B measured within noise of none on Zen 4). Benchmarks set it
// (_set_prefetch_bytes) to choose the default by measurement; an AVX2-only host may want another.
namespace {
std::atomic<int64_t> g_prefetch_bytes{0};
}  // namespace

#define TILE_SETUP(WT, WPTR, XT, XPTR, XLD)                      \
  const WT* wr[NB];                                              \
  const XT* xr[MB];                                              \
  _Pragma("GCC unroll 8") for (int j = 0; j < NB; ++j) wr[j] = (WPTR) + (n0 + j) * K; \
  _Pragma("GCC unroll 8") for (int i = 0; i < MB; ++i) xr[i] = (XPTR) + (m0 + i) * (XLD);

template <int MB, int NB>
constexpr int unroll_for() { return MB * NB == 1 ? 4 : MB * NB == 2 ? 2 : 1; }

// The weight formats the conversion ("stream") tiles read: where the rows are, and one weight as fp32 (the
// K tail). The ISA sections below widen a whole step of a row to fp32 in registers.
namespace {
template <class T> const T* weight_rows(const Problem& p);
template <> inline const uint16_t* weight_rows<uint16_t>(const Problem& p) { return p.w; }
template <> inline const float* weight_rows<float>(const Problem& p) { return p.wf; }
template <> inline const int8_t* weight_rows<int8_t>(const Problem& p) { return p.wq; }
inline float widen(uint16_t v) { return bf16_to_f32(v); }
inline float widen(float v) { return v; }
inline float widen(int8_t v) { return static_cast<float>(v); }

// Weight rows n0 .. n0 + NB - 1 of an int4 product: their codes and (scale, zero) pairs.
template <int NB>
struct Int4Rows {
  const uint8_t* w[NB];
  const uint16_t* sz[NB];
  Int4Rows(const Problem& p, int64_t n0) {
    for (int j = 0; j < NB; ++j) {
      w[j] = p.w4 + (n0 + j) * (p.K >> 1);
      sz[j] = p.sz + (n0 + j) * p.groups * 2;
    }
  }
};
}  // namespace

// ---------------------------------------------------------------------------------------------------
// AVX2 + FMA: 8-wide. A 16-element block of bf16 weights is one 256-bit load; its even elements are the
// low halves of the 32-bit lanes (shift left by 16 = exact bf16 -> fp32), its odd elements the high
// halves (mask). x is pre-converted to fp32 once per call with each 16-block stored as [evens, odds].
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace {

inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 16 columns of a weight row as two fp32 vectors a, b, in the order x is stored for that format: bf16 as
// [evens, odds] (the shift / mask widening), fp32 and int8 in plain order.
inline void widen16(const uint16_t* w, __m256& a, __m256& b) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  a = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  b = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
inline void widen16(const float* w, __m256& a, __m256& b) {
  a = _mm256_loadu_ps(w);
  b = _mm256_loadu_ps(w + 8);
}
inline void widen16(const int8_t* w, __m256& a, __m256& b) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
  a = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
  b = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(v, v)));
}

// MB activation rows (fp32, as prepare_x lays them out) x NB weight rows of format T, 16 columns a step, two
// FMAs per (activation, weight) pair and step into U accumulator sets. With a software prefetch distance
// set (g_prefetch_bytes), one prefetch per 64 bytes of each weight row. At batch 1 the stream, not the
// arithmetic, sets the pace (bf16: 32 bytes per 2 FMAs; fp32 64).
template <class T>
struct StreamAvx2 {
  template <int MB, int NB>
  static void tile(const Problem& p, int64_t m0, int64_t n0, float* res) {
    constexpr int U = unroll_for<MB, NB>();
    constexpr int64_t kLine = 64 / sizeof(T);   // elements per cache line
    const int64_t K = p.K, K16 = K & ~int64_t(15);
    const int64_t pf = g_prefetch_bytes.load(std::memory_order_relaxed) / int64_t(sizeof(T));   // in elements
    TILE_SETUP(T, weight_rows<T>(p), float, p.xf, K)
    __m256 acc[U][MB][NB];
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u)
#pragma GCC unroll 8
      for (int i = 0; i < MB; ++i)
#pragma GCC unroll 8
        for (int j = 0; j < NB; ++j) acc[u][i][j] = _mm256_setzero_ps();
    auto step = [&](int64_t k, int u) __attribute__((always_inline)) {
      __m256 wa[NB], wb[NB];
#pragma GCC unroll 8
      for (int j = 0; j < NB; ++j) {
        if (pf > 0 && k % kLine == 0) _mm_prefetch(reinterpret_cast<const char*>(wr[j] + k + pf), _MM_HINT_T0);
        widen16(wr[j] + k, wa[j], wb[j]);
      }
#pragma GCC unroll 8
      for (int i = 0; i < MB; ++i) {
        const __m256 xa = _mm256_loadu_ps(xr[i] + k), xb = _mm256_loadu_ps(xr[i] + k + 8);
#pragma GCC unroll 8
        for (int j = 0; j < NB; ++j) {
          acc[u][i][j] = _mm256_fmadd_ps(xa, wa[j], acc[u][i][j]);
          acc[u][i][j] = _mm256_fmadd_ps(xb, wb[j], acc[u][i][j]);
        }
      }
    };
    int64_t k = 0;
    for (; k + 16 * U <= K16; k += 16 * U)
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) step(k + 16 * u, u);
    for (; k < K16; k += 16) step(k, 0);
    for (int i = 0; i < MB; ++i)
      for (int j = 0; j < NB; ++j) {
        __m256 a = acc[0][i][j];
        for (int u = 1; u < U; ++u) a = _mm256_add_ps(a, acc[u][i][j]);
        float s = hsum256(a);
        for (int64_t t = K16; t < K; ++t) s += xr[i][t] * widen(wr[j][t]);
        res[i * NB + j] = s;
      }
  }
};

// Multi-row products on AVX2 ("panel" tiles, from g_panel_rows rows: avx2_kernel): the stream tiles above
// widen every weight block once per 4 activation rows and keep x in L1 while the weights come back from L2,
// which held them at ~40% of the FMA rate at 16 rows. Here a tile of 4 weight rows meets every activation row,
// 3 at a time, on a 3 x 4 register tile: 12 accumulators, 3 x vectors and one weight vector (16 ymm), 12 FMAs
// per 7 loads. K runs in blocks of g_panel_kc columns: each block of the 4 rows is widened ONCE to fp32 (bf16:
// into an L1-sized buffer, [evens, odds] per 16 columns as x is stored; fp32 weights are read where they are)
// and stays in L1 while the activation rows stream from L2 (widening the whole of K first: down, K = 4864, 16
// rows 70 -> 82 GFLOP/s); each pair's 8 lane sums are kept across blocks (fp32) and totalled once at the end.
// While the first 3 rows run, the next tile's stored weights are prefetched into L2 (without: 16 rows from
// DRAM ~77 -> ~60 GFLOP/s, 4 rows ~48 -> ~27; RESULTS.md).
std::atomic<int64_t> g_panel_kc{1024};

template <class T>
struct PanelAvx2 {
  // MB (1..3) activation rows from xr (rows K apart) x the 4 weight rows at wp (rows ldw apart), columns
  // k0..k1 (k1 - k0 a multiple of 8), then, where tail, the masked columns k1..K (fewer than 8). part: the
  // 8-lane partial sums of pair (i, j) at part[(i * 4 + j) * 8], zeroed first where fresh. pf: the next
  // tile's stored rows, prefetched over the same columns (or null).
  template <int MB>
  static void block(const float* xr, int64_t K, const float* wp, int64_t ldw, int64_t k0, int64_t k1, bool tail,
                    bool fresh, float* part, const T* pf) {
    constexpr int U = MB == 1 ? 2 : 1;   // one row: two accumulator sets, or the FMA latency sets the pace
    constexpr int64_t kLine = 64 / sizeof(T);
    __m256 acc[U][MB][4];
#pragma GCC unroll 2
    for (int u = 0; u < U; ++u)
#pragma GCC unroll 4
      for (int i = 0; i < MB; ++i)
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j)
          acc[u][i][j] = fresh || u > 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(part + (i * 4 + j) * 8);
    auto step = [&](int64_t k, int u) __attribute__((always_inline)) {
      __m256 xv[MB];
#pragma GCC unroll 4
      for (int i = 0; i < MB; ++i) xv[i] = _mm256_loadu_ps(xr + i * K + k);
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        const __m256 wv = _mm256_loadu_ps(wp + j * ldw + k);
#pragma GCC unroll 4
        for (int i = 0; i < MB; ++i) acc[u][i][j] = _mm256_fmadd_ps(xv[i], wv, acc[u][i][j]);
      }
    };
    int64_t k = k0;
    if (pf) {
      for (; k + 8 * U <= k1; k += 8 * U) {
        if (k % kLine < 8 * U)
#pragma GCC unroll 4
          for (int j = 0; j < 4; ++j) _mm_prefetch(reinterpret_cast<const char*>(pf + j * K + k), _MM_HINT_T1);
#pragma GCC unroll 2
        for (int u = 0; u < U; ++u) step(k + 8 * u, u);
      }
    } else {
      for (; k + 8 * U <= k1; k += 8 * U)
#pragma GCC unroll 2
        for (int u = 0; u < U; ++u) step(k + 8 * u, u);
    }
    for (; k < k1; k += 8) step(k, 0);
    if (tail && k1 < K) {
      const __m256i lanes = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(K - k1)),
                                               _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        const __m256 wv = _mm256_maskload_ps(wp + j * ldw + k1, lanes);
#pragma GCC unroll 4
        for (int i = 0; i < MB; ++i)
          acc[0][i][j] = _mm256_fmadd_ps(_mm256_maskload_ps(xr + i * K + k1, lanes), wv, acc[0][i][j]);
      }
    }
#pragma GCC unroll 4
    for (int i = 0; i < MB; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        __m256 a = acc[0][i][j];
        if constexpr (U == 2) a = _mm256_add_ps(a, acc[1][i][j]);
        _mm256_storeu_ps(part + (i * 4 + j) * 8, a);
      }
  }

  // Columns k0..k1 of the 4 weight rows at src (rows K apart; k0 a multiple of 16) widened to fp32 at dst, column
  // k at dst[k - k0] ([evens, odds] per 16 columns up to K & ~15, as x is stored; in order after).
  static void widen_block(const T* src, int64_t K, int64_t k0, int64_t k1, float* dst, int64_t ldd) {
    const int64_t k16 = std::min(k1, K & ~int64_t(15));
    for (int j = 0; j < 4; ++j) {
      const T* s = src + j * K;
      float* d = dst + j * ldd - k0;
      int64_t k = k0;
      for (; k + 16 <= k16; k += 16) {
        __m256 a, b;
        widen16(s + k, a, b);
        _mm256_store_ps(d + k, a);
        _mm256_store_ps(d + k + 8, b);
      }
      for (; k < k1; ++k) d[k] = widen(s[k]);
    }
  }

  // Output columns n0 .. n0 + 3 of all M rows: the fp32 dot products with weight rows n0 .. n0 + 3, plus the
  // bias, stored as fp32 or rounded to bf16 as `epilogue` rounds (c10::BFloat16: to nearest even, NaN to
  // 0x7FC0, on the integer bits), 4 values a row at once (the scalar epilogue's ~2 ns a result were ~15% of
  // a 16-row tile).
  static void tile(const Problem& p, int64_t n0) {
    const int64_t M = p.M, K = p.K, K8 = K & ~int64_t(7);
    // a multiple of 16: K blocks start on the [evens, odds] blocks of bf16's layout
    const int64_t kc = std::max<int64_t>(16, g_panel_kc.load(std::memory_order_relaxed) & ~int64_t(15));
    thread_local std::vector<float> part_store, wide_store;
    if (part_store.size() < static_cast<size_t>(M * 32)) part_store.resize(static_cast<size_t>(M * 32));
    float* part = part_store.data();
    const T* src = weight_rows<T>(p) + n0 * K;
    // the next tile of this call's weights, if any (a chunk's last tile prefetches the next chunk's first)
    const T* next = n0 + 8 <= p.N ? src + 4 * K : nullptr;
    // bf16 / int8: each K block of the 4 rows widened into an L1-sized buffer (64-byte rows) just before use
    const int64_t ldw = std::is_same_v<T, float> ? K : kc + 16;
    float* wide = nullptr;
    if constexpr (!std::is_same_v<T, float>) {
      if (wide_store.size() < static_cast<size_t>(4 * ldw + 16)) wide_store.resize(static_cast<size_t>(4 * ldw + 16));
      wide = wide_store.data() + ((64 - reinterpret_cast<uintptr_t>(wide_store.data()) % 64) % 64) / 4;
    }
    for (int64_t k0 = 0;; k0 += kc) {
      const int64_t k1 = std::min(k0 + kc, K8);
      const bool last = k1 == K8;
      const float* wp;   // column k of weight row j at wp[j * ldw + k]
      if constexpr (std::is_same_v<T, float>) {
        wp = src;
      } else {
        widen_block(src, K, k0, last ? K : k1, wide, ldw);
        wp = wide - k0;
      }
      // blocks of 3 rows (4 left as 2 + 2 measured slower than 3 + 1: 2 rows hold only 8 accumulators)
      for (int64_t m = 0; m < M;) {
        const int64_t mb = std::min<int64_t>(3, M - m);
        const float* xr = p.xf + m * K;
        const T* pf = m == 0 ? next : nullptr;
        float* pm = part + m * 32;
        if (mb == 3)
          block<3>(xr, K, wp, ldw, k0, k1, last, k0 == 0, pm, pf);
        else if (mb == 2)
          block<2>(xr, K, wp, ldw, k0, k1, last, k0 == 0, pm, pf);
        else
          block<1>(xr, K, wp, ldw, k0, k1, last, k0 == 0, pm, pf);
        m += mb;
      }
      if (last) break;
    }
    alignas(16) float bias[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (p.bias_kind != kNone)
      for (int j = 0; j < 4; ++j) bias[j] = load_kind(p.bias, p.bias_kind, n0 + j);
    const __m128 b = _mm_load_ps(bias);
    for (int64_t i = 0; i < M; ++i) {
      const float* q = part + i * 32;   // lane j of the horizontal-add tree: the total of pair (i, j)
      const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(_mm256_loadu_ps(q), _mm256_loadu_ps(q + 8)),
                                      _mm256_hadd_ps(_mm256_loadu_ps(q + 16), _mm256_loadu_ps(q + 24)));
      const __m128 v = _mm_add_ps(_mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)), b);
      if (p.out_kind == kBf16) {
        const __m128i u = _mm_castps_si128(v);
        const __m128i odd = _mm_and_si128(_mm_srli_epi32(u, 16), _mm_set1_epi32(1));
        __m128i r = _mm_srli_epi32(_mm_add_epi32(u, _mm_add_epi32(odd, _mm_set1_epi32(0x7FFF))), 16);
        r = _mm_blendv_epi8(r, _mm_set1_epi32(0x7FC0), _mm_castps_si128(_mm_cmpunord_ps(v, v)));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(p.out) + i * p.N + n0),
                         _mm_packus_epi32(r, r));
      } else {
        _mm_storeu_ps(static_cast<float*>(p.out) + i * p.N + n0, v);
      }
    }
  }
};

// Packed bf16 weights (packed_bf16.h) on AVX2: each half block of 32 weights unpacked in registers (two table
// lookups, two bit-selects, two byte interleaves) and widened as the bf16 tile widens (shift / mask), met by
// x in fp32 permuted to that order (packed_x_position_avx2); escapes unpack as +0 and are added after the sum.
template <int MB, int NB>
void tile_bf16_packed_avx2(const Problem& p, int64_t m0, int64_t n0, float* res) {
  static_assert(NB == 1, "one weight row per pass");
  const int64_t K = p.K;
  const PackedBf16& pk = *p.packed;
  const uint8_t* sm = pk.sm + n0 * K;
  const uint8_t* codes = pk.codes + n0 * K / 2;
  __m128i hi, lo;
  packed_tables128(pk.base[n0], hi, lo);
  const __m256i thi = _mm256_broadcastsi128_si256(hi), tlo = _mm256_broadcastsi128_si256(lo);
  const __m256i m0f = _mm256_set1_epi8(0x0F);
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  const float* xr[MB];
#pragma GCC unroll 8
  for (int i = 0; i < MB; ++i) xr[i] = p.xf + (m0 + i) * K;
  __m256 acc[MB][2];
#pragma GCC unroll 8
  for (int i = 0; i < MB; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 64) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + k / 2));
#pragma GCC unroll 2
    for (int half = 0; half < 2; ++half) {
      __m256i wl, wh;
      unpack32(_mm256_and_si256(half ? _mm256_srli_epi16(v, 4) : v, m0f), sm + k + 32 * half, thi, tlo, wl, wh);
      const __m256 f[4] = {_mm256_castsi256_ps(_mm256_slli_epi32(wl, 16)),
                           _mm256_castsi256_ps(_mm256_and_si256(wl, high)),
                           _mm256_castsi256_ps(_mm256_slli_epi32(wh, 16)),
                           _mm256_castsi256_ps(_mm256_and_si256(wh, high))};
#pragma GCC unroll 8
      for (int i = 0; i < MB; ++i) {
        const float* x = xr[i] + k + 32 * half;
#pragma GCC unroll 4
        for (int t = 0; t < 4; ++t) acc[i][t & 1] = _mm256_fmadd_ps(_mm256_loadu_ps(x + 8 * t), f[t], acc[i][t & 1]);
      }
    }
  }
  for (int i = 0; i < MB; ++i) res[i] = hsum256(_mm256_add_ps(acc[i][0], acc[i][1]));
  for (int64_t e = pk.esc_ptr[n0]; e < pk.esc_ptr[n0 + 1]; ++e) {
    const float w = bf16_to_f32(pk.esc_val[e]);
    const int64_t at = packed_x_position_avx2(pk.esc_col[e]);
    for (int i = 0; i < MB; ++i) res[i] += w * xr[i][at];
  }
}

// int4, one weight row: per 32 columns 16 bytes, low nibbles = columns 0-15, high = 16-31; x in fp32 (plain
// order). Per group, acc = sum q*x, then res += scale * acc + (zero - 8 * scale) * sum(x over the group).
template <int MB, int NB>
void tile_int4_avx2(const Problem& p, int64_t m0, int64_t n0, float* res) {
  static_assert(NB == 1, "int4 tiles take one weight row");
  const int64_t K = p.K, G = K / p.group;
  const uint8_t* w = p.w4 + n0 * (K / 2);
  const uint16_t* sz = p.sz + n0 * G * 2;
  const __m128i nibble = _mm_set1_epi8(0x0F);
  __m256 total[MB];
  float extra[MB];
  for (int i = 0; i < MB; ++i) {
    total[i] = _mm256_setzero_ps();
    extra[i] = 0.0f;
  }
  for (int64_t g = 0; g < G; ++g) {
    // four accumulator chains per activation row (one per 8 columns of a block): no FMA waits on another
    __m256 a0[MB], a1[MB], a2[MB], a3[MB];
    for (int i = 0; i < MB; ++i) a0[i] = a1[i] = a2[i] = a3[i] = _mm256_setzero_ps();
    for (int64_t k = g * p.group; k < (g + 1) * p.group; k += 32) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k / 2));
      const __m128i lo = _mm_and_si128(v, nibble), hi = _mm_and_si128(_mm_srli_epi16(v, 4), nibble);
      const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
      const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
      const __m256 w2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
      const __m256 w3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
#pragma GCC unroll 4
      for (int i = 0; i < MB; ++i) {
        const float* xr = p.xf + (m0 + i) * K + k;
        a0[i] = _mm256_fmadd_ps(_mm256_loadu_ps(xr), w0, a0[i]);
        a1[i] = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 8), w1, a1[i]);
        a2[i] = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 16), w2, a2[i]);
        a3[i] = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 24), w3, a3[i]);
      }
    }
    const float scale = bf16_to_f32(sz[2 * g]), zero = bf16_to_f32(sz[2 * g + 1]);
    const __m256 vs = _mm256_set1_ps(scale);
#pragma GCC unroll 4
    for (int i = 0; i < MB; ++i) {
      const __m256 acc = _mm256_add_ps(_mm256_add_ps(a0[i], a1[i]), _mm256_add_ps(a2[i], a3[i]));
      total[i] = _mm256_fmadd_ps(vs, acc, total[i]);
      extra[i] += (zero - 8.0f * scale) * p.xsum[(m0 + i) * G + g];
    }
  }
  for (int i = 0; i < MB; ++i) res[i] = hsum256(total[i]) + extra[i];
}


// ---- 8-bit activations (llama.cpp's q8_0 / q4_0 technique without VNNI) ------------------------------
// vpmaddubsw multiplies 32 unsigned bytes by 32 signed bytes and adds adjacent pairs into 16-bit lanes;
// vpmaddwd by ones adds adjacent 16-bit pairs into 32-bit lanes: 32 byte products per two instructions.

// int8 weights: one weight is signed, so its sign moves onto the activation (vpsignb) and its absolute
// value (<= 128) is the unsigned side: |w| * sign(w) x, pairs <= 2 * 128 * 127 < 2^15 (no saturation).
// x is quantized per block of 32 columns (int8, scale max|x| / 127: Problem::xq / xscale, the scale of
// block b repeated in 8 lanes at xscale[b * 8]); res = sum_b scale_b * sum_k xq * w (K % 32 tail scalar).
template <int MB, int NB>
void tile_int8_dot_avx2(const Problem& p, int64_t m0, int64_t n0, float* res) {
  const int64_t K = p.K, K32 = K & ~int64_t(31), nb = (K + 31) / 32;
  const int8_t* w[NB];
#pragma GCC unroll 4
  for (int j = 0; j < NB; ++j) w[j] = p.wq + (n0 + j) * K;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 total[MB][NB];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) total[i][j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K32; k += 32) {
    __m256i wv[NB], aw[NB];
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) {
      wv[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[j] + k));
      aw[j] = _mm256_sign_epi8(wv[j], wv[j]);   // |w| (as unsigned: -128 -> 128)
    }
#pragma GCC unroll 4
    for (int i = 0; i < MB; ++i) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.xq + (m0 + i) * K + k));
      const __m256 sc = _mm256_loadu_ps(p.xscale + ((m0 + i) * nb + k / 32) * 8);
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) {
        const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(aw[j], _mm256_sign_epi8(xv, wv[j])), ones);
        total[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), sc, total[i][j]);
      }
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) {
      float s = hsum256(total[i][j]);
      if (K32 < K) {
        const int8_t* xq = p.xq + (m0 + i) * K;
        int32_t t = 0;
        for (int64_t k = K32; k < K; ++k) t += static_cast<int32_t>(xq[k]) * w[j][k];
        s += static_cast<float>(t) * p.xscale[((m0 + i) * nb + K32 / 32) * 8];
      }
      res[i * NB + j] = s;
    }
}

// int4 weights: the codes q (0..15) are the unsigned side, x the signed one, pairs <= 2 * 15 * 127. One
// 16-byte load split by nibble is the 32 columns of a block in order (low nibbles 0-15, high 16-31). x is
// quantized per weight group (Problem::xq in natural order, xscale / xqsum per group); per group, as the
// VNNI tile: res += scale * sx * (sum q * xq - 8 * sum xq) + zero * sum x.
template <int MB, int NB>
void tile_int4_dot_avx2(const Problem& p, int64_t m0, int64_t n0, float* res) {
  static_assert(NB == 1, "int4 tiles take one weight row");
  const int64_t K = p.K, G = K / p.group;
  const uint8_t* w = p.w4 + n0 * (K / 2);
  const uint16_t* sz = p.sz + n0 * G * 2;
  const __m128i nibble = _mm_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 total[MB];
  float extra[MB];
  for (int i = 0; i < MB; ++i) {
    total[i] = _mm256_setzero_ps();
    extra[i] = 0.0f;
  }
  for (int64_t g = 0; g < G; ++g) {
    __m256i acc[MB];
    for (int i = 0; i < MB; ++i) acc[i] = _mm256_setzero_si256();
    for (int64_t k = g * p.group; k < (g + 1) * p.group; k += 32) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k / 2));
      const __m256i q = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), nibble), _mm_and_si128(v, nibble));
#pragma GCC unroll 4
      for (int i = 0; i < MB; ++i) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.xq + (m0 + i) * K + k));
        acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(_mm256_maddubs_epi16(q, xv), ones));
      }
    }
    const float scale = bf16_to_f32(sz[2 * g]), zero = bf16_to_f32(sz[2 * g + 1]);
#pragma GCC unroll 4
    for (int i = 0; i < MB; ++i) {
      const float sx = scale * p.xscale[(m0 + i) * G + g];
      total[i] = _mm256_fmadd_ps(_mm256_set1_ps(sx), _mm256_cvtepi32_ps(acc[i]), total[i]);
      extra[i] += zero * p.xsum[(m0 + i) * G + g] - 8.0f * sx * p.xqsum[(m0 + i) * G + g];
    }
  }
  for (int i = 0; i < MB; ++i) res[i] = hsum256(total[i]) + extra[i];
}

// int4, groups of a multiple of 64 columns, NB weight rows a pass: 64 columns (32 bytes of codes) a step. One
// 32-byte load split by nibble (one and, one shift and and) gives [block 0 columns 0-15 | block 1 columns 0-15]
// and [block 0 columns 16-31 | block 1 columns 16-31]; x is stored per 64 columns in that order (Problem::xq,
// span 64). The two vpmaddubsw results (each pair <= 2 * 15 * 127) are added in 16 bits (<= 7620) before one
// vpmaddwd. Per group, in vectors (no scalar work): the exact integer offset 8 * sum(xq) comes off lane 0,
// then total += scale * sx * dot and ztotal += zero * X / 8 in every lane (two accumulators: one dependent
// FMA per group each).
template <int MB, int NB>
void tile_int4_dot64_avx2(const Problem& p, int64_t m0, int64_t n0, float* res) {
  const int64_t K = p.K, G = p.groups;
  const Int4Rows<NB> rows(p, n0);
  const uint8_t* const* w = rows.w;
  const uint16_t* const* sz = rows.sz;
  const __m256i nibble = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m256 total[MB][NB], ztotal[MB][NB];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) total[i][j] = ztotal[i][j] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256i acc[MB][NB];
    for (int i = 0; i < MB; ++i)
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm256_setzero_si256();
    for (int64_t k = g * p.group; k < (g + 1) * p.group; k += 64) {
      __m256i lo[NB], hi[NB];
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[j] + (k >> 1)));
        lo[j] = _mm256_and_si256(v, nibble);
        hi[j] = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
      }
#pragma GCC unroll 4
      for (int i = 0; i < MB; ++i) {
        const int8_t* xq = p.xq + (m0 + i) * K + k;
        const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq));
        const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 32));
#pragma GCC unroll 4
        for (int j = 0; j < NB; ++j) {
          const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo[j], x0), _mm256_maddubs_epi16(hi[j], x1));
          acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(pairs, ones));
        }
      }
    }
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) {
      int32_t pair;   // (scale, zero) bf16: the scale in the low half, the zero in the high one
      std::memcpy(&pair, sz[j] + 2 * g, sizeof pair);
      const __m256i both = _mm256_set1_epi32(pair);
      const __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(both, 16));
      const __m256 zero = _mm256_castsi256_ps(_mm256_and_si256(both, high));
#pragma GCC unroll 4
      for (int i = 0; i < MB; ++i) {
        const int64_t mg = (m0 + i) * G + g;
        const __m256i off = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.xoff + mg * 8));
        const __m256 dot = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(acc[i][j], off)),
                                         _mm256_broadcast_ss(p.xg + 2 * mg));
        total[i][j] = _mm256_fmadd_ps(scale, dot, total[i][j]);
        ztotal[i][j] = _mm256_fmadd_ps(zero, _mm256_broadcast_ss(p.xg + 2 * mg + 1), ztotal[i][j]);
      }
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) res[i * NB + j] = hsum256(_mm256_add_ps(total[i][j], ztotal[i][j]));
}

// x (M, K), bf16 (xb) or fp32 (xf), quantized to int8 per block of `block` columns (the last block may be
// shorter) for the integer kernels: scale = max|x| / 127 (1 for an all-zero block), q = round-half-even(x *
// (1 / scale)) in fp32, as llama.cpp's q8_0. 8 columns a step (cvtps rounds half to even under the default
// MXCSR, as std::nearbyint), the rest scalar; one pass over x for the maximum and the sum, one to quantize.
// xq (M, K): natural order with span 0, else within each span of columns (a multiple of 64, blocks aligned to
// it) the columns 0-15 of each 32-column block, then their columns 16-31 (the int4 tiles' nibble order).
// Per block: `copies` copies of the scale at scale[(m * blocks + b) * copies]; qsum (optional): the exact sum
// of the block's q; xsum (optional): the sum of its x.
void quantize_x(const uint16_t* xb, const float* xf, int64_t M, int64_t K, int64_t block, int64_t copies,
                int64_t span, int8_t* xq, float* scale, float* qsum, float* xsum) {
  const int64_t blocks = (K + block - 1) / block;
  auto load8 = [&](int64_t i) __attribute__((always_inline)) {
    if (!xb) return _mm256_loadu_ps(xf + i);
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(xb + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  };
  auto at = [&](int64_t i) { return xb ? bf16_to_f32(xb[i]) : xf[i]; };
  auto pos = [&](int64_t k) {   // where column k goes
    if (span == 0) return k;
    const int64_t c = k % span, t = c % 32;
    return k - c + (t < 16 ? c / 32 * 16 + t : span / 2 + c / 32 * 16 + t - 16);
  };
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t k0 = m * K + b * block, k1 = m * K + std::min(K, (b + 1) * block);
      const int64_t k8 = k0 + (k1 - k0) / 8 * 8;
      __m256 vmax = _mm256_setzero_ps(), vsum = _mm256_setzero_ps();
      for (int64_t k = k0; k < k8; k += 8) {
        const __m256 v = load8(k);
        vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, v));
        vsum = _mm256_add_ps(vsum, v);
      }
      __m128 h = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
      h = _mm_max_ps(h, _mm_movehl_ps(h, h));
      float amax = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
      float total_x = hsum256(vsum);
      for (int64_t k = k8; k < k1; ++k) {
        amax = std::max(amax, std::fabs(at(k)));
        total_x += at(k);
      }
      const float sx = amax > 0.0f ? amax / 127.0f : 1.0f, inv = 1.0f / sx;
      const __m256 vinv = _mm256_set1_ps(inv);
      __m256i isum = _mm256_setzero_si256();
      const int64_t base = m * K;
      for (int64_t k = k0; k < k8; k += 8) {
        const __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(load8(k), vinv));
        isum = _mm256_add_epi32(isum, q);
        const __m128i q16 = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(xq + base + pos(k - base)), _mm_packs_epi16(q16, q16));
      }
      __m128i t = _mm_add_epi32(_mm256_castsi256_si128(isum), _mm256_extracti128_si256(isum, 1));
      t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
      int32_t total = _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1)));
      for (int64_t k = k8; k < k1; ++k) {
        const int8_t v = static_cast<int8_t>(std::nearbyint(at(k) * inv));
        xq[base + pos(k - base)] = v;
        total += v;
      }
      for (int64_t c = 0; c < copies; ++c) scale[(m * blocks + b) * copies + c] = sx;
      if (qsum) qsum[m * blocks + b] = static_cast<float>(total);
      if (xsum) xsum[m * blocks + b] = total_x;
    }
}

}  // namespace
#pragma GCC pop_options

// ---------------------------------------------------------------------------------------------------
// AVX-512F: 16-wide, the same even/odd trick on 32-element blocks (x blocks stored as [16 evens, 16 odds]).
#pragma GCC push_options
#pragma GCC target("avx512f")
namespace {

// 32 columns of a weight row as two fp32 vectors (int8 and fp32: plain order; bf16: [evens, odds]).
inline void widen32(const int8_t* w, __m512& a, __m512& b) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  a = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(v)));
  b = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(v, 1)));
}
inline void widen32(const float* w, __m512& a, __m512& b) {
  a = _mm512_loadu_ps(w);
  b = _mm512_loadu_ps(w + 16);
}
inline void widen32(const uint16_t* w, __m512& a, __m512& b) {
  const __m512i v = _mm512_loadu_si512(w);
  a = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  b = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// The AVX2 stream tile 16-wide (32 columns a step); no software prefetch.
template <class T>
struct StreamAvx512 {
  template <int MB, int NB>
  static void tile(const Problem& p, int64_t m0, int64_t n0, float* res) {
    constexpr int U = unroll_for<MB, NB>();
    const int64_t K = p.K, K32 = K & ~int64_t(31);
    TILE_SETUP(T, weight_rows<T>(p), float, p.xf, K)
    __m512 acc[U][MB][NB];
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u)
#pragma GCC unroll 8
      for (int i = 0; i < MB; ++i)
#pragma GCC unroll 8
        for (int j = 0; j < NB; ++j) acc[u][i][j] = _mm512_setzero_ps();
    auto step = [&](int64_t k, int u) __attribute__((always_inline)) {
      __m512 wa[NB], wb[NB];
#pragma GCC unroll 8
      for (int j = 0; j < NB; ++j) widen32(wr[j] + k, wa[j], wb[j]);
#pragma GCC unroll 8
      for (int i = 0; i < MB; ++i) {
        const __m512 xa = _mm512_loadu_ps(xr[i] + k), xb = _mm512_loadu_ps(xr[i] + k + 16);
#pragma GCC unroll 8
        for (int j = 0; j < NB; ++j) {
          acc[u][i][j] = _mm512_fmadd_ps(xa, wa[j], acc[u][i][j]);
          acc[u][i][j] = _mm512_fmadd_ps(xb, wb[j], acc[u][i][j]);
        }
      }
    };
    int64_t k = 0;
    for (; k + 32 * U <= K32; k += 32 * U)
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) step(k + 32 * u, u);
    for (; k < K32; k += 32) step(k, 0);
    for (int i = 0; i < MB; ++i)
      for (int j = 0; j < NB; ++j) {
        __m512 a = acc[0][i][j];
        for (int u = 1; u < U; ++u) a = _mm512_add_ps(a, acc[u][i][j]);
        float s = _mm512_reduce_add_ps(a);
        for (int64_t t = K32; t < K; ++t) s += xr[i][t] * widen(wr[j][t]);
        res[i * NB + j] = s;
      }
  }
};

}  // namespace
#pragma GCC pop_options

// ---------------------------------------------------------------------------------------------------
// AVX-512 BF16: vdpbf16ps multiplies adjacent bf16 pairs and adds both products into one fp32 lane, so
// a weight row and the activation row (both in natural order) meet pair by pair with no conversion at
// all. The K tail is a masked 16-bit load (AVX-512BW), zeros contributing nothing.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16")
namespace {

template <int MB, int NB>
void tile_bf16_dp(const Problem& p, int64_t m0, int64_t n0, float* res) {
  constexpr int U = unroll_for<MB, NB>();
  const int64_t K = p.K, K32 = K & ~int64_t(31);
  TILE_SETUP(uint16_t, p.w, uint16_t, p.xb, p.ldx)
  __m512 acc[U][MB][NB];
#pragma GCC unroll 4
  for (int u = 0; u < U; ++u)
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i)
#pragma GCC unroll 8
      for (int j = 0; j < NB; ++j) acc[u][i][j] = _mm512_setzero_ps();
  auto step = [&](int64_t k, int u, __mmask32 mask) __attribute__((always_inline)) {
    __m512bh wv[NB];
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) wv[j] = (__m512bh)_mm512_maskz_loadu_epi16(mask, wr[j] + k);
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, xr[i] + k);
#pragma GCC unroll 8
      for (int j = 0; j < NB; ++j) acc[u][i][j] = _mm512_dpbf16_ps(acc[u][i][j], xv, wv[j]);
    }
  };
  const __mmask32 all = ~__mmask32(0);   // an all-ones mask: the compiler emits plain loads
  int64_t k = 0;
  for (; k + 32 * U <= K32; k += 32 * U)
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) step(k + 32 * u, u, all);
  for (; k < K32; k += 32) step(k, 0, all);
  if (K32 < K) step(K32, 0, static_cast<__mmask32>((uint64_t(1) << (K - K32)) - 1));
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) {
      __m512 a = acc[0][i][j];
      for (int u = 1; u < U; ++u) a = _mm512_add_ps(a, acc[u][i][j]);
      res[i * NB + j] = _mm512_reduce_add_ps(a);
    }
}


// Packed bf16 weights (packed_bf16.h) straight from their 12-bit form: each 64 weights unpacked in registers
// and met by the activations permuted the same way (p.xb holds permute_x_packed's copy); escapes read as exponent
// 0, which vdpbf16ps takes as zero, and their true values times the activations are added to the row's sum.
template <int MB, int NB>
void tile_bf16_packed(const Problem& p, int64_t m0, int64_t n0, float* res) {
  static_assert(NB == 1, "one weight row per pass");
  constexpr int U = MB == 1 ? 2 : 1;
  const int64_t K = p.K;
  const PackedRow r = packed_row(*p.packed, n0);
  const uint16_t* xr[MB];
#pragma GCC unroll 8
  for (int i = 0; i < MB; ++i) xr[i] = p.xb + (m0 + i) * p.ldx;
  __m512 acc[U][2][MB];
#pragma GCC unroll 4
  for (int u = 0; u < U; ++u)
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) acc[u][0][i] = acc[u][1][i] = _mm512_setzero_ps();
  auto step = [&](int64_t k, int u) __attribute__((always_inline)) {
    __m512i wl, wh;
    unpack64(r, k, wl, wh);
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) {
      acc[u][0][i] = _mm512_dpbf16_ps(acc[u][0][i], (__m512bh)_mm512_loadu_si512(xr[i] + k), (__m512bh)wl);
      acc[u][1][i] = _mm512_dpbf16_ps(acc[u][1][i], (__m512bh)_mm512_loadu_si512(xr[i] + k + 32), (__m512bh)wh);
    }
  };
  int64_t k = 0;
  for (; k + 64 * U <= K; k += 64 * U)
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) step(k + 64 * u, u);
  for (; k < K; k += 64) step(k, 0);
  for (int i = 0; i < MB; ++i) {
    __m512 a = _mm512_add_ps(acc[0][0][i], acc[0][1][i]);
    for (int u = 1; u < U; ++u) a = _mm512_add_ps(a, _mm512_add_ps(acc[u][0][i], acc[u][1][i]));
    res[i] = _mm512_reduce_add_ps(a);
  }
  const PackedBf16& pk = *p.packed;
  for (int64_t e = pk.esc_ptr[n0]; e < pk.esc_ptr[n0 + 1]; ++e) {
    const float w = bf16_to_f32(pk.esc_val[e]);
    const int64_t at = packed_x_position(pk.esc_col[e]);
    for (int i = 0; i < MB; ++i) res[i] += w * bf16_to_f32(xr[i][at]);
  }
}


// int4 with vdpbf16ps: a code q becomes the bf16 number 128 + q (bits 0x4300 | q, exact), so one dot-product
// instruction takes 32 columns: acc = sum (128 + q) * x = 128 X + sum q*x, and per group
// res += scale * acc + (zero - 136 * scale) * X, X = sum of x over the group.
template <int MB, int NB>
void tile_int4_dp(const Problem& p, int64_t m0, int64_t n0, float* res) {
  static_assert(NB == 1, "int4 tiles take one weight row");
  const int64_t K = p.K, G = K / p.group, blocks = p.group / 32;
  const uint8_t* w = p.w4 + n0 * (K / 2);
  const uint16_t* sz = p.sz + n0 * G * 2;
  const __m128i nibble = _mm_set1_epi8(0x0F);
  const __m512i base = _mm512_set1_epi16(0x4300);
  auto unpack = [&](int64_t k) __attribute__((always_inline)) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k / 2));
    const __m128i lo = _mm_and_si128(v, nibble), hi = _mm_and_si128(_mm_srli_epi16(v, 4), nibble);
    const __m256i bytes = _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);
    return (__m512bh)_mm512_or_si512(_mm512_cvtepu8_epi16(bytes), base);
  };
  auto xat = [&](int i, int64_t k) __attribute__((always_inline)) {
    return (__m512bh)_mm512_loadu_si512(p.xb + (m0 + i) * p.ldx + k);
  };
  __m512 total[MB];
  float extra[MB];
  for (int i = 0; i < MB; ++i) {
    total[i] = _mm512_setzero_ps();
    extra[i] = 0.0f;
  }
  for (int64_t g = 0; g < G; ++g) {
    // two accumulator chains per activation row (the dot-product latency), named, so they stay in registers
    __m512 a0[MB], a1[MB];
    for (int i = 0; i < MB; ++i) a0[i] = a1[i] = _mm512_setzero_ps();
    int64_t k = g * p.group;
    const int64_t k_end = k + p.group;
    for (; k + 64 <= k_end; k += 64) {
      const __m512bh w0 = unpack(k), w1 = unpack(k + 32);
#pragma GCC unroll 4
      for (int i = 0; i < MB; ++i) {
        a0[i] = _mm512_dpbf16_ps(a0[i], xat(i, k), w0);
        a1[i] = _mm512_dpbf16_ps(a1[i], xat(i, k + 32), w1);
      }
    }
    if (k < k_end) {   // a group of 32 columns
      const __m512bh w0 = unpack(k);
#pragma GCC unroll 4
      for (int i = 0; i < MB; ++i) a0[i] = _mm512_dpbf16_ps(a0[i], xat(i, k), w0);
    }
    const float scale = bf16_to_f32(sz[2 * g]), zero = bf16_to_f32(sz[2 * g + 1]);
    const __m512 vs = _mm512_set1_ps(scale);
#pragma GCC unroll 4
    for (int i = 0; i < MB; ++i) {
      total[i] = _mm512_fmadd_ps(vs, _mm512_add_ps(a0[i], a1[i]), total[i]);
      extra[i] += (zero - 136.0f * scale) * p.xsum[(m0 + i) * G + g];
    }
  }
  (void)blocks;
  for (int i = 0; i < MB; ++i) res[i] = _mm512_reduce_add_ps(total[i]) + extra[i];
}

}  // namespace
#pragma GCC pop_options


// int4 x int8 with VNNI (vpdpbusd: 64 unsigned-by-signed byte products per instruction), as llama.cpp's
// q4_0 path does: x is quantized to int8 once per call, one scale per weight group (|x| max / 127). With
// groups of a multiple of 128 columns one 64-byte load of codes, split by nibble (and; shift and and), meets
// x stored per 128 columns as [the 4 blocks' columns 0-15, the 4 blocks' columns 16-31] in two vpdpbusd;
// else 64 columns a step as the AVX2 tile. Per group as the AVX2 tile (the offset 8 * sum(xq) taken off
// exactly in integers, scales in vectors, two fp32 accumulators). NB weight rows a pass.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni")
namespace {

template <int MB, int NB>
void tile_int4_vnni(const Problem& p, int64_t m0, int64_t n0, float* res) {
  const int64_t K = p.K, G = p.groups;
  const bool wide = p.group % 128 == 0;   // x laid out per 128 columns (else per 64)
  const Int4Rows<NB> rows(p, n0);
  const uint8_t* const* w = rows.w;
  const uint16_t* const* sz = rows.sz;
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  __m512 total[MB][NB], ztotal[MB][NB];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) total[i][j] = ztotal[i][j] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512i a0[MB][NB], a1[MB][NB];   // two chains per pair (the dot-product latency)
    for (int i = 0; i < MB; ++i)
      for (int j = 0; j < NB; ++j) a0[i][j] = a1[i][j] = _mm512_setzero_si512();
    const int64_t k_end = (g + 1) * p.group;
    int64_t k = g * p.group;
    if (wide) {
      for (; k < k_end; k += 128) {   // 64 bytes of codes: [low nibbles of 4 blocks], [high nibbles]
        __m512i lo[NB], hi[NB];
#pragma GCC unroll 4
        for (int j = 0; j < NB; ++j) {
          const __m512i v = _mm512_loadu_si512(w[j] + k / 2);
          lo[j] = _mm512_and_si512(v, nibble);
          hi[j] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
        }
#pragma GCC unroll 4
        for (int i = 0; i < MB; ++i) {
          const __m512i x0 = _mm512_loadu_si512(p.xq + (m0 + i) * K + k);
          const __m512i x1 = _mm512_loadu_si512(p.xq + (m0 + i) * K + k + 64);
#pragma GCC unroll 4
          for (int j = 0; j < NB; ++j) {
            a0[i][j] = _mm512_dpbusd_epi32(a0[i][j], lo[j], x0);
            a1[i][j] = _mm512_dpbusd_epi32(a1[i][j], hi[j], x1);
          }
        }
      }
    } else {
      for (; k < k_end; k += 64) {   // 32 bytes of codes: [low nibbles of 2 blocks | high nibbles]
        __m512i wv[NB];
#pragma GCC unroll 4
        for (int j = 0; j < NB; ++j) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[j] + k / 2));
          const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(v), _mm256_srli_epi16(v, 4), 1);
          wv[j] = _mm512_and_si512(both, nibble);
        }
#pragma GCC unroll 4
        for (int i = 0; i < MB; ++i) {
          const __m512i x0 = _mm512_loadu_si512(p.xq + (m0 + i) * K + k);
#pragma GCC unroll 4
          for (int j = 0; j < NB; ++j) a0[i][j] = _mm512_dpbusd_epi32(a0[i][j], wv[j], x0);
        }
      }
    }
#pragma GCC unroll 4
    for (int i = 0; i < MB; ++i) {   // per activation row its scale, sum share and code offset
      const int64_t mg = (m0 + i) * G + g;
      const __m512 sx = _mm512_set1_ps(p.xg[2 * mg]), share = _mm512_set1_ps(p.xg[2 * mg + 1]);
      const __m512i off = _mm512_loadu_si512(p.xoff + mg * 16);
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) {
        const __m512i acc = _mm512_sub_epi32(_mm512_add_epi32(a0[i][j], a1[i][j]), off);
        const __m512 dot = _mm512_mul_ps(_mm512_cvtepi32_ps(acc), sx);
        total[i][j] = _mm512_fmadd_ps(_mm512_set1_ps(bf16_to_f32(sz[j][2 * g])), dot, total[i][j]);
        ztotal[i][j] = _mm512_fmadd_ps(_mm512_set1_ps(bf16_to_f32(sz[j][2 * g + 1])), share, ztotal[i][j]);
      }
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) res[i * NB + j] = _mm512_reduce_add_ps(_mm512_add_ps(total[i][j], ztotal[i][j]));
}


// int8 weights x int8 activations with VNNI: vpdpbusd takes 64 unsigned-by-signed byte products per
// instruction, with no 16-bit intermediate. The sign of w moves onto x (a masked negation), |w| is the
// unsigned side. Per 64 columns the 16 int32 lanes hold two blocks of 32 (lanes 0-7 and 8-15), scaled
// by the two block scales (Problem::xscale, 8 copies each) before the fp32 accumulation. Same
// quantization as the AVX2 tile, so both paths give the same sums.
template <int MB, int NB>
void tile_int8_vnni(const Problem& p, int64_t m0, int64_t n0, float* res) {
  const int64_t K = p.K, K64 = K & ~int64_t(63), K32 = K & ~int64_t(31), nb = (K + 31) / 32;
  const int8_t* w[NB];
#pragma GCC unroll 4
  for (int j = 0; j < NB; ++j) w[j] = p.wq + (n0 + j) * K;
  __m512 total[MB][NB];
  __m256 rest[MB][NB];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) {
      total[i][j] = _mm512_setzero_ps();
      rest[i][j] = _mm256_setzero_ps();
    }
  for (int64_t k = 0; k < K64; k += 64) {
    __m512i aw[NB];
    __mmask64 neg[NB];
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) {
      const __m512i wv = _mm512_loadu_si512(w[j] + k);
      aw[j] = _mm512_abs_epi8(wv);            // -128 -> 0x80 = 128 unsigned: still exact
      neg[j] = _mm512_movepi8_mask(wv);
    }
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) {
      const __m512i xv = _mm512_loadu_si512(p.xq + (m0 + i) * K + k);
      const __m512 sc = _mm512_loadu_ps(p.xscale + ((m0 + i) * nb + k / 32) * 8);
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) {
        const __m512i sx = _mm512_mask_sub_epi8(xv, neg[j], _mm512_setzero_si512(), xv);
        const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), aw[j], sx);
        total[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), sc, total[i][j]);
      }
    }
  }
  if (K64 < K32) {   // one block of 32 left
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[j] + K64));
      const __m256i aw = _mm256_abs_epi8(wv);
#pragma GCC unroll 8
      for (int i = 0; i < MB; ++i) {
        const __m256i xv = _mm256_sign_epi8(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.xq + (m0 + i) * K + K64)), wv);
        const __m256i dot = _mm256_dpbusd_epi32(_mm256_setzero_si256(), aw, xv);
        const __m256 sc = _mm256_loadu_ps(p.xscale + ((m0 + i) * nb + K64 / 32) * 8);
        rest[i][j] = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(dot), sc), rest[i][j]);   // (no FMA in this target)
      }
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) {
      const __m256 r = rest[i][j];
      __m128 h = _mm_add_ps(_mm256_castps256_ps128(r), _mm256_extractf128_ps(r, 1));
      h = _mm_add_ps(h, _mm_movehl_ps(h, h));
      h = _mm_add_ss(h, _mm_movehdup_ps(h));
      float s = _mm512_reduce_add_ps(total[i][j]) + _mm_cvtss_f32(h);
      if (K32 < K) {
        const int8_t* xq = p.xq + (m0 + i) * K;
        int32_t t = 0;
        for (int64_t k = K32; k < K; ++k) t += static_cast<int32_t>(xq[k]) * w[j][k];
        s += static_cast<float>(t) * p.xscale[((m0 + i) * nb + K32 / 32) * 8];
      }
      res[i * NB + j] = s;
    }
}

}  // namespace
#pragma GCC pop_options

#undef TILE_SETUP

// ---------------------------------------------------------------------------------------------------
// AVX-512 BF16, several activation rows (M >= 5, batched decode): weight tiles outside, every activation row inside. A
// tile of NB weight rows (a few KiB) is read from DRAM once, by the first block of MB activation rows, and from L1 by
// the others; the activations (M x K bf16, 28 KiB at 16 x 896) stay in L1 / L2. Each (row, weight row) pair keeps a
// 16-lane vdpbf16ps accumulator (MB x NB <= 24 of them: with the NB weight vectors and one activation vector at most 29
// of the 32 registers), and the first 16 are summed together at the end of the tile by one transposing add tree (~45
// shuffles and adds for 16 results, against ~8 per result for a horizontal sum each), any 8 more by a second, shorter
// one, rounded and stored to the output from registers (epilogue_wide). While the first row block runs, a later tile's
// weights are prefetched, as the tiles' rows are one contiguous stretch: into L2, 2 tiles ahead (g_wide_prefetch). Into
// L1 (the first version: the next tile, _MM_HINT_T0) the prefetched lines evicted the activation rows the tile re-reads
// from L1 (16 x 896 bf16 = 28 KiB of Zen 4's 32 KiB); into L2 the products from DRAM ran 1.25-1.45x faster at 16 rows
// (qkv 96 -> 127, gate_up 92 -> 122, LM head 103 -> 148 GFLOP/s, one thread, RESULTS.md) and 1.6-2x at 5 rows; the
// distance (1-16 tiles) and T1 against T2 were within noise, 2 tiles ahead best at 5 and 8 rows.
namespace {
// (tiles ahead, level: 0 none, 1 L1, 2 L2); benchmarks set it (_set_wide_prefetch).
std::atomic<int64_t> g_wide_prefetch_tiles{2};
std::atomic<int64_t> g_wide_prefetch_level{2};
}  // namespace

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16")
namespace {

// The totals of 16 vectors in one: lane 4q + g is the sum of all lanes of v[4g + q] (the two base-4 digits
// of the index swap, `wide_slot`).
inline __m512 transpose_sum16(const __m512* v) {
  __m512 w[8], x[4];
#pragma GCC unroll 8
  for (int k = 0; k < 8; ++k)   // lanes 0-1: 8 partial sums of v[2k], lanes 2-3: of v[2k + 1]
    w[k] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0xEE));
#pragma GCC unroll 4
  for (int g = 0; g < 4; ++g)   // 128-bit lane q: 4 partial sums of v[4g + q]
    x[g] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * g], w[2 * g + 1], 0x88),
                         _mm512_shuffle_f32x4(w[2 * g], w[2 * g + 1], 0xDD));
  const __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(x[0], x[1]), _mm512_unpackhi_ps(x[0], x[1]));
  const __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(x[2], x[3]), _mm512_unpackhi_ps(x[2], x[3]));
  return _mm512_add_ps(_mm512_shuffle_ps(s01, s23, 0x44), _mm512_shuffle_ps(s01, s23, 0xEE));
}

// The accumulator slot whose total transpose_sum16 puts in lane l.
constexpr int wide_slot(int l) { return 4 * (l % 4) + l / 4; }

// The totals of 8 vectors in one 256-bit vector, lane r the sum of all lanes of v[r] (the 6 x 4 tile's last 8
// accumulators): the first two levels of transpose_sum16, then in each 128-bit lane q the sums of v[q] and
// v[4 + q] in its lanes 0 and 1, gathered by one permute.
inline __m256 transpose_sum8(const __m512* v) {
  __m512 w[4];
#pragma GCC unroll 4
  for (int k = 0; k < 4; ++k)   // lanes 0-1: 8 partial sums of v[2k], lanes 2-3: of v[2k + 1]
    w[k] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0xEE));
  // 128-bit lane q: 4 partial sums of v[q] (x0) and v[4 + q] (x1)
  const __m512 x0 = _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x88), _mm512_shuffle_f32x4(w[0], w[1], 0xDD));
  const __m512 x1 = _mm512_add_ps(_mm512_shuffle_f32x4(w[2], w[3], 0x88), _mm512_shuffle_f32x4(w[2], w[3], 0xDD));
  // lanes 4q .. 4q + 3: partial sums of v[q], v[4 + q], v[q], v[4 + q]; then their totals in 4q and 4q + 1
  __m512 s = _mm512_add_ps(_mm512_unpacklo_ps(x0, x1), _mm512_unpackhi_ps(x0, x1));
  s = _mm512_add_ps(s, _mm512_shuffle_ps(s, s, 0x4E));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 0, 0, 0, 0, 0, 0, 0, 0);
  return _mm512_castps512_ps256(_mm512_permutexvar_ps(order, s));
}

// The multi-row tile's epilogue, up to 16 results at once, straight from the register the reduction left them in:
// what `epilogue` (the generic driver's) does, bit for bit, for products without weight scales (bf16 weights):
// out[(m0 + i) * N + n0 + j] = sums[i * nb + j] + bias[n0 + j] (sum * 1 + bias there: the same value), rounded to
// bf16 as c10::BFloat16 rounds (to nearest even, NaN to 0x7FC0; done on the integer bits: vcvtneps2bf16 would
// flush denormals) or stored as fp32; one store of nb values per row. The scalar epilogue (a branch per kind and a
// conversion per value) took ~2 ns per result: 20-30% of the tile's time at 16 rows (RESULTS.md). Called by the
// tile itself: going through a buffer (the tile storing 16 + 8 results, the driver loading 16 from an offset)
// cost the 6 x 4 tile ~13% at K = 896 (a load the stores could not forward), 8 x 2 nothing measurable.
void epilogue_wide(const Problem& p, int64_t m0, int mb, int64_t n0, int nb, __m512 sums) {
  alignas(64) float bias[kMaxNB] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int j = 0; j < nb; ++j)
    if (p.bias_kind != kNone) bias[j] = load_kind(p.bias, p.bias_kind, n0 + j);
  // lane l = i * nb + j holds bias[j] = bias[l % nb] (nb 2, 3 or 4)
  const __m512i lane_j = nb == 3 ? _mm512_setr_epi32(0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0)
                                 : _mm512_and_si512(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13,
                                                                      14, 15), _mm512_set1_epi32(nb - 1));
  const __m512 b = _mm512_permutexvar_ps(lane_j, _mm512_castps128_ps512(_mm_load_ps(bias)));
  const __m512 v = _mm512_add_ps(sums, b);
  if (p.out_kind == kBf16) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    alignas(32) uint16_t h[16];
    _mm256_store_si256(reinterpret_cast<__m256i*>(h), _mm512_cvtepi32_epi16(r));
    uint16_t* out = static_cast<uint16_t*>(p.out) + m0 * p.N + n0;
    if (nb == 2)
      for (int i = 0; i < mb; ++i) std::memcpy(out + i * p.N, h + 2 * i, 2 * sizeof(uint16_t));
    else if (nb == 3)
      for (int i = 0; i < mb; ++i) std::memcpy(out + i * p.N, h + 3 * i, 3 * sizeof(uint16_t));
    else
      for (int i = 0; i < mb; ++i) std::memcpy(out + i * p.N, h + 4 * i, 4 * sizeof(uint16_t));
  } else {
    alignas(64) float f[16];
    _mm512_store_ps(f, v);
    float* out = static_cast<float*>(p.out) + m0 * p.N + n0;
    if (nb == 2)
      for (int i = 0; i < mb; ++i) std::memcpy(out + i * p.N, f + 2 * i, 2 * sizeof(float));
    else if (nb == 3)
      for (int i = 0; i < mb; ++i) std::memcpy(out + i * p.N, f + 3 * i, 3 * sizeof(float));
    else
      for (int i = 0; i < mb; ++i) std::memcpy(out + i * p.N, f + 4 * i, 4 * sizeof(float));
  }
}

template <int MB, int NB>
void tile_bf16_wide(const Problem& p, int64_t m0, int64_t n0, float* /* res: the tile stores to p.out */) {
  static_assert(MB * NB <= 24, "at most 24 accumulators");
  const int64_t K = p.K, K32 = K & ~int64_t(31);
  const uint16_t* wr[NB];
  const uint16_t* xr[MB];
#pragma GCC unroll 8
  for (int j = 0; j < NB; ++j) wr[j] = p.w + (n0 + j) * K;
#pragma GCC unroll 8
  for (int i = 0; i < MB; ++i) xr[i] = p.xb + (m0 + i) * p.ldx;
  // a later tile's weights, each of its rows at the column the tile is at, from one pointer (a prefetch past the
  // end is harmless). Walking the tile's rows as the one contiguous stretch they are, NB lines a step, measured
  // slower from DRAM (`down` at 8 rows: 105 against 140 GFLOP/s, one thread; 16 rows 150 / 159).
  const char* next = reinterpret_cast<const char*>(
      p.w + (n0 + NB * g_wide_prefetch_tiles.load(std::memory_order_relaxed)) * K);
  const int64_t level = g_wide_prefetch_level.load(std::memory_order_relaxed);
  const bool first = m0 == 0 && level > 0;
  __m512 acc[MB][NB];
#pragma GCC unroll 8
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_ps();
  auto step = [&](int64_t k, __mmask32 mask) __attribute__((always_inline)) {
    __m512bh wv[NB];
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) wv[j] = (__m512bh)_mm512_maskz_loadu_epi16(mask, wr[j] + k);
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, xr[i] + k);
#pragma GCC unroll 8
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv, wv[j]);
    }
  };
  const __mmask32 all = ~__mmask32(0);
  int64_t k = 0;
  if (first && level == 2) {
    for (; k < K32; k += 32, next += 64) {
#pragma GCC unroll 8
      for (int j = 0; j < NB; ++j) _mm_prefetch(next + 2 * K * j, _MM_HINT_T1);
      step(k, all);
    }
  } else if (first) {
    for (; k < K32; k += 32, next += 64) {
#pragma GCC unroll 8
      for (int j = 0; j < NB; ++j) _mm_prefetch(next + 2 * K * j, _MM_HINT_T0);
      step(k, all);
    }
  } else {
    for (; k < K32; k += 32) step(k, all);
  }
  if (K32 < K) step(K32, static_cast<__mmask32>((uint64_t(1) << (K - K32)) - 1));
  constexpr int A = MB * NB, kRows = 16 / NB;   // the rows whose results fit one 16-lane vector
  __m512 v[16];
#pragma GCC unroll 16
  for (int l = 0; l < 16; ++l) v[wide_slot(l)] = l < A ? acc[l / NB][l % NB] : _mm512_setzero_ps();
  const __m512 first16 = transpose_sum16(v);
  epilogue_wide(p, m0, std::min(MB, kRows), n0, NB, first16);
  if constexpr (A > 16) {   // results 16 .. 23, then rows kRows .. MB - 1 (lanes kRows * NB on of both vectors)
#pragma GCC unroll 8
    for (int l = 0; l < 8; ++l) v[l] = 16 + l < A ? acc[(16 + l) / NB][(16 + l) % NB] : _mm512_setzero_ps();
    const __m512 next8 = _mm512_castps256_ps512(transpose_sum8(v));
    const __m512i from = _mm512_add_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32(kRows * NB));
    epilogue_wide(p, m0 + kRows, MB - kRows, n0, NB, _mm512_permutex2var_ps(first16, from, next8));
  }
}

}  // namespace
#pragma GCC pop_options

// ---------------------------------------------------------------------------------------------------
// Generic driver (no ISA-specific code below this line).
namespace {

#define ONE4(F) {F<1, 1>, F<2, 1>, F<3, 1>, F<4, 1>, nullptr, nullptr, nullptr, nullptr}, 4
#define ONE8(F) {F<1, 1>, F<2, 1>, F<3, 1>, F<4, 1>, F<5, 1>, F<6, 1>, F<7, 1>, F<8, 1>}, 8
#define MANY2(F) {F<1, 4>, F<2, 4>, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr}, 2, 4
#define MANY4(F) {F<1, 4>, F<2, 4>, F<3, 4>, F<4, 4>, nullptr, nullptr, nullptr, nullptr}, 4, 4
#define MANY42(F) {F<1, 2>, F<2, 2>, F<3, 2>, F<4, 2>, nullptr, nullptr, nullptr, nullptr}, 4, 2
#define MANY22(F) {F<1, 2>, F<2, 2>, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr}, 2, 2
#define MANY14(F) {F<1, 4>, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr}, 1, 4
#define NONE(F) {nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr}, 0, 0
// A product's kernels for 1, 2 and 4 weight rows per pass (Rows): with 1, one-row tiles up to the L1 limit,
// then the ONE-way multi-row tiles; with 2 or 4, TWO / FOUR-row tiles at every M.
#define ROWS(F, ONE, MANY1, TWO, FOUR) {Kernel{ONE(F), MANY1(F)}, Kernel{ONE(F), TWO(F), true}, Kernel{ONE(F), FOUR(F), true}}

using Rows = Kernel[3];
// AVX2 has 16 vector registers: 4 activation rows x 2 weight rows for the multi-row stream tiles (8
// accumulators, 4 converted weights, 2 activations: each converted weight serves 4 rows; 16 rows, 1 thread, CPU
// time: qkv 47 -> 69, gate_up 37 -> 46, down 45 -> 50 GFLOP/s against 2 x 4); AVX-512 has 32. (bf16 and fp32
// weights on AVX2 take the panel tiles instead where those run: avx2_kernel.)
const Rows kBf16Avx2 = ROWS(StreamAvx2<uint16_t>::tile, ONE4, MANY42, MANY42, MANY2);
const Rows kF32Avx2 = ROWS(StreamAvx2<float>::tile, ONE4, MANY42, MANY42, MANY2);
const Rows kInt8Avx2 = ROWS(StreamAvx2<int8_t>::tile, ONE4, MANY42, MANY42, MANY2);
const Rows kBf16Avx512 = ROWS(StreamAvx512<uint16_t>::tile, ONE8, MANY4, MANY42, MANY4);
const Rows kF32Avx512 = ROWS(StreamAvx512<float>::tile, ONE8, MANY4, MANY42, MANY4);
const Rows kInt8Avx512 = ROWS(StreamAvx512<int8_t>::tile, ONE8, MANY4, MANY42, MANY4);
const Rows kBf16Dp = ROWS(tile_bf16_dp, ONE8, MANY4, MANY42, MANY4);
// int8 with 8-bit activations: multi-row tiles too, once the int8 activations outgrow L1 (x_elem_bytes 1)
const Rows kInt8DotAvx2 = ROWS(tile_int8_dot_avx2, ONE4, MANY42, MANY42, MANY2);
const Rows kInt8Vnni = ROWS(tile_int8_vnni, ONE8, MANY4, MANY42, MANY4);
// int4: one-row tiles (the exact-activation ones only those); the integer tiles also 2 and 4 rows per pass
const Kernel kBf16Packed{ONE8(tile_bf16_packed), NONE(_)};
const Kernel kBf16PackedAvx2{ONE4(tile_bf16_packed_avx2), NONE(_)};
const Kernel kInt4Avx2{ONE4(tile_int4_avx2), NONE(_)};
const Kernel kInt4Dp{ONE4(tile_int4_dp), NONE(_)};
const Kernel kInt4DotAvx2{ONE4(tile_int4_dot_avx2), NONE(_)};
const Rows kInt4Dot64Avx2 = ROWS(tile_int4_dot64_avx2, ONE4, NONE, MANY22, MANY14);
const Rows kInt4Vnni = ROWS(tile_int4_vnni, ONE4, NONE, MANY42, MANY2);
// AVX2 from g_panel_rows activation rows: the panel tiles (PanelAvx2), the one-row stream tiles for the rest
const Kernel kBf16PanelAvx2{ONE4(StreamAvx2<uint16_t>::tile), NONE(_), false, false, &PanelAvx2<uint16_t>::tile};
const Kernel kF32PanelAvx2{ONE4(StreamAvx2<float>::tile), NONE(_), false, false, &PanelAvx2<float>::tile};
#undef NONE
#undef ROWS

// Weight rows per pass (1, 2 or 4) of each product, by the weights' format; _set_rows_per_pass (benchmarks,
// tests) changes them. 1 everywhere unless a measurement (RESULTS.md) chose otherwise.
enum Format { kFmtBf16 = 0, kFmtF32 = 1, kFmtInt8 = 2, kFmtInt4 = 3, kFormats = 4 };
std::atomic<int64_t> g_rows_per_pass[kFormats] = {1, 1, 1, 1};

const Kernel& with_rows(const Rows& kernels, Format format) {
  const int64_t rows = g_rows_per_pass[format].load(std::memory_order_relaxed);
  return kernels[rows == 4 ? 2 : rows == 2 ? 1 : 0];
}
// bf16 on AVX-512 BF16 from g_wide_rows activation rows: tile_bf16_wide, 8 x 2, 6 x 4 or 8 x 3 (rows x weight rows;
// 4 x 4 stays selectable). Measured (1 thread, weights in cache, GFLOP/s at M = 5 / 8 / 16; RESULTS.md): K = 896:
// 8 x 2 107 / 135 / 147, 4 x 4 106 / 126 / 135, torch's oneDNN 71 / 95 / 135, the 4 x 4 kBf16Dp tiles 68 / 75 / 71;
// K = 4864: 4 x 4 103 / 145 / 173, 8 x 2 100 / 127 / 148, oneDNN 73 / 98 / 137. So 8 x 2 up to K = 2048. Beyond,
// where a tile's weight rows (4 x 9.5 KiB at K = 4864) do not stay in L1 and every block of rows reads them from
// L2 again, the tiles with 24 accumulators (seventh session, RESULTS.md; `down` from DRAM, GFLOP/s at M = 8 / 12 /
// 16): 6 x 4 107 / 154 / 172, 8 x 3 143 / 112 / 164, 4 x 4 106 / 123 / 142: 8 x 3 where it takes the rows in one
// block (7 and 8 rows), 6 x 4 otherwise. At K = 896 (the activations nearly fill L1) they measured no better
// than 8 x 2 (gate_up 16 rows: 8 x 2 165, 8 x 3 155, 6 x 4 147; LM head 182 / 176 / 158).
#define MANY82(F) {F<1, 2>, F<2, 2>, F<3, 2>, F<4, 2>, F<5, 2>, F<6, 2>, F<7, 2>, F<8, 2>}, 8, 2
#define MANY64(F) {F<1, 4>, F<2, 4>, F<3, 4>, F<4, 4>, F<5, 4>, F<6, 4>, nullptr, nullptr}, 6, 4
#define MANY83(F) {F<1, 3>, F<2, 3>, F<3, 3>, F<4, 3>, F<5, 3>, F<6, 3>, F<7, 3>, F<8, 3>}, 8, 3
const Kernel kBf16Wide44{ONE8(tile_bf16_dp), MANY4(tile_bf16_wide), false, true};
const Kernel kBf16Wide82{ONE8(tile_bf16_dp), MANY82(tile_bf16_wide), false, true};
const Kernel kBf16Wide64{ONE8(tile_bf16_dp), MANY64(tile_bf16_wide), false, true};
const Kernel kBf16Wide83{ONE8(tile_bf16_dp), MANY83(tile_bf16_wide), false, true};
#undef MANY83
#undef MANY64
#undef MANY82
std::atomic<int64_t> g_wide_rows{5};    // 0: never (the kBf16Dp tiles at every M)
// 44: 4 rows x 4 weight rows, 82: 8 x 2, 64: 6 x 4, 83: 8 x 3, 0: the default (as measured)
std::atomic<int64_t> g_wide_shape{0};
// AVX2 bf16 / fp32 weights: the panel tiles from this many rows (0: never), and from 2 where the activations
// outgrow L1 (the stream tiles' multi-row case). 1 thread, GFLOP/s, stream / panel (RESULTS.md): 2 rows K = 896
// 41 / 34, K = 4864 (DRAM) 22 / 37; 3 rows K = 896 36 / 48, K = 4864 31 / 52.
std::atomic<int64_t> g_panel_rows{3};

constexpr int kRowAlign = 4;                  // chunk sizes are a multiple of this many rows
std::atomic<int64_t> g_chunk_bytes{128 * 1024};   // weights per work item taken from the shared counter
// packed bf16: the fused tiles up to this many rows (their row tiles: 8 on AVX-512 BF16, 4 on AVX2); from DRAM
// they beat the unpacked-rows path up to 8 rows (gate_up at 8 rows, one thread: 1.75 vs 2.2 ms; bf16 itself 2.0)
int64_t packed_fused_rows(int64_t path) { return path == kAvx512Bf16 ? 8 : 4; }
// int8 / int4 products with x quantized to int8 (integer dot products); tests: off gives the fp32 / bf16 paths
std::atomic<bool> g_int8_x{true};
constexpr int64_t kSerialBytes = 96 * 1024;   // below this, threads cost more than they bring
// With M > 1, one-row tiles are kept while the activations (M x K, as the tiles read them) fit in L1
// with room to spare; beyond that, 4-row tiles cut the activation traffic from L2 by 4.
std::atomic<int64_t> g_x_l1_bytes{24 * 1024};

inline void epilogue(const Problem& p, int64_t m0, int mb, int64_t n0, int nb, const float* res) {
  for (int j = 0; j < nb; ++j) {
    const int64_t n = n0 + j;
    const float s = p.scale_kind != kNone ? load_kind(p.scale, p.scale_kind, n) : 1.0f;
    const float b = p.bias_kind != kNone ? load_kind(p.bias, p.bias_kind, n) : 0.0f;
    for (int i = 0; i < mb; ++i) {
      const float v = res[i * nb + j] * s + b;
      const int64_t o = (m0 + i) * p.N + n;
      if (p.out_kind == kBf16)
        static_cast<c10::BFloat16*>(p.out)[o] = c10::BFloat16(v);  // round to nearest even, like torch
      else
        static_cast<float*>(p.out)[o] = v;
    }
  }
}

// Weight tiles outside, blocks of activation rows inside (kernels with weights_outside: tile_bf16_wide, which
// stores its results itself through epilogue_wide: bf16 weights, no scales).
// The M activation rows go in ceil(M / max_mb_many) blocks of sizes as even as can be (16 rows of the 6 x 4 tile:
// 6 + 5 + 5, not 6 + 6 + 4; 8 rows: 4 + 4, not 6 + 2), so no block runs with few accumulators.
void run_rows_wide(const Kernel& ker, const Problem& p, int64_t n_begin, int64_t n_end) {
  TORCH_CHECK(p.scale_kind == kNone, "internvl_kernels: the multi-row tile takes weights without scales");
  float res[kMaxMB * kMaxNB];
  const int64_t n_tiles_end = n_begin + (n_end - n_begin) / ker.nb_many * ker.nb_many;
  const int64_t blocks = (p.M + ker.max_mb_many - 1) / ker.max_mb_many;
  for (int64_t t = n_begin; t < n_tiles_end; t += ker.nb_many)
    for (int64_t m = 0, b = 0; m < p.M; ++b) {
      const int mb = static_cast<int>((p.M - m + blocks - b - 1) / (blocks - b));
      ker.many[mb - 1](p, m, t, nullptr);   // stores its results itself (epilogue_wide)
      m += mb;
    }
  for (int64_t n = n_tiles_end; n < n_end; ++n)
    for (int64_t m = 0; m < p.M; m += ker.max_mb_one) {
      const int mb = static_cast<int>(std::min<int64_t>(ker.max_mb_one, p.M - m));
      ker.one[mb - 1](p, m, n, res);
      epilogue(p, m, mb, n, 1, res);
    }
}

// 4 weight rows at a time against all M activation rows (kernels with a panel tile), the last N % 4 rows on
// the one-row tiles.
void run_rows_panel(const Kernel& ker, const Problem& p, int64_t n_begin, int64_t n_end) {
  float res[kMaxMB * kMaxNB];
  const int64_t n_tiles_end = n_begin + (n_end - n_begin) / 4 * 4;
  for (int64_t t = n_begin; t < n_tiles_end; t += 4) ker.panel(p, t);
  for (int64_t n = n_tiles_end; n < n_end; ++n)
    for (int64_t m = 0; m < p.M; m += ker.max_mb_one) {
      const int mb = static_cast<int>(std::min<int64_t>(ker.max_mb_one, p.M - m));
      ker.one[mb - 1](p, m, n, res);
      epilogue(p, m, mb, n, 1, res);
    }
}

// The AVX2 kernel of bf16 (or fp32) weights for M activation rows of K fp32 columns: the panel tiles from
// g_panel_rows rows (or 2 whose activations outgrow L1), else (or where 2 or 4 weight rows per pass were asked
// for the format) the stream tiles.
const Kernel& avx2_kernel(const Kernel& panel, const Rows& stream, Format format, int64_t M, int64_t K) {
  const int64_t from = g_panel_rows.load(std::memory_order_relaxed);
  const bool one_row = g_rows_per_pass[format].load(std::memory_order_relaxed) == 1;
  const bool big_x = M > 1 && M * K * 4 > g_x_l1_bytes.load(std::memory_order_relaxed);
  return one_row && from > 0 && (M >= from || big_x) ? panel : with_rows(stream, format);
}

// The bf16 kernel of the AVX-512 BF16 path for M activation rows: the multi-row tile from g_wide_rows rows,
// else the kBf16Dp tiles with the weight rows per pass chosen for bf16.
const Kernel& bf16_dp_kernel(int64_t M, int64_t K) {
  const int64_t from = g_wide_rows.load(std::memory_order_relaxed);
  if (from <= 0 || M < from) return with_rows(kBf16Dp, kFmtBf16);
  const int64_t shape = g_wide_shape.load(std::memory_order_relaxed);
  if (shape == 0) return K <= 2048 ? kBf16Wide82 : M == 7 || M == 8 ? kBf16Wide83 : kBf16Wide64;
  return shape == 82 ? kBf16Wide82 : shape == 64 ? kBf16Wide64 : shape == 83 ? kBf16Wide83 : kBf16Wide44;
}

void run_rows(const Kernel& ker, const Problem& p, int64_t n_begin, int64_t n_end) {
  if (ker.weights_outside) return run_rows_wide(ker, p, n_begin, n_end);
  if (ker.panel && p.M > 1 && p.scale_kind == kNone) return run_rows_panel(ker, p, n_begin, n_end);
  float res[kMaxMB * kMaxNB];
  int64_t n = n_begin;
  if (ker.nb_many > 0 &&
      (ker.many_always || (p.M > 1 && p.M * p.K * p.x_elem_bytes > g_x_l1_bytes.load(std::memory_order_relaxed)))) {
    // activation blocks outside, weight tiles inside: one block of rows (a few KiB) stays in L1 while the
    // chunk's weights (~128 KiB: read from DRAM once, by the first block) come from L2 for the others. The
    // other order re-read all M activation rows from L2 for every weight tile, which at 16 rows moved as
    // many bytes from L2 as the FMAs take cycles.
    const int64_t n_tiles_end = n_begin + (n_end - n_begin) / ker.nb_many * ker.nb_many;
    for (int64_t m = 0; m < p.M; m += ker.max_mb_many) {
      const int mb = static_cast<int>(std::min<int64_t>(ker.max_mb_many, p.M - m));
      for (int64_t t = n_begin; t < n_tiles_end; t += ker.nb_many) {
        ker.many[mb - 1](p, m, t, res);
        epilogue(p, m, mb, t, ker.nb_many, res);
      }
    }
    n = n_tiles_end;
  }
  for (; n < n_end; ++n)
    for (int64_t m = 0; m < p.M; m += ker.max_mb_one) {
      const int mb = static_cast<int>(std::min<int64_t>(ker.max_mb_one, p.M - m));
      ker.one[mb - 1](p, m, n, res);
      epilogue(p, m, mb, n, 1, res);
    }
}

// Bytes of unpacked bf16 rows a thread holds at once for packed weights: L1-sized, so the tiles read them
// back from L1 right after they were written.
constexpr int64_t kUnpackBytes = 16 * 1024;

// Output rows n_begin..n_end-1: the tiles straight on the weights, or, for packed bf16 weights, on each
// group of rows unpacked into this thread's scratch buffer just before (the same bf16 values, bit for bit).
void run_chunk(const Kernel& ker, const Problem& p, int64_t n_begin, int64_t n_end) {
  if (!p.unpacked) return run_rows(ker, p, n_begin, n_end);
  thread_local std::vector<uint16_t> scratch;
  const int64_t group = std::max<int64_t>(kRowAlign, kUnpackBytes / (2 * p.K) / kRowAlign * kRowAlign);
  if (scratch.size() < static_cast<size_t>(group * p.K)) scratch.resize(static_cast<size_t>(group * p.K));
  Problem q = p;
  for (int64_t n = n_begin; n < n_end; n += group) {
    const int64_t stop = std::min(n_end, n + group);
    unpack_bf16_rows(*p.packed, n, stop, scratch.data(), p.path);
    // the tiles address weight row r at w + r * K: shift the pointer so row n lands on the scratch's start
    q.w = scratch.data() - n * p.K;
    run_rows(ker, q, n, stop);
  }
}

// weight_bits: bits per stored weight (32, 16, 12 (packed bf16), 8 or 4).
void run(const Kernel& ker, const Problem& p, int64_t weight_bits) {
  if (p.M == 0 || p.N == 0) return;
  const int64_t row_bytes = std::max<int64_t>(1, p.K * weight_bits / 8);
  const int64_t chunk_bytes = g_chunk_bytes.load(std::memory_order_relaxed);
  const int64_t rows = std::max<int64_t>(kRowAlign, (chunk_bytes / row_bytes) / kRowAlign * kRowAlign);
  const int64_t chunks = (p.N + rows - 1) / rows;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), chunks);
  if (threads <= 1 || p.N * row_bytes < kSerialBytes || at::in_parallel_region()) {
    for (int64_t c = 0; c < chunks; ++c) run_chunk(ker, p, c * rows, std::min(p.N, (c + 1) * rows));   // L2-sized
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (;;) {
      const int64_t c = next.fetch_add(1, std::memory_order_relaxed);
      if (c >= chunks) break;
      run_chunk(ker, p, c * rows, std::min(p.N, (c + 1) * rows));
    }
  });
}

// Which integer dot-product kernel an int8 / int4 product runs with 8-bit activations: VNNI where the CPU
// has it and the path is an AVX-512 one, else AVX2 (every host with a native path has it); none when
// switched off (then the fp32 / bf16 kernels run on exact activations).
enum IntDot { kIntOff, kIntAvx2, kIntVnni };

IntDot int_dot(int64_t path) {
  static const bool vnni = __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw") &&
                           __builtin_cpu_supports("avx512vl");
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (!g_int8_x.load(std::memory_order_relaxed)) return kIntOff;
  if (path != kAvx2 && vnni) return kIntVnni;
  return avx2 ? kIntAvx2 : kIntOff;
}

// fp32 copy of bf16 rows x (M, K); with block > 0, each full block of `block` elements is stored as
// [even elements, odd elements] (the layout the AVX2 / AVX-512F bf16 tiles expect); the tail stays in order.
std::vector<float> prepare_x_bf16(const uint16_t* x, int64_t M, int64_t K, int64_t block) {
  std::vector<float> xf(static_cast<size_t>(M * K));
  for (int64_t m = 0; m < M; ++m) {
    float* dst = xf.data() + m * K;
    const uint16_t* src = x + m * K;
    int64_t k = 0;
    if (block > 0) {
      const int64_t half = block / 2;
      for (; k + block <= K; k += block)
        for (int64_t t = 0; t < half; ++t) {
          dst[k + t] = bf16_to_f32(src[k + 2 * t]);
          dst[k + half + t] = bf16_to_f32(src[k + 2 * t + 1]);
        }
    }
    for (; k < K; ++k) dst[k] = bf16_to_f32(src[k]);
  }
  return xf;
}

// out = (x . q^T) * scale + bias for int8 weights, x bf16 (xb) or fp32 (xf): with 8-bit activations (per
// 32 columns) on the integer kernels where they run, else fp32 activations on the conversion kernels.
void int8_product(Problem& p, const uint16_t* xb, const float* xf, int64_t path) {
  const IntDot dot = int_dot(path);
  if (dot != kIntOff) {
    const int64_t blocks = (p.K + 31) / 32;
    std::vector<int8_t> xq(static_cast<size_t>(p.M * p.K));
    std::vector<float> xscale(static_cast<size_t>(p.M * blocks * 8));
    quantize_x(xb, xf, p.M, p.K, 32, 8, 0, xq.data(), xscale.data(), nullptr, nullptr);
    p.xq = xq.data();
    p.xscale = xscale.data();
    p.x_elem_bytes = 1;
    run(with_rows(dot == kIntVnni ? kInt8Vnni : kInt8DotAvx2, kFmtInt8), p, 8);
    return;
  }
  std::vector<float> copy;
  if (xb) {
    copy = prepare_x_bf16(xb, p.M, p.K, 0);
    xf = copy.data();
  }
  p.xf = xf;
  run(with_rows(path == kAvx2 ? kInt8Avx2 : kInt8Avx512, kFmtInt8), p, 8);
}

int kind_of(const at::Tensor& t, const char* what) {
  if (t.scalar_type() == at::kBFloat16) return kBf16;
  TORCH_CHECK(t.scalar_type() == at::kFloat, what, " must be bfloat16 or float32, got ", t.scalar_type());
  return kF32;
}

void check_common(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                  Problem& p) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "internvl_kernels: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "internvl_kernels: x must be (M, K) and w (N, K)");
  TORCH_CHECK(x.size(1) == w.size(1), "internvl_kernels: x has K=", x.size(1), " but w has K=", w.size(1));
  TORCH_CHECK(w.is_contiguous(), "internvl_kernels: w must be contiguous");
  p.M = x.size(0);
  p.N = w.size(0);
  p.K = w.size(1);
  p.ldx = p.K;
  const BiasArg b = checked_bias(bias, p.N);
  p.bias = b.data;
  p.bias_kind = b.kind;
}

at::Tensor linear_bf16(const at::Tensor& x_in, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                       int64_t path) {
  const at::Tensor x = x_in.contiguous();
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16,
              "linear_bf16: x and w must be bfloat16");
  Problem p;
  check_common(x, w, bias, p);
  TORCH_CHECK(path == kAvx2 || path == kAvx512 || path == kAvx512Bf16, "linear_bf16: unknown path ", path);
  at::Tensor out = at::empty({p.M, p.N}, x.options());
  matvec_bf16(static_cast<const uint16_t*>(x.data_ptr()), p.M, p.K, static_cast<const uint16_t*>(w.data_ptr()), p.N,
              p.bias, p.bias_kind, out.data_ptr(), kBf16, path);
  return out;
}

// fp32 x and weights: the avx2 path on AVX2 hosts, the AVX-512F tile on both AVX-512 paths (no 16-bit
// arithmetic is involved, so avx512bf16 has nothing more to offer here).
at::Tensor linear_f32(const at::Tensor& x_in, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                      int64_t path) {
  const at::Tensor x = x_in.contiguous();
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "linear_f32: x and w must be float32");
  TORCH_CHECK(path == kAvx2 || path == kAvx512 || path == kAvx512Bf16, "linear_f32: unknown path ", path);
  Problem p;
  check_common(x, w, bias, p);
  at::Tensor out = at::empty({p.M, p.N}, x.options());
  matvec_f32(x.data_ptr<float>(), p.M, p.K, w.data_ptr<float>(), p.N, p.bias, p.bias_kind, out.data_ptr(), kF32,
             path);
  return out;
}

at::Tensor linear_int8(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& scales,
                       const std::optional<at::Tensor>& bias, int64_t path) {
  const at::Tensor x = x_in.contiguous();
  TORCH_CHECK(w.scalar_type() == at::kChar, "linear_int8: w must be int8");
  Problem p;
  check_common(x, w, bias, p);
  p.out_kind = kind_of(x, "linear_int8: x");
  TORCH_CHECK(scales.dim() == 1 && scales.size(0) == p.N && scales.is_contiguous(),
              "linear_int8: scales must be a contiguous (N,) tensor");
  p.scale_kind = kind_of(scales, "linear_int8: scales");
  p.scale = scales.data_ptr();
  at::Tensor out = at::empty({p.M, p.N}, x.options());
  p.wq = w.data_ptr<int8_t>();
  p.out = out.data_ptr();
  TORCH_CHECK(path == kAvx2 || path == kAvx512 || path == kAvx512Bf16, "linear_int8: unknown path ", path);
  const bool is_bf16 = x.scalar_type() == at::kBFloat16;
  int8_product(p, is_bf16 ? static_cast<const uint16_t*>(x.data_ptr()) : nullptr,
               is_bf16 ? nullptr : x.data_ptr<float>(), path);
  return out;
}

}  // namespace

namespace internvl_kernels {

BiasArg checked_bias(const std::optional<at::Tensor>& bias, int64_t N) {
  if (!bias.has_value() || !bias->defined()) return BiasArg{};
  TORCH_CHECK(bias->device().is_cpu() && bias->dim() == 1 && bias->size(0) == N && bias->is_contiguous(),
              "internvl_kernels: bias must be a contiguous (N,) CPU tensor");
  return BiasArg{bias->data_ptr(), kind_of(*bias, "bias")};
}

namespace {

// The fields every product shares: shapes, activation rows K apart, bias and output.
Problem problem_for(int64_t M, int64_t N, int64_t K, const void* bias, int bias_kind, void* out, int out_kind) {
  Problem p;
  p.M = M;
  p.N = N;
  p.K = K;
  p.ldx = K;
  p.bias = bias;
  p.bias_kind = bias ? bias_kind : kNone;
  p.out = out;
  p.out_kind = out_kind;
  return p;
}

}  // namespace

namespace {

// The bf16 tiles of `path` over p's weights (stored bf16, or packed rows unpacked per chunk: p.unpacked), x bf16.
void run_bf16_tiles(Problem& p, const uint16_t* x, int64_t path, int64_t weight_bits) {
  if (path == kAvx512Bf16) {
    p.xb = x;
    p.x_elem_bytes = 2;
    run(bf16_dp_kernel(p.M, p.K), p, weight_bits);
    return;
  }
  const std::vector<float> xf = prepare_x_bf16(x, p.M, p.K, path == kAvx512 ? 32 : 16);
  p.xf = xf.data();
  const Kernel& ker = path == kAvx512 ? with_rows(kBf16Avx512, kFmtBf16)
                                      : avx2_kernel(kBf16PanelAvx2, kBf16Avx2, kFmtBf16, p.M, p.K);
  run(ker, p, weight_bits);
}

}  // namespace

void matvec_bf16(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w, int64_t N, const void* bias,
                 int bias_kind, void* out, int out_kind, int64_t path) {
  Problem p = problem_for(M, N, K, bias, bias_kind, out, out_kind);
  p.w = w;
  run_bf16_tiles(p, x, path, 16);
}

void matvec_bf16_packed(const uint16_t* x, int64_t M, const PackedBf16& w, const void* bias, int bias_kind, void* out,
                        int out_kind, int64_t path) {
  Problem p = problem_for(M, w.N, w.K, bias, bias_kind, out, out_kind);
  p.packed = &w;
  p.path = path;
  if (M > packed_fused_rows(path)) {   // each thread's rows unpacked into scratch, then the bf16 tiles of the path
    p.unpacked = true;
    run_bf16_tiles(p, x, path, 12);
    return;
  }
  // the fused tiles: weights unpacked in registers, activations permuted to their order once
  if (path == kAvx512Bf16) {
    std::vector<uint16_t> xp(static_cast<size_t>(M * w.K));
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < w.K; ++k) xp[m * w.K + packed_x_position(k)] = x[m * w.K + k];
    p.xb = xp.data();
    p.x_elem_bytes = 2;
    run(kBf16Packed, p, 12);
    return;
  }
  std::vector<float> xf(static_cast<size_t>(M * w.K));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < w.K; ++k) xf[m * w.K + packed_x_position_avx2(k)] = bf16_to_f32(x[m * w.K + k]);
  p.xf = xf.data();
  run(kBf16PackedAvx2, p, 12);
}

void matvec_f32(const float* x, int64_t M, int64_t K, const float* w, int64_t N, const void* bias, int bias_kind,
                void* out, int out_kind, int64_t path) {
  Problem p = problem_for(M, N, K, bias, bias_kind, out, out_kind);
  p.wf = w;
  p.xf = x;
  p.x_elem_bytes = 4;
  run(path == kAvx2 ? avx2_kernel(kF32PanelAvx2, kF32Avx2, kFmtF32, M, K) : with_rows(kF32Avx512, kFmtF32), p, 32);
}

void matvec_int8(const uint16_t* x, int64_t M, int64_t K, const int8_t* w, const void* scale, int scale_kind,
                 int64_t N, const void* bias, int bias_kind, void* out, int out_kind, int64_t path) {
  Problem p = problem_for(M, N, K, bias, bias_kind, out, out_kind);
  p.wq = w;
  p.scale = scale;
  p.scale_kind = scale_kind;
  int8_product(p, x, nullptr, path);
}

void matvec_int4(const uint16_t* x, int64_t M, int64_t K, const uint8_t* w4, const uint16_t* sz, int64_t group,
                 int64_t N, const void* bias, int bias_kind, void* out, int out_kind, int64_t path) {
  Problem p = problem_for(M, N, K, bias, bias_kind, out, out_kind);
  p.w4 = w4;
  p.sz = sz;
  p.group = group;
  p.groups = K / group;
  const int64_t G = K / group;
  std::vector<float> xsum(static_cast<size_t>(M * G), 0.0f), xf;
  p.xsum = xsum.data();
  const IntDot dot = int_dot(path);
  if (dot != kIntOff) {
    // VNNI, or AVX2 64 columns a step, for groups of a multiple of 64; else the AVX2 32-column tile
    const bool wide = group % 64 == 0;
    const int64_t span = !wide ? 0 : dot == kIntVnni && group % 128 == 0 ? 128 : 64;
    const int64_t lanes = dot == kIntVnni ? 16 : 8;
    std::vector<int8_t> xq(static_cast<size_t>(M * K));
    std::vector<float> xscale(static_cast<size_t>(M * G)), xqsum(static_cast<size_t>(M * G));
    std::vector<float> xg(static_cast<size_t>(M * G * 2));
    std::vector<int32_t> xoff(static_cast<size_t>(M * G * lanes), 0);
    quantize_x(x, nullptr, M, K, group, 1, span, xq.data(), xscale.data(), xqsum.data(), xsum.data());
    p.xq = xq.data();
    p.xscale = xscale.data();
    p.xqsum = xqsum.data();
    if (!wide) {
      run(kInt4DotAvx2, p, 4);
      return;
    }
    for (int64_t mg = 0; mg < M * G; ++mg) {
      xg[mg * 2] = xscale[mg];
      xg[mg * 2 + 1] = xsum[mg] / static_cast<float>(lanes);   // exact: a power of two
      xoff[mg * lanes] = 8 * static_cast<int32_t>(xqsum[mg]);
    }
    p.xg = xg.data();
    p.xoff = xoff.data();
    run(with_rows(dot == kIntVnni ? kInt4Vnni : kInt4Dot64Avx2, kFmtInt4), p, 4);
    return;
  }
  for (int64_t m = 0; m < M; ++m)   // exact activations: only the sums of x per group
    for (int64_t g = 0; g < G; ++g) {
      float s = 0.0f;
      for (int64_t k = g * group; k < (g + 1) * group; ++k) s += bf16_to_f32(x[m * K + k]);
      xsum[m * G + g] = s;
    }
  if (path == kAvx512Bf16) {
    p.xb = x;
    p.x_elem_bytes = 2;
    run(kInt4Dp, p, 4);
  } else {
    xf = prepare_x_bf16(x, M, K, 0);
    p.xf = xf.data();
    run(kInt4Avx2, p, 4);
  }
}

}  // namespace internvl_kernels

namespace {

at::Tensor linear_int4(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& sz, int64_t group,
                       const std::optional<at::Tensor>& bias, int64_t path) {
  const at::Tensor x = x_in.contiguous();
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && sz.device().is_cpu(), "linear_int4: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "linear_int4: x must be (M, K) bfloat16");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(group > 0 && group % 32 == 0 && K % group == 0, "linear_int4: group ", group,
              " must be a multiple of 32 dividing K=", K);
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2 && w.size(1) * 2 == K && w.is_contiguous(),
              "linear_int4: w must be a contiguous (N, K/2) uint8 tensor");
  const int64_t N = w.size(0);
  TORCH_CHECK(sz.scalar_type() == at::kBFloat16 && sz.dim() == 3 && sz.size(0) == N && sz.size(1) == K / group &&
                  sz.size(2) == 2 && sz.is_contiguous(),
              "linear_int4: scales_and_zeros must be a contiguous (N, K/group, 2) bfloat16 tensor");
  TORCH_CHECK(path == kAvx2 || path == kAvx512 || path == kAvx512Bf16, "linear_int4: unknown path ", path);
  const BiasArg b = checked_bias(bias, N);
  at::Tensor out = at::empty({M, N}, x.options());
  matvec_int4(static_cast<const uint16_t*>(x.data_ptr()), M, K, w.data_ptr<uint8_t>(),
              static_cast<const uint16_t*>(sz.data_ptr()), group, N, b.data, b.kind, out.data_ptr(), kBf16, path);
  return out;
}

// The weight of an int4 layer, W = (q - 8) * scale + zero, as bf16 or fp32 (N, K): prefill dequantizes a
// layer at a time and runs one GEMM. Plain C++ (the compiler vectorises it); rows shared over threads.
at::Tensor dequantize_int4(const at::Tensor& w, const at::Tensor& sz, int64_t group, at::ScalarType dtype) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kByte && w.dim() == 2 && w.is_contiguous(),
              "dequantize_int4: w must be a contiguous (N, K/2) uint8 CPU tensor");
  const int64_t N = w.size(0), K = w.size(1) * 2;
  TORCH_CHECK(group > 0 && group % 32 == 0 && K % group == 0, "dequantize_int4: group ", group,
              " must be a multiple of 32 dividing K=", K);
  TORCH_CHECK(sz.scalar_type() == at::kBFloat16 && sz.dim() == 3 && sz.size(0) == N && sz.size(1) == K / group &&
                  sz.size(2) == 2 && sz.is_contiguous(),
              "dequantize_int4: scales_and_zeros must be a contiguous (N, K/group, 2) bfloat16 tensor");
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kFloat, "dequantize_int4: dtype must be bfloat16 or float32");
  at::Tensor out = at::empty({N, K}, w.options().dtype(dtype));
  const uint8_t* q = w.data_ptr<uint8_t>();
  const uint16_t* s = static_cast<const uint16_t*>(sz.data_ptr());
  const bool to_bf16 = dtype == at::kBFloat16;
  void* o = out.data_ptr();
  const int64_t G = K / group;
  at::parallel_for(0, N, std::max<int64_t>(1, 65536 / K), [&](int64_t begin, int64_t end) {
    float row[32];
    for (int64_t n = begin; n < end; ++n)
      for (int64_t b = 0; b < K / 32; ++b) {
        const int64_t g = b * 32 / group;
        const float scale = bf16_to_f32(s[(n * G + g) * 2]), zero = bf16_to_f32(s[(n * G + g) * 2 + 1]);
        const uint8_t* src = q + n * (K / 2) + b * 16;
        for (int j = 0; j < 16; ++j) {
          row[j] = static_cast<float>((src[j] & 0x0F) - 8) * scale + zero;
          row[16 + j] = static_cast<float>((src[j] >> 4) - 8) * scale + zero;
        }
        const int64_t off = n * K + b * 32;
        if (to_bf16)
          for (int j = 0; j < 32; ++j) static_cast<c10::BFloat16*>(o)[off + j] = c10::BFloat16(row[j]);
        else
          std::memcpy(static_cast<float*>(o) + off, row, sizeof row);
      }
  });
  return out;
}

}  // namespace

// Benchmarks only: set the activation size (bytes) up to which M > 1 keeps one-row tiles; returns the old.
int64_t set_x_l1_bytes(int64_t bytes) { return g_x_l1_bytes.exchange(bytes); }

// Tests and benchmarks: int8 / int4 products on integer dot products with 8-bit activations (default on;
// off: exact activations on the fp32 / bf16 kernels); returns the old value.
bool set_int8_activations(bool on) { return g_int8_x.exchange(on); }

// Benchmarks only: set the AVX2 bf16 tile's software prefetch distance in bytes (0: none); returns the old value.
int64_t set_prefetch_bytes(int64_t bytes) { return g_prefetch_bytes.exchange(std::max<int64_t>(bytes, 0)); }

// Benchmarks and tests: weight rows (1, 2 or 4) the products over `weights` ("bf16", "f32", "int8" or "int4")
// read side by side per pass; returns the old value. (The one-row-only int4 kernels, on exact activations or
// groups of an odd multiple of 32 columns, ignore it.)
int64_t set_rows_per_pass(std::string weights, int64_t rows) {
  static const char* const kNames[kFormats] = {"bf16", "f32", "int8", "int4"};
  TORCH_CHECK(rows == 1 || rows == 2 || rows == 4, "_set_rows_per_pass: 1, 2 or 4 rows, got ", rows);
  for (int f = 0; f < kFormats; ++f)
    if (weights == kNames[f]) return g_rows_per_pass[f].exchange(rows);
  TORCH_CHECK(false, "_set_rows_per_pass: weights must be bf16, f32, int8 or int4, got ", weights);
  return 0;
}

// Tests and benchmarks: the AVX-512 BF16 bf16 products take tile_bf16_wide from `rows` activation rows (0: never),
// in the shape `shape` (44: 4 rows x 4 weight rows, 82: 8 x 2, 64: 6 x 4, 0: the default); returns the old row count.
int64_t set_wide_bf16(int64_t rows, int64_t shape) {
  TORCH_CHECK(shape == 0 || shape == 44 || shape == 82 || shape == 64 || shape == 83,
              "_set_wide_bf16: shape 0, 44, 82, 64 or 83, got ",
              shape);
  g_wide_shape.store(shape);
  return g_wide_rows.exchange(std::max<int64_t>(rows, 0));
}

// Benchmarks: the multi-row bf16 tile's software prefetch, `tiles` tiles ahead into `level` (0: none, 1: L1,
// 2: L2); returns the old distance.
int64_t set_wide_prefetch(int64_t tiles, int64_t level) {
  TORCH_CHECK(tiles >= 1 && level >= 0 && level <= 2, "_set_wide_prefetch: tiles >= 1, level 0, 1 or 2");
  g_wide_prefetch_level.store(level);
  return g_wide_prefetch_tiles.exchange(tiles);
}

// Tests and benchmarks: the AVX2 bf16 / fp32 products take the panel tiles from `rows` activation rows (0: never),
// over K blocks of `kc` columns (rounded down to a multiple of 16; 0: unchanged); returns the old row count.
int64_t set_avx2_panel(int64_t rows, int64_t kc) {
  TORCH_CHECK(kc == 0 || kc >= 16, "_set_avx2_panel: kc 0 or at least 16, got ", kc);
  if (kc > 0) g_panel_kc.store(kc);
  return g_panel_rows.exchange(std::max<int64_t>(rows, 0));
}

// Benchmarks only: set the bytes of weights per work item; returns the old value.
int64_t set_chunk_bytes(int64_t bytes) { return g_chunk_bytes.exchange(std::max<int64_t>(bytes, 4096)); }

TORCH_LIBRARY(internvl_kernels, m) {
  m.def("_set_x_l1_bytes(int bytes) -> int", &set_x_l1_bytes);
  m.def("_set_chunk_bytes(int bytes) -> int", &set_chunk_bytes);
  m.def("_set_rows_per_pass(str weights, int rows) -> int", &set_rows_per_pass);
  m.def("_set_prefetch_bytes(int bytes) -> int", &set_prefetch_bytes);
  m.def("_set_wide_bf16(int rows, int shape) -> int", &set_wide_bf16);
  m.def("_set_wide_prefetch(int tiles, int level) -> int", &set_wide_prefetch);
  m.def("_set_int8_activations(bool on) -> bool", &set_int8_activations);
  m.def("_set_avx2_panel(int rows, int kc) -> int", &set_avx2_panel);
  m.def("linear_bf16(Tensor x, Tensor w, Tensor? bias, int path) -> Tensor");
  m.def("linear_f32(Tensor x, Tensor w, Tensor? bias, int path) -> Tensor");
  m.def("linear_int8(Tensor x, Tensor w, Tensor scales, Tensor? bias, int path) -> Tensor");
  m.def("linear_int4(Tensor x, Tensor w, Tensor scales_and_zeros, int group, Tensor? bias, int path) -> Tensor");
  m.def("dequantize_int4(Tensor w, Tensor scales_and_zeros, int group, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(internvl_kernels, CPU, m) {
  m.impl("linear_bf16", &linear_bf16);
  m.impl("linear_f32", &linear_f32);
  m.impl("linear_int8", &linear_int8);
  m.impl("linear_int4", &linear_int4);
  m.impl("dequantize_int4", &dequantize_int4);
}
