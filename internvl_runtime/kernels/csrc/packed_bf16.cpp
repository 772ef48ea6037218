// bf16 weights stored losslessly in 12 bits: every value kept bit for bit, 3/4 of the bytes to stream.
//
//   pack_bf16(w (N, K) bf16) -> blob (uint8)          unpack_bf16(blob) -> w (N, K) bf16, bit-identical
//   linear_bf16_packed(x (M, K) bf16, blob, bias?, path) -> (M, N) bf16: linear_bf16(x, unpack_bf16(blob), ...)
//   (bit for bit where the rows are unpacked for the bf16 tiles; the fused tiles sum in another order)
//
// A decode step reads every weight once from DRAM, so its time is the weights' bytes over the memory
// bandwidth. A bf16 number is sign (1 bit), exponent (8) and mantissa (7); in a weight matrix the exponents
// of one row crowd into a few neighbouring values (trained weights: ~2.6 bits of entropy, DFloat11, 2025;
// normal random weights alike). So each weight keeps its sign and mantissa in one byte, and its exponent
// as a 4-bit code: 0..14 = the row's base exponent + code, 15 = exponent 0 (zeros and subnormals, exact).
// The few weights whose exponent falls outside the row's window of 15 are "escapes": code 15 with sign and
// mantissa 0 (they unpack as +0), and the row lists (column, bf16 value) pairs that replace them after
// unpacking, or that the fused tiles add to the row's sum. Nothing is rounded.
//
// Decode products read the packed form directly (gemv.cpp): up to 8 rows (AVX-512 BF16) or 4 (AVX2, AVX-512F)
// the fused tiles unpack each 64 weights in registers (~10 vector instructions, hidden under the stream of a
// memory-bound step) and meet them with the activations permuted once into the unpacked order; beyond, the
// driver (gemv.cpp's `run_chunk`) unpacks each thread's rows into an L1 buffer just before the usual bf16 tiles
// read them, so those compute exactly what they compute on the unpacked matrix.
//
// Blob layout (every section 64-byte aligned; all counts int64): a 64-byte header {magic, version, N, K, E},
// then sm (N x K bytes: sign << 7 | mantissa, in the block order below), codes (N x K / 2: two 4-bit codes a
// byte), base (N bytes: each row's lowest window exponent), esc_ptr (N + 1 int64: each row's escapes),
// esc_col (E int32), esc_val (E uint16: the bf16 bits).
//
// Block order: blocks of 64 weights (K a multiple of 64); weight s of a block has its sign/mantissa in sm byte s
// and its code in the low nibble of codes byte s (s < 32) or the high nibble of codes byte s - 32. Unpacking
// interleaves bytes per 128-bit lane, so its two vectors of 32 bf16 words hold the block's weights in the order
// [0..7, 16..23, 32..39, 48..55] and [8..15, 24..31, 40..47, 56..63]: the fused tiles (gemv.cpp) meet them with
// the activations permuted the same way (packed_bf16.h: packed_x_position); unpacking to memory puts them back.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "gemv.h"
#include "packed_bf16.h"

using namespace internvl_kernels;

