// The fused decode-step forms on the CPU: the plain linear into scratch, then the separate kernel. The
// CUDA forms do the same in the linear kernel's epilogue; here a fused kernel would save nothing worth
// its code (the scratch is one block of rows). The deferred norm (orthrus/kernels.h) scales the linear's
// fp32 sums, which only the linear itself sees.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu_common.h"
#include "orthrus/kernels.h"

namespace orthrus {

std::vector<float> cpu::deferred_norm_scales(const float* square_sums, int64_t rows, int64_t in_features, float eps) {
  std::vector<float> scales;
  if (!square_sums) return scales;
  const int64_t tiles = square_sum_columns(in_features);
  scales.resize(size_t(rows));
  for (int64_t m = 0; m < rows; ++m) {
    float sum = 0.0f;
    for (int64_t t = 0; t < tiles; ++t) sum += square_sums[m * tiles + t];
    scales[size_t(m)] = 1.0f / std::sqrt(sum / float(in_features) + eps);
  }
  return scales;
}

namespace {

// linear(x, w) with a deferred norm's row scale when square_sums is given.
void projection(DType dtype, const void* x, int64_t x_row_stride, const void* w, void* y, int64_t rows,
                int64_t out_features, int64_t in_features, const float* square_sums, float norm_eps) {
  const std::vector<float> scales = cpu::deferred_norm_scales(square_sums, rows, in_features, norm_eps);
  cpu::scaled_linear(dtype, x, x_row_stride, w, y, rows, out_features, in_features,
                     square_sums ? scales.data() : nullptr);
}

}  // namespace

void linear_silu_mul_cpu(DType dtype, const void* x, int64_t x_row_stride, const void* w, void* y, int64_t rows,
                         int64_t features, int64_t in_features, const float* square_sums, float norm_eps) {
  if (rows <= 0 || features <= 0) return;
  std::vector<unsigned char> gate_up(size_t(rows * 2 * features * cpu::element_bytes(dtype)));
  projection(dtype, x, x_row_stride, w, gate_up.data(), rows, 2 * features, in_features, square_sums, norm_eps);
  silu_mul_cpu(dtype, gate_up.data(), 2 * features, y, rows, features);
}

void linear_qk_norm_rope_store_cpu(DType dtype, const void* x, int64_t x_row_stride, const void* w, int64_t rows,
                                   int64_t in_features, const void* q_norm_weight, const void* k_norm_weight,
                                   const float* rope_cos_sin, const int32_t* positions_start, void* q_out,
                                   void* k_dst, void* v_dst, const int32_t* dst_start, int64_t q_heads,
                                   int64_t kv_heads, int64_t head_dim, float eps, const float* square_sums,
                                   float norm_eps) {
  if (rows <= 0) return;
  const int64_t width = (q_heads + 2 * kv_heads) * head_dim;
  const int64_t element = cpu::element_bytes(dtype);
  std::vector<unsigned char> qkv(size_t(rows * width * element));
  projection(dtype, x, x_row_stride, w, qkv.data(), rows, width, in_features, square_sums, norm_eps);
  const unsigned char* const q = qkv.data();
  const unsigned char* const k = q + q_heads * head_dim * element;
  const unsigned char* const v = k + kv_heads * head_dim * element;
  qk_norm_rope_store_cpu(dtype, q, width, k, width, v, width, q_norm_weight, k_norm_weight, rope_cos_sin,
                         positions_start, q_out, k_dst, v_dst, dst_start, rows, q_heads, kv_heads, head_dim, eps);
}

void linear_add_deferred_norm_cpu(DType dtype, const void* x, int64_t x_row_stride, const void* w, void* residual,
                                  const void* norm_weight, void* weighted, float* square_sums, int64_t rows,
                                  int64_t out_features, int64_t in_features) {
  if (rows <= 0 || out_features <= 0) return;
  std::vector<unsigned char> delta(size_t(rows * out_features * cpu::element_bytes(dtype)));
  linear_cpu(dtype, x, x_row_stride, w, delta.data(), rows, out_features, in_features);
  const int64_t tiles = square_sum_columns(out_features);
  cpu::dispatch_dtype(dtype, [&](auto tag) {
    constexpr DType kDType = decltype(tag)::value;
    using Element = typename cpu::Storage<kDType>::type;
    const size_t width = static_cast<size_t>(out_features);
    std::vector<float> row(width), update(width), scale(width);
    cpu::load_row<kDType>(norm_weight, out_features, scale.data());
    for (int64_t m = 0; m < rows; ++m) {
      Element* const residual_row = static_cast<Element*>(residual) + m * out_features;
      cpu::load_row<kDType>(residual_row, out_features, row.data());
      cpu::load_row<kDType>(reinterpret_cast<const Element*>(delta.data()) + m * out_features, out_features,
                            update.data());
      for (int64_t n = 0; n < out_features; ++n) row[size_t(n)] += update[size_t(n)];
      // The stored (rounded) residual is what the sums and the weighted copy see, as with add_rms_norm.
      cpu::store_row<kDType>(row.data(), out_features, residual_row);
      cpu::load_row<kDType>(residual_row, out_features, row.data());
      for (int64_t t = 0; t < tiles; ++t) {
        float sum = 0.0f;
        for (int64_t n = t * kSquareSumColumns; n < std::min<int64_t>((t + 1) * kSquareSumColumns, out_features); ++n)
          sum += row[size_t(n)] * row[size_t(n)];
        square_sums[m * tiles + t] = sum;
      }
      for (int64_t n = 0; n < out_features; ++n) update[size_t(n)] = row[size_t(n)] * scale[size_t(n)];
      cpu::store_row<kDType>(update.data(), out_features, static_cast<Element*>(weighted) + m * out_features);
    }
  });
}

}  // namespace orthrus
