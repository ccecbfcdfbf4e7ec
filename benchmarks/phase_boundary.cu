// What the kernel boundaries of a decode pass cost, against one persistent kernel whose phases are separated
// by grid barriers. benchmarks/phase_boundary.py builds and runs it.
//
// A pass is modelled as a sequence of phases, each streaming its own constant bytes (weights, KV) from
// device memory and depending on the previous phase's output: per Qwen3 layer q|k|v, attention over the
// cache, the attention merge, the output projection, gate|up and down, then the lm_head. Six ways to run
// the same phases:
//  - chain: one kernel per phase, launched with PDL and replayed from a CUDA graph, as the decode step runs
//    today. Each kernel requests its first bytes, then waits in griddepcontrol.wait for the one before it.
//  - flags: the same chain, but each kernel waits for a counter the previous one's CTAs increment as they
//    finish, instead of griddepcontrol.wait (which waits for the previous grid to complete and flush).
//  - persistent: one kernel whose CTAs are all resident; a phase's CTAs signal a per-phase counter when
//    they are done, and each CTA requests its share of the next phase's bytes before it waits for that
//    counter.
//  - cooperative: the persistent kernel launched as a cooperative grid, cooperative_groups' grid.sync()
//    between phases instead of counters (the runtime owns the barrier's state), replayed from a CUDA graph
//    in clusters of kClusterCtas CTAs, as the split-K linear kernels need.
//  - layers: one persistent kernel per layer (its phases separated by counter barriers), the launches
//    chained with PDL as in the chain form, each letting the next one launch from its start; the counters
//    are zeroed by a memset at the start of each replay.
//  - stream: the persistent kernel with its barriers open, so that nothing waits: the bound of the others,
//    with the same order of accesses.
// Every CTA of every form may hold its SM share of memory requests in flight whatever the other
// kernels do: 100 KB of (unused) dynamic shared memory keeps two CTAs per SM, as the linear kernel's
// registers do.
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "weight_load.cuh"  // csrc/cuda: the linear kernel's weight load

namespace {

constexpr int kThreads = 256;
// 16-byte loads in flight per thread: 256 bytes, the linear kernel's two chunks of weights per lane.
constexpr int kRing = 16;
constexpr int kCtasPerSm = 2;
constexpr int kBlockingSmemBytes = 100 * 1024;
constexpr int kClusterCtas = 2;

struct Phase {
  const uint4* data;
  long long vectors;  // 16-byte words
};

#define CHECK(call)                                                                       \
  do {                                                                                    \
    const cudaError_t status_ = (call);                                                   \
    if (status_ != cudaSuccess) {                                                         \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call,                  \
                   cudaGetErrorString(status_));                                          \
      std::exit(1);                                                                       \
    }                                                                                     \
  } while (0)

// This CTA's contiguous share of a phase, its threads interleaved 16 bytes apart.
struct Share {
  const uint4* data;
  long long begin;
  long long end;

  __device__ Share(const Phase& phase)
      : data(phase.data),
        begin(phase.vectors * blockIdx.x / gridDim.x),
        end(phase.vectors * (blockIdx.x + 1) / gridDim.x) {}

  __device__ __forceinline__ uint4 load(long long step) const {
    const long long index = begin + threadIdx.x + step * kThreads;
    return index < end ? orthrus::cuda_detail::load_weight_vector(data + index) : make_uint4(0, 0, 0, 0);
  }

  // Requests the first kRing steps.
  __device__ __forceinline__ void start(uint4 (&ring)[kRing]) const {
#pragma unroll
    for (int i = 0; i < kRing; ++i) ring[i] = load(i);
  }

  // Consumes the share (its first kRing steps already requested into `ring`), each slot refilled kRing
  // steps later as soon as it is consumed.
  __device__ __forceinline__ uint32_t finish(uint4 (&ring)[kRing], uint32_t sum) const {
    for (long long step = 0; begin + threadIdx.x + step * kThreads < end; step += kRing) {
#pragma unroll
      for (int i = 0; i < kRing; ++i) {
        sum ^= ring[i].x ^ ring[i].y ^ ring[i].z ^ ring[i].w;
        ring[i] = load(step + i + kRing);
      }
    }
    return sum;
  }
};

