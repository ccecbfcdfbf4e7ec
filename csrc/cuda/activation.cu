// SwiGLU on the device (contract in orthrus/kernels.h). Every element is computed alone, in fp32, and
// rounded once, so its bits cannot depend on the row count. One kernel instead of torch's silu and mul,
// which also lets it take part in the programmatic-dependent-launch chain of the decode step.
#include <algorithm>

#include "element.cuh"
#include "launch.cuh"
#include "orthrus/kernels.h"

namespace orthrus {
namespace {

constexpr int kSiluMulThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kSiluMulThreads)
    silu_mul_kernel(const T* __restrict__ gate_up, int64_t gate_up_row_stride, T* __restrict__ y, int features) {
  cuda_detail::allow_next_kernel_launch();
  cuda_detail::wait_for_previous_kernels();
  const T* const gate = gate_up + size_t(blockIdx.y) * gate_up_row_stride;
  const T* const up = gate + features;
  T* const out = y + size_t(blockIdx.y) * features;
  for (int i = blockIdx.x * kSiluMulThreads + threadIdx.x; i < features; i += gridDim.x * kSiluMulThreads) {
    const float g = cuda_detail::to_float(gate[i]);
    const float u = cuda_detail::to_float(up[i]);
    out[i] = cuda_detail::from_float<T>(cuda_detail::swiglu(g, u));
  }
}

template <typename T>
cudaError_t launch_silu_mul(const void* gate_up, int64_t gate_up_row_stride, void* y, int64_t rows, int64_t features,
                            cudaStream_t stream) {
  // Enough CTAs per row to keep every SM busy for one row; more rows reuse the same split.
  const unsigned blocks_per_row = unsigned(std::min<int64_t>((features + kSiluMulThreads - 1) / kSiluMulThreads, 64));
  return cuda_detail::launch_kernel(silu_mul_kernel<T>, dim3(blocks_per_row, unsigned(rows)), dim3(kSiluMulThreads), 0,
                                    stream, static_cast<const T*>(gate_up), gate_up_row_stride, static_cast<T*>(y),
                                    int(features));
}

}  // namespace

cudaError_t silu_mul_cuda(DType dtype, const void* gate_up, int64_t gate_up_row_stride, void* y, int64_t rows,
                          int64_t features, cudaStream_t stream) {
  if (dtype != DType::kBFloat16 && dtype != DType::kFloat16) return cudaErrorInvalidValue;
  if (rows < 1 || rows > 65535 || features < 1 || features > 0x3fffffff || gate_up_row_stride < 2 * features) {
    return cudaErrorInvalidValue;
  }
  if (!gate_up || !y) return cudaErrorInvalidValue;
  if (dtype == DType::kBFloat16) {
    return launch_silu_mul<__nv_bfloat16>(gate_up, gate_up_row_stride, y, rows, features, stream);
  }
  return launch_silu_mul<__half>(gate_up, gate_up_row_stride, y, rows, features, stream);
}

}  // namespace orthrus
