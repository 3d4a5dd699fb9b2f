// The in-process transport's link model: data arrives intact, a paced link carries one message
// at a time, and a bulk transfer (KV exchange, weights) yields the link between chunks so an
// activation sent meanwhile does not wait for the whole bulk transfer. Time is only bounded from
// below (sleeps cannot finish early) or compared between two transfers of very different length.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdint>
#include <numeric>
#include <thread>
#include <vector>

#include "runtime/transport.h"

namespace kun::runtime {
namespace {

using Clock = std::chrono::steady_clock;

std::vector<std::uint8_t> pattern(std::size_t n, std::uint8_t seed) {
  std::vector<std::uint8_t> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = static_cast<std::uint8_t>(seed + i * 31);
  return v;
}

double ms_since(Clock::time_point t0, Clock::time_point t) { return std::chrono::duration<double, std::milli>(t - t0).count(); }

TEST(TransportTest, UnpacedCopiesAndCounts) {
  InProcessTransport t;
  const auto src = pattern(1000, 3);
  std::vector<std::uint8_t> dst(1000);
  t.transfer(0, 1, src.data(), dst.data(), 1000, TransferKind::kKvExchange);
  EXPECT_EQ(dst, src);
  EXPECT_EQ(t.stats().bytes_of(TransferKind::kKvExchange), 1000);
  EXPECT_EQ(t.stats().messages[static_cast<int>(TransferKind::kKvExchange)], 1);
  EXPECT_TRUE(is_bulk_transfer(TransferKind::kWeights));
  EXPECT_FALSE(is_bulk_transfer(TransferKind::kActivation));
  EXPECT_FALSE(is_bulk_transfer(TransferKind::kRemoteAttention));
}

TEST(TransportTest, ActivationOvertakesABulkTransferOnTheSameLink) {
  LinkModel link;
  // 64 MB take 268 ms, one 64 KiB chunk 0.26 ms: the window in which the activation must start is
  // wide enough for a loaded host (TSan under ctest -j) to get the main thread there in time.
  link.bandwidth_bytes_per_s = 0.25e9;
  InProcessTransport t(link);
  const std::size_t bulk_bytes = 64u << 20;
  const auto bulk_src = pattern(bulk_bytes, 1);
  std::vector<std::uint8_t> bulk_dst(bulk_bytes);
  const std::size_t act_bytes = 1u << 20;  // 4 ms on the link: the bulk transfer finds it busy
  const auto act_src = pattern(act_bytes, 9);
  std::vector<std::uint8_t> act_dst(act_bytes);
  const auto t0 = Clock::now();
  Clock::time_point bulk_done;
  std::thread bulk([&] {
    t.transfer(0, 1, bulk_src.data(), bulk_dst.data(), static_cast<std::int64_t>(bulk_bytes), TransferKind::kKvExchange);
    bulk_done = Clock::now();
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  const auto act_start = Clock::now();
  t.transfer(0, 1, act_src.data(), act_dst.data(), static_cast<std::int64_t>(act_bytes), TransferKind::kActivation);
  const auto act_done = Clock::now();
  bulk.join();
  EXPECT_EQ(act_dst, act_src);
  EXPECT_EQ(bulk_dst, bulk_src);
  // The bulk transfer still took its full link time, and the activation went through in between
  // instead of queueing behind the remaining ~250 ms of it.
  EXPECT_GE(ms_since(t0, bulk_done), 268.0);
  EXPECT_LT(act_done, bulk_done) << "the activation waited for the whole bulk transfer";
  EXPECT_LT(ms_since(act_start, act_done), 0.5 * ms_since(act_start, bulk_done));
}

TEST(TransportTest, BulkWaitsWhileAnActivationHoldsTheLink) {
  LinkModel link;
  link.bandwidth_bytes_per_s = 1e9;
  InProcessTransport t(link);
  const std::size_t act_bytes = 32u << 20;  // holds the link for 33.5 ms from when it starts
  const auto act_src = pattern(act_bytes, 2);
  std::vector<std::uint8_t> act_dst(act_bytes);
  const auto t0 = Clock::now();
  std::thread act([&] {
    t.transfer(0, 1, act_src.data(), act_dst.data(), static_cast<std::int64_t>(act_bytes), TransferKind::kActivation);
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(10));
  const auto kv_src = pattern(4096, 6);
  std::vector<std::uint8_t> kv_dst(4096);
  t.transfer(0, 1, kv_src.data(), kv_dst.data(), 4096, TransferKind::kKvExchange);
  const auto kv_done = Clock::now();
  act.join();
  EXPECT_EQ(kv_dst, kv_src);
  EXPECT_EQ(act_dst, act_src);
  EXPECT_GE(ms_since(t0, kv_done), 33.0) << "the KV chunk did not wait for the activation holding the link";
  EXPECT_GE(t.stats().bulk_chunks_deferred, 1);
}

TEST(TransportTest, TwoBulkTransfersShareOneLink) {
  LinkModel link;
  link.bandwidth_bytes_per_s = 1e9;
  InProcessTransport t(link);
  const std::size_t n = 8u << 20;  // 8 ms each
  const auto a_src = pattern(n, 4), b_src = pattern(n, 5);
  std::vector<std::uint8_t> a_dst(n), b_dst(n);
  const auto t0 = Clock::now();
  std::thread a([&] { t.transfer(2, 3, a_src.data(), a_dst.data(), static_cast<std::int64_t>(n), TransferKind::kWeights); });
  t.transfer(2, 3, b_src.data(), b_dst.data(), static_cast<std::int64_t>(n), TransferKind::kKvMigration);
  a.join();
  EXPECT_GE(ms_since(t0, Clock::now()), 16.0) << "one link carried both at full bandwidth at once";
  EXPECT_EQ(a_dst, a_src);
  EXPECT_EQ(b_dst, b_src);
}

}  // namespace
}  // namespace kun::runtime
