// Body of the CPU attention kernel. No include guard: built once per instruction set inside its
// namespace, after simd.h (see simd.h). The driver is in attention.cpp.
//
// Each (row, query head) scores the keys it may see in absolute-position order (cache rows, then block
// rows), takes a max-subtracted softmax and sums the values in that same order. A key is handled the same
// way whether it sits in the cache or in k_block / v_block, so a row's bits equal those of a one-row call
// that sees the same keys (causal row m == a one-row call at cache_len + m). One task covers a few rows
// and the query heads of one KV head, which share the key and value loads; sharing changes which
// multiply-adds run side by side, never the sequence that makes one result.

// Helpers have internal linkage: calls between them are direct, and each build keeps its own copies.
namespace {

// Dot products of two queries with four keys, side by side (eight independent accumulators keep both
// FMA pipes busy); each is the same operation sequence (8 lanes over d, reduce8, tail in order) whichever
// slot it takes. Kept out of line: inlined into attend, GCC spills its vectors and pointers.
template <DType kDType>
__attribute__((noinline)) void dot_2x4(const float* const* queries, const typename Storage<kDType>::type* const* keys,
                    int64_t head_dim, float dots[2][4]) {
  Float8 lanes[2][4];
  for (int q = 0; q < 2; ++q)
    for (int i = 0; i < 4; ++i) lanes[q][i] = broadcast8(0.0f);
  const int64_t vector_end = head_dim & ~int64_t(7);
  for (int64_t d = 0; d < vector_end; d += 8) {
    for (int q = 0; q < 2; ++q) {
      const Float8 query = load8(queries[q] + d);
      for (int i = 0; i < 4; ++i) lanes[q][i] = multiply_add(query, load8_widened<kDType>(keys[i] + d), lanes[q][i]);
    }
  }
  for (int q = 0; q < 2; ++q)
    for (int i = 0; i < 4; ++i) {
      float sum = reduce8(lanes[q][i]);
      for (int64_t d = vector_end; d < head_dim; ++d) sum = queries[q][d] * Storage<kDType>::load(keys[i][d]) + sum;
      dots[q][i] = sum;
    }
}

// exp(x) lane by lane for the max-subtracted scores (x <= 0): x = k ln2 + r with |r| <= ln2 / 2, then
// 2^k times a degree-7 Taylor polynomial of r (error below one float ulp). Inputs below -87 are clamped,
// which keeps 2^k normal; such weights are < 2^-125 of the largest one. Unlike std::exp it vectorizes,
// and it is one fixed operation sequence per lane, so a key's weight never depends on its lane.
inline Float8 exp8(const Float8& input) {
  const Float8 lowest = broadcast8(-87.0f);
  const Float8 x = input < lowest ? lowest : input;
  const Float8 round_shift = broadcast8(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const Float8 k = (x * broadcast8(1.44269504088896341f) + round_shift) - round_shift;
  const Float8 r = (x - k * broadcast8(0.693359375f)) - k * broadcast8(-2.12194440e-4f);
  Float8 p = broadcast8(1.0f / 5040);
  p = multiply_add(p, r, broadcast8(1.0f / 720));
  p = multiply_add(p, r, broadcast8(1.0f / 120));
  p = multiply_add(p, r, broadcast8(1.0f / 24));
  p = multiply_add(p, r, broadcast8(1.0f / 6));
  p = multiply_add(p, r, broadcast8(0.5f));
  p = multiply_add(p, r, broadcast8(1.0f));
  p = multiply_add(p, r, broadcast8(1.0f));
  const Int32x8 exponent = (__builtin_convertvector(k, Int32x8) + 127) << 23;
  return p * Float8(exponent);
}

// For kQueries consecutive queries q, adds sum over keys j in [first_key, end_key), in order, of
// weights_q[j] * value_j[column + 0 .. 8 kChunks) to accumulator_q[column ..]. Each value chunk is loaded
// once for all the queries; each query's sums are the same sequence of multiply-adds as on its own.
template <DType kDType, int kQueries, int kChunks>
inline void accumulate_values(const float* weights, int64_t weights_stride,
                              const typename Storage<kDType>::type* const* values, int64_t first_key,
                              int64_t end_key, int64_t column, float* accumulators, int64_t accumulator_stride) {
  Float8 sums[kQueries][kChunks];
  for (int q = 0; q < kQueries; ++q)
    for (int c = 0; c < kChunks; ++c) sums[q][c] = load8(accumulators + q * accumulator_stride + column + 8 * c);
  for (int64_t j = first_key; j < end_key; ++j) {
    Float8 value[kChunks];
    for (int c = 0; c < kChunks; ++c) value[c] = load8_widened<kDType>(values[j] + column + 8 * c);
    for (int q = 0; q < kQueries; ++q) {
      const Float8 weight = broadcast8(weights[q * weights_stride + j]);
      for (int c = 0; c < kChunks; ++c) sums[q][c] = multiply_add(weight, value[c], sums[q][c]);
    }
  }
  for (int q = 0; q < kQueries; ++q)
    for (int c = 0; c < kChunks; ++c) store8(accumulators + q * accumulator_stride + column + 8 * c, sums[q][c]);
}

// Queries of a task, in row-major order (row, head of the KV group), with their scratch rows.
struct QueryBlock {
  int64_t count;
  const int64_t* keys;  // keys each query sees
  float* scores;        // [count][scores_stride]
  int64_t scores_stride;
  float* accumulators;  // [count][accumulator_stride]
  int64_t accumulator_stride;
};

// Weighted value sums of all queries over columns [column, column + 8 kChunks) and keys
// [key_begin, key_end): four queries at a time over the keys they all see, then each alone over the keys
// only it sees (later rows of a causal block). Every query still adds its keys in increasing order.
template <DType kDType, int kChunks>
inline void accumulate_columns(const QueryBlock& block, const typename Storage<kDType>::type* const* values,
                               int64_t column, int64_t key_begin, int64_t key_end) {
  constexpr int kQueriesAtOnce = 4;
  for (int64_t q0 = 0; q0 < block.count; q0 += kQueriesAtOnce) {
    const int64_t together = std::min<int64_t>(kQueriesAtOnce, block.count - q0);
    const int64_t common_end =
        std::max(key_begin, std::min(key_end, *std::min_element(block.keys + q0, block.keys + q0 + together)));
    const float* weights = block.scores + q0 * block.scores_stride;
    float* accumulators = block.accumulators + q0 * block.accumulator_stride;
    switch (together) {
      case 4:
        accumulate_values<kDType, 4, kChunks>(weights, block.scores_stride, values, key_begin, common_end,
                                              column, accumulators, block.accumulator_stride);
        break;
      case 3:
        accumulate_values<kDType, 3, kChunks>(weights, block.scores_stride, values, key_begin, common_end,
                                              column, accumulators, block.accumulator_stride);
        break;
      case 2:
        accumulate_values<kDType, 2, kChunks>(weights, block.scores_stride, values, key_begin, common_end,
                                              column, accumulators, block.accumulator_stride);
        break;
      default:
        accumulate_values<kDType, 1, kChunks>(weights, block.scores_stride, values, key_begin, common_end,
                                              column, accumulators, block.accumulator_stride);
        break;
    }
    for (int64_t q = q0; q < q0 + together; ++q)
      accumulate_values<kDType, 1, kChunks>(block.scores + q * block.scores_stride, block.scores_stride, values,
                                            common_end, std::min(key_end, block.keys[q]), column,
                                            block.accumulators + q * block.accumulator_stride,
                                            block.accumulator_stride);
  }
}

constexpr int64_t kKeysPerPass = 64;

// One task = up to kAttentionRowsPerTask rows and one KV head, i.e. every query head of those rows that reads
// that KV head.
template <DType kDType>
inline void attend(const AttentionProblem& problem, int64_t first_task, int64_t end_task) {
  using Element = typename Storage<kDType>::type;
  const int64_t head_dim = problem.head_dim;
  const int64_t padded_dim = (head_dim + 7) & ~int64_t(7);
  const int64_t kv_width = problem.kv_heads * head_dim;
  const int64_t group = problem.q_heads / problem.kv_heads;
  const int64_t most_keys = problem.cache_len + problem.rows;
  const int64_t padded_keys = (most_keys + 7) & ~int64_t(7);
  const int64_t vector_end = head_dim & ~int64_t(7);
  const int64_t most_queries = kAttentionRowsPerTask * group;
  float* queries = thread_scratch(most_queries * (2 * padded_dim + padded_keys), 0);
  float* scores = queries + most_queries * padded_dim;
  float* accumulators = scores + most_queries * padded_keys;
  const Element** key_rows = thread_array<const Element*>(2 * most_keys);
  const Element** value_rows = key_rows + most_keys;
  int64_t* query_keys = thread_array<int64_t>(most_queries);
  float* totals_of_query = thread_array<float>(most_queries);

  for (int64_t task = first_task; task < end_task; ++task) {
    const int64_t first_row = (task / problem.kv_heads) * kAttentionRowsPerTask;
    const int64_t kv_head = task % problem.kv_heads;
    const int64_t block_rows = std::min(kAttentionRowsPerTask, problem.rows - first_row);
    const int64_t block_queries = block_rows * group;
    auto keys_of_row = [&](int64_t m) { return problem.causal ? problem.cache_len + m + 1 : most_keys; };
    const int64_t block_keys = keys_of_row(first_row + block_rows - 1);
    for (int64_t j = 0; j < block_keys; ++j) {
      const bool cached = problem.causal || j < problem.cache_len;
      const int64_t offset = (cached ? j : j - problem.cache_len) * kv_width + kv_head * head_dim;
      key_rows[j] = static_cast<const Element*>(cached ? problem.k_cache : problem.k_block) + offset;
      value_rows[j] = static_cast<const Element*>(cached ? problem.v_cache : problem.v_block) + offset;
    }
    for (int64_t r = 0; r < block_rows; ++r) {
      const Element* row_queries =
          static_cast<const Element*>(problem.q) + ((first_row + r) * problem.q_heads + kv_head * group) * head_dim;
      for (int64_t g = 0; g < group; ++g) {
        load_row<kDType>(row_queries + g * head_dim, head_dim, queries + (r * group + g) * padded_dim);
        query_keys[r * group + g] = keys_of_row(first_row + r);
      }
    }

    // Scores, two queries by four keys at a time; a partial tile repeats its last query / key and drops
    // the extra results. Queries are in row order, so a pair's first query sees no more keys than its second.
    for (int64_t j = 0; j < block_keys; j += 4) {
      const Element* four[4];
      for (int i = 0; i < 4; ++i) four[i] = key_rows[std::min(j + i, block_keys - 1)];
      for (int64_t q = 0; q < block_queries; q += 2) {
        const int64_t second = std::min(q + 1, block_queries - 1);
        if (query_keys[second] <= j) continue;
        const float* pair[2] = {queries + q * padded_dim, queries + second * padded_dim};
        float dots[2][4];
        dot_2x4<kDType>(pair, four, head_dim, dots);
        for (int64_t p = 0; p < 2 && q + p <= second; ++p)
          for (int64_t i = 0; i < 4 && j + i < query_keys[q + p]; ++i)
            scores[(q + p) * padded_keys + j + i] = dots[p][i] * problem.scale;
      }
    }

    for (int64_t q = 0; q < block_queries; ++q) {
      float* weights = scores + q * padded_keys;
      const int64_t keys = query_keys[q];
      const int64_t padded_end = (keys + 7) & ~int64_t(7);
      std::fill(weights + keys, weights + padded_end, -INFINITY);
      Float8 maxima = broadcast8(-INFINITY);
      for (int64_t j = 0; j < padded_end; j += 8) {
        const Float8 chunk = load8(weights + j);
        maxima = chunk > maxima ? chunk : maxima;
      }
      float max_score = maxima[0];
      for (int i = 1; i < 8; ++i) max_score = std::max(max_score, maxima[i]);
      // The weights' total: 8 lanes over j mod 8 (padding set to zero), then reduce8.
      Float8 totals = broadcast8(0.0f);
      for (int64_t j = 0; j < padded_end; j += 8) {
        Float8 chunk = exp8(load8(weights + j) - broadcast8(max_score));
        if (j + 8 > keys)
          for (int64_t i = keys - j; i < 8; ++i) chunk[i] = 0.0f;
        store8(weights + j, chunk);
        totals = totals + chunk;
      }
      totals_of_query[q] = reduce8(totals);
      std::fill(accumulators + q * padded_dim, accumulators + (q + 1) * padded_dim, 0.0f);
    }

    // Values in passes over kKeysPerPass keys, whose rows stay in cache while every column and query
    // reads them.
    const QueryBlock block{block_queries, query_keys, scores, padded_keys, accumulators, padded_dim};
    for (int64_t key_begin = 0; key_begin < block_keys; key_begin += kKeysPerPass) {
      const int64_t key_end = std::min(key_begin + kKeysPerPass, block_keys);
      int64_t column = 0;
      for (; column + 16 <= vector_end; column += 16)
        accumulate_columns<kDType, 2>(block, value_rows, column, key_begin, key_end);
      if (column < vector_end) accumulate_columns<kDType, 1>(block, value_rows, column, key_begin, key_end);
    }

    for (int64_t q = 0; q < block_queries; ++q) {
      const float* weights = scores + q * padded_keys;
      float* accumulator = accumulators + q * padded_dim;
      const int64_t keys = query_keys[q];
      for (int64_t d = vector_end; d < head_dim; ++d) {
        float sum = 0.0f;
        for (int64_t j = 0; j < keys; ++j) sum = weights[j] * Storage<kDType>::load(value_rows[j][d]) + sum;
        accumulator[d] = sum;
      }
      for (int64_t d = 0; d < head_dim; ++d) accumulator[d] = accumulator[d] / totals_of_query[q];
      const int64_t row = first_row + q / group, head = kv_head * group + q % group;
      Element* out = static_cast<Element*>(problem.out) + (row * problem.q_heads + head) * head_dim;
      store_row<kDType>(accumulator, head_dim, out);
    }
  }
}

}  // namespace

void attention_range(const AttentionProblem& problem, int64_t first_task, int64_t end_task) {
  dispatch_dtype(problem.dtype, [&](auto tag) { attend<decltype(tag)::value>(problem, first_task, end_task); });
}
