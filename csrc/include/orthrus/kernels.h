// Orthrus kernels: the torch-free C++ API shared by the Python extension (orthrus_ext), the native
// library built by CMake, and C++ embedders.
//
// Every function takes raw pointers, sizes and (on CUDA) a stream. Matrices are row-major. A "row" is one
// token of a block. The decode-phase kernels are *row-invariant*: the bits of row m's result depend only
// on row m's inputs (and, for attention, the keys it may see), never on how many rows the call has.
// That is what makes a B-row verify pass reproduce B one-token AR steps bit for bit.
//
// Positions are device values (int32) so that a captured CUDA graph can replay with a new cache length;
// the CPU functions take the same pointers in host memory.
#pragma once

#include <cstddef>
#include <cstdint>

#ifdef ORTHRUS_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace orthrus {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Largest block a decode-phase kernel accepts (verify and diffusion blocks, AR steps).
constexpr int kMaxBlockRows = 64;

// ---------------------------------------------------------------------------------------------------------
// linear: y[m, n] = sum_k x[m, k] * w[n, k], fp32 accumulation, output in `dtype`.
//   x: [rows, in_features] with row stride x_row_stride (elements); w: [out_features, in_features]
//   contiguous; y: [rows, out_features] contiguous. Row-invariant.
// rms_norm: y[m] = x[m] / sqrt(mean(x[m]^2) + eps) * weight, fp32 math. x row stride x_row_stride,
//   y contiguous. Row-invariant.
// add_rms_norm: the residual-stream update and the following norm in one pass: x[m] += delta[m] in place
//   (fp32 add, rounded to dtype), then y[m] = rms_norm(x[m]). x, delta, y: [rows, dim] contiguous.
// embedding_rms_norm: the start of a forward pass: x[m] = table[tokens[m]] (the residual stream), then
//   y[m] = rms_norm(x[m]). tokens: [rows] int64; table: [vocab, dim]; x, y: [rows, dim], all contiguous.
//   A token outside [0, vocab) makes its rows of x and y NaN (on CUDA it is only known on the device).
// qk_norm_rope_store: per-head RMSNorm of q and k (weights q_norm_weight / k_norm_weight, [head_dim]),
//   then rotary embedding (rotate-half form, as Qwen3) at position positions_start[0] + m, using
//   rope_cos_sin: float32 [max_positions, head_dim] whose first head_dim/2 columns are cos and last
//   head_dim/2 are sin of position * inv_freq. Writes q_out [rows, q_heads, head_dim] (contiguous) and
//   stores the normed, rotated k and the untouched v at rows dst_start[0] + m of k_dst / v_dst
//   ([dst_rows, kv_heads, head_dim] contiguous). q, k, v: [rows, heads, head_dim] with row strides
//   (elements) q_row_stride, k_row_stride, v_row_stride and contiguous heads (they are usually views into
//   one fused qkv projection).
// attention: out[m, h] = softmax(scale * q[m, h] . K^T) V over the keys row m may see, for the KV head
//   h / (q_heads / kv_heads):
//   - cache rows [0, cache_len[0]) of k_cache / v_cache ([cache_rows, kv_heads, head_dim] contiguous),
//     then the block's own keys in order: block row i is position cache_len[0] + i.
//   - causal: the block's keys are already stored in the cache at rows [cache_len[0], cache_len[0]+rows)
//     (k_block / v_block are ignored and may be null) and row m sees block rows 0..m.
//   - bidirectional (causal == false): the block's keys are k_block / v_block ([rows, kv_heads,
//     head_dim] contiguous, not in the cache) and every row sees all block rows.
//   q: [rows, q_heads, head_dim] contiguous; out: same shape. head_dim 64 or 128 on CUDA, any on the
//   CPU. The key order and any split of the keys into chunks depend only on absolute positions, so the
//   result is row-invariant.
// accept: drafts [rows - 1] and targets [rows] (int64). accepted = length of the longest prefix with
//   drafts[i] == targets[i]. Writes emitted ([rows + 1] int64) = [accepted + 1, targets[0], ...,
//   targets[rows - 1]] (the count of emitted tokens, then the tokens: its first 1 + count entries are what
//   the iteration emits), next_anchor[0] = targets[accepted], and advances cache_len[0] by accepted + 1
//   (the rollback of the rejected tail: O(1), nothing is copied). next_anchor may be the tensor the next
//   iteration reads its anchor from; emitted must not overlap drafts or targets.
// ---------------------------------------------------------------------------------------------------------

