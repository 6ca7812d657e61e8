// A small fork-join thread pool shared by every kernel.
//
// Why not OpenMP: torch ships its own libgomp; a second OpenMP runtime in the
// same process spins its idle threads while torch's run (and vice versa),
// which on a 2-core machine halves the speed of whichever op runs next. This
// pool parks its workers on a condition variable after a short spin.
//
// The interface is a plain function pointer + context on purpose: ISA-specific
// translation units (compiled with -mavx512f etc.) must not instantiate shared
// inline templates such as std::function, or the linker may hand their
// AVX-512 copy to code that runs on a CPU without AVX-512.
#pragma once

#include <cstdint>

namespace tallow {

// Called with a half-open range [begin, end) of task indices.
using RangeFn = void (*)(void* ctx, int64_t begin, int64_t end);

// Runs fn over [0, n) split into chunks of `grain` tasks (>= 1), handed out
// dynamically to the pool's threads and the calling thread. Returns when all
// chunks are done. A call made from inside a running parallel_for runs
// serially on the calling thread. Exceptions must not escape fn.
// `max_threads` (> 0) caps the threads taking part, so thread_index() stays
// below it: a kernel that sized per-thread scratch from num_threads() passes
// that count, and a set_num_threads() from another thread meanwhile cannot
// send an index past its buffers.
void parallel_for(int64_t n, int64_t grain, RangeFn fn, void* ctx, int max_threads = 0);

// Number of threads parallel_for uses (workers + the caller).
int num_threads();

// Sets it (>= 1). Initial value: TALLOW_NUM_THREADS if set, else the number
// of CPUs this process may run on.
void set_num_threads(int n);

// Index of the calling thread within the current parallel_for, in
// [0, num_threads()); 0 outside of one. Use it to pick per-thread scratch.
int thread_index();

}  // namespace tallow
