// Regrouping live fused groups in the runtime (issue 15): a group of 2 grows to 4 (with two free
// instances, or by merging with another group of 2), serves, shrinks back to two groups of 2
// (partial restore) and restores to independent instances, under every stale-KV strategy; every
// request's greedy tokens equal those of a single instance running it alone. A randomized run mixes
// drops, growths, shrinks, restores and cancels and checks the invariants after every step; failed
// growths and shrinks roll back.
#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <iostream>
#include <map>
#include <random>
#include <set>
#include <sstream>

#include <gtest/gtest.h>

#include "runtime/cluster_runtime.h"
#include "runtime/tests/cluster_test_helpers.h"
#include "runtime/tests/test_models.h"

namespace kun::runtime {
namespace {

using testing::tiny_weights;

// The shared small cluster (cluster_test_helpers.h) under the KunServe policy.
ClusterOptions regroup_cluster(const model::WeightSource& w, std::int64_t kv_token_blocks, cluster::StaleKvStrategy stale) {
  return small_cluster(w, kv_token_blocks, cluster::Policy::kKunServe, stale);
}

std::string strategy_name(cluster::StaleKvStrategy st) {
  return st == cluster::StaleKvStrategy::kRecompute         ? "recompute"
         : st == cluster::StaleKvStrategy::kRemoteAttention ? "remote_attention"
                                                            : "exchange";
}

std::int64_t dropped_bytes_total(const engine::ServingStats& st) {
  std::int64_t n = 0;
  for (const auto& is : st.instances) n += is.dropped_param_bytes;
  return n;
}

ClusterEvent last_event(const ClusterRuntime& rt, const std::string& kind) {
  ClusterEvent found;
  for (const ClusterEvent& ev : rt.events()) {
    if (ev.kind == kind) found = ev;
  }
  return found;
}

// Parameters: the stale-KV strategy, and whether the group of 2 grows by merging with another
// group of 2 (else with the two free instances).
class RegroupScenario : public ::testing::TestWithParam<std::tuple<cluster::StaleKvStrategy, bool>> {};

TEST_P(RegroupScenario, GrowShrinkRestoreKeepTokens) {
  const auto [strategy, merge] = GetParam();
  const bool keeps_kv = strategy != cluster::StaleKvStrategy::kRecompute;
  auto w = tiny_weights();
  const auto specs = make_specs(7 + (merge ? 1u : 0u), 28, w->config().vocab_size);
  const auto expected = expected_alone(*w, specs);
  ManualClock clock;
  auto rt = ClusterRuntime::create(regroup_cluster(*w, 64, strategy), *w, &clock);
  ASSERT_TRUE(rt.ok()) << rt.status().to_string();
  ClusterRuntime& r = **rt;
  Tracker tr;
  for (int i = 0; i < 16; ++i) ASSERT_TRUE(r.submit(specs[static_cast<std::size_t>(i)], tr.callback(i)).ok());
  run_steps(r, 5);  // mid-generation
  auto a = r.drop({0, 1});
  ASSERT_TRUE(a.ok()) << a.status().to_string();
  std::vector<std::int64_t> partners{2, 3};
  if (merge) {
    auto b = r.drop({2, 3});
    ASSERT_TRUE(b.ok()) << b.status().to_string();
  }
  run_steps(r, 4);
  for (int i = 16; i < 22; ++i) ASSERT_TRUE(r.submit(specs[static_cast<std::size_t>(i)], tr.callback(i)).ok());
  run_steps(r, 2);
  const engine::ServingStats before = r.stats();
  const std::int64_t remote_before = r.transfer_stats().bytes_of(TransferKind::kRemoteAttention);

  // Growth 2 -> 4: members keep a part of their layers (old stage j at 2j), so nothing is pulled.
  const std::int64_t weights_before = r.transfer_stats().bytes_of(TransferKind::kWeights);
  auto grown = r.grow(*a, partners);
  ASSERT_TRUE(grown.ok()) << grown.status().to_string();
  r.check_integrity();
  EXPECT_EQ(r.num_units(), 1);
  for (std::int64_t i = 0; i < 4; ++i) EXPECT_EQ(r.group_of(i), *grown);
  EXPECT_EQ(r.transfer_stats().bytes_of(TransferKind::kWeights), weights_before) << "growth pulled weights";
  const ClusterEvent grow_ev = last_event(r, "grow");
  ASSERT_EQ(grow_ev.kind, "grow");
  EXPECT_EQ(grow_ev.instances, (std::vector<std::int64_t>{0, 2, 1, 3}));
  EXPECT_FALSE(grow_ev.stale_requests.empty()) << "requests were running at the growth";
  EXPECT_GT(grow_ev.bytes, 0) << "the members dropped more layers";
  const engine::ServingStats after = r.stats();
  EXPECT_GT(dropped_bytes_total(after), dropped_bytes_total(before));
  std::int64_t kv_before = 0, kv_after = 0;
  for (const auto& is : before.instances) kv_before += is.kv_blocks_total;
  for (const auto& is : after.instances) kv_after += is.kv_blocks_total;
  EXPECT_GT(kv_after, kv_before) << "the dropped layers' pages became KV pages";
  if (keeps_kv) {
    EXPECT_EQ(grow_ev.requests_recomputed, 0);
  } else {
    EXPECT_GT(grow_ev.requests_recomputed, 0);
  }
  for (int i = 22; i < 28; ++i) ASSERT_TRUE(r.submit(specs[static_cast<std::size_t>(i)], tr.callback(i)).ok());
  run_steps(r, 6);  // fused serving at degree 4
  if (keeps_kv) {
    EXPECT_GT(r.transfer_stats().bytes_of(TransferKind::kRemoteAttention), remote_before)
        << "layers held away from their new stage were reached by remote attention";
  }

  // Shrink 4 -> 2 + 2: the even stages {0, 1} and the odd stages {2, 3}.
  auto halves = r.shrink(*grown);
  ASSERT_TRUE(halves.ok()) << halves.status().to_string();
  ASSERT_EQ(halves->size(), 2u);
  r.check_integrity();
  EXPECT_EQ(r.num_units(), 2);
  EXPECT_EQ(r.group_of(0), (*halves)[0]);
  EXPECT_EQ(r.group_of(1), (*halves)[0]);
  EXPECT_EQ(r.group_of(2), (*halves)[1]);
  EXPECT_EQ(r.group_of(3), (*halves)[1]);
  const ClusterEvent shrink_ev = last_event(r, "shrink");
  ASSERT_EQ(shrink_ev.kind, "shrink");
  EXPECT_GT(shrink_ev.bytes, 0) << "each member pulled the layer its new stage adds";
  EXPECT_GT(r.transfer_stats().bytes_of(TransferKind::kWeights), weights_before);
  if (keeps_kv) {
    EXPECT_EQ(shrink_ev.requests_recomputed, 0) << shrink_ev.reason;
  }
  run_steps(r, 4);

  // Back to four independent instances.
  for (std::int64_t h : *halves) ASSERT_TRUE(r.restore(h).ok());
  EXPECT_EQ(r.num_units(), 4);
  r.check_integrity();
  drain(r);
  EXPECT_EQ(dropped_bytes_total(r.stats()), 0) << "every device holds every layer again";
  if (keeps_kv) {
    EXPECT_EQ(r.stats().num_preemptions, 0);
    EXPECT_EQ(r.stats().transition_recomputed_tokens_total, 0) << "no transition lost KV";
  }
  // The plans carried out, in order.
  std::vector<std::string> kinds;
  for (const cluster::TransitionRecord& rec : r.transition_log()) kinds.push_back(rec.kind);
  std::vector<std::string> want{"drop"};
  if (merge) want.push_back("drop");
  for (const char* k : {"grow", "shrink", "restore", "split", "restore", "split"}) want.push_back(k);
  EXPECT_EQ(kinds, want);
  const engine::ServingStats final_stats = r.stats();
  EXPECT_EQ(final_stats.drops_total, merge ? 2 : 1);
  EXPECT_EQ(final_stats.grows_total, 1);
  EXPECT_EQ(final_stats.shrinks_total, 1);
  EXPECT_EQ(final_stats.restores_total, 2);
  for (int i = 0; i < 28; ++i) {
    EXPECT_EQ(tr.finals[i], 1) << "request " << i;
    EXPECT_EQ(tr.tokens[i], expected[static_cast<std::size_t>(i)]) << "request " << i;
  }
}

INSTANTIATE_TEST_SUITE_P(StrategiesAndPartners, RegroupScenario,
                         ::testing::Combine(::testing::Values(cluster::StaleKvStrategy::kRecompute,
                                                              cluster::StaleKvStrategy::kRemoteAttention,
                                                              cluster::StaleKvStrategy::kExchange),
                                            ::testing::Bool()),
                         [](const ::testing::TestParamInfo<std::tuple<cluster::StaleKvStrategy, bool>>& p) {
                           std::ostringstream os;
                           os << strategy_name(std::get<0>(p.param)) << (std::get<1>(p.param) ? "_merge" : "_free");
                           return os.str();
                         });

// A live shrink: begin_shrink pulls the layers each half misses and gathers every running request
// onto its half while the group of 4 keeps decoding and new requests keep arriving; the switch
// copies only what the gather left (requests that started after begin_shrink) and pulls no
// weight. Integrity (pages balance, blocks owned once, no request in two places) after every
// step; every request answered once, with the tokens of one instance alone.
class LiveShrinkTest : public ::testing::TestWithParam<cluster::StaleKvStrategy> {};

TEST_P(LiveShrinkTest, RequestsStreamThroughALiveShrink) {
  const cluster::StaleKvStrategy strategy = GetParam();
  const bool keeps_kv = strategy != cluster::StaleKvStrategy::kRecompute;
  auto w = tiny_weights();
  constexpr int kRequests = 36;
  const auto specs = make_specs(51, kRequests, w->config().vocab_size);
  const auto expected = expected_alone(*w, specs);
  ManualClock clock;
  auto rt = ClusterRuntime::create(regroup_cluster(*w, 64, strategy), *w, &clock);
  ASSERT_TRUE(rt.ok()) << rt.status().to_string();
  ClusterRuntime& r = **rt;
  Tracker tr;
  int next = 0;
  const auto submit = [&](int n) {
    for (int k = 0; k < n && next < kRequests; ++k, ++next) {
      ASSERT_TRUE(r.submit(specs[static_cast<std::size_t>(next)], tr.callback(next)).ok());
    }
  };
  const auto tokens_out = [&] {
    std::int64_t n = 0;
    for (const auto& [i, t] : tr.tokens) n += static_cast<std::int64_t>(t.size());
    return n;
  };
  submit(12);
  run_steps(r, 3);
  auto a = r.drop({0, 1});
  ASSERT_TRUE(a.ok()) << a.status().to_string();
  auto grown = r.grow(*a, {2, 3});
  ASSERT_TRUE(grown.ok()) << grown.status().to_string();
  submit(6);
  run_steps(r, 4);
  const std::int64_t weights_before = r.transfer_stats().bytes_of(TransferKind::kWeights);
  auto halves = r.begin_shrink(*grown);
  ASSERT_TRUE(halves.ok()) << halves.status().to_string();
  EXPECT_EQ(r.num_units(), 1) << "the group serves on, whole, during the live phase";
  EXPECT_EQ(r.group_of(0), *grown);
  const std::int64_t tokens_at_begin = tokens_out();
  // Requests keep streaming while the weights come back and the KV gathers (at least a few steps).
  int steps = 0;
  while (steps < 4 || !r.ready_to_split(*grown)) {
    ASSERT_LT(++steps, 3000) << "the live phase did not finish";
    if (steps % 2 == 0) submit(1);
    run_steps(r, 1);  // check_integrity after every step
  }
  EXPECT_GT(tokens_out(), tokens_at_begin) << "the group decoded during the live phase";
  submit(3);  // queued at the switch: they land on a half
  const std::int64_t weights_at_switch = r.transfer_stats().bytes_of(TransferKind::kWeights);
  EXPECT_GT(weights_at_switch, weights_before) << "the live phase pulled the halves' layers";
  auto switched = r.shrink(*grown);
  ASSERT_TRUE(switched.ok()) << switched.status().to_string();
  EXPECT_EQ(*switched, *halves);
  EXPECT_EQ(r.transfer_stats().bytes_of(TransferKind::kWeights), weights_at_switch) << "the switch pulled weights";
  r.check_integrity();
  EXPECT_EQ(r.num_units(), 2);
  EXPECT_EQ(r.group_of(0), (*halves)[0]);
  EXPECT_EQ(r.group_of(1), (*halves)[0]);
  EXPECT_EQ(r.group_of(2), (*halves)[1]);
  const ClusterEvent ev = last_event(r, "shrink");
  ASSERT_EQ(ev.kind, "shrink");
  EXPECT_EQ(ev.bytes, weights_at_switch - weights_before) << "the event counts the live phase's pulls";
  EXPECT_GT(ev.gather_ms, 0);
  if (keeps_kv) {
    EXPECT_GT(ev.kv_blocks_gathered_live, 0) << ev.reason;
    EXPECT_EQ(ev.requests_recomputed, 0) << ev.reason;
  }
  std::cout << "live shrink: pause at begin " << ev.begin_pause_ms << " ms, live phase " << ev.gather_ms << " ms, switch "
            << ev.latency_ms << " ms; " << ev.reason << "\n";
  submit(kRequests);
  run_steps(r, 4);
  for (std::int64_t h : *halves) ASSERT_TRUE(r.restore(h).ok());
  EXPECT_EQ(r.num_units(), 4);
  r.check_integrity();
  drain(r);
  ASSERT_EQ(next, kRequests);
  for (const auto& is : r.stats().instances) EXPECT_EQ(is.kv_blocks_free, is.kv_blocks_total) << "KV left behind";
  if (keeps_kv) {
    EXPECT_EQ(r.stats().transition_recomputed_tokens_total, 0) << "no transition lost KV";
  }
  std::vector<std::string> kinds;
  for (const cluster::TransitionRecord& rec : r.transition_log()) kinds.push_back(rec.kind);
  EXPECT_EQ(kinds, (std::vector<std::string>{"drop", "grow", "shrink", "restore", "split", "restore", "split"}));
  for (int i = 0; i < kRequests; ++i) {
    EXPECT_EQ(tr.finals[i], 1) << "request " << i << " lost or finished twice";
    EXPECT_EQ(tr.tokens[i], expected[static_cast<std::size_t>(i)]) << "request " << i;
  }
}

INSTANTIATE_TEST_SUITE_P(Strategies, LiveShrinkTest,
                         ::testing::Values(cluster::StaleKvStrategy::kRecompute, cluster::StaleKvStrategy::kRemoteAttention,
                                           cluster::StaleKvStrategy::kExchange),
                         [](const ::testing::TestParamInfo<cluster::StaleKvStrategy>& p) { return strategy_name(p.param); });

// Bad requests are refused with a clear status and change nothing.
TEST(RegroupRefusals, BadGrowthsAndShrinksAreRefused) {
  auto w = tiny_weights();
  ManualClock clock;
  auto rt = ClusterRuntime::create(regroup_cluster(*w, 32, cluster::StaleKvStrategy::kExchange), *w, &clock);
  ASSERT_TRUE(rt.ok());
  ClusterRuntime& r = **rt;
  EXPECT_EQ(r.grow(0, {2, 3}).status().code(), StatusCode::kNotFound);
  auto a = r.drop({0, 1});
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(r.grow(*a, {2}).status().code(), StatusCode::kInvalidArgument);     // g partners for a group of g
  EXPECT_EQ(r.grow(*a, {2, 2}).status().code(), StatusCode::kInvalidArgument);  // twice
  EXPECT_EQ(r.shrink(*a).status().code(), StatusCode::kFailedPrecondition);     // degree 2 restores whole
  auto b = r.drop({2, 3});
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(r.grow(*a, {3, 2}).status().code(), StatusCode::kFailedPrecondition);  // not in its stage order
  auto grown = r.grow(*a, {2, 3});
  ASSERT_TRUE(grown.ok()) << grown.status().to_string();
  EXPECT_EQ(r.grow(*grown, {0, 1, 2, 3}).status().code(), StatusCode::kInvalidArgument);  // 8 is not allowed
  r.check_integrity();
}

// A growth or a shrink that fails at its commit point rolls back: the groups stay as they were and
// keep serving, the failure is an event and a metric, and a retry succeeds. Tokens stay exact.
TEST(RegroupFailures, FailedGrowthAndShrinkRollBack) {
  auto w = tiny_weights();
  const auto specs = make_specs(5, 16, w->config().vocab_size);
  const auto expected = expected_alone(*w, specs);
  ManualClock clock;
  ClusterOptions o = regroup_cluster(*w, 64, cluster::StaleKvStrategy::kExchange);
  int fail_next = 0;  // fail this many grow/shrink commits
  o.transition_fault = [&fail_next](const std::string& kind, std::int64_t) -> Status {
    if ((kind == "grow" || kind == "shrink") && fail_next > 0) {
      --fail_next;
      return resource_exhausted("injected " + kind + " failure");
    }
    return ok_status();
  };
  auto rt = ClusterRuntime::create(o, *w, &clock);
  ASSERT_TRUE(rt.ok());
  ClusterRuntime& r = **rt;
  Tracker tr;
  for (int i = 0; i < 16; ++i) ASSERT_TRUE(r.submit(specs[static_cast<std::size_t>(i)], tr.callback(i)).ok());
  run_steps(r, 5);
  auto a = r.drop({0, 1});
  ASSERT_TRUE(a.ok());
  run_steps(r, 2);
  fail_next = 1;
  auto failed = r.grow(*a, {2, 3});
  EXPECT_EQ(failed.status().code(), StatusCode::kResourceExhausted);
  r.check_integrity();
  EXPECT_EQ(r.num_units(), 3);
  EXPECT_EQ(r.group_of(0), *a);
  EXPECT_EQ(r.group_of(2), -1);
  EXPECT_EQ(r.transition_failures()["grow"], 1);
  EXPECT_EQ(r.events().back().kind, "grow_failed");
  run_steps(r, 2);  // the group serves on
  auto grown = r.grow(*a, {2, 3});
  ASSERT_TRUE(grown.ok()) << grown.status().to_string();
  run_steps(r, 3);
  fail_next = 1;
  EXPECT_EQ(r.shrink(*grown).status().code(), StatusCode::kResourceExhausted);
  r.check_integrity();
  EXPECT_EQ(r.num_units(), 1);
  EXPECT_EQ(r.transition_failures()["shrink"], 1);
  run_steps(r, 2);
  auto halves = r.shrink(*grown);
  ASSERT_TRUE(halves.ok()) << halves.status().to_string();
  for (std::int64_t h : *halves) ASSERT_TRUE(r.restore(h).ok());
  drain(r);
  for (int i = 0; i < 16; ++i) {
    EXPECT_EQ(tr.finals[i], 1) << "request " << i;
    EXPECT_EQ(tr.tokens[i], expected[static_cast<std::size_t>(i)]) << "request " << i;
  }
}

// The same regroups with every engine and stage on its own thread (as in serving): a growth and
// a shrink land while steps run; tokens stay exact. The TSan configuration runs this.
class RegroupThreadedTest : public ::testing::TestWithParam<cluster::StaleKvStrategy> {};

TEST_P(RegroupThreadedTest, GrowAndShrinkWhileServingKeepTokens) {
  auto w = tiny_weights();
  const auto specs = make_specs(17, 24, w->config().vocab_size);
  const auto expected = expected_alone(*w, specs);
  SteadyClock clock;
  auto rt = ClusterRuntime::create(regroup_cluster(*w, 64, GetParam()), *w, &clock);
  ASSERT_TRUE(rt.ok()) << rt.status().to_string();
  ClusterRuntime& r = **rt;
  std::mutex mu;
  std::condition_variable cv;
  Tracker tr;
  std::int64_t tokens_seen = 0;
  int finished = 0;
  const auto callback = [&](std::int64_t i) {
    return [&, i](const engine::TokenEvent& ev) {
      std::lock_guard<std::mutex> lock(mu);
      tr.callback(i)(ev);
      if (ev.token >= 0) ++tokens_seen;
      if (ev.finished) ++finished;
      cv.notify_all();
    };
  };
  const auto wait_for = [&](const std::function<bool()>& done) {
    std::unique_lock<std::mutex> lock(mu);
    ASSERT_TRUE(cv.wait_for(lock, std::chrono::seconds(120), done)) << "timed out";
  };
  r.start();
  for (int i = 0; i < 12; ++i) ASSERT_TRUE(r.submit(specs[static_cast<std::size_t>(i)], callback(i)).ok());
  wait_for([&] { return tokens_seen >= 20; });
  auto a = r.drop({0, 1});
  ASSERT_TRUE(a.ok()) << a.status().to_string();
  wait_for([&] { return tokens_seen >= 60; });
  auto grown = r.grow(*a, {2, 3});
  ASSERT_TRUE(grown.ok()) << grown.status().to_string();
  for (int i = 12; i < 24; ++i) ASSERT_TRUE(r.submit(specs[static_cast<std::size_t>(i)], callback(i)).ok());
  wait_for([&] { return tokens_seen >= 140; });
  auto halves = r.shrink(*grown);
  ASSERT_TRUE(halves.ok()) << halves.status().to_string();
  wait_for([&] { return tokens_seen >= 200; });
  for (std::int64_t h : *halves) ASSERT_TRUE(r.restore(h).ok());
  wait_for([&] { return finished == 24; });
  r.check_integrity();
  r.stop();
  EXPECT_EQ(r.num_units(), 4);
  std::lock_guard<std::mutex> lock(mu);
  for (int i = 0; i < 24; ++i) {
    EXPECT_EQ(tr.finals[i], 1) << "request " << i;
    EXPECT_EQ(tr.tokens[i], expected[static_cast<std::size_t>(i)]) << "request " << i;
  }
}

INSTANTIATE_TEST_SUITE_P(Strategies, RegroupThreadedTest,
                         ::testing::Values(cluster::StaleKvStrategy::kRecompute, cluster::StaleKvStrategy::kRemoteAttention,
                                           cluster::StaleKvStrategy::kExchange),
                         [](const ::testing::TestParamInfo<cluster::StaleKvStrategy>& p) { return strategy_name(p.param); });

// The policy loop regroups on its own (cluster::Coordinator with grow_groups and shrink_groups
// on): two groups of 2, one flooded with long prompts and one with short ones; the flooded
// group's load against its fused capacity votes for more memory and it merges with the other
// (2 -> 4); as the long requests finish the group of 4 shrinks back to two groups of 2 and those
// restore. Tokens stay exact throughout.
TEST(RegroupPolicy, OverloadedGroupGrowsThenShrinksAndRestores) {
  auto w = tiny_weights();
  const auto& c = w->config();
  std::mt19937_64 rng(3);
  std::vector<engine::RequestSpec> specs;
  for (int i = 0; i < 40; ++i) {
    engine::RequestSpec s;
    const int len = i % 2 == 0 ? 560 + static_cast<int>(rng() % 40) : 8 + static_cast<int>(rng() % 8);
    for (int t = 0; t < len; ++t) s.prompt_tokens.push_back(static_cast<std::int32_t>(3 + rng() % static_cast<std::uint64_t>(c.vocab_size - 3)));
    s.max_tokens = 6 + static_cast<std::int64_t>(rng() % 6);
    s.ignore_eos = true;
    specs.push_back(std::move(s));
  }
  const auto expected = expected_alone(*w, specs);
  ManualClock clock;
  ClusterOptions o = regroup_cluster(*w, 64, cluster::StaleKvStrategy::kExchange);
  o.scheduler.max_num_batched_tokens = 512;
  o.scheduler.max_prefill_chunk_tokens = 256;
  o.coordinator.monitor.sample_period_us = 1000;
  o.coordinator.monitor.window_samples = 6;
  o.coordinator.monitor.min_trend_samples = 3;
  o.coordinator.monitor.falling_slope_threshold_per_sample = 1e-9;  // flat counts as falling once idle
  ASSERT_TRUE(o.coordinator.planner.grow_groups && o.coordinator.planner.shrink_groups) << "the defaults regroup";
  auto rt = ClusterRuntime::create(o, *w, &clock);
  ASSERT_TRUE(rt.ok()) << rt.status().to_string();
  ClusterRuntime& r = **rt;
  ASSERT_TRUE(r.drop({0, 1}).ok());
  ASSERT_TRUE(r.drop({2, 3}).ok());
  Tracker tr;
  // Least-outstanding routing alternates between the two groups: the long prompts go to {0, 1}.
  for (int i = 0; i < 40; ++i) ASSERT_TRUE(r.submit(specs[static_cast<std::size_t>(i)], tr.callback(i)).ok());
  for (int round = 0; round < 5000; ++round) {
    const bool busy = r.run_step_all();
    r.check_integrity();
    clock.advance_us(1000);
    r.run_policy_round();
    if (!busy && r.num_units() == 4) break;
  }
  std::map<std::string, int> kinds;
  for (const ClusterEvent& ev : r.events()) {
    ++kinds[ev.kind];
    std::cout << ev.kind << " group " << ev.group << ": " << ev.reason << "\n";
  }
  EXPECT_EQ(kinds["grow"], 1);
  EXPECT_GE(kinds["shrink"], 1);
  EXPECT_EQ(r.stats().grows_total, kinds["grow"]);
  EXPECT_EQ(r.stats().shrinks_total, kinds["shrink"]);
  EXPECT_EQ(r.num_units(), 4) << "every group restored once idle";
  EXPECT_TRUE(r.transition_failures().empty());
  for (int i = 0; i < 40; ++i) {
    EXPECT_EQ(tr.finals[i], 1) << "request " << i;
    EXPECT_EQ(tr.tokens[i], expected[static_cast<std::size_t>(i)]) << "request " << i;
  }
}

// Random drops, growths (with free instances or by merging), shrinks, restores (with and without a
// gather phase of some steps) and cancels under a tight KV budget; invariants after every step and
// exact tokens at the end.
class RegroupPropertyTest : public ::testing::TestWithParam<cluster::StaleKvStrategy> {};

TEST_P(RegroupPropertyTest, RandomRegroupsAndCancelsKeepInvariants) {
  auto w = tiny_weights();
  const auto specs = make_specs(123, 48, w->config().vocab_size);
  const auto expected = expected_alone(*w, specs);
  ManualClock clock;
  auto rt = ClusterRuntime::create(regroup_cluster(*w, 24, GetParam()), *w, &clock);
  ASSERT_TRUE(rt.ok());
  ClusterRuntime& r = **rt;
  Tracker tr;
  std::mt19937_64 rng(11);
  std::map<int, RequestId> ids;
  std::map<std::int64_t, std::vector<std::int64_t>> groups;  // live groups, stage order
  std::int64_t gathering = -1;                                // a group in its restore's gather phase
  std::int64_t shrinking = -1;                                // a group of 4 in its shrink's live phase
  std::vector<std::int64_t> shrinking_members;
  std::map<std::string, int> done;
  int next = 0;
  const auto independent = [&] {
    std::vector<std::int64_t> out;
    for (std::int64_t i = 0; i < 4; ++i) {
      if (r.group_of(i) < 0) out.push_back(i);
    }
    return out;
  };
  for (int step = 0; step < 500 && (next < 48 || r.run_step_all()); ++step) {
    if (next < 48 && rng() % 2 == 0) {
      auto id = r.submit(specs[static_cast<std::size_t>(next)], tr.callback(next));
      ASSERT_TRUE(id.ok()) << id.status().to_string();
      ids[next] = *id;
      ++next;
    }
    const auto action = rng() % 16;
    if (action == 0) {  // drop two (or all four) independent instances
      std::vector<std::int64_t> free = independent();
      std::shuffle(free.begin(), free.end(), rng);
      if (free.size() >= 2) {
        std::vector<std::int64_t> members(free.begin(), free.begin() + (free.size() == 4 && rng() % 2 ? 4 : 2));
        std::sort(members.begin(), members.end());
        auto g = r.drop(members);
        ASSERT_TRUE(g.ok()) << g.status().to_string();
        groups[*g] = members;
        ++done["drop"];
      }
    } else if (action == 1 && gathering < 0) {  // grow a group of 2 with the free pair or the other group
      for (const auto& [id, members] : groups) {
        if (members.size() != 2) continue;
        if (shrinking >= 0) break;  // the other pair may be the shrinking group's
        std::vector<std::int64_t> partners = independent();
        std::int64_t other = -1;
        if (partners.size() < 2) {
          for (const auto& [oid, om] : groups) {
            if (oid != id && om.size() == 2) other = oid;
          }
          if (other < 0) break;
          partners = groups[other];
        } else {
          partners.resize(2);
        }
        const std::vector<std::int64_t> grower = members;
        const std::int64_t grower_id = id;
        auto g = r.grow(grower_id, partners);
        ASSERT_TRUE(g.ok()) << g.status().to_string();
        groups.erase(grower_id);
        if (other >= 0) groups.erase(other);
        groups[*g] = {grower[0], partners[0], grower[1], partners[1]};
        ++done["grow"];
        break;
      }
    } else if (action == 2 && gathering < 0 && shrinking < 0) {  // shrink a group of 4, half the time live
      for (const auto& [id, members] : groups) {
        if (members.size() != 4) continue;
        const std::vector<std::int64_t> m = members;
        const std::int64_t gid = id;
        if (rng() % 2 == 0) {
          ASSERT_TRUE(r.begin_shrink(gid).ok());
          shrinking = gid;
          shrinking_members = m;
          break;
        }
        auto halves = r.shrink(gid);
        ASSERT_TRUE(halves.ok()) << halves.status().to_string();
        groups.erase(gid);
        groups[(*halves)[0]] = {m[0], m[2]};
        groups[(*halves)[1]] = {m[1], m[3]};
        ++done["shrink"];
        break;
      }
    } else if (action == 3 && !groups.empty() && gathering < 0 && groups.begin()->first != shrinking) {
      // restore, half the time with a gather phase
      const std::int64_t gid = groups.begin()->first;
      if (rng() % 2 == 0) {
        ASSERT_TRUE(r.begin_restore(gid).ok());
        gathering = gid;
      } else {
        ASSERT_TRUE(r.restore(gid).ok());
        groups.erase(gid);
        ++done["restore"];
      }
    } else if (action == 4 && gathering >= 0) {
      ASSERT_TRUE(r.restore(gathering).ok());
      groups.erase(gathering);
      gathering = -1;
      ++done["restore"];
    } else if (action == 6 && shrinking >= 0) {  // the live shrink's switch
      auto halves = r.shrink(shrinking);
      ASSERT_TRUE(halves.ok()) << halves.status().to_string();
      groups.erase(shrinking);
      groups[(*halves)[0]] = {shrinking_members[0], shrinking_members[2]};
      groups[(*halves)[1]] = {shrinking_members[1], shrinking_members[3]};
      shrinking = -1;
      ++done["shrink"];
      ++done["live shrink"];
    } else if (action == 5 && !ids.empty()) {
      auto it = ids.begin();
      std::advance(it, static_cast<long>(rng() % ids.size()));
      r.cancel(it->second);
    }
    r.run_step_all();
    r.check_integrity();
    for (const auto& [id, members] : groups) {
      for (std::int64_t m : members) ASSERT_EQ(r.group_of(m), id);
    }
    clock.advance_us(1000);
  }
  if (shrinking >= 0) {
    auto halves = r.shrink(shrinking);
    ASSERT_TRUE(halves.ok()) << halves.status().to_string();
    groups.erase(shrinking);
    groups[(*halves)[0]] = {};
    groups[(*halves)[1]] = {};
    ++done["live shrink"];
  }
  for (const auto& [id, members] : groups) ASSERT_TRUE(r.restore(id).ok());
  drain(r);
  ASSERT_EQ(next, 48);
  std::cout << "transitions: drop " << done["drop"] << ", grow " << done["grow"] << ", shrink " << done["shrink"] << ", restore "
            << done["restore"] << " (live shrinks " << done["live shrink"] << ")\n";
  EXPECT_GT(done["grow"], 0);
  EXPECT_GT(done["shrink"], 0);
  for (int i = 0; i < 48; ++i) {
    EXPECT_EQ(tr.finals[i], 1) << "request " << i << " lost or finished twice";
    const auto& got = tr.tokens[i];
    const auto& want = expected[static_cast<std::size_t>(i)];
    if (tr.reasons[i] == engine::FinishReason::kCancelled) {
      ASSERT_LE(got.size(), want.size());
      EXPECT_TRUE(std::equal(got.begin(), got.end(), want.begin())) << "request " << i;
    } else {
      EXPECT_EQ(got, want) << "request " << i;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Strategies, RegroupPropertyTest,
                         ::testing::Values(cluster::StaleKvStrategy::kRecompute, cluster::StaleKvStrategy::kRemoteAttention,
                                           cluster::StaleKvStrategy::kExchange),
                         [](const ::testing::TestParamInfo<cluster::StaleKvStrategy>& p) { return strategy_name(p.param); });

}  // namespace
}  // namespace kun::runtime
