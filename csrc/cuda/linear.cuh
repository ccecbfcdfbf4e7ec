// Row-invariant decode-phase linear layer: y[m, n] = sum_k x[m, k] * w[n, k] for 1..64 rows.
//
// The weights dominate the bytes (N*K against at most 64*K for x), so the kernel streams w straight from
// device memory into tensor-core fragments and keeps x in shared memory. The MMA is m16n8k16 with the
// roles swapped: its 16-row A operand is 16 weight rows (output features) and its 8-column B operand is 8
// rows of x, so one 8-row group of x is the finest unit of work.
//
// Why the bits of row m never depend on the number of rows:
// - Inside an MMA every output element is its own dot product; the other columns (other x rows) only
//   share the instruction.
// - The K order is fixed by (out_features, in_features) alone: the split into cluster ranks, the chunk
//   order, the order of the 16-wide MMA steps and the two warps along K all come from the shape.
// - The partial sums are added in a fixed order: warp along K 0 then 1, then cluster rank 0, 1, ...
// - The number of 8-row groups (kRowGroups) only decides how many independent MMA columns run; row m
//   lives in group m / 8 and goes through the same instruction sequence whatever kRowGroups is.
// - A deferred norm's scale of row m comes from row m's own sums of squares, added in an order fixed by
//   the feature count; its producer sums each row's 64-column tiles in a fixed order too.
#pragma once

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "copy_async.cuh"
#include "element.cuh"
#include "launch.cuh"
#include "norm_rope.cuh"
#include "orthrus/kernels.h"
#include "weight_load.cuh"

