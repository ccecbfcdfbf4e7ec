// The 16-byte load every weight stream is made of (the linear kernel's, and benchmarks/phase_boundary.cu's
// model of it).
#pragma once

#include <cuda_runtime.h>

namespace orthrus::cuda_detail {

// Weights are read once per call: keep them out of L1 and ask L2 to fetch 256-byte runs.
__device__ __forceinline__ uint4 load_weight_vector(const void* pointer) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(pointer));
  return v;
}

}  // namespace orthrus::cuda_detail
