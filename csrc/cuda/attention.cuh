// Row-invariant block attention over an in-place KV cache (the contract is in orthrus/kernels.h).
//
// Two launches. Keys are cut at fixed absolute positions into splits of kAttentionSplitKeys (the unit of
// one online softmax) and chunks of kAttentionSplitsPerChunk splits (the unit of a partial result). A
// chunk's state is the left fold of its splits' states (fold_weights, fold), starting from the empty state;
// a row's output folds its chunks in an order fixed by the chunk indices alone.
//
// The chunk kernel gives one CTA, one warpgroup, a (tile of 64 query vectors, kv head, key range), where a
// query vector is one (block row, q head of that kv head's group), so every K/V tile it loads serves the
// GQA group and up to 64 / group block rows. It runs Hopper's warpgroup MMAs (wgmma, M = 64: queries and
// probabilities from registers, 16 vectors per warp; keys and values from shared memory) with an online
// softmax over 64-key tiles. Against per-warp m16n8k16 MMAs, which read every K/V tile from shared memory
// once per 16 vectors, the 32-row Qwen3-8B call at 32K keys went from 88.8 to 71.8 µs per layer on an H100
// (2026-11-22; the B = 32 iteration at 32K from 18.55 to 17.33 ms). Its key range is either a whole
// chunk, whose splits it folds in registers, or, when whole chunks would leave most SMs idle (short
// contexts), a single split whose state the merge kernel folds. Both schedules compute the same operations
// on the same values, so the choice (made on the device from the live length) never changes a bit.
//
// Why a row's bits cannot depend on the row count: rows of an MMA are independent; every warpgroup runs the
// same instruction sequence whatever the number of live rows (missing rows are zero padding); tile, split
// and chunk boundaries are absolute positions; a row folds exactly the chunks that hold keys it may see; a
// split or tile the row may not see at all (present only because a later row of the block sees it) leaves
// the row's state unchanged (its scores are -inf, so p == 0 and the rescale factor is exactly 1, and
// folding an empty state is exact).
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "copy_async.cuh"
#include "element.cuh"
#include "launch.cuh"

