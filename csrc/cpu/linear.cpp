// CPU linear driver: widens narrow activations once, splits the output features into tiles over the
// threads, and runs the kernel body (linear_kernel.h) of the process's instruction set. linear_argmax is
// that linear into scratch, then each row's argmax.

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_common.h"

namespace orthrus {

void cpu::scaled_linear(DType dtype, const void* x, int64_t x_row_stride, const void* w, void* y, int64_t rows,
                        int64_t out_features, int64_t in_features, const float* row_scale) {
  if (rows <= 0 || out_features <= 0) return;
  cpu::LinearProblem problem{dtype, nullptr, in_features, w, y, rows, out_features, in_features, row_scale};
  if (dtype == DType::kFloat32) {
    problem.x = static_cast<const float*>(x);
    problem.x_row_stride = x_row_stride;
  } else {
    // The activations are small next to the weights: widen them once, up front.
    float* converted = cpu::thread_scratch(rows * in_features, 1);
    cpu::dispatch_dtype(dtype, [&](auto tag) {
      const auto* source = static_cast<const uint16_t*>(x);
      for (int64_t m = 0; m < rows; ++m)
        cpu::load_row<decltype(tag)::value>(source + m * x_row_stride, in_features, converted + m * in_features);
    });
    problem.x = converted;
  }

  auto range = &cpu::portable::linear_range;
#if ORTHRUS_CPU_X86_DISPATCH
  if (cpu::use_fused_math()) range = &cpu::fused::linear_range;
#endif
  const int64_t cols_per_tile = cpu::linear_tile_cols(rows);
  const int64_t tiles = (out_features + cols_per_tile - 1) / cols_per_tile;
  // Enough multiply-adds per task to pay for waking a thread.
  const int64_t work_per_tile = cols_per_tile * rows * std::max<int64_t>(in_features, 1);
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / work_per_tile);
  cpu::parallel_for(tiles, grain, [&](int64_t begin, int64_t end) { range(problem, begin, end); });
}

void linear_cpu(DType dtype, const void* x, int64_t x_row_stride, const void* w, void* y, int64_t rows,
                int64_t out_features, int64_t in_features) {
  cpu::scaled_linear(dtype, x, x_row_stride, w, y, rows, out_features, in_features, nullptr);
}

void linear_argmax_cpu(DType dtype, const void* x, int64_t x_row_stride, const void* w, int64_t* out,
                       int64_t rows, int64_t out_features, int64_t in_features) {
  if (rows <= 0 || out_features <= 0) return;
  std::vector<unsigned char> logits(size_t(rows * out_features * cpu::element_bytes(dtype)));
  linear_cpu(dtype, x, x_row_stride, w, logits.data(), rows, out_features, in_features);
  cpu::dispatch_dtype(dtype, [&](auto tag) {
    using Storage = cpu::Storage<decltype(tag)::value>;
    const auto* const typed = reinterpret_cast<const typename Storage::type*>(logits.data());
    for (int64_t m = 0; m < rows; ++m) {
      const auto* const row = typed + m * out_features;
      // torch.argmax's choice: a strictly larger value or the first NaN replaces the best, so equal maxima
      // (-0.0 and +0.0 included) keep the smallest column, and nothing replaces a NaN.
      int64_t best = 0;
      float best_value = Storage::load(row[0]);
      for (int64_t n = 1; n < out_features && !std::isnan(best_value); ++n) {
        const float value = Storage::load(row[n]);
        if (value > best_value || std::isnan(value)) {
          best = n;
          best_value = value;
        }
      }
      out[m] = best;
    }
  });
}

}  // namespace orthrus
