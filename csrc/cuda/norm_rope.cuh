// Row-invariant RMSNorm and the fused per-head q/k RMSNorm + RoPE + cache store (contracts in
// orthrus/kernels.h). Each row (each head) is reduced by one CTA (one warp) whose shape depends only on
// the feature size, with a fixed summation order, so a row's bits never depend on the row count.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "element.cuh"
#include "launch.cuh"

namespace orthrus::cuda_detail {

constexpr int kRmsNormThreads = 256;
constexpr int kRmsNormVector = 8;  // elements per 16-byte access
constexpr int kQkNormWarps = 4;

// One CTA per row. Thread i owns groups of kRmsNormVector consecutive elements starting at group i and
// striding by the CTA size; the 16-byte path and the element-wise path (unaligned rows, ragged tail)
// visit the same elements in the same order, so the choice between them cannot change any bits.
// kAddDelta: first x += delta in place (rounded to T, as an elementwise add would), then normalise that x:
// the residual-stream update and the next norm in one pass over the row.
template <typename T, bool kAddDelta>
__global__ void __launch_bounds__(kRmsNormThreads)
    rms_norm_kernel(T* x, int64_t x_row_stride, const T* __restrict__ delta, const T* __restrict__ weight,
                    T* __restrict__ y, int dim, float eps, bool vector_access) {
  allow_next_kernel_launch();
  wait_for_previous_kernels();
  T* const x_row = x + size_t(blockIdx.x) * x_row_stride;
  T* const y_row = y + size_t(blockIdx.x) * dim;
  const int groups = (dim + kRmsNormVector - 1) / kRmsNormVector;

  auto store_group = [&](T* dst, int group, const float (&values)[kRmsNormVector]) {
    const int first = group * kRmsNormVector;
    if (vector_access) {
      uint4 raw;
      T* elements = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int i = 0; i < kRmsNormVector; ++i) elements[i] = from_float<T>(values[i]);
      *reinterpret_cast<uint4*>(dst + first) = raw;
    } else {
#pragma unroll
      for (int i = 0; i < kRmsNormVector; ++i) {
        if (first + i < dim) dst[first + i] = from_float<T>(values[i]);
      }
    }
  };

  auto load_group = [&](const T* src, int group, float (&values)[kRmsNormVector]) {
    const int first = group * kRmsNormVector;
    if (vector_access) {
      const uint4 raw = *reinterpret_cast<const uint4*>(src + first);
      const T* elements = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int i = 0; i < kRmsNormVector; ++i) values[i] = to_float(elements[i]);
    } else {
#pragma unroll
      for (int i = 0; i < kRmsNormVector; ++i) values[i] = first + i < dim ? to_float(src[first + i]) : 0.f;
    }
  };

  float sum_squares = 0.f;
  for (int group = threadIdx.x; group < groups; group += kRmsNormThreads) {
    float values[kRmsNormVector];
    load_group(x_row, group, values);
    if constexpr (kAddDelta) {
      float deltas[kRmsNormVector];
      load_group(delta + size_t(blockIdx.x) * dim, group, deltas);
#pragma unroll
      for (int i = 0; i < kRmsNormVector; ++i) values[i] = to_float(from_float<T>(values[i] + deltas[i]));
      store_group(x_row, group, values);
    }
#pragma unroll
    for (int i = 0; i < kRmsNormVector; ++i) sum_squares += values[i] * values[i];
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) sum_squares += __shfl_xor_sync(0xffffffffu, sum_squares, offset);
  __shared__ float warp_sums[kRmsNormThreads / 32];
  __shared__ float inverse_rms;
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = sum_squares;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < kRmsNormThreads / 32; ++w) total += warp_sums[w];
    inverse_rms = rsqrtf(total / float(dim) + eps);
  }
  __syncthreads();
  const float scale = inverse_rms;

  for (int group = threadIdx.x; group < groups; group += kRmsNormThreads) {
    float values[kRmsNormVector];
    float weights[kRmsNormVector];
    load_group(x_row, group, values);  // with kAddDelta: this thread's own (rounded) writes above
    load_group(weight, group, weights);
#pragma unroll
    for (int i = 0; i < kRmsNormVector; ++i) values[i] = values[i] * scale * weights[i];
    store_group(y_row, group, values);
  }
}

