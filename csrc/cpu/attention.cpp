// CPU attention driver: splits (row block, KV head) tasks over the threads and runs the kernel body
// (attention_kernel.h) of the process's instruction set.

#include <algorithm>

#include "cpu_common.h"

namespace orthrus {

void attention_cpu(DType dtype, const void* q, const void* k_cache, const void* v_cache,
                   const int32_t* cache_len, const void* k_block, const void* v_block, void* out,
                   int64_t rows, int64_t q_heads, int64_t kv_heads, int64_t head_dim, bool causal,
                   float scale) {
  if (rows <= 0 || q_heads <= 0 || head_dim <= 0) return;
  const cpu::AttentionProblem problem{dtype, q,       k_cache,  v_cache,  cache_len[0], k_block, v_block,
                                      out,   rows,    q_heads,  kv_heads, head_dim,     causal,  scale};
  auto range = &cpu::portable::attention_range;
#if ORTHRUS_CPU_X86_DISPATCH
  if (cpu::use_fused_math()) range = &cpu::fused::attention_range;
#endif
  const int64_t row_blocks = (rows + cpu::kAttentionRowsPerTask - 1) / cpu::kAttentionRowsPerTask;
  const int64_t work_per_task = (problem.cache_len + rows) * head_dim * (q_heads / kv_heads) *
                                std::min(rows, cpu::kAttentionRowsPerTask);
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / work_per_task);
  cpu::parallel_for(row_blocks * kv_heads, grain, [&](int64_t begin, int64_t end) { range(problem, begin, end); });
}

}  // namespace orthrus