namespace {

constexpr int64_t kMagic = 0x3231464236314642LL;   // "BF16BF12"
constexpr int64_t kVersion = 1;
constexpr int kEscapeCode = kPackedEscapeCode;

inline int64_t align64(int64_t n) { return (n + 63) & ~int64_t(63); }

struct Layout {
  int64_t sm, codes, base, esc_ptr, esc_col, esc_val, total;
};

Layout layout_for(int64_t N, int64_t K, int64_t E) {
  Layout l;
  l.sm = 64;
  l.codes = align64(l.sm + N * K);
  l.base = align64(l.codes + N * K / 2);
  l.esc_ptr = align64(l.base + N);
  l.esc_col = align64(l.esc_ptr + (N + 1) * 8);
  l.esc_val = align64(l.esc_col + E * 4);
  l.total = align64(l.esc_val + E * 2);
  return l;
}

// The window [base, base + 14] holding most of the row's nonzero exponents (1..254; 255 is inf/NaN).
int best_base(const uint16_t* row, int64_t K) {
  int64_t hist[256] = {0};
  for (int64_t k = 0; k < K; ++k) ++hist[(row[k] >> 7) & 0xFF];
  int64_t window = 0;
  for (int e = 1; e <= 15; ++e) window += hist[e];
  int64_t best = window;
  int base = 1;
  for (int b = 2; b + 14 <= 254; ++b) {
    window += hist[b + 14] - hist[b - 1];
    if (window > best) {
      best = window;
      base = b;
    }
  }
  return base;
}

inline bool in_window(int e, int base) { return e >= base && e <= base + 14; }
inline bool is_escape(int e, int base) { return e != 0 && !in_window(e, base); }

at::Tensor pack_bf16(const at::Tensor& w_in) {
  TORCH_CHECK(w_in.device().is_cpu() && w_in.dim() == 2 && w_in.scalar_type() == at::kBFloat16,
              "pack_bf16: w must be a (N, K) bfloat16 CPU tensor");
  const at::Tensor w = w_in.contiguous();
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(K % 64 == 0 && K > 0, "pack_bf16: K must be a positive multiple of 64, got ", K);
  const uint16_t* src = static_cast<const uint16_t*>(w.data_ptr());
  std::vector<uint8_t> bases(static_cast<size_t>(N));
  std::vector<int64_t> counts(static_cast<size_t>(N + 1), 0);
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const uint16_t* row = src + n * K;
      const int base = best_base(row, K);
      bases[n] = static_cast<uint8_t>(base);
      int64_t e = 0;
      for (int64_t k = 0; k < K; ++k) e += is_escape((row[k] >> 7) & 0xFF, base);
      counts[n + 1] = e;
    }
  });
  for (int64_t n = 0; n < N; ++n) counts[n + 1] += counts[n];
  const int64_t E = counts[N];
  const Layout l = layout_for(N, K, E);
  at::Tensor blob = at::empty({l.total}, w.options().dtype(at::kByte));
  uint8_t* b = blob.data_ptr<uint8_t>();
  std::memset(b, 0, 64);
  const int64_t header[5] = {kMagic, kVersion, N, K, E};
  std::memcpy(b, header, sizeof header);
  uint8_t* sm = b + l.sm;
  uint8_t* codes = b + l.codes;
  std::memcpy(b + l.base, bases.data(), N);
  std::memcpy(b + l.esc_ptr, counts.data(), (N + 1) * 8);
  auto* esc_col = reinterpret_cast<int32_t*>(b + l.esc_col);
  auto* esc_val = reinterpret_cast<uint16_t*>(b + l.esc_val);
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const uint16_t* row = src + n * K;
      const int base = bases[n];
      int64_t e = counts[n];
      uint8_t* sm_row = sm + n * K;
      uint8_t* code_row = codes + n * K / 2;
      std::memset(code_row, 0, K / 2);
      for (int64_t k0 = 0; k0 < K; k0 += 64)
        for (int q = 0; q < 64; ++q) {
          const int64_t k = k0 + q;
          const uint16_t v = row[k];
          const int ex = (v >> 7) & 0xFF;
          int code = kEscapeCode;
          if (in_window(ex, base)) code = ex - base;
          else if (ex != 0) {
            esc_col[e] = static_cast<int32_t>(k);
            esc_val[e++] = v;
          }
          // an escape unpacks as +0 (sign and mantissa 0 under exponent 0) until its listed value replaces it
          sm_row[k] = code == kEscapeCode && ex != 0 ? 0 : static_cast<uint8_t>(((v >> 8) & 0x80) | (v & 0x7F));
          code_row[k0 / 2 + (q & 31)] |= static_cast<uint8_t>(q < 32 ? code : code << 4);
        }
    }
  });
  return blob;
}

}  // namespace

namespace internvl_kernels {

PackedBf16 packed_view(const at::Tensor& blob) {
  TORCH_CHECK(blob.device().is_cpu() && blob.dim() == 1 && blob.scalar_type() == at::kByte && blob.is_contiguous() &&
                  blob.numel() >= 64,
              "packed bf16: the blob must be a contiguous 1-D uint8 CPU tensor (pack_bf16's output)");
  const uint8_t* b = blob.data_ptr<uint8_t>();
  int64_t header[5];
  std::memcpy(header, b, sizeof header);
  TORCH_CHECK(header[0] == kMagic && header[1] == kVersion, "packed bf16: not a version-", kVersion, " blob");
  PackedBf16 v;
  v.N = header[2];
  v.K = header[3];
  v.E = header[4];
  const Layout l = layout_for(v.N, v.K, v.E);
  TORCH_CHECK(v.N >= 0 && v.K > 0 && v.K % 64 == 0 && v.E >= 0 && blob.numel() == l.total,
              "packed bf16: the blob's header does not match its size");
  v.sm = b + l.sm;
  v.codes = b + l.codes;
  v.base = b + l.base;
  v.esc_ptr = reinterpret_cast<const int64_t*>(b + l.esc_ptr);
  v.esc_col = reinterpret_cast<const int32_t*>(b + l.esc_col);
  v.esc_val = reinterpret_cast<const uint16_t*>(b + l.esc_val);
  return v;
}

}  // namespace internvl_kernels