void linear_cpu(DType dtype, const void* x, int64_t x_row_stride, const void* w, void* y, int64_t rows,
                int64_t out_features, int64_t in_features);

// linear_argmax: out[m] = argmax_n linear(x, w)[m, n] (int64 [rows]) over the logits as linear stores them
//   (rounded to `dtype`), as torch.argmax picks it: the smallest n among equal maxima, -0.0 equal to +0.0,
//   the first NaN above everything. out_features >= 1. Greedy decoding's token without the logits: on
//   CUDA they are never written. Row-invariant.
void linear_argmax_cpu(DType dtype, const void* x, int64_t x_row_stride, const void* w, int64_t* out,
                       int64_t rows, int64_t out_features, int64_t in_features);

void rms_norm_cpu(DType dtype, const void* x, int64_t x_row_stride, const void* weight, void* y,
                  int64_t rows, int64_t dim, float eps);

void add_rms_norm_cpu(DType dtype, void* x, const void* delta, const void* weight, void* y, int64_t rows,
                      int64_t dim, float eps);

void embedding_rms_norm_cpu(DType dtype, const int64_t* tokens, const void* table, int64_t vocab,
                            const void* weight, void* x, void* y, int64_t rows, int64_t dim, float eps);

void qk_norm_rope_store_cpu(DType dtype, const void* q, int64_t q_row_stride, const void* k,
                            int64_t k_row_stride, const void* v, int64_t v_row_stride,
                            const void* q_norm_weight, const void* k_norm_weight, const float* rope_cos_sin,
                            const int32_t* positions_start, void* q_out, void* k_dst, void* v_dst,
                            const int32_t* dst_start, int64_t rows, int64_t q_heads, int64_t kv_heads,
                            int64_t head_dim, float eps);

void attention_cpu(DType dtype, const void* q, const void* k_cache, const void* v_cache,
                   const int32_t* cache_len, const void* k_block, const void* v_block, void* out,
                   int64_t rows, int64_t q_heads, int64_t kv_heads, int64_t head_dim, bool causal,
                   float scale);

// silu_mul: y[m, i] = silu(gate_up[m, i]) * gate_up[m, features + i] (SwiGLU; gate rows first), fp32 math,
//   gate_up row stride gate_up_row_stride (elements), y [rows, features] contiguous. Every element is
//   computed alone (torch's CPU elementwise kernels switch between vector and scalar code at size-dependent
//   offsets, which can change an element's rounding with the row count).
void silu_mul_cpu(DType dtype, const void* gate_up, int64_t gate_up_row_stride, void* y, int64_t rows,
                  int64_t features);

