#include "cluster/migration.h"

#include <gtest/gtest.h>

#include "cluster/tests/test_util.h"

namespace kun::cluster {
namespace {

using testing::overloaded_snap;
using testing::snap;
using testing::test_shape;

RequestSnapshot running(std::int64_t id, std::int64_t blocks) {
  return RequestSnapshot{RequestId(id), true, blocks / 32 * 16, blocks};
}
RequestSnapshot queued(std::int64_t id, std::int64_t tokens) { return RequestSnapshot{RequestId(id), false, tokens, 0}; }

MigrationConfig one_at_a_time() {
  MigrationConfig c;
  c.max_concurrent_per_instance = 1;
  c.rebalance_queued = false;
  return c;
}

TEST(Migration, OverloadRule) {
  MigrationPolicy m({}, test_shape());
  EXPECT_TRUE(m.overloaded(overloaded_snap(0)));
  EXPECT_FALSE(m.overloaded(snap(0, 0.5)));
  EXPECT_TRUE(m.overloaded(snap(0, 0.97)));  // demand above 0.95 without pending
  InstanceSnapshot s = snap(0, 0.5, 10);
  s.kv_blocks_free = 10;  // pending >= free
  EXPECT_TRUE(m.overloaded(s));
}

TEST(Migration, LargestRunningRequestToLeastLoadedWithRoom) {
  MigrationPolicy m(one_at_a_time(), test_shape());
  InstanceSnapshot hot = overloaded_snap(0);
  hot.requests = {running(1, 64), running(2, 320), running(3, 160), queued(4, 100)};
  auto out = m.plan(0, {hot, snap(1, 0.6), snap(2, 0.3), snap(3, 0.4)});
  ASSERT_EQ(out.size(), 1u);  // concurrency limit 1 on the source
  EXPECT_EQ(out[0].request, RequestId(2));
  EXPECT_EQ(out[0].from, 0);
  EXPECT_EQ(out[0].to, 2);
  EXPECT_TRUE(out[0].live);
  EXPECT_FALSE(out[0].reason.empty());
  EXPECT_TRUE(m.in_flight(RequestId(2)));
  EXPECT_EQ(m.in_flight_at(0), 1);
  EXPECT_EQ(m.in_flight_at(2), 1);

  // Next tick: source still busy -> nothing; request 2 is never picked twice.
  out = m.plan(1000, {hot, snap(1, 0.6), snap(2, 0.3), snap(3, 0.4)});
  EXPECT_TRUE(out.empty());
  m.on_done(RequestId(2));
  hot.requests.erase(hot.requests.begin() + 1);
  out = m.plan(2000, {hot, snap(1, 0.6), snap(2, 0.3), snap(3, 0.4)});
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0].request, RequestId(3));
}

TEST(Migration, DestinationNeedsRoomAndStaysBelowLimit) {
  MigrationPolicy m(one_at_a_time(), test_shape());
  InstanceSnapshot hot = overloaded_snap(0);
  hot.requests = {running(1, 2000), running(2, 200)};
  // Instance 1: demand 0.5 but 2000 blocks would push it to 1.125 > 0.9; 200 fits.
  auto out = m.plan(0, {hot, snap(1, 0.5)});
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0].request, RequestId(2));
  // Nobody with room: nothing.
  MigrationPolicy m2(one_at_a_time(), test_shape());
  InstanceSnapshot busy = snap(1, 0.89);
  out = m2.plan(0, {hot, busy});
  EXPECT_TRUE(out.empty());
  // Another overloaded instance is never a destination.
  MigrationPolicy m3(one_at_a_time(), test_shape());
  out = m3.plan(0, {hot, overloaded_snap(1)});
  EXPECT_TRUE(out.empty());
}

