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
// Groups a thread keeps in registers between the two passes over its row (rows of up to 8192 elements:
// every Qwen3 hidden size); further groups are read again.
constexpr int kRmsNormHeldGroups = 4;

// What the normalised row is.
enum class NormInput {
  kRow,           // x, read only
  kRowPlusDelta,  // x += delta in place (rounded to T, as an elementwise add would), then that x: the
                  // residual-stream update and the next norm in one pass over the row
  kEmbedding,     // x = table[tokens[row]] (x is written): the residual stream's start and the first norm
};

// One CTA per row. Thread i owns groups of kRmsNormVector consecutive elements starting at group i and
// striding by the CTA size; the 16-byte path and the element-wise path (unaligned rows, ragged tail)
// visit the same elements in the same order, so the choice between them cannot change any bits.
// kEmbedding: tokens / table / vocab give the rows; a token outside [0, vocab) makes its x and y rows NaN.
template <typename T, NormInput kInput>
__global__ void __launch_bounds__(kRmsNormThreads)
    rms_norm_kernel(T* x, int64_t x_row_stride, const T* __restrict__ delta, const T* __restrict__ weight,
                    T* __restrict__ y, int dim, float eps, bool vector_access, const int64_t* __restrict__ tokens,
                    const T* __restrict__ table, int64_t vocab) {
  allow_next_kernel_launch();
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

  // At one row per decode step this kernel is latency-bound: the weights (constant) load before the wait
  // for the previous kernel, and the row stays in registers between the two passes.
  float held_weights[kRmsNormHeldGroups][kRmsNormVector];
  float held_values[kRmsNormHeldGroups][kRmsNormVector];
#pragma unroll
  for (int held = 0; held < kRmsNormHeldGroups; ++held) {
    const int group = threadIdx.x + held * kRmsNormThreads;
    if (group < groups) load_group(weight, group, held_weights[held]);
  }
  wait_for_previous_kernels();

  const T* source_row = x_row;
  if constexpr (kInput == NormInput::kEmbedding) {
    // The token is written by the previous kernels (the last iteration's acceptance, say).
    const int64_t token = tokens[blockIdx.x];
    if (token < 0 || token >= vocab) {
      // No host check is possible without a sync: fail loudly rather than read outside the table.
      float nan[kRmsNormVector];
#pragma unroll
      for (int i = 0; i < kRmsNormVector; ++i) nan[i] = NAN;
      for (int group = threadIdx.x; group < groups; group += kRmsNormThreads) {
        store_group(x_row, group, nan);
        store_group(y_row, group, nan);
      }
      return;
    }
    source_row = table + size_t(token) * dim;
  }

  float sum_squares = 0.f;
  auto first_pass = [&](int group, float (&values)[kRmsNormVector]) {
    load_group(source_row, group, values);
    if constexpr (kInput == NormInput::kRowPlusDelta) {
      float deltas[kRmsNormVector];
      load_group(delta + size_t(blockIdx.x) * dim, group, deltas);
#pragma unroll
      for (int i = 0; i < kRmsNormVector; ++i) values[i] = to_float(from_float<T>(values[i] + deltas[i]));
    }
    if constexpr (kInput != NormInput::kRow) store_group(x_row, group, values);
#pragma unroll
    for (int i = 0; i < kRmsNormVector; ++i) sum_squares += values[i] * values[i];
  };
#pragma unroll
  for (int held = 0; held < kRmsNormHeldGroups; ++held) {
    const int group = threadIdx.x + held * kRmsNormThreads;
    if (group < groups) first_pass(group, held_values[held]);
  }
  for (int group = threadIdx.x + kRmsNormHeldGroups * kRmsNormThreads; group < groups; group += kRmsNormThreads) {
    float values[kRmsNormVector];
    first_pass(group, values);
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

  auto second_pass = [&](int group, float (&values)[kRmsNormVector], const float (&weights)[kRmsNormVector]) {
#pragma unroll
    for (int i = 0; i < kRmsNormVector; ++i) values[i] = values[i] * scale * weights[i];
    store_group(y_row, group, values);
  };
#pragma unroll
  for (int held = 0; held < kRmsNormHeldGroups; ++held) {
    const int group = threadIdx.x + held * kRmsNormThreads;
    if (group < groups) second_pass(group, held_values[held], held_weights[held]);
  }
  for (int group = threadIdx.x + kRmsNormHeldGroups * kRmsNormThreads; group < groups; group += kRmsNormThreads) {
    float values[kRmsNormVector];
    float weights[kRmsNormVector];
    load_group(x_row, group, values);  // past kRow: this thread's own (rounded) writes above
    load_group(weight, group, weights);
    second_pass(group, values, weights);
  }
}

// Where normalised, rotated heads go: the outputs of qk_norm_rope_store, shared with the fused qkv
// projection (linear.cuh), which produces the same heads from its own sums.
struct HeadNormRopeTargets {
  const void* q_norm_weight;
  const void* k_norm_weight;
  const float* rope_cos_sin;  // [max_positions, head_dim]: cos | sin
  const int32_t* positions_start;
  void* q_out;  // [rows, q_heads, head_dim]
  void* k_dst;  // [dst_rows, kv_heads, head_dim]
  void* v_dst;
  const int32_t* dst_start;
  int q_heads;
  int kv_heads;
  float eps;
};

// Fills `targets` from qk_norm_rope_store's arguments (orthrus/kernels.h); false when a head count or a
// pointer is out of range.
inline bool make_head_norm_rope_targets(const void* q_norm_weight, const void* k_norm_weight,
                                        const float* rope_cos_sin, const int32_t* positions_start, void* q_out,
                                        void* k_dst, void* v_dst, const int32_t* dst_start, int64_t q_heads,
                                        int64_t kv_heads, float eps, HeadNormRopeTargets& targets) {
  if (q_heads < 1 || kv_heads < 1 || q_heads > 1024 || kv_heads > 1024) return false;
  if (!q_norm_weight || !k_norm_weight || !rope_cos_sin || !positions_start || !q_out || !k_dst || !v_dst ||
      !dst_start) {
    return false;
  }
  targets = {q_norm_weight, k_norm_weight, rope_cos_sin, positions_start, q_out,
             k_dst,         v_dst,         dst_start,    int(q_heads),    int(kv_heads), eps};
  return true;
}

struct QkNormRopeParams {
  const void* q;
  int64_t q_row_stride;
  const void* k;
  int64_t k_row_stride;
  const void* v;
  int64_t v_row_stride;
  int rows;
  HeadNormRopeTargets targets;
};

// One warp's share of one head: lane l holds the rotary pairs (i, i + head_dim / 2) for
// i in [l * kPairs, (l + 1) * kPairs).
template <int kHeadDim>
struct HeadSlice {
  static constexpr int kHalf = kHeadDim / 2;
  static constexpr int kPairs = kHalf / 32;
  float low[kPairs];
  float high[kPairs];

  __device__ __forceinline__ static int low_index(int lane, int i) { return lane * kPairs + i; }
};

// What one lane needs, besides the head's values, to finish head `head` (query heads first, then key
// heads, then value heads) of block row `row`: where it goes and, for q and k heads, the lane's norm
// weights and rotation. Loading it is separate from the math so that a caller can issue these loads early.
template <typename T, int kHeadDim>
struct HeadFinish {
  using Slice = HeadSlice<kHeadDim>;
  T* dst;
  bool rotate;  // false: a value head, stored as it is
  float weight_low[Slice::kPairs];
  float weight_high[Slice::kPairs];
  float cos_value[Slice::kPairs];
  float sin_value[Slice::kPairs];

  HeadFinish() = default;
  __device__ __forceinline__ HeadFinish(const HeadNormRopeTargets& t, int row, int head, int lane) {
    const bool is_query = head < t.q_heads;
    const int kv_head = is_query ? 0 : (head - t.q_heads) % t.kv_heads;
    rotate = head < t.q_heads + t.kv_heads;
    dst = is_query ? static_cast<T*>(t.q_out) + (size_t(row) * t.q_heads + head) * kHeadDim
                   : static_cast<T*>(rotate ? t.k_dst : t.v_dst) +
                         (size_t(t.dst_start[0] + row) * t.kv_heads + kv_head) * kHeadDim;
    if (!rotate) return;
    const T* const norm_weight = static_cast<const T*>(is_query ? t.q_norm_weight : t.k_norm_weight);
    const float* const cos_sin = t.rope_cos_sin + size_t(t.positions_start[0] + row) * kHeadDim;
#pragma unroll
    for (int i = 0; i < Slice::kPairs; ++i) {
      const int index = Slice::low_index(lane, i);
      weight_low[i] = to_float(norm_weight[index]);
      weight_high[i] = to_float(norm_weight[Slice::kHalf + index]);
      cos_value[i] = cos_sin[index];
      sin_value[i] = cos_sin[Slice::kHalf + index];
    }
  }

  // RMS-normalises and rotates q and k heads (at position positions_start[0] + row), then stores the
  // head. Every lane of the warp must call it: the norm is a butterfly over the warp.
  __device__ __forceinline__ void store(const Slice& slice, float eps, int lane) const {
    if (!rotate) {
#pragma unroll
      for (int i = 0; i < Slice::kPairs; ++i) {
        const int index = Slice::low_index(lane, i);
        dst[index] = from_float<T>(slice.low[i]);
        dst[Slice::kHalf + index] = from_float<T>(slice.high[i]);
      }
      return;
    }
    float sum_squares = 0.f;
#pragma unroll
    for (int i = 0; i < Slice::kPairs; ++i) {
      sum_squares += slice.low[i] * slice.low[i];
      sum_squares += slice.high[i] * slice.high[i];
    }
    // A butterfly leaves the same bits in every lane: each step adds the same two values, commuted.
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) sum_squares += __shfl_xor_sync(0xffffffffu, sum_squares, offset);
    const float inverse_rms = rsqrtf(sum_squares / float(kHeadDim) + eps);
#pragma unroll
    for (int i = 0; i < Slice::kPairs; ++i) {
      const int index = Slice::low_index(lane, i);
      const float a = slice.low[i] * inverse_rms * weight_low[i];
      const float b = slice.high[i] * inverse_rms * weight_high[i];
      dst[index] = from_float<T>(a * cos_value[i] - b * sin_value[i]);
      dst[Slice::kHalf + index] = from_float<T>(b * cos_value[i] + a * sin_value[i]);
    }
  }
};

