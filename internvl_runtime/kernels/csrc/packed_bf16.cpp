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
// unpacking, or that the fused tiles add to the row's sum. Nothing is rounded. A row's window is the first
// (lowest base, 1 <= base <= 240) of the windows holding the most of its exponents in 1..254 (255, inf / NaN,
// is always an escape). Packing: packed_bf16_pack.cpp; unpacking and the product over a blob: this file.
//
// Decode products read the packed form directly (gemv.cpp): up to 8 rows (AVX-512 BF16) or 4 (AVX2, AVX-512F)
// the fused tiles unpack each 64 weights in registers (~10 vector instructions, hidden under the stream of a
// memory-bound step) and meet them with the activations permuted once into the unpacked order; beyond, the
// driver (gemv.cpp's `run_chunk`) unpacks each thread's rows into an L1 buffer just before the usual bf16 tiles
// read them, so those compute exactly what they compute on the unpacked matrix.
//
// Blob layout (every section 64-byte aligned, the padding zero; all counts int64): a 64-byte header {magic,
// version, N, K, E}, then sm (N x K bytes: sign << 7 | mantissa, in the block order below), codes (N x K / 2: two
// 4-bit codes a byte), base (N bytes: each row's lowest window exponent), esc_ptr (N + 1 int64: each row's
// escapes), esc_col (E int32), esc_val (E uint16: the bf16 bits); packed_bf16.h: packed_layout.
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

#include "gemv.h"
#include "packed_bf16.h"

using namespace internvl_kernels;

namespace internvl_kernels {

PackedBf16 packed_view(const at::Tensor& blob) {
  TORCH_CHECK(blob.device().is_cpu() && blob.dim() == 1 && blob.scalar_type() == at::kByte && blob.is_contiguous() &&
                  blob.numel() >= 64,
              "packed bf16: the blob must be a contiguous 1-D uint8 CPU tensor (pack_bf16's output)");
  const uint8_t* b = blob.data_ptr<uint8_t>();
  int64_t header[5];
  std::memcpy(header, b, sizeof header);
  TORCH_CHECK(header[0] == kPackedMagic && header[1] == kPackedVersion, "packed bf16: not a version-",
              kPackedVersion, " blob");
  PackedBf16 v;
  v.N = header[2];
  v.K = header[3];
  v.E = header[4];
  const PackedLayout l = packed_layout(v.N, v.K, v.E);
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

// `path`: the ISA path Python chose for this host (unpack_path_for says which unpacking it runs).
at::Tensor unpack_bf16(const at::Tensor& blob, int64_t path) {
  TORCH_CHECK(path == kAvx2 || path == kAvx512 || path == kAvx512Bf16, "unpack_bf16: unknown path ", path);
  const PackedBf16 pk = packed_view(blob);
  at::Tensor w = at::empty({pk.N, pk.K}, blob.options().dtype(at::kBFloat16));
  unpack_bf16_matrix(pk, static_cast<uint16_t*>(w.data_ptr()), path);
  return w;
}

at::Tensor linear_bf16_packed(const at::Tensor& x_in, const at::Tensor& blob, const std::optional<at::Tensor>& bias,
                              int64_t path) {
  const at::Tensor x = x_in.contiguous();
  const PackedBf16 pk = packed_view(blob);
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.size(1) == pk.K,
              "linear_bf16_packed: x must be a (M, ", pk.K, ") bfloat16 CPU tensor");
  TORCH_CHECK(path == kAvx2 || path == kAvx512 || path == kAvx512Bf16, "linear_bf16_packed: unknown path ", path);
  const BiasArg b = checked_bias(bias, pk.N);
  at::Tensor out = at::empty({x.size(0), pk.N}, x.options());
  matvec_bf16_packed(static_cast<const uint16_t*>(x.data_ptr()), x.size(0), pk, b.data, b.kind, out.data_ptr(), kBf16,
                     path);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(internvl_kernels, m) {
  m.def("unpack_bf16(Tensor blob, int path) -> Tensor");
  m.def("linear_bf16_packed(Tensor x, Tensor blob, Tensor? bias, int path) -> Tensor");
}

TORCH_LIBRARY_IMPL(internvl_kernels, CPU, m) {
  m.impl("unpack_bf16", &unpack_bf16);
  m.impl("linear_bf16_packed", &linear_bf16_packed);
}
