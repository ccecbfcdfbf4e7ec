// The fused decode-step forms on the CPU: the plain linear into scratch, then the separate kernel. The
// CUDA forms do the same in the linear kernel's epilogue; here a fused kernel would save nothing worth
// its code (the scratch is one block of rows).
#include <cstdint>
#include <vector>

#include "cpu_common.h"
#include "orthrus/kernels.h"

namespace orthrus {

void linear_silu_mul_cpu(DType dtype, const void* x, int64_t x_row_stride, const void* w, void* y, int64_t rows,
                         int64_t features, int64_t in_features) {
  if (rows <= 0 || features <= 0) return;
  std::vector<unsigned char> gate_up(size_t(rows * 2 * features * cpu::element_bytes(dtype)));
  linear_cpu(dtype, x, x_row_stride, w, gate_up.data(), rows, 2 * features, in_features);
  silu_mul_cpu(dtype, gate_up.data(), 2 * features, y, rows, features);
}

void linear_qk_norm_rope_store_cpu(DType dtype, const void* x, int64_t x_row_stride, const void* w, int64_t rows,
                                   int64_t in_features, const void* q_norm_weight, const void* k_norm_weight,
                                   const float* rope_cos_sin, const int32_t* positions_start, void* q_out,
                                   void* k_dst, void* v_dst, const int32_t* dst_start, int64_t q_heads,
                                   int64_t kv_heads, int64_t head_dim, float eps) {
  if (rows <= 0) return;
  const int64_t width = (q_heads + 2 * kv_heads) * head_dim;
  const int64_t element = cpu::element_bytes(dtype);
  std::vector<unsigned char> qkv(size_t(rows * width * element));
  linear_cpu(dtype, x, x_row_stride, w, qkv.data(), rows, width, in_features);
  const unsigned char* const q = qkv.data();
  const unsigned char* const k = q + q_heads * head_dim * element;
  const unsigned char* const v = k + kv_heads * head_dim * element;
  qk_norm_rope_store_cpu(dtype, q, width, k, width, v, width, q_norm_weight, k_norm_weight, rope_cos_sin,
                         positions_start, q_out, k_dst, v_dst, dst_start, rows, q_heads, kv_heads, head_dim, eps);
}

}  // namespace orthrus