// One warp per (row, head) over the q and k heads; a key head's warp also copies the value head.
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kQkNormWarps * 32) qk_norm_rope_store_kernel(const QkNormRopeParams p) {
  using Slice = HeadSlice<kHeadDim>;
  allow_next_kernel_launch();
  wait_for_previous_kernels();
  const HeadNormRopeTargets& t = p.targets;
  const int lane = threadIdx.x % 32;
  const int heads = t.q_heads + t.kv_heads;
  const int item = blockIdx.x * kQkNormWarps + threadIdx.x / 32;
  if (item >= p.rows * heads) return;
  const int row = item / heads;
  const int head = item % heads;
  const bool is_query = head < t.q_heads;
  const int kv_head = head - t.q_heads;

  auto load_head = [&](const void* base, int64_t row_stride, int index) {
    const T* const src = static_cast<const T*>(base) + size_t(row) * row_stride + size_t(index) * kHeadDim;
    Slice slice;
#pragma unroll
    for (int i = 0; i < Slice::kPairs; ++i) {
      slice.low[i] = to_float(src[Slice::low_index(lane, i)]);
      slice.high[i] = to_float(src[Slice::kHalf + Slice::low_index(lane, i)]);
    }
    return slice;
  };
  HeadFinish<T, kHeadDim>(t, row, head, lane)
      .store(is_query ? load_head(p.q, p.q_row_stride, head) : load_head(p.k, p.k_row_stride, kv_head), t.eps, lane);
  if (!is_query) {
    HeadFinish<T, kHeadDim>(t, row, head + t.kv_heads, lane).store(load_head(p.v, p.v_row_stride, kv_head), t.eps, lane);
  }
}

}  // namespace orthrus::cuda_detail