namespace orthrus::cuda_detail {

constexpr int kLinearWarpRows = 16;  // weight rows per warp: the M side of one m16n8k16 MMA
constexpr int kLinearWarpsAlongN = 4;
constexpr int kLinearWarpsAlongK = 2;
constexpr int kLinearThreads = 32 * kLinearWarpsAlongN * kLinearWarpsAlongK;
constexpr int kLinearTileRows = kLinearWarpRows * kLinearWarpsAlongN;  // weight rows (outputs) per CTA
// One warp's share of a chunk: 4 blocks of 32 k. A lane loads 8 contiguous k (16 bytes) of a weight row
// per block, so each weight row is read 256 contiguous bytes at a time.
constexpr int kLinearBlocksPerStep = 4;
constexpr int kLinearWarpStepK = 32 * kLinearBlocksPerStep;
constexpr int kLinearChunkK = kLinearWarpStepK * kLinearWarpsAlongK;  // k staged in shared memory at once
// Row pitch of a staged x chunk, in elements. 576 bytes = 4.5 x 128: the 16-byte fragment loads of rows g
// and g + 1 fall into opposite halves of the 32 banks, so a quarter warp never conflicts.
constexpr int kLinearXPitch = kLinearChunkK + 32;
// Row pitch (floats) of the partial sums in shared memory: +4 spreads the 4 lanes of a quad over banks.
constexpr int kLinearPartialPitch = kLinearTileRows + 4;
constexpr int kLinearMaxSplit = 8;  // portable cluster size

// What the kernel does with its output tile once the K sums are complete. The fused forms give every
// output the bits the plain linear and the separate kernel would give it (same sums, same rounding, same
// device functions), one launch and one dependency fewer in the decode chain.
enum class LinearEpilogue {
  kStore,    // y = x w^T
  kSiluMul,  // w = [gate | up] (2 * features rows): y[:, i] = swiglu(gate_i, up_i), as silu_mul
  // w = the fused [q | k | v] projection: its heads go through qk_norm_rope_store's math to its targets;
  // y is not written. A cluster holds whole heads: head_dim / kLinearTileRows tiles.
  kHeadNormRope,
  // y holds uint64 keys [rows][tiles]: per row and tile the largest linear_argmax_key of the tile's outputs as
  // rounded to T. linear_argmax_finish_kernel reduces them to torch.argmax of the stored linear's output.
  kArgmax,
  // The producer of a deferred RMSNorm (orthrus/kernels.h): residual += the rounded output, y = residual *
  // norm_weight, and per row the sum of squares of the tile's residual outputs.
  kResidualNorm,
};

struct LinearParams {
  const void* x;
  int64_t x_row_stride;  // elements
  const void* w;
  void* y;  // kArgmax: the keys
  int rows;
  int out_features;
  int in_features;
  int chunks;  // ceil(in_features / kLinearChunkK)
  int split;   // CTAs sharing one output tile, each summing a contiguous run of chunks
  int cluster_tiles;     // output tiles per cluster (the cluster has cluster_tiles * split CTAs)
  int features;          // kSiluMul: the number of outputs (half the weight rows)
  bool x_vector_loads;   // x and its row stride allow 16-byte copies
  bool y_vector_stores;  // y and its row length allow 8-byte stores of 4 outputs
  HeadNormRopeTargets heads;  // kHeadNormRope
  // kResidualNorm: the residual stream [rows][out_features], the next norm's weight and the sums of squares
  // [rows][tiles] this kernel produces.
  void* residual;
  const void* norm_weight;
  float* square_sums_out;
  bool residual_vector_access;  // residual, norm_weight and y allow 8-byte accesses of 4 outputs
  // A deferred RMSNorm's sums of squares [rows][square_sum_tiles] that scale every row of the sums, or null.
  // They are staged in shared memory after the first x_smem_bytes.
  const float* square_sums;
  int square_sum_tiles;
  float norm_eps;
  bool square_sum_vector_copies;  // whole 16-byte runs of sums
  int x_smem_bytes;
};

// Chunks of weights each warp keeps in flight (registers). Two fit the 128-register budget of two CTAs per
// SM only while the accumulators of few row groups leave room: with 4 groups ptxas spilled, and on an H100
// (8B, 2026-11-22) the 32-row passes lost 0.5 ms each, while 1 row gained 1% (AR 6.11 -> 6.03 ms).
constexpr int linear_weight_depth(int row_groups) { return row_groups <= 3 ? 2 : 1; }

template <int kRowGroups>
constexpr int linear_x_buffer_bytes() {
  return kRowGroups * 8 * kLinearXPitch * 2;
}

template <int kRowGroups>
constexpr int linear_smem_bytes() {
  // Two x chunk buffers (double buffering); the partial sums reuse them after the main loop.
  return 2 * linear_x_buffer_bytes<kRowGroups>();
}

// With one row group a CTA's whole run of x chunks fits in shared memory next to the other CTA of its SM
// (16 chunks: 72 KB), so it is staged once and the main loop needs only three barriers instead of two per
// chunk: a warp whose weights arrive early no longer waits for the CTA's slowest before its next loads. On
// an H100 (8B, 1K, 2026-11-23, 3 interleaved runs) the AR step took 5.80-5.81 ms against 5.85. Fewer
// barriers for more rows (x staged one or two chunks per barrier) made the B = 32 iteration slower, 12.81-12.99
// ms against 12.77, so they keep the double buffer.
constexpr int kLinearResidentMaxChunks = 16;
static_assert(kLinearPartialPitch * 8 * 4 <= 8 * kLinearXPitch * 2, "partials must fit in one x buffer");
// A deferred norm's sums of squares are staged whole: rows of up to 8192 features (every Qwen3 hidden size).
constexpr int kLinearMaxSquareSumTiles = 128;
static_assert(kLinearTileRows == kSquareSumColumns, "a producer's output tile is one run of its sums of squares");

// The residual and the norm weight behind 4 consecutive outputs of a kResidualNorm tile, as stored (zeros
// past the end of the row). The weights are constant, so they may be requested before the PDL wait.
template <typename T>
struct ResidualInputs {
  uint2 residual;
  uint2 norm_weight;

  __device__ __forceinline__ void load_norm_weight(const LinearParams& p, int64_t n) {
    norm_weight = load4(p, static_cast<const T*>(p.norm_weight), n);
  }
  __device__ __forceinline__ void load_residual(const LinearParams& p, int row, int64_t n) {
    residual = load4(p, static_cast<const T*>(p.residual) + int64_t(row) * p.out_features, n);
  }
  static __device__ __forceinline__ float value(const uint2& packed, int j) {
    return to_float(reinterpret_cast<const T*>(&packed)[j]);
  }