struct QkNormRopeParams {
  const void* q;
  int64_t q_row_stride;
  const void* k;
  int64_t k_row_stride;
  const void* v;
  int64_t v_row_stride;
  const void* q_norm_weight;
  const void* k_norm_weight;
  const float* rope_cos_sin;  // [max_positions, head_dim]: cos | sin
  const int32_t* positions_start;
  void* q_out;
  void* k_dst;
  void* v_dst;
  const int32_t* dst_start;
  int rows;
  int q_heads;
  int kv_heads;
  float eps;
};

// One warp per (row, head); heads [0, q_heads) are query heads, the rest key heads (whose warp also
// copies the value head). Lane l holds the rotary pairs (i, i + head_dim / 2) for
// i in [l * kPairs, (l + 1) * kPairs).
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kQkNormWarps * 32) qk_norm_rope_store_kernel(const QkNormRopeParams p) {
  constexpr int kHalf = kHeadDim / 2;
  constexpr int kPairs = kHalf / 32;
  allow_next_kernel_launch();
  wait_for_previous_kernels();
  const int lane = threadIdx.x % 32;
  const int heads = p.q_heads + p.kv_heads;
  const int item = blockIdx.x * kQkNormWarps + threadIdx.x / 32;
  if (item >= p.rows * heads) return;
  const int row = item / heads;
  const int head = item % heads;
  const bool is_query = head < p.q_heads;
  const int kv_head = head - p.q_heads;

  const T* const src = is_query ? static_cast<const T*>(p.q) + size_t(row) * p.q_row_stride + size_t(head) * kHeadDim
                                : static_cast<const T*>(p.k) + size_t(row) * p.k_row_stride + size_t(kv_head) * kHeadDim;
  const T* const norm_weight = static_cast<const T*>(is_query ? p.q_norm_weight : p.k_norm_weight);

  float low[kPairs], high[kPairs];
  float sum_squares = 0.f;
#pragma unroll
  for (int i = 0; i < kPairs; ++i) {
    low[i] = to_float(src[lane * kPairs + i]);
    high[i] = to_float(src[kHalf + lane * kPairs + i]);
    sum_squares += low[i] * low[i];
    sum_squares += high[i] * high[i];
  }
  // A butterfly leaves the same bits in every lane: each step adds the same two values, commuted.
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) sum_squares += __shfl_xor_sync(0xffffffffu, sum_squares, offset);
  const float inverse_rms = rsqrtf(sum_squares / float(kHeadDim) + p.eps);

  const int position = p.positions_start[0] + row;
  const float* const cos_sin = p.rope_cos_sin + size_t(position) * kHeadDim;
  T* dst;
  if (is_query) {
    dst = static_cast<T*>(p.q_out) + (size_t(row) * p.q_heads + head) * kHeadDim;
  } else {
    dst = static_cast<T*>(p.k_dst) + (size_t(p.dst_start[0] + row) * p.kv_heads + kv_head) * kHeadDim;
  }
#pragma unroll
  for (int i = 0; i < kPairs; ++i) {
    const int index = lane * kPairs + i;
    const float a = low[i] * inverse_rms * to_float(norm_weight[index]);
    const float b = high[i] * inverse_rms * to_float(norm_weight[kHalf + index]);
    const float cos_value = cos_sin[index];
    const float sin_value = cos_sin[kHalf + index];
    dst[index] = from_float<T>(a * cos_value - b * sin_value);
    dst[kHalf + index] = from_float<T>(b * cos_value + a * sin_value);
  }
  if (!is_query) {
    const T* const v_src = static_cast<const T*>(p.v) + size_t(row) * p.v_row_stride + size_t(kv_head) * kHeadDim;
    T* const v_dst = static_cast<T*>(p.v_dst) + (size_t(p.dst_start[0] + row) * p.kv_heads + kv_head) * kHeadDim;
#pragma unroll
    for (int i = lane; i < kHeadDim; i += 32) v_dst[i] = v_src[i];
  }
}

}  // namespace orthrus::cuda_detail
