// Shared pieces of the CPU kernels: storage conversions, 8-lane float vectors, the fixed-order reductions
// that make results row-invariant, and the parallel-for used by every kernel.
//
// Row invariance on the CPU rests on two rules: every output element is computed by one fixed sequence of
// floating-point operations whatever the tiling around it, and no operation is fused unless the code says
// so (the build passes -ffp-contract=off; fused multiply-adds are explicit, see FusedMath).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "orthrus/kernels.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
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

// ---- 8-lane vectors and fixed-order reductions ---------------------------------------------------------

typedef float Float8 __attribute__((vector_size(32)));

inline Float8 load8(const float* source) {
  Float8 value;
  std::memcpy(&value, source, sizeof(value));
  return value;
}

inline void store8(float* destination, const Float8& value) { std::memcpy(destination, &value, sizeof(value)); }

inline Float8 broadcast8(float value) { return Float8{value, value, value, value, value, value, value, value}; }

// The one order in which the 8 lanes of an accumulator are summed.
inline float reduce8(const Float8& lanes) {
  const float low = (lanes[0] + lanes[4]) + (lanes[2] + lanes[6]);
  const float high = (lanes[1] + lanes[5]) + (lanes[3] + lanes[7]);
  return low + high;
}

// Multiply-add flavours. PlainMath rounds twice (portable baseline); FusedMath rounds once and is used
// for the whole process when the CPU has AVX2+FMA. A process never mixes them.
struct PlainMath {
  static Float8 multiply_add(const Float8& a, const Float8& b, const Float8& accumulator) {
    return a * b + accumulator;
  }
};

#if ORTHRUS_CPU_X86_DISPATCH
struct FusedMath {
  __attribute__((target("avx2,fma"))) static Float8 multiply_add(Float8 a, Float8 b, Float8 accumulator) {
    return Float8(_mm256_fmadd_ps(__m256(a), __m256(b), __m256(accumulator)));
  }
};
#endif

// True when kernels should take their FusedMath path: x86 with AVX2 and FMA, unless ORTHRUS_CPU_FMA=0.
bool use_fused_math();

// Sum of squares in the fixed order used by every normalization: 8 lanes over i mod 8, reduce8, then the
// tail in index order.
inline float sum_of_squares(const float* values, int64_t count) {
  Float8 lanes = broadcast8(0.0f);
  const int64_t vector_end = count & ~int64_t(7);
  for (int64_t i = 0; i < vector_end; i += 8) {
    const Float8 value = load8(values + i);
    lanes = value * value + lanes;
  }
  float sum = reduce8(lanes);
  for (int64_t i = vector_end; i < count; ++i) sum = values[i] * values[i] + sum;
  return sum;
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

}  // namespace orthrus::cpu