 private:
  static __device__ __forceinline__ uint2 load4(const LinearParams& p, const T* row, int64_t n) {
    if (p.residual_vector_access && n + 4 <= p.out_features) return *reinterpret_cast<const uint2*>(row + n);
    uint2 packed;
    T* const elements = reinterpret_cast<T*>(&packed);
#pragma unroll
    for (int j = 0; j < 4; ++j) elements[j] = n + j < p.out_features ? row[n + j] : from_float<T>(0.0f);
    return packed;
  }
};

template <int kIndex>
__device__ __forceinline__ uint32_t word(const uint4& v) {
  if constexpr (kIndex == 0) return v.x;
  if constexpr (kIndex == 1) return v.y;
  if constexpr (kIndex == 2) return v.z;
  return v.w;
}

template <typename T>
__device__ __forceinline__ void mma_16x8x16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                            uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

// torch.argmax's order as one unsigned comparison: the larger key is the larger value, and between equal
// values the smaller column. The high half is the value's order-preserving image with -0.0 equal to +0.0
// and every NaN above +inf (torch.argmax lets the first NaN win); the low half is the column's complement.
// Every key is above 0, which stands for no column.
__device__ __forceinline__ uint64_t linear_argmax_key(float value, int64_t column) {
  uint32_t image = 0xFFFFFFFFu;
  if (!isnan(value)) {
    const uint32_t bits = value == 0.0f ? 0u : __float_as_uint(value);
    image = bits & 0x80000000u ? ~bits : bits | 0x80000000u;
  }
  return uint64_t(image) << 32 | (0xFFFFFFFFu - uint32_t(column));
}

// The largest key of the lanes of `mask`, an aligned group of kLanes lanes.
template <int kLanes>
__device__ __forceinline__ uint64_t max_over_lanes(uint64_t key, unsigned mask) {
#pragma unroll
  for (int offset = kLanes / 2; offset > 0; offset /= 2) {
    const uint64_t other = __shfl_xor_sync(mask, key, offset);
    key = other > key ? other : key;
  }
  return key;
}

// Stages x[0:8*kRowGroups, chunk] in shared memory; rows >= rows and k >= in_features become zeros, so
// they add exact zeros to real outputs and never read outside x.
template <typename T, int kRowGroups>
__device__ __forceinline__ void stage_x_chunk(const LinearParams& p, int chunk, T* buffer) {
  constexpr int kVectorsPerRow = kLinearChunkK / 8;
  static_assert(kRowGroups * 8 * kVectorsPerRow % kLinearThreads == 0, "whole vectors per thread");
  const T* x = static_cast<const T*>(p.x);
#pragma unroll
  for (int i = 0; i < kRowGroups * 8 * kVectorsPerRow / kLinearThreads; ++i) {
    const int vector = i * kLinearThreads + int(threadIdx.x);
    const int row = vector / kVectorsPerRow;
    const int column = (vector % kVectorsPerRow) * 8;
    const int k = chunk * kLinearChunkK + column;
    const bool valid = row < p.rows && k < p.in_features;
    T* destination = buffer + row * kLinearXPitch + column;
    const T* source = x + int64_t(row) * p.x_row_stride + k;
    if (p.x_vector_loads) {
      // Every CTA re-reads the same x chunks, and the two CTAs an SM holds stream the same chunk range at
      // about the same time, so x is cached in L1: at 32 rows x adds half as many bytes as the weights. On
      // an H100 (8B, B = 32, 2026-11-22, 4 interleaved runs each) the 1K iteration took 13.83 ms against
      // 13.98 with L2 only; the AR step, 64 keys and 32K were unchanged.
      copy_async_16<CopyCache::kL1AndL2>(static_cast<uint32_t>(__cvta_generic_to_shared(destination)),
                                         valid ? source : x, valid);
    } else {
      uint16_t values[8];
#pragma unroll
      for (int j = 0; j < 8; ++j)
        values[j] = valid ? reinterpret_cast<const uint16_t*>(source)[j] : uint16_t(0);
      *reinterpret_cast<uint4*>(destination) = *reinterpret_cast<const uint4*>(values);
    }
  }
}

// Grid: p.split CTAs per 64-row output tile, in clusters of p.cluster_tiles tiles. Each CTA: 4 warps along
// N (16 weight rows each) x 2 warps along K (the two 128-wide halves of every 256-wide chunk). kHeadDim is
// the head size for kHeadNormRope, else 0.
template <typename T, int kRowGroups, int kDepth, LinearEpilogue kEpilogue, int kHeadDim, bool kXResident>
__global__ void __launch_bounds__(kLinearThreads, 2) linear_rows_kernel(const LinearParams p) {
  namespace cg = cooperative_groups;
  extern __shared__ __align__(16) unsigned char linear_smem[];
  constexpr int kXRows = kRowGroups * 8;
  T* const x_buffers = reinterpret_cast<T*>(linear_smem);

  allow_next_kernel_launch();
  const cg::cluster_group cluster = cg::this_cluster();
  const int rank = int(cluster.block_rank()) % p.split;  // this CTA's run of chunks
  const int tile = int(blockIdx.x) / p.split;
  const int warp = int(threadIdx.x) / 32;
  const int lane = int(threadIdx.x) % 32;
  const int warp_n = warp % kLinearWarpsAlongN;
  const int warp_k = warp / kLinearWarpsAlongN;
  const int group = lane / 4;  // fragment row (weights) / column (x rows)
  const int quad = lane % 4;   // which 8 contiguous k of a 32-wide block this lane holds

  // kResidualNorm: this thread's first item of the epilogue loop needs the residual and norm weight behind
  // it. With one row group (the AR step) they are requested at the start, the weights before the wait, so
  // that the epilogue never waits for them; with more, the main loop needs the registers and they are
  // requested after it.
  constexpr int kResidualQuadsPerRow = kLinearTileRows / 4;  // the epilogue loop's items per row
  const int first_item = rank * kLinearThreads + int(threadIdx.x);
  [[maybe_unused]] const bool has_first_item = first_item < p.rows * kResidualQuadsPerRow;
  [[maybe_unused]] const int64_t first_column =
      int64_t(tile) * kLinearTileRows + (first_item % kResidualQuadsPerRow) * 4;
  constexpr bool kEarlyResidual = kEpilogue == LinearEpilogue::kResidualNorm && kRowGroups == 1;
  [[maybe_unused]] ResidualInputs<T> first_residual;
  if constexpr (kEarlyResidual) {
    if (has_first_item) first_residual.load_norm_weight(p, first_column);
  }

  const int chunk_begin = int(int64_t(rank) * p.chunks / p.split);
  const int chunk_end = int(int64_t(rank + 1) * p.chunks / p.split);

  // The weight row behind column `column` of this CTA's output tile, or -1 past the end. kSiluMul tiles
  // hold 32 gate rows then the 32 up rows of the same features.
  auto weight_row = [&](int column) -> int64_t {
    if constexpr (kEpilogue == LinearEpilogue::kSiluMul) {
      constexpr int kFeatures = kLinearTileRows / 2;
      const int64_t feature = int64_t(tile) * kFeatures + column % kFeatures;
      return feature < p.features ? feature + (column < kFeatures ? 0 : p.features) : -1;
    } else {
      const int64_t row = int64_t(tile) * kLinearTileRows + column;
      return row < p.out_features ? row : -1;
    }
  };
  // This lane's two weight rows: the fragment rows `group` and `group + 8` of the warp's 16.
  const T* const w = static_cast<const T*>(p.w);
  const int64_t rows_of_lane[2] = {weight_row(warp_n * kLinearWarpRows + group),
                                   weight_row(warp_n * kLinearWarpRows + group + 8)};
  const bool row_valid[2] = {rows_of_lane[0] >= 0, rows_of_lane[1] >= 0};
  const T* const row_pointer[2] = {w + (row_valid[0] ? rows_of_lane[0] : 0) * p.in_features,
                                   w + (row_valid[1] ? rows_of_lane[1] : 0) * p.in_features};

  // Within a 32-wide block the lane holds k = 8 * quad + 0..7 of both rows; MMA step s of the block uses
  // k = 8 * quad + 4 * s + 0..3. This permutes k inside the block identically for w and x (the fragment
  // loads below pair the same words), so the dot products are unchanged and every load is 16 bytes.
  auto load_weight_block = [&](int chunk, int block, uint4 (&fragment)[2]) {
    const int k = chunk * kLinearChunkK + warp_k * kLinearWarpStepK + 32 * block + quad * 8;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      fragment[half] = (row_valid[half] && k < p.in_features) ? load_weight_vector(row_pointer[half] + k)
                                                              : make_uint4(0, 0, 0, 0);
    }
  };