TEST(Migration, ConcurrencyLimitAppliesToDestinations) {
  MigrationConfig c = one_at_a_time();
  MigrationPolicy m(c, test_shape());
  InstanceSnapshot a = overloaded_snap(0), b = overloaded_snap(1);
  a.requests = {running(1, 100)};
  b.requests = {running(2, 100)};
  // Both want the single idle instance 2; it takes one migration at a time.
  auto out = m.plan(0, {a, b, snap(2, 0.1)});
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0].to, 2);
}

TEST(Migration, StopsWhenSourceRelieved) {
  MigrationConfig c;
  c.max_concurrent_per_instance = 8;
  c.rebalance_queued = false;
  MigrationPolicy m(c, test_shape());
  // Demand 0.97 of 3200 = 3104 blocks, nothing pending: moving one 200-block request brings it
  // to 0.9075 <= 0.95, so only one goes even though the limit allows eight.
  InstanceSnapshot hot = snap(0, 0.97);
  hot.requests = {running(1, 200), running(2, 150), running(3, 100)};
  auto out = m.plan(0, {hot, snap(1, 0.1)});
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0].request, RequestId(1));
}

TEST(Migration, QueuedRebalanceSmallestFirstWithinHalfTheGap) {
  MigrationConfig c;
  c.migrate_running = false;
  MigrationPolicy m(c, test_shape());
  // Source demanded 3840 blocks; least-loaded instance 2 demands 640 -> budget (3840-640)/2 = 1600.
  // Queued requests need ceil(tokens/16)*32 blocks: 100 -> 224, 300 -> 608, 50 -> 128, 500 -> 1024.
  // Smallest first: 128 + 224 + 608 = 960; + 1024 > 1600 stops.
  InstanceSnapshot hot = overloaded_snap(0);
  hot.requests = {queued(1, 100), queued(2, 300), queued(3, 50), queued(4, 500), running(5, 64)};
  auto out = m.plan(0, {hot, snap(1, 0.5), snap(2, 0.2)});
  ASSERT_EQ(out.size(), 3u);
  EXPECT_EQ(out[0].request, RequestId(3));
  EXPECT_EQ(out[1].request, RequestId(1));
  EXPECT_EQ(out[2].request, RequestId(2));
  for (const auto& a : out) {
    EXPECT_FALSE(a.live);
    EXPECT_EQ(a.to, 2);
  }
  EXPECT_EQ(m.blocks_needed(queued(9, 100)), 224);
  // Queued moves do not count against the live-migration limit.
  EXPECT_EQ(m.in_flight_at(0), 0);
  // ... but they are not re-planned while in flight.
  out = m.plan(10, {hot, snap(1, 0.5), snap(2, 0.2)});
  for (const auto& a : out) EXPECT_EQ(a.request, RequestId(4));
}

TEST(Migration, InFlightEndsWhenSeenAtDestinationOrTimesOut) {
  MigrationConfig c = one_at_a_time();
  c.in_flight_timeout_us = 1'000'000;
  MigrationPolicy m(c, test_shape());
  InstanceSnapshot hot = overloaded_snap(0);
  hot.requests = {running(1, 100), running(2, 90)};
  auto out = m.plan(0, {hot, snap(1, 0.1)});
  ASSERT_EQ(out.size(), 1u);
  // Mid-copy it is visible on both: still in flight.
  InstanceSnapshot dst = snap(1, 0.1);
  dst.requests = {running(1, 100)};
  m.plan(10, {hot, dst});
  EXPECT_TRUE(m.in_flight(RequestId(1)));
  // Gone from the source: done.
  hot.requests = {running(2, 90)};
  out = m.plan(20, {hot, dst});
  EXPECT_FALSE(m.in_flight(RequestId(1)));
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0].request, RequestId(2));
  // Timeout clears a migration nobody reported.
  m.plan(20 + 1'000'000, {snap(0, 0.1), snap(1, 0.1)});
  EXPECT_EQ(m.in_flight_count(), 0);
}

}  // namespace
}  // namespace kun::cluster
