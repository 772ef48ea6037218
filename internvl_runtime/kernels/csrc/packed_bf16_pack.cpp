// Packing bf16 weights into the lossless 12-bit format (packed_bf16.cpp describes it), in two passes:
//
//   pack_bf16(w (N, K) bf16, path) -> blob                     both passes over every row
//   pack_bf16_begin(w, path) -> blob                           the plan alone (sm, codes and escapes unwritten)
//   pack_bf16_rows(w rows r0.., blob, r0, path)                the fill of those rows
//
// Plan: each row's window (the first with the most exponents: see plan_row) and escape count, so that the blob
// can be allocated at its exact size and its header, bases and escape offsets written. Fill: 64 weights a step in
// vector registers (AVX-512BW on the AVX-512 paths, AVX2 on the AVX2 one), each row's sign/mantissa bytes, codes
// and escapes (a mask, walked bit by bit where nonzero: escapes are rare) written in place. So each row is read
// twice (the second time from the caches where the weight fits them). The begin / rows split lets the loader fill
// in row chunks and drop each chunk's file pages once read (quantization/packed_bf16.py): a weight read from the
// checkpoint's mapping is resident whole only from its plan to its fill, beside its blob, one layer at a time.
// Every path writes the same bytes (tests/unit/test_packed_bf16_format.py: a numpy writing of the format, byte for
// byte, padding included).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <immintrin.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "gemv.h"
#include "packed_bf16.h"

using namespace internvl_kernels;

namespace {

// Rows a thread takes at a time (rows are independent; the grain only bounds the scheduling overhead).
inline int64_t row_grain(int64_t K) { return std::max<int64_t>(1, 32768 / K); }

// ------------------------------------------------------------------------------------------------- plan
// A row's window: the first b in 1..240 whose [b, b + 14] holds the most of its exponents in 1..254. A first pass
// in vector registers finds the lowest and highest of those exponents and counts the 255s (inf / NaN: always
// escapes). Where they span at most 15 values (normal rows: random normal ones up to K ~ 5000), the first window
// holding them all is the answer, max(1, hi - 14), and the 255s are the escapes. Else a second vector pass counts
// the top exponent's weights and those below the top window [hi - 14, hi]: where those below are fewer, no lower
// window can hold as many (it loses the top exponent's weights and gains at most those below), so the top window
// is the answer (a row with a few tiny outliers). Otherwise an exponent histogram of the row (four sub-histograms a
// weight apart, so that neighbouring weights of one exponent, the common case, do not wait on each other's
// increment) is searched over the windows that meet [lo, hi] only.

struct RowRange {
  int lo = 255, hi = 0;    // the lowest and highest exponent in 1..254 (lo > hi: none)
  int64_t specials = 0;    // weights of exponent 255
};

struct TopCounts {
  int64_t top = 0;         // weights of exponent hi
  int64_t below = 0;       // weights of exponent 1 .. hi - 15
};

// One ISA's vector passes over a row.
struct RowPasses {
  RowRange (*range)(const uint16_t* row, int64_t K);
  TopCounts (*top)(const uint16_t* row, int64_t K, int hi);
};

struct RowPlan {
  int base;
  int64_t escapes;
};

RowPlan plan_row(const uint16_t* row, int64_t K, const RowPasses& passes) {
  const RowRange r = passes.range(row, K);
  if (r.hi - r.lo <= 14) return RowPlan{std::max(1, r.hi - 14), r.specials};
  const TopCounts t = passes.top(row, K, r.hi);
  if (t.below < t.top) return RowPlan{r.hi - 14, t.below + r.specials};
  constexpr int kSub = 4;
  uint32_t sub[kSub][256];
  for (auto& h : sub) {
    std::memset(h + r.lo, 0, (r.hi - r.lo + 1) * sizeof(uint32_t));
    h[0] = h[255] = 0;
  }
  for (int64_t k = 0; k < K; k += kSub)   // K is a multiple of 64
    for (int j = 0; j < kSub; ++j) ++sub[j][(row[k + j] >> 7) & 0xFF];
  int64_t hist[256] = {};
  int64_t valid = 0;
  for (int e = r.lo; e <= r.hi; ++e) {
    for (const auto& h : sub) hist[e] += h[e];
    valid += hist[e];
  }
  const int first = std::max(1, r.lo - 14), last = std::min(240, r.hi);   // the windows that meet [lo, hi]
  int64_t window = 0;
  for (int e = first; e <= first + 14; ++e) window += hist[e];
  int64_t best = window;
  int base = first;
  for (int b = first + 1; b <= last; ++b) {
    window += hist[b + 14] - hist[b - 1];
    if (window > best) {
      best = window;
      base = b;
    }
  }
  return RowPlan{base, valid - best + r.specials};
}

// Whether this CPU runs the AVX-512BW fill (the "avx512" path needs only AVX-512F: a CPU without BW fills on AVX2).
bool has_avx512bw() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  return yes;
}