// ---------------------------------------------------------------------------------------------------
// Unpacking rows to memory (F.linear's weights, the multi-row tiles): per 128-bit lane, vpshufb turns the codes
// into the exponent's high 7 bits and its low bit (two 16-entry tables per row, packed_tables128), a
// bit-select merges them with sign and mantissa, a byte interleave makes the bf16 words, a lane permute puts
// them in order.
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace {

void unpack_rows_avx2(const PackedBf16& pk, int64_t n0, int64_t n1, uint16_t* out) {
  const int64_t K = pk.K;
  const __m256i m0f = _mm256_set1_epi8(0x0F);
  for (int64_t n = n0; n < n1; ++n) {
    __m128i hi, lo;
    packed_tables128(pk.base[n], hi, lo);
    const __m256i thi = _mm256_broadcastsi128_si256(hi), tlo = _mm256_broadcastsi128_si256(lo);
    uint16_t* dst = out + (n - n0) * K;
    const uint8_t* sm = pk.sm + n * K;
    const uint8_t* codes = pk.codes + n * K / 2;
    for (int64_t k = 0; k < K; k += 64) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + k / 2));
      for (int half = 0; half < 2; ++half) {   // weights 0..31, then 32..63
        __m256i wl, wh;
        unpack32(_mm256_and_si256(half ? _mm256_srli_epi16(v, 4) : v, m0f), sm + k + 32 * half, thi, tlo, wl, wh);
        uint16_t* o = dst + k + 32 * half;
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), _mm256_permute2x128_si256(wl, wh, 0x20));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 16), _mm256_permute2x128_si256(wl, wh, 0x31));
      }
    }
    for (int64_t e = pk.esc_ptr[n]; e < pk.esc_ptr[n + 1]; ++e) dst[pk.esc_col[e]] = pk.esc_val[e];
  }
}

}  // namespace
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512bw")
namespace {

void unpack_rows_avx512(const PackedBf16& pk, int64_t n0, int64_t n1, uint16_t* out) {
  const int64_t K = pk.K;
  const __m512i lo_order = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0);
  const __m512i hi_order = _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4);
  for (int64_t n = n0; n < n1; ++n) {
    const PackedRow r = packed_row(pk, n);
    uint16_t* dst = out + (n - n0) * K;
    for (int64_t k = 0; k < K; k += 64) {
      __m512i wl, wh;
      unpack64(r, k, wl, wh);
      _mm512_storeu_si512(dst + k, _mm512_permutex2var_epi64(wl, lo_order, wh));
      _mm512_storeu_si512(dst + k + 32, _mm512_permutex2var_epi64(wl, hi_order, wh));
    }
    for (int64_t e = pk.esc_ptr[n]; e < pk.esc_ptr[n + 1]; ++e) dst[pk.esc_col[e]] = pk.esc_val[e];
  }
}

}  // namespace
#pragma GCC pop_options

namespace internvl_kernels {

void unpack_bf16_rows(const PackedBf16& pk, int64_t n0, int64_t n1, uint16_t* out, int64_t path) {
  if (unpack_path_for(path) == kAvx2) unpack_rows_avx2(pk, n0, n1, out);
  else unpack_rows_avx512(pk, n0, n1, out);
}

void unpack_bf16_matrix(const PackedBf16& pk, uint16_t* out, int64_t path) {
  at::parallel_for(0, pk.N, std::max<int64_t>(1, 65536 / pk.K), [&](int64_t begin, int64_t end) {
    unpack_bf16_rows(pk, begin, end, out + begin * pk.K, path);
  });
}

}  // namespace internvl_kernels

namespace {

int64_t unpack_path() {
  static const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  TORCH_CHECK(avx2, "packed bf16: unpacking needs AVX2");
  return avx512 ? kAvx512 : kAvx2;
}

at::Tensor unpack_bf16(const at::Tensor& blob) {
  const PackedBf16 pk = packed_view(blob);
  at::Tensor w = at::empty({pk.N, pk.K}, blob.options().dtype(at::kBFloat16));
  unpack_bf16_matrix(pk, static_cast<uint16_t*>(w.data_ptr()), unpack_path());
  return w;
}

at::Tensor linear_bf16_packed(const at::Tensor& x_in, const at::Tensor& blob, const std::optional<at::Tensor>& bias,
                              int64_t path) {
  const at::Tensor x = x_in.contiguous();
  const PackedBf16 pk = packed_view(blob);
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.size(1) == pk.K,
              "linear_bf16_packed: x must be a (M, ", pk.K, ") bfloat16 CPU tensor");
  TORCH_CHECK(path == kAvx2 || path == kAvx512 || path == kAvx512Bf16, "linear_bf16_packed: unknown path ", path);
  const void* b = nullptr;
  int bias_kind = kNone;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == pk.N && bias->is_contiguous() &&
                    (bias->scalar_type() == at::kBFloat16 || bias->scalar_type() == at::kFloat),
                "linear_bf16_packed: bias must be a contiguous (N,) bf16 or float32 tensor");
    b = bias->data_ptr();
    bias_kind = bias->scalar_type() == at::kBFloat16 ? kBf16 : kF32;
  }
  at::Tensor out = at::empty({x.size(0), pk.N}, x.options());
  matvec_bf16_packed(static_cast<const uint16_t*>(x.data_ptr()), x.size(0), pk, b, bias_kind, out.data_ptr(), kBf16,
                     path);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(internvl_kernels, m) {
  m.def("pack_bf16(Tensor w) -> Tensor");
  m.def("unpack_bf16(Tensor blob) -> Tensor");
  m.def("linear_bf16_packed(Tensor x, Tensor blob, Tensor? bias, int path) -> Tensor");
}

TORCH_LIBRARY_IMPL(internvl_kernels, CPU, m) {
  m.impl("pack_bf16", &pack_bf16);
  m.impl("unpack_bf16", &unpack_bf16);
  m.impl("linear_bf16_packed", &linear_bf16_packed);
}
