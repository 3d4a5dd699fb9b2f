// Kernels against naive double-precision references on every ISA this CPU supports, plus the
// determinism contract (batch, tiling, thread count, KV block size and placement) bit for bit.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "common/dtype.h"
#include "kernels/kernels.h"
#include "kernels/roofline.h"

namespace kun::kernels {
namespace {

std::vector<Isa> supported_isas() {
  std::vector<Isa> out;
  for (Isa i : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512, Isa::kAvx512Bf16}) {
    if (isa_supported(i)) out.push_back(i);
  }
  return out;
}

std::vector<float> random_floats(std::int64_t n, std::uint32_t seed, float lo = -1.0f,
                                 float hi = 1.0f) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(static_cast<std::size_t>(n));
  for (auto& x : v) x = dist(rng);
  return v;
}

// A weight matrix stored in `dtype` plus its exact f32 values (for the reference).
struct TestWeight {
  std::vector<std::uint8_t> bytes;
  std::vector<float> values;
  WeightView view;
};

TestWeight make_weight(std::int64_t n, std::int64_t k, DType dt, std::uint32_t seed) {
  TestWeight w;
  const std::vector<float> src = random_floats(n * k, seed);
  w.bytes.resize(static_cast<std::size_t>(n * k * dtype_bytes(dt)));
  convert_dtype(src.data(), DType::kF32, w.bytes.data(), dt, n * k);
  w.values.resize(src.size());
  convert_dtype(w.bytes.data(), dt, w.values.data(), DType::kF32, n * k);
  w.view = WeightView{w.bytes.data(), dt, n, k};
  return w;
}

std::string isa_label(Isa isa) { return std::string(isa_name(isa)); }

// ---------------------------------------------------------------------------------------------
TEST(Dispatch, ActiveIsaIsSupported) {
  EXPECT_TRUE(isa_supported(active_isa()));
  EXPECT_TRUE(isa_supported(Isa::kScalar));
  EXPECT_LE(static_cast<int>(active_isa()), static_cast<int>(detected_isa()));
  EXPECT_EQ(isa_name(Isa::kAvx512Bf16), "avx512bf16");
  std::printf("detected %s, active %s\n", isa_label(detected_isa()).c_str(),
              isa_label(active_isa()).c_str());
}

TEST(ThreadPool, CoversEveryIndexOnceWithFixedRanges) {
  for (int threads : {1, 2, 3, 5}) {
    ThreadPool pool(threads);
    EXPECT_EQ(pool.num_threads(), threads);
    for (std::int64_t n : {0, 1, 2, 3, 7, 100, 1001}) {
      std::vector<std::atomic<int>> hits(static_cast<std::size_t>(n));
      std::vector<std::pair<std::int64_t, std::int64_t>> ranges(static_cast<std::size_t>(threads),
                                                                {-1, -1});
      std::atomic<int> calls{0};
      pool.parallel_for(n, [&](std::int64_t b, std::int64_t e) {
        calls.fetch_add(1);
        for (std::int64_t i = b; i < e; ++i) hits[static_cast<std::size_t>(i)].fetch_add(1);
      });
      for (std::int64_t i = 0; i < n; ++i) EXPECT_EQ(hits[static_cast<std::size_t>(i)].load(), 1);
      EXPECT_LE(calls.load(), threads);
    }
  }
}

TEST(ThreadPool, ManyShortJobs) {
  ThreadPool pool(3);
  std::vector<std::int64_t> sums(3, 0);
  std::int64_t total = 0;
  for (int rep = 0; rep < 2000; ++rep) {
    std::vector<std::int64_t> part(3, 0);
    pool.parallel_for(3, [&](std::int64_t b, std::int64_t e) {
      for (std::int64_t i = b; i < e; ++i) part[static_cast<std::size_t>(i)] += rep + i;
    });
    total += part[0] + part[1] + part[2];
  }
  EXPECT_EQ(total, 3 * (1999 * 2000 / 2) + 2000 * 3);
}

TEST(ThreadPool, JobsAfterLongGapsAndLongPartsStillComplete) {
  // Gaps between jobs, and a worker's part, far longer than the pool's spin before blocking
  // (2000 pauses, tens of microseconds): the workers block on the condition variable between
  // jobs and the caller blocks waiting for them, and each blocked side must be woken (a lost
  // wake-up would hang here).
  ThreadPool pool(3);
  const std::thread::id caller = std::this_thread::get_id();
  for (int rep = 0; rep < 6; ++rep) {
    std::this_thread::sleep_for(std::chrono::milliseconds(2));  // workers go to sleep
    std::vector<std::atomic<int>> hits(9);
    std::atomic<int> worker_parts{0};
    pool.parallel_for(9, [&](std::int64_t b, std::int64_t e) {
      if (std::this_thread::get_id() != caller) {
        worker_parts.fetch_add(1);
        // Odd reps: the workers outlast the caller's spin, so it blocks too.
        if (rep % 2 == 1) std::this_thread::sleep_for(std::chrono::milliseconds(2));
      }
      for (std::int64_t i = b; i < e; ++i) hits[static_cast<std::size_t>(i)].fetch_add(1);
    });
    for (int i = 0; i < 9; ++i) ASSERT_EQ(hits[static_cast<std::size_t>(i)].load(), 1) << "rep " << rep;
    EXPECT_EQ(worker_parts.load(), 2);  // the static split gives each worker a third
  }
}

TEST(ThreadPool, BalancedCoversEveryIndexOnce) {
  for (int threads : {1, 2, 3, 5}) {
    ThreadPool pool(threads);
    for (std::int64_t n : {0, 1, 2, 3, 7, 100, 1001}) {
      for (std::int64_t grain : {1, 3, 64}) {
        std::vector<std::atomic<int>> hits(static_cast<std::size_t>(n));
        pool.parallel_for_balanced(n, grain, [&](std::int64_t b, std::int64_t e) {
          EXPECT_LT(b, e);
          if (threads > 1) {
            EXPECT_LE(e - b, grain);  // one thread: a single fn(0, n)
          }
          for (std::int64_t i = b; i < e; ++i) hits[static_cast<std::size_t>(i)].fetch_add(1);
        });
        for (std::int64_t i = 0; i < n; ++i) {
          ASSERT_EQ(hits[static_cast<std::size_t>(i)].load(), 1)
              << "threads " << threads << " n " << n << " grain " << grain << " index " << i;
        }
      }
    }
  }
}