// The blob's pages made present in one call (Linux >= 5.14, MADV_POPULATE_WRITE) before the fill writes them: a
// fresh large allocation otherwise takes one page fault per 4 KiB at first write (~2 us each here: a third of
// packing's time); the same memory either way. Only whole pages inside the blob; a no-op where unsupported.
void populate(uint8_t* p, int64_t nbytes) {
  constexpr int kPopulateWrite = 23;   // MADV_POPULATE_WRITE (older headers lack the name)
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t start = (reinterpret_cast<uintptr_t>(p) + page - 1) & ~(page - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + nbytes) & ~(page - 1);
  if (end > start) madvise(reinterpret_cast<void*>(start), end - start, kPopulateWrite);   // advice: errors ignored
}

void check_weight(const at::Tensor& w, const char* what) {
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 2 && w.scalar_type() == at::kBFloat16 && w.is_contiguous(), what,
              ": w must be a contiguous (N, K) bfloat16 CPU tensor");
  TORCH_CHECK(w.size(1) % 64 == 0 && w.size(1) > 0, what, ": K must be a positive multiple of 64, got ", w.size(1));
}

// The escapes of one step of 64 weights from column k (bit j of mask: column k + j), listed after the row's first e;
// returns the new count. Never past the row's slots (room): a row other than the one planned is refused by the
// caller's check of the count.
inline int64_t list_escapes(uint64_t mask, int64_t k, const uint16_t* row, int64_t e, int64_t room, int32_t* esc_col,
                            uint16_t* esc_val) {
  for (; mask; mask &= mask - 1) {
    const int64_t col = k + __builtin_ctzll(mask);
    if (e < room) {
      esc_col[e] = static_cast<int32_t>(col);
      esc_val[e] = row[col];
    }
    ++e;
  }
  return e;
}

}  // namespace

// ----------------------------------------------------------------------------------- per ISA: range, fill
// The range pass (plan_row's first pass), per 64 weights: the exponent e, min(e - 1) and max((e + 1) & 0xFF) as
// 16-bit unsigned (0 and 255 out of the way), the 255s counted.
// The fill of one row: per 64 weights, the exponent e = (w >> 7) & 0xFF and d = e - base (16-bit, wrapping below
// the window); inside the window (d <= 14 unsigned) the code is d, else 15; an escape (outside, e != 0) keeps sign and
// mantissa 0 and is listed (up to `room` of them: the row's slots). Codes of weights s and s + 32 share codes byte
// s (low nibble, high nibble). Returns the escapes found.

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace {

// 16-bit lanes of a and b narrowed to 32 bytes in order (packus works per 128-bit lane: the permute undoes it).
inline __m256i narrow(__m256i a, __m256i b) { return _mm256_permute4x64_epi64(_mm256_packus_epi16(a, b), 0xD8); }

int64_t hsum_epi16(__m256i v) {   // lanes < 2^15
  const __m256i s = _mm256_madd_epi16(v, _mm256_set1_epi16(1));
  __m128i t = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
  return _mm_cvtsi128_si32(t);
}

int hreduce_epu16(__m256i v, bool max) {
  __m128i t = max ? _mm_max_epu16(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1))
                  : _mm_min_epu16(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  if (max) t = _mm_xor_si128(t, _mm_set1_epi16(-1));   // max = ~min(~v)
  t = _mm_minpos_epu16(t);
  const int m = _mm_extract_epi16(t, 0);
  return max ? 0xFFFF - m : m;
}

RowRange row_range_avx2(const uint16_t* row, int64_t K) {
  const __m256i vff = _mm256_set1_epi16(0xFF), one = _mm256_set1_epi16(1);
  __m256i lo = _mm256_set1_epi16(-1), hi = _mm256_setzero_si256(), specials = _mm256_setzero_si256();
  RowRange r;
  for (int64_t k0 = 0; k0 < K; k0 += 16384) {   // 16-bit counts: at most 1024 a lane per round
    for (int64_t k = k0; k < std::min(K, k0 + 16384); k += 16) {
      const __m256i ex = _mm256_and_si256(_mm256_srli_epi16(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k)), 7), vff);
      lo = _mm256_min_epu16(lo, _mm256_sub_epi16(ex, one));
      hi = _mm256_max_epu16(hi, _mm256_and_si256(_mm256_add_epi16(ex, one), vff));
      specials = _mm256_sub_epi16(specials, _mm256_cmpeq_epi16(ex, vff));
    }
    r.specials += hsum_epi16(specials);
    specials = _mm256_setzero_si256();
  }
  const int l = hreduce_epu16(lo, false), h = hreduce_epu16(hi, true);
  if (l <= 253) r.lo = l + 1;
  if (h >= 2) r.hi = h - 1;
  return r;
}

