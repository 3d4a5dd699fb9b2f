// Issue 12, "a stage never touches memory of a device it does not own", in the in-process
// backend: once a device is handed to its agent (InProcessFleet turns the owner check on), every
// accessor that reaches its memory or compute aborts unless the calling thread is that device's
// agent (holds its DeviceOwnerScope). These tests fail if the guard stops guarding: a front-end
// thread, or an agent thread of another device (a stage computing attention against a holder's
// blocks itself, as the pre-agent executor did), reaching into the device must die. And a fused
// group with remote attention runs with the guard on while the holders, not the stages, count the
// attention work done for others.
#include <gtest/gtest.h>

#include <thread>

#include "model/config.h"
#include "model/weight_source.h"
#include "runtime/cluster_runtime.h"
#include "runtime/device_agent.h"
#include "runtime/tests/test_models.h"

namespace kun::runtime {
namespace {

std::unique_ptr<VirtualDevice> make_device(const model::WeightSource& w, const std::string& name) {
  auto dev = create_full_device(name, w, /*kv_token_blocks=*/16, /*block_size=*/16, /*num_threads=*/1);
  KUN_CHECK(dev.ok()) << dev.status().to_string();
  return std::move(dev).value();
}

class DeviceOwnershipDeathTest : public ::testing::Test {
 protected:
  void SetUp() override { GTEST_FLAG_SET(death_test_style, "threadsafe"); }
};

TEST_F(DeviceOwnershipDeathTest, NonOwnerThreadTouchingADeviceAborts) {
  auto w = testing::tiny_weights();
  auto dev = make_device(*w, "guarded");
  // Before the hand-over anyone may set the device up.
  EXPECT_GT(dev->kv_storage().block_bytes(), 0);
  dev->set_owner_check(true);
  EXPECT_DEATH((void)dev->kv_storage(), "does not own it");
  EXPECT_DEATH((void)dev->arena(), "does not own it");
  EXPECT_DEATH((void)dev->forward(), "does not own it");
  EXPECT_DEATH((void)dev->layer_weights(0), "does not own it");
  EXPECT_DEATH((void)dev->drop_layer(0), "does not own it");
  {
    const DeviceOwnerScope scope(*dev);  // what the agent's threads hold
    EXPECT_GT(dev->kv_storage().block_bytes(), 0);
  }
  EXPECT_DEATH((void)dev->kv_storage(), "does not own it");
}

TEST_F(DeviceOwnershipDeathTest, AnotherDevicesAgentThreadTouchingADeviceAborts) {
  auto w = testing::tiny_weights();
  auto mine = make_device(*w, "stage");
  auto theirs = make_device(*w, "holder");
  mine->set_owner_check(true);
  theirs->set_owner_check(true);
  // A stage thread owns its own device; reaching into the holder's KV blocks (the old executor's
  // remote attention, computed on the caller) must fail.
  EXPECT_DEATH(
      {
        std::thread stage([&] {
          const DeviceOwnerScope scope(*mine);
          (void)mine->kv_storage();     // its own: fine
          (void)theirs->kv_storage();   // the holder's: aborts
        });
        stage.join();
      },
      "holder touched by a thread that does not own it");
}

TEST(DeviceOwnershipTest, FusedGroupRunsWithTheGuardOnAndHoldersComputeRemoteAttention) {
  auto w = testing::tiny_weights();
  const auto& c = w->config();
  ClusterOptions o;
  o.num_instances = 2;
  o.device.kv_block_size = 16;
  o.device.weight_dtype = c.dtype;
  o.device.page_bytes = 64 * 1024;
  kv::KvGeometry g{16, c.num_kv_heads, c.head_dim};
  o.device.capacity_bytes = device_param_bytes(c, c.dtype, 0, c.num_layers, o.device.page_bytes) +
                            device_workspace_bytes(c, o.device) +
                            ceil_div(64 * c.num_layers, g.blocks_per_page(o.device.page_bytes)) * o.device.page_bytes;
  o.coordinator.policy = cluster::Policy::kKunServe;
  o.run_policy_thread = false;
  o.stale_kv = cluster::StaleKvStrategy::kRemoteAttention;
  o.router.policy = cluster::RoutePolicy::kRoundRobin;  // requests on both instances before the drop
  ManualClock clock;
  auto rt = ClusterRuntime::create(o, *w, &clock);
  ASSERT_TRUE(rt.ok()) << rt.status().to_string();
  int finished = 0;
  for (int i = 0; i < 4; ++i) {
    engine::RequestSpec s;
    for (int t = 0; t < 20 + i; ++t) s.prompt_tokens.push_back(3 + (i * 31 + t * 7) % 200);
    s.max_tokens = 12;
    s.ignore_eos = true;
    ASSERT_TRUE((*rt)->submit(s, [&](const engine::TokenEvent& ev) { finished += ev.finished ? 1 : 0; }).ok());
  }
  for (int i = 0; i < 4; ++i) (*rt)->run_step_all();  // requests running on both instances
  ASSERT_TRUE((*rt)->drop({0, 1}).ok());
  // Stale requests' KV stays where they ran: stage 0 attends on device 1's blocks for device-1
  // requests and vice versa, each through the holder's agent.
  int guard = 0;
  while ((*rt)->run_step_all()) ASSERT_LT(++guard, 10000);
  (*rt)->check_integrity();
  EXPECT_EQ(finished, 4);
  std::int64_t for_others = 0, stages = 0;
  for (std::int64_t d = 0; d < 2; ++d) {
    auto counters = (*rt)->device_counters(d);
    ASSERT_TRUE(counters.ok()) << counters.status().to_string();
    EXPECT_GT(counters->attention_requests_for_others, 0) << "device " << d << " holds stale KV the other stage attends to";
    for_others += counters->attention_tokens_for_others;
    stages += counters->stages_run;
  }
  EXPECT_GT(for_others, 0);
  EXPECT_GT(stages, 0);
  EXPECT_GT((*rt)->transfer_stats().bytes_of(TransferKind::kRemoteAttention), 0);
}

}  // namespace
}  // namespace kun::runtime
