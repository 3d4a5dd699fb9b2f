// ThreadPool: persistent workers, static or run-time balanced partition, spin-then-block hand-off.
//
// Protocol (one job at a time): the caller publishes the job (fn, n) and bumps `generation_`
// with a release store; workers spin on it for a short while, then block on a condition
// variable. Each worker runs its range and decrements `pending_`; the last one wakes the caller
// if it is blocked. All cross-thread fields are either atomics or written before a release that
// the reader acquires, so the pool is data-race free (TSan-clean).
//
// Balanced jobs: thread t's static range lives in one atomic word (begin << 32 | end) on its own
// cache line. The owner takes `grain` indices from the front and others take them from the back,
// each with a compare-exchange, so every index is claimed exactly once; the owner's word stays
// in its own cache until a thief touches it, so the common case costs one uncontended CAS per
// chunk.
#include <immintrin.h>

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#include "common/check.h"
#include "kernels/kernels.h"

namespace kun::kernels {
namespace {
// About 30-60 us of spinning before blocking: covers the gap between back-to-back kernel calls
// without burning a core that an oversubscribed machine needs.
constexpr int kSpinIters = 2000;

inline void cpu_relax() { _mm_pause(); }

// ThreadPool::current_thread_index(): set around each fn call.
thread_local int t_thread_index = -1;

// Sets t_thread_index for its scope (restored after, so a nested call elsewhere stays right).
class ThreadIndexScope {
 public:
  explicit ThreadIndexScope(int idx) : saved_(t_thread_index) { t_thread_index = idx; }
  ~ThreadIndexScope() { t_thread_index = saved_; }
  ThreadIndexScope(const ThreadIndexScope&) = delete;
  ThreadIndexScope& operator=(const ThreadIndexScope&) = delete;

 private:
  int saved_;
};
}  // namespace

struct ThreadPool::Impl {
  int num_threads = 1;
  std::vector<std::thread> workers;

  struct alignas(64) Range {
    std::atomic<std::uint64_t> span{0};  // begin << 32 | end
  };
  std::vector<Range> ranges;  // one per thread, balanced jobs only

  std::mutex mu;
  std::condition_variable work_cv;  // workers wait for a new generation
  std::condition_variable done_cv;  // caller waits for pending == 0
  std::atomic<std::uint64_t> generation{0};
  std::atomic<int> pending{0};
  std::atomic<bool> stop{false};
  std::atomic<bool> busy{false};

  // Published before `generation` is released; read after it is acquired.
  const std::function<void(std::int64_t, std::int64_t)>* fn = nullptr;
  std::int64_t n = 0;
  std::int64_t grain = 0;  // 0: static job (parallel_for); > 0: balanced job

  static void range(std::int64_t n, int parts, int idx, std::int64_t* b, std::int64_t* e) {
    *b = n * idx / parts;
    *e = n * (idx + 1) / parts;
  }

  static std::uint64_t pack(std::uint64_t b, std::uint64_t e) { return b << 32 | e; }

  // Claims up to `grain` indices of range r, from the front (owner) or the back (thief).
  bool claim(int r, bool front, std::int64_t* b, std::int64_t* e) {
    std::atomic<std::uint64_t>& span = ranges[static_cast<std::size_t>(r)].span;
    std::uint64_t v = span.load(std::memory_order_relaxed);
    for (;;) {
      const std::uint64_t lo = v >> 32;
      const std::uint64_t hi = v & 0xffffffffu;
      if (lo >= hi) return false;
      const auto g = static_cast<std::uint64_t>(grain);
      const std::uint64_t take = hi - lo < g ? hi - lo : g;
      const std::uint64_t next = front ? pack(lo + take, hi) : pack(lo, hi - take);
      if (span.compare_exchange_weak(v, next, std::memory_order_relaxed,
                                     std::memory_order_relaxed)) {
        *b = static_cast<std::int64_t>(front ? lo : hi - take);
        *e = static_cast<std::int64_t>(front ? lo + take : hi);
        return true;
      }
    }
  }

  // Thread idx's share of the current job.
  void run_part(int idx) {
    const ThreadIndexScope index(idx);
    std::int64_t b, e;
    if (grain == 0) {
      range(n, num_threads, idx, &b, &e);
      if (b < e) (*fn)(b, e);
      return;
    }
    while (claim(idx, true, &b, &e)) (*fn)(b, e);
    for (int k = 1; k < num_threads; ++k) {
      const int victim = (idx + k) % num_threads;
      while (claim(victim, false, &b, &e)) (*fn)(b, e);
    }
  }

