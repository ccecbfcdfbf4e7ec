// Launchers of the attention kernels (attention.cuh): argument checks, grid sizing, dtype dispatch.
#include <algorithm>
#include <cmath>

#include "attention.cuh"
#include "orthrus/kernels.h"

namespace orthrus {
namespace {

int64_t attention_num_chunks(int64_t max_keys) {
  return (max_keys + cuda_detail::kAttentionChunkKeys - 1) / cuda_detail::kAttentionChunkKeys;
}

int64_t attention_vector_tiles(int64_t rows, int64_t q_heads, int64_t kv_heads) {
  const int64_t vectors = rows * (q_heads / kv_heads);
  return (vectors + cuda_detail::kAttentionVectorsPerCta - 1) / cuda_detail::kAttentionVectorsPerCta;
}

// The most live chunks for which whole chunks would give fewer warps than kAttentionWholeChunkMinWarps.
int64_t attention_split_mode_max_chunks(int64_t rows, int64_t q_heads, int64_t kv_heads, int64_t max_keys) {
  const int64_t warps_per_chunk =
      kv_heads * attention_vector_tiles(rows, q_heads, kv_heads) * cuda_detail::kAttentionWarps;
  return std::min(attention_num_chunks(max_keys),
                  (cuda_detail::kAttentionWholeChunkMinWarps - 1) / warps_per_chunk);
}

int64_t attention_slots(int64_t rows, int64_t q_heads, int64_t kv_heads, int64_t max_keys) {
  return attention_num_chunks(max_keys) +
         attention_split_mode_max_chunks(rows, q_heads, kv_heads, max_keys) * cuda_detail::kAttentionSplitsPerChunk;
}

template <typename T, int kHeadDim>
cudaError_t launch_attention(const cuda_detail::AttentionParams& params, int64_t kv_heads, cudaStream_t stream) {
  using namespace cuda_detail;
  constexpr int kSmemBytes = attention_smem_bytes<T, kHeadDim>();
  // Above 48 KB of dynamic shared memory needs an opt-in; it is a function attribute, not a stream
  // operation, so it is legal during graph capture.
  cudaError_t status = cudaFuncSetAttribute(attention_chunk_kernel<T, kHeadDim>,
                                            cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  if (status != cudaSuccess) return status;
  // Vector tiles are the fastest grid dimension: the CTAs reading the same K/V range run side by side
  // and share it through L2. The key ranges cover the capacity in whichever schedule needs more CTAs.
  const dim3 grid(unsigned(attention_vector_tiles(params.rows, params.q_heads, kv_heads)), unsigned(kv_heads),
                  unsigned(std::max(params.num_chunks, params.split_mode_max_chunks * kAttentionSplitsPerChunk)));
  // Both kernels are launched with PDL: the chunk kernel loads its cached K/V tiles while the projection
  // before it finishes. The chunk kernel never lets its dependents launch early, so the merge kernel
  // launches as the chunk kernel's last CTAs exit, without waiting for its completion to be flushed. (The
  // first kernels of 2026-11-22 lost with an early merge, whose CTAs took SMs the chunk kernel still needed:
  // AR at 32K 9.00 ms per token against 8.05. The current ones gain a little: on an H100, 8B, 2026-11-23,
  // 3 interleaved runs, AR at 1K 5.778-5.782 ms against 5.782-5.787, the B = 32 iteration 12.763-12.766
  // against 12.782-12.785, at 32K 16.79-16.82 against 16.83-16.84.)
  status = launch_kernel(attention_chunk_kernel<T, kHeadDim>, grid, dim3(kAttentionWarps * 32), kSmemBytes, stream,
                         params);
  if (status != cudaSuccess) return status;
  return launch_kernel(attention_merge_kernel<T, kHeadDim>, dim3(unsigned(params.rows * params.q_heads)),
                       dim3(kAttentionMergeWarps * 32), 0, stream, params);
}

template <typename T>
cudaError_t launch_attention_for_head_dim(const cuda_detail::AttentionParams& params, int64_t kv_heads,
                                          int64_t head_dim, cudaStream_t stream) {
  if (head_dim == 64) return launch_attention<T, 64>(params, kv_heads, stream);
  return launch_attention<T, 128>(params, kv_heads, stream);
}

}  // namespace

size_t attention_cuda_workspace_bytes(int64_t rows, int64_t q_heads, int64_t kv_heads, int64_t head_dim,
                                      int64_t max_keys) {
  return size_t(rows) * size_t(q_heads) * size_t(attention_slots(rows, q_heads, kv_heads, max_keys)) *
         size_t(head_dim + 2) * sizeof(float);
}

cudaError_t attention_cuda(DType dtype, const void* q, const void* k_cache, const void* v_cache,
                           const int32_t* cache_len, const void* k_block, const void* v_block, void* out,
                           int64_t rows, int64_t q_heads, int64_t kv_heads, int64_t head_dim, bool causal,
                           float scale, int64_t max_keys, void* workspace, size_t workspace_bytes,
                           cudaStream_t stream) {
  if (dtype != DType::kBFloat16 && dtype != DType::kFloat16) return cudaErrorInvalidValue;
  if (rows < 1 || rows > kMaxBlockRows || (head_dim != 64 && head_dim != 128)) return cudaErrorInvalidValue;
  if (kv_heads < 1 || q_heads < kv_heads || q_heads % kv_heads != 0 || q_heads > 1024) return cudaErrorInvalidValue;
  if (max_keys < rows || max_keys > 0x7fffffff - kMaxBlockRows || attention_num_chunks(max_keys) > 65535) return cudaErrorInvalidValue;
  if (!q || !k_cache || !v_cache || !cache_len || !out || !workspace) return cudaErrorInvalidValue;
  if (!causal && (!k_block || !v_block)) return cudaErrorInvalidValue;
  if (workspace_bytes < attention_cuda_workspace_bytes(rows, q_heads, kv_heads, head_dim, max_keys)) {
    return cudaErrorInvalidValue;
  }
  cuda_detail::AttentionParams params;
  params.q = q;
  params.k_cache = k_cache;
  params.v_cache = v_cache;
  params.cache_len = cache_len;
  params.k_block = k_block;
  params.v_block = v_block;
  params.out = out;
  params.num_chunks = int(attention_num_chunks(max_keys));
  params.max_keys = int(max_keys);
  params.split_mode_max_chunks = int(attention_split_mode_max_chunks(rows, q_heads, kv_heads, max_keys));
  // acc of every slot (chunks, then splits), then the stats of every slot.
  const size_t items = size_t(rows) * size_t(q_heads);
  const int split_slots = params.split_mode_max_chunks * cuda_detail::kAttentionSplitsPerChunk;
  float* const acc = static_cast<float*>(workspace);
  float* const stats = acc + items * (params.num_chunks + split_slots) * head_dim;
  params.chunks = {acc, stats, params.num_chunks};
  params.splits = {acc + items * params.num_chunks * head_dim, stats + items * params.num_chunks * 2, split_slots};
  params.rows = int(rows);
  params.q_heads = int(q_heads);
  params.kv_heads = int(kv_heads);
  params.group = int(q_heads / kv_heads);
  params.causal = causal;
  params.scale_log2 = scale * float(M_LOG2E);
  if (dtype == DType::kBFloat16) return launch_attention_for_head_dim<__nv_bfloat16>(params, kv_heads, head_dim, stream);
  return launch_attention_for_head_dim<__half>(params, kv_heads, head_dim, stream);
}

}  // namespace orthrus