namespace orthrus::cuda_detail {

constexpr int kAttentionTileKeys = 64;
constexpr int kAttentionTilesPerSplit = 2;
constexpr int kAttentionSplitKeys = kAttentionTileKeys * kAttentionTilesPerSplit;
constexpr int kAttentionSplitsPerChunk = 8;
constexpr int kAttentionChunkKeys = kAttentionSplitKeys * kAttentionSplitsPerChunk;
// Whole chunks are the schedule while they give at least this many warps (about one 4-warp CTA per SM of
// an H100); below it one CTA takes one split. Measured crossover on an H100, Qwen3-8B heads, µs per layer
// call, with per-warp MMAs: 1 row, 8K keys: 23.2 split against 37.0 whole, 16K: 40.3 / 39.5, 32K: 69.0 /
// 56.0; 32 rows, 4K: 31.9 / 39.5, 8K: 58.7 / 53.9. Re-measured with wgmma (2026-11-22), thresholds of 256,
// 128 and 64 gained at most 1 µs and lost up to 11 µs at 1K-4K (benchmarks/results, ninth session).
constexpr int kAttentionWholeChunkMinWarps = 512;
constexpr int kAttentionVectorsPerWarp = 16;
// One warpgroup per CTA. Two sharing each K/V tile (128 vectors) were slower: the CTA-wide barrier per tile
// kept them in lockstep, both waiting on their MMAs at once (32 rows at 32K, Qwen3-8B heads, H100,
// 2026-11-22: 71.6 against 67.7 µs per layer call).
constexpr int kAttentionWarps = 4;
constexpr int kAttentionVectorsPerCta = kAttentionWarps * kAttentionVectorsPerWarp;
constexpr int kAttentionStages = 3;
constexpr int kAttentionMergeWarps = 4;  // one CTA per (row, q head); warp w folds chunks w, w + 4, ...

// Partial results of one schedule: acc [rows, q_heads, slots, head_dim] (unnormalised), stats [rows,
// q_heads, slots, 2] (running max in log2 units, sum of exponentials).
struct AttentionPartials {
  float* acc;
  float* stats;
  int slots;
};

struct AttentionParams {
  const void* q;
  const void* k_cache;
  const void* v_cache;
  const int32_t* cache_len;
  const void* k_block;
  const void* v_block;
  void* out;
  AttentionPartials chunks;  // one slot per chunk of the capacity
  AttentionPartials splits;  // one slot per split of the first split_mode_max_chunks chunks
  int split_mode_max_chunks;  // at most this many live chunks: one CTA per split
  int rows;
  int q_heads;
  int kv_heads;
  int group;  // q_heads / kv_heads
  int num_chunks;
  int max_keys;  // the capacity the grid was sized for: cache_len + rows must not exceed it
  bool causal;
  float scale_log2;  // scale * log2(e): scores go through exp2
};

__device__ __forceinline__ bool attention_split_mode(const AttentionParams& p, int total_keys) {
  return (total_keys + kAttentionChunkKeys - 1) / kAttentionChunkKeys <= p.split_mode_max_chunks;
}

// 2^x with denormal results flushed to zero. exp2f adds a fix-up for results below 2^-126 that costs a
// compare, a multiply and a select per call (about 100 instructions per tile of the chunk kernel); such
// weights are far below what a bf16/fp16 output or an fp32 sum of larger terms can resolve.
__device__ __forceinline__ float exp2_flush(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Weights that fold state b into state a (maxima in log2 units): new = a * weight_a + b * weight_b.
// Exactly 1 for the state holding the larger max, so folding an empty state (-inf, 0, 0) is exact.
struct FoldWeights {
  float max;
  float a;
  float b;
};

__device__ __forceinline__ FoldWeights fold_weights(float max_a, float max_b) {
  FoldWeights w;
  w.max = fmaxf(max_a, max_b);
  w.a = max_a == w.max ? 1.f : exp2_flush(max_a - w.max);
  w.b = max_b == w.max ? 1.f : exp2_flush(max_b - w.max);
  return w;
}

// Explicit roundings: the chunk kernel (registers) and the merge kernel (memory) must fold bit for bit
// alike, so the compiler may not contract or reorder either in a way of its choosing.
__device__ __forceinline__ float fold(float a, float weight_a, float b, float weight_b) {
  return __fmaf_rn(b, weight_b, __fmul_rn(a, weight_a));
}

// A softmax state (max in log2 units, sum of exponentials, unnormalised values) that other states are
// folded into, one after another.
template <int kValues>
struct FoldedState {
  float max = -INFINITY;
  float sum = 0.f;
  float values[kValues] = {};

  __device__ __forceinline__ void fold_in(float other_max, float other_sum, const float (&other_values)[kValues]) {
    const FoldWeights weights = fold_weights(max, other_max);
    sum = fold(sum, weights.a, other_sum, weights.b);
#pragma unroll
    for (int i = 0; i < kValues; ++i) values[i] = fold(values[i], weights.a, other_values[i], weights.b);
    max = weights.max;
  }
};

// A K or V tile in shared memory: the keys' rows cut into 64-element (128-byte) column blocks, block b
// at b * kAttentionSwizzleBlockBytes, key r at r * 128 within it, its 16-byte pieces permuted by r % 8 (the
// tensor cores' 128-byte swizzle). Both operand roles read this one layout: keys as the N side of the
// scores (K-major B) and as the K side of P V (N-major B); each 8-key stripe is 1024 bytes.
constexpr int kAttentionSwizzleBlockBytes = kAttentionTileKeys * 128;

template <int kHeadDim>
__host__ __device__ constexpr int attention_tile_bytes() {
  return kAttentionTileKeys * kHeadDim * 2;
}

// Stages of (K tile, V tile), plus slack to align them to the 1024-byte swizzle period.
template <typename T, int kHeadDim>
constexpr int attention_smem_bytes() {
  static_assert(sizeof(T) == 2, "16-bit elements");
  return kAttentionStages * 2 * attention_tile_bytes<kHeadDim>() + 1024;
}

// Byte offset of the 16-byte piece `segment` (elements 8 * segment ...) of key `key` in a tile.
__device__ __forceinline__ int attention_tile_offset(int key, int segment) {
  return (segment / 8) * kAttentionSwizzleBlockBytes + key * 128 + (((segment % 8) ^ (key % 8)) << 4);
}

// A wgmma shared-memory matrix descriptor for the 128-byte swizzle: the address and the two strides, in
// 16-byte units.
__device__ __forceinline__ uint64_t wgmma_descriptor(uint32_t smem_address, uint32_t leading_bytes,
                                                     uint32_t stride_bytes) {
  return uint64_t((smem_address & 0x3ffff) >> 4) | (uint64_t(leading_bytes >> 4) << 16) |
         (uint64_t(stride_bytes >> 4) << 32) | (uint64_t(1) << 62);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }

// Keeps the compiler from moving reads or writes of accumulator registers across wgmma_fence /
// wgmma_wait_all: the asynchronous MMAs own them in between.
template <int kCount>
__device__ __forceinline__ void wgmma_fence_registers(float* registers) {
#pragma unroll
  for (int i = 0; i < kCount; ++i) asm volatile("" : "+f"(registers[i])::"memory");
}

#define ORTHRUS_WGMMA_ACC32                                                                                     \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, " \
  "%23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define ORTHRUS_WGMMA_ACC64                                                                                      \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, "  \
  "%23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, "    \
  "%44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define ORTHRUS_WGMMA_OUT8(c, i)                                                                             \
  "+f"(c[i]), "+f"(c[i + 1]), "+f"(c[i + 2]), "+f"(c[i + 3]), "+f"(c[i + 4]), "+f"(c[i + 5]), "+f"(c[i + 6]), \
      "+f"(c[i + 7])
#define ORTHRUS_WGMMA_OUT32(c) \
  ORTHRUS_WGMMA_OUT8(c, 0), ORTHRUS_WGMMA_OUT8(c, 8), ORTHRUS_WGMMA_OUT8(c, 16), ORTHRUS_WGMMA_OUT8(c, 24)
#define ORTHRUS_WGMMA_OUT64(c) ORTHRUS_WGMMA_OUT32(c), ORTHRUS_WGMMA_OUT32((c + 32))
// One m64nNk16 wgmma with A in registers. SCALE and TAIL name the operands after the N / 2 accumulators.
#define ORTHRUS_WGMMA_RS(N, TYPE, ACC, SCALE, TAIL, OUT)                                                  \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " SCALE ", 0;\nwgmma.mma_async.sync.aligned.m64n" #N    \
               "k16.f32." TYPE "." TYPE " " ACC ", " TAIL ";\n}\n"                                        \
               : OUT                                                                                      \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(int(scale_c)), "n"(int(kTransposeB)))
#define ORTHRUS_WGMMA_TAIL64 "{%32, %33, %34, %35}, %36, p, 1, 1, %38"
#define ORTHRUS_WGMMA_TAIL128 "{%64, %65, %66, %67}, %68, p, 1, 1, %70"

// c (64 x kN, fp32; this thread's kN / 2 values in the m16n8 accumulator order, n-tile by n-tile) +=
// a (64 x 16; this warp's 16 rows as an m16n8k16 A fragment) * b (16 x kN, shared memory). scale_c ==
// false replaces c instead. kTransposeB: b's elements are contiguous along N rather than along K.
template <typename T, int kN, bool kTransposeB>
__device__ __forceinline__ void wgmma_rs(float* c, const uint32_t (&a)[4], uint64_t b, bool scale_c) {
  static_assert(kN == 64 || kN == 128, "the attention kernel's N sizes");
  constexpr bool kBFloat16 = std::is_same_v<T, __nv_bfloat16>;
  if constexpr (kN == 64 && kBFloat16) {
    ORTHRUS_WGMMA_RS(64, "bf16", ORTHRUS_WGMMA_ACC32, "%37", ORTHRUS_WGMMA_TAIL64, ORTHRUS_WGMMA_OUT32(c));
  } else if constexpr (kN == 64) {
    ORTHRUS_WGMMA_RS(64, "f16", ORTHRUS_WGMMA_ACC32, "%37", ORTHRUS_WGMMA_TAIL64, ORTHRUS_WGMMA_OUT32(c));
  } else if constexpr (kBFloat16) {
    ORTHRUS_WGMMA_RS(128, "bf16", ORTHRUS_WGMMA_ACC64, "%69", ORTHRUS_WGMMA_TAIL128, ORTHRUS_WGMMA_OUT64(c));
  } else {
    ORTHRUS_WGMMA_RS(128, "f16", ORTHRUS_WGMMA_ACC64, "%69", ORTHRUS_WGMMA_TAIL128, ORTHRUS_WGMMA_OUT64(c));
  }
}
#undef ORTHRUS_WGMMA_RS
#undef ORTHRUS_WGMMA_TAIL64
#undef ORTHRUS_WGMMA_TAIL128
#undef ORTHRUS_WGMMA_OUT64
#undef ORTHRUS_WGMMA_OUT32
#undef ORTHRUS_WGMMA_OUT8
#undef ORTHRUS_WGMMA_ACC64
#undef ORTHRUS_WGMMA_ACC32

// Partial results are stored with L2's evict-last priority: at long contexts the chunk kernel streams far
// more keys and values through L2 than it holds, which would otherwise push the partials out before the
// merge kernel reads them back. On an H100 (8B, 2026-11-22, 3 interleaved runs) the B = 32 iteration at 32K
// took 18.35-18.48 ms against 18.50-18.61 without; 1K and AR unchanged. (Loading the keys and values with
// evict-first as well was slower: 1K iteration 13.09-13.10 against 12.98-13.02 ms.)
__device__ __forceinline__ uint64_t l2_evict_last_policy() {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;\n" : "=l"(policy));
  return policy;
}

__device__ __forceinline__ void store_float2(float* destination, float a, float b, uint64_t policy) {
  asm volatile("st.global.L2::cache_hint.v2.f32 [%0], {%1, %2}, %3;\n" ::"l"(destination), "f"(a), "f"(b),
               "l"(policy)
               : "memory");
}

// Exclusive upper bound of the key positions block row `block_row` may see.
__device__ __forceinline__ int attention_key_limit(const AttentionParams& p, int cache_len, int block_row) {
  return p.causal ? cache_len + block_row + 1 : cache_len + p.rows;
}

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kAttentionWarps * 32)
    attention_chunk_kernel(const AttentionParams p) {
  constexpr int kTileBytes = attention_tile_bytes<kHeadDim>();
  constexpr int kDSteps = kHeadDim / 16;         // MMA k-steps over the head dimension (scores)
  constexpr int kKeyTiles = kAttentionTileKeys / 8;  // 8-key n-tiles of the score accumulator
  constexpr int kKeySteps = kAttentionTileKeys / 16;  // MMA k-steps over the keys (P V)
  constexpr int kDTiles = kHeadDim / 8;          // 8-wide n-tiles of the output accumulator
  constexpr int kSegmentsPerKey = kHeadDim / 8;  // 16-byte copies per key row
  constexpr int kThreads = kAttentionWarps * 32;
  static_assert(kAttentionTileKeys == 64 && kAttentionWarps == 4, "the warpgroup's MMAs cover one 64-key tile");

  extern __shared__ uint4 attention_smem[];
  // Stages start on the swizzle period (the swizzle is a function of the shared-memory address).
  const uint32_t smem = (static_cast<uint32_t>(__cvta_generic_to_shared(attention_smem)) + 1023) & ~1023u;

  // Launched early (PDL, attention.cu): until the wait below, the previous kernel (the q/k/v projection)
  // may still be running, so only what earlier passes wrote is read before it: the length and the cached
  // keys and values below it. Every kernel of a pass, from the first plainly launched one (the embedding
  // gather, after the previous pass and its acceptance), reaches this launch only through early launches,
  // and all of those passes' writes were complete before that plain launch began.
  const int vector_tile = blockIdx.x;
  const int kv_head = blockIdx.y;
  const int cache_len = *p.cache_len;
  const int total_keys = cache_len + p.rows;
  // Past the capacity nothing is read: the merge kernel reports that case.
  if (cache_len < 0 || total_keys > p.max_keys) return;
  // The grid covers the capacity in both schedules; only CTAs holding live keys do work (a graph-capturable
  // launch whose work follows the device-side length).
  const bool split_mode = attention_split_mode(p, total_keys);
  const int range_keys = split_mode ? kAttentionSplitKeys : kAttentionChunkKeys;
  const int range = blockIdx.z;
  const int range_start = range * range_keys;
  if (range_start >= total_keys || (!split_mode && range >= p.num_chunks)) return;
  const int range_end = min(range_start + range_keys, total_keys);
  const int num_tiles = (range_end - range_start + kAttentionTileKeys - 1) / kAttentionTileKeys;

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int lane_group = lane / 4;   // the row (and row + 8) of the MMA fragments this lane holds
  const int lane_in_group = lane % 4;
  const int vectors = p.rows * p.group;
  // Warps past the last vector compute padding: the MMAs are warpgroup-wide.
  const int warp_first_vector = vector_tile * kAttentionVectorsPerCta + warp * kAttentionVectorsPerWarp;

  const T* const k_cache = static_cast<const T*>(p.k_cache);
  const T* const v_cache = static_cast<const T*>(p.v_cache);
  const T* const k_block = static_cast<const T*>(p.k_block);
  const T* const v_block = static_cast<const T*>(p.v_block);

  // A thread copies the same 16-byte segment of every kKeysPerPass-th key of a tile.
  constexpr int kKeysPerPass = kThreads / kSegmentsPerKey;
  static_assert(kThreads % kSegmentsPerKey == 0 && kAttentionTileKeys % kKeysPerPass == 0, "whole passes");
  const int thread_key = threadIdx.x / kSegmentsPerKey;
  const int thread_segment = threadIdx.x % kSegmentsPerKey;
  const int key_stride = p.kv_heads * kHeadDim;  // elements between consecutive keys
  const int head_offset = kv_head * kHeadDim + thread_segment * 8;
  // Keys below this position are read from the cache: all live keys (causal), or the cached ones.
  const int cached_end = p.causal ? total_keys : cache_len;

  // kKeysPerPass is a multiple of 8, so a thread's swizzled piece is at the same offset in every pass.
  static_assert(kKeysPerPass % 8 == 0, "passes cover whole 8-key stripes");
  const int thread_offset = attention_tile_offset(thread_key, thread_segment);
  auto load_tile = [&](int tile, int stage) {
    const uint32_t k_stage = smem + stage * 2 * kTileBytes + thread_offset;
    const uint32_t v_stage = k_stage + kTileBytes;
    const int tile_start = range_start + tile * kAttentionTileKeys;
    if (tile_start + kAttentionTileKeys <= cached_end) {
      // Every key of the tile is live and cached: plain strided copies (the common case; the general
      // path's per-key address arithmetic cost more instructions than the MMAs).
      const size_t offset = size_t(tile_start + thread_key) * key_stride + head_offset;
#pragma unroll
      for (int pass = 0; pass < kAttentionTileKeys / kKeysPerPass; ++pass) {
        const size_t pass_offset = offset + size_t(pass * kKeysPerPass * key_stride);
        copy_async_16<CopyCache::kL2Only>(k_stage + pass * kKeysPerPass * 128, k_cache + pass_offset, true);
        copy_async_16<CopyCache::kL2Only>(v_stage + pass * kKeysPerPass * 128, v_cache + pass_offset, true);
      }
      return;
    }
#pragma unroll
    for (int pass = 0; pass < kAttentionTileKeys / kKeysPerPass; ++pass) {
      const int position = tile_start + thread_key + pass * kKeysPerPass;
      const bool live = position < total_keys;
      // Keys past the live length are zero-filled so that stale cache bits (NaN, say) never enter P V.
      const T* k_src = k_cache;
      const T* v_src = v_cache;
      if (live) {
        const bool cached = position < cached_end;
        const size_t offset = size_t(cached ? position : position - cache_len) * key_stride + head_offset;
        k_src = (cached ? k_cache : k_block) + offset;
        v_src = (cached ? v_cache : v_block) + offset;
      }
      copy_async_16<CopyCache::kL2Only>(k_stage + pass * kKeysPerPass * 128, k_src, live);
      copy_async_16<CopyCache::kL2Only>(v_stage + pass * kKeysPerPass * 128, v_src, live);
    }
  };

  // Prefetch first: tiles wholly below the cached length while the projection may still run, the rest
  // (this pass's block keys) after the wait; the query fragments below load while they are in flight.
  int prefetched = 0;
#pragma unroll
  for (int s = 0; s < kAttentionStages - 1; ++s) {
    if (s < num_tiles && range_start + (s + 1) * kAttentionTileKeys <= cache_len && prefetched == s) {
      load_tile(s, s);
      copy_async_commit();
      ++prefetched;
    }
  }
  wait_for_previous_kernels();
#pragma unroll
  for (int s = 0; s < kAttentionStages - 1; ++s) {
    if (s < prefetched) continue;
    if (s < num_tiles) load_tile(s, s);
    copy_async_commit();
  }

  // Query fragments (A operand of the score MMA) for this lane's two rows; padding rows are zero.
  uint32_t q_frag[kDSteps][4];
  int key_limit[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int vector = warp_first_vector + lane_group + 8 * half;
    const bool real = vector < vectors;
    const int block_row = real ? vector / p.group : 0;
    const int q_head = kv_head * p.group + (real ? vector % p.group : 0);
    key_limit[half] = real ? attention_key_limit(p, cache_len, block_row) : total_keys;
    const uint32_t* q_row = reinterpret_cast<const uint32_t*>(static_cast<const T*>(p.q) +
                                                              (size_t(block_row) * p.q_heads + q_head) * kHeadDim);
#pragma unroll
    for (int d = 0; d < kDSteps; ++d) {
      q_frag[d][half] = real ? q_row[d * 8 + lane_in_group] : 0u;
      q_frag[d][half + 2] = real ? q_row[d * 8 + 4 + lane_in_group] : 0u;
    }
  }
  // Tiles below every row's limit need no mask.
  const int warp_key_limit = __reduce_min_sync(0xffffffffu, min(key_limit[0], key_limit[1]));

  // The folded state of the splits done so far, starting empty, and the state of the current split.
  float folded_acc[kDTiles][4];
  float folded_max[2] = {-INFINITY, -INFINITY};
  float folded_sum[2] = {0.f, 0.f};
  float acc[kDTiles][4];
  float running_max[2];
  float running_sum[2];  // this lane's share; the quad's shares are added when the split ends
#pragma unroll
  for (int j = 0; j < kDTiles; ++j) folded_acc[j][0] = folded_acc[j][1] = folded_acc[j][2] = folded_acc[j][3] = 0.f;

  for (int tile = 0; tile < num_tiles; ++tile) {
    copy_async_wait<kAttentionStages - 2>();
    // The MMAs read shared memory through the async proxy; the copies wrote it through the generic one.
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    __syncthreads();  // the tile has landed for every thread, and every warp is done with tile - 1
    {
      const int next = tile + kAttentionStages - 1;
      if (next < num_tiles) load_tile(next, next % kAttentionStages);
      copy_async_commit();
    }

    const uint32_t k_stage = smem + (tile % kAttentionStages) * 2 * kTileBytes;
    const uint32_t v_stage = k_stage + kTileBytes;
    const int tile_start = range_start + tile * kAttentionTileKeys;
    const bool split_begins = tile % kAttentionTilesPerSplit == 0;
    if (split_begins) {
      running_max[0] = running_max[1] = -INFINITY;
      running_sum[0] = running_sum[1] = 0.f;
#pragma unroll
      for (int j = 0; j < kDTiles; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
    }

    // Scores: keys are the N side, K-major; k-step d is 32 bytes into the swizzled row of its 64-column
    // block. The first k-step replaces the previous tile's scores.
    float score[kKeyTiles][4];
    wgmma_fence_registers<kKeyTiles * 4>(&score[0][0]);
    wgmma_fence();
#pragma unroll
    for (int d = 0; d < kDSteps; ++d) {
      const uint32_t address = k_stage + (d / 4) * kAttentionSwizzleBlockBytes + (d % 4) * 32;
      wgmma_rs<T, kAttentionTileKeys, false>(&score[0][0], q_frag[d], wgmma_descriptor(address, 16, 1024), d > 0);
    }
    wgmma_commit();
    wgmma_wait_all();
    wgmma_fence_registers<kKeyTiles * 4>(&score[0][0]);

    float tile_max[2] = {-INFINITY, -INFINITY};
    if (tile_start + kAttentionTileKeys <= warp_key_limit) {
      // Every row of the warp sees the whole tile: no mask (applying it would change nothing).
#pragma unroll
      for (int j = 0; j < kKeyTiles; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          score[j][e] *= p.scale_log2;
          tile_max[e / 2] = fmaxf(tile_max[e / 2], score[j][e]);
        }
      }
    } else {
#pragma unroll
      for (int j = 0; j < kKeyTiles; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = tile_start + j * 8 + 2 * lane_in_group + (e % 2);
          score[j][e] = key < key_limit[e / 2] ? score[j][e] * p.scale_log2 : -INFINITY;
          tile_max[e / 2] = fmaxf(tile_max[e / 2], score[j][e]);
        }
      }
    }
    float rescale[2];
    float shift[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      tile_max[half] = fmaxf(tile_max[half], __shfl_xor_sync(0xffffffffu, tile_max[half], 1));
      tile_max[half] = fmaxf(tile_max[half], __shfl_xor_sync(0xffffffffu, tile_max[half], 2));
      const float new_max = fmaxf(running_max[half], tile_max[half]);
      // Exactly 1 when the max is unchanged (a tile the row may not see must leave its state alone).
      rescale[half] = new_max == running_max[half] ? 1.f : exp2_flush(running_max[half] - new_max);
      shift[half] = new_max == -INFINITY ? 0.f : new_max;  // no key seen yet: avoid -inf - -inf
      running_max[half] = new_max;
    }

    float tile_sum[2] = {0.f, 0.f};
    uint32_t p_frag[kKeySteps][4];
#pragma unroll
    for (int j = 0; j < kKeyTiles; ++j) {
      float e0 = exp2_flush(score[j][0] - shift[0]);
      float e1 = exp2_flush(score[j][1] - shift[0]);
      float e2 = exp2_flush(score[j][2] - shift[1]);
      float e3 = exp2_flush(score[j][3] - shift[1]);
      tile_sum[0] += e0 + e1;
      tile_sum[1] += e2 + e3;
      // C fragments of n-tiles 2k and 2k+1 are exactly the A fragment of k-step k.
      p_frag[j / 2][(j % 2) * 2 + 0] = pack2<T>(e0, e1);
      p_frag[j / 2][(j % 2) * 2 + 1] = pack2<T>(e2, e3);
    }
#pragma unroll
    for (int half = 0; half < 2; ++half) running_sum[half] = running_sum[half] * rescale[half] + tile_sum[half];
    // A split's first tile starts from zeros, which any rescale leaves zero: skipping it is exact.
    if (!split_begins) {
#pragma unroll
      for (int j = 0; j < kDTiles; ++j) {
        acc[j][0] *= rescale[0];
        acc[j][1] *= rescale[0];
        acc[j][2] *= rescale[1];
        acc[j][3] *= rescale[1];
      }
    }
    // P V: keys are the K side, the head dimension the N side and contiguous (transposed B); k-step k is
    // the 16 keys two 8-key stripes into the tile; the 64-column blocks are the N repeats.
    wgmma_fence_registers<kDTiles * 4>(&acc[0][0]);
    wgmma_fence();
#pragma unroll
    for (int k = 0; k < kKeySteps; ++k) {
      const uint64_t descriptor = wgmma_descriptor(v_stage + k * 2 * 1024, kAttentionSwizzleBlockBytes, 1024);
      wgmma_rs<T, kHeadDim, true>(&acc[0][0], p_frag[k], descriptor, true);
    }
    wgmma_commit();
    wgmma_wait_all();
    wgmma_fence_registers<kDTiles * 4>(&acc[0][0]);

    if (tile % kAttentionTilesPerSplit == kAttentionTilesPerSplit - 1 || tile == num_tiles - 1) {
      FoldWeights weights[2];
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        running_sum[half] += __shfl_xor_sync(0xffffffffu, running_sum[half], 1);
        running_sum[half] += __shfl_xor_sync(0xffffffffu, running_sum[half], 2);
        weights[half] = fold_weights(folded_max[half], running_max[half]);
        folded_sum[half] = fold(folded_sum[half], weights[half].a, running_sum[half], weights[half].b);
        folded_max[half] = weights[half].max;
      }
#pragma unroll
      for (int j = 0; j < kDTiles; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          folded_acc[j][e] = fold(folded_acc[j][e], weights[e / 2].a, acc[j][e], weights[e / 2].b);
        }
      }
    }
  }
  copy_async_wait<0>();  // no copy may still target shared memory when the CTA retires

  const AttentionPartials& partials = split_mode ? p.splits : p.chunks;
  const uint64_t partial_policy = l2_evict_last_policy();
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int vector = warp_first_vector + lane_group + 8 * half;
    if (vector >= vectors) continue;
    const int block_row = vector / p.group;
    const int q_head = kv_head * p.group + vector % p.group;
    const size_t slot = (size_t(block_row) * p.q_heads + q_head) * partials.slots + range;
    float* const acc_out = partials.acc + slot * kHeadDim;