  void worker_loop(int idx) {
    std::uint64_t seen = 0;
    for (;;) {
      std::uint64_t g = generation.load(std::memory_order_acquire);
      for (int i = 0; g == seen && i < kSpinIters && !stop.load(std::memory_order_relaxed); ++i) {
        cpu_relax();
        g = generation.load(std::memory_order_acquire);
      }
      if (g == seen) {
        std::unique_lock<std::mutex> lock(mu);
        work_cv.wait(lock, [&] {
          return generation.load(std::memory_order_acquire) != seen ||
                 stop.load(std::memory_order_acquire);
        });
        g = generation.load(std::memory_order_acquire);
      }
      if (stop.load(std::memory_order_acquire)) return;
      seen = g;
      run_part(idx);
      if (pending.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        std::lock_guard<std::mutex> lock(mu);
        done_cv.notify_one();
      }
    }
  }
};

ThreadPool::ThreadPool(int num_threads) : impl_(new Impl) {
  KUN_CHECK_GE(num_threads, 1);
  impl_->num_threads = num_threads;
  impl_->ranges = std::vector<Impl::Range>(static_cast<std::size_t>(num_threads));
  impl_->workers.reserve(static_cast<std::size_t>(num_threads - 1));
  for (int i = 1; i < num_threads; ++i) {
    impl_->workers.emplace_back([this, i] { impl_->worker_loop(i); });
  }
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    impl_->stop.store(true, std::memory_order_release);
  }
  impl_->work_cv.notify_all();
  for (auto& t : impl_->workers) t.join();
  delete impl_;
}

int ThreadPool::num_threads() const { return impl_->num_threads; }

int ThreadPool::current_thread_index() { return t_thread_index; }

void ThreadPool::parallel_for(std::int64_t n,
                              const std::function<void(std::int64_t, std::int64_t)>& fn) {
  if (n <= 0) return;
  if (impl_->num_threads == 1) {
    const ThreadIndexScope index(0);
    fn(0, n);
    return;
  }
  run(n, 0, fn);
}

void ThreadPool::parallel_for_balanced(std::int64_t n, std::int64_t grain,
                                       const std::function<void(std::int64_t, std::int64_t)>& fn) {
  if (n <= 0) return;
  KUN_CHECK_GE(grain, 1);
  KUN_CHECK_LT(n, std::int64_t{1} << 31);
  if (impl_->num_threads == 1) {
    const ThreadIndexScope index(0);
    fn(0, n);
    return;
  }
  run(n, grain, fn);
}

void ThreadPool::run(std::int64_t n, std::int64_t grain,
                     const std::function<void(std::int64_t, std::int64_t)>& fn) {
  Impl& p = *impl_;
  KUN_CHECK(!p.busy.exchange(true, std::memory_order_acquire))
      << "ThreadPool::parallel_for is not re-entrant";
  {
    std::lock_guard<std::mutex> lock(p.mu);
    p.fn = &fn;
    p.n = n;
    p.grain = grain;
    if (grain > 0) {
      for (int t = 0; t < p.num_threads; ++t) {
        std::int64_t b, e;
        Impl::range(n, p.num_threads, t, &b, &e);
        p.ranges[static_cast<std::size_t>(t)].span.store(
            Impl::pack(static_cast<std::uint64_t>(b), static_cast<std::uint64_t>(e)),
            std::memory_order_relaxed);
      }
    }
    p.pending.store(p.num_threads - 1, std::memory_order_relaxed);
    p.generation.fetch_add(1, std::memory_order_release);
  }
  p.work_cv.notify_all();
  p.run_part(0);
  for (int i = 0; p.pending.load(std::memory_order_acquire) != 0 && i < kSpinIters; ++i) cpu_relax();
  if (p.pending.load(std::memory_order_acquire) != 0) {
    std::unique_lock<std::mutex> lock(p.mu);
    p.done_cv.wait(lock, [&] { return p.pending.load(std::memory_order_acquire) == 0; });
  }
  p.busy.store(false, std::memory_order_release);
}

}  // namespace kun::kernels
