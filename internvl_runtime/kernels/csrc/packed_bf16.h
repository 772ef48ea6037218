// Packed bf16 weights (packed_bf16.cpp says the format): the views of a blob and the inline unpacking step that
// both the unpacking to memory (packed_bf16.cpp) and the fused GEMV tile (gemv.cpp) run.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "gemv.h"

namespace at {
class Tensor;
}

namespace internvl_kernels {

struct PackedBf16 {
  const uint8_t* sm = nullptr;       // (N, K): sign << 7 | mantissa
  const uint8_t* codes = nullptr;    // (N, K / 2): 4-bit exponent codes
  const uint8_t* base = nullptr;     // (N,): each row's window base exponent
  const int64_t* esc_ptr = nullptr;  // (N + 1,): each row's escapes
  const int32_t* esc_col = nullptr;  // (E,)
  const uint16_t* esc_val = nullptr; // (E,): bf16 bits
  int64_t N = 0, K = 0, E = 0;
};

constexpr int kPackedEscapeCode = 15;   // exponent 0; an escape's true value is in the row's list
constexpr int64_t kPackedMagic = 0x3231464236314642LL;   // "BF16BF12"
constexpr int64_t kPackedVersion = 1;

// Where each section of the blob of an (N, K) matrix with E escapes starts, and its size (bytes): a 64-byte
// header {magic, version, N, K, E}, then sm, codes, base, esc_ptr, esc_col, esc_val, each 64-byte aligned.
struct PackedLayout {
  int64_t sm, codes, base, esc_ptr, esc_col, esc_val, total;
};

inline int64_t packed_align64(int64_t n) { return (n + 63) & ~int64_t(63); }

inline PackedLayout packed_layout(int64_t N, int64_t K, int64_t E) {
  PackedLayout l;
  l.sm = 64;
  l.codes = packed_align64(l.sm + N * K);
  l.base = packed_align64(l.codes + N * K / 2);
  l.esc_ptr = packed_align64(l.base + N);
  l.esc_col = packed_align64(l.esc_ptr + (N + 1) * 8);
  l.esc_val = packed_align64(l.esc_col + E * 4);
  l.total = packed_align64(l.esc_val + E * 2);
  return l;
}

// The unpacking a caller on ISA path `path` runs: AVX2 on the AVX2 path, AVX-512BW on both AVX-512 ones.
inline int64_t unpack_path_for(int64_t path) { return path == kAvx2 ? kAvx2 : kAvx512; }

// The blob's views (checks its header and size).
PackedBf16 packed_view(const at::Tensor& blob);

// Rows n0..n1-1 of a packed matrix, unpacked to bf16 into out ((n1 - n0) x K), bit for bit; `path` the ISA
// path of the caller (unpack_path_for says which unpacking it runs).
void unpack_bf16_rows(const PackedBf16& pk, int64_t n0, int64_t n1, uint16_t* out, int64_t path);

// The whole matrix into out (N x K), rows shared over torch's threads.
void unpack_bf16_matrix(const PackedBf16& pk, uint16_t* out, int64_t path);

// A row's exponent tables (hi, lo) in one 128-bit register each: exponent e = base + code for codes 0..14, 0
// for the escape code; hi = e >> 1, lo = (e & 1) << 7.
__attribute__((target("sse2"), always_inline)) inline void packed_tables128(int base, __m128i& hi, __m128i& lo) {
  const __m128i iota = _mm_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 0);
  const __m128i keep = _mm_setr_epi8(-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0);
  const __m128i e = _mm_and_si128(_mm_add_epi8(_mm_set1_epi8(static_cast<char>(base)), iota), keep);
  hi = _mm_and_si128(_mm_srli_epi16(e, 1), _mm_set1_epi8(0x7F));
  lo = _mm_and_si128(_mm_slli_epi16(e, 7), _mm_set1_epi8(static_cast<char>(0x80)));
}

