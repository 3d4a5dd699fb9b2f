#include "cluster/router.h"

#include <gtest/gtest.h>

#include "cluster/tests/test_util.h"

namespace kun::cluster {
namespace {

using testing::snap;

InstanceSnapshot with_load(std::int64_t id, std::int64_t running, std::int64_t queued, std::int64_t group = -1) {
  InstanceSnapshot s = snap(id, 0.5);
  s.num_running = running;
  s.num_queued = queued;
  s.group = group;
  return s;
}

TEST(Router, EmptyIsUnavailable) {
  Router r;
  EXPECT_EQ(r.route({}).status().code(), StatusCode::kUnavailable);
}

TEST(Router, LeastOutstanding) {
  Router r;
  auto id = r.route({with_load(0, 5, 1), with_load(1, 2, 2), with_load(2, 3, 0), with_load(3, 4, 0)});
  ASSERT_TRUE(id.ok());
  EXPECT_EQ(*id, 2);  // 3 vs 4, 6, 4; ties go to the lowest id
  EXPECT_EQ(*r.route({with_load(4, 1, 0), with_load(2, 1, 0)}), 2);
}

TEST(Router, GroupMembersRouteToTheGroupsFirstMember) {
  Router r;
  // Group 9 = {3, 1}: 6 outstanding over 2 members = 3 per member, below instance 0's 4.
  auto id = r.route({with_load(0, 4, 0), with_load(3, 2, 1, 9), with_load(1, 3, 0, 9), with_load(2, 7, 0)});
  ASSERT_TRUE(id.ok());
  EXPECT_EQ(*id, 1);
  // Heavier group loses.
  id = r.route({with_load(0, 2, 0), with_load(3, 4, 1, 9), with_load(1, 3, 0, 9)});
  EXPECT_EQ(*id, 0);
}

TEST(Router, AFusedUnitsCountsAreSplitOverItsMembers) {
  for (std::int64_t g : {1, 2, 3, 4, 8}) {
    for (std::int64_t count = 0; count < 40; ++count) {
      std::int64_t sum = 0;
      for (std::int64_t k = 0; k < g; ++k) {
        const std::int64_t share = member_count_share(count, g, k);
        EXPECT_LE(share, count / g + 1);
        EXPECT_GE(share, count / g);
        sum += share;
      }
      EXPECT_EQ(sum, count) << count << " over " << g;
    }
  }
  // A group of 4 running 8 requests (2 per member) against an instance running 3: the group is
  // the lighter. With the whole count on every member (8 per member) the router sent every
  // arrival to the independent instance, the lowest id first (the simulated H100 13B sweep's
  // ratio fell from 54x to 1.8x at 23.8 req/s).
  Router r;
  std::vector<InstanceSnapshot> xs{with_load(0, 3, 0)};
  for (std::int64_t k = 0; k < 4; ++k) xs.push_back(with_load(1 + k, member_count_share(8, 4, k), member_count_share(1, 4, k), 7));
  EXPECT_EQ(*r.route(xs), 1);
}

TEST(Router, MemoryAwarePrefersMostFreeNetOfPending) {
  Router r(RouterConfig{RoutePolicy::kMemoryAware, 32});
  InstanceSnapshot a = snap(0, 0.5);  // 1600 free
  InstanceSnapshot b = snap(1, 0.2);  // 2560 free
  InstanceSnapshot c = snap(2, 0.1, 1000);  // 2880 used+pending... free net of pending is less
  c.kv_blocks_free = 3000;
  c.pending_blocks = 1000;  // 2000 net
  EXPECT_EQ(*r.route({a, b, c}), 1);
  // A dropped pair {2,3} pools its members' room.
  InstanceSnapshot g0 = snap(2, 0.5), g1 = snap(3, 0.5);
  g0.group = g1.group = 4;  // 1600 + 1600 = 3200 net
  EXPECT_EQ(*r.route({a, b, g0, g1}), 2);
  // Equal room: fewer outstanding wins.
  InstanceSnapshot x = snap(5, 0.5), y = snap(6, 0.5);
  x.num_running = 9;
  y.num_running = 1;
  EXPECT_EQ(*r.route({x, y}), 6);
}

TEST(Router, RoundRobinCyclesOverUnits) {
  Router r(RouterConfig{RoutePolicy::kRoundRobin, 32});
  std::vector<InstanceSnapshot> xs = {with_load(0, 0, 0), with_load(2, 0, 0, 7), with_load(1, 0, 0, 7),
                                      with_load(3, 0, 0)};
  std::vector<std::int64_t> got;
  for (int i = 0; i < 6; ++i) got.push_back(*r.route(xs));
  EXPECT_EQ(got, (std::vector<std::int64_t>{0, 1, 3, 0, 1, 3}));
}

TEST(Router, PolicyNames) {
  RoutePolicy p = RoutePolicy::kRoundRobin;
  ASSERT_TRUE(parse_route_policy("memory-aware", &p));
  EXPECT_EQ(p, RoutePolicy::kMemoryAware);
  EXPECT_FALSE(parse_route_policy("random", &p));
}

}  // namespace
}  // namespace kun::cluster