// Weights of exponent hi, and of exponent 1 .. hi - 15 ((e - 1) < hi - 15 unsigned), counted by their bit masks.
TopCounts top_counts_avx2(const uint16_t* row, int64_t K, int hi) {
  const __m256i vff = _mm256_set1_epi16(0xFF), one = _mm256_set1_epi16(1), vhi = _mm256_set1_epi16(hi);
  const __m256i floor = _mm256_set1_epi16(static_cast<int16_t>(hi - 16));   // (e - 1) <= hi - 16
  TopCounts t;
  for (int64_t k = 0; k < K; k += 16) {
    const __m256i ex = _mm256_and_si256(_mm256_srli_epi16(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k)), 7), vff);
    const __m256i e1 = _mm256_sub_epi16(ex, one);
    t.top += __builtin_popcount(_mm256_movemask_epi8(_mm256_cmpeq_epi16(ex, vhi)));
    t.below += __builtin_popcount(_mm256_movemask_epi8(_mm256_cmpeq_epi16(_mm256_min_epu16(e1, floor), e1)));
  }
  t.top /= 2;   // two mask bits a weight
  t.below /= 2;
  return t;
}

int64_t pack_row_avx2(const uint16_t* row, int64_t K, int base, int64_t room, uint8_t* sm, uint8_t* codes,
                      int32_t* esc_col, uint16_t* esc_val) {
  const __m256i vbase = _mm256_set1_epi16(static_cast<int16_t>(base)), v14 = _mm256_set1_epi16(14);
  const __m256i v15 = _mm256_set1_epi16(15), vff = _mm256_set1_epi16(0xFF);
  const __m256i m80 = _mm256_set1_epi16(0x80), m7f = _mm256_set1_epi16(0x7F), zero = _mm256_setzero_si256();
  int64_t e = 0;
  for (int64_t k = 0; k < K; k += 64) {
    __m256i code[4], smw[4], esc[4];
    for (int q = 0; q < 4; ++q) {   // weights 16 q .. 16 q + 15
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k + 16 * q));
      const __m256i ex = _mm256_and_si256(_mm256_srli_epi16(w, 7), vff);
      const __m256i d = _mm256_sub_epi16(ex, vbase);
      const __m256i in = _mm256_cmpeq_epi16(_mm256_min_epu16(d, v14), d);
      esc[q] = _mm256_andnot_si256(_mm256_or_si256(in, _mm256_cmpeq_epi16(ex, zero)), _mm256_cmpeq_epi16(ex, ex));
      code[q] = _mm256_blendv_epi8(v15, d, in);
      const __m256i s = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(w, 8), m80), _mm256_and_si256(w, m7f));
      smw[q] = _mm256_andnot_si256(esc[q], s);
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(sm + k), narrow(smw[0], smw[1]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(sm + k + 32), narrow(smw[2], smw[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + k / 2),
                        narrow(_mm256_or_si256(code[0], _mm256_slli_epi16(code[2], 4)),
                               _mm256_or_si256(code[1], _mm256_slli_epi16(code[3], 4))));
    const __m256i any = _mm256_or_si256(_mm256_or_si256(esc[0], esc[1]), _mm256_or_si256(esc[2], esc[3]));
    if (_mm256_testz_si256(any, any)) continue;
    auto bits = [](__m256i a, __m256i b) {
      return static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_permute4x64_epi64(_mm256_packs_epi16(a, b), 0xD8)));
    };
    e = list_escapes(bits(esc[0], esc[1]) | uint64_t(bits(esc[2], esc[3])) << 32, k, row, e, room, esc_col, esc_val);
  }
  return e;
}

}  // namespace
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512bw")
namespace {

RowRange row_range_avx512(const uint16_t* row, int64_t K) {
  const __m512i vff = _mm512_set1_epi16(0xFF), one = _mm512_set1_epi16(1);
  __m512i lo = _mm512_set1_epi16(-1), hi = _mm512_setzero_si512();
  RowRange r;
  for (int64_t k = 0; k < K; k += 32) {
    const __m512i ex = _mm512_and_si512(_mm512_srli_epi16(_mm512_loadu_si512(row + k), 7), vff);
    lo = _mm512_min_epu16(lo, _mm512_sub_epi16(ex, one));
    hi = _mm512_max_epu16(hi, _mm512_and_si512(_mm512_add_epi16(ex, one), vff));
    r.specials += __builtin_popcount(_mm512_cmpeq_epi16_mask(ex, vff));
  }
  const __m256i lo2 = _mm256_min_epu16(_mm512_castsi512_si256(lo), _mm512_extracti64x4_epi64(lo, 1));
  const __m256i hi2 = _mm256_max_epu16(_mm512_castsi512_si256(hi), _mm512_extracti64x4_epi64(hi, 1));
  const int l = hreduce_epu16(lo2, false), h = hreduce_epu16(hi2, true);
  if (l <= 253) r.lo = l + 1;
  if (h >= 2) r.hi = h - 1;
  return r;
}

TopCounts top_counts_avx512(const uint16_t* row, int64_t K, int hi) {
  const __m512i vff = _mm512_set1_epi16(0xFF), one = _mm512_set1_epi16(1), vhi = _mm512_set1_epi16(hi);
  const __m512i floor = _mm512_set1_epi16(static_cast<int16_t>(hi - 16));
  TopCounts t;
  for (int64_t k = 0; k < K; k += 32) {
    const __m512i ex = _mm512_and_si512(_mm512_srli_epi16(_mm512_loadu_si512(row + k), 7), vff);
    t.top += __builtin_popcount(_mm512_cmpeq_epi16_mask(ex, vhi));
    t.below += __builtin_popcount(_mm512_cmple_epu16_mask(_mm512_sub_epi16(ex, one), floor));
  }
  return t;
}

int64_t pack_row_avx512(const uint16_t* row, int64_t K, int base, int64_t room, uint8_t* sm, uint8_t* codes,
                        int32_t* esc_col, uint16_t* esc_val) {
  const __m512i vbase = _mm512_set1_epi16(static_cast<int16_t>(base)), v14 = _mm512_set1_epi16(14);
  const __m512i v15 = _mm512_set1_epi16(15), vff = _mm512_set1_epi16(0xFF), m80 = _mm512_set1_epi16(0x80);
  int64_t e = 0;
  for (int64_t k = 0; k < K; k += 64) {
    __m512i code[2], smw[2];
    __mmask32 esc[2];
    for (int h = 0; h < 2; ++h) {   // weights 32 h .. 32 h + 31
      const __m512i w = _mm512_loadu_si512(row + k + 32 * h);
      const __m512i ex = _mm512_and_si512(_mm512_srli_epi16(w, 7), vff);
      const __m512i d = _mm512_sub_epi16(ex, vbase);
      const __mmask32 in = _mm512_cmple_epu16_mask(d, v14);
      esc[h] = _mm512_test_epi16_mask(ex, ex) & ~in;
      code[h] = _mm512_mask_mov_epi16(v15, in, d);
      // bit-select (0xCA: a ? b : c per bit): the sign (bit 15) into bit 7, the mantissa's bits 0..6; the high
      // byte is dropped by the narrowing
      smw[h] = _mm512_maskz_mov_epi16(~esc[h], _mm512_ternarylogic_epi32(m80, _mm512_srli_epi16(w, 8), w, 0xCA));
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(sm + k), _mm512_cvtepi16_epi8(smw[0]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(sm + k + 32), _mm512_cvtepi16_epi8(smw[1]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + k / 2),
                        _mm512_cvtepi16_epi8(_mm512_or_si512(code[0], _mm512_slli_epi16(code[1], 4))));
    e = list_escapes(esc[0] | uint64_t(esc[1]) << 32, k, row, e, room, esc_col, esc_val);
  }
  return e;
}

}  // namespace
#pragma GCC pop_options

namespace {

// The blob of w with its header, bases and escape offsets written and every padding byte zero; sm, codes and the
// escapes' columns and values are left for the fill.
at::Tensor pack_bf16_begin(const at::Tensor& w, int64_t path) {
  check_weight(w, "pack_bf16");
  TORCH_CHECK(path == kAvx2 || path == kAvx512 || path == kAvx512Bf16, "pack_bf16: unknown path ", path);
  const int64_t N = w.size(0), K = w.size(1);
  const uint16_t* src = static_cast<const uint16_t*>(w.data_ptr());
  const RowPasses passes = unpack_path_for(path) == kAvx2 || !has_avx512bw()
                               ? RowPasses{row_range_avx2, top_counts_avx2}
                               : RowPasses{row_range_avx512, top_counts_avx512};
  std::vector<uint8_t> bases(static_cast<size_t>(N));
  std::vector<int64_t> esc_ptr(static_cast<size_t>(N + 1), 0);
  at::parallel_for(0, N, row_grain(K), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const RowPlan plan = plan_row(src + n * K, K, passes);
      bases[n] = static_cast<uint8_t>(plan.base);
      esc_ptr[n + 1] = plan.escapes;
    }
  });
  for (int64_t n = 0; n < N; ++n) esc_ptr[n + 1] += esc_ptr[n];
  const int64_t E = esc_ptr[N];
  const PackedLayout l = packed_layout(N, K, E);
  at::Tensor blob = at::empty({l.total}, w.options().dtype(at::kByte));
  uint8_t* b = blob.data_ptr<uint8_t>();
  populate(b, l.total);
  std::memset(b, 0, 64);
  const int64_t header[5] = {kPackedMagic, kPackedVersion, N, K, E};
  std::memcpy(b, header, sizeof header);
  std::memcpy(b + l.base, bases.data(), N);
  std::memcpy(b + l.esc_ptr, esc_ptr.data(), (N + 1) * 8);
  const int64_t ends[5][2] = {{l.codes + N * K / 2, l.base}, {l.base + N, l.esc_ptr},
                              {l.esc_ptr + (N + 1) * 8, l.esc_col}, {l.esc_col + E * 4, l.esc_val},
                              {l.esc_val + E * 2, l.total}};
  for (const auto& gap : ends) std::memset(b + gap[0], 0, gap[1] - gap[0]);   // the padding after each section
  return blob;
}