// The fused forms of the decode step, bit for bit what the separate calls give:
// linear_silu_mul: silu_mul(linear(x, w)) for w = [gate | up] ([2 * features, in_features]); y [rows, features].
// linear_qk_norm_rope_store: qk_norm_rope_store of the q | k | v heads of linear(x, w) for the fused
//   projection w ([(q_heads + 2 * kv_heads) * head_dim, in_features]); writes q_out, k_dst and v_dst only
//   (the projection itself is never stored). On CUDA, head_dim 64 or 128.
//
// The deferred RMSNorm: the residual update and the norm after it, folded into the linears on either side
// so that no kernel of its own sits between them. RMSNorm(r) = (r * norm_weight) / sqrt(mean(r^2) + eps):
// the producer stores r * norm_weight and the row's sums of squares, the consumer applies the per-row
// scale to its fp32 sums.
// linear_add_deferred_norm: residual[m] += linear(x, w)[m] (the linear rounded to dtype, the add in fp32
//   rounded to dtype, as add_rms_norm), then weighted[m, n] = residual[m, n] * norm_weight[n] (fp32,
//   rounded) and square_sums[m, t] = the sum of residual[m, n]^2 over the t-th run of kSquareSumColumns
//   columns (float32 [rows, square_sum_columns(out_features)], a fixed order). residual, weighted:
//   [rows, out_features] contiguous. Row-invariant.
// The consumers, linear_silu_mul and linear_qk_norm_rope_store, take square_sums = null (x is the
//   normalised input) or the producer's sums with x = its `weighted`: then the fp32 sums of row m are
//   multiplied by rsqrt(sum_t square_sums[m, t] / in_features + norm_eps) before anything is rounded.
constexpr int kSquareSumColumns = 64;
constexpr int64_t square_sum_columns(int64_t features) {
  return (features + kSquareSumColumns - 1) / kSquareSumColumns;
}

void linear_silu_mul_cpu(DType dtype, const void* x, int64_t x_row_stride, const void* w, void* y, int64_t rows,
                         int64_t features, int64_t in_features, const float* square_sums, float norm_eps);

void linear_qk_norm_rope_store_cpu(DType dtype, const void* x, int64_t x_row_stride, const void* w, int64_t rows,
                                   int64_t in_features, const void* q_norm_weight, const void* k_norm_weight,
                                   const float* rope_cos_sin, const int32_t* positions_start, void* q_out,
                                   void* k_dst, void* v_dst, const int32_t* dst_start, int64_t q_heads,
                                   int64_t kv_heads, int64_t head_dim, float eps, const float* square_sums,
                                   float norm_eps);

void linear_add_deferred_norm_cpu(DType dtype, const void* x, int64_t x_row_stride, const void* w, void* residual,
                                  const void* norm_weight, void* weighted, float* square_sums, int64_t rows,
                                  int64_t out_features, int64_t in_features);

void accept_cpu(const int64_t* drafts, const int64_t* targets, int64_t rows, int32_t* cache_len,
                int64_t* emitted, int64_t* next_anchor);

// CPU threading. The CPU kernels cut their work into independent index ranges (groups of output features,
// (row, head) pairs) whose results do not depend on how the ranges are grouped or scheduled. By default
// they run on a built-in pool of std::threads (ORTHRUS_NUM_THREADS threads, else the hardware
// concurrency). An embedder with its own pool installs it here so that two pools never compete for the
// cores; the torch extension installs at::parallel_for. `parallel_for` must call body(context, begin, end)
// on disjoint ranges covering [0, count) (`grain` is the smallest range worth a thread, a hint) and
// return once all have finished. nullptr restores the built-in pool. Not to be called while a kernel runs.
using CpuParallelBody = void (*)(void* context, int64_t begin, int64_t end);
using CpuParallelFor = void (*)(int64_t count, int64_t grain, void* context, CpuParallelBody body);
void set_cpu_parallel_for(CpuParallelFor parallel_for);

#ifdef ORTHRUS_WITH_CUDA
// Same contracts on the device; all pointers are device pointers. Kernels are launched with programmatic
// dependent launch: linear may start reading w before the previous kernel of the stream has finished, so
// nothing in flight may write it; every other input is read only after all earlier work of the stream is
// complete, as with plain launches. `workspace` (linear only) is scratch of
// at least linear_cuda_workspace_bytes(...) bytes for split reductions.
size_t linear_cuda_workspace_bytes(int64_t rows, int64_t out_features, int64_t in_features);

cudaError_t linear_cuda(DType dtype, const void* x, int64_t x_row_stride, const void* w, void* y,
                        int64_t rows, int64_t out_features, int64_t in_features, void* workspace,
                        size_t workspace_bytes, cudaStream_t stream);

cudaError_t rms_norm_cuda(DType dtype, const void* x, int64_t x_row_stride, const void* weight, void* y,
                          int64_t rows, int64_t dim, float eps, cudaStream_t stream);