  float accumulator[kRowGroups][4];
#pragma unroll
  for (int g = 0; g < kRowGroups; ++g) {
#pragma unroll
    for (int i = 0; i < 4; ++i) accumulator[g][i] = 0.0f;
  }

  // kDepth chunks of weights in registers, a ring indexed by (chunk - chunk_begin) % kDepth: as soon as a
  // block's MMAs have been issued, its registers are reloaded with the same block kDepth chunks later, so
  // kDepth chunks of loads are always in flight. The weights are constant, so the first chunks are
  // requested before the previous kernel (which produces x) has finished. (Asking L2 to prefetch further
  // chunks instead was slower on an H100: 8B iteration 14.49 ms against 13.80 ms without, 2026-11-22.)
  uint4 weights[kDepth][kLinearBlocksPerStep][2];
#pragma unroll
  for (int slot = 0; slot < kDepth; ++slot) {
    if (chunk_begin + slot < chunk_end) {
#pragma unroll
      for (int block = 0; block < kLinearBlocksPerStep; ++block)
        load_weight_block(chunk_begin + slot, block, weights[slot][block]);
    }
  }
  wait_for_previous_kernels();
  if constexpr (kEarlyResidual) {
    if (has_first_item) first_residual.load_residual(p, first_item / kResidualQuadsPerRow, first_column);
  }
  // A deferred norm's sums of squares join the first group of x copies.
  float* const staged_square_sums = reinterpret_cast<float*>(linear_smem + p.x_smem_bytes);
  if (p.square_sums) {
    const int count = p.rows * p.square_sum_tiles;
    const int step = p.square_sum_vector_copies ? 4 : 1;
    for (int i = step * int(threadIdx.x); i < count; i += step * kLinearThreads) {
      const uint32_t destination = static_cast<uint32_t>(__cvta_generic_to_shared(staged_square_sums + i));
      if (p.square_sum_vector_copies) {
        copy_async_16<CopyCache::kL1AndL2>(destination, p.square_sums + i, true);
      } else {
        copy_async_4(destination, p.square_sums + i);
      }
    }
  }
  if constexpr (kXResident) {
    // Three commit groups (the first two chunks, the next four, the rest; empty ones when there are fewer),
    // so that the first MMAs wait for two chunks of x, not for all of them.
    const int count = chunk_end - chunk_begin;
    for (int index = 0; index < count; ++index) {
      stage_x_chunk<T, kRowGroups>(p, chunk_begin + index, x_buffers + index * kXRows * kLinearXPitch);
      if (index == 1 || index == 5) copy_async_commit();
    }
    if (count < 2) copy_async_commit();
    if (count < 6) copy_async_commit();
    copy_async_commit();
  } else if (chunk_begin < chunk_end) {
    stage_x_chunk<T, kRowGroups>(p, chunk_begin, x_buffers);
    copy_async_commit();
  }
  // The deferred norm's scale of each row, from the staged sums of squares in a fixed order, all rows at
  // once. Computed as soon as the first barrier has made the sums visible, under the weight stream rather
  // than on the epilogue's path; the later barriers publish it.
  __shared__ float row_scales[kMaxBlockRows];
  auto compute_row_scales = [&]() {
    constexpr int kLanesPerRow = kLinearThreads / kMaxBlockRows;
    const int row = int(threadIdx.x) / kLanesPerRow;
    float sum = 0.0f;
    if (row < p.rows) {
      for (int t = int(threadIdx.x) % kLanesPerRow; t < p.square_sum_tiles; t += kLanesPerRow)
        sum += staged_square_sums[row * p.square_sum_tiles + t];
    }
#pragma unroll
    for (int offset = kLanesPerRow / 2; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xFFFFFFFFu, sum, offset);
    if (row < p.rows && threadIdx.x % kLanesPerRow == 0) {
      row_scales[row] = rsqrtf(sum / float(p.in_features) + p.norm_eps);
    }
  };
  // Steps of kDepth chunks, unrolled so that every register index is a constant.
  for (int step = chunk_begin; step < chunk_end; step += kDepth) {
#pragma unroll
    for (int slot = 0; slot < kDepth; ++slot) {
      const int chunk = step + slot;
      if (chunk >= chunk_end) break;
      const int index = chunk - chunk_begin;
      if constexpr (kXResident) {
        if (index == 0 || index == 2 || index == 6) {
          if (index == 0) copy_async_wait<2>();
          if (index == 2) copy_async_wait<1>();
          if (index == 6) copy_async_wait<0>();
          __syncthreads();
        }
      } else {
        const int parity = index & 1;
        if (chunk + 1 < chunk_end) {
          // The other buffer was last read in the previous iteration, which ended with a barrier.
          stage_x_chunk<T, kRowGroups>(p, chunk + 1, x_buffers + (parity ^ 1) * kXRows * kLinearXPitch);
          copy_async_commit();
          copy_async_wait<1>();
        } else {
          copy_async_wait<0>();
        }
        __syncthreads();
      }
      if (index == 0 && p.square_sums) compute_row_scales();

      const T* const x_chunk = x_buffers + (kXResident ? index : index & 1) * kXRows * kLinearXPitch +
                               warp_k * kLinearWarpStepK + quad * 8;
#pragma unroll
      for (int block = 0; block < kLinearBlocksPerStep; ++block) {
        const uint4& row_low = weights[slot][block][0];
        const uint4& row_high = weights[slot][block][1];
#pragma unroll
        for (int g = 0; g < kRowGroups; ++g) {
          const uint4 x_words =
              *reinterpret_cast<const uint4*>(x_chunk + (g * 8 + group) * kLinearXPitch + 32 * block);
          mma_16x8x16<T>(accumulator[g], word<0>(row_low), word<0>(row_high), word<1>(row_low),
                         word<1>(row_high), word<0>(x_words), word<1>(x_words));
          mma_16x8x16<T>(accumulator[g], word<2>(row_low), word<2>(row_high), word<3>(row_low),
                         word<3>(row_high), word<2>(x_words), word<3>(x_words));
        }
        if (chunk + kDepth < chunk_end) load_weight_block(chunk + kDepth, block, weights[slot][block]);
      }
      if constexpr (!kXResident) __syncthreads();
    }
  }
  if constexpr (kXResident) __syncthreads();  // the partial sums below overwrite the first x chunk

