// Launchers of the row-invariant linear kernel (linear.cuh): argument checks, split choice, dispatch.
#include <cstdint>

#include "linear.cuh"
#include "orthrus/kernels.h"

namespace orthrus {
namespace cuda_detail {
namespace {

template <typename T, int kRowGroups>
cudaError_t launch_for_row_groups(const LinearParams& params, cudaStream_t stream) {
  constexpr int kSmemBytes = linear_smem_bytes<kRowGroups>();
  constexpr int kDepth = linear_weight_depth(kRowGroups);
  // A function attribute, not a stream operation: legal during graph capture.
  cudaError_t status = cudaFuncSetAttribute(linear_rows_kernel<T, kRowGroups, kDepth>,
                                            cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  if (status != cudaSuccess) return status;
  const int tiles = (params.out_features + kLinearTileRows - 1) / kLinearTileRows;
  return launch_clustered_kernel(linear_rows_kernel<T, kRowGroups, kDepth>,
                                 dim3(unsigned(tiles) * unsigned(params.split)), dim3(unsigned(params.split), 1, 1),
                                 dim3(kLinearThreads), kSmemBytes, stream, params);
}

template <typename T>
cudaError_t launch_for_type(const LinearParams& params, cudaStream_t stream) {
  // Only the number of 8-row groups that hold real rows varies with `rows`; see linear.cuh for why that
  // keeps every row's bits unchanged.
  switch ((params.rows + 7) / 8) {
    case 1: return launch_for_row_groups<T, 1>(params, stream);
    case 2: return launch_for_row_groups<T, 2>(params, stream);
    case 3: return launch_for_row_groups<T, 3>(params, stream);
    case 4: return launch_for_row_groups<T, 4>(params, stream);
    case 5: return launch_for_row_groups<T, 5>(params, stream);
    case 6: return launch_for_row_groups<T, 6>(params, stream);
    case 7: return launch_for_row_groups<T, 7>(params, stream);
    case 8: return launch_for_row_groups<T, 8>(params, stream);
    default: return cudaErrorInvalidValue;
  }
}

// Most CTAs a launch should have. A split-K sweep on an H100 (2026-11-22, all 15 Qwen3 decode shapes,
// M = 1 and 32) was fastest at 160 to 192 CTAs: one co-resident wave whose CTAs each stream several
// chunks; more ranks add cluster reductions and a second partial wave. A constant rather than the
// device's SM count: the split changes the summation order, so it must depend on the shape alone.
constexpr int64_t kMaxCtas = 192;

}  // namespace

int linear_split_for_shape(int64_t out_features, int64_t in_features) {
  // The most ranks that stay within kMaxCtas, with at least one chunk per rank.
  const int64_t tiles = (out_features + kLinearTileRows - 1) / kLinearTileRows;
  const int64_t chunks = (in_features + kLinearChunkK - 1) / kLinearChunkK;
  int split = 1;
  while (split < kLinearMaxSplit && split < chunks && tiles * (split + 1) <= kMaxCtas) ++split;
  return split;
}

cudaError_t linear_cuda_with_split(DType dtype, const void* x, int64_t x_row_stride, const void* w, void* y,
                                   int64_t rows, int64_t out_features, int64_t in_features, int split,
                                   cudaStream_t stream) {
  if (dtype != DType::kBFloat16 && dtype != DType::kFloat16) return cudaErrorInvalidValue;
  if (rows < 0 || rows > kMaxBlockRows || out_features < 0 || out_features > INT32_MAX - kLinearTileRows)
    return cudaErrorInvalidValue;
  // 16-byte weight loads: every weight row must start on a 16-byte boundary.
  if (in_features < 8 || in_features % 8 != 0 || in_features > INT32_MAX - kLinearChunkK)
    return cudaErrorInvalidValue;
  const int64_t chunks = (in_features + kLinearChunkK - 1) / kLinearChunkK;
  if (split < 1 || split > kLinearMaxSplit || split > chunks) return cudaErrorInvalidValue;
  if (rows > 1 && x_row_stride < in_features) return cudaErrorInvalidValue;
  if (!x || !w || !y || reinterpret_cast<uintptr_t>(w) % 16 != 0) return cudaErrorInvalidValue;
  if (reinterpret_cast<uintptr_t>(x) % 2 != 0 || reinterpret_cast<uintptr_t>(y) % 2 != 0)
    return cudaErrorInvalidValue;
  if (rows == 0 || out_features == 0) return cudaSuccess;

  LinearParams params;
  params.x = x;
  params.x_row_stride = x_row_stride;
  params.w = w;
  params.y = y;
  params.rows = int(rows);
  params.out_features = int(out_features);
  params.in_features = int(in_features);
  params.chunks = int(chunks);
  params.split = split;
  params.x_vector_loads = reinterpret_cast<uintptr_t>(x) % 16 == 0 && x_row_stride % 8 == 0;
  params.y_vector_stores = reinterpret_cast<uintptr_t>(y) % 8 == 0 && out_features % 4 == 0;
  return dtype == DType::kBFloat16 ? launch_for_type<__nv_bfloat16>(params, stream)
                                   : launch_for_type<__half>(params, stream);
}

}  // namespace cuda_detail

size_t linear_cuda_workspace_bytes(int64_t rows, int64_t out_features, int64_t in_features) {
  // Split-K partial sums meet in the shared memory of a CTA cluster: no device scratch.
  (void)rows;
  (void)out_features;
  (void)in_features;
  return 0;
}

cudaError_t linear_cuda(DType dtype, const void* x, int64_t x_row_stride, const void* w, void* y, int64_t rows,
                        int64_t out_features, int64_t in_features, void* workspace, size_t workspace_bytes,
                        cudaStream_t stream) {
  (void)workspace;
  (void)workspace_bytes;
  return cuda_detail::linear_cuda_with_split(dtype, x, x_row_stride, w, y, rows, out_features, in_features,
                                             cuda_detail::linear_split_for_shape(out_features, in_features),
                                             stream);
}

}  // namespace orthrus
