// Scheduler with virtual engines (a fused group): admissions are spread over the virtual engines
// so the g micro-batches of the pipeline stay balanced, and no virtual engine touches another's
// requests. Pure scheduler + KV bookkeeping, no model.
#include <gtest/gtest.h>

#include <map>
#include <memory>
#include <set>
#include <vector>

#include "common/clock.h"
#include "engine/kv_manager.h"
#include "engine/scheduler.h"
#include "kv/block_allocator.h"

namespace kun::engine {
namespace {

constexpr std::int64_t kLayers = 4;
constexpr std::int64_t kBlockSize = 16;

struct Fixture {
  ManualClock clock;
  std::vector<std::unique_ptr<kv::KvBlockAllocator>> allocators;
  std::unique_ptr<KvManager> kv;
  std::unique_ptr<Scheduler> scheduler;

  Fixture(std::int64_t g, std::int64_t pages_per_device, SchedulerConfig sc) {
    std::vector<kv::KvBlockAllocator*> devices;
    for (std::int64_t d = 0; d < g; ++d) {
      auto a = std::make_unique<kv::KvBlockAllocator>(4);
      std::vector<kv::PageId> ids;
      for (std::int64_t p = 0; p < pages_per_device; ++p) ids.emplace_back(p);
      KUN_CHECK_OK(a->add_pages(ids));
      devices.push_back(a.get());
      allocators.push_back(std::move(a));
    }
    std::vector<std::int32_t> layer_device;
    for (std::int64_t l = 0; l < kLayers; ++l) layer_device.push_back(static_cast<std::int32_t>(l * g / kLayers));
    kv = std::make_unique<KvManager>(kBlockSize, devices, layer_device, 0);
    sc.num_virtual_engines = g;
    scheduler = std::make_unique<Scheduler>(sc, kv.get(), &clock);
  }
};

// Schedules virtual engine `ve` and applies the step as if it ran (every sampled token is 5).
StepPlan run_step(Scheduler& s, std::int64_t ve) {
  StepPlan plan = s.schedule(ve);
  StepResult result;
  for (const auto& seq : plan.sequences) {
    if (seq.sample) result.sampled_tokens.push_back(5);
  }
  s.apply_result(plan, result);
  return plan;
}

RequestSpec spec(std::int64_t prompt, std::int64_t max_tokens) {
  RequestSpec s;
  s.prompt_tokens.assign(static_cast<std::size_t>(prompt), 7);
  s.max_tokens = max_tokens;
  s.ignore_eos = true;
  return s;
}

// A budget and batch bound that never limit these tests: only the balancing does.
SchedulerConfig roomy(bool balance = true) {
  SchedulerConfig sc;
  sc.max_num_batched_tokens = 4096;
  sc.max_num_seqs = 256;
  sc.balance_virtual_engines = balance;
  return sc;
}

// Submits requests first_id, first_id + 1, ... (n of them) with 20-token prompts.
void submit(Scheduler& s, int first_id, int n, std::int64_t max_tokens) {
  for (int i = 0; i < n; ++i) ASSERT_TRUE(s.add_request(RequestId(first_id + i), spec(20, max_tokens)).ok());
}

TEST(SchedulerVirtualEngines, AdmissionsSpreadEvenlyOverVirtualEngines) {
  Fixture f(4, 256, roomy());
  submit(*f.scheduler, 1, 10, 8);
  // Ten waiting, four virtual engines: each admits at most its share ceil(10 / 4) = 3 even though
  // its token budget would take all ten (3, 3, 3, 1), so every virtual engine gets work.
  std::map<std::int64_t, std::set<std::int64_t>> owned;
  for (std::int64_t ve = 0; ve < 4; ++ve) {
    const StepPlan plan = f.scheduler->schedule(ve);
    for (const auto& s : plan.sequences) owned[ve].insert(s.id.value);
    EXPECT_LE(plan.sequences.size(), 3u) << "virtual engine " << ve;
    EXPECT_GE(plan.sequences.size(), 1u) << "virtual engine " << ve;
  }
  std::set<std::int64_t> all;
  for (const auto& [ve, ids] : owned) {
    for (std::int64_t id : ids) EXPECT_TRUE(all.insert(id).second) << "request " << id << " in two virtual engines";
  }
  EXPECT_EQ(all.size(), 10u);
  EXPECT_EQ(f.scheduler->num_waiting(), 0);
  f.scheduler->check_invariants();
}

TEST(SchedulerVirtualEngines, SingleEngineAdmitsUpToItsBudget) {
  Fixture f(1, 256, roomy());
  submit(*f.scheduler, 1, 10, 8);
  EXPECT_EQ(f.scheduler->schedule(0).sequences.size(), 10u);
}

TEST(SchedulerVirtualEngines, WithoutBalancingTheFirstEngineTakesWhatFits) {
  Fixture f(4, 256, roomy(/*balance=*/false));
  submit(*f.scheduler, 1, 10, 8);
  EXPECT_EQ(f.scheduler->schedule(0).sequences.size(), 10u);
  EXPECT_TRUE(f.scheduler->schedule(1).sequences.empty());
}

TEST(SchedulerVirtualEngines, LaterArrivalsGoToTheLighterEngines) {
  Fixture f(2, 256, roomy());
  submit(*f.scheduler, 1, 4, 100);
  // Virtual engine 0 takes its share (2) of four requests; 1 takes the other two.
  EXPECT_EQ(run_step(*f.scheduler, 0).sequences.size(), 2u);
  EXPECT_EQ(run_step(*f.scheduler, 1).sequences.size(), 2u);
  // Two more arrive while both run: 0 (scheduled next) may take only up to the share of 6 / 2 = 3.
  submit(*f.scheduler, 5, 2, 100);
  const StepPlan p0 = run_step(*f.scheduler, 0);
  EXPECT_EQ(p0.sequences.size(), 3u);  // its two decodes and one admission
  std::int64_t prefills = 0;
  for (const auto& s : p0.sequences) prefills += s.start_pos == 0 ? 1 : 0;
  EXPECT_EQ(prefills, 1);
  EXPECT_EQ(f.scheduler->num_waiting(), 1);
  f.scheduler->check_invariants();
}

TEST(FusedSchedulerConfig, SplitsTheStepBudgetOverVirtualEngines) {
  SchedulerConfig instance;
  instance.max_num_batched_tokens = 512;
  instance.max_num_seqs = 64;
  instance.max_waiting_requests = 100;
  instance.enable_chunked_prefill = false;
  const SchedulerConfig fused = fused_scheduler_config(instance, 4, 16);
  EXPECT_EQ(fused.num_virtual_engines, 4);
  EXPECT_TRUE(fused.enable_chunked_prefill);
  EXPECT_EQ(fused.max_num_batched_tokens, 128);
  EXPECT_EQ(fused.max_num_seqs, 256);
  EXPECT_EQ(fused.max_waiting_requests, 400);
  EXPECT_EQ(fused_scheduler_config(instance, 64, 16).max_num_batched_tokens, 16);  // the floor
  instance.balance_virtual_engines = false;
  EXPECT_EQ(fused_scheduler_config(instance, 4, 16).max_num_batched_tokens, 512);
  EXPECT_EQ(fused_scheduler_config(instance, 1, 16).num_virtual_engines, 1);
}

}  // namespace
}  // namespace kun::engine