  // kHeadNormRope: this warp's first block row, and what finishing its head needs from memory, requested
  // now so that the loads overlap the exchange of partial sums.
  [[maybe_unused]] const int head = tile / p.cluster_tiles;
  [[maybe_unused]] const int head_row_step = p.cluster_tiles * p.split * (kLinearThreads / 32);
  [[maybe_unused]] const int head_first_row = int(cluster.block_rank()) + p.cluster_tiles * p.split * warp;
  using Finish = std::conditional_t<kEpilogue == LinearEpilogue::kHeadNormRope, HeadFinish<T, kHeadDim>, int>;
  Finish head_finish{};
  if constexpr (kEpilogue == LinearEpilogue::kHeadNormRope) {
    if (head_first_row < p.rows) head_finish = HeadFinish<T, kHeadDim>(p.heads, head_first_row, head, lane);
  }
  if constexpr (kEpilogue == LinearEpilogue::kResidualNorm && !kEarlyResidual) {
    if (has_first_item) {
      first_residual.load_norm_weight(p, first_column);
      first_residual.load_residual(p, first_item / kResidualQuadsPerRow, first_column);
    }
  }

  auto scaled = [&](int row, float value) { return p.square_sums ? value * row_scales[row] : value; };

  // Accumulator element i of group g: x row 8g + 2*quad + (i & 1), tile column warp_n*16 + group + 8*(i >> 1).
  float* const partial = reinterpret_cast<float*>(linear_smem);
  auto partial_index = [&](int g, int i) {
    return (g * 8 + 2 * quad + (i & 1)) * kLinearPartialPitch + warp_n * kLinearWarpRows + group + 8 * (i >> 1);
  };
  if (warp_k == 1) {
#pragma unroll
    for (int g = 0; g < kRowGroups; ++g) {
#pragma unroll
      for (int i = 0; i < 4; ++i) partial[partial_index(g, i)] = accumulator[g][i];
    }
  }
  __syncthreads();
  if (warp_k == 0) {
#pragma unroll
    for (int g = 0; g < kRowGroups; ++g) {
#pragma unroll
      for (int i = 0; i < 4; ++i) partial[partial_index(g, i)] = accumulator[g][i] + partial[partial_index(g, i)];
    }
  }
  // Publishes every rank's partial tile to the cluster.
  cluster.sync();

