// Acceptance on the device (contract in orthrus/kernels.h): the verify pass's outcome updates the cache
// length and the next anchor without a host round trip, so a whole iteration can be one graph. It also
// packs what the host reads ([count, tokens]) into one buffer, so that reading an iteration is one copy
// and the decode step needs no other small kernels after the verify pass.
#include "launch.cuh"
#include "orthrus/kernels.h"

namespace orthrus {
namespace {

// One warp: 32 draft positions are compared per ballot, the first mismatch ends the accepted prefix.
__global__ void accept_kernel(const int64_t* __restrict__ drafts, const int64_t* __restrict__ targets, int rows,
                              int32_t* cache_len, int64_t* __restrict__ emitted, int64_t* next_anchor) {
  cuda_detail::allow_next_kernel_launch();
  cuda_detail::wait_for_previous_kernels();
  const int lane = threadIdx.x;
  const int num_drafts = rows - 1;
  int accepted = num_drafts;
  for (int base = 0; base < num_drafts; base += 32) {
    const int index = base + lane;
    const bool mismatch = index < num_drafts && drafts[index] != targets[index];
    const unsigned mismatches = __ballot_sync(0xffffffffu, mismatch);
    if (mismatches != 0u) {
      accepted = base + __ffs(int(mismatches)) - 1;
      break;
    }
  }
  for (int index = lane; index < rows; index += 32) emitted[1 + index] = targets[index];
  if (lane == 0) {
    emitted[0] = accepted + 1;
    next_anchor[0] = targets[accepted];
    cache_len[0] += accepted + 1;
  }
}

}  // namespace

cudaError_t accept_cuda(const int64_t* drafts, const int64_t* targets, int64_t rows, int32_t* cache_len,
                        int64_t* emitted, int64_t* next_anchor, cudaStream_t stream) {
  if (rows < 1 || rows > kMaxBlockRows) return cudaErrorInvalidValue;
  if ((rows > 1 && !drafts) || !targets || !cache_len || !emitted || !next_anchor) return cudaErrorInvalidValue;
  return cuda_detail::launch_kernel(accept_kernel, dim3(1), dim3(32), 0, stream, drafts, targets, int(rows),
                                    cache_len, emitted, next_anchor);
}

}  // namespace orthrus
