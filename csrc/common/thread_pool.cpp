#include "thread_pool.h"

#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <system_error>
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
  explicit Pool(int threads) : size_(std::max(1, threads)) {}
  // Never destroyed (see pool()).

  int size() const { return size_.load(std::memory_order_relaxed); }

  void resize(int threads) {
    std::lock_guard<std::mutex> run_lock(run_mutex_);
    stop_workers();
    size_.store(std::max(1, threads));
    thread_limit_ = INT_MAX;  // a refused thread is tried again at the new size
  }

  void run(int64_t n, int64_t grain, RangeFn fn, void* ctx, int max_threads) {
    grain = std::max<int64_t>(1, grain);
    if (n <= 0) return;
    const int64_t chunks = (n + grain - 1) / grain;
    if (t_in_parallel || chunks == 1 || size() == 1 || max_threads == 1) {
      fn(ctx, 0, n);
      return;
    }
    // One job at a time: concurrent callers (server threads) queue here. Each
    // job already uses every core, so nothing is lost by serialising them.
    std::lock_guard<std::mutex> run_lock(run_mutex_);
    // Workers start here rather than in the constructor or resize(): at the
    // first job, after set_num_threads, and in a fork() child, where the
    // parent's workers do not exist (see after_fork_in_child).
    const int workers = start_workers(size_.load() - 1);
    if (workers == 0) {
      fn(ctx, 0, n);
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      fn_ = fn;
      ctx_ = ctx;
      n_ = n;
      grain_ = grain;
      limit_ = max_threads > 0 ? max_threads : INT_MAX;  // workers with an index >= limit_ sit this job out
      next_.store(0);
      active_.store(workers);
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

  // pthread_atfork handlers. fork() copies only the calling thread: a worker
  // mid-job or a mutex held by another thread would be frozen in that state
  // in the child. Holding both locks across fork() means no job or resize is
  // in flight when the address space is copied (fork waits for a running job
  // to finish; jobs never call back into Python, so they cannot wait on it).
  void before_fork() {
    run_mutex_.lock();
    mutex_.lock();
  }

  void after_fork_in_parent() {
    mutex_.unlock();
    run_mutex_.unlock();
  }

  void after_fork_in_child() {
    // The worker threads are gone, but their std::thread objects still say
    // "joinable": destroying them would call std::terminate and joining would
    // wait forever, so the vector is re-made in place and its old elements
    // are left, never destroyed (as the synchronisation objects below).
    // Fresh synchronisation objects instead of unlocking or destroying the
    // copies: the condition variable still counts the parent's parked workers
    // as waiters (glibc's notify and destroy may wait for them to leave), and
    // the mutexes are owned by this thread's parent-side identity. The job
    // fields need no reset: before_fork held run_mutex_, so no job was in flight.
    new (&workers_) std::vector<std::thread>();
    new (&cv_) std::condition_variable();
    new (&mutex_) std::mutex();
    new (&run_mutex_) std::mutex();
  }

 private:
  // Starts workers until `wanted` run (called with run_mutex_ held). Returns
  // how many run: fewer when the OS refuses a thread (a container's pids
  // limit), and the job then runs on fewer threads instead of failing.
  // A refusal is remembered (thread_limit_) until the next resize: later jobs
  // do not stop and start every thread again only to be refused again.
  int start_workers(int wanted) {
    wanted = std::min(wanted, thread_limit_);
    if (static_cast<int>(workers_.size()) == wanted) return wanted;
    stop_workers();
    stopping_.store(false);
    // Read before the job is published: a worker whose thread gets going only
    // after the bump below must still see the job as new.
    const uint64_t current = generation_.load();
    for (int i = 1; i <= wanted; ++i) {
      try {
        workers_.emplace_back([this, i, current] { worker_loop(i, current); });
      } catch (const std::system_error&) {
        thread_limit_ = static_cast<int>(workers_.size());
        break;
      }
    }
    return static_cast<int>(workers_.size());
  }

  void work() {
    for (;;) {
      const int64_t begin = next_.fetch_add(grain_, std::memory_order_relaxed);
      if (begin >= n_) break;
      fn_(ctx_, begin, std::min(n_, begin + grain_));
    }
  }

  // `seen`: the last generation before this worker existed, so it neither
  // reruns the previous job nor misses the next one.
  void worker_loop(int index, uint64_t seen) {
#if defined(__linux__)
    // Named so a profiler (or tests/test_thread_pools.py) tells tallow's
    // threads from torch's OpenMP team.
    pthread_setname_np(pthread_self(), "tallow-pool");
#endif
    t_thread_index = index;
    t_in_parallel = true;
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
      if (index < limit_) work();
      active_.fetch_sub(1, std::memory_order_release);
    }
  }

  void stop_workers() {
    if (workers_.empty()) return;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_.store(true);
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
  }

  // Threads parallel_for uses (workers + the caller). Atomic because run()'s
  // fast path reads it without run_mutex_ while set_num_threads may write it;
  // run() re-reads it under the lock before sizing a job.
  std::atomic<int> size_;
  std::vector<std::thread> workers_;  // guarded by run_mutex_
  int thread_limit_ = INT_MAX;  // workers the OS let us start (guarded by run_mutex_)
  std::mutex run_mutex_;  // serialises jobs, resizes and fork()
  std::mutex mutex_;  // pairs with cv_ for parking workers
  std::condition_variable cv_;
  // Job fields below are written before generation_ is bumped (release) and
  // read by workers after they observe the bump (acquire).
  std::atomic<uint64_t> generation_{0};
  std::atomic<bool> stopping_{false};
  RangeFn fn_ = nullptr;
  void* ctx_ = nullptr;
  int64_t n_ = 0, grain_ = 1;
  int limit_ = INT_MAX;
  std::atomic<int64_t> next_{0};
  std::atomic<int> active_{0};
};

Pool* g_pool = nullptr;  // set once, by pool()

void pool_before_fork() { g_pool->before_fork(); }
void pool_after_fork_in_parent() { g_pool->after_fork_in_parent(); }
void pool_after_fork_in_child() { g_pool->after_fork_in_child(); }

Pool& pool() {
  // Leaked on purpose: joining threads from a static destructor at interpreter
  // exit can deadlock; the OS reclaims them.
  static Pool* p = [] {
    g_pool = new Pool(default_num_threads());
    pthread_atfork(pool_before_fork, pool_after_fork_in_parent, pool_after_fork_in_child);
    return g_pool;
  }();
  return *p;
}

// Built when the library is loaded rather than at the first parallel_for:
// Python loads an extension while holding the GIL, which os.fork() also
// needs, so a fork can never copy pool()'s static half-initialised (its guard
// would then block the child's first call forever).
[[maybe_unused]] const bool g_pool_built_at_load = (pool(), true);

}  // namespace

void parallel_for(int64_t n, int64_t grain, RangeFn fn, void* ctx, int max_threads) {
  pool().run(n, grain, fn, ctx, max_threads);
}

int num_threads() { return pool().size(); }

void set_num_threads(int n) {
  if (n < 1) n = 1;
  if (n != pool().size()) pool().resize(n);
}

int thread_index() { return t_thread_index; }

}  // namespace tallow
