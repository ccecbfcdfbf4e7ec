// Launchers of the RMSNorm and q/k-norm + RoPE + store kernels (norm_rope.cuh).
#include "norm_rope.cuh"
#include "orthrus/kernels.h"

namespace orthrus {
namespace {

bool aligned_16(const void* pointer) { return reinterpret_cast<uintptr_t>(pointer) % 16 == 0; }

// delta: kRowPlusDelta only; tokens, table, vocab: kEmbedding only.
template <typename T, cuda_detail::NormInput kInput>
cudaError_t launch_rms_norm(void* x, int64_t x_row_stride, const void* delta, const void* weight, void* y,
                            int64_t rows, int64_t dim, float eps, cudaStream_t stream,
                            const int64_t* tokens = nullptr, const void* table = nullptr, int64_t vocab = 0) {
  using namespace cuda_detail;
  const bool vector_access = dim % kRmsNormVector == 0 && x_row_stride % kRmsNormVector == 0 && aligned_16(x) &&
                             aligned_16(weight) && aligned_16(y) && (!delta || aligned_16(delta)) &&
                             (!table || aligned_16(table));
  return launch_kernel(rms_norm_kernel<T, kInput>, dim3(unsigned(rows)), dim3(kRmsNormThreads), 0, stream,
                       static_cast<T*>(x), x_row_stride, static_cast<const T*>(delta), static_cast<const T*>(weight),
                       static_cast<T*>(y), int(dim), eps, vector_access, tokens, static_cast<const T*>(table), vocab);
}

template <typename T, int kHeadDim>
cudaError_t launch_qk_norm_rope_store(const cuda_detail::QkNormRopeParams& params, cudaStream_t stream) {
  using namespace cuda_detail;
  const int items = params.rows * (params.targets.q_heads + params.targets.kv_heads);
  return launch_kernel(qk_norm_rope_store_kernel<T, kHeadDim>, dim3((items + kQkNormWarps - 1) / kQkNormWarps),
                       dim3(kQkNormWarps * 32), 0, stream, params);
}

template <typename T>
cudaError_t launch_qk_norm_rope_store_for_head_dim(const cuda_detail::QkNormRopeParams& params, int64_t head_dim,
                                                   cudaStream_t stream) {
  if (head_dim == 64) return launch_qk_norm_rope_store<T, 64>(params, stream);
  return launch_qk_norm_rope_store<T, 128>(params, stream);
}

}  // namespace

cudaError_t rms_norm_cuda(DType dtype, const void* x, int64_t x_row_stride, const void* weight, void* y,
                          int64_t rows, int64_t dim, float eps, cudaStream_t stream) {
  if (dtype != DType::kBFloat16 && dtype != DType::kFloat16) return cudaErrorInvalidValue;
  if (rows < 1 || rows > 0x7fffffff || dim < 1 || dim > (1 << 24) || x_row_stride < dim) return cudaErrorInvalidValue;
  if (!x || !weight || !y) return cudaErrorInvalidValue;
  // kRow never writes x.
  void* const input = const_cast<void*>(x);
  using cuda_detail::NormInput;
  if (dtype == DType::kBFloat16) {
    return launch_rms_norm<__nv_bfloat16, NormInput::kRow>(input, x_row_stride, nullptr, weight, y, rows, dim, eps,
                                                           stream);
  }
  return launch_rms_norm<__half, NormInput::kRow>(input, x_row_stride, nullptr, weight, y, rows, dim, eps, stream);
}

cudaError_t add_rms_norm_cuda(DType dtype, void* x, const void* delta, const void* weight, void* y, int64_t rows,
                              int64_t dim, float eps, cudaStream_t stream) {
  if (dtype != DType::kBFloat16 && dtype != DType::kFloat16) return cudaErrorInvalidValue;
  if (rows < 1 || rows > 0x7fffffff || dim < 1 || dim > (1 << 24)) return cudaErrorInvalidValue;
  if (!x || !delta || !weight || !y) return cudaErrorInvalidValue;
  using cuda_detail::NormInput;
  if (dtype == DType::kBFloat16) {
    return launch_rms_norm<__nv_bfloat16, NormInput::kRowPlusDelta>(x, dim, delta, weight, y, rows, dim, eps, stream);
  }
  return launch_rms_norm<__half, NormInput::kRowPlusDelta>(x, dim, delta, weight, y, rows, dim, eps, stream);
}

cudaError_t embedding_rms_norm_cuda(DType dtype, const int64_t* tokens, const void* table, int64_t vocab,
                                    const void* weight, void* x, void* y, int64_t rows, int64_t dim, float eps,
                                    cudaStream_t stream) {
  using cuda_detail::NormInput;
  if (dtype != DType::kBFloat16 && dtype != DType::kFloat16) return cudaErrorInvalidValue;
  if (rows < 1 || rows > 0x7fffffff || dim < 1 || dim > (1 << 24) || vocab < 1) return cudaErrorInvalidValue;
  if (!tokens || !table || !weight || !x || !y) return cudaErrorInvalidValue;
  if (dtype == DType::kBFloat16) {
    return launch_rms_norm<__nv_bfloat16, NormInput::kEmbedding>(x, dim, nullptr, weight, y, rows, dim, eps, stream,
                                                                 tokens, table, vocab);
  }
  return launch_rms_norm<__half, NormInput::kEmbedding>(x, dim, nullptr, weight, y, rows, dim, eps, stream, tokens,
                                                        table, vocab);
}

cudaError_t qk_norm_rope_store_cuda(DType dtype, const void* q, int64_t q_row_stride, const void* k,
                                    int64_t k_row_stride, const void* v, int64_t v_row_stride,
                                    const void* q_norm_weight, const void* k_norm_weight,
                                    const float* rope_cos_sin, const int32_t* positions_start, void* q_out,
                                    void* k_dst, void* v_dst, const int32_t* dst_start, int64_t rows,
                                    int64_t q_heads, int64_t kv_heads, int64_t head_dim, float eps,
                                    cudaStream_t stream) {
  if (dtype != DType::kBFloat16 && dtype != DType::kFloat16) return cudaErrorInvalidValue;
  if (rows < 1 || rows > kMaxBlockRows || (head_dim != 64 && head_dim != 128)) return cudaErrorInvalidValue;
  if (q_row_stride < q_heads * head_dim || k_row_stride < kv_heads * head_dim || v_row_stride < kv_heads * head_dim) {
    return cudaErrorInvalidValue;
  }
  if (!q || !k || !v) return cudaErrorInvalidValue;
  cuda_detail::QkNormRopeParams params;
  if (!cuda_detail::make_head_norm_rope_targets(q_norm_weight, k_norm_weight, rope_cos_sin, positions_start, q_out,
                                                k_dst, v_dst, dst_start, q_heads, kv_heads, eps, params.targets)) {
    return cudaErrorInvalidValue;
  }
  params.q = q;
  params.q_row_stride = q_row_stride;
  params.k = k;
  params.k_row_stride = k_row_stride;
  params.v = v;
  params.v_row_stride = v_row_stride;
  params.rows = int(rows);
  if (dtype == DType::kBFloat16) return launch_qk_norm_rope_store_for_head_dim<__nv_bfloat16>(params, head_dim, stream);
  return launch_qk_norm_rope_store_for_head_dim<__half>(params, head_dim, stream);
}

}  // namespace orthrus