TEST(ThreadPool, BalancedMovesWorkAwayFromASlowThread) {
  // The caller (thread 0) is held up on its first chunk; the other threads must take the rest of
  // its range from the back, so the caller itself runs only a few chunks.
  ThreadPool pool(3);
  const std::int64_t n = 300;
  const std::thread::id caller = std::this_thread::get_id();
  std::vector<std::atomic<int>> hits(static_cast<std::size_t>(n));
  std::atomic<int> caller_chunks{0};
  std::atomic<bool> first{true};
  pool.parallel_for_balanced(n, 1, [&](std::int64_t b, std::int64_t e) {
    if (std::this_thread::get_id() == caller) {
      caller_chunks.fetch_add(1);
      if (first.exchange(false)) std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
    for (std::int64_t i = b; i < e; ++i) hits[static_cast<std::size_t>(i)].fetch_add(1);
  });
  for (std::int64_t i = 0; i < n; ++i) ASSERT_EQ(hits[static_cast<std::size_t>(i)].load(), 1);
  EXPECT_LT(caller_chunks.load(), 10);  // a static split would have given it 100
}

TEST(ThreadPool, BalancedAndStaticJobsInterleave) {
  ThreadPool pool(2);
  std::int64_t total = 0;
  for (int rep = 0; rep < 1000; ++rep) {
    std::vector<std::int64_t> part(64, 0);
    auto fn = [&](std::int64_t b, std::int64_t e) {
      for (std::int64_t i = b; i < e; ++i) part[static_cast<std::size_t>(i)] = rep + i;
    };
    if (rep % 2 == 0) {
      pool.parallel_for(64, fn);
    } else {
      pool.parallel_for_balanced(64, 1 + rep % 5, fn);
    }
    total += std::accumulate(part.begin(), part.end(), std::int64_t{0});
  }
  EXPECT_EQ(total, 64 * (999 * 1000 / 2) + 1000 * (63 * 64 / 2));
}

// ---------------------------------------------------------------------------------------------
// linear

void reference_linear(const std::vector<float>& x, std::int64_t M, const TestWeight& w,
                      const float* bias, std::vector<double>* y, std::vector<double>* mag) {
  const std::int64_t N = w.view.rows, K = w.view.cols;
  y->assign(static_cast<std::size_t>(M * N), 0.0);
  mag->assign(static_cast<std::size_t>(M * N), 0.0);
  for (std::int64_t m = 0; m < M; ++m) {
    for (std::int64_t n = 0; n < N; ++n) {
      double s = bias ? bias[n] : 0.0, a = bias ? std::fabs(bias[n]) : 0.0;
      for (std::int64_t k = 0; k < K; ++k) {
        const double p = static_cast<double>(x[static_cast<std::size_t>(m * K + k)]) *
                         w.values[static_cast<std::size_t>(n * K + k)];
        s += p;
        a += std::fabs(p);
      }
      (*y)[static_cast<std::size_t>(m * N + n)] = s;
      (*mag)[static_cast<std::size_t>(m * N + n)] = a;
    }
  }
}

TEST(Linear, MatchesDoubleReferenceOnEveryIsaAndDtype) {
  ThreadPool pool(2);
  struct Shape {
    std::int64_t m, n, k;
  };
  const Shape shapes[] = {{1, 1, 1}, {1, 5, 15}, {3, 7, 17}, {7, 33, 100}, {13, 26, 257},
                          {8, 40, 64}};
  std::uint32_t seed = 1;
  for (Isa isa : supported_isas()) {
    for (DType dt : {DType::kF32, DType::kF16, DType::kBF16}) {
      for (const Shape& s : shapes) {
        for (bool with_bias : {false, true}) {
          SCOPED_TRACE(isa_label(isa) + " " + std::string(dtype_name(dt)) + " M=" +
                       std::to_string(s.m) + " N=" + std::to_string(s.n) +
                       " K=" + std::to_string(s.k) + (with_bias ? " bias" : ""));
          const TestWeight w = make_weight(s.n, s.k, dt, ++seed);
          const std::vector<float> x = random_floats(s.m * s.k, ++seed);
          const std::vector<float> bias = random_floats(s.n, ++seed);
          std::vector<float> y(static_cast<std::size_t>(s.m * s.n), -7.0f);
          linear(isa, x.data(), s.m, w.view, with_bias ? bias.data() : nullptr, y.data(), &pool);
          std::vector<double> ref, mag;
          reference_linear(x, s.m, w, with_bias ? bias.data() : nullptr, &ref, &mag);
          for (std::size_t i = 0; i < y.size(); ++i) {
            ASSERT_NEAR(y[i], ref[i], 1e-6 * mag[i] + 1e-30) << "element " << i;
          }
        }
      }
    }
  }
}

TEST(Linear, BatchInvariantAcrossBatchSizeTilingAndThreads) {
  // K = 100 is not a multiple of 8 or 16: exercises the tail in every path.
  const std::int64_t N = 70, K = 100, kMaxM = 512;
  const std::vector<float> x = random_floats(kMaxM * K, 42);
  const std::vector<float> bias = random_floats(N, 43);
  std::vector<ThreadPool*> pools;
  ThreadPool p1(1), p2(2), p3(3);
  for (Isa isa : supported_isas()) {
    for (DType dt : {DType::kBF16, DType::kF32, DType::kF16}) {
      SCOPED_TRACE(isa_label(isa) + " " + std::string(dtype_name(dt)));
      const TestWeight w = make_weight(N, K, dt, 44);
      // Reference: every row computed alone (the decode / GEMV path), no pool.
      std::vector<float> single(static_cast<std::size_t>(kMaxM * N));
      for (std::int64_t r = 0; r < kMaxM; ++r) {
        linear(isa, x.data() + r * K, 1, w.view, bias.data(), single.data() + r * N, nullptr);
      }
      for (ThreadPool* pool : {&p1, &p2, &p3}) {
        for (std::int64_t M : {std::int64_t{37}, kMaxM}) {
          // Rows 0..M-1 and, shifted, rows 5..5+M-1 (a row lands in a different tile slot).
          for (std::int64_t offset : {std::int64_t{0}, std::int64_t{5}}) {
            if (offset + M > kMaxM) continue;
            std::vector<float> y(static_cast<std::size_t>(M * N));
            linear(isa, x.data() + offset * K, M, w.view, bias.data(), y.data(), pool);
            ASSERT_EQ(0, std::memcmp(y.data(), single.data() + offset * N, y.size() * sizeof(float)))
                << "threads=" << pool->num_threads() << " M=" << M << " offset=" << offset;
          }
        }
      }
    }
  }
}

TEST(Linear, LargeBf16ShapeThreadsAgree) {
  // A realistic MLP shape on the active ISA: 1 vs 2 vs 3 threads, M = 1 vs 8 vs 61.
  const std::int64_t N = 2816, K = 1024;
  const TestWeight w = make_weight(N, K, DType::kBF16, 7);
  const std::vector<float> x = random_floats(61 * K, 8);
  ThreadPool p1(1), p2(2), p3(3);
  std::vector<float> ref(static_cast<std::size_t>(61 * N));
  linear(x.data(), 61, w.view, nullptr, ref.data(), &p1);
  for (ThreadPool* pool : {&p2, &p3}) {
    std::vector<float> y(ref.size());
    linear(x.data(), 61, w.view, nullptr, y.data(), pool);
    EXPECT_EQ(0, std::memcmp(y.data(), ref.data(), y.size() * sizeof(float)));
    for (std::int64_t m : {std::int64_t{1}, std::int64_t{8}}) {
      std::vector<float> y1(static_cast<std::size_t>(m * N));
      linear(x.data() + 50 * K, m, w.view, nullptr, y1.data(), pool);
      EXPECT_EQ(0, std::memcmp(y1.data(), ref.data() + 50 * N, y1.size() * sizeof(float)));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// linear over kPanelPairs weights (the GEMM layout)

// A bf16 weight in both layouts: `row_major` (with the exact f32 values) and `panels`.
struct PackedWeight {
  TestWeight row_major;
  std::vector<std::uint8_t> packed;
  WeightView view;
};

PackedWeight pack(TestWeight row_major, WeightLayout layout = WeightLayout::kPanelPairs) {
  PackedWeight p;
  p.row_major = std::move(row_major);
  const std::int64_t n = p.row_major.view.rows, k = p.row_major.view.cols;
  p.packed.resize(static_cast<std::size_t>(panel_pairs_bytes(n, k)));
  pack_panel_pairs(p.row_major.bytes.data(), n, k, p.packed.data(), layout);
  p.view = WeightView{p.packed.data(), DType::kBF16, n, k, layout};
  return p;
}

PackedWeight make_packed(std::int64_t n, std::int64_t k, std::uint32_t seed,
                         WeightLayout layout = WeightLayout::kPanelPairs) {
  return pack(make_weight(n, k, DType::kBF16, seed), layout);
}

// The AMX GEMM's weights.
PackedWeight make_packed_amx(std::int64_t n, std::int64_t k, std::uint32_t seed) {
  return make_packed(n, k, seed, gemm_weight_layout(GemmActivations::kAmx));
}

TEST(PanelPairs, PackRoundTripsEveryRow) {
  EXPECT_TRUE(panel_pairs_supported(DType::kBF16, 8, 7));  // odd K: padded with a zero
  EXPECT_FALSE(panel_pairs_supported(DType::kF16, 8, 8));
  EXPECT_TRUE(panel_pairs_supported(DType::kBF16, 8, 8));
  EXPECT_EQ(panel_pairs_bytes(8, 8), 8 * 8 * 2);
  EXPECT_EQ(panel_pairs_bytes(8, 7), 8 * 8 * 2);
  struct Shape {
    std::int64_t n, k;
  };
  for (const Shape s : {Shape{1, 2}, Shape{63, 10}, Shape{64, 130}, Shape{130, 36}, Shape{200, 64},
                        Shape{1, 1}, Shape{70, 33}}) {
    for (WeightLayout layout : {WeightLayout::kPanelPairs, WeightLayout::kNarrowPanelPairs}) {
      SCOPED_TRACE("N=" + std::to_string(s.n) + " K=" + std::to_string(s.k) + " layout " +
                   std::to_string(static_cast<int>(layout)));
      const PackedWeight w = make_packed(s.n, s.k, 11, layout);
      // The packed bytes are a permutation (plus a zero per row for an odd K).
      if (s.k % 2 == 0) {
        EXPECT_EQ(w.packed.size(), w.row_major.bytes.size());
      }
      std::vector<float> row(static_cast<std::size_t>(s.k));
      for (std::int64_t n = 0; n < s.n; ++n) {
        unpack_panel_pairs_row(w.packed.data(), s.n, s.k, n, row.data(), layout);
        ASSERT_EQ(0, std::memcmp(row.data(), w.row_major.values.data() + n * s.k, row.size() * 4)) << "row " << n;
      }
    }
  }
}

// kNarrowPanelPairs is kPanelPairs with 16-column panels: W[n][k] of a full narrow panel at
// element 16 p Kp + ((k / 2) 16 + n - 16 p) 2 + k % 2, so 16 k pairs of one panel (an AMX B tile)
// are 1 KiB in a row; and 64 rows' bytes hold exactly their 4 panels, as in kPanelPairs (model
// loading packs 64 rows at a time in place).
TEST(PanelPairs, NarrowLayoutAddressesAndRowBlocks) {
  EXPECT_EQ(panel_cols(WeightLayout::kPanelPairs), 64);
  EXPECT_EQ(panel_cols(WeightLayout::kNarrowPanelPairs), 16);
  EXPECT_EQ(gemm_weight_layout(GemmActivations::kAmx), WeightLayout::kNarrowPanelPairs);
  EXPECT_EQ(gemm_weight_layout(GemmActivations::kF32), WeightLayout::kPanelPairs);
  EXPECT_EQ(gemm_weight_layout(GemmActivations::kBf16), WeightLayout::kPanelPairs);
  const std::int64_t N = 150, K = 40;
  const PackedWeight w = make_packed(N, K, 12, WeightLayout::kNarrowPanelPairs);
  const auto* p = reinterpret_cast<const std::uint16_t*>(w.packed.data());
  const auto* src = reinterpret_cast<const std::uint16_t*>(w.row_major.bytes.data());
  for (std::int64_t n = 0; n < 144; ++n) {  // the full narrow panels
    for (std::int64_t k = 0; k < K; ++k) {
      const std::int64_t p0 = n / 16 * 16;
      ASSERT_EQ(p[p0 * K + ((k / 2) * 16 + n - p0) * 2 + k % 2], src[n * K + k]) << n << " " << k;
    }
  }
  std::vector<std::uint16_t> block(static_cast<std::size_t>(64 * K));
  for (std::int64_t r0 = 0; r0 < N; r0 += 64) {
    const std::int64_t rows = std::min<std::int64_t>(64, N - r0);
    pack_panel_pairs(src + r0 * K, rows, K, block.data(), WeightLayout::kNarrowPanelPairs);
    ASSERT_EQ(0, std::memcmp(block.data(), p + r0 * K, static_cast<std::size_t>(rows * K * 2))) << r0;
  }
}

// The kPanelPairs GEMM's arithmetic written out independently of the kernels (kernels.h,
// vdpbf16ps per the Intel SDM): x rounded to bf16 (subnormal f32 read as zero), per k pair the
// odd k then the even k, each a fused multiply-add rounded to nearest even with subnormal
// inputs read as zero and a result whose exact value is below 2^-126 flushed to a signed zero.
float daz(float v) { return std::fpclassify(v) == FP_SUBNORMAL ? std::copysign(0.0f, v) : v; }

float act_bf16(float v) {
  v = daz(v);
  return bf16_to_f32(f32_to_bf16(v));
}

float dot_step(float acc, float a, float b) {
  a = daz(a);
  b = daz(b);
  acc = daz(acc);
  const float r = std::fma(a, b, acc);
  const double exact = static_cast<double>(acc) + static_cast<double>(a) * static_cast<double>(b);
  if (std::fabs(r) < 0x1p-126f || (std::fabs(r) == 0x1p-126f && std::fabs(exact) < 0x1p-126)) {
    return std::copysign(0.0f, r);
  }
  return r;
}

// kF32: the same chain with exact f32 activations and plain fused multiply-adds.
std::vector<float> panel_reference(GemmActivations act, const std::vector<float>& x, std::int64_t M,
                                   const TestWeight& w, const float* bias, const std::vector<float>* y0) {
  const bool bf16 = act == GemmActivations::kBf16;
  auto step = [bf16](float acc, float a, float b) { return bf16 ? dot_step(acc, a, b) : std::fma(a, b, acc); };
  auto act_value = [bf16](float v) { return bf16 ? act_bf16(v) : v; };
  const std::int64_t N = w.view.rows, K = w.view.cols;
  std::vector<float> y(static_cast<std::size_t>(M * N));
  for (std::int64_t m = 0; m < M; ++m) {
    for (std::int64_t n = 0; n < N; ++n) {
      float acc = 0.0f;
      for (std::int64_t k = 0; k < K; k += 2) {
        const float* wr = w.values.data() + n * K;
        const float* xr = x.data() + m * K;
        const float xo = k + 1 < K ? act_value(xr[k + 1]) : 0.0f;
        const float wo = k + 1 < K ? wr[k + 1] : 0.0f;
        acc = step(acc, xo, wo);
        acc = step(acc, act_value(xr[k]), wr[k]);
      }
      if (bias != nullptr) acc = acc + bias[n];
      if (y0 != nullptr) acc = (*y0)[static_cast<std::size_t>(m * N + n)] + acc;
      y[static_cast<std::size_t>(m * N + n)] = acc;
    }
  }
  return y;
}

const GemmActivations kBothActivations[] = {GemmActivations::kF32, GemmActivations::kBf16};

std::string act_label(GemmActivations act) { return " act=" + std::string(gemm_activations_name(act)); }

TEST(PanelPairs, LinearMatchesDoubleReferenceOnEveryIsa) {
  // Against a double-precision dot product of the activations the GEMM multiplies (f32, or
  // rounded to bf16): the f32 chain's rounding only.
  ThreadPool pool(2);
  struct Shape {
    std::int64_t m, n, k;
  };
  // N = 1, 17, 70, 130: narrow and partial panels and partial vectors; K = 258, 300 cross the
  // 128-step k blocks; M >= 36 takes the widened path on every FMA ISA; K = 301 is odd.
  const Shape shapes[] = {{1, 1, 2},     {1, 17, 36},   {3, 64, 258},  {5, 70, 300},
                          {12, 130, 64}, {13, 17, 258}, {40, 130, 300}, {2, 200, 1024},
                          {37, 17, 258}, {9, 33, 301}};
  std::uint32_t seed = 100;
  for (GemmActivations act : kBothActivations) {
    for (Isa isa : supported_isas()) {
      for (const Shape& s : shapes) {
        for (bool with_bias : {false, true}) {
          SCOPED_TRACE(isa_label(isa) + act_label(act) + " M=" + std::to_string(s.m) + " N=" +
                       std::to_string(s.n) + " K=" + std::to_string(s.k) + (with_bias ? " bias" : ""));
          const PackedWeight w = make_packed(s.n, s.k, ++seed);
          const std::vector<float> x = random_floats(s.m * s.k, ++seed);
          const std::vector<float> bias = random_floats(s.n, ++seed);
          std::vector<float> y(static_cast<std::size_t>(s.m * s.n), -7.0f);
          linear(isa, x.data(), s.m, w.view, with_bias ? bias.data() : nullptr, y.data(), &pool, act);
          std::vector<float> xr(x.size());
          for (std::size_t i = 0; i < x.size(); ++i) xr[i] = act == GemmActivations::kBf16 ? act_bf16(x[i]) : x[i];
          std::vector<double> ref, mag;
          reference_linear(xr, s.m, w.row_major, with_bias ? bias.data() : nullptr, &ref, &mag);
          for (std::size_t i = 0; i < y.size(); ++i) {
            ASSERT_NEAR(y[i], ref[i], 1e-6 * mag[i] + 1e-30) << "element " << i;
          }
          // bf16 activations cost what bf16 rounding costs against the f32 ones (2^-9 relative).
          reference_linear(x, s.m, w.row_major, with_bias ? bias.data() : nullptr, &ref, &mag);
          for (std::size_t i = 0; i < y.size(); ++i) {
            ASSERT_NEAR(y[i], ref[i], 4e-3 * mag[i] + 1e-30) << "element " << i;
          }
        }
      }
    }
  }
}

// Every ISA gives the same bits as the written-out arithmetic above, for bf16 activations
// (vdpbf16ps, the AVX-512 and AVX2 FMA emulations under DAZ|FTZ, the scalar double emulation) and
// f32 ones (FMA, libm's fmaf), on random shapes with odd K, N tails, every tile path, 1 and 2
// threads, linear_add, and values whose products and sums reach the subnormal range.
TEST(PanelPairs, EveryIsaBitExactToWrittenOutArithmetic) {
  std::mt19937 rng(2024);
  ThreadPool pool(2);
  std::uniform_int_distribution<int> pick_m(1, 60), pick_n(1, 200), pick_k(1, 400);
  for (int trial = 0; trial < 24; ++trial) {
    const std::int64_t M = trial < 3 ? trial + 1 : pick_m(rng);
    const std::int64_t N = pick_n(rng);
    const std::int64_t K = trial % 2 == 0 ? pick_k(rng) | 1 : pick_k(rng);  // half of them odd
    // scale: 0 plain values; 1 exponents spread over +-24; 2 products near 2^-126 (subnormal
    // sums, flushed), with some subnormal activations.
    const int scale = trial % 3;
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::uniform_int_distribution<int> ex(-24, 24);
    auto value = [&](bool activation) {
      float v = nd(rng);
      if (scale == 1) v = std::ldexp(v, ex(rng));
      if (scale == 2) {
        v = std::ldexp(v, -63 + (ex(rng) % 4));
        if (activation && rng() % 8 == 0) v = std::ldexp(nd(rng), -130);  // subnormal f32
      }
      return v;
    };
    TestWeight w;
    w.values.resize(static_cast<std::size_t>(N * K));
    w.bytes.resize(static_cast<std::size_t>(N * K * 2));
    for (std::size_t i = 0; i < w.values.size(); ++i) {
      const std::uint16_t h = f32_to_bf16(value(false));
      std::memcpy(w.bytes.data() + 2 * i, &h, 2);
      w.values[i] = bf16_to_f32(h);
    }
    w.view = WeightView{w.bytes.data(), DType::kBF16, N, K};
    const PackedWeight pw = pack(std::move(w));
    std::vector<float> x(static_cast<std::size_t>(M * K));
    for (auto& v : x) v = value(true);
    std::vector<float> bias(static_cast<std::size_t>(N));
    for (auto& v : bias) v = scale == 2 ? 0.0f : nd(rng);
    std::vector<float> y0(static_cast<std::size_t>(M * N));
    for (auto& v : y0) v = scale == 2 ? 0.0f : nd(rng);
    for (GemmActivations act : kBothActivations) {
      const std::vector<float> expected = panel_reference(act, x, M, pw.row_major, bias.data(), nullptr);
      const std::vector<float> expected_add = panel_reference(act, x, M, pw.row_major, nullptr, &y0);
      for (Isa isa : supported_isas()) {
        SCOPED_TRACE(isa_label(isa) + act_label(act) + " M=" + std::to_string(M) + " N=" +
                     std::to_string(N) + " K=" + std::to_string(K) + " scale " + std::to_string(scale));
        for (ThreadPool* p : {static_cast<ThreadPool*>(nullptr), &pool}) {
          std::vector<float> y(expected.size(), -7.0f);
          linear(isa, x.data(), M, pw.view, bias.data(), y.data(), p, act);
          for (std::size_t i = 0; i < y.size(); ++i) {
            ASSERT_EQ(std::bit_cast<std::uint32_t>(y[i]), std::bit_cast<std::uint32_t>(expected[i]))
                << "element " << i << ": " << y[i] << " vs " << expected[i];
          }
          std::vector<float> ya = y0;
          linear_add(isa, x.data(), M, pw.view, ya.data(), p, act);
          ASSERT_EQ(0, std::memcmp(ya.data(), expected_add.data(), ya.size() * sizeof(float)));
        }
      }
    }
  }
}

TEST(PanelPairs, BatchInvariantAcrossBatchSizeTilingAndThreads) {
  // N = 130: two full panels and a 2-column one; K = 300: three widened k blocks, the last
  // partial. M = 2, 3, 8 take the direct tiles, 37 and 512 the widened ones.
  const std::int64_t N = 130, K = 300, kMaxM = 512;
  const std::vector<float> x = random_floats(kMaxM * K, 52);
  const std::vector<float> bias = random_floats(N, 53);
  const PackedWeight w = make_packed(N, K, 54);
  ThreadPool p1(1), p2(2), p3(3);
  for (GemmActivations act : kBothActivations) {
  for (Isa isa : supported_isas()) {
    SCOPED_TRACE(isa_label(isa) + act_label(act));
    std::vector<float> single(static_cast<std::size_t>(kMaxM * N));
    for (std::int64_t r = 0; r < kMaxM; ++r) {
      linear(isa, x.data() + r * K, 1, w.view, bias.data(), single.data() + r * N, nullptr, act);
    }
    for (ThreadPool* pool : {&p1, &p2, &p3}) {
      for (std::int64_t M : {std::int64_t{2}, std::int64_t{3}, std::int64_t{8}, std::int64_t{37}, kMaxM}) {
        for (std::int64_t offset : {std::int64_t{0}, std::int64_t{5}}) {
          if (offset + M > kMaxM) continue;
          std::vector<float> y(static_cast<std::size_t>(M * N));
          linear(isa, x.data() + offset * K, M, w.view, bias.data(), y.data(), pool, act);
          ASSERT_EQ(0, std::memcmp(y.data(), single.data() + offset * N, y.size() * sizeof(float)))
              << "threads=" << pool->num_threads() << " M=" << M << " offset=" << offset;
        }
      }
    }
  }
  }
}

// GemmActivations::kAmx (kernels_amx.cc): the hardware's sums, so no bit-exact reference; it
// must be as close to the double-precision dot product of the bf16-rounded activations as an
// f32 chain is, and it must keep the batch-invariance contract on its own: every row the same
// bits whatever M (1 .. 512: one and two row tiles, partial tiles), the neighbouring rows' values,
// the thread count and the claim split; linear_add the same bits as y0 + linear.
bool amx_runs() { return gemm_activations_supported(GemmActivations::kAmx); }

TEST(PanelPairsAmx, LinearMatchesDoubleReference) {
  if (!amx_runs()) GTEST_SKIP() << "no AMX-BF16 here";
  ThreadPool pool(2);
  struct Shape {
    std::int64_t m, n, k;
  };
  // K = 2, 36, 301: partial and odd k blocks; N = 1, 17, 70, 130: narrow panels and groups;
  // K = 1024 and 2048 run full blocks; M = 1 .. 100 one and two row tiles.
  const Shape shapes[] = {{1, 1, 2},      {1, 17, 36},   {3, 64, 258},  {5, 70, 300},  {12, 130, 64},
                          {13, 17, 258},  {40, 130, 300}, {2, 200, 1024}, {37, 17, 258}, {9, 33, 301},
                          {100, 192, 2048}, {16, 256, 1024}, {17, 64, 1024}};
  std::uint32_t seed = 500;
  for (const Shape& s : shapes) {
    for (bool with_bias : {false, true}) {
      SCOPED_TRACE(" M=" + std::to_string(s.m) + " N=" + std::to_string(s.n) + " K=" + std::to_string(s.k) +
                   (with_bias ? " bias" : ""));
      const PackedWeight w = make_packed_amx(s.n, s.k, ++seed);
      const std::vector<float> x = random_floats(s.m * s.k, ++seed);
      const std::vector<float> bias = random_floats(s.n, ++seed);
      std::vector<float> y(static_cast<std::size_t>(s.m * s.n), -7.0f);
      linear(Isa::kAvx512Bf16, x.data(), s.m, w.view, with_bias ? bias.data() : nullptr, y.data(), &pool,
             GemmActivations::kAmx);
      std::vector<float> xr(x.size());
      for (std::size_t i = 0; i < x.size(); ++i) xr[i] = act_bf16(x[i]);
      std::vector<double> ref, mag;
      reference_linear(xr, s.m, w.row_major, with_bias ? bias.data() : nullptr, &ref, &mag);
      for (std::size_t i = 0; i < y.size(); ++i) {
        ASSERT_NEAR(y[i], ref[i], 2e-6 * mag[i] + 1e-30) << "element " << i;
      }
    }
  }
}

// The AMX table rounds activations to bf16 with vector code (vcvtneps2bf16 after flushing
// subnormals) for whole 16-element runs and act_to_bf16 for the rest: through an identity weight
// (y[m][n] = x[m][n] x 1, every other product 0) each output is the rounded activation itself,
// which must be act_to_bf16's bits in both parts (ties to even, subnormals to signed zero).
TEST(PanelPairsAmx, ActivationRoundingIsActToBf16) {
  if (!amx_runs()) GTEST_SKIP() << "no AMX-BF16 here";
  const std::int64_t M = 20, K = 40;  // columns 0-31 in vector runs, 32-39 scalar
  std::mt19937 rng(77);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::uniform_int_distribution<int> ex(-60, 60);
  std::vector<float> x(static_cast<std::size_t>(M * K));
  for (std::size_t i = 0; i < x.size(); ++i) {
    float v = std::ldexp(nd(rng), ex(rng));
    std::uint32_t u = std::bit_cast<std::uint32_t>(v);
    switch (i % 5) {
      case 1: u = (u & 0xffff0000u) | 0x8000u; break;                      // a tie
      case 2: u &= 0x807fffffu; break;                                      // subnormal
      default: break;
    }
    x[i] = std::bit_cast<float>(u);
  }
  TestWeight w;
  w.values.assign(static_cast<std::size_t>(K * K), 0.0f);
  w.bytes.assign(static_cast<std::size_t>(K * K * 2), 0);
  for (std::int64_t n = 0; n < K; ++n) {
    const std::uint16_t one = f32_to_bf16(1.0f);
    std::memcpy(w.bytes.data() + 2 * (n * K + n), &one, 2);
    w.values[static_cast<std::size_t>(n * K + n)] = 1.0f;
  }
  w.view = WeightView{w.bytes.data(), DType::kBF16, K, K};
  const PackedWeight pw = pack(std::move(w), gemm_weight_layout(GemmActivations::kAmx));
  std::vector<float> y(static_cast<std::size_t>(M * K));
  linear(Isa::kAvx512Bf16, x.data(), M, pw.view, nullptr, y.data(), nullptr, GemmActivations::kAmx);
  for (std::size_t i = 0; i < y.size(); ++i) {
    // +0 and -0 both sum to +0 with the zero products; compare values for zeros, bits otherwise.
    const float want = act_bf16(x[i]);
    if (want == 0.0f) {
      ASSERT_EQ(y[i], 0.0f) << "element " << i;
    } else {
      ASSERT_EQ(std::bit_cast<std::uint32_t>(y[i]), std::bit_cast<std::uint32_t>(want))
          << "element " << i << ": x " << x[i] << " -> " << y[i] << ", act_to_bf16 " << want;
    }
  }
}

TEST(PanelPairsAmx, BatchInvariantAcrossBatchSizeNeighboursAndThreads) {
  if (!amx_runs()) GTEST_SKIP() << "no AMX-BF16 here";
  // K = 4000: 500 and 512 rows of packed activations (4 MB) exceed an L2 and run in row blocks.
  for (const std::int64_t K : {300, 301, 1024, 4000}) {
    const std::int64_t N = 5 * kPanelCols + 7, kMaxM = 512;
    const PackedWeight w = make_packed_amx(N, K, 60 + static_cast<std::uint32_t>(K));
    const std::vector<float> x = random_floats(kMaxM * K, 61);
    const std::vector<float> other = random_floats(kMaxM * K, 62, -50.0f, 50.0f);
    const std::vector<float> bias = random_floats(N, 63);
    const std::vector<float> y0 = random_floats(kMaxM * N, 64);
    ThreadPool p2(2), p3(3);
    std::vector<float> single(static_cast<std::size_t>(kMaxM * N));
    for (std::int64_t r = 0; r < kMaxM; ++r) {
      linear(Isa::kAvx512Bf16, x.data() + r * K, 1, w.view, bias.data(), single.data() + r * N, nullptr,
             GemmActivations::kAmx);
    }
    for (std::int64_t M : {2, 3, 15, 16, 17, 31, 32, 33, 37, 100, 500, 512}) {
      for (ThreadPool* pool : {static_cast<ThreadPool*>(nullptr), &p2, &p3}) {
        SCOPED_TRACE("K=" + std::to_string(K) + " M=" + std::to_string(M) + " threads " +
                     std::to_string(pool ? pool->num_threads() : 1));
        // Row 0 of the call is the row under test (x row `first`); the others are foreign rows
        // of much larger magnitude.
        const std::int64_t first = (M * 7) % kMaxM;
        std::vector<float> xm(other.begin(), other.begin() + M * K);
        std::copy(x.begin() + first * K, x.begin() + (first + 1) * K, xm.begin());
        std::vector<float> y(static_cast<std::size_t>(M * N));
        linear(Isa::kAvx512Bf16, xm.data(), M, w.view, bias.data(), y.data(), pool, GemmActivations::kAmx);
        ASSERT_EQ(0, std::memcmp(y.data(), single.data() + first * N, N * sizeof(float)));
        // The whole batch from x: every row the same bits as alone.
        std::vector<float> yb(static_cast<std::size_t>(M * N));
        linear(Isa::kAvx512Bf16, x.data(), M, w.view, bias.data(), yb.data(), pool, GemmActivations::kAmx);
        ASSERT_EQ(0, std::memcmp(yb.data(), single.data(), yb.size() * sizeof(float)));
        // linear_add: y0 + (the dot product, rounded to f32 first).
        std::vector<float> plain(static_cast<std::size_t>(M * N));
        linear(Isa::kAvx512Bf16, x.data(), M, w.view, nullptr, plain.data(), pool, GemmActivations::kAmx);
        std::vector<float> ya(y0.begin(), y0.begin() + M * N);
        linear_add(Isa::kAvx512Bf16, x.data(), M, w.view, ya.data(), pool, GemmActivations::kAmx);
        for (std::size_t i = 0; i < ya.size(); ++i) {
          ASSERT_EQ(std::bit_cast<std::uint32_t>(ya[i]), std::bit_cast<std::uint32_t>(y0[i] + plain[i])) << i;
        }
      }
    }
  }
}

// What linear_silu_mul must give: linear into [M][2F], then silu_mul of each row's gate and up
// halves.
std::vector<float> linear_then_silu_mul(Isa isa, const std::vector<float>& x, std::int64_t M, const WeightView& gate_up,
                                        GemmActivations act, ThreadPool* pool) {
  const std::int64_t F = gate_up.rows / 2;
  std::vector<float> products(static_cast<std::size_t>(M * 2 * F));
  std::vector<float> out(static_cast<std::size_t>(M * F));
  linear(isa, x.data(), M, gate_up, nullptr, products.data(), pool, act);
  for (std::int64_t m = 0; m < M; ++m) {
    silu_mul(isa, products.data() + m * 2 * F, products.data() + m * 2 * F + F, F, out.data() + m * F);
  }
  return out;
}

// linear_silu_mul: on the AMX GEMM the epilogue applies silu_mul (the [M][2F] products are never
// written); the result must be the bits of linear followed by silu_mul_rows, for every M (one row
// tile, 2 x 2 passes, row blocks), F (whole units, a narrow last unit, one gate panel), K (a
// partial k block, odd) and thread count. The other tables fuse in the front end (the next test).
TEST(PanelPairsAmx, LinearSiluMulIsLinearThenSiluMul) {
  if (!amx_runs()) GTEST_SKIP() << "no AMX-BF16 here";
  struct Shape {
    std::int64_t F, K;
  };
  ThreadPool p2(2), p3(3);
  std::uint32_t seed = 900;
  for (const Shape sh : {Shape{16, 64}, Shape{48, 301}, Shape{80, 300}, Shape{2 * kPanelCols, 1024}, Shape{96, 4000}}) {
    const PackedWeight w = make_packed_amx(2 * sh.F, sh.K, ++seed);
    ASSERT_TRUE(linear_silu_mul_fuses(w.view, GemmActivations::kAmx));
    for (const std::int64_t M : {1, 2, 15, 16, 17, 32, 33, 100, 500}) {
      if (sh.K == 4000 && M < 100) continue;
      const std::vector<float> x = random_floats(M * sh.K, ++seed, -4.0f, 4.0f);
      for (ThreadPool* pool : {static_cast<ThreadPool*>(nullptr), &p2, &p3}) {
        SCOPED_TRACE("F=" + std::to_string(sh.F) + " K=" + std::to_string(sh.K) + " M=" + std::to_string(M) +
                     " threads " + std::to_string(pool ? pool->num_threads() : 1));
        const std::vector<float> expected = linear_then_silu_mul(Isa::kAvx512Bf16, x, M, w.view, GemmActivations::kAmx, pool);
        // NaN-filled: every output must be written, and the product buffer left alone. The rows
        // start on cache lines (F is a multiple of 16), as a workspace's do, so 17-32 rows take
        // the non-temporal stores.
        std::vector<float> out_buffer(expected.size() + 16, std::numeric_limits<float>::quiet_NaN());
        void* out_start = out_buffer.data();
        std::size_t out_space = out_buffer.size() * sizeof(float);
        float* out = static_cast<float*>(std::align(64, expected.size() * sizeof(float), out_start, out_space));
        ASSERT_NE(out, nullptr);
        std::vector<float> untouched(static_cast<std::size_t>(M * 2 * sh.F), 7.0f);
        linear_silu_mul(Isa::kAvx512Bf16, x.data(), M, w.view, untouched.data(), out, pool, GemmActivations::kAmx);
        ASSERT_EQ(0, std::memcmp(out, expected.data(), expected.size() * sizeof(float)));
        ASSERT_TRUE(std::all_of(untouched.begin(), untouched.end(), [](float v) { return v == 7.0f; }));
      }
    }
  }
  // A half that is not whole narrow panels does not fuse, and runs the two steps.
  const PackedWeight odd = make_packed_amx(2 * 40, 64, 5);
  EXPECT_FALSE(linear_silu_mul_fuses(odd.view, GemmActivations::kAmx));
  const std::vector<float> x = random_floats(3 * 64, 6);
  std::vector<float> gate_up(3 * 80), expected(3 * 40), out(3 * 40);
  linear(Isa::kAvx512Bf16, x.data(), 3, odd.view, nullptr, gate_up.data(), nullptr, GemmActivations::kAmx);
  for (int m = 0; m < 3; ++m) silu_mul(Isa::kAvx512Bf16, &gate_up[m * 80], &gate_up[m * 80 + 40], 40, &expected[m * 40]);
  linear_silu_mul(Isa::kAvx512Bf16, x.data(), 3, odd.view, gate_up.data(), out.data(), nullptr, GemmActivations::kAmx);
  EXPECT_EQ(0, std::memcmp(out.data(), expected.data(), out.size() * sizeof(float)));
}

// The fused linear_silu_mul of the kPanelPairs tables (every ISA, f32 and bf16 activations): each
// unit's gate and up panels run into the thread's scratch and silu_mul writes the output. The
// bits must be those of linear into [M][2F] then silu_mul, for every tile path (1-6 rows: one
// tile; 7-12: two; more: the k-blocked tiles), odd K, 1-3 threads and a caller's LinearScratch.
TEST(PanelPairs, LinearSiluMulFusesOnEveryIsaAndIsLinearThenSiluMul) {
  struct Shape {
    std::int64_t F, K;
  };
  ThreadPool p2(2), p3(3);
  std::uint32_t seed = 1900;
  for (const Shape sh : {Shape{kPanelCols, 64}, Shape{2 * kPanelCols, 301}, Shape{3 * kPanelCols, 300}}) {
    const PackedWeight w = make_packed(2 * sh.F, sh.K, ++seed);
    for (GemmActivations act : kBothActivations) {
      ASSERT_TRUE(linear_silu_mul_fuses(w.view, act));
      for (Isa isa : supported_isas()) {
        for (const std::int64_t M : {1, 3, 6, 7, 12, 13, 40}) {
          const std::vector<float> x = random_floats(M * sh.K, ++seed, -4.0f, 4.0f);
          const std::vector<float> expected = linear_then_silu_mul(isa, x, M, w.view, act, nullptr);
          for (ThreadPool* pool : {static_cast<ThreadPool*>(nullptr), &p2, &p3}) {
            for (bool caller_scratch : {false, true}) {
              const int threads = pool != nullptr ? pool->num_threads() : 1;
              SCOPED_TRACE(isa_label(isa) + act_label(act) + " F=" + std::to_string(sh.F) + " K=" +
                           std::to_string(sh.K) + " M=" + std::to_string(M) + " threads " +
                           std::to_string(threads) + (caller_scratch ? " caller scratch" : ""));
              std::vector<float> scratch_floats(static_cast<std::size_t>(linear_scratch_floats(M, sh.K, threads)), -1.0f);
              const LinearScratch scratch{scratch_floats};
              std::vector<float> out(expected.size(), std::numeric_limits<float>::quiet_NaN());
              linear_silu_mul(isa, x.data(), M, w.view, nullptr, out.data(), pool, act,
                              caller_scratch ? &scratch : nullptr);
              ASSERT_EQ(0, std::memcmp(out.data(), expected.data(), expected.size() * sizeof(float)));
            }
          }
        }
      }
    }
  }
  // A half that is not whole 64-column panels does not fuse: it needs the product buffer.
  const PackedWeight odd = make_packed(2 * 96, 64, 7);
  EXPECT_FALSE(linear_silu_mul_fuses(odd.view, GemmActivations::kBf16));
  EXPECT_FALSE(linear_silu_mul_fuses(odd.view, GemmActivations::kF32));
  const std::vector<float> x = random_floats(3 * 64, 8);
  std::vector<float> gate_up(3 * 192), expected(3 * 96), out(3 * 96);
  linear(x.data(), 3, odd.view, nullptr, gate_up.data(), nullptr);
  silu_mul_rows(gate_up.data(), 3, 96, expected.data(), nullptr);
  linear_silu_mul(x.data(), 3, odd.view, gate_up.data(), out.data(), nullptr);
  EXPECT_EQ(0, std::memcmp(out.data(), expected.data(), out.size() * sizeof(float)));
}

// Each GEMM reads one panel layout (gemm_weight_layout); a weight in the other one is a loud
// error, not a silently wrong product.
TEST(PanelPairsDeathTest, LayoutMustMatchTheActivations) {
  const PackedWeight wide = make_packed(64, 32, 14, WeightLayout::kPanelPairs);
  const PackedWeight narrow = make_packed(64, 32, 14, WeightLayout::kNarrowPanelPairs);
  const std::vector<float> x = random_floats(32, 15);
  std::vector<float> y(64);
  EXPECT_DEATH(linear(Isa::kScalar, x.data(), 1, narrow.view, nullptr, y.data(), nullptr, GemmActivations::kF32),
               "GEMM activations f32 read kPanelPairs");
  EXPECT_DEATH(linear(Isa::kScalar, x.data(), 1, narrow.view, nullptr, y.data(), nullptr, GemmActivations::kBf16),
               "GEMM activations bf16 read kPanelPairs");
  if (amx_runs()) {
    EXPECT_DEATH(linear(Isa::kAvx512Bf16, x.data(), 1, wide.view, nullptr, y.data(), nullptr, GemmActivations::kAmx),
                 "GEMM activations amx read kNarrowPanelPairs");
  }
}

// The decode tiles (kernels/panels_direct.inc): M <= 2 runs up to 4 full panels side by side
// (N = 5 full panels + a 7-column tail, so groups of 4, 2 and 1 and the tail all occur, also
// inside the 4-panel claims of 2 and 3 threads), more rows run the tall tiles (odd K = 301).
// Every row is bit for bit the written-out arithmetic, for every ISA, thread count and M.
TEST(PanelPairs, DecodeTilesBitExactAcrossPanelGroups) {
  const std::int64_t N = 5 * kPanelCols + 7, K = 301;
  const PackedWeight w = make_packed(N, K, 71);
  const std::vector<float> bias = random_floats(N, 72);
  ThreadPool p2(2), p3(3);
  for (std::int64_t M : {1, 2, 3, 4, 5, 8, 9, 16, 32, 35}) {
    const std::vector<float> x = random_floats(M * K, 73 + static_cast<std::uint32_t>(M));
    const std::vector<float> y0 = random_floats(M * N, 90 + static_cast<std::uint32_t>(M));
    for (GemmActivations act : kBothActivations) {
      const std::vector<float> expected = panel_reference(act, x, M, w.row_major, bias.data(), nullptr);
      const std::vector<float> expected_add = panel_reference(act, x, M, w.row_major, nullptr, &y0);
      for (Isa isa : supported_isas()) {
        for (ThreadPool* pool : {static_cast<ThreadPool*>(nullptr), &p2, &p3}) {
          SCOPED_TRACE(isa_label(isa) + act_label(act) + " M=" + std::to_string(M) +
                       " threads=" + std::to_string(pool != nullptr ? pool->num_threads() : 1));
          std::vector<float> y(expected.size(), -7.0f);
          linear(isa, x.data(), M, w.view, bias.data(), y.data(), pool, act);
          for (std::size_t i = 0; i < y.size(); ++i) {
            ASSERT_EQ(std::bit_cast<std::uint32_t>(y[i]), std::bit_cast<std::uint32_t>(expected[i]))
                << "element " << i << " (row " << i / N << ", column " << i % N << ")";
          }
          std::vector<float> ya = y0;
          linear_add(isa, x.data(), M, w.view, ya.data(), pool, act);
          ASSERT_EQ(0, std::memcmp(ya.data(), expected_add.data(), ya.size() * sizeof(float)));
        }
      }
    }
  }
}

TEST(LinearAdd, EqualsLinearThenAddBitForBitInBothLayouts) {
  const std::int64_t N = 130, K = 300;
  const PackedWeight w = make_packed(N, K, 61);
  ThreadPool pool(2);
  for (Isa isa : supported_isas()) {
    for (const WeightView* view : {&w.row_major.view, &w.view}) {
      for (std::int64_t M : {std::int64_t{1}, std::int64_t{37}}) {
        SCOPED_TRACE(isa_label(isa) + (view == &w.view ? " panels" : " row-major") + " M=" + std::to_string(M));
        const std::vector<float> x = random_floats(M * K, 62);
        const std::vector<float> residual = random_floats(M * N, 63, -4.0f, 4.0f);
        std::vector<float> expected(static_cast<std::size_t>(M * N));
        // f32 activations (kPanelPairs); the AMX GEMM's linear_add: PanelPairsAmx.
        linear(isa, x.data(), M, *view, nullptr, expected.data(), &pool, GemmActivations::kF32);
        std::vector<float> sum = residual;
        add_inplace(isa, sum.data(), expected.data(), M * N);
        std::vector<float> fused = residual;
        linear_add(isa, x.data(), M, *view, fused.data(), &pool, GemmActivations::kF32);
        ASSERT_EQ(0, std::memcmp(fused.data(), sum.data(), sum.size() * sizeof(float)));
      }
    }
  }
}

TEST(ThreadPool, CurrentThreadIndexNamesTheThreadRunningFn) {
  EXPECT_EQ(ThreadPool::current_thread_index(), -1);
  for (int threads : {1, 2, 3}) {
    ThreadPool pool(threads);
    // Static split of n = threads: thread t runs exactly index t.
    std::vector<std::atomic<int>> seen(static_cast<std::size_t>(threads));
    for (auto& v : seen) v.store(-2);
    pool.parallel_for(threads, [&](std::int64_t b, std::int64_t e) {
      ASSERT_EQ(e, b + 1);
      seen[static_cast<std::size_t>(b)].store(ThreadPool::current_thread_index());
    });
    for (int t = 0; t < threads; ++t) EXPECT_EQ(seen[static_cast<std::size_t>(t)].load(), t);
    // Balanced: every call sees an index in range, and one index is always one OS thread.
    std::vector<std::atomic<std::size_t>> owner(static_cast<std::size_t>(threads));
    for (auto& o : owner) o.store(0);
    std::atomic<int> bad{0};
    pool.parallel_for_balanced(1000, 3, [&](std::int64_t, std::int64_t) {
      const int t = ThreadPool::current_thread_index();
      if (t < 0 || t >= threads) {
        bad.fetch_add(1);
        return;
      }
      const std::size_t me = std::hash<std::thread::id>{}(std::this_thread::get_id()) | 1;
      std::size_t expected = 0;
      if (!owner[static_cast<std::size_t>(t)].compare_exchange_strong(expected, me) && expected != me) {
        bad.fetch_add(1);
      }
    });
    EXPECT_EQ(bad.load(), 0) << threads << " threads";
    EXPECT_EQ(ThreadPool::current_thread_index(), -1);
  }
}

// A device hands linear its scratch (its workspace); the result must be the fallback's, bit for
// bit, and the fallback must not be touched.
TEST(LinearScratch, ProvidedScratchIsBitIdenticalToTheThreadLocalFallback) {
  ThreadPool p2(2), p3(3);
  for (std::int64_t K : {std::int64_t{300}, std::int64_t{301}}) {
    const std::int64_t N = 130;
    const PackedWeight w = make_packed(N, K, 71);
    const std::vector<float> bias = random_floats(N, 72);
    for (GemmActivations act : kBothActivations) {
      for (Isa isa : supported_isas()) {
        for (ThreadPool* pool : {static_cast<ThreadPool*>(nullptr), &p2, &p3}) {
          const int threads = pool != nullptr ? pool->num_threads() : 1;
          for (std::int64_t M : {std::int64_t{1}, std::int64_t{3}, std::int64_t{37}, std::int64_t{300}}) {
            SCOPED_TRACE(isa_label(isa) + act_label(act) + " K=" + std::to_string(K) + " M=" + std::to_string(M) +
                         " threads=" + std::to_string(threads));
            const std::vector<float> x = random_floats(M * K, 73);
            const std::vector<float> residual = random_floats(M * N, 74);
            // Exactly the size the call needs, filled with NaN: nothing may read it before writing.
            std::vector<float> buf(static_cast<std::size_t>(linear_scratch_floats(M, K, threads)),
                                   std::numeric_limits<float>::quiet_NaN());
            const LinearScratch scratch{buf};
            std::vector<float> fallback(static_cast<std::size_t>(M * N));
            std::int64_t uses = linear_thread_local_scratch_uses();
            linear(isa, x.data(), M, w.view, bias.data(), fallback.data(), pool, act);
            EXPECT_EQ(linear_thread_local_scratch_uses(), uses + 1);
            std::vector<float> provided(fallback.size());
            uses = linear_thread_local_scratch_uses();
            linear(isa, x.data(), M, w.view, bias.data(), provided.data(), pool, act, &scratch);
            ASSERT_EQ(0, std::memcmp(provided.data(), fallback.data(), fallback.size() * sizeof(float)));
            std::vector<float> add_fallback = residual, add_provided = residual;
            linear_add(isa, x.data(), M, w.view, add_fallback.data(), pool, act);
            linear_add(isa, x.data(), M, w.view, add_provided.data(), pool, act, &scratch);
            ASSERT_EQ(0, std::memcmp(add_provided.data(), add_fallback.data(), residual.size() * sizeof(float)));
            EXPECT_EQ(linear_thread_local_scratch_uses(), uses + 1) << "a call with scratch used the fallback";
          }
        }
      }
    }
  }
  // Sized for the largest call: any smaller one fits.
  EXPECT_GE(linear_scratch_floats(512, 4096, 2), linear_scratch_floats(511, 4096, 2));
  EXPECT_GE(linear_scratch_floats(512, 4096, 2), linear_scratch_floats(512, 4095, 2));
  EXPECT_GT(linear_scratch_floats(512, 4096, 3), linear_scratch_floats(512, 4096, 2));
  EXPECT_EQ(linear_scratch_floats(0, 4096, 2), 0);
}

TEST(LinearScratchDeathTest, ShortScratchIsABrokenInvariant) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  const PackedWeight w = make_packed(64, 32, 81, gemm_weight_layout(active_gemm_activations()));
  const std::vector<float> x = random_floats(4 * 32, 82);
  std::vector<float> y(4 * 64);
  std::vector<float> buf(static_cast<std::size_t>(linear_scratch_floats(4, 32, 1) - 1));
  const LinearScratch scratch{buf};
  EXPECT_DEATH(linear(x.data(), 4, w.view, nullptr, y.data(), nullptr, &scratch), "linear scratch of");
}

// ---------------------------------------------------------------------------------------------
// element-wise

TEST(RmsNorm, MatchesReference) {
  for (Isa isa : supported_isas()) {
    for (DType dt : {DType::kF32, DType::kF16, DType::kBF16}) {
      for (std::int64_t D : {1, 7, 64, 100, 1024}) {
        SCOPED_TRACE(isa_label(isa) + " D=" + std::to_string(D));
        const std::int64_t M = 3;
        const std::vector<float> x = random_floats(M * D, 5, -3.0f, 3.0f);
        const TestWeight w = make_weight(1, D, dt, 6);
        std::vector<float> out(x.size());
        rms_norm(isa, x.data(), M, D, w.bytes.data(), dt, 1e-5f, out.data());
        for (std::int64_t m = 0; m < M; ++m) {
          double ss = 0;
          for (std::int64_t k = 0; k < D; ++k) ss += double(x[m * D + k]) * x[m * D + k];
          const double inv = 1.0 / std::sqrt(ss / D + 1e-5);
          for (std::int64_t k = 0; k < D; ++k) {
            const double ref = x[m * D + k] * inv * w.values[k];
            ASSERT_NEAR(out[m * D + k], ref, 2e-6 * std::fabs(ref) + 1e-7);
          }
        }
        // In place gives the same bits.
        std::vector<float> in_place = x;
        rms_norm(isa, in_place.data(), M, D, w.bytes.data(), dt, 1e-5f, in_place.data());
        EXPECT_EQ(0, std::memcmp(in_place.data(), out.data(), out.size() * sizeof(float)));
      }
    }
  }
}

TEST(SiluMulAndAdd, MatchReference) {
  for (Isa isa : supported_isas()) {
    SCOPED_TRACE(isa_label(isa));
    for (std::int64_t n : {1, 15, 16, 17, 1000}) {
      std::vector<float> g = random_floats(n, 9, -20.0f, 20.0f);
      if (n > 3) {
        g[0] = -100.0f;
        g[1] = 100.0f;
        g[2] = 0.0f;
      }
      const std::vector<float> u = random_floats(n, 10, -2.0f, 2.0f);
      std::vector<float> out(static_cast<std::size_t>(n));
      silu_mul(isa, g.data(), u.data(), n, out.data());
      for (std::int64_t i = 0; i < n; ++i) {
        const double gd = g[i];
        const double ref = gd / (1.0 + std::exp(-gd)) * u[i];
        ASSERT_NEAR(out[i], ref, 2e-6 * std::fabs(ref) + 1e-30) << i << " g=" << g[i];
      }
      std::vector<float> a = u;
      add_inplace(isa, a.data(), g.data(), n);
      for (std::int64_t i = 0; i < n; ++i) ASSERT_EQ(a[i], u[i] + g[i]);
    }
  }
}

TEST(Rope, MatchesRotateHalfReference) {
  const std::int64_t M = 3, H = 2, hd = 8;
  std::vector<float> x = random_floats(M * H * hd, 11);
  const std::vector<float> orig = x;
  const std::int64_t pos[M] = {0, 5, 1000};
  std::vector<float> inv_freq(hd / 2);
  for (std::int64_t i = 0; i < hd / 2; ++i) inv_freq[i] = std::pow(10000.0f, -2.0f * i / hd);
  rope(x.data(), M, H, hd, pos, inv_freq.data());
  for (std::int64_t m = 0; m < M; ++m) {
    for (std::int64_t h = 0; h < H; ++h) {
      for (std::int64_t i = 0; i < hd; ++i) {
        const std::int64_t j = i % (hd / 2);
        const double ang = static_cast<double>(static_cast<float>(pos[m]) * inv_freq[j]);
        const float* v = orig.data() + (m * H + h) * hd;
        const double rot = i < hd / 2 ? -v[i + hd / 2] : v[i - hd / 2];
        const double ref = v[i] * std::cos(ang) + rot * std::sin(ang);
        ASSERT_NEAR(x[(m * H + h) * hd + i], ref, 1e-5) << m << " " << h << " " << i;
      }
    }
  }
}

// Bit for bit the f32 rotation each element is specified by: the angle pos * inv_freq[i] in f32,
// its std::cos and std::sin, then (a, b) -> (a c - b s, b c + a s) with every product rounded on
// its own (no fused multiply-add), for head sizes the vectorized loop covers in full and in part.
TEST(Rope, BitExactF32Rotation) {
  for (std::int64_t hd : {2, 8, 64, 96, 128}) {
    SCOPED_TRACE("head_dim " + std::to_string(hd));
    const std::int64_t M = 4, H = 5, half = hd / 2;
    std::vector<float> x = random_floats(M * H * hd, 12, -4.0f, 4.0f);
    const std::vector<float> orig = x;
    const std::int64_t pos[M] = {0, 7, 513, 8191};
    std::vector<float> inv_freq(static_cast<std::size_t>(half));
    for (std::int64_t i = 0; i < half; ++i) inv_freq[i] = std::pow(10000.0f, -2.0f * static_cast<float>(i) / static_cast<float>(hd));
    rope(x.data(), M, H, hd, pos, inv_freq.data());
    for (std::int64_t m = 0; m < M; ++m) {
      for (std::int64_t h = 0; h < H; ++h) {
        const float* v = orig.data() + (m * H + h) * hd;
        const float* got = x.data() + (m * H + h) * hd;
        for (std::int64_t i = 0; i < half; ++i) {
          const float angle = static_cast<float>(pos[m]) * inv_freq[i];
          const float c = std::cos(angle);
          const float sn = std::sin(angle);
          const float ac = v[i] * c;
          const float bs = v[i + half] * sn;
          const float bc = v[i + half] * c;
          const float as = v[i] * sn;
          ASSERT_EQ(got[i], ac - bs) << m << " " << h << " " << i;
          ASSERT_EQ(got[i + half], bc + as) << m << " " << h << " " << i;
        }
      }
    }
  }
}

// The row-parallel forms (rms_norm with a pool, silu_mul_rows, rope_qk, rope_qk_cos_sin) give the bits of the
// serial per-row kernels for every thread count, including calls large enough to be split.
TEST(RowParallel, ElementwiseStepsMatchTheSerialKernelsBitForBit) {
  ThreadPool pool2(2), pool3(3);
  for (std::int64_t M : {1, 5, 64, 300}) {
    SCOPED_TRACE("M=" + std::to_string(M));
    const std::int64_t D = 1024, F = 704, H = 16, KVH = 8, hd = 64;
    const std::vector<float> x = random_floats(M * D, 21, -3.0f, 3.0f);
    const TestWeight w = make_weight(1, D, DType::kBF16, 22);
    std::vector<float> norm_ref(x.size());
    rms_norm(x.data(), M, D, w.bytes.data(), DType::kBF16, 1e-5f, norm_ref.data());
    const std::vector<float> gu = random_floats(M * 2 * F, 23, -8.0f, 8.0f);
    std::vector<float> silu_ref(static_cast<std::size_t>(M * F));
    for (std::int64_t m = 0; m < M; ++m) silu_mul(gu.data() + m * 2 * F, gu.data() + m * 2 * F + F, F, silu_ref.data() + m * F);
    // qkv rows: q (H heads), k (KVH heads), v (KVH heads, untouched by rope_qk).
    const std::int64_t stride = (H + 2 * KVH) * hd;
    const std::vector<float> qkv = random_floats(M * stride, 24);
    std::vector<std::int64_t> pos(static_cast<std::size_t>(M));
    for (std::int64_t m = 0; m < M; ++m) pos[m] = 3 + 7 * m;
    std::vector<float> inv_freq(hd / 2);
    for (std::int64_t i = 0; i < hd / 2; ++i) inv_freq[i] = std::pow(10000.0f, -2.0f * i / hd);
    std::vector<float> rope_ref = qkv;
    for (std::int64_t m = 0; m < M; ++m) {
      rope(rope_ref.data() + m * stride, 1, H, hd, &pos[m], inv_freq.data());
      rope(rope_ref.data() + m * stride + H * hd, 1, KVH, hd, &pos[m], inv_freq.data());
    }
    for (ThreadPool* pool : {static_cast<ThreadPool*>(nullptr), &pool2, &pool3}) {
      std::vector<float> norm(x.size(), std::nanf(""));
      rms_norm(x.data(), M, D, w.bytes.data(), DType::kBF16, 1e-5f, norm.data(), pool);
      EXPECT_EQ(0, std::memcmp(norm.data(), norm_ref.data(), norm.size() * sizeof(float)));
      std::vector<float> silu(silu_ref.size(), std::nanf(""));
      silu_mul_rows(gu.data(), M, F, silu.data(), pool);
      EXPECT_EQ(0, std::memcmp(silu.data(), silu_ref.data(), silu.size() * sizeof(float)));
      std::vector<float> r = qkv;
      rope_qk(r.data(), M, stride, H, KVH, hd, pos.data(), inv_freq.data(), pool);
      EXPECT_EQ(0, std::memcmp(r.data(), rope_ref.data(), r.size() * sizeof(float)));
      // The same with the angles computed once up front (a forward pass reuses them over layers).
      std::vector<float> cos_sin(static_cast<std::size_t>(M * hd), std::nanf(""));
      rope_cos_sin(pos.data(), M, hd, inv_freq.data(), cos_sin.data(), pool);
      std::vector<float> rc = qkv;
      rope_qk_cos_sin(rc.data(), M, stride, H, KVH, hd, cos_sin.data(), pool);
      EXPECT_EQ(0, std::memcmp(rc.data(), rope_ref.data(), rc.size() * sizeof(float)));
    }
  }
}

TEST(Argmax, FirstOnTies) {
  const float v[] = {1.0f, 3.0f, -2.0f, 3.0f, 0.5f};
  EXPECT_EQ(argmax(v, 5), 1);
  EXPECT_EQ(argmax(v, 1), 0);
}

// ---------------------------------------------------------------------------------------------
// paged attention

// Contiguous K/V of one sequence/layer: [kv_heads][ctx][hd].
struct Sequence {
  std::int64_t ctx, kv_heads, hd;
  std::vector<float> k, v;
};

// Lays the sequence out in blocks of `bs` tokens, blocks placed in a pool in `order`.
struct PagedCopy {
  std::vector<float> pool;
  std::vector<const float*> kb, vb;
  PagedKvView view;
};

PagedCopy page(const Sequence& s, std::int64_t bs, std::uint32_t shuffle_seed) {
  PagedCopy p;
  const std::int64_t nblocks = (s.ctx + bs - 1) / bs;
  const std::int64_t block_floats = s.kv_heads * bs * s.hd;
  std::vector<std::int64_t> slot(static_cast<std::size_t>(2 * nblocks));
  std::iota(slot.begin(), slot.end(), 0);
  if (shuffle_seed != 0) std::shuffle(slot.begin(), slot.end(), std::mt19937(shuffle_seed));
  p.pool.assign(static_cast<std::size_t>(2 * nblocks * block_floats), std::nanf(""));
  for (std::int64_t b = 0; b < nblocks; ++b) {
    float* kdst = p.pool.data() + slot[b] * block_floats;
    float* vdst = p.pool.data() + slot[nblocks + b] * block_floats;
    p.kb.push_back(kdst);
    p.vb.push_back(vdst);
    for (std::int64_t h = 0; h < s.kv_heads; ++h) {
      for (std::int64_t t = 0; t < bs && b * bs + t < s.ctx; ++t) {
        const std::int64_t src = (h * s.ctx + b * bs + t) * s.hd;
        std::memcpy(kdst + (h * bs + t) * s.hd, s.k.data() + src, s.hd * sizeof(float));
        std::memcpy(vdst + (h * bs + t) * s.hd, s.v.data() + src, s.hd * sizeof(float));
      }
    }
  }
  p.view = PagedKvView{p.kb.data(), p.vb.data(), bs, s.ctx, s.kv_heads, s.hd};
  return p;
}

void reference_attention(const Sequence& s, const float* q, std::int64_t num_tokens,
                         std::int64_t num_heads, const std::int64_t* pos, float scale,
                         std::vector<double>* out) {
  out->assign(static_cast<std::size_t>(num_tokens * num_heads * s.hd), 0.0);
  const std::int64_t group = num_heads / s.kv_heads;
  for (std::int64_t t = 0; t < num_tokens; ++t) {
    for (std::int64_t h = 0; h < num_heads; ++h) {
      const float* qh = q + (t * num_heads + h) * s.hd;
      const std::int64_t kvh = h / group;
      std::vector<double> sc(static_cast<std::size_t>(pos[t] + 1));
      double mx = -1e300;
      for (std::int64_t j = 0; j <= pos[t]; ++j) {
        double d = 0;
        for (std::int64_t i = 0; i < s.hd; ++i) d += double(qh[i]) * s.k[(kvh * s.ctx + j) * s.hd + i];
        sc[j] = d * scale;
        mx = std::max(mx, sc[j]);
      }
      double sum = 0;
      for (auto& v : sc) sum += (v = std::exp(v - mx));
      for (std::int64_t j = 0; j <= pos[t]; ++j) {
        for (std::int64_t i = 0; i < s.hd; ++i) {
          (*out)[(t * num_heads + h) * s.hd + i] += sc[j] / sum * s.v[(kvh * s.ctx + j) * s.hd + i];
        }
      }
    }
  }
}

TEST(PagedAttention, MatchesReferenceAndIsInvariantToBlocksTokensAndThreads) {
  ThreadPool p2(2), p3(3);
  struct Case {
    std::int64_t ctx, heads, kv_heads, hd;
  };
  // GQA (8 q heads on 2 kv heads), MHA, a head_dim with a vector tail, a long context.
  const Case cases[] = {{300, 8, 2, 64}, {37, 4, 4, 40}, {1100, 4, 1, 72}};
  std::uint32_t seed = 100;
  for (Isa isa : supported_isas()) {
    for (const Case& c : cases) {
      SCOPED_TRACE(isa_label(isa) + " ctx=" + std::to_string(c.ctx) + " hd=" + std::to_string(c.hd));
      Sequence s{c.ctx, c.kv_heads, c.hd, random_floats(c.kv_heads * c.ctx * c.hd, ++seed, -2, 2),
                 random_floats(c.kv_heads * c.ctx * c.hd, ++seed)};
      const std::int64_t positions[] = {c.ctx - 1, 0, c.ctx / 2, c.ctx - 2, 15, 16};
      const std::int64_t T = 6;
      const std::vector<float> q = random_floats(T * c.heads * c.hd, ++seed, -2, 2);
      const float scale = 1.0f / std::sqrt(static_cast<float>(c.hd));
      std::vector<float> scratch(static_cast<std::size_t>(3 * c.ctx));
      const std::int64_t out_n = T * c.heads * c.hd;

      // Baseline: block size 16, blocks in order, no pool.
      PagedCopy base = page(s, 16, 0);
      std::vector<float> out0(static_cast<std::size_t>(out_n));
      paged_attention(isa, q.data(), T, c.heads, positions, base.view, scale, out0.data(),
                      scratch.data(), nullptr);
      std::vector<double> ref;
      reference_attention(s, q.data(), T, c.heads, positions, scale, &ref);
      for (std::int64_t i = 0; i < out_n; ++i) ASSERT_NEAR(out0[i], ref[i], 1e-5) << "element " << i;

      for (std::int64_t bs : {16, 256, 7}) {
        for (std::uint32_t shuffle : {0u, 77u}) {
          PagedCopy pc = page(s, bs, shuffle);
          for (ThreadPool* pool : {static_cast<ThreadPool*>(nullptr), &p2, &p3}) {
            std::vector<float> out(static_cast<std::size_t>(out_n));
            paged_attention(isa, q.data(), T, c.heads, positions, pc.view, scale, out.data(),
                            scratch.data(), pool);
            ASSERT_EQ(0, std::memcmp(out.data(), out0.data(), out.size() * sizeof(float)))
                << "bs=" << bs << " shuffle=" << shuffle;
          }
        }
      }
      // Each token alone gives the same bits as inside the batch.
      for (std::int64_t t = 0; t < T; ++t) {
        std::vector<float> one(static_cast<std::size_t>(c.heads * c.hd));
        paged_attention(isa, q.data() + t * c.heads * c.hd, 1, c.heads, positions + t, base.view,
                        scale, one.data(), scratch.data(), &p2);
        ASSERT_EQ(0, std::memcmp(one.data(), out0.data() + t * c.heads * c.hd,
                                 one.size() * sizeof(float)))
            << "token " << t;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
TEST(Roofline, ProbesReturnPositiveRates) {
  ThreadPool pool(2);
  // The FMA probes run for a fixed, longer time; the benchmark exercises them.
  EXPECT_GT(measure_read_bandwidth_bytes_per_s(&pool, std::int64_t{4} << 20), 0.0);
}

}  // namespace
}  // namespace kun::kernels
