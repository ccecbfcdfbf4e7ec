// Launchers of the row-invariant linear kernel (linear.cuh): argument checks, split choice, dispatch.
#include <algorithm>
#include <cstdint>

#include "linear.cuh"
#include "orthrus/kernels.h"

namespace orthrus {
namespace cuda_detail {
namespace {

// The x buffers take x_smem_bytes of shared memory (at most max_x_smem_bytes), a deferred norm's sums of
// squares follow them.
template <typename T, int kRowGroups, LinearEpilogue kEpilogue, int kHeadDim, bool kXResident>
cudaError_t launch_linear_kernel(LinearParams params, int tiles, int max_x_smem_bytes, int x_smem_bytes,
                                 cudaStream_t stream) {
  constexpr int kDepth = linear_weight_depth(kRowGroups);
  constexpr int kMaxSquareSumBytes = kRowGroups * 8 * kLinearMaxSquareSumTiles * int(sizeof(float));
  auto* const kernel = linear_rows_kernel<T, kRowGroups, kDepth, kEpilogue, kHeadDim, kXResident>;
  // A function attribute, not a stream operation: legal during graph capture. Always the most this kernel
  // can use, so that no launch lowers it under a captured one.
  cudaError_t status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            max_x_smem_bytes + kMaxSquareSumBytes);
  if (status != cudaSuccess) return status;
  params.x_smem_bytes = x_smem_bytes;
  const int square_sum_bytes = params.square_sums ? params.rows * params.square_sum_tiles * int(sizeof(float)) : 0;
  return launch_clustered_kernel(kernel, dim3(unsigned(tiles) * unsigned(params.split)),
                                 dim3(unsigned(params.cluster_tiles * params.split), 1, 1), dim3(kLinearThreads),
                                 x_smem_bytes + square_sum_bytes, stream, params);
}

template <typename T, int kRowGroups, LinearEpilogue kEpilogue, int kHeadDim>
cudaError_t launch_for_row_groups(const LinearParams& params, int tiles, cudaStream_t stream) {
  if constexpr (kRowGroups == 1) {
    const int chunks_per_rank = (params.chunks + params.split - 1) / params.split;
    if (chunks_per_rank <= kLinearResidentMaxChunks) {
      constexpr int kBuffer = linear_x_buffer_bytes<kRowGroups>();
      return launch_linear_kernel<T, kRowGroups, kEpilogue, kHeadDim, true>(
          params, tiles, kLinearResidentMaxChunks * kBuffer, chunks_per_rank * kBuffer, stream);
    }
  }
  constexpr int kSmemBytes = linear_smem_bytes<kRowGroups>();
  return launch_linear_kernel<T, kRowGroups, kEpilogue, kHeadDim, false>(params, tiles, kSmemBytes, kSmemBytes,
                                                                        stream);
}

// A consumer's deferred norm (orthrus/kernels.h): false when the sums cannot be staged.
bool set_deferred_norm(LinearParams& params, const float* square_sums, float norm_eps) {
  if (!square_sums) return true;
  const int64_t tiles = square_sum_columns(params.in_features);
  if (tiles > kLinearMaxSquareSumTiles || reinterpret_cast<uintptr_t>(square_sums) % alignof(float) != 0) return false;
  params.square_sums = square_sums;
  params.square_sum_tiles = int(tiles);
  params.norm_eps = norm_eps;
  params.square_sum_vector_copies = tiles % 4 == 0 && reinterpret_cast<uintptr_t>(square_sums) % 16 == 0;
  return true;
}

template <typename T, LinearEpilogue kEpilogue, int kHeadDim>
cudaError_t launch_for_rows(const LinearParams& params, int tiles, cudaStream_t stream) {
  // Only the number of 8-row groups that hold real rows varies with `rows`; see linear.cuh for why that
  // keeps every row's bits unchanged.
  switch ((params.rows + 7) / 8) {
    case 1: return launch_for_row_groups<T, 1, kEpilogue, kHeadDim>(params, tiles, stream);
    case 2: return launch_for_row_groups<T, 2, kEpilogue, kHeadDim>(params, tiles, stream);
    case 3: return launch_for_row_groups<T, 3, kEpilogue, kHeadDim>(params, tiles, stream);
    case 4: return launch_for_row_groups<T, 4, kEpilogue, kHeadDim>(params, tiles, stream);
    case 5: return launch_for_row_groups<T, 5, kEpilogue, kHeadDim>(params, tiles, stream);
    case 6: return launch_for_row_groups<T, 6, kEpilogue, kHeadDim>(params, tiles, stream);
    case 7: return launch_for_row_groups<T, 7, kEpilogue, kHeadDim>(params, tiles, stream);
    case 8: return launch_for_row_groups<T, 8, kEpilogue, kHeadDim>(params, tiles, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <LinearEpilogue kEpilogue, int kHeadDim = 0>
cudaError_t launch_for_type(DType dtype, const LinearParams& params, int tiles, cudaStream_t stream) {
  return dtype == DType::kBFloat16 ? launch_for_rows<__nv_bfloat16, kEpilogue, kHeadDim>(params, tiles, stream)
                                   : launch_for_rows<__half, kEpilogue, kHeadDim>(params, tiles, stream);
}

constexpr int kArgmaxFinishThreads = 256;

// One CTA per row: out[row] = the column of the largest of the row's kArgmax keys (keys [rows][tiles]).
__global__ void __launch_bounds__(kArgmaxFinishThreads)
    linear_argmax_finish_kernel(const uint64_t* __restrict__ keys, int tiles, int64_t* __restrict__ out) {
  __shared__ uint64_t warp_keys[kArgmaxFinishThreads / 32];
  allow_next_kernel_launch();
  wait_for_previous_kernels();
  const uint64_t* const row_keys = keys + int64_t(blockIdx.x) * tiles;
  uint64_t key = 0;
  for (int tile = int(threadIdx.x); tile < tiles; tile += kArgmaxFinishThreads) {
    const uint64_t candidate = row_keys[tile];
    key = candidate > key ? candidate : key;
  }
  key = max_over_lanes<32>(key, 0xFFFFFFFFu);
  if (threadIdx.x % 32 == 0) warp_keys[threadIdx.x / 32] = key;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int warp = 1; warp < kArgmaxFinishThreads / 32; ++warp) key = warp_keys[warp] > key ? warp_keys[warp] : key;
    out[blockIdx.x] = int64_t(0xFFFFFFFFu - uint32_t(key));
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

namespace {

// The checks every epilogue shares, and the fields they share. False for arguments out of range.
bool make_linear_params(DType dtype, const void* x, int64_t x_row_stride, const void* w, int64_t rows,
                        int64_t weight_rows, int64_t in_features, int split, int cluster_tiles,
                        LinearParams& params) {
  if (dtype != DType::kBFloat16 && dtype != DType::kFloat16) return false;
  if (rows < 0 || rows > kMaxBlockRows || weight_rows < 0 || weight_rows > INT32_MAX - kLinearTileRows) return false;
  // 16-byte weight loads: every weight row must start on a 16-byte boundary.
  if (in_features < 8 || in_features % 8 != 0 || in_features > INT32_MAX - kLinearChunkK) return false;
  const int64_t chunks = (in_features + kLinearChunkK - 1) / kLinearChunkK;
  if (split < 1 || split * cluster_tiles > kLinearMaxSplit || split > chunks) return false;
  if (rows > 1 && x_row_stride < in_features) return false;
  if (!x || !w || reinterpret_cast<uintptr_t>(w) % 16 != 0 || reinterpret_cast<uintptr_t>(x) % 2 != 0) return false;
  params = LinearParams{};
  params.x = x;
  params.x_row_stride = x_row_stride;
  params.w = w;
  params.rows = int(rows);
  params.out_features = int(weight_rows);
  params.in_features = int(in_features);
  params.chunks = int(chunks);
  params.split = split;
  params.cluster_tiles = cluster_tiles;
  params.x_vector_loads = reinterpret_cast<uintptr_t>(x) % 16 == 0 && x_row_stride % 8 == 0;
  return true;
}

}  // namespace

cudaError_t linear_cuda_with_split(DType dtype, const void* x, int64_t x_row_stride, const void* w, void* y,
                                   int64_t rows, int64_t out_features, int64_t in_features, int split,
                                   cudaStream_t stream) {
  LinearParams params;
  if (!make_linear_params(dtype, x, x_row_stride, w, rows, out_features, in_features, split, 1, params) || !y ||
      reinterpret_cast<uintptr_t>(y) % 2 != 0) {
    return cudaErrorInvalidValue;
  }
  if (rows == 0 || out_features == 0) return cudaSuccess;
  params.y = y;
  params.y_vector_stores = reinterpret_cast<uintptr_t>(y) % 8 == 0 && out_features % 4 == 0;
  const int tiles = int((out_features + kLinearTileRows - 1) / kLinearTileRows);
  return launch_for_type<LinearEpilogue::kStore>(dtype, params, tiles, stream);
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

cudaError_t linear_silu_mul_cuda(DType dtype, const void* x, int64_t x_row_stride, const void* w, void* y,
                                 int64_t rows, int64_t features, int64_t in_features, const float* square_sums,
                                 float norm_eps, cudaStream_t stream) {
  using namespace cuda_detail;
  // The split of the plain linear over the same weights: the same sums, so the same bits.
  const int split = linear_split_for_shape(2 * features, in_features);
  LinearParams params;
  if (features < 0 || features > INT32_MAX / 2 ||
      !make_linear_params(dtype, x, x_row_stride, w, rows, 2 * features, in_features, split, 1, params) || !y ||
      reinterpret_cast<uintptr_t>(y) % 2 != 0 || !set_deferred_norm(params, square_sums, norm_eps)) {
    return cudaErrorInvalidValue;
  }
  if (rows == 0 || features == 0) return cudaSuccess;
  params.y = y;
  params.features = int(features);
  params.y_vector_stores = reinterpret_cast<uintptr_t>(y) % 8 == 0 && features % 4 == 0;
  const int tiles = int((features + kLinearTileRows / 2 - 1) / (kLinearTileRows / 2));
  return launch_for_type<LinearEpilogue::kSiluMul>(dtype, params, tiles, stream);
}

cudaError_t linear_add_deferred_norm_cuda(DType dtype, const void* x, int64_t x_row_stride, const void* w,
                                          void* residual, const void* norm_weight, void* weighted,
                                          float* square_sums, int64_t rows, int64_t out_features,
                                          int64_t in_features, cudaStream_t stream) {
  using namespace cuda_detail;
  // The plain linear's split: the same sums, so the residual gets the same update as linear + add_rms_norm.
  const int split = linear_split_for_shape(out_features, in_features);
  LinearParams params;
  if (!make_linear_params(dtype, x, x_row_stride, w, rows, out_features, in_features, split, 1, params) ||
      !residual || !norm_weight || !weighted || !square_sums ||
      reinterpret_cast<uintptr_t>(residual) % 2 != 0 || reinterpret_cast<uintptr_t>(norm_weight) % 2 != 0 ||
      reinterpret_cast<uintptr_t>(weighted) % 2 != 0 ||
      reinterpret_cast<uintptr_t>(square_sums) % alignof(float) != 0) {
    return cudaErrorInvalidValue;
  }
  if (rows == 0 || out_features == 0) return cudaSuccess;
  params.y = weighted;
  params.residual = residual;
  params.norm_weight = norm_weight;
  params.square_sums_out = square_sums;
  params.residual_vector_access = out_features % 4 == 0 && reinterpret_cast<uintptr_t>(residual) % 8 == 0 &&
                                  reinterpret_cast<uintptr_t>(norm_weight) % 8 == 0 &&
                                  reinterpret_cast<uintptr_t>(weighted) % 8 == 0;
  const int tiles = int((out_features + kLinearTileRows - 1) / kLinearTileRows);
  return launch_for_type<LinearEpilogue::kResidualNorm>(dtype, params, tiles, stream);
}

size_t linear_argmax_cuda_workspace_bytes(int64_t rows, int64_t out_features) {
  // One uint64 key per row and 64-wide output tile.
  if (rows <= 0 || out_features <= 0) return 0;
  const int64_t tiles = (out_features + cuda_detail::kLinearTileRows - 1) / cuda_detail::kLinearTileRows;
  return size_t(rows) * size_t(tiles) * sizeof(uint64_t);
}

cudaError_t linear_argmax_cuda(DType dtype, const void* x, int64_t x_row_stride, const void* w, int64_t* out,
                               int64_t rows, int64_t out_features, int64_t in_features, void* workspace,
                               size_t workspace_bytes, cudaStream_t stream) {
  using namespace cuda_detail;
  // The plain linear's split: the same sums, so the same rounded logits.
  const int split = linear_split_for_shape(out_features, in_features);
  LinearParams params;
  if (out_features < 1 ||
      !make_linear_params(dtype, x, x_row_stride, w, rows, out_features, in_features, split, 1, params) || !out ||
      reinterpret_cast<uintptr_t>(out) % alignof(int64_t) != 0 ||
      workspace_bytes < linear_argmax_cuda_workspace_bytes(rows, out_features) ||
      (rows > 0 && (!workspace || reinterpret_cast<uintptr_t>(workspace) % alignof(uint64_t) != 0))) {
    return cudaErrorInvalidValue;
  }
  if (rows == 0) return cudaSuccess;
  params.y = workspace;
  const int tiles = int((out_features + kLinearTileRows - 1) / kLinearTileRows);
  const cudaError_t status = launch_for_type<LinearEpilogue::kArgmax>(dtype, params, tiles, stream);
  if (status != cudaSuccess) return status;
  return launch_kernel(linear_argmax_finish_kernel, dim3(unsigned(rows)), dim3(kArgmaxFinishThreads), 0, stream,
                       static_cast<const uint64_t*>(workspace), tiles, out);
}

cudaError_t linear_qk_norm_rope_store_cuda(DType dtype, const void* x, int64_t x_row_stride, const void* w,
                                           int64_t rows, int64_t in_features, const void* q_norm_weight,
                                           const void* k_norm_weight, const float* rope_cos_sin,
                                           const int32_t* positions_start, void* q_out, void* k_dst, void* v_dst,
                                           const int32_t* dst_start, int64_t q_heads, int64_t kv_heads,
                                           int64_t head_dim, float eps, const float* square_sums, float norm_eps,
                                           cudaStream_t stream) {
  using namespace cuda_detail;
  if (head_dim != 64 && head_dim != 128) return cudaErrorInvalidValue;
  HeadNormRopeTargets heads;
  if (!make_head_norm_rope_targets(q_norm_weight, k_norm_weight, rope_cos_sin, positions_start, q_out, k_dst, v_dst,
                                   dst_start, q_heads, kv_heads, eps, heads)) {
    return cudaErrorInvalidValue;
  }
  const int64_t weight_rows = (q_heads + 2 * kv_heads) * head_dim;
  const int cluster_tiles = int(head_dim / kLinearTileRows);
  // The plain linear's split while a cluster of whole heads stays portable (up to 4 ranks at head_dim
  // 128: every Qwen3 shape), so the sums match it bit for bit.
  const int split = std::min(linear_split_for_shape(weight_rows, in_features), kLinearMaxSplit / cluster_tiles);
  LinearParams params;
  if (!make_linear_params(dtype, x, x_row_stride, w, rows, weight_rows, in_features, split, cluster_tiles, params) ||
      !set_deferred_norm(params, square_sums, norm_eps)) {
    return cudaErrorInvalidValue;
  }
  params.heads = heads;
  if (rows == 0) return cudaSuccess;
  const int tiles = int(weight_rows / kLinearTileRows);
  return head_dim == 64 ? launch_for_type<LinearEpilogue::kHeadNormRope, 64>(dtype, params, tiles, stream)
                        : launch_for_type<LinearEpilogue::kHeadNormRope, 128>(dtype, params, tiles, stream);
}

}  // namespace orthrus
