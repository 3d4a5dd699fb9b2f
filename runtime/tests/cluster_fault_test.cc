// Transfer failures past a transition's commit point (issue 12): each one, injected at the device
// agents (ClusterOptions::agent_fault), fails into a consistent state instead of aborting the
// process: the transition completes without the failed piece or rolls back, the failure is a
// "<kind>_failed" event and counts in transition_failures(), check_integrity() passes (pages
// balance on every device, every block owned once, no request in two places), no request is lost
// or finished twice, and every request's greedy tokens equal those it gets on one instance alone
// (requests that lose their KV recompute to the same tokens).
//
// And the control path while a transition waits on a slow transfer: transitions hold no lock
// across a transfer, so a submit on an independent instance gets its first token and a
// transition on other units completes meanwhile.
//
// In-process only: the fault hook is a function in the agents' process (the MPI exactness run
// reuses cluster_test.cc, not this file).
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <iostream>
#include <map>
#include <mutex>
#include <set>
#include <thread>

#include <gtest/gtest.h>

#include "runtime/cluster_runtime.h"
#include "runtime/tests/cluster_test_helpers.h"
#include "runtime/tests/test_models.h"

namespace kun::runtime {
namespace {

using testing::tiny_weights;

// The rule deciding which agent ops fail, swappable while the cluster runs (agents call it from
// their serve threads), and how many ops it failed by kind.
class Faults {
 public:
  using Rule = std::function<Status(AgentOp op, int device, std::int64_t layer)>;
  void set(Rule rule) {
    std::lock_guard<std::mutex> lock(mu_);
    rule_ = std::move(rule);
  }
  void clear() { set(nullptr); }
  int failed(AgentOp op) const {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = failed_.find(op);
    return it == failed_.end() ? 0 : it->second;
  }
  Status check(AgentOp op, int device, std::int64_t layer) {
    std::lock_guard<std::mutex> lock(mu_);
    if (!rule_) return ok_status();
    Status s = rule_(op, device, layer);
    if (!s.ok()) ++failed_[op];
    return s;
  }
  void install(ClusterOptions& o) {
    o.agent_fault = [this](AgentOp op, int device, std::int64_t layer) { return check(op, device, layer); };
  }

