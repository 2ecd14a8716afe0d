// Work split over XLA's intra-op threads, shared by sqjax's kernels (csrc/*.cc).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

// Runs body(u) for u = 0 .. units - 1. Units are claimed one at a time by the calling
// thread and up to num_threads - 1 of the pool's; each thread first makes its own body
// (make_body(): its scratch buffers), then runs every unit it claims. The caller works too
// and waits only for units already started, so a busy (or absent) pool delays nothing.
template <class MakeBody>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t units, MakeBody make_body) {
  struct Counters {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto counters = std::make_shared<Counters>();  // outlives the call for late helpers
  auto work = [counters, units, make_body] {
    auto body = make_body();
    for (int64_t u; (u = counters->next.fetch_add(1)) < units;) {
      body(u);
      counters->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t threads = std::max<int64_t>(pool.num_threads(), 1);
  const int64_t helpers = std::min<int64_t>(threads - 1, units - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work(); });
  work();
  while (counters->done.load(std::memory_order_acquire) < units) std::this_thread::yield();
}