  // The complete sums: every output adds the ranks' partials in rank order.
  auto rank_sum = [&](int tile_in_cluster, int offset) {
    const int first = tile_in_cluster * p.split;
    float4 sum = *reinterpret_cast<const float4*>(cluster.map_shared_rank(partial, first) + offset);
    for (int source = 1; source < p.split; ++source) {
      const float4 v = *reinterpret_cast<const float4*>(cluster.map_shared_rank(partial, first + source) + offset);
      sum.x += v.x;
      sum.y += v.y;
      sum.z += v.z;
      sum.w += v.w;
    }
    return sum;
  };
  // Rounded as the plain linear would store it.
  auto rounded = [](float value) { return to_float(from_float<T>(value)); };

  if constexpr (kEpilogue != LinearEpilogue::kHeadNormRope) {
    // Each rank finishes a slice of the tile, 4 outputs of a row per item. A kSiluMul tile has half as
    // many outputs as weight rows: output i combines columns i (gate) and kOutputs + i (up). A row's
    // kQuadsPerRow (16) items go to 16 consecutive threads, an aligned half warp, which all leave the loop
    // together: kArgmax reduces the row's keys across them.
    constexpr bool kSiluMul = kEpilogue == LinearEpilogue::kSiluMul;
    constexpr int kOutputs = kSiluMul ? kLinearTileRows / 2 : kLinearTileRows;
    constexpr int kQuadsPerRow = kOutputs / 4;
    const int64_t width = kSiluMul ? p.features : p.out_features;  // y's row length
    for (int item = first_item; item < p.rows * kQuadsPerRow; item += p.split * kLinearThreads) {
      const int row = item / kQuadsPerRow;
      const int column = (item % kQuadsPerRow) * 4;
      const float4 sum = rank_sum(0, row * kLinearPartialPitch + column);
      float values[4] = {scaled(row, sum.x), scaled(row, sum.y), scaled(row, sum.z), scaled(row, sum.w)};
      if constexpr (kSiluMul) {
        const float4 up = rank_sum(0, row * kLinearPartialPitch + kOutputs + column);
        const float ups[4] = {scaled(row, up.x), scaled(row, up.y), scaled(row, up.z), scaled(row, up.w)};
#pragma unroll
        for (int j = 0; j < 4; ++j) values[j] = swiglu(rounded(values[j]), rounded(ups[j]));
      }
      const int64_t n = int64_t(tile) * kOutputs + column;
      if constexpr (kEpilogue == LinearEpilogue::kResidualNorm) {
        static_assert(kQuadsPerRow == kResidualQuadsPerRow && kQuadsPerRow == 16, "a row's items fill a half warp");
        ResidualInputs<T> inputs = first_residual;
        if (item != first_item) {
          inputs.load_norm_weight(p, n);
          inputs.load_residual(p, row, n);
        }
        T* const residual = static_cast<T*>(p.residual) + int64_t(row) * width + n;
        T* const weighted = static_cast<T*>(p.y) + int64_t(row) * width + n;
        float updated[4], scaled_by_weight[4];
        float squares = 0.0f;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          // Past the end of the row everything is zero and nothing is stored.
          updated[j] = rounded(ResidualInputs<T>::value(inputs.residual, j) + rounded(values[j]));
          scaled_by_weight[j] = updated[j] * ResidualInputs<T>::value(inputs.norm_weight, j);
          squares += updated[j] * updated[j];
        }
        if (p.residual_vector_access && n + 4 <= width) {
          *reinterpret_cast<uint2*>(residual) =
              make_uint2(pack2<T>(updated[0], updated[1]), pack2<T>(updated[2], updated[3]));
          *reinterpret_cast<uint2*>(weighted) = make_uint2(pack2<T>(scaled_by_weight[0], scaled_by_weight[1]),
                                                           pack2<T>(scaled_by_weight[2], scaled_by_weight[3]));
        } else {
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            if (n + j < width) {
              residual[j] = from_float<T>(updated[j]);
              weighted[j] = from_float<T>(scaled_by_weight[j]);
            }
          }
        }
#pragma unroll
        for (int offset = 8; offset > 0; offset /= 2) {
          squares += __shfl_xor_sync(0xFFFFu << (lane & 16), squares, offset);
        }
        if (lane % 16 == 0) p.square_sums_out[int64_t(row) * square_sum_columns(p.out_features) + tile] = squares;
      } else if constexpr (kEpilogue == LinearEpilogue::kArgmax) {
        static_assert(kQuadsPerRow == 16, "a row's items fill a half warp");
        uint64_t key = 0;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const uint64_t candidate = n + j < width ? linear_argmax_key(rounded(values[j]), n + j) : 0;
          key = candidate > key ? candidate : key;
        }
        key = max_over_lanes<16>(key, 0xFFFFu << (lane & 16));
        const int tiles = (p.out_features + kLinearTileRows - 1) / kLinearTileRows;
        if (lane % 16 == 0) static_cast<uint64_t*>(p.y)[int64_t(row) * tiles + tile] = key;
      } else {
        T* const out = static_cast<T*>(p.y) + int64_t(row) * width + n;
        if (p.y_vector_stores && n + 4 <= width) {
          uint2 packed;
          packed.x = pack2<T>(values[0], values[1]);
          packed.y = pack2<T>(values[2], values[3]);
          *reinterpret_cast<uint2*>(out) = packed;
        } else {
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            if (n + j < width) out[j] = from_float<T>(values[j]);
          }
        }
      }
    }
  } else {
    // One warp per block row finishes the cluster's head; rows go round the cluster's warps. The first
    // row's targets were loaded before the partial sums were exchanged.
    static_assert(kHeadDim % kLinearTileRows == 0, "a head is whole tiles");
    auto head_value = [&](int row, int index) {
      const int column = index % kLinearTileRows;
      const float4 sum = rank_sum(index / kLinearTileRows, row * kLinearPartialPitch + (column & ~3));
      const int lane_of_four = column & 3;
      return rounded(
          scaled(row, lane_of_four == 0 ? sum.x : lane_of_four == 1 ? sum.y : lane_of_four == 2 ? sum.z : sum.w));
    };
    for (int row = head_first_row; row < p.rows; row += head_row_step) {
      if (row != head_first_row) head_finish = HeadFinish<T, kHeadDim>(p.heads, row, head, lane);
      HeadSlice<kHeadDim> slice;
#pragma unroll
      for (int i = 0; i < HeadSlice<kHeadDim>::kPairs; ++i) {
        slice.low[i] = head_value(row, HeadSlice<kHeadDim>::low_index(lane, i));
        slice.high[i] = head_value(row, HeadSlice<kHeadDim>::kHalf + HeadSlice<kHeadDim>::low_index(lane, i));
      }
      head_finish.store(slice, p.heads.eps, lane);
    }
  }
  // No CTA may leave while another still reads its shared memory.
  cluster.sync();
}

// linear_cuda with an explicit split-K cluster size (1..kLinearMaxSplit, at most the number of 256-wide
// chunks of K) instead of linear_split_for_shape's: for tuning benchmarks and tests. Same checks.
cudaError_t linear_cuda_with_split(DType dtype, const void* x, int64_t x_row_stride, const void* w, void* y,
                                   int64_t rows, int64_t out_features, int64_t in_features, int split,
                                   cudaStream_t stream);

int linear_split_for_shape(int64_t out_features, int64_t in_features);

}  // namespace orthrus::cuda_detail
