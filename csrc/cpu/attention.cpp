// CPU attention for decode blocks: each (row, query head) pair is one task; it scores the keys it may
// see in absolute-position order (cache rows, then block rows), takes a max-subtracted softmax and sums the
// values in that same order. A row's task never looks at other rows, and a key is handled the same way
// whether it sits in the cache or in k_block / v_block, so a row's bits equal those of a one-row call
// that sees the same keys (causal row m == a one-row call at cache_len + m).

#include <algorithm>

#include "cpu_common.h"

namespace orthrus {
namespace cpu {
namespace {

struct AttentionProblem {
  const void* q;
  const void* k_cache;
  const void* v_cache;
  int64_t cache_len;
  const void* k_block;
  const void* v_block;
  void* out;
  int64_t rows;
  int64_t q_heads;
  int64_t kv_heads;
  int64_t head_dim;
  bool causal;
  float scale;
};

typedef uint16_t UInt16x8 __attribute__((vector_size(16)));
typedef uint32_t UInt32x8 __attribute__((vector_size(32)));

template <DType kDType>
inline Float8 load8_widened(const typename Storage<kDType>::type* source) {
  if constexpr (kDType == DType::kFloat32) {
    return load8(source);
  } else if constexpr (kDType == DType::kBFloat16) {
    UInt16x8 narrow;
    std::memcpy(&narrow, source, sizeof(narrow));
    return Float8(__builtin_convertvector(narrow, UInt32x8) << 16);
  } else {
    Float8 wide;
    for (int i = 0; i < 8; ++i) wide[i] = float16_to_float(source[i]);
    return wide;
  }
}

template <class Math, DType kDType>
inline float dot(const float* query, const typename Storage<kDType>::type* key, int64_t head_dim) {
  Float8 lanes = broadcast8(0.0f);
  const int64_t vector_end = head_dim & ~int64_t(7);
  for (int64_t d = 0; d < vector_end; d += 8)
    lanes = Math::multiply_add(load8(query + d), load8_widened<kDType>(key + d), lanes);
  float sum = reduce8(lanes);
  for (int64_t d = vector_end; d < head_dim; ++d) sum = query[d] * Storage<kDType>::load(key[d]) + sum;
  return sum;
}

template <class Math, DType kDType>
inline void attend(const AttentionProblem& problem, int64_t first_task, int64_t end_task) {
  using Element = typename Storage<kDType>::type;
  const int64_t head_dim = problem.head_dim;
  const int64_t padded_dim = (head_dim + 7) & ~int64_t(7);
  const int64_t kv_width = problem.kv_heads * head_dim;
  const int64_t heads_per_kv_head = problem.q_heads / problem.kv_heads;
  const int64_t most_keys = problem.cache_len + problem.rows;
  const int64_t vector_end = head_dim & ~int64_t(7);
  float* query = thread_scratch(2 * padded_dim + most_keys, 0);
  float* accumulator = query + padded_dim;
  float* weights = accumulator + padded_dim;

  for (int64_t task = first_task; task < end_task; ++task) {
    const int64_t m = task / problem.q_heads;
    const int64_t h = task % problem.q_heads;
    const int64_t head_offset = (h / heads_per_kv_head) * head_dim;
    const int64_t keys = problem.causal ? problem.cache_len + m + 1 : most_keys;
    // Key / value row of absolute position j.
    auto row_of = [&](const void* cache, const void* block, int64_t j) {
      const auto* base = static_cast<const Element*>(problem.causal || j < problem.cache_len ? cache : block);
      const int64_t row = problem.causal || j < problem.cache_len ? j : j - problem.cache_len;
      return base + row * kv_width + head_offset;
    };

    load_row<kDType>(static_cast<const Element*>(problem.q) + task * head_dim, head_dim, query);
    float max_score = -INFINITY;
    for (int64_t j = 0; j < keys; ++j) {
      weights[j] = dot<Math, kDType>(query, row_of(problem.k_cache, problem.k_block, j), head_dim) * problem.scale;
      max_score = std::max(max_score, weights[j]);
    }
    float total = 0.0f;
    for (int64_t j = 0; j < keys; ++j) {
      weights[j] = std::exp(weights[j] - max_score);
      total += weights[j];
    }
    std::fill(accumulator, accumulator + head_dim, 0.0f);
    for (int64_t j = 0; j < keys; ++j) {
      const Element* value = row_of(problem.v_cache, problem.v_block, j);
      const Float8 weight = broadcast8(weights[j]);
      for (int64_t d = 0; d < vector_end; d += 8)
        store8(accumulator + d, Math::multiply_add(weight, load8_widened<kDType>(value + d), load8(accumulator + d)));
      for (int64_t d = vector_end; d < head_dim; ++d)
        accumulator[d] = weights[j] * Storage<kDType>::load(value[d]) + accumulator[d];
    }
    for (int64_t d = 0; d < head_dim; ++d) accumulator[d] = accumulator[d] / total;
    store_row<kDType>(accumulator, head_dim, static_cast<Element*>(problem.out) + task * head_dim);
  }
}

template <DType kDType>
void attend_plain(const AttentionProblem& problem, int64_t first_task, int64_t end_task) {
  attend<PlainMath, kDType>(problem, first_task, end_task);
}

#if ORTHRUS_CPU_X86_DISPATCH
template <DType kDType>
__attribute__((target("avx2,fma"), flatten)) void attend_fused(const AttentionProblem& problem,
                                                               int64_t first_task, int64_t end_task) {
  attend<FusedMath, kDType>(problem, first_task, end_task);
}
#endif

}  // namespace
}  // namespace cpu

void attention_cpu(DType dtype, const void* q, const void* k_cache, const void* v_cache,
                   const int32_t* cache_len, const void* k_block, const void* v_block, void* out,
                   int64_t rows, int64_t q_heads, int64_t kv_heads, int64_t head_dim, bool causal,
                   float scale) {
  if (rows <= 0 || q_heads <= 0 || head_dim <= 0) return;
  const cpu::AttentionProblem problem{q,    k_cache, v_cache,  cache_len[0], k_block, v_block, out,
                                      rows, q_heads, kv_heads, head_dim,     causal,  scale};
  cpu::dispatch_dtype(dtype, [&](auto tag) {
    constexpr DType kDType = decltype(tag)::value;
    auto range = &cpu::attend_plain<kDType>;
#if ORTHRUS_CPU_X86_DISPATCH
    if (cpu::use_fused_math()) range = &cpu::attend_fused<kDType>;
#endif
    const int64_t work_per_task = (problem.cache_len + rows) * head_dim;
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / work_per_task);
    cpu::parallel_for(rows * q_heads, grain, [&](int64_t begin, int64_t end) { range(problem, begin, end); });
  });
}

}  // namespace orthrus
