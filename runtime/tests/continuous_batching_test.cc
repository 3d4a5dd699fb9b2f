// Continuous batching is exact (issue 3): every request's tokens are identical whether it runs
// alone or among 64 others with random arrivals, chunk sizes, cancels and preemptions (recompute
// and swap). After every step: pages balance, no block leaked or shared, every request is in
// exactly one queue; at the end every request finished exactly once with the right tokens.
#include <map>
#include <random>
#include <set>

#include <gtest/gtest.h>

#include "runtime/tests/test_models.h"

namespace kun::runtime {
namespace {

using testing::InstanceShape;
using testing::make_instance;
using testing::run_alone;
using testing::tiny_weights;

struct Scenario {
  std::vector<engine::RequestSpec> specs;
  std::vector<std::int64_t> arrival_step;
  std::map<std::size_t, std::int64_t> cancel_at_step;  // request index -> step
};

Scenario make_scenario(std::uint64_t seed, std::int64_t n, std::int64_t vocab, bool with_cancels) {
  std::mt19937_64 rng(seed);
  Scenario s;
  for (std::int64_t i = 0; i < n; ++i) {
    engine::RequestSpec spec;
    const std::int64_t prompt_len = std::uniform_int_distribution<std::int64_t>(1, 90)(rng);
    for (std::int64_t t = 0; t < prompt_len; ++t) {
      spec.prompt_tokens.push_back(static_cast<std::int32_t>(std::uniform_int_distribution<std::int64_t>(3, vocab - 1)(rng)));
    }
    spec.max_tokens = std::uniform_int_distribution<std::int64_t>(1, 40)(rng);
    spec.ignore_eos = true;
    if (i % 3 == 1) {  // a third sample with temperature: sampling is deterministic per seed
      spec.sampling.temperature = 0.8f;
      spec.sampling.top_p = 0.9f;
      spec.sampling.top_k = (i % 2) ? 50 : 0;
      spec.sampling.seed = static_cast<std::uint64_t>(1000 + i);
    }
    s.specs.push_back(spec);
    s.arrival_step.push_back(std::uniform_int_distribution<std::int64_t>(0, 30)(rng));
    if (with_cancels && i % 9 == 4) s.cancel_at_step[static_cast<std::size_t>(i)] = std::uniform_int_distribution<std::int64_t>(0, 60)(rng);
  }
  return s;
}

struct Outcome {
  std::vector<std::int32_t> tokens;
  int finals = 0;
  engine::FinishReason reason = engine::FinishReason::kNone;
};

class ContinuousBatchingTest : public ::testing::TestWithParam<std::tuple<engine::PreemptionMode, bool>> {};

TEST_P(ContinuousBatchingTest, TokensMatchRunningAloneUnderChurn) {
  const auto [mode, with_cancels] = GetParam();
  auto weights = tiny_weights();
  ManualClock clock;
  const std::int64_t vocab = weights->config().vocab_size;
  const Scenario sc = make_scenario(mode == engine::PreemptionMode::kSwap ? 11 : 22, 64, vocab, with_cancels);

  InstanceShape roomy;
  auto alone_instance = make_instance(*weights, roomy, &clock);
  std::vector<std::vector<std::int32_t>> expected;
  for (const auto& spec : sc.specs) expected.push_back(run_alone(*alone_instance, spec));

  InstanceShape tight;
  tight.kv_token_blocks = 40;  // ~640 tokens: far below what 64 requests want at once
  tight.host_swap_token_blocks = 24;
  tight.scheduler.preemption = mode;
  tight.scheduler.max_num_batched_tokens = 96;
  tight.scheduler.max_prefill_chunk_tokens = 37;  // odd chunking
  tight.order = kv::AllocationOrder::kShuffled;
  tight.order_seed = 5;
  auto inst = make_instance(*weights, tight, &clock);
  std::int64_t steps = 0;
  inst->engine().set_step_observer([&](const engine::StepPlan&, const engine::StepResult&) {
    inst->check_integrity();
    inst->engine().scheduler().check_invariants();
  });

  std::vector<Outcome> out(sc.specs.size());
  std::map<std::size_t, RequestId> ids;
  std::set<std::size_t> submitted;
  std::int64_t idle_rounds = 0;
  while (true) {
    for (std::size_t i = 0; i < sc.specs.size(); ++i) {
      if (submitted.count(i) || sc.arrival_step[i] > steps) continue;
      auto id = inst->engine().submit(sc.specs[i], [&out, i](const engine::TokenEvent& ev) {
        if (ev.token >= 0) out[i].tokens.push_back(ev.token);
        if (ev.finished) {
          ++out[i].finals;
          out[i].reason = ev.reason;
        }
      });
      ASSERT_TRUE(id.ok()) << id.status().to_string();
      ids[i] = *id;
      submitted.insert(i);
    }
    for (const auto& [i, at] : sc.cancel_at_step) {
      if (at == steps && ids.count(i)) inst->engine().cancel(ids[i]);
    }
    clock.advance_us(1000);
    const bool ran = inst->engine().run_step();
    ++steps;
    if (!ran) {
      if (submitted.size() == sc.specs.size() && ++idle_rounds > 2) break;
    } else {
      idle_rounds = 0;
    }
    ASSERT_LT(steps, 20000) << "no progress";
  }
  const auto& counters = inst->engine().scheduler().counters();
  EXPECT_GT(counters.preemptions_recompute + counters.preemptions_swap, 0) << "scenario must force preemption";
  if (mode == engine::PreemptionMode::kSwap) {
    EXPECT_GT(counters.preemptions_swap, 0);
  }
  std::int64_t cancelled = 0;
  for (std::size_t i = 0; i < sc.specs.size(); ++i) {
    EXPECT_EQ(out[i].finals, 1) << "request " << i << " must finish exactly once";
    if (out[i].reason == engine::FinishReason::kCancelled) {
      ++cancelled;
      ASSERT_LE(out[i].tokens.size(), expected[i].size());
      EXPECT_TRUE(std::equal(out[i].tokens.begin(), out[i].tokens.end(), expected[i].begin())) << "request " << i;
      continue;
    }
    EXPECT_EQ(out[i].reason, engine::FinishReason::kLength) << "request " << i;
    EXPECT_EQ(out[i].tokens, expected[i]) << "request " << i << " diverged from running alone";
  }
  if (with_cancels) {
    EXPECT_GT(cancelled, 0);
  }
  // Everything was given back.
  EXPECT_EQ(inst->allocator().num_used(), 0);
  EXPECT_EQ(inst->kv_manager().host_free_slots(), tight.host_swap_token_blocks * weights->config().num_layers);
}

INSTANTIATE_TEST_SUITE_P(Modes, ContinuousBatchingTest,
                         ::testing::Values(std::make_tuple(engine::PreemptionMode::kRecompute, false),
                                           std::make_tuple(engine::PreemptionMode::kSwap, false),
                                           std::make_tuple(engine::PreemptionMode::kRecompute, true),
                                           std::make_tuple(engine::PreemptionMode::kSwap, true)));

// Memory-throttled: KV for about 8 concurrent requests, 64 arriving at once. Nothing is lost and
// the report shows queueing and preemptions.
TEST(ThrottledScenarioTest, SixtyFourAtOnceAllComplete) {
  auto weights = tiny_weights();
  ManualClock clock;
  InstanceShape shape;
  shape.kv_token_blocks = 8 * 6;  // 8 requests of up to 96 tokens
  shape.scheduler.max_num_batched_tokens = 256;
  auto inst = make_instance(*weights, shape, &clock);
  std::mt19937_64 rng(3);
  std::vector<int> finals(64, 0);
  std::vector<std::int64_t> generated(64, 0);
  std::vector<std::int64_t> max_tokens(64, 0);
  for (int i = 0; i < 64; ++i) {
    engine::RequestSpec spec;
    for (int t = 0; t < 48; ++t) spec.prompt_tokens.push_back(static_cast<std::int32_t>(3 + rng() % 2000));
    spec.max_tokens = 16 + static_cast<std::int64_t>(rng() % 32);
    spec.ignore_eos = true;
    max_tokens[static_cast<std::size_t>(i)] = spec.max_tokens;
    auto id = inst->engine().submit(spec, [&, i](const engine::TokenEvent& ev) {
      if (ev.token >= 0) ++generated[static_cast<std::size_t>(i)];
      if (ev.finished) ++finals[static_cast<std::size_t>(i)];
    });
    ASSERT_TRUE(id.ok());
  }
  std::int64_t max_waiting = 0;
  std::int64_t max_running = 0;
  while (inst->engine().run_step()) {
    clock.advance_us(1000);
    const auto st = inst->engine().stats();
    max_waiting = std::max(max_waiting, st.instances[0].num_waiting);
    max_running = std::max(max_running, st.instances[0].num_running);
    inst->check_integrity();
  }
  for (int i = 0; i < 64; ++i) {
    EXPECT_EQ(finals[static_cast<std::size_t>(i)], 1);
    EXPECT_EQ(generated[static_cast<std::size_t>(i)], max_tokens[static_cast<std::size_t>(i)]);
  }
  const auto& c = inst->engine().scheduler().counters();
  std::printf("throttled: max waiting %lld, max running %lld, preemptions %lld, recomputed tokens %lld, steps %lld\n",
              static_cast<long long>(max_waiting), static_cast<long long>(max_running),
              static_cast<long long>(c.preemptions_recompute), static_cast<long long>(c.recomputed_tokens),
              static_cast<long long>(c.steps));
  EXPECT_GE(max_waiting, 48);
  EXPECT_LE(max_running, 12);
  EXPECT_EQ(c.finished, 64);
}

}  // namespace
}  // namespace kun::runtime