__device__ uint32_t cta_xor(uint32_t value) {
  __shared__ uint32_t warp_values[kThreads / 32];
  for (int offset = 16; offset > 0; offset /= 2) value ^= __shfl_xor_sync(0xFFFFFFFFu, value, offset);
  if (threadIdx.x % 32 == 0) warp_values[threadIdx.x / 32] = value;
  __syncthreads();
  uint32_t total = 0;
  for (int w = 0; w < kThreads / 32; ++w) total ^= warp_values[w];
  __syncthreads();  // warp_values may be reused by the next phase
  return total;
}

// The first value of a phase's sum: the seed for the first phase, else one output of the previous phase,
// read from L2 (this SM's L1 may hold the same address from an earlier run).
__device__ __forceinline__ uint32_t phase_input(const uint32_t* previous, uint32_t seed) {
  return previous ? __ldcg(previous + (blockIdx.x + 1) % gridDim.x) : seed;
}

__device__ __forceinline__ unsigned load_acquire(const unsigned* address) {
  unsigned value;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(value) : "l"(address) : "memory");
  return value;
}

// Thread 0 waits until `*counter` reaches `target`; then the whole CTA may read what was released before.
__device__ __forceinline__ void wait_for_count(const unsigned* counter, unsigned target) {
  if (threadIdx.x == 0) {
    while (load_acquire(counter) < target) __nanosleep(32);
  }
  __syncthreads();
}

// Thread 0 publishes this CTA's writes (made before a barrier) and counts the CTA as done.
__device__ __forceinline__ void signal_done(unsigned* counter) {
  if (threadIdx.x == 0) {
    __threadfence();
    atomicAdd(counter, 1u);
  }
}

__global__ void __launch_bounds__(kThreads, kCtasPerSm)
    chain_phase_kernel(Phase phase, const uint32_t* previous, uint32_t* out, uint32_t seed) {
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
  const Share share(phase);
  uint4 ring[kRing];
  share.start(ring);
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
  const uint32_t sum = cta_xor(share.finish(ring, phase_input(previous, seed)));
  if (threadIdx.x == 0) out[blockIdx.x] = sum;
}

// Phase `index` of the flags form. done[i] counts phase i's finished CTAs. Phase i + 2 clears done[i]: its
// CTAs wait for all of phase i + 1, whose CTAs had all waited on done[i] before. Phase 0 clears the
// counter the last phase waited on in the previous run, which ended before this one began.
__global__ void __launch_bounds__(kThreads, kCtasPerSm)
    flag_phase_kernel(Phase phase, const uint32_t* previous, uint32_t* out, uint32_t seed, unsigned* done,
                      int index, int count) {
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
  const Share share(phase);
  uint4 ring[kRing];
  share.start(ring);
  if (index > 0) wait_for_count(done + index - 1, gridDim.x);
  if (threadIdx.x == 0) {
    if (index >= 2) done[index - 2] = 0;
    if (index == 0 && count >= 2) done[count - 2] = 0;
  }
  const uint32_t sum = cta_xor(share.finish(ring, phase_input(previous, seed)));
  if (threadIdx.x == 0) out[blockIdx.x] = sum;
  if (index + 1 < count) signal_done(done + index);
}

// arrived[i] counts the CTAs done with phase i over all launches so far; this launch's phase i is complete
// when it reaches `target` (launches so far times the grid), so the counters are never reset.
__global__ void __launch_bounds__(kThreads, kCtasPerSm)
    persistent_pass_kernel(const Phase* phases, int count, uint32_t* outs, unsigned* arrived, unsigned target,
                           uint32_t seed) {
  const int ctas = int(gridDim.x);
  uint4 ring[kRing];
  for (int i = 0; i < count; ++i) {
    const Share share(phases[i]);
    share.start(ring);
    if (i > 0) wait_for_count(arrived + i - 1, target);
    const uint32_t sum =
        cta_xor(share.finish(ring, phase_input(i > 0 ? outs + size_t(i - 1) * ctas : nullptr, seed)));
    if (threadIdx.x == 0) outs[size_t(i) * ctas + blockIdx.x] = sum;
    signal_done(arrived + i);
  }
}

__global__ void __launch_bounds__(kThreads, kCtasPerSm)
    cooperative_pass_kernel(const Phase* phases, int count, uint32_t* outs, uint32_t seed) {
  const cooperative_groups::grid_group grid = cooperative_groups::this_grid();
  const int ctas = int(gridDim.x);
  uint4 ring[kRing];
  for (int i = 0; i < count; ++i) {
    const Share share(phases[i]);
    share.start(ring);
    if (i > 0) grid.sync();
    const uint32_t sum =
        cta_xor(share.finish(ring, phase_input(i > 0 ? outs + size_t(i - 1) * ctas : nullptr, seed)));
    if (threadIdx.x == 0) outs[size_t(i) * ctas + blockIdx.x] = sum;
  }
}

