// CPU RMSNorm and the fused per-head q/k RMSNorm + rotary embedding + KV-cache store. fp32 math; each
// row (and head) is normalized on its own, so results are row-invariant by construction.

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu_common.h"

// Normalization is cheap next to the matrix products: one portable build serves every CPU.
#define ORTHRUS_SIMD_FUSED 0
namespace orthrus::cpu::normalization {
#include "simd.h"
}  // namespace orthrus::cpu::normalization

namespace orthrus {
namespace cpu {
namespace {

// y = x * (1 / sqrt(mean(x^2) + eps)) * weight, all in fp32, in place on `values`.
inline void rms_normalize(float* values, const float* weight, int64_t dim, float eps) {
  const float inverse_rms = 1.0f / std::sqrt(normalization::sum_of_squares(values, dim) / float(dim) + eps);
  for (int64_t i = 0; i < dim; ++i) values[i] = values[i] * inverse_rms * weight[i];
}

// Rotate-half RoPE: pairs (i, i + half) turn by the angle whose cos / sin sit in columns i / half + i.
inline void rotate(float* values, const float* cos_sin, int64_t head_dim) {
  const int64_t half = head_dim / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float cos = cos_sin[i];
    const float sin = cos_sin[half + i];
    const float first = values[i];
    const float second = values[half + i];
    values[i] = first * cos - second * sin;
    values[half + i] = second * cos + first * sin;
  }
}

}  // namespace
}  // namespace cpu

namespace {

// RMSNorm of each row of x into y; with a delta, x += delta (rounded to the element type) first, in place.
void normalize_rows(DType dtype, void* x, int64_t x_row_stride, const void* delta, const void* weight, void* y,
                    int64_t rows, int64_t dim, float eps) {
  if (rows <= 0 || dim <= 0) return;
  cpu::dispatch_dtype(dtype, [&](auto tag) {
    constexpr DType kDType = decltype(tag)::value;
    using Element = typename cpu::Storage<kDType>::type;
    auto* x_elements = static_cast<Element*>(x);
    const auto* delta_elements = static_cast<const Element*>(delta);
    auto* y_elements = static_cast<Element*>(y);
    const int64_t grain = std::max<int64_t>(1, 16384 / dim);
    cpu::parallel_for(rows, grain, [&](int64_t begin, int64_t end) {
      float* weight_f32 = cpu::thread_scratch(3 * dim, 0);
      float* row_f32 = weight_f32 + dim;
      float* delta_f32 = row_f32 + dim;
      cpu::load_row<kDType>(weight, dim, weight_f32);
      for (int64_t m = begin; m < end; ++m) {
        Element* const x_row = x_elements + m * x_row_stride;
        cpu::load_row<kDType>(x_row, dim, row_f32);
        if (delta_elements) {
          cpu::load_row<kDType>(delta_elements + m * dim, dim, delta_f32);
          for (int64_t i = 0; i < dim; ++i) row_f32[i] += delta_f32[i];
          // Normalise the stored (rounded) sum, exactly what a separate add and norm would see.
          cpu::store_row<kDType>(row_f32, dim, x_row);
          cpu::load_row<kDType>(x_row, dim, row_f32);
        }
        cpu::rms_normalize(row_f32, weight_f32, dim, eps);
        cpu::store_row<kDType>(row_f32, dim, y_elements + m * dim);
      }
    });
  });
}

}  // namespace

void rms_norm_cpu(DType dtype, const void* x, int64_t x_row_stride, const void* weight, void* y,
                  int64_t rows, int64_t dim, float eps) {
  // Without a delta x is only read.
  normalize_rows(dtype, const_cast<void*>(x), x_row_stride, nullptr, weight, y, rows, dim, eps);
}

void add_rms_norm_cpu(DType dtype, void* x, const void* delta, const void* weight, void* y, int64_t rows,
                      int64_t dim, float eps) {
  normalize_rows(dtype, x, dim, delta, weight, y, rows, dim, eps);
}

void embedding_rms_norm_cpu(DType dtype, const int64_t* tokens, const void* table, int64_t vocab,
                            const void* weight, void* x, void* y, int64_t rows, int64_t dim, float eps) {
  if (rows <= 0 || dim <= 0) return;
  const size_t row_bytes = size_t(dim) * size_t(cpu::element_bytes(dtype));
  auto* const x_bytes = static_cast<unsigned char*>(x);
  for (int64_t m = 0; m < rows; ++m) {
    if (tokens[m] >= 0 && tokens[m] < vocab) {
      std::memcpy(x_bytes + m * row_bytes, static_cast<const unsigned char*>(table) + tokens[m] * row_bytes,
                  row_bytes);
      continue;
    }
    const std::vector<float> nan(size_t(dim), std::numeric_limits<float>::quiet_NaN());
    cpu::dispatch_dtype(dtype, [&](auto tag) {
      cpu::store_row<decltype(tag)::value>(nan.data(), dim, x_bytes + m * row_bytes);
    });
  }
  // NaN rows normalise to NaN.
  normalize_rows(dtype, x, dim, nullptr, weight, y, rows, dim, eps);
}

