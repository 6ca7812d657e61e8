#include "thread_pool.h"

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace tallow {
namespace {

thread_local int t_thread_index = 0;
thread_local bool t_in_parallel = false;

int default_num_threads() {
  if (const char* env = std::getenv("TALLOW_NUM_THREADS"); env && *env) {
    const int n = std::atoi(env);
    if (n >= 1) return n;
  }
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    const int n = CPU_COUNT(&set);
    if (n >= 1) return n;
  }
  return std::max(1u, std::thread::hardware_concurrency());
}

class Pool {
 public:
  explicit Pool(int threads) { resize(threads); }
  ~Pool() { stop_workers(); }

  int size() const { return size_; }

  void resize(int threads) {
    std::lock_guard<std::mutex> run_lock(run_mutex_);
    stop_workers();
    size_ = std::max(1, threads);
    stopping_.store(false);
    for (int i = 1; i < size_; ++i) workers_.emplace_back([this, i] { worker_loop(i); });
  }

  void run(int64_t n, int64_t grain, RangeFn fn, void* ctx) {
    grain = std::max<int64_t>(1, grain);
    const int64_t chunks = (n + grain - 1) / grain;
    if (n <= 0) return;
    if (t_in_parallel || size_ == 1 || chunks == 1) {
      fn(ctx, 0, n);
      return;
    }
    // One job at a time: concurrent callers (server threads) queue here. Each
    // job already uses every core, so nothing is lost by serialising them.
    std::lock_guard<std::mutex> run_lock(run_mutex_);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      fn_ = fn;
      ctx_ = ctx;
      n_ = n;
      grain_ = grain;
      next_.store(0);
      active_.store(size_ - 1);
      ++generation_;
    }
    cv_.notify_all();
    t_in_parallel = true;
    t_thread_index = 0;
    work();
    t_in_parallel = false;
    // Wait for the workers to finish their last chunk (short spin, then yield).
    for (int spin = 0; active_.load(std::memory_order_acquire) != 0; ++spin) {
      if (spin > 2000) std::this_thread::yield();
    }
  }

 private:
  void work() {
    for (;;) {
      const int64_t begin = next_.fetch_add(grain_, std::memory_order_relaxed);
      if (begin >= n_) break;
      fn_(ctx_, begin, std::min(n_, begin + grain_));
    }
  }

  void worker_loop(int index) {
    t_thread_index = index;
    t_in_parallel = true;
    uint64_t seen = 0;
    for (;;) {
      // Spin briefly (~30 us): back-to-back kernel calls then skip the futex
      // round trip. Not longer: a spinning worker steals a core from the torch
      // ops that run between our kernels. Afterwards park on the condvar.
      const auto spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(30);
      bool have_job = false;
      for (int spin = 0;; ++spin) {
        if (generation_.load(std::memory_order_acquire) != seen || stopping_.load()) {
          have_job = true;
          break;
        }
#if defined(__x86_64__)
        __builtin_ia32_pause();
#endif
        if ((spin & 63) == 63 && std::chrono::steady_clock::now() > spin_until) break;
      }
      if (!have_job) {
        std::unique_lock<std::mutex> lock(mutex_);
        cv_.wait(lock, [&] {
          return generation_.load(std::memory_order_acquire) != seen || stopping_.load();
        });
      }
      if (stopping_.load()) return;
      seen = generation_.load(std::memory_order_acquire);
      work();
      active_.fetch_sub(1, std::memory_order_release);
    }
  }

  void stop_workers() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_.store(true);
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
  }

  int size_ = 1;
  std::vector<std::thread> workers_;
  std::mutex run_mutex_;  // serialises jobs and resizes
  std::mutex mutex_;  // pairs with cv_ for parking workers
  std::condition_variable cv_;
  // Job fields below are written before generation_ is bumped (release) and
  // read by workers after they observe the bump (acquire).
  std::atomic<uint64_t> generation_{0};
  std::atomic<bool> stopping_{false};
  RangeFn fn_ = nullptr;
  void* ctx_ = nullptr;
  int64_t n_ = 0, grain_ = 1;
  std::atomic<int64_t> next_{0};
  std::atomic<int> active_{0};
};

Pool& pool() {
  // Leaked on purpose: joining threads from a static destructor at interpreter
  // exit can deadlock; the OS reclaims them.
  static Pool* p = new Pool(default_num_threads());
  return *p;
}

}  // namespace

void parallel_for(int64_t n, int64_t grain, RangeFn fn, void* ctx) {
  pool().run(n, grain, fn, ctx);
}

int num_threads() { return pool().size(); }

void set_num_threads(int n) {
  if (n < 1) n = 1;
  if (n != pool().size()) pool().resize(n);
}

int thread_index() { return t_thread_index; }

}  // namespace tallow
