// Shared pieces of the CPU kernels: storage conversions, dtype dispatch, the parallel-for, scratch memory,
// and the problem descriptions handed to the per-instruction-set kernel bodies (see simd.h).
//
// Row invariance on the CPU rests on two rules: every output element is computed by one fixed sequence of
// floating-point operations whatever the tiling around it, and no operation is fused unless the code says
// so (the build passes -ffp-contract=off; fused multiply-adds are explicit, see simd.h).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "orthrus/kernels.h"

// An AVX2+FMA build of the kernel bodies, chosen at run time, with GCC (it relies on #pragma GCC target).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ORTHRUS_CPU_X86_DISPATCH 1
#else
#define ORTHRUS_CPU_X86_DISPATCH 0
#endif

// Float8 values only cross inline functions of one translation unit, never an ABI boundary.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace orthrus::cpu {

// ---- storage conversions (exact widening, round-to-nearest-even narrowing) ------------------------------

inline float bits_to_float(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

inline uint32_t float_to_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

inline float bfloat16_to_float(uint16_t value) { return bits_to_float(uint32_t(value) << 16); }

inline uint16_t float_to_bfloat16(float value) {
  uint32_t bits = float_to_bits(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return uint16_t((bits >> 16) | 0x40u);  // keep NaN a (quiet) NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return uint16_t(bits >> 16);
}

inline float float16_to_float(uint16_t value) {
  const uint32_t sign = uint32_t(value & 0x8000u) << 16;
  const uint32_t exponent = (value >> 10) & 0x1fu;
  const uint32_t mantissa = value & 0x3ffu;
  if (exponent == 0) {
    // Zero or subnormal: mantissa * 2^-24 is exact in float.
    const float magnitude = float(mantissa) * 5.9604644775390625e-08f;
    return sign ? -magnitude : magnitude;
  }
  if (exponent == 31) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));
  return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

inline uint16_t float_to_float16(float value) {
  uint32_t bits = float_to_bits(value);
  const uint16_t sign = uint16_t((bits >> 16) & 0x8000u);
  bits &= 0x7fffffffu;
  if (bits > 0x7f800000u) return uint16_t(sign | 0x7e00u);
  if (bits >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // >= 65520 rounds to infinity
  if (bits < 0x38800000u) {
    // Below the smallest normal half: the result counts units of 2^-24; the scaling is exact and
    // nearbyint rounds half to even (the default rounding mode).
    return uint16_t(sign | uint16_t(std::nearbyint(bits_to_float(bits) * 16777216.0f)));
  }
  bits += 0xfffu + ((bits >> 13) & 1u);
  return uint16_t(sign | ((bits - 0x38000000u) >> 13));
}

template <DType kDType>
struct Storage;
template <>
struct Storage<DType::kFloat32> {
  using type = float;
  static float load(float value) { return value; }
  static float store(float value) { return value; }
};
template <>
struct Storage<DType::kFloat16> {
  using type = uint16_t;
  static float load(uint16_t value) { return float16_to_float(value); }
  static uint16_t store(float value) { return float_to_float16(value); }
};
template <>
struct Storage<DType::kBFloat16> {
  using type = uint16_t;
  static float load(uint16_t value) { return bfloat16_to_float(value); }
  static uint16_t store(float value) { return float_to_bfloat16(value); }
};

template <DType kDType>
inline void load_row(const void* source, int64_t count, float* destination) {
  const auto* typed = static_cast<const typename Storage<kDType>::type*>(source);
  for (int64_t i = 0; i < count; ++i) destination[i] = Storage<kDType>::load(typed[i]);
}

template <DType kDType>
inline void store_row(const float* source, int64_t count, void* destination) {
  auto* typed = static_cast<typename Storage<kDType>::type*>(destination);
  for (int64_t i = 0; i < count; ++i) typed[i] = Storage<kDType>::store(source[i]);
}

inline int64_t element_bytes(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

template <DType kDType>
using DTypeTag = std::integral_constant<DType, kDType>;

// Calls function(DTypeTag<dtype>{}) so that the body is compiled once per storage type.
template <class Function>
inline void dispatch_dtype(DType dtype, Function&& function) {
  switch (dtype) {
    case DType::kFloat32: function(DTypeTag<DType::kFloat32>{}); break;
    case DType::kFloat16: function(DTypeTag<DType::kFloat16>{}); break;
    case DType::kBFloat16: function(DTypeTag<DType::kBFloat16>{}); break;
  }
}

// ---- threading -----------------------------------------------------------------------------------------

// Runs body(context, begin, end) over [0, count) on the installed parallel-for (see kernels.h).
void run_parallel(int64_t count, int64_t grain, void* context, CpuParallelBody body);

template <class Function>
inline void parallel_for(int64_t count, int64_t grain, Function&& function) {
  if (count <= 0) return;
  run_parallel(count, grain, &function, [](void* context, int64_t begin, int64_t end) {
    (*static_cast<std::remove_reference_t<Function>*>(context))(begin, end);
  });
}

// Per-thread scratch of at least `count` floats, reused across calls (valid until the thread's next call).
float* thread_scratch(int64_t count, int slot);

// The same for other element types, one array per type.
template <class T>
T* thread_array(int64_t count) {
  thread_local std::vector<T> array;
  if (int64_t(array.size()) < count) array.resize(size_t(count));
  return array.data();
}

// True when the kernels should run their AVX2+FMA build: x86 with AVX2, FMA and F16C, unless
// ORTHRUS_CPU_FMA=0. Decided once per process, so that all results of a process round the same way.
bool use_fused_math();

// ---- kernel bodies, built once per instruction set ---------------------------------------------------------

struct LinearProblem {
  DType dtype;
  const float* x;  // fp32 rows
  int64_t x_row_stride;
  const void* w;
  void* y;
  int64_t rows;
  int64_t out_features;
  int64_t in_features;
  const float* row_scale;  // multiplies row m's fp32 sums before they are rounded (a deferred norm), or null
};

// linear_cpu with LinearProblem::row_scale.
void scaled_linear(DType dtype, const void* x, int64_t x_row_stride, const void* w, void* y, int64_t rows,
                   int64_t out_features, int64_t in_features, const float* row_scale);

// The deferred norm's per-row scales (orthrus/kernels.h) from its sums of squares [rows][tiles].
std::vector<float> deferred_norm_scales(const float* square_sums, int64_t rows, int64_t in_features, float eps);

// Output features per tile: a single decode row reuses nothing across rows, so it spends the registers
// on more weight rows at once.
constexpr int kSingleRowTileCols = 8;
constexpr int kBlockTileRows = 4;
constexpr int kBlockTileCols = 3;
inline int64_t linear_tile_cols(int64_t rows) { return rows == 1 ? kSingleRowTileCols : kBlockTileCols; }

struct AttentionProblem {
  DType dtype;
  const void* q;
  const void* k_cache;
  const void* v_cache;
  int64_t cache_len;
  const void* k_block;
  const void* v_block;
  void* out;
  int64_t rows;
  int64_t q_heads;
  int64_t kv_heads;
  int64_t head_dim;
  bool causal;
  float scale;
};

// Rows per attention task: the rows of a task share every key and value they load.
constexpr int64_t kAttentionRowsPerTask = 8;

namespace portable {
void linear_range(const LinearProblem& problem, int64_t first_tile, int64_t end_tile);
void attention_range(const AttentionProblem& problem, int64_t first_task, int64_t end_task);
}  // namespace portable
#if ORTHRUS_CPU_X86_DISPATCH
namespace fused {
void linear_range(const LinearProblem& problem, int64_t first_tile, int64_t end_tile);
void attention_range(const AttentionProblem& problem, int64_t first_task, int64_t end_task);
}  // namespace fused
#endif

}  // namespace orthrus::cpu