// Rows row0 .. row0 + w.size(0) - 1 of the blob filled from w (those rows of the matrix).
void pack_bf16_rows(const at::Tensor& w, const at::Tensor& blob, int64_t row0, int64_t path) {
  check_weight(w, "pack_bf16_rows");
  const PackedBf16 pk = packed_view(blob);
  const int64_t rows = w.size(0), K = pk.K;
  TORCH_CHECK(w.size(1) == K && row0 >= 0 && row0 + rows <= pk.N, "pack_bf16_rows: rows ", row0, "..",
              row0 + rows, " of K=", w.size(1), " do not fit a blob of (", pk.N, ", ", K, ")");
  TORCH_CHECK(path == kAvx2 || path == kAvx512 || path == kAvx512Bf16, "pack_bf16_rows: unknown path ", path);
  const bool avx2 = unpack_path_for(path) == kAvx2 || !has_avx512bw();
  const uint16_t* src = static_cast<const uint16_t*>(w.data_ptr());
  // the sections to write (packed_view's pointers are read-only views of the same bytes)
  const PackedLayout l = packed_layout(pk.N, K, pk.E);
  uint8_t* b = blob.data_ptr<uint8_t>();
  uint8_t* sm = b + l.sm;
  uint8_t* codes = b + l.codes;
  auto* esc_col = reinterpret_cast<int32_t*>(b + l.esc_col);
  auto* esc_val = reinterpret_cast<uint16_t*>(b + l.esc_val);
  at::parallel_for(0, rows, row_grain(K), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = row0 + i, first = pk.esc_ptr[n], room = pk.esc_ptr[n + 1] - first;
      const int64_t found = (avx2 ? pack_row_avx2 : pack_row_avx512)(src + i * K, K, pk.base[n], room, sm + n * K,
                                                                      codes + n * K / 2, esc_col + first,
                                                                      esc_val + first);
      TORCH_CHECK(found == room, "pack_bf16_rows: row ", n, " has ", found, " escapes where its plan said ", room,
                  " (not the rows it was planned on)");
    }
  });
}

at::Tensor pack_bf16(const at::Tensor& w_in, int64_t path) {
  const at::Tensor w = w_in.contiguous();
  at::Tensor blob = pack_bf16_begin(w, path);
  pack_bf16_rows(w, blob, 0, path);
  return blob;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(internvl_kernels, m) {
  m.def("pack_bf16(Tensor w, int path) -> Tensor");
  m.def("pack_bf16_begin(Tensor w, int path) -> Tensor");
  m.def("pack_bf16_rows(Tensor w, Tensor(a!) blob, int row0, int path) -> ()");
}

TORCH_LIBRARY_IMPL(internvl_kernels, CPU, m) {
  m.impl("pack_bf16", &pack_bf16);
  m.impl("pack_bf16_begin", &pack_bf16_begin);
  m.impl("pack_bf16_rows", &pack_bf16_rows);
}