// Phases [first, first + count) of the pass: the first waits for the previous launch, the others at
// counter barriers (arrived[i] counts phase i's finished CTAs; zero at the start of the pass).
__global__ void __launch_bounds__(kThreads, kCtasPerSm)
    layer_pass_kernel(const Phase* phases, int first, int count, uint32_t* outs, unsigned* arrived, uint32_t seed) {
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
  const int ctas = int(gridDim.x);
  uint4 ring[kRing];
  for (int i = first; i < first + count; ++i) {
    const Share share(phases[i]);
    share.start(ring);
    if (i == first) {
      asm volatile("griddepcontrol.wait;\n" ::: "memory");
    } else {
      wait_for_count(arrived + i - 1, unsigned(ctas));
    }
    const uint32_t sum =
        cta_xor(share.finish(ring, phase_input(i > 0 ? outs + size_t(i - 1) * ctas : nullptr, seed)));
    if (threadIdx.x == 0) outs[size_t(i) * ctas + blockIdx.x] = sum;
    signal_done(arrived + i);
  }
}

// Launches `kernel` with PDL, in the shape every phase kernel has.
template <typename... Params, typename... Args>
cudaError_t launch_phase(void (*kernel)(Params...), int ctas, cudaStream_t stream, Args... args) {
  cudaLaunchAttribute attribute;
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(unsigned(ctas));
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = kBlockingSmemBytes;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, args...);
}

// The cooperative form: all CTAs resident by contract, in clusters, with PDL like every other kernel. (On an
// H100, 2026-11-23, clusters of 2 or none and PDL on or off all timed alike; clusters of 3 do not divide 264
// CTAs, and the launch fails with too many blocks.)
cudaError_t launch_cooperative(const Phase* phases, int count, uint32_t* outs, uint32_t seed, int ctas,
                               cudaStream_t stream) {
  cudaLaunchAttribute attributes[3];
  attributes[0].id = cudaLaunchAttributeCooperative;
  attributes[0].val.cooperative = 1;
  attributes[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attributes[1].val.programmaticStreamSerializationAllowed = 1;
  attributes[2].id = cudaLaunchAttributeClusterDimension;
  attributes[2].val.clusterDim.x = kClusterCtas;
  attributes[2].val.clusterDim.y = 1;
  attributes[2].val.clusterDim.z = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(unsigned(ctas));
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = kBlockingSmemBytes;
  config.stream = stream;
  config.attrs = attributes;
  config.numAttrs = 3;
  return cudaLaunchKernelEx(&config, cooperative_pass_kernel, phases, count, outs, seed);
}

// The layers form: a memset of the counters, then one launch per `phases_per_launch` phases.
void launch_layers(const Phase* phases, int count, int phases_per_launch, uint32_t* outs, unsigned* arrived,
                   uint32_t seed, int ctas, cudaStream_t stream) {
  CHECK(cudaMemsetAsync(arrived, 0, sizeof(unsigned) * count, stream));
  for (int first = 0; first < count; first += phases_per_launch) {
    CHECK(launch_phase(layer_pass_kernel, ctas, stream, phases, first, std::min(phases_per_launch, count - first),
                       outs, arrived, seed));
  }
}

// One kernel per phase: griddepcontrol.wait between them, or the completion counters `done` when given.
void launch_chain(const std::vector<Phase>& phases, uint32_t* outs, uint32_t seed, int ctas, unsigned* done,
                  cudaStream_t stream) {
  const int count = int(phases.size());
  for (int i = 0; i < count; ++i) {
    const uint32_t* previous = i ? outs + size_t(i - 1) * ctas : nullptr;
    uint32_t* const out = outs + size_t(i) * ctas;
    if (done) {
      CHECK(launch_phase(flag_phase_kernel, ctas, stream, phases[i], previous, out, seed, done, i, count));
    } else {
      CHECK(launch_phase(chain_phase_kernel, ctas, stream, phases[i], previous, out, seed));
    }
  }
}

float elapsed_ms(cudaEvent_t start, cudaEvent_t end) {
  float ms = 0.0f;
  CHECK(cudaEventElapsedTime(&ms, start, end));
  return ms;
}

float median(std::vector<float> values) {
  std::sort(values.begin(), values.end());
  return values[values.size() / 2];
}

}  // namespace

