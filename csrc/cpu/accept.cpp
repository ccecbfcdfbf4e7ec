// CPU acceptance of a verified block: longest matching draft prefix, next anchor, O(1) cache rollback, and
// the emitted tokens packed for the reader.

#include "orthrus/kernels.h"

namespace orthrus {

void accept_cpu(const int64_t* drafts, const int64_t* targets, int64_t rows, int32_t* cache_len,
                int64_t* emitted, int64_t* next_anchor) {
  int64_t accepted = 0;
  while (accepted < rows - 1 && drafts[accepted] == targets[accepted]) ++accepted;
  emitted[0] = accepted + 1;
  for (int64_t i = 0; i < rows; ++i) emitted[1 + i] = targets[i];
  next_anchor[0] = targets[accepted];
  cache_len[0] += int32_t(accepted + 1);
}

}  // namespace orthrus
