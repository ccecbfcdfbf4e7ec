// 8-lane float vectors and the fixed-order reductions of the CPU kernels.
//
// This header has no include guard on purpose: it is included once per instruction set, inside that
// set's namespace (orthrus::cpu::portable, orthrus::cpu::fused), the fused copy under
// `#pragma GCC target("avx2,fma,f16c")` (see kernels_fused.cpp). Every helper is then compiled for the
// instruction set of the kernel that uses it (GCC would otherwise lower some vector code of a baseline
// helper before inlining it into AVX2 code), and the two copies have different names, so the linker
// cannot mix them. The includer provides <cstring>, cpu_common.h and, when ORTHRUS_SIMD_FUSED is 1,
// <immintrin.h>.

typedef float Float8 __attribute__((vector_size(32)));
typedef float Float4 __attribute__((vector_size(16)));
typedef int32_t Int32x8 __attribute__((vector_size(32)));
typedef uint32_t UInt32x8 __attribute__((vector_size(32)));
typedef uint16_t UInt16x8 __attribute__((vector_size(16)));

inline Float8 load8(const float* source) {
  Float8 value;
  std::memcpy(&value, source, sizeof(value));
  return value;
}

inline void store8(float* destination, const Float8& value) { std::memcpy(destination, &value, sizeof(value)); }

inline Float8 broadcast8(float value) { return Float8{value, value, value, value, value, value, value, value}; }

// The one order in which the 8 lanes of an accumulator are summed:
// ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)), written with half-vector adds so that it compiles to
// shuffles rather than eight scalar extractions.
inline float reduce8(const Float8& lanes) {
  Float4 low, high;
  std::memcpy(&low, &lanes, sizeof(low));
  std::memcpy(&high, reinterpret_cast<const char*>(&lanes) + sizeof(low), sizeof(high));
  const Float4 pairs = low + high;
  return (pairs[0] + pairs[2]) + (pairs[1] + pairs[3]);
}

// a * b + accumulator: rounded once in the fused build, twice in the portable one. A process runs one
// build for all its kernels (use_fused_math), so all its results round the same way.
inline Float8 multiply_add(const Float8& a, const Float8& b, const Float8& accumulator) {
#if ORTHRUS_SIMD_FUSED
  return Float8(_mm256_fmadd_ps(__m256(a), __m256(b), __m256(accumulator)));
#else
  return a * b + accumulator;
#endif
}

// Eight stored elements widened to float (exact for every storage type).
template <DType kDType>
inline Float8 load8_widened(const typename Storage<kDType>::type* source) {
  if constexpr (kDType == DType::kFloat32) {
    return load8(source);
  } else if constexpr (kDType == DType::kBFloat16) {
    UInt16x8 narrow;
    std::memcpy(&narrow, source, sizeof(narrow));
    return Float8(__builtin_convertvector(narrow, UInt32x8) << 16);
  } else {
#if ORTHRUS_SIMD_FUSED
    return Float8(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(source))));
#else
    Float8 wide;
    for (int i = 0; i < 8; ++i) wide[i] = float16_to_float(source[i]);
    return wide;
#endif
  }
}

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
