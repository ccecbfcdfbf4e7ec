// Asynchronous global -> shared copies (cp.async), shared by the attention and linear kernels.
#pragma once

#include <cstdint>

namespace orthrus::cuda_detail {

// Which cache levels a 16-byte copy goes through on its way to shared memory.
enum class CopyCache {
  kL1AndL2,  // .ca: for data other CTAs of the SM read again soon
  kL2Only,   // .cg: for data streamed once per CTA
};

// Copies 16 bytes to `destination` (a shared-memory address); when `valid` is false nothing is read and
// the 16 bytes are zero-filled (source size 0), so `source` only has to be some valid address.
template <CopyCache kCache>
__device__ __forceinline__ void copy_async_16(uint32_t destination, const void* source, bool valid) {
  if constexpr (kCache == CopyCache::kL1AndL2) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;\n" ::"r"(destination), "l"(source),
                 "r"(valid ? 16 : 0));
  } else {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(destination), "l"(source),
                 "r"(valid ? 16 : 0));
  }
}

// Copies 4 bytes to `destination` (a shared-memory address) through L1 and L2.
__device__ __forceinline__ void copy_async_4(uint32_t destination, const void* source) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(destination), "l"(source));
}

__device__ __forceinline__ void copy_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Waits until at most kPending of this thread's committed copy groups are still in flight.
template <int kPending>
__device__ __forceinline__ void copy_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

}  // namespace orthrus::cuda_detail