// Usage: phase_boundary LAYERS REPEATS BYTES... (the bytes of one layer's phases) LM_HEAD_BYTES
// Prints one JSON object.
int main(int argc, char** argv) {
  if (argc < 5) {
    std::fprintf(stderr, "usage: %s LAYERS REPEATS PHASE_BYTES... LM_HEAD_BYTES\n", argv[0]);
    return 2;
  }
  const int layers = std::atoi(argv[1]);
  const int repeats = std::atoi(argv[2]);
  std::vector<long long> layer_bytes;
  for (int i = 3; i < argc - 1; ++i) layer_bytes.push_back(std::atoll(argv[i]));
  const long long lm_head_bytes = std::atoll(argv[argc - 1]);
  if (layers < 1 || repeats < 1) {
    std::fprintf(stderr, "LAYERS and REPEATS must be positive\n");
    return 2;
  }

  int device = 0, sms = 0;
  CHECK(cudaGetDevice(&device));
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int ctas = kCtasPerSm * sms;
  for (auto kernel : {reinterpret_cast<const void*>(chain_phase_kernel),
                      reinterpret_cast<const void*>(flag_phase_kernel),
                      reinterpret_cast<const void*>(cooperative_pass_kernel),
                      reinterpret_cast<const void*>(layer_pass_kernel),
                      reinterpret_cast<const void*>(persistent_pass_kernel)}) {
    CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kBlockingSmemBytes));
  }
  int resident = 0;
  CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, persistent_pass_kernel, kThreads,
                                                      kBlockingSmemBytes));
  if (resident < kCtasPerSm) {
    std::fprintf(stderr, "only %d CTAs per SM fit: the persistent kernel's barriers would never open\n", resident);
    return 1;
  }

  // Every phase streams its own bytes, as every layer has its own weights.
  std::vector<long long> phase_bytes;
  for (int layer = 0; layer < layers; ++layer) phase_bytes.insert(phase_bytes.end(), layer_bytes.begin(), layer_bytes.end());
  phase_bytes.push_back(lm_head_bytes);
  long long total = 0;
  for (long long& bytes : phase_bytes) {
    bytes = (bytes + 15) / 16 * 16;
    total += bytes;
  }
  unsigned char* data = nullptr;
  CHECK(cudaMalloc(&data, size_t(total)));
  CHECK(cudaMemset(data, 0x5A, size_t(total)));
  std::vector<Phase> phases;
  long long offset = 0;
  for (long long bytes : phase_bytes) {
    phases.push_back({reinterpret_cast<const uint4*>(data + offset), bytes / 16});
    offset += bytes;
  }
  const int count = int(phases.size());

  Phase* device_phases = nullptr;
  uint32_t *chain_outs = nullptr, *flag_outs = nullptr, *persistent_outs = nullptr, *cooperative_outs = nullptr,
           *layer_outs = nullptr;
  unsigned *arrived = nullptr, *done = nullptr;
  CHECK(cudaMalloc(&device_phases, sizeof(Phase) * count));
  CHECK(cudaMemcpy(device_phases, phases.data(), sizeof(Phase) * count, cudaMemcpyHostToDevice));
  CHECK(cudaMalloc(&chain_outs, sizeof(uint32_t) * count * ctas));
  CHECK(cudaMalloc(&flag_outs, sizeof(uint32_t) * count * ctas));
  CHECK(cudaMalloc(&persistent_outs, sizeof(uint32_t) * count * ctas));
  CHECK(cudaMalloc(&cooperative_outs, sizeof(uint32_t) * count * ctas));
  CHECK(cudaMalloc(&layer_outs, sizeof(uint32_t) * count * ctas));
  unsigned* layer_arrived = nullptr;
  CHECK(cudaMalloc(&layer_arrived, sizeof(unsigned) * count));
  CHECK(cudaMalloc(&arrived, sizeof(unsigned) * count));
  CHECK(cudaMemset(arrived, 0, sizeof(unsigned) * count));
  CHECK(cudaMalloc(&done, sizeof(unsigned) * count));
  CHECK(cudaMemset(done, 0, sizeof(unsigned) * count));

  cudaStream_t stream;
  CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaEvent_t start, end;
  CHECK(cudaEventCreate(&start));
  CHECK(cudaEventCreate(&end));

  // The graph forms, each captured once (seed 1) and replayed.
  const int phases_per_layer = int(layer_bytes.size());
  auto capture = [&](auto&& launch) {
    cudaGraph_t graph;
    cudaGraphExec_t instance;
    CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    launch();
    CHECK(cudaStreamEndCapture(stream, &graph));
    CHECK(cudaGraphInstantiate(&instance, graph, 0));
    return instance;
  };
  const cudaGraphExec_t chain_graph = capture([&] { launch_chain(phases, chain_outs, 1u, ctas, nullptr, stream); });
  const cudaGraphExec_t flag_graph = capture([&] { launch_chain(phases, flag_outs, 1u, ctas, done, stream); });
  const cudaGraphExec_t cooperative_graph = capture(
      [&] { CHECK(launch_cooperative(device_phases, count, cooperative_outs, 1u, ctas, stream)); });
  const cudaGraphExec_t layer_graph = capture(
      [&] { launch_layers(device_phases, count, phases_per_layer, layer_outs, layer_arrived, 1u, ctas, stream); });

  // Every launch adds the grid to each counter; a target of 0 opens every barrier.
  unsigned launches = 0;
  auto run_persistent = [&](uint32_t seed, bool wait) {
    ++launches;
    persistent_pass_kernel<<<ctas, kThreads, kBlockingSmemBytes, stream>>>(
        device_phases, count, persistent_outs, arrived, wait ? launches * unsigned(ctas) : 0u, seed);
    CHECK(cudaGetLastError());
  };

  auto time_ms = [&](auto&& run) {
    for (int i = 0; i < 3; ++i) run();
    std::vector<float> times;
    for (int i = 0; i < repeats; ++i) {
      CHECK(cudaEventRecord(start, stream));
      run();
      CHECK(cudaEventRecord(end, stream));
      CHECK(cudaEventSynchronize(end));
      times.push_back(elapsed_ms(start, end));
    }
    return median(times);
  };
  const float stream_ms = time_ms([&]() { run_persistent(1u, false); });
  const float chain_ms = time_ms([&]() { CHECK(cudaGraphLaunch(chain_graph, stream)); });
  const float flags_ms = time_ms([&]() { CHECK(cudaGraphLaunch(flag_graph, stream)); });
  const float cooperative_ms = time_ms([&]() { CHECK(cudaGraphLaunch(cooperative_graph, stream)); });
  const float layers_ms = time_ms([&]() { CHECK(cudaGraphLaunch(layer_graph, stream)); });
  const float persistent_ms = time_ms([&]() { run_persistent(1u, true); });

  // Every form's barriers must have ordered each phase after the one before: with a seed no earlier run
  // used, the last outputs of every form must equal the plain chain's.
  const uint32_t check_seed = 0x9E3779B9u;
  run_persistent(check_seed, true);
  CHECK(launch_cooperative(device_phases, count, cooperative_outs, check_seed, ctas, stream));
  launch_layers(device_phases, count, phases_per_layer, layer_outs, layer_arrived, check_seed, ctas, stream);
  launch_chain(phases, flag_outs, check_seed, ctas, done, stream);
  launch_chain(phases, chain_outs, check_seed, ctas, nullptr, stream);
  CHECK(cudaStreamSynchronize(stream));
  auto last_outputs = [&](const uint32_t* outs) {
    std::vector<uint32_t> values(ctas);
    CHECK(cudaMemcpy(values.data(), outs + size_t(count - 1) * ctas, sizeof(uint32_t) * ctas,
                     cudaMemcpyDeviceToHost));
    return values;
  };
  const std::vector<uint32_t> expected = last_outputs(chain_outs);
  const bool outputs_match = last_outputs(persistent_outs) == expected && last_outputs(flag_outs) == expected &&
                             last_outputs(cooperative_outs) == expected && last_outputs(layer_outs) == expected;

  cudaDeviceProp properties;
  CHECK(cudaGetDeviceProperties(&properties, device));
  std::printf(
      "{\"device\": \"%s\", \"sms\": %d, \"ctas\": %d, \"phases\": %d, \"bytes\": %lld, \"stream_ms\": %.4f, "
      "\"chain_ms\": %.4f, \"flags_ms\": %.4f, \"persistent_ms\": %.4f, \"cooperative_ms\": %.4f, "
      "\"layers_ms\": %.4f, \"outputs_match\": %s}\n",
      properties.name, sms, ctas, count, total, stream_ms, chain_ms, flags_ms, persistent_ms, cooperative_ms, layers_ms,
      outputs_match ? "true" : "false");
  return outputs_match ? 0 : 1;
}