#pragma unroll
    for (int j = 0; j < kDTiles; ++j) {
      store_float2(acc_out + j * 8 + 2 * lane_in_group, folded_acc[j][2 * half], folded_acc[j][2 * half + 1],
                   partial_policy);
    }
    if (lane_in_group == 0) {
      store_float2(partials.stats + slot * 2, folded_max[half], folded_sum[half], partial_policy);
    }
  }
}

// One CTA per (block row, q head). Warp w folds the row's chunks w, w + 4, w + 8, ... in ascending order;
// the four warp states are then folded in warp order and normalised. The order is fixed by chunk indices
// alone, so it is the same for every row count. Under the split schedule a chunk's state is first folded
// here from its splits, as the chunk kernel folds them otherwise.
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kAttentionMergeWarps * 32) attention_merge_kernel(const AttentionParams p) {
  constexpr int kPerLane = kHeadDim / 32;
  allow_next_kernel_launch();  // the output projection may start streaming its weights
  wait_for_previous_kernels();
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int item = blockIdx.x;
  const int block_row = item / p.q_heads;
  const int cache_len = *p.cache_len;
  T* const out = static_cast<T*>(p.out) + size_t(item) * kHeadDim;
  if (cache_len < 0 || cache_len + p.rows > p.max_keys) {
    // The device-side length exceeds the capacity the launch was sized for (no host check is possible
    // without a sync): fail loudly with NaN rather than return attention over keys nobody computed.
    for (int i = threadIdx.x; i < kHeadDim; i += blockDim.x) out[i] = from_float<T>(NAN);
    return;
  }
  const bool split_mode = attention_split_mode(p, cache_len + p.rows);
  const AttentionPartials& partials = split_mode ? p.splits : p.chunks;
  const int last_key = attention_key_limit(p, cache_len, block_row) - 1;
  const int last_split = last_key / kAttentionSplitKeys;
  const int last_chunk = last_key / kAttentionChunkKeys;
  const float* const stats = partials.stats + size_t(item) * partials.slots * 2;
  const float* const acc = partials.acc + size_t(item) * partials.slots * kHeadDim + lane * kPerLane;

  auto load_acc = [&](int slot, float (&values)[kPerLane]) {
    if constexpr (kPerLane == 4) {
      const float4 v = *reinterpret_cast<const float4*>(acc + size_t(slot) * kHeadDim);
      values[0] = v.x, values[1] = v.y, values[2] = v.z, values[3] = v.w;
    } else {
      const float2 v = *reinterpret_cast<const float2*>(acc + size_t(slot) * kHeadDim);
      values[0] = v.x, values[1] = v.y;
    }
  };

  // This warp's chunks folded in ascending order, starting from the empty state.
  FoldedState<kPerLane> folded;
#pragma unroll 4
  for (int c = warp; c <= last_chunk; c += kAttentionMergeWarps) {
    if (split_mode) {
      // All loads first, so that they are in flight together; then the fold, in split order.
      const int first_split = c * kAttentionSplitsPerChunk;
      float2 split_stats[kAttentionSplitsPerChunk];
      float split_values[kAttentionSplitsPerChunk][kPerLane];
#pragma unroll
      for (int i = 0; i < kAttentionSplitsPerChunk; ++i) {
        if (first_split + i > last_split) break;
        split_stats[i] = *reinterpret_cast<const float2*>(stats + 2 * (first_split + i));
        load_acc(first_split + i, split_values[i]);
      }
      FoldedState<kPerLane> chunk;
#pragma unroll
      for (int i = 0; i < kAttentionSplitsPerChunk; ++i) {
        if (first_split + i > last_split) break;
        chunk.fold_in(split_stats[i].x, split_stats[i].y, split_values[i]);
      }
      folded.fold_in(chunk.max, chunk.sum, chunk.values);
    } else {
      const float2 chunk_stats = *reinterpret_cast<const float2*>(stats + 2 * c);
      float values[kPerLane];
      load_acc(c, values);
      folded.fold_in(chunk_stats.x, chunk_stats.y, values);
    }
  }

  // The warps' states folded in warp order (a warp without chunks holds the empty state).
  __shared__ float warp_values[kAttentionMergeWarps][kHeadDim];
  __shared__ float2 warp_stats[kAttentionMergeWarps];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) warp_values[warp][lane * kPerLane + i] = folded.values[i];
  if (lane == 0) warp_stats[warp] = make_float2(folded.max, folded.sum);
  __syncthreads();
  if (warp != 0) return;
#pragma unroll
  for (int w = 1; w < kAttentionMergeWarps; ++w) {
    float values[kPerLane];
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) values[i] = warp_values[w][lane * kPerLane + i];
    folded.fold_in(warp_stats[w].x, warp_stats[w].y, values);
  }
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) out[lane * kPerLane + i] = from_float<T>(folded.values[i] / folded.sum);
}

}  // namespace orthrus::cuda_detail
