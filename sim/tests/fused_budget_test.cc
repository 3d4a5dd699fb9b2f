// The step budget of a fused group's virtual engines in the simulator (engine::fused_scheduler_config):
// each virtual engine has 1/g of an instance's budget for prompt tokens and runs its decodes beside
// it. A group of 8 whose virtual engines each decode as many sequences as that share holds (the
// chain-of-thought shape: 2,048 / 8 = 256) must still prefill prompts that arrive meanwhile; when
// decodes counted against the share, no prompt got a token until the long generations finished.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>

#include "sim/cluster_sim.h"
#include "workload/trace.h"

namespace kun::sim {
namespace {

TEST(SimFusedBudget, AGroupOfEightFullOfDecodesStillPrefillsPrompts) {
  SimConfig c;
  c.gpu = "a100-80gb";
  c.link = "nvlink-a100";
  c.model_name = "llama-2-7b";
  c.num_instances = 8;
  c.policy = cluster::Policy::kKunServe;
  c.allowed_degrees = {2, 4, 8};
  c.scheduler.max_num_seqs = 320;  // a group of 8 runs up to 2,560: 2,048 decodes leave room to admit
  c.scheduler.max_num_batched_tokens = 2048;
  c.scheduler.max_model_len = 4096;
  c.coordinator.planner.grow_groups = false;
  c.coordinator.planner.shrink_groups = false;
  c.script = {SimConfig::ScriptedTransition{500'000, {0, 1, 2, 3, 4, 5, 6, 7}, -1}};
  workload::Trace t;
  t.name = "decode-full group";
  // 2,048 long generations (256 per instance, so 256 per virtual engine once fused at 0.5 s) ...
  constexpr std::int32_t kLong = 2048;
  for (std::int32_t i = 0; i < kLong; ++i) t.requests.push_back({i * 100, 16, 300});
  // ... and, while they decode, 32 prompts of 512 tokens.
  constexpr std::int32_t kPrompts = 32;
  for (std::int32_t i = 0; i < kPrompts; ++i) t.requests.push_back({3'000'000 + i * 10'000, 512, 4});
  auto rep = run_simulation(c, t);
  ASSERT_TRUE(rep.ok()) << rep.status().to_string();
  ASSERT_EQ(rep->report.completed, static_cast<std::int64_t>(t.size()));
  ASSERT_EQ(rep->counters.drops, 1);
  std::int64_t first_long_finish = -1, last_prompt_first_token = -1, longest_prompt_ttft = 0;
  for (const workload::RequestRecord& r : rep->records) {
    EXPECT_EQ(r.output_tokens, r.expected_output_tokens) << r.index;
    if (r.index < kLong) {
      if (first_long_finish < 0 || r.finish_us < first_long_finish) first_long_finish = r.finish_us;
    } else {
      last_prompt_first_token = std::max(last_prompt_first_token, r.first_token_us);
      longest_prompt_ttft = std::max(longest_prompt_ttft, r.first_token_us - r.arrival_us);
    }
  }
  std::printf("first long generation finished at %.2f s; last prompt's first token at %.2f s (longest TTFT %.2f s)\n",
              static_cast<double>(first_long_finish) / 1e6, static_cast<double>(last_prompt_first_token) / 1e6,
              static_cast<double>(longest_prompt_ttft) / 1e6);
  // Every prompt got its first token while all 2,048 generations were still decoding.
  EXPECT_LT(last_prompt_first_token, first_long_finish);
}

}  // namespace
}  // namespace kun::sim