cudaError_t add_rms_norm_cuda(DType dtype, void* x, const void* delta, const void* weight, void* y, int64_t rows,
                              int64_t dim, float eps, cudaStream_t stream);

cudaError_t embedding_rms_norm_cuda(DType dtype, const int64_t* tokens, const void* table, int64_t vocab,
                                    const void* weight, void* x, void* y, int64_t rows, int64_t dim, float eps,
                                    cudaStream_t stream);

cudaError_t silu_mul_cuda(DType dtype, const void* gate_up, int64_t gate_up_row_stride, void* y, int64_t rows,
                          int64_t features, cudaStream_t stream);

cudaError_t qk_norm_rope_store_cuda(DType dtype, const void* q, int64_t q_row_stride, const void* k,
                                    int64_t k_row_stride, const void* v, int64_t v_row_stride,
                                    const void* q_norm_weight, const void* k_norm_weight,
                                    const float* rope_cos_sin, const int32_t* positions_start, void* q_out,
                                    void* k_dst, void* v_dst, const int32_t* dst_start, int64_t rows,
                                    int64_t q_heads, int64_t kv_heads, int64_t head_dim, float eps,
                                    cudaStream_t stream);

cudaError_t linear_silu_mul_cuda(DType dtype, const void* x, int64_t x_row_stride, const void* w, void* y,
                                 int64_t rows, int64_t features, int64_t in_features, const float* square_sums,
                                 float norm_eps, cudaStream_t stream);

cudaError_t linear_add_deferred_norm_cuda(DType dtype, const void* x, int64_t x_row_stride, const void* w,
                                          void* residual, const void* norm_weight, void* weighted,
                                          float* square_sums, int64_t rows, int64_t out_features,
                                          int64_t in_features, cudaStream_t stream);

// `workspace` (8-byte aligned) holds one key per row and 64 outputs: linear_argmax_cuda_workspace_bytes(...)
// bytes. The logits are linear_cuda's, bit for bit, and like linear it may read w early.
size_t linear_argmax_cuda_workspace_bytes(int64_t rows, int64_t out_features);

cudaError_t linear_argmax_cuda(DType dtype, const void* x, int64_t x_row_stride, const void* w, int64_t* out,
                               int64_t rows, int64_t out_features, int64_t in_features, void* workspace,
                               size_t workspace_bytes, cudaStream_t stream);

cudaError_t linear_qk_norm_rope_store_cuda(DType dtype, const void* x, int64_t x_row_stride, const void* w,
                                           int64_t rows, int64_t in_features, const void* q_norm_weight,
                                           const void* k_norm_weight, const float* rope_cos_sin,
                                           const int32_t* positions_start, void* q_out, void* k_dst, void* v_dst,
                                           const int32_t* dst_start, int64_t q_heads, int64_t kv_heads,
                                           int64_t head_dim, float eps, const float* square_sums,
                                           float norm_eps, cudaStream_t stream);

// `max_keys` bounds cache_len[0] + rows (the cache capacity); it sizes the grid without a host read.
// `workspace` holds the partial results of key chunks and splits: attention_cuda_workspace_bytes(...) bytes.
size_t attention_cuda_workspace_bytes(int64_t rows, int64_t q_heads, int64_t kv_heads, int64_t head_dim,
                                      int64_t max_keys);

cudaError_t attention_cuda(DType dtype, const void* q, const void* k_cache, const void* v_cache,
                           const int32_t* cache_len, const void* k_block, const void* v_block, void* out,
                           int64_t rows, int64_t q_heads, int64_t kv_heads, int64_t head_dim, bool causal,
                           float scale, int64_t max_keys, void* workspace, size_t workspace_bytes,
                           cudaStream_t stream);

cudaError_t accept_cuda(const int64_t* drafts, const int64_t* targets, int64_t rows, int32_t* cache_len,
                        int64_t* emitted, int64_t* next_anchor, cudaStream_t stream);
#endif

}  // namespace orthrus
