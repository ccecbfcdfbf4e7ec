// CPU linear: y = x w^T with fp32 accumulation.
//
// Every output element y[m, n] is one dot product computed the same way whatever the tile it falls in:
// an 8-lane accumulator over k < in_features rounded down to a multiple of 8 (lane j takes k = j mod 8,
// in increasing k), reduce8, then the remaining k in order. Tiles only decide which dot products run side
// by side (to reuse loaded vectors), so the shape of the call never changes a result's bits. Partial tiles
// repeat their last row / weight row instead of having their own code path, and discard the extra results.
//
// Work is split over groups of output features: each weight row is read from memory once per call and
// used for every row of x while it is in cache.

#include <algorithm>

#include "cpu_common.h"

namespace orthrus {
namespace cpu {
namespace {

template <class Math, int kRows, int kCols>
inline void dot_tile(const float* const* x_rows, const float* const* w_rows, int64_t in_features,
                     float* results /* [kRows][kCols] */) {
  Float8 accumulators[kRows][kCols];
  for (int m = 0; m < kRows; ++m)
    for (int n = 0; n < kCols; ++n) accumulators[m][n] = broadcast8(0.0f);
  const int64_t vector_end = in_features & ~int64_t(7);
  for (int64_t k = 0; k < vector_end; k += 8) {
    Float8 weights[kCols];
    for (int n = 0; n < kCols; ++n) weights[n] = load8(w_rows[n] + k);
    for (int m = 0; m < kRows; ++m) {
      const Float8 x = load8(x_rows[m] + k);
      for (int n = 0; n < kCols; ++n) accumulators[m][n] = Math::multiply_add(x, weights[n], accumulators[m][n]);
    }
  }
  for (int m = 0; m < kRows; ++m) {
    for (int n = 0; n < kCols; ++n) {
      float sum = reduce8(accumulators[m][n]);
      for (int64_t k = vector_end; k < in_features; ++k) sum = x_rows[m][k] * w_rows[n][k] + sum;
      results[m * kCols + n] = sum;
    }
  }
}

struct LinearProblem {
  DType dtype;
  const float* x;  // fp32 rows
  int64_t x_row_stride;
  const void* w;
  void* y;
  int64_t rows;
  int64_t out_features;
  int64_t in_features;
};

// One decode row reuses nothing across rows, so it spends the registers on more weight rows at once.
constexpr int kSingleRowCols = 8;
constexpr int kBlockTileRows = 4;
constexpr int kBlockTileCols = 3;

template <class Math, DType kDType, int kRows, int kCols>
inline void linear_tiles(const LinearProblem& problem, int64_t first_tile, int64_t end_tile) {
  using Element = typename Storage<kDType>::type;
  const int64_t in_features = problem.in_features;
  const auto* weights = static_cast<const Element*>(problem.w);
  auto* y = static_cast<Element*>(problem.y);
  float* converted_weights = kDType == DType::kFloat32 ? nullptr : thread_scratch(kCols * in_features, 0);

  for (int64_t tile = first_tile; tile < end_tile; ++tile) {
    const int64_t n0 = tile * kCols;
    const int64_t valid_cols = std::min<int64_t>(kCols, problem.out_features - n0);
    const float* w_rows[kCols];
    for (int n = 0; n < kCols; ++n) {
      const int64_t row = n0 + std::min<int64_t>(n, valid_cols - 1);
      if constexpr (kDType == DType::kFloat32) {
        w_rows[n] = reinterpret_cast<const float*>(weights) + row * in_features;
      } else {
        float* destination = converted_weights + n * in_features;
        if (n < valid_cols) load_row<kDType>(weights + row * in_features, in_features, destination);
        w_rows[n] = n < valid_cols ? destination : w_rows[n - 1];
      }
    }
    for (int64_t m0 = 0; m0 < problem.rows; m0 += kRows) {
      const int64_t valid_rows = std::min<int64_t>(kRows, problem.rows - m0);
      const float* x_rows[kRows];
      for (int m = 0; m < kRows; ++m)
        x_rows[m] = problem.x + (m0 + std::min<int64_t>(m, valid_rows - 1)) * problem.x_row_stride;
      float results[kRows * kCols];
      dot_tile<Math, kRows, kCols>(x_rows, w_rows, in_features, results);
      for (int64_t m = 0; m < valid_rows; ++m)
        for (int64_t n = 0; n < valid_cols; ++n)
          y[(m0 + m) * problem.out_features + n0 + n] = Storage<kDType>::store(results[m * kCols + n]);
    }
  }
}

template <class Math, DType kDType>
inline void linear_range(const LinearProblem& problem, int64_t first_tile, int64_t end_tile) {
  if (problem.rows == 1) {
    linear_tiles<Math, kDType, 1, kSingleRowCols>(problem, first_tile, end_tile);
  } else {
    linear_tiles<Math, kDType, kBlockTileRows, kBlockTileCols>(problem, first_tile, end_tile);
  }
}

template <DType kDType>
void linear_range_plain(const LinearProblem& problem, int64_t first_tile, int64_t end_tile) {
  linear_range<PlainMath, kDType>(problem, first_tile, end_tile);
}

#if ORTHRUS_CPU_X86_DISPATCH
// flatten pulls the whole tile loop into this AVX2 function so that it is all compiled for AVX2.
template <DType kDType>
__attribute__((target("avx2,fma"), flatten)) void linear_range_fused(const LinearProblem& problem,
                                                                     int64_t first_tile, int64_t end_tile) {
  linear_range<FusedMath, kDType>(problem, first_tile, end_tile);
}
#endif

template <DType kDType>
void run_linear(const LinearProblem& problem) {
  auto range = &linear_range_plain<kDType>;
#if ORTHRUS_CPU_X86_DISPATCH
  if (use_fused_math()) range = &linear_range_fused<kDType>;
#endif
  const int64_t cols_per_tile = problem.rows == 1 ? kSingleRowCols : kBlockTileCols;
  const int64_t tiles = (problem.out_features + cols_per_tile - 1) / cols_per_tile;
  // Enough multiply-adds per task to pay for waking a thread.
  const int64_t work_per_tile = cols_per_tile * problem.rows * problem.in_features;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(work_per_tile, 1));
  parallel_for(tiles, grain, [&](int64_t begin, int64_t end) { range(problem, begin, end); });
}

}  // namespace
}  // namespace cpu

void linear_cpu(DType dtype, const void* x, int64_t x_row_stride, const void* w, void* y, int64_t rows,
                int64_t out_features, int64_t in_features) {
  if (rows <= 0 || out_features <= 0) return;
  cpu::dispatch_dtype(dtype, [&](auto tag) {
    constexpr DType kDType = decltype(tag)::value;
    cpu::LinearProblem problem{dtype, nullptr, in_features, w, y, rows, out_features, in_features};
    if constexpr (kDType == DType::kFloat32) {
      problem.x = static_cast<const float*>(x);
      problem.x_row_stride = x_row_stride;
    } else {
      // The activations are small next to the weights: widen them once, up front.
      float* converted = cpu::thread_scratch(rows * in_features, 1);
      const auto* source = static_cast<const uint16_t*>(x);
      for (int64_t m = 0; m < rows; ++m)
        cpu::load_row<kDType>(source + m * x_row_stride, in_features, converted + m * in_features);
      problem.x = converted;
    }
    cpu::run_linear<kDType>(problem);
  });
}

}  // namespace orthrus
