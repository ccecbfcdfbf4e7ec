// Kernel launches with programmatic dependent launch (PDL).
//
// At batch 1 a decode step is a chain of short kernels, and without PDL each boundary costs the previous
// kernel's tail plus the next one's launch and ramp-up, time in which device memory sits idle. With PDL a
// kernel lets the next one launch as soon as all of its own CTAs are running; the next kernel may then
// do work that depends on nothing earlier kernels write (stream its weights towards L2 and registers) and
// blocks in wait_for_previous_kernels() until every earlier kernel of the stream has finished and its
// writes are visible. Because each kernel waits before touching anything mutable, ordering is the same as
// with plain launches; only reads of constant inputs (weights) may overlap earlier kernels.
#pragma once

#include <cuda_runtime.h>

#include <cstdlib>

namespace orthrus::cuda_detail {

__device__ __forceinline__ void allow_next_kernel_launch() {
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
}

__device__ __forceinline__ void wait_for_previous_kernels() { asm volatile("griddepcontrol.wait;\n" ::: "memory"); }

// ORTHRUS_PDL=0 in the environment launches every kernel plainly (griddepcontrol is then a no-op), so that
// profilers report each kernel's own duration instead of one that includes its wait for the previous one.
inline bool programmatic_launch_enabled() {
  static const bool enabled = [] {
    const char* setting = std::getenv("ORTHRUS_PDL");
    return setting == nullptr || setting[0] != '0';
  }();
  return enabled;
}

// Launches `kernel` early (PDL) in clusters of `cluster` CTAs (none when cluster is 0 x 0 x 0).
template <typename... Params, typename... Args>
cudaError_t launch_with_attributes(void (*kernel)(Params...), dim3 grid, dim3 cluster, dim3 block,
                                   size_t shared_bytes, cudaStream_t stream, Args... args) {
  cudaLaunchAttribute attributes[2];
  attributes[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attributes[0].val.programmaticStreamSerializationAllowed = programmatic_launch_enabled() ? 1 : 0;
  attributes[1].id = cudaLaunchAttributeClusterDimension;
  attributes[1].val.clusterDim.x = cluster.x;
  attributes[1].val.clusterDim.y = cluster.y;
  attributes[1].val.clusterDim.z = cluster.z;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = shared_bytes;
  config.stream = stream;
  config.attrs = attributes;
  config.numAttrs = cluster.x * cluster.y * cluster.z > 0 ? 2 : 1;
  return cudaLaunchKernelEx(&config, kernel, args...);
}

// Launches `kernel` with PDL, in clusters of `cluster` CTAs (a kernel that uses cluster APIs needs a
// cluster launch even for clusters of one CTA).
template <typename... Params, typename... Args>
cudaError_t launch_clustered_kernel(void (*kernel)(Params...), dim3 grid, dim3 cluster, dim3 block,
                                    size_t shared_bytes, cudaStream_t stream, Args... args) {
  return launch_with_attributes(kernel, grid, cluster, block, shared_bytes, stream, args...);
}

// Launches `kernel` with PDL.
template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream,
                          Args... args) {
  return launch_with_attributes(kernel, grid, dim3(0, 0, 0), block, shared_bytes, stream, args...);
}

}  // namespace orthrus::cuda_detail
