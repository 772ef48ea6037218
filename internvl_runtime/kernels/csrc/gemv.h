// Shared between the GEMV kernels (gemv.cpp) and the fused decode step (decode_step.cpp).
#pragma once

#include <cstdint>
#include <cstring>
#include <optional>

namespace at {
class Tensor;
}

namespace internvl_kernels {

struct PackedBf16;

// Which instruction-set path a call runs; Python chooses it from /proc/cpuinfo.
enum Path : int64_t { kAvx2 = 0, kAvx512 = 1, kAvx512Bf16 = 2 };
// Element type of an optional per-row operand (scale, bias) or of the output.
enum Kind : int { kNone = 0, kBf16 = 1, kF32 = 2 };

struct Problem {
  int64_t M = 0, N = 0, K = 0;
  const uint16_t* xb = nullptr;  // bf16 activations, rows ldx apart (bf16 path)
  int64_t ldx = 0;
  const float* xf = nullptr;     // fp32 activations, rows K apart (layout chosen by the path)
  const uint16_t* w = nullptr;   // bf16 weights (N, K)
  const int8_t* wq = nullptr;    // int8 weights (N, K)
  const float* wf = nullptr;     // fp32 weights (N, K)
  const uint8_t* w4 = nullptr;   // int4 weights (N, K / 2): per 32 columns, 16 bytes (low nibble k, high k + 16)
  const uint16_t* sz = nullptr;  // int4 only: (N, K / group, 2) bf16 scale and zero per group
  int64_t group = 0;             // int4 only: columns per scale/zero group (a multiple of 32)
  int64_t groups = 0;            // int4 only: K / group
  const float* xsum = nullptr;   // int4 only: (M, K / group) sums of x over each group
  const int8_t* xq = nullptr;    // integer paths: x quantized to int8 (M, K); int4: per span (64 / 128) in nibble order
  const float* xscale = nullptr; // int4: (M, K / group) scales; int8: (M, ceil(K / 32), 8): each block's, 8 times
  const float* xqsum = nullptr;  // int4, 32-column AVX2 tile: (M, K / group) sum of the quantized values (exact)
  // int4, 64 / 128-column integer tiles (lanes L = 8 on AVX2, 16 with VNNI), per x row and group:
  const float* xg = nullptr;     // (M, K / group, 2): the scale of xq, and sum(x) / L (each lane's share)
  const int32_t* xoff = nullptr; // (M, K / group, L): 8 * sum(xq) in lane 0, zeros elsewhere (the code offset)
  const void* scale = nullptr;   // int8 only: per-output-channel scales
  int scale_kind = kNone;
  const void* bias = nullptr;
  int bias_kind = kNone;
  void* out = nullptr;           // (M, N)
  int out_kind = kBf16;
  int64_t x_elem_bytes = 4;      // as the tiles read x: 2 (bf16, dot-product path) or 4 (fp32)
  const PackedBf16* packed = nullptr;  // bf16 weights kept packed (packed_bf16.h): read by the fused tile, or
  bool unpacked = false;               // with `unpacked`, each thread's rows unpacked by the driver into a
                                       // scratch buffer that `w` then points into, for the bf16 tiles
  int64_t path = 0;              // packed weights: the ISA path of the call (unpack_bf16_rows's argument)
};

// A product's optional bias, checked: a contiguous (N,) bf16 or float32 tensor (its data and kind), or none
// (nullptr, kNone). The one check of the GEMV operators (gemv.cpp) and the packed one (packed_bf16.cpp).
struct BiasArg {
  const void* data = nullptr;
  int kind = kNone;
};
BiasArg checked_bias(const std::optional<at::Tensor>& bias, int64_t N);

inline float bf16_to_f32(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// out (M, N) = x (M, K, bf16, contiguous) . w^T + bias, accumulated in fp32 and rounded once.
// w: bf16 (N, K) contiguous; bias: (N,) of bias_kind or null; out: bf16 or fp32 as out_kind says.
// Runs on torch's intra-op thread pool (rows of w shared out in chunks).
void matvec_bf16(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w, int64_t N, const void* bias,
                 int bias_kind, void* out, int out_kind, int64_t path);

// The same over packed bf16 weights (packed_bf16.h): the product of the unpacked matrix.
void matvec_bf16_packed(const uint16_t* x, int64_t M, const PackedBf16& w, const void* bias, int bias_kind, void* out,
                        int out_kind, int64_t path);

// out (M, N) = x (M, K, fp32, contiguous) . w^T + bias for fp32 weights w (N, K) contiguous, streamed as stored
// (one fp32 accumulation per output, no rounding but the sums' own); out fp32 or bf16 as out_kind says.
void matvec_f32(const float* x, int64_t M, int64_t K, const float* w, int64_t N, const void* bias, int bias_kind,
                void* out, int out_kind, int64_t path);

// The same for int8 weights with one scale per output row: out = (x . q^T) * scale + bias.
void matvec_int8(const uint16_t* x, int64_t M, int64_t K, const int8_t* w, const void* scale, int scale_kind,
                 int64_t N, const void* bias, int bias_kind, void* out, int out_kind, int64_t path);

// The same for int4 weights, asymmetric per group of `group` columns: W = (q - 8) * scale + zero.
// w4 (N, K / 2) uint8 in the layout `Problem::w4` describes; sz (N, K / group, 2) bf16.
void matvec_int4(const uint16_t* x, int64_t M, int64_t K, const uint8_t* w4, const uint16_t* sz, int64_t group,
                 int64_t N, const void* bias, int bias_kind, void* out, int out_kind, int64_t path);

}  // namespace internvl_kernels