 private:
  mutable std::mutex mu_;
  Rule rule_;
  std::map<AgentOp, int> failed_;
};

Status injected(const std::string& what) { return unavailable("injected: " + what); }

std::int64_t failures_of(ClusterRuntime& rt, const std::string& kind) {
  const auto f = rt.transition_failures();
  auto it = f.find(kind);
  return it == f.end() ? 0 : it->second;
}

bool has_event(ClusterRuntime& rt, const std::string& kind) {
  for (const ClusterEvent& ev : rt.events()) {
    if (ev.kind == kind) return true;
  }
  return false;
}

// Restores a group in two phases, stepping until the live gather and the weight pull are done.
Status gather_and_restore(ClusterRuntime& rt, std::int64_t group) {
  KUN_RETURN_IF_ERROR(rt.begin_restore(group));
  for (int i = 0; i < 2000 && !rt.ready_to_split(group); ++i) {
    run_steps(rt, 1);
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return rt.restore(group);
}

void expect_exact(Tracker& tr, const std::vector<std::vector<std::int32_t>>& expected, int n) {
  for (int i = 0; i < n; ++i) {
    EXPECT_EQ(tr.finals[i], 1) << "request " << i << " lost or finished twice";
    EXPECT_EQ(tr.tokens[i], expected[static_cast<std::size_t>(i)]) << "request " << i;
  }
}

// A member whose drop_layer fails keeps that layer: the drop completes (the group holds that layer
// twice, the member has less KV room), the restore does not pull it back.
TEST(ClusterFaultTest, FailedDropLayerKeepsTheLayerAndTheDropCompletes) {
  auto w = tiny_weights();
  const auto specs = make_specs(31, 24, w->config().vocab_size);
  const auto expected = expected_alone(*w, specs);
  ManualClock clock;
  Faults faults;
  ClusterOptions o = small_cluster(*w, 64, cluster::Policy::kKunServe);
  faults.install(o);
  auto rt = ClusterRuntime::create(o, *w, &clock);
  ASSERT_TRUE(rt.ok()) << rt.status().to_string();
  Tracker tr;
  for (int i = 0; i < 16; ++i) ASSERT_TRUE((*rt)->submit(specs[static_cast<std::size_t>(i)], tr.callback(i)).ok());
  run_steps(**rt, 6);
  faults.set([](AgentOp op, int device, std::int64_t) { return op == AgentOp::kDropLayer && device == 1 ? injected("drop") : ok_status(); });
  auto group = (*rt)->drop({0, 1});
  ASSERT_TRUE(group.ok()) << group.status().to_string();
  faults.clear();
  EXPECT_GT(faults.failed(AgentOp::kDropLayer), 0);
  EXPECT_EQ(failures_of(**rt, "drop_layer"), 1);
  EXPECT_TRUE(has_event(**rt, "drop_layer_failed"));
  EXPECT_EQ((*rt)->group_of(1), *group);
  const engine::ServingStats st = (*rt)->stats();
  EXPECT_EQ(st.drops_total, 1);
  EXPECT_GT(st.instances[0].dropped_param_bytes, 0);
  EXPECT_EQ(st.instances[1].dropped_param_bytes, 0) << "device 1 kept the layers it failed to drop";
  (*rt)->check_integrity();
  for (int i = 16; i < 24; ++i) ASSERT_TRUE((*rt)->submit(specs[static_cast<std::size_t>(i)], tr.callback(i)).ok());
  run_steps(**rt, 10);
  ASSERT_TRUE(gather_and_restore(**rt, *group).ok());
  EXPECT_EQ((*rt)->num_units(), 4);
  (*rt)->check_integrity();
  drain(**rt);
  expect_exact(tr, expected, 24);
}

// A live exchange move that fails leaves the layer where it was (remote attention serves it) and a
// later round moves it.
TEST(ClusterFaultTest, FailedLiveExchangeMoveKeepsTheLayerWhereItWas) {
  auto w = tiny_weights();
  const auto specs = make_specs(32, 16, w->config().vocab_size);
  const auto expected = expected_alone(*w, specs);
  ManualClock clock;
  Faults faults;
  ClusterOptions o = small_cluster(*w, 64, cluster::Policy::kKunServe, cluster::StaleKvStrategy::kExchange);
  faults.install(o);
  auto rt = ClusterRuntime::create(o, *w, &clock);
  ASSERT_TRUE(rt.ok()) << rt.status().to_string();
  Tracker tr;
  for (int i = 0; i < 16; ++i) ASSERT_TRUE((*rt)->submit(specs[static_cast<std::size_t>(i)], tr.callback(i)).ok());
  run_steps(**rt, 6);
  auto writes_left_to_fail = std::make_shared<std::atomic<int>>(3);
  faults.set([writes_left_to_fail](AgentOp op, int, std::int64_t) {
    return op == AgentOp::kWriteBlocks && writes_left_to_fail->fetch_sub(1) > 0 ? injected("KV write") : ok_status();
  });
  auto group = (*rt)->drop({0, 1});
  ASSERT_TRUE(group.ok()) << group.status().to_string();
  run_steps(**rt, 12);
  EXPECT_EQ(faults.failed(AgentOp::kWriteBlocks), 3);
  EXPECT_EQ(failures_of(**rt, "exchange"), 3);
  EXPECT_TRUE(has_event(**rt, "exchange_failed"));
  EXPECT_GT((*rt)->stats().kv_blocks_exchanged_total, 0) << "later rounds moved the KV";
  ASSERT_TRUE(gather_and_restore(**rt, *group).ok());
  (*rt)->check_integrity();
  drain(**rt);
  EXPECT_EQ((*rt)->stats().recomputed_tokens_total, 0) << "a failed live move loses no KV";
  expect_exact(tr, expected, 16);
}

// The split's stop-and-copy gather fails for every request: each recomputes on the member it
// lands on, its blocks freed on every member; the split completes.
TEST(ClusterFaultTest, FailedStopAndCopyMoveMakesTheRequestRecompute) {
  auto w = tiny_weights();
  const auto specs = make_specs(33, 16, w->config().vocab_size);
  const auto expected = expected_alone(*w, specs);
  ManualClock clock;
  Faults faults;
  ClusterOptions o = small_cluster(*w, 64, cluster::Policy::kKunServe, cluster::StaleKvStrategy::kRemoteAttention);
  faults.install(o);
  auto rt = ClusterRuntime::create(o, *w, &clock);
  ASSERT_TRUE(rt.ok()) << rt.status().to_string();
  auto group = (*rt)->drop({0, 1});
  ASSERT_TRUE(group.ok()) << group.status().to_string();
  Tracker tr;
  // Requests that start in the group hold each layer's KV on its stage: the split must move half.
  for (int i = 0; i < 16; ++i) ASSERT_TRUE((*rt)->submit(specs[static_cast<std::size_t>(i)], tr.callback(i)).ok());
  run_steps(**rt, 8);
  faults.set([](AgentOp op, int, std::int64_t) { return op == AgentOp::kWriteBlocks ? injected("KV write") : ok_status(); });
  // No step between the two phases: nothing is gathered live, the split copies it all.
  ASSERT_TRUE((*rt)->begin_restore(*group).ok());
  ASSERT_TRUE((*rt)->restore(*group).ok());
  faults.clear();
  EXPECT_EQ((*rt)->num_units(), 4);
  const ClusterEvent ev = (*rt)->events().back();
  ASSERT_EQ(ev.kind, "restore");
  EXPECT_GT(faults.failed(AgentOp::kWriteBlocks), 0);
  EXPECT_GT(failures_of(**rt, "kv_move"), 0);
  EXPECT_EQ(ev.requests_recomputed, failures_of(**rt, "kv_move")) << ev.reason;
  EXPECT_EQ(ev.kv_blocks_exchanged, 0);
  (*rt)->check_integrity();
  drain(**rt);
  EXPECT_GT(tr.total_transition_recomputed(), 0);
  expect_exact(tr, expected, 16);
}

// A holder that refuses to send a layer: the pull is retried from another device holding it.
TEST(ClusterFaultTest, FailedWeightPullIsRetriedFromAnotherHolder) {
  auto w = tiny_weights();
  const auto specs = make_specs(34, 16, w->config().vocab_size);
  const auto expected = expected_alone(*w, specs);
  ManualClock clock;
  Faults faults;
  ClusterOptions o = small_cluster(*w, 64, cluster::Policy::kKunServe);
  faults.install(o);
  auto rt = ClusterRuntime::create(o, *w, &clock);
  ASSERT_TRUE(rt.ok()) << rt.status().to_string();
  Tracker tr;
  for (int i = 0; i < 16; ++i) ASSERT_TRUE((*rt)->submit(specs[static_cast<std::size_t>(i)], tr.callback(i)).ok());
  run_steps(**rt, 4);
  auto group = (*rt)->drop({0, 1, 2, 3});
  ASSERT_TRUE(group.ok()) << group.status().to_string();
  run_steps(**rt, 6);
  // Device 1 (the only holder of stage 1's layer at the start) sends it once; every later request
  // for it fails, so the other members get it from whoever pulled it already.
  faults.set([sent = std::make_shared<std::set<std::int64_t>>()](AgentOp op, int device, std::int64_t layer) {
    if (op != AgentOp::kSendLayer || device != 1) return ok_status();
    return sent->insert(layer).second ? ok_status() : injected("layer send");
  });
  ASSERT_TRUE(gather_and_restore(**rt, *group).ok());
  faults.clear();
  EXPECT_GT(faults.failed(AgentOp::kSendLayer), 0);
  EXPECT_EQ(failures_of(**rt, "weight_pull"), 0) << "every retry found a holder";
  EXPECT_EQ((*rt)->num_units(), 4);
  (*rt)->check_integrity();  // every device holds every layer again, with the right checksums below
  for (std::int64_t i = 0; i < 4; ++i) EXPECT_EQ((*rt)->stats().instances[static_cast<std::size_t>(i)].dropped_param_bytes, 0);
  drain(**rt);
  expect_exact(tr, expected, 16);
}

// No device can send a layer: the background pull fails (reported, its pages go back at the
// split), the split's own pull fails too and the split rolls back: the group stays fused and
// restoring and keeps decoding. Once the layer can be sent, the split succeeds.
TEST(ClusterFaultTest, WeightPullFailingEverywhereRollsTheSplitBack) {
  auto w = tiny_weights();
  const auto specs = make_specs(35, 20, w->config().vocab_size);
  const auto expected = expected_alone(*w, specs);
  ManualClock clock;
  Faults faults;
  ClusterOptions o = small_cluster(*w, 64, cluster::Policy::kKunServe);
  faults.install(o);
  auto rt = ClusterRuntime::create(o, *w, &clock);
  ASSERT_TRUE(rt.ok()) << rt.status().to_string();
  Tracker tr;
  for (int i = 0; i < 16; ++i) ASSERT_TRUE((*rt)->submit(specs[static_cast<std::size_t>(i)], tr.callback(i)).ok());
  run_steps(**rt, 6);
  auto group = (*rt)->drop({0, 1});
  ASSERT_TRUE(group.ok()) << group.status().to_string();
  run_steps(**rt, 6);
  faults.set([](AgentOp op, int, std::int64_t layer) { return op == AgentOp::kSendLayer && layer == 0 ? injected("layer send") : ok_status(); });
  const Status split = gather_and_restore(**rt, *group);
  ASSERT_FALSE(split.ok());
  EXPECT_EQ(split.code(), StatusCode::kUnavailable) << split.to_string();
  EXPECT_EQ(failures_of(**rt, "weight_pull"), 1);
  EXPECT_EQ(failures_of(**rt, "split"), 1);
  EXPECT_EQ((*rt)->events().back().kind, "split_failed");
  EXPECT_EQ((*rt)->num_units(), 3);
  EXPECT_EQ((*rt)->group_of(1), *group);
  (*rt)->check_integrity();
  for (int i = 16; i < 20; ++i) ASSERT_TRUE((*rt)->submit(specs[static_cast<std::size_t>(i)], tr.callback(i)).ok());
  const std::int64_t finished_before = (*rt)->stats().requests_finished_total;
  run_steps(**rt, 20);
  EXPECT_GT((*rt)->stats().requests_finished_total, finished_before) << "the group kept decoding after the rollback";
  faults.clear();
  ASSERT_TRUE((*rt)->restore(*group).ok());
  EXPECT_EQ((*rt)->num_units(), 4);
  (*rt)->check_integrity();
  drain(**rt);
  expect_exact(tr, expected, 20);
}

// The restore's repack (live blocks moved inside a device so a layer's pages come free) fails:
// begin_restore leaves those layers for the split, whose repack fails too and rolls back. Once the
// copies work, the split succeeds.
TEST(ClusterFaultTest, FailedRepackRollsTheSplitBack) {
  auto w = tiny_weights();
  const auto specs = make_specs(99, 20, w->config().vocab_size);
  const auto expected = expected_alone(*w, specs);
  ManualClock clock;
  Faults faults;
  ClusterOptions o = small_cluster(*w, 8, cluster::Policy::kKunServe);  // 8 token-blocks per device
  o.scheduler.max_prefill_chunk_tokens = 128;
  faults.install(o);
  auto rt = ClusterRuntime::create(o, *w, &clock);
  ASSERT_TRUE(rt.ok()) << rt.status().to_string();
  auto group = (*rt)->drop({0, 1});
  ASSERT_TRUE(group.ok()) << group.status().to_string();
  Tracker tr;
  for (int i = 0; i < 20; ++i) ASSERT_TRUE((*rt)->submit(specs[static_cast<std::size_t>(i)], tr.callback(i)).ok());
  run_steps(**rt, 8);
  faults.set([](AgentOp op, int, std::int64_t) { return op == AgentOp::kMoveBlocks ? injected("repack copy") : ok_status(); });
  const Status split = (*rt)->restore(*group);
  ASSERT_FALSE(split.ok());
  EXPECT_GT(faults.failed(AgentOp::kMoveBlocks), 0);
  EXPECT_EQ(failures_of(**rt, "split"), 1);
  EXPECT_EQ((*rt)->group_of(0), *group);
  (*rt)->check_integrity();
  run_steps(**rt, 4);
  faults.clear();
  ASSERT_TRUE((*rt)->restore(*group).ok());
  EXPECT_GT((*rt)->events().back().blocks_repacked, 0);
  (*rt)->check_integrity();
  drain(**rt);
  expect_exact(tr, expected, 20);
}

// Regrouping (issue 15) past its commit point. A growth whose drop_layer fails keeps the layer
// (like a drop); the shrink that follows does not pull what the member still holds, and the
// halves restore.
TEST(ClusterFaultTest, FailedDropLayerInAGrowthKeepsTheLayer) {
  auto w = tiny_weights();
  const auto specs = make_specs(41, 20, w->config().vocab_size);
  const auto expected = expected_alone(*w, specs);
  ManualClock clock;
  Faults faults;
  ClusterOptions o = small_cluster(*w, 64, cluster::Policy::kKunServe);
  faults.install(o);
  auto rt = ClusterRuntime::create(o, *w, &clock);
  ASSERT_TRUE(rt.ok()) << rt.status().to_string();
  Tracker tr;
  for (int i = 0; i < 16; ++i) ASSERT_TRUE((*rt)->submit(specs[static_cast<std::size_t>(i)], tr.callback(i)).ok());
  run_steps(**rt, 4);
  auto group = (*rt)->drop({0, 1});
  ASSERT_TRUE(group.ok()) << group.status().to_string();
  run_steps(**rt, 4);
  // Device 0 goes from stage 0 of 2 to stage 0 of 4: it should drop the second quarter.
  faults.set([](AgentOp op, int device, std::int64_t) { return op == AgentOp::kDropLayer && device == 0 ? injected("drop") : ok_status(); });
  auto grown = (*rt)->grow(*group, {2, 3});
  ASSERT_TRUE(grown.ok()) << grown.status().to_string();
  faults.clear();
  EXPECT_GT(faults.failed(AgentOp::kDropLayer), 0);
  EXPECT_EQ(failures_of(**rt, "drop_layer"), 1);
  EXPECT_EQ(failures_of(**rt, "grow"), 0);
  EXPECT_EQ((*rt)->stats().grows_total, 1);
  EXPECT_EQ((*rt)->group_of(3), *grown);
  (*rt)->check_integrity();  // the kept quarter is counted as held twice
  for (int i = 16; i < 20; ++i) ASSERT_TRUE((*rt)->submit(specs[static_cast<std::size_t>(i)], tr.callback(i)).ok());
  run_steps(**rt, 6);
  auto halves = (*rt)->shrink(*grown);
  ASSERT_TRUE(halves.ok()) << halves.status().to_string();
  (*rt)->check_integrity();
  run_steps(**rt, 4);
  for (std::int64_t h : *halves) ASSERT_TRUE(gather_and_restore(**rt, h).ok());
  EXPECT_EQ((*rt)->num_units(), 4);
  (*rt)->check_integrity();
  drain(**rt);
  expect_exact(tr, expected, 20);
}

// A shrink whose weight pull no holder can serve rolls back at its switch: the group of 4 stays
// whole and keeps decoding, layers pulled before the failure stay (held twice), and the retry
// succeeds. `live`: the group decodes (and gathers KV onto the halves) between begin_shrink and
// the switch, so the rollback also clears the homes and leaves the gathered KV where it went.
void weight_pull_failing_everywhere_rolls_the_shrink_back(bool live) {
  auto w = tiny_weights();
  const std::int64_t L = w->config().num_layers;
  const auto specs = make_specs(42, 20, w->config().vocab_size);
  const auto expected = expected_alone(*w, specs);
  ManualClock clock;
  Faults faults;
  ClusterOptions o = small_cluster(*w, 64, cluster::Policy::kKunServe);
  faults.install(o);
  auto rt = ClusterRuntime::create(o, *w, &clock);
  ASSERT_TRUE(rt.ok()) << rt.status().to_string();
  Tracker tr;
  for (int i = 0; i < 16; ++i) ASSERT_TRUE((*rt)->submit(specs[static_cast<std::size_t>(i)], tr.callback(i)).ok());
  run_steps(**rt, 4);
  auto group = (*rt)->drop({0, 1});
  ASSERT_TRUE(group.ok()) << group.status().to_string();
  auto grown = (*rt)->grow(*group, {2, 3});
  ASSERT_TRUE(grown.ok()) << grown.status().to_string();
  run_steps(**rt, 6);
  // Stage 0 of the half keeps stage 1 of the 4: its first layer is held by one device only.
  faults.set([L](AgentOp op, int, std::int64_t layer) { return op == AgentOp::kSendLayer && layer == L / 4 ? injected("layer send") : ok_status(); });
  if (live) {
    const std::int64_t exchanged_before = (*rt)->stats().kv_blocks_exchanged_total;
    ASSERT_TRUE((*rt)->begin_shrink(*grown).ok());
    for (int i = 0; i < 2000 && !(*rt)->ready_to_split(*grown); ++i) run_steps(**rt, 1);
    ASSERT_TRUE((*rt)->ready_to_split(*grown));
    EXPECT_GT((*rt)->stats().kv_blocks_exchanged_total, exchanged_before) << "KV gathered onto the halves while decoding";
    EXPECT_GT(failures_of(**rt, "weight_pull"), 0) << "the live phase's pull failed, left to the switch";
  }
  const auto failed = (*rt)->shrink(*grown);
  ASSERT_FALSE(failed.ok());
  EXPECT_EQ(failed.status().code(), StatusCode::kUnavailable) << failed.status().to_string();
  EXPECT_GT(faults.failed(AgentOp::kSendLayer), 0);
  EXPECT_EQ(failures_of(**rt, "shrink"), 1);
  EXPECT_EQ((*rt)->events().back().kind, "shrink_failed");
  EXPECT_EQ((*rt)->num_units(), 1);
  EXPECT_EQ((*rt)->group_of(0), *grown);
  (*rt)->check_integrity();
  for (int i = 16; i < 20; ++i) ASSERT_TRUE((*rt)->submit(specs[static_cast<std::size_t>(i)], tr.callback(i)).ok());
  const std::int64_t finished_before = (*rt)->stats().requests_finished_total;
  run_steps(**rt, 20);
  EXPECT_GT((*rt)->stats().requests_finished_total, finished_before) << "the group kept decoding after the rollback";
  faults.clear();
  auto halves = (*rt)->shrink(*grown);
  ASSERT_TRUE(halves.ok()) << halves.status().to_string();
  EXPECT_EQ((*rt)->stats().shrinks_total, 1);
  (*rt)->check_integrity();
  for (std::int64_t h : *halves) ASSERT_TRUE(gather_and_restore(**rt, h).ok());
  EXPECT_EQ((*rt)->num_units(), 4);
  (*rt)->check_integrity();
  drain(**rt);
  expect_exact(tr, expected, 20);
}

TEST(ClusterFaultTest, WeightPullFailingEverywhereRollsTheShrinkBack) { weight_pull_failing_everywhere_rolls_the_shrink_back(false); }
TEST(ClusterFaultTest, WeightPullFailingEverywhereRollsALiveShrinkBack) { weight_pull_failing_everywhere_rolls_the_shrink_back(true); }

// A shrink's stop-and-copy KV move that fails: that request recomputes on its half, the shrink
// completes.
TEST(ClusterFaultTest, FailedKvMoveInAShrinkMakesTheRequestRecompute) {
  auto w = tiny_weights();
  const auto specs = make_specs(43, 16, w->config().vocab_size);
  const auto expected = expected_alone(*w, specs);
  ManualClock clock;
  Faults faults;
  ClusterOptions o = small_cluster(*w, 64, cluster::Policy::kKunServe, cluster::StaleKvStrategy::kRemoteAttention);
  faults.install(o);
  auto rt = ClusterRuntime::create(o, *w, &clock);
  ASSERT_TRUE(rt.ok()) << rt.status().to_string();
  auto group = (*rt)->drop({0, 1});
  ASSERT_TRUE(group.ok()) << group.status().to_string();
  auto grown = (*rt)->grow(*group, {2, 3});
  ASSERT_TRUE(grown.ok()) << grown.status().to_string();
  Tracker tr;
  // Requests that start in the group of 4 hold each layer's KV on its stage: the shrink moves half.
  for (int i = 0; i < 16; ++i) ASSERT_TRUE((*rt)->submit(specs[static_cast<std::size_t>(i)], tr.callback(i)).ok());
  run_steps(**rt, 8);
  faults.set([](AgentOp op, int, std::int64_t) { return op == AgentOp::kWriteBlocks ? injected("KV write") : ok_status(); });
  auto halves = (*rt)->shrink(*grown);
  ASSERT_TRUE(halves.ok()) << halves.status().to_string();
  faults.clear();
  const ClusterEvent ev = (*rt)->events().back();
  ASSERT_EQ(ev.kind, "shrink");
  EXPECT_GT(faults.failed(AgentOp::kWriteBlocks), 0);
  EXPECT_GT(failures_of(**rt, "kv_move"), 0);
  EXPECT_GE(ev.requests_recomputed, failures_of(**rt, "kv_move")) << ev.reason;
  EXPECT_EQ(failures_of(**rt, "shrink"), 0);
  (*rt)->check_integrity();
  run_steps(**rt, 4);
  for (std::int64_t h : *halves) ASSERT_TRUE(gather_and_restore(**rt, h).ok());
  (*rt)->check_integrity();
  drain(**rt);
  EXPECT_GT(tr.total_transition_recomputed(), 0);
  expect_exact(tr, expected, 16);
}

// A live migration whose KV copy fails: the request stays where it was, with its KV.
TEST(ClusterFaultTest, FailedMigrationLeavesTheRequestWhereItWas) {
  auto w = tiny_weights();
  const auto specs = make_specs(36, 12, w->config().vocab_size);
  const auto expected = expected_alone(*w, specs);
  ManualClock clock;
  Faults faults;
  ClusterOptions o = small_cluster(*w, 64, cluster::Policy::kMigrate);
  faults.install(o);
  auto rt = ClusterRuntime::create(o, *w, &clock);
  ASSERT_TRUE(rt.ok()) << rt.status().to_string();
  Tracker tr;
  std::vector<RequestId> ids;
  for (int i = 0; i < 12; ++i) {
    auto id = (*rt)->submit(specs[static_cast<std::size_t>(i)], tr.callback(i));
    ASSERT_TRUE(id.ok());
    ids.push_back(*id);
  }
  run_steps(**rt, 5);
  faults.set([](AgentOp op, int, std::int64_t) { return op == AgentOp::kWriteBlocks ? injected("KV write") : ok_status(); });
  int failed = 0;
  for (std::size_t i = 0; i < ids.size(); i += 2) {
    const Status s = (*rt)->migrate(ids[i], static_cast<std::int64_t>((i / 2 + 1) % 4));
    if (s.code() == StatusCode::kUnavailable) ++failed;
  }
  faults.clear();
  EXPECT_GT(failed, 0);
  EXPECT_EQ(failures_of(**rt, "migrate"), failed);
  EXPECT_TRUE(has_event(**rt, "migrate_failed"));
  EXPECT_EQ((*rt)->stats().kv_blocks_exchanged_total, 0) << "no migration's KV landed";
  (*rt)->check_integrity();
  drain(**rt);
  EXPECT_EQ((*rt)->stats().recomputed_tokens_total, 0) << "the requests kept their KV where they were";
  expect_exact(tr, expected, 12);
}

// A weight pull whose puller does not answer in time (its serve thread stalls on the first pull
// for `stall_ms`) is cancelled there, so its weights cannot land later in pages the front end
// reuses. With a stall under two reply timeouts the cancel is answered (nothing was written) and
// the pull is retried at once from another holder; with a longer one the cancel is not answered
// either: the pull fails, and its pages stay reserved for that layer until the split pulls it
// again into them. Either way the restore completes, pages
// balance and every request's tokens are exact.
void unanswered_pull_scenario(std::int64_t stall_ms, std::int64_t expected_pull_failures) {
  auto w = tiny_weights();
  const auto specs = make_specs(38, 16, w->config().vocab_size);
  const auto expected = expected_alone(*w, specs);
  ManualClock clock;
  Faults faults;
  ClusterOptions o = small_cluster(*w, 64, cluster::Policy::kKunServe);
  o.agent_reply_timeout_ms = 1000;
  faults.install(o);
  auto rt = ClusterRuntime::create(o, *w, &clock);
  ASSERT_TRUE(rt.ok()) << rt.status().to_string();
  Tracker tr;
  for (int i = 0; i < 16; ++i) ASSERT_TRUE((*rt)->submit(specs[static_cast<std::size_t>(i)], tr.callback(i)).ok());
  run_steps(**rt, 4);
  auto group = (*rt)->drop({0, 1});
  ASSERT_TRUE(group.ok()) << group.status().to_string();
  run_steps(**rt, 6);
  auto stalled = std::make_shared<std::atomic<bool>>(false);
  faults.set([stalled, stall_ms](AgentOp op, int, std::int64_t) {
    if (op == AgentOp::kPullLayer && !stalled->exchange(true)) std::this_thread::sleep_for(std::chrono::milliseconds(stall_ms));
    return ok_status();
  });
  ASSERT_TRUE(gather_and_restore(**rt, *group).ok());
  faults.clear();
  EXPECT_TRUE(stalled->load());
  EXPECT_EQ(failures_of(**rt, "weight_pull"), expected_pull_failures);
  EXPECT_EQ((*rt)->num_units(), 4);
  (*rt)->check_integrity();
  drain(**rt);
  (*rt)->check_integrity();
  expect_exact(tr, expected, 16);
}

TEST(ClusterFaultTest, TimedOutPullIsCancelledAndRetriedElsewhere) { unanswered_pull_scenario(1500, 0); }
TEST(ClusterFaultTest, UnansweredPullKeepsItsPagesReservedForTheLayer) { unanswered_pull_scenario(2600, 1); }

// A split waiting on a slow transfer (its weight pulls over a paced link) holds no lock: meanwhile
// a request submitted to an independent instance gets its first token, and a drop of two other
// instances completes. (Before, transition_mu_ was held across the split's transfers, so that drop
// waited for the whole split.)
TEST(ClusterFaultTest, SlowSplitTransferBlocksNeitherSubmitsNorOtherTransitions) {
  auto w = tiny_weights();
  const auto specs = make_specs(37, 8, w->config().vocab_size);
  const auto expected = expected_alone(*w, specs);
  SteadyClock clock;
  Faults faults;
  ClusterOptions o = small_cluster(*w, 64, cluster::Policy::kKunServe);
  o.router.policy = cluster::RoutePolicy::kRoundRobin;
  // ~1.4 MB per tiny layer at 4 MB/s: each weight pull takes about 350 ms, four of them at the
  // split. Activations and KV blocks (a few KiB) cross in about a millisecond.
  o.link.bandwidth_bytes_per_s = 4e6;
  faults.install(o);
  auto rt = ClusterRuntime::create(o, *w, &clock);
  ASSERT_TRUE(rt.ok()) << rt.status().to_string();
  (*rt)->start();
  auto group = (*rt)->drop({0, 1});
  ASSERT_TRUE(group.ok()) << group.status().to_string();
  // The background pull fails at once (every layer send refused), so the split pulls every
  // layer itself, paced, with the group paused.
  faults.set([](AgentOp op, int, std::int64_t) { return op == AgentOp::kSendLayer ? injected("layer send") : ok_status(); });
  ASSERT_TRUE((*rt)->begin_restore(*group).ok());
  for (int i = 0; i < 6000 && !(*rt)->ready_to_split(*group); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  ASSERT_TRUE((*rt)->ready_to_split(*group)) << "the failing background pull did not finish";
  ASSERT_GT(failures_of(**rt, "weight_pull"), 0);
  std::mutex mu;
  std::condition_variable cv;
  bool split_pulling = false, split_done = false, first_token = false;
  std::map<std::int64_t, std::vector<std::int32_t>> tokens;
  std::map<std::int64_t, int> finals;
  faults.set([&](AgentOp op, int, std::int64_t) {
    if (op == AgentOp::kSendLayer) {
      std::lock_guard<std::mutex> lock(mu);
      split_pulling = true;
      cv.notify_all();
    }
    return ok_status();
  });
  Status split = internal_error("not run");
  double split_ms = 0;
  std::thread splitter([&] {
    const auto t0 = std::chrono::steady_clock::now();
    split = (*rt)->restore(*group);
    split_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    std::lock_guard<std::mutex> lock(mu);
    split_done = true;
    cv.notify_all();
  });
  {
    std::unique_lock<std::mutex> lock(mu);
    ASSERT_TRUE(cv.wait_for(lock, std::chrono::seconds(60), [&] { return split_pulling; }));
  }
  // Round robin over the four instances: two of these land on instances 2 and 3.
  bool done_at_first_token = true;
  for (int i = 0; i < 4; ++i) {
    ASSERT_TRUE((*rt)->submit(specs[static_cast<std::size_t>(i)], [&, i](const engine::TokenEvent& ev) {
                  std::lock_guard<std::mutex> lock(mu);
                  if (ev.token >= 0) tokens[i].push_back(ev.token);
                  if (ev.finished) ++finals[i];
                  if (ev.token >= 0 && !first_token) {
                    first_token = true;
                    done_at_first_token = split_done;
                  }
                  cv.notify_all();
                }).ok());
  }
  {
    std::unique_lock<std::mutex> lock(mu);
    ASSERT_TRUE(cv.wait_for(lock, std::chrono::seconds(60), [&] { return first_token; }));
    EXPECT_FALSE(done_at_first_token) << "the first token waited for the split";
  }
  const auto drop_t0 = std::chrono::steady_clock::now();
  auto other = (*rt)->drop({2, 3});
  const double drop_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - drop_t0).count();
  ASSERT_TRUE(other.ok()) << other.status().to_string();
  {
    std::lock_guard<std::mutex> lock(mu);
    EXPECT_FALSE(split_done) << "the drop of {2, 3} waited for the split of {0, 1}";
  }
  splitter.join();
  ASSERT_TRUE(split.ok()) << split.to_string();
  std::cout << "split of {0, 1} (paced weight pulls): " << split_ms << " ms; drop of {2, 3} issued meanwhile: " << drop_ms
            << " ms (" << drop_ms / split_ms << " of the split)\n";
  faults.clear();
  for (int i = 4; i < 8; ++i) {
    ASSERT_TRUE((*rt)->submit(specs[static_cast<std::size_t>(i)], [&, i](const engine::TokenEvent& ev) {
                  std::lock_guard<std::mutex> lock(mu);
                  if (ev.token >= 0) tokens[i].push_back(ev.token);
                  if (ev.finished) ++finals[i];
                  cv.notify_all();
                }).ok());
  }
  {
    std::unique_lock<std::mutex> lock(mu);
    ASSERT_TRUE(cv.wait_for(lock, std::chrono::seconds(120), [&] { return finals.size() == 8; }));
  }
  (*rt)->check_integrity();
  (*rt)->stop();
  std::lock_guard<std::mutex> lock(mu);
  for (int i = 0; i < 8; ++i) {
    EXPECT_EQ(finals[i], 1) << "request " << i;
    EXPECT_EQ(tokens[i], expected[static_cast<std::size_t>(i)]) << "request " << i;
  }
}

// A live shrink's pause excludes its weight pulls: over a paced link (each tiny layer about 350 ms)
// begin_shrink returns after reclaiming pages, the group of 4 keeps decoding while the pulls cross
// one after the other (tokens arrive between the first layer send and the last), and the switch
// moves no weight. Tokens stay exact.
TEST(ClusterFaultTest, LiveShrinkDecodesWhileItsPacedWeightPullsRun) {
  auto w = tiny_weights();
  auto specs = make_specs(38, 6, w->config().vocab_size);
  for (auto& s : specs) s.max_tokens = 480;  // decoding through the whole live phase (about 1.4 s of pulls)
  const auto expected = expected_alone(*w, specs);
  SteadyClock clock;
  Faults faults;
  ClusterOptions o = small_cluster(*w, 96, cluster::Policy::kKunServe);
  o.link.bandwidth_bytes_per_s = 4e6;
  o.link.bulk_chunk_bytes = 16 * 1024;  // an activation waits at most ~4 ms behind a weight chunk
  faults.install(o);
  auto rt = ClusterRuntime::create(o, *w, &clock);
  ASSERT_TRUE(rt.ok()) << rt.status().to_string();
  ClusterRuntime& r = **rt;
  r.start();
  auto group = r.drop({0, 1});
  ASSERT_TRUE(group.ok()) << group.status().to_string();
  auto grown = r.grow(*group, {2, 3});
  ASSERT_TRUE(grown.ok()) << grown.status().to_string();
  std::mutex mu;
  std::condition_variable cv;
  std::map<std::int64_t, std::vector<std::int32_t>> tokens;
  std::map<std::int64_t, int> finals;
  std::int64_t tokens_seen = 0;
  for (int i = 0; i < 6; ++i) {
    ASSERT_TRUE(r.submit(specs[static_cast<std::size_t>(i)], [&, i](const engine::TokenEvent& ev) {
                   std::lock_guard<std::mutex> lock(mu);
                   if (ev.token >= 0) {
                     tokens[i].push_back(ev.token);
                     ++tokens_seen;
                   }
                   if (ev.finished) ++finals[i];
                   cv.notify_all();
                 }).ok());
  }
  {
    std::unique_lock<std::mutex> lock(mu);
    ASSERT_TRUE(cv.wait_for(lock, std::chrono::seconds(60), [&] { return tokens_seen >= 12; }));
  }
  std::vector<std::int64_t> tokens_at_send;  // tokens out when each layer send began
  faults.set([&](AgentOp op, int, std::int64_t) {
    if (op == AgentOp::kSendLayer) {
      std::lock_guard<std::mutex> lock(mu);
      tokens_at_send.push_back(tokens_seen);
    }
    return ok_status();
  });
  const std::int64_t weights_before = r.transfer_stats().bytes_of(TransferKind::kWeights);
  auto halves = r.begin_shrink(*grown);
  ASSERT_TRUE(halves.ok()) << halves.status().to_string();
  for (int i = 0; i < 12000 && !r.ready_to_split(*grown); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  ASSERT_TRUE(r.ready_to_split(*grown)) << "the live phase did not finish";
  {
    std::lock_guard<std::mutex> lock(mu);
    ASSERT_GE(tokens_at_send.size(), 2u) << "each member pulls the layers its new stage adds";
    EXPECT_GT(tokens_at_send.back(), tokens_at_send.front()) << "no decode step completed while the paced pulls ran";
    std::cout << "tokens while the " << tokens_at_send.size() << " paced layer pulls ran: " << tokens_at_send.back() - tokens_at_send.front()
              << "\n";
  }
  const std::int64_t weights_at_switch = r.transfer_stats().bytes_of(TransferKind::kWeights);
  EXPECT_GT(weights_at_switch, weights_before);
  auto switched = r.shrink(*grown);
  ASSERT_TRUE(switched.ok()) << switched.status().to_string();
  EXPECT_EQ(r.transfer_stats().bytes_of(TransferKind::kWeights), weights_at_switch) << "the switch pulled weights";
  ClusterEvent ev;
  for (const ClusterEvent& e : r.events()) {
    if (e.kind == "shrink") ev = e;
  }
  ASSERT_EQ(ev.kind, "shrink");
  EXPECT_EQ(ev.bytes, weights_at_switch - weights_before);
  std::cout << "live shrink over a paced link: pause at begin " << ev.begin_pause_ms << " ms, live phase " << ev.gather_ms
            << " ms, switch " << ev.latency_ms << " ms\n";
  {
    std::unique_lock<std::mutex> lock(mu);
    ASSERT_TRUE(cv.wait_for(lock, std::chrono::seconds(120), [&] { return finals.size() == 6; }));
  }
  faults.clear();
  r.check_integrity();
  r.stop();
  std::lock_guard<std::mutex> lock(mu);
  for (int i = 0; i < 6; ++i) {
    EXPECT_EQ(finals[i], 1) << "request " << i;
    EXPECT_EQ(tokens[i], expected[static_cast<std::size_t>(i)]) << "request " << i;
  }
}

}  // namespace
}  // namespace kun::runtime
