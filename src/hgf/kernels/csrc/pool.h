// A small work-claiming thread pool for the ternary kernels.
//
// run(n, threads, fn) calls fn(i) for every i in [0, n) on the calling thread plus up to
// threads - 1 pool workers. Chunks are claimed one at a time from a shared atomic counter that
// also carries the job's epoch, and the caller returns as soon as every chunk is done. So a
// worker that is descheduled (a busy, oversubscribed machine) or never wakes costs nothing:
// the caller does its share. An OpenMP team, in contrast, waits at its barrier for every thread,
// which on a loaded 2-core machine turns a 0.1 ms GEMV into a full scheduler time slice.
// Workers spin briefly after a job (decode calls come back to back), then sleep.
#pragma once

#include <pthread.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>

namespace hgf {

class Pool {
 public:
  template <class F>
  void run(int64_t n, int threads, const F& fn) {
    if (threads <= 1 || n <= 1 || workers_ == 0) {
      for (int64_t i = 0; i < n; ++i) fn(i);
      return;
    }
    std::lock_guard<std::mutex> one_job(job_mu_);  // callers on several threads take turns
    uint64_t ep;
    {
      std::lock_guard<std::mutex> lk(mu_);
      call_ = [](const void* f, int64_t i) { (*static_cast<const F*>(f))(i); };
      ctx_ = &fn;
      total_ = n;
      wanted_ = threads - 1;
      joined_.store(0, std::memory_order_relaxed);
      done_.store(0, std::memory_order_relaxed);
      ep = (epoch_.load(std::memory_order_relaxed) + 1) & 0xffffffffu;
      next_.store(ep << 32, std::memory_order_release);
      epoch_.store(ep, std::memory_order_release);
    }
    cv_.notify_all();
    work(ep, call_, &fn, n);
    while (done_.load(std::memory_order_acquire) < n) std::this_thread::yield();
  }

  static Pool& get() {
    static bool at_fork = (pthread_atfork(nullptr, nullptr, [] { instance_ = nullptr; }), true);
    (void)at_fork;
    if (instance_ == nullptr) {  // first use, or first use in a forked child (threads are gone)
      const unsigned hw = std::thread::hardware_concurrency();
      instance_ = new Pool(hw > 1 ? int(hw) - 1 : 0);  // never deleted: workers are detached
    }
    return *instance_;
  }

 private:
  using Call = void (*)(const void*, int64_t);

  explicit Pool(int workers) : workers_(workers) {
    for (int i = 0; i < workers; ++i) std::thread([this] { loop(); }).detach();
  }

  void work(uint64_t ep, Call call, const void* ctx, int64_t n) {
    for (;;) {
      uint64_t cur = next_.load(std::memory_order_acquire);
      const int64_t i = int64_t(cur & 0xffffffffu);
      if ((cur >> 32) != ep || i >= n) return;  // another job, or nothing left to claim
      if (!next_.compare_exchange_weak(cur, cur + 1, std::memory_order_acq_rel)) continue;
      call(ctx, i);
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  void loop() {
    uint64_t seen = 0;
    for (;;) {
      const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(200);
      while (epoch_.load(std::memory_order_acquire) == seen &&
             std::chrono::steady_clock::now() < until) {
      }
      Call call;
      const void* ctx;
      int64_t n;
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return epoch_.load(std::memory_order_relaxed) != seen; });
        seen = epoch_.load(std::memory_order_relaxed);
        if (joined_.fetch_add(1, std::memory_order_relaxed) >= wanted_) continue;
        call = call_;
        ctx = ctx_;
        n = total_;
      }
      work(seen, call, ctx, n);
    }
  }

  static inline Pool* instance_ = nullptr;
  const int workers_;
  std::mutex job_mu_, mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> epoch_{0}, next_{0};
  std::atomic<int64_t> done_{0};
  std::atomic<int> joined_{0};
  int wanted_ = 0;
  Call call_ = nullptr;
  const void* ctx_ = nullptr;
  int64_t total_ = 0;
};

}  // namespace hgf
