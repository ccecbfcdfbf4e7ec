// Body of the CPU linear kernel (y = x w^T, fp32 accumulation). No include guard: built once per
// instruction set inside its namespace, after simd.h (see simd.h). The driver is in linear.cpp.
//
// Every output element y[m, n] is one dot product computed the same way whatever the tile it falls in:
// an 8-lane accumulator over k < in_features rounded down to a multiple of 8 (lane j takes k = j mod 8,
// in increasing k), reduce8, then the remaining k in order. Tiles only decide which dot products run side
// by side (to reuse loaded vectors), so the shape of the call never changes a result's bits. Partial tiles
// repeat their last row / weight row instead of having their own code path, and discard the extra results.

// Helpers have internal linkage: calls between them are direct, and each build keeps its own copies.
namespace {

template <int kRows, int kCols>
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
      for (int n = 0; n < kCols; ++n) accumulators[m][n] = multiply_add(x, weights[n], accumulators[m][n]);
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

// Tiles [first_tile, end_tile) of kCols output features each, every one against all rows of x: the tile's
// weight rows are read from memory once and stay in cache while every row uses them.
template <DType kDType, int kRows, int kCols>
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
      dot_tile<kRows, kCols>(x_rows, w_rows, in_features, results);
      for (int64_t m = 0; m < valid_rows; ++m) {
        const float* const row_results = results + m * kCols;
        Element* const row_y = y + (m0 + m) * problem.out_features + n0;
        if (problem.row_scale) {
          const float scale = problem.row_scale[m0 + m];
          for (int64_t n = 0; n < valid_cols; ++n) row_y[n] = Storage<kDType>::store(row_results[n] * scale);
        } else {
          for (int64_t n = 0; n < valid_cols; ++n) row_y[n] = Storage<kDType>::store(row_results[n]);
        }
      }
    }
  }
}

}  // namespace

void linear_range(const LinearProblem& problem, int64_t first_tile, int64_t end_tile) {
  dispatch_dtype(problem.dtype, [&](auto tag) {
    constexpr DType kDType = decltype(tag)::value;
    if (problem.rows == 1) {
      linear_tiles<kDType, 1, kSingleRowTileCols>(problem, first_tile, end_tile);
    } else {
      linear_tiles<kDType, kBlockTileRows, kBlockTileCols>(problem, first_tile, end_tile);
    }
  });
}
