// Parallel loops of the elementwise and row kernels (`cpu_glu.cc`) on XLA's intra-op thread pool, beside XLA's
// own ops, rather than on an OpenMP team of their own: on a 2-core CPU, an OpenMP team started from one XLA
// thread while XLA runs a fusion on the other put three busy threads on two cores.
#ifndef MLM_FLAX_CPU_PARALLEL_H_
#define MLM_FLAX_CPU_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace mlm_flax {

// fn(begin, end) over [0, n) in chunks of `chunk`, claimed in turn by the calling thread and by up to
// pool.num_threads() tasks on the pool; returns when every chunk is done. The chunks are fixed, so a kernel
// whose chunks write disjoint outputs gives the same bits whoever runs them. The caller works too: a pool busy
// elsewhere delays nothing but its own share.
template <typename Fn>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t n, int64_t chunk, Fn fn) {
  const int64_t chunks = (n + chunk - 1) / chunk;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), chunks - 1);
  if (helpers <= 0) {
    if (n > 0) fn(int64_t{0}, n);
    return;
  }
  struct Progress {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto progress = std::make_shared<Progress>();  // outlives this call in a task that starts after the last chunk
  auto work = [progress, chunks, chunk, n, fn]() {
    for (int64_t c; (c = progress->next.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
      fn(c * chunk, std::min(n, (c + 1) * chunk));
      progress->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule(decltype(work)(work));  // a copy each
  work();
  while (progress->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
}

}  // namespace mlm_flax

#endif  // MLM_FLAX_CPU_PARALLEL_H_