// Weights 32 h .. 32 h + 31 of a 64-weight block (AVX2): their codes c (one a byte: the block's codes, shifted
// right by 4 for h = 1, masked to 4 bits) and sign/mantissa bytes sm -> two vectors of 16 bf16 words, in the
// orders [0..7, 16..23] (wl) and [8..15, 24..31] (wh) of the half block; escapes read as +0.
__attribute__((target("avx2"), always_inline)) inline void unpack32(__m256i c, const uint8_t* sm, __m256i thi,
                                                                    __m256i tlo, __m256i& wl, __m256i& wh) {
  const __m256i m80 = _mm256_set1_epi8(static_cast<char>(0x80));
  const __m256i s = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sm));
  const __m256i h8 = _mm256_or_si256(_mm256_and_si256(s, m80), _mm256_shuffle_epi8(thi, c));
  const __m256i l8 = _mm256_or_si256(_mm256_andnot_si256(m80, s), _mm256_shuffle_epi8(tlo, c));
  wl = _mm256_unpacklo_epi8(l8, h8);
  wh = _mm256_unpackhi_epi8(l8, h8);
}

// One row as the AVX-512 unpacking step reads it.
struct PackedRow {
  const uint8_t* sm;
  const uint8_t* codes;
  __m512i thi, tlo;
};

__attribute__((target("avx512f,avx512bw"), always_inline)) inline PackedRow packed_row(const PackedBf16& pk,
                                                                                       int64_t n) {
  __m128i hi, lo;
  packed_tables128(pk.base[n], hi, lo);
  return PackedRow{pk.sm + n * pk.K, pk.codes + n * pk.K / 2, _mm512_broadcast_i32x4(hi), _mm512_broadcast_i32x4(lo)};
}

// Where activation column k sits in a row permuted as unpack64 orders the weights (the AVX-512 BF16 tile).
inline int64_t packed_x_position(int64_t k) {
  const int64_t s = k & 63;
  return (k - s) + ((s & 8) ? 32 : 0) + (s >> 4) * 8 + (s & 7);
}

// The same for the AVX2 tile, which widens each half block of 32 weights to four fp32 vectors: the even and
// odd words of the low byte interleave, then of the high one; lanes 0-3 from the first 16 weights, 4-7 the next.
inline int64_t packed_x_position_avx2(int64_t k) {
  const int64_t q = k & 31, lane = q >> 4, r = q & 15, group = r >> 3, s = r & 7;
  return (k - q) + (group * 2 + (s & 1)) * 8 + (s >> 1) + 4 * lane;
}

// Weights k..k+63 of a row as two vectors of 32 bf16 words, in the orders [0..7, 16..23, 32..39, 48..55] (wl)
// and [8..15, 24..31, 40..47, 56..63] (wh) of the block; escapes read as exponent 0 (zero or subnormal).
__attribute__((target("avx512f,avx512bw"), always_inline)) inline void unpack64(const PackedRow& r, int64_t k,
                                                                                __m512i& wl, __m512i& wh) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r.codes + k / 2));
  const __m512i m0f = _mm512_set1_epi8(0x0F);
  const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(v), _mm256_srli_epi16(v, 4), 1);
  const __m512i c = _mm512_and_si512(both, m0f);   // code of weight s in byte s
  const __m512i s = _mm512_loadu_si512(r.sm + k);
  const __m512i m80 = _mm512_set1_epi8(static_cast<char>(0x80));
  // bit-selects (0xCA: a ? b : c per bit): sign from s, the exponent's high bits from the table; the
  // exponent's low bit from the table, the mantissa from s
  const __m512i h8 = _mm512_ternarylogic_epi32(m80, s, _mm512_shuffle_epi8(r.thi, c), 0xCA);
  const __m512i l8 = _mm512_ternarylogic_epi32(m80, _mm512_shuffle_epi8(r.tlo, c), s, 0xCA);
  wl = _mm512_unpacklo_epi8(l8, h8);
  wh = _mm512_unpackhi_epi8(l8, h8);
}

}  // namespace internvl_kernels
