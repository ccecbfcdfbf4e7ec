// Threading, per-thread scratch and the one-time choice of the arithmetic flavour for the CPU kernels.

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

#include "cpu_common.h"

namespace orthrus {
namespace {

std::atomic<CpuParallelFor> installed_parallel_for{nullptr};

int configured_thread_count() {
  if (const char* text = std::getenv("ORTHRUS_NUM_THREADS")) {
    const int requested = std::atoi(text);
    if (requested > 0) return requested;
  }
  return std::max(1u, std::thread::hardware_concurrency());
}

// A fixed set of workers that split one range at a time into contiguous chunks. Used only when no
// embedder pool is installed (C++ programs, the CMake library).
class ThreadPool {
 public:
  static ThreadPool& instance() {
    // Leaked on purpose: joining workers from a static destructor races with other exit-time code.
    static ThreadPool* pool = new ThreadPool(configured_thread_count());
    return *pool;
  }

  void run(int64_t count, int64_t grain, void* context, CpuParallelBody body) {
    const int64_t useful_chunks = (count + std::max<int64_t>(grain, 1) - 1) / std::max<int64_t>(grain, 1);
    const int chunks = int(std::min<int64_t>(useful_chunks, int64_t(workers_.size()) + 1));
    // A forked child has no workers; it computes alone rather than wait for threads that do not exist.
    if (chunks <= 1 || getpid() != owner_process_) {
      body(context, 0, count);
      return;
    }
    std::lock_guard<std::mutex> one_job_at_a_time(job_mutex_);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = Job{count, chunks, context, body};
      next_chunk_.store(0, std::memory_order_relaxed);
      busy_workers_ = int(workers_.size());
      ++generation_;
    }
    wake_.notify_all();
    work_on(job_);
    std::unique_lock<std::mutex> lock(mutex_);
    finished_.wait(lock, [&] { return busy_workers_ == 0; });
  }

 private:
  struct Job {
    int64_t count = 0;
    int chunks = 0;
    void* context = nullptr;
    CpuParallelBody body = nullptr;
  };

  explicit ThreadPool(int threads) : owner_process_(getpid()) {
    for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { worker_loop(); });
    for (auto& worker : workers_) worker.detach();
  }

  void work_on(const Job& job) {
    for (int chunk = next_chunk_.fetch_add(1); chunk < job.chunks; chunk = next_chunk_.fetch_add(1)) {
      const int64_t begin = job.count * chunk / job.chunks;
      const int64_t end = job.count * (chunk + 1) / job.chunks;
      job.body(job.context, begin, end);
    }
  }

  void worker_loop() {
    uint64_t seen_generation = 0;
    for (;;) {
      Job job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_ != seen_generation; });
        seen_generation = generation_;
        job = job_;
      }
      work_on(job);
      std::lock_guard<std::mutex> lock(mutex_);
      if (--busy_workers_ == 0) finished_.notify_one();
    }
  }

  const pid_t owner_process_;
  std::vector<std::thread> workers_;
  std::mutex job_mutex_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable finished_;
  uint64_t generation_ = 0;
  int busy_workers_ = 0;
  Job job_;
  std::atomic<int> next_chunk_{0};
};

}  // namespace

void set_cpu_parallel_for(CpuParallelFor parallel_for) { installed_parallel_for.store(parallel_for); }

namespace cpu {

void run_parallel(int64_t count, int64_t grain, void* context, CpuParallelBody body) {
  if (CpuParallelFor installed = installed_parallel_for.load()) {
    installed(count, grain, context, body);
  } else {
    ThreadPool::instance().run(count, grain, context, body);
  }
}

float* thread_scratch(int64_t count, int slot) {
  thread_local std::vector<float> buffers[4];
  std::vector<float>& buffer = buffers[slot];
  if (int64_t(buffer.size()) < count) buffer.resize(size_t(count));
  return buffer.data();
}

bool use_fused_math() {
  static const bool fused = [] {
    const char* setting = std::getenv("ORTHRUS_CPU_FMA");
    if (setting && setting[0] == '0') return false;
#if ORTHRUS_CPU_X86_DISPATCH
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
    return false;
#endif
  }();
  return fused;
}

}  // namespace cpu
}  // namespace orthrus