void qk_norm_rope_store_cpu(DType dtype, const void* q, int64_t q_row_stride, const void* k,
                            int64_t k_row_stride, const void* v, int64_t v_row_stride,
                            const void* q_norm_weight, const void* k_norm_weight, const float* rope_cos_sin,
                            const int32_t* positions_start, void* q_out, void* k_dst, void* v_dst,
                            const int32_t* dst_start, int64_t rows, int64_t q_heads, int64_t kv_heads,
                            int64_t head_dim, float eps) {
  if (rows <= 0 || head_dim <= 0) return;
  const int64_t first_position = positions_start[0];
  const int64_t first_destination = dst_start[0];
  cpu::dispatch_dtype(dtype, [&](auto tag) {
    constexpr DType kDType = decltype(tag)::value;
    using Element = typename cpu::Storage<kDType>::type;
    const auto* q_elements = static_cast<const Element*>(q);
    const auto* k_elements = static_cast<const Element*>(k);
    const auto* v_elements = static_cast<const Element*>(v);
    auto* q_out_elements = static_cast<Element*>(q_out);
    auto* k_dst_elements = static_cast<Element*>(k_dst);
    auto* v_dst_elements = static_cast<Element*>(v_dst);
    const int64_t q_width = q_heads * head_dim;
    const int64_t kv_width = kv_heads * head_dim;
    const int64_t grain = std::max<int64_t>(1, 8192 / (q_width + 2 * kv_width));
    cpu::parallel_for(rows, grain, [&](int64_t begin, int64_t end) {
      float* q_weight = cpu::thread_scratch(3 * head_dim, 0);
      float* k_weight = q_weight + head_dim;
      float* head = k_weight + head_dim;
      cpu::load_row<kDType>(q_norm_weight, head_dim, q_weight);
      cpu::load_row<kDType>(k_norm_weight, head_dim, k_weight);
      for (int64_t m = begin; m < end; ++m) {
        const float* cos_sin = rope_cos_sin + (first_position + m) * head_dim;
        for (int64_t h = 0; h < q_heads; ++h) {
          cpu::load_row<kDType>(q_elements + m * q_row_stride + h * head_dim, head_dim, head);
          cpu::rms_normalize(head, q_weight, head_dim, eps);
          cpu::rotate(head, cos_sin, head_dim);
          cpu::store_row<kDType>(head, head_dim, q_out_elements + m * q_width + h * head_dim);
        }
        const int64_t destination = (first_destination + m) * kv_width;
        for (int64_t h = 0; h < kv_heads; ++h) {
          cpu::load_row<kDType>(k_elements + m * k_row_stride + h * head_dim, head_dim, head);
          cpu::rms_normalize(head, k_weight, head_dim, eps);
          cpu::rotate(head, cos_sin, head_dim);
          cpu::store_row<kDType>(head, head_dim, k_dst_elements + destination + h * head_dim);
        }
        std::copy(v_elements + m * v_row_stride, v_elements + m * v_row_stride + kv_width,
                  v_dst_elements + destination);
      }
    });
  });
}

}  // namespace orthrus

namespace orthrus {

void silu_mul_cpu(DType dtype, const void* gate_up, int64_t gate_up_row_stride, void* y, int64_t rows,
                  int64_t features) {
  if (rows <= 0 || features <= 0) return;
  cpu::dispatch_dtype(dtype, [&](auto tag) {
    constexpr DType kDType = decltype(tag)::value;
    using Element = typename cpu::Storage<kDType>::type;
    const auto* input = static_cast<const Element*>(gate_up);
    auto* output = static_cast<Element*>(y);
    const int64_t grain = std::max<int64_t>(1, 16384 / features);
    cpu::parallel_for(rows, grain, [&](int64_t begin, int64_t end) {
      float* gate = cpu::thread_scratch(2 * features, 0);
      float* up = gate + features;
      for (int64_t m = begin; m < end; ++m) {
        cpu::load_row<kDType>(input + m * gate_up_row_stride, features, gate);
        cpu::load_row<kDType>(input + m * gate_up_row_stride + features, features, up);
        // A plain scalar loop: every element takes the same expf, wherever it sits in the tensor.
        for (int64_t i = 0; i < features; ++i) gate[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
        cpu::store_row<kDType>(gate, features, output + m * features);
      }
    });
  });
}

}  // namespace orthrus
