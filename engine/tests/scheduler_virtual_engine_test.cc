// Scheduler with virtual engines (a fused group): lookahead admission spreads requests over the
// virtual engines by predicted step cost so the g micro-batches of the pipeline stay balanced,
// long prompts are chunked to the typical length, and no virtual engine touches another's
// requests. Pure scheduler + KV bookkeeping, no model.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "common/clock.h"
#include "engine/kv_manager.h"
#include "engine/scheduler.h"
#include "engine/step_cost.h"
#include "engine/tests/scheduler_test_util.h"
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

using testing::apply;
using testing::spec;

// Schedules virtual engine `ve` and applies the step as if it ran.
StepPlan run_step(Scheduler& s, std::int64_t ve) {
  StepPlan plan = s.schedule(ve);
  apply(s, plan);
  return plan;
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
  // Ten equal prompts, four idle virtual engines: the lookahead plans them round-robin (3, 3, 2,
  // 2) even though the first one's token budget would take all ten, so every one gets work.
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
  // Four equal prompts over two idle virtual engines: 0 plans two onto each and admits its own.
  EXPECT_EQ(run_step(*f.scheduler, 0).sequences.size(), 2u);
  // 0 now only decodes two tokens, cheaper than a 20-token prefill: of the two left, 1 admits one
  // and the other is planned onto 0, the lighter.
  EXPECT_EQ(run_step(*f.scheduler, 1).sequences.size(), 1u);
  EXPECT_EQ(f.scheduler->num_waiting(), 1);
  // Two decodes on 0, one on 1: the last one waits for 1, so 0 runs its decodes alone, and 1
  // takes it with its own decode.
  EXPECT_EQ(run_step(*f.scheduler, 0).sequences.size(), 2u);
  EXPECT_EQ(run_step(*f.scheduler, 1).sequences.size(), 2u);
  EXPECT_EQ(f.scheduler->num_waiting(), 0);
  // Two more arrive while both decode two requests each: 0 (scheduled next, ties go to it) takes
  // one, the other is planned onto 1.
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
  EXPECT_EQ(fused.max_step_tokens_with_decodes, 512);  // decodes ride outside the share, up to this
  EXPECT_EQ(fused_scheduler_config(instance, 64, 16).max_num_batched_tokens, 16);  // the floor
  EXPECT_EQ(instance.max_step_tokens_with_decodes, 0);
  instance.balance_virtual_engines = false;
  EXPECT_EQ(fused_scheduler_config(instance, 4, 16).max_num_batched_tokens, 512);
  EXPECT_EQ(fused_scheduler_config(instance, 4, 16).max_step_tokens_with_decodes, 0);  // decodes count
  EXPECT_EQ(fused_scheduler_config(instance, 1, 16).num_virtual_engines, 1);
}

using Counts = std::pair<std::int64_t, std::int64_t>;

// Brings `n` requests with one-token prompts to decoding, then queues one `prompt`-token prompt
// and returns the next step's decode count and that prompt's tokens.
std::pair<std::int64_t, std::int64_t> decodes_and_prompt_tokens(const SchedulerConfig& sc, int n, std::int64_t prompt) {
  Fixture f(1, 1024, sc);
  for (int i = 0; i < n; ++i) KUN_CHECK_OK(f.scheduler->add_request(RequestId(1 + i), spec(1, 100)));
  for (int step = 0; step < 8 && f.scheduler->num_waiting() > 0; ++step) run_step(*f.scheduler, 0);
  run_step(*f.scheduler, 0);  // every one has sampled its first token: all decode now
  KUN_CHECK_EQ(f.scheduler->num_waiting(), 0);
  KUN_CHECK_OK(f.scheduler->add_request(RequestId(1000), spec(prompt, 10)));
  const StepPlan plan = run_step(*f.scheduler, 0);
  std::int64_t decodes = 0, prompt_tokens = 0;
  for (const auto& s : plan.sequences) {
    if (s.id == RequestId(1000)) {
      prompt_tokens += static_cast<std::int64_t>(s.tokens.size());
    } else {
      EXPECT_EQ(s.tokens.size(), 1u) << "request " << s.id.value;
      ++decodes;
    }
  }
  f.scheduler->check_invariants();
  return {decodes, prompt_tokens};
}

TEST(FusedSchedulerConfig, DecodesRideOutsideThePromptShareUpToTheInstanceBudget) {
  // A virtual engine's share is 32 tokens of a 64-token instance budget (g = 2).
  SchedulerConfig sc;
  sc.max_num_batched_tokens = 32;
  sc.max_num_seqs = 100;
  // Decodes counted against the share (before): 20 decodes leave the prompt 12 tokens.
  EXPECT_EQ(decodes_and_prompt_tokens(sc, 20, 200), (Counts{20, 12}));
  // Outside it: the prompt gets the whole share beside the 20 decodes.
  sc.max_step_tokens_with_decodes = 64;
  EXPECT_EQ(decodes_and_prompt_tokens(sc, 20, 200), (Counts{20, 32}));
  // 40 decodes: 32 fill the room above the share, 8 spend the share, the prompt gets 24: the step
  // never carries more than the instance's 64 tokens.
  EXPECT_EQ(decodes_and_prompt_tokens(sc, 40, 200), (Counts{40, 24}));
  // A group of 8 holding 256 sequences per virtual engine (the CoT scenario's shape): before, the
  // 256-token share of a 2,048-token budget went to decodes and no prompt token ran.
  sc.max_num_batched_tokens = 256;
  sc.max_num_seqs = 400;
  sc.max_step_tokens_with_decodes = 0;
  EXPECT_EQ(decodes_and_prompt_tokens(sc, 256, 1000).second, 0);
  sc.max_step_tokens_with_decodes = 2048;
  EXPECT_EQ(decodes_and_prompt_tokens(sc, 256, 1000), (Counts{256, 256}));
}

// Context matters here: a pair of (query, key) costs 1/20 of a token's linear layers.
StepCostModel context_heavy() {
  StepCostModel m;
  m.fixed_us = 100.0;
  m.per_token_us = 1.0;
  m.per_context_token_us = 0.05;
  return m;
}

double max_over_min(double a, double b) { return std::max(a, b) / std::min(a, b); }

TEST(StepCostModel, CountsTokensAttentionPairsAndTheFixedCost) {
  const StepCostModel m = context_heavy();
  // 3 new tokens after 10 cached attend to 11, 12 and 13 keys.
  EXPECT_DOUBLE_EQ(StepCostModel::attention_pairs(10, 3), 36.0);
  EXPECT_DOUBLE_EQ(StepCostModel::attention_pairs(0, 1), 1.0);
  EXPECT_DOUBLE_EQ(m.sequence_us(10, 3), 3.0 + 0.05 * 36.0);
  EXPECT_DOUBLE_EQ(m.sequence_us(10, 0), 0.0);
  StepPlan plan;
  EXPECT_DOUBLE_EQ(m.plan_us(plan), 0.0);  // no forward, no fixed cost
  plan.sequences.resize(2);
  plan.sequences[0].start_pos = 10;
  plan.sequences[0].tokens.assign(3, 7);
  plan.sequences[1].start_pos = 99;  // a decode at context 99
  plan.sequences[1].tokens.assign(1, 7);
  EXPECT_DOUBLE_EQ(m.plan_us(plan), 100.0 + m.sequence_us(10, 3) + (1.0 + 0.05 * 100.0));
}

TEST(StepCostModel, ForShapeDerivesTheRatioFromFlops) {
  // 2 * params FLOPs a token, 4 * layers * hidden per pair; 1e6 FLOP/us makes them microseconds.
  const StepCostModel m = StepCostModel::for_shape(1e9, 16, 2048, 1e6, 50.0);
  EXPECT_DOUBLE_EQ(m.per_token_us, 2000.0);
  EXPECT_DOUBLE_EQ(m.per_context_token_us, 4.0 * 16 * 2048 / 1e6);
  EXPECT_DOUBLE_EQ(m.fixed_us, 50.0);
  // The defaults are a 7B model at the default rate.
  const StepCostModel d = StepCostModel::for_shape(7e9, 32, 4096);
  const StepCostModel def;
  EXPECT_DOUBLE_EQ(def.per_token_us, d.per_token_us);
  EXPECT_DOUBLE_EQ(def.per_context_token_us, d.per_context_token_us);
  EXPECT_DOUBLE_EQ(def.fixed_us, d.fixed_us);
  // Only the ratio matters to the scheduler: a faster device scales every term alike.
  const StepCostModel fast = StepCostModel::for_shape(7e9, 32, 4096, 4e8, 250.0);
  EXPECT_DOUBLE_EQ(fast.sequence_us(1000, 64) * 4.0, d.sequence_us(1000, 64));
}

TEST(SchedulerVirtualEngines, LookaheadBalancesPredictedCostNotCount) {
  SchedulerConfig sc = roomy();
  sc.step_cost = context_heavy();
  sc.min_prefill_chunk_tokens = 4096;  // no typical-length chunking: the partition alone
  Fixture f(2, 1024, sc);
  const std::vector<std::int64_t> prompts = {400, 400, 400, 400, 20, 20, 20, 20};
  for (std::size_t i = 0; i < prompts.size(); ++i) {
    ASSERT_TRUE(f.scheduler->add_request(RequestId(static_cast<std::int64_t>(i) + 1), spec(prompts[i], 50)).ok());
  }
  // The share rule would give virtual engine 0 the first half of the queue (every long prompt)
  // and 1 the second: count-balanced, cost-skewed, in the prefill round and in every decode
  // round after it (long contexts on one side).
  const StepCostModel& m = sc.step_cost;
  double share_prefill[2] = {m.fixed_us, m.fixed_us}, share_decode[2] = {m.fixed_us, m.fixed_us};
  for (std::size_t i = 0; i < prompts.size(); ++i) {
    share_prefill[i / 4] += m.sequence_us(0, prompts[i]);
    share_decode[i / 4] += m.sequence_us(prompts[i], 1);
  }
  // Lookahead: 0 plans while 1 is idle, then 1 plans while 0's step is in flight.
  const StepPlan p0 = f.scheduler->schedule(0);
  const StepPlan p1 = f.scheduler->schedule(1);
  EXPECT_EQ(f.scheduler->num_waiting(), 0);
  const double prefill_ratio = max_over_min(m.plan_us(p0), m.plan_us(p1));
  const std::vector<double> loads = f.scheduler->predicted_loads();  // the same, as the scheduler sees it
  EXPECT_LE(max_over_min(loads[0], loads[1]), 1.05);
  apply(*f.scheduler, p0);
  apply(*f.scheduler, p1);
  const StepPlan d0 = f.scheduler->schedule(0);
  const StepPlan d1 = f.scheduler->schedule(1);
  const double decode_ratio = max_over_min(m.plan_us(d0), m.plan_us(d1));
  const double share_prefill_ratio = max_over_min(share_prefill[0], share_prefill[1]);
  const double share_decode_ratio = max_over_min(share_decode[0], share_decode[1]);
  std::printf("max/min predicted cost: prefill %.3f (share rule %.3f), decode %.3f (share rule %.3f)\n", prefill_ratio,
              share_prefill_ratio, decode_ratio, share_decode_ratio);
  EXPECT_LE(prefill_ratio, 1.05);
  EXPECT_LE(decode_ratio, 1.05);
  EXPECT_LT(prefill_ratio, share_prefill_ratio);
  EXPECT_LT(decode_ratio, share_decode_ratio);
  EXPECT_EQ(d0.sequences.size(), 4u);  // same count as the share rule, different requests
  EXPECT_EQ(d1.sequences.size(), 4u);
  f.scheduler->check_invariants();
}

// The prefill chunks request `id` gets until it samples, scheduling the virtual engines in turn.
std::vector<std::int64_t> chunks_until_sampled(Scheduler& s, std::int64_t g, RequestId id) {
  std::vector<std::int64_t> chunks;
  for (int step = 0; step < 200; ++step) {
    const StepPlan plan = run_step(s, step % g);
    for (const auto& seq : plan.sequences) {
      if (seq.id != id) continue;
      chunks.push_back(static_cast<std::int64_t>(seq.tokens.size()));
      if (seq.sample) return chunks;
    }
  }
  ADD_FAILURE() << "request " << id << " never sampled";
  return chunks;
}

TEST(SchedulerVirtualEngines, LongPromptIsChunkedToTheTypicalLength) {
  for (bool balance : {true, false}) {
    Fixture f(2, 1024, roomy(balance));
    // Seven short prompts (lower median 36), then a long one: 500 tokens in pieces of 36. Its own
    // length joins the record but leaves the median where it is.
    const std::vector<std::int64_t> shorts = {24, 28, 32, 36, 40, 44, 48};
    for (std::size_t i = 0; i < shorts.size(); ++i) {
      ASSERT_TRUE(f.scheduler->add_request(RequestId(static_cast<std::int64_t>(i) + 1), spec(shorts[i], 100)).ok());
    }
    for (int step = 0; step < 8 && f.scheduler->num_waiting() > 0; ++step) run_step(*f.scheduler, step % 2);
    ASSERT_EQ(f.scheduler->num_waiting(), 0);
    ASSERT_TRUE(f.scheduler->add_request(RequestId(100), spec(500, 4)).ok());
    const std::vector<std::int64_t> chunks = chunks_until_sampled(*f.scheduler, 2, RequestId(100));
    std::int64_t total = 0;
    for (std::int64_t c : chunks) total += c;
    EXPECT_EQ(total, 500);
    if (!balance) {
      EXPECT_EQ(chunks, std::vector<std::int64_t>{500});  // only the step budget limits it
      EXPECT_EQ(f.scheduler->typical_chunk_tokens(), 0);
      continue;
    }
    EXPECT_EQ(f.scheduler->typical_chunk_tokens(), 36);
    ASSERT_EQ(chunks.size(), 14u);  // ceil(500 / 36)
    for (std::size_t i = 0; i + 1 < chunks.size(); ++i) EXPECT_EQ(chunks[i], 36) << "chunk " << i;
    EXPECT_EQ(chunks.back(), 500 - 13 * 36);
    f.scheduler->check_invariants();
  }
}

TEST(SchedulerVirtualEngines, TypicalChunkHasAFloor) {
  SchedulerConfig sc = roomy();
  Fixture f(2, 1024, sc);
  submit(*f.scheduler, 1, 3, 100);  // 20-token prompts: one KV block (16) is below, so 20
  run_step(*f.scheduler, 0);
  run_step(*f.scheduler, 1);
  EXPECT_EQ(f.scheduler->typical_chunk_tokens(), 20);
  SchedulerConfig floored = roomy();
  floored.min_prefill_chunk_tokens = 64;
  Fixture g(2, 1024, floored);
  submit(*g.scheduler, 1, 3, 100);
  run_step(*g.scheduler, 0);
  run_step(*g.scheduler, 1);
  EXPECT_EQ(g.scheduler->typical_chunk_tokens(), 64);
}

TEST(SchedulerVirtualEngines, QueueHeadIsNotPassedOverForever) {
  SchedulerConfig sc = roomy();
  sc.max_num_batched_tokens = 256;
  sc.max_prefill_chunk_tokens = 128;
  sc.step_cost = context_heavy();
  sc.min_prefill_chunk_tokens = 4096;  // no typical-length cap: 0 stays the heavy one
  Fixture f(2, 1024, sc);
  // Virtual engine 0 prefills a 2000-token prompt in 128-token chunks (half its budget); 1 holds
  // one short request whose step is in flight and does not come back (a slow step, say) for the
  // rest of the test.
  ASSERT_TRUE(f.scheduler->add_request(RequestId(1), spec(2000, 10)).ok());
  run_step(*f.scheduler, 0);
  ASSERT_TRUE(f.scheduler->add_request(RequestId(2), spec(20, 10)).ok());
  const StepPlan in_flight = f.scheduler->schedule(1);
  ASSERT_EQ(in_flight.sequences.size(), 1u);
  // A new request is the queue head. Every plan puts it onto 1, far lighter, so 0 passes it
  // over; after g = 2 passes it is 0's, which admits it on the third call (the first one with
  // budget left after its own running requests, as here).
  ASSERT_TRUE(f.scheduler->add_request(RequestId(3), spec(20, 10)).ok());
  int calls = 0;
  bool admitted = false;
  while (!admitted && calls < 10) {
    const StepPlan plan = run_step(*f.scheduler, 0);
    ++calls;
    for (const auto& seq : plan.sequences) admitted = admitted || seq.id == RequestId(3);
  }
  EXPECT_TRUE(admitted);
  EXPECT_EQ(calls, 3);
  EXPECT_EQ(f.scheduler->find(RequestId(3))->virtual_engine, 0);
  apply(*f.scheduler, in_flight);
  f.scheduler->check_invariants();
}

// A fused pipeline's g virtual engines in a ring: each step of virtual engine v is applied just
// before v plans its next one, so the other g - 1 steps are in flight while it plans.
struct Ring {
  Scheduler& scheduler;
  std::int64_t g;
  std::vector<StepPlan> in_flight;
  Ring(Scheduler& s, std::int64_t num_ve) : scheduler(s), g(num_ve), in_flight(static_cast<std::size_t>(num_ve)) {}
  // Completes v's step and plans its next; returns the completed step's events.
  std::vector<TokenEvent> turn(std::int64_t v) {
    auto& slot = in_flight[static_cast<std::size_t>(v)];
    std::vector<TokenEvent> events = apply(scheduler, slot);
    slot = scheduler.schedule(v);
    return events;
  }
  bool idle() const {
    for (const StepPlan& p : in_flight) {
      if (!p.sequences.empty()) return false;
    }
    return true;
  }
};

TEST(SchedulerVirtualEngines, EveryRequestFinishesExactlyOnceUnderRandomArrivals) {
  std::int64_t preemptions = 0;
  for (std::uint64_t seed : {1u, 2u, 3u}) {
    for (std::int64_t g : {2, 3, 4}) {
      SCOPED_TRACE("seed " + std::to_string(seed) + " g " + std::to_string(g));
      SchedulerConfig sc;
      sc.max_num_batched_tokens = 128;
      sc.max_num_seqs = 12 * g;
      sc.step_cost = context_heavy();
      // Few KV blocks per device, so admissions wait for blocks and running requests preempt.
      Fixture f(g, 48, sc);
      Ring ring(*f.scheduler, g);
      std::mt19937_64 rng(seed);
      std::uniform_int_distribution<std::int64_t> short_prompt(4, 60), long_prompt(200, 400), outputs(1, 60);
      std::bernoulli_distribution arrives(0.5), is_long(0.2);
      std::map<std::int64_t, std::int64_t> expected_outputs;  // by id
      std::map<std::int64_t, int> finished;
      std::int64_t next_id = 1;
      for (std::int64_t step = 0; step < 20000; ++step) {
        if (next_id <= 150 && arrives(rng)) {
          const std::int64_t prompt = is_long(rng) ? long_prompt(rng) : short_prompt(rng);
          const std::int64_t out = outputs(rng);
          ASSERT_TRUE(f.scheduler->add_request(RequestId(next_id), spec(prompt, out)).ok());
          expected_outputs[next_id++] = out;
        }
        for (const TokenEvent& ev : ring.turn(step % g)) {
          if (!ev.finished) continue;
          ++finished[ev.id.value];
          EXPECT_EQ(ev.num_generated_tokens, expected_outputs[ev.id.value]) << "request " << ev.id;
          EXPECT_EQ(ev.reason, FinishReason::kLength);
        }
        // In-flight steps are disjoint: no request runs in two virtual engines at once.
        std::set<std::int64_t> ids;
        for (const StepPlan& p : ring.in_flight) {
          for (const auto& seq : p.sequences) ASSERT_TRUE(ids.insert(seq.id.value).second) << "request " << seq.id;
        }
        f.scheduler->check_invariants();
        if (next_id > 150 && !f.scheduler->has_unfinished() && ring.idle()) break;
      }
      EXPECT_FALSE(f.scheduler->has_unfinished());
      EXPECT_EQ(finished.size(), expected_outputs.size());
      for (const auto& [id, n] : finished) EXPECT_EQ(n, 1) << "request " << id << " finished " << n << " times";
      preemptions += f.scheduler->counters().preemptions_recompute;
    }
  }
  EXPECT_GT(preemptions, 0);  // the KV pressure was real
}

// Bubble fraction of a round: its g micro-batches pass the same g stages one after another and a
// virtual engine's next step waits for its previous one, so the round lasts g times its costliest
// micro-batch; the bubble is the part of that the micro-batches do not fill.
struct BubbleRun {
  double bubble = 0.0;
  std::int64_t longest_head_wait = 0;  // consecutive schedule() calls one queue head waited
};

BubbleRun measure_bubble(std::int64_t g, bool balance) {
  SchedulerConfig sc;  // the default (7B-sized) cost model, a fused group's 1/g budget
  sc.balance_virtual_engines = balance;
  sc.max_num_batched_tokens = 2048 / g;
  sc.max_num_seqs = 64 * g;
  sc.max_waiting_requests = 100000;
  Fixture f(g, 100000, sc);
  Ring ring(*f.scheduler, g);
  std::mt19937_64 rng(7);
  std::bernoulli_distribution arrives(0.4), is_long(0.2);
  std::uniform_int_distribution<std::int64_t> short_prompt(20, 120), long_prompt(800, 2000), outputs(20, 200);
  double filled = 0.0, lasted = 0.0;
  BubbleRun run;
  RequestId head;
  std::int64_t head_wait = 0;
  std::int64_t next_id = 1;
  for (int round = 0; round < 1000; ++round) {
    double costliest = 0.0;
    for (std::int64_t v = 0; v < g; ++v) {
      if (arrives(rng)) {
        const std::int64_t prompt = is_long(rng) ? long_prompt(rng) : short_prompt(rng);
        KUN_CHECK_OK(f.scheduler->add_request(RequestId(next_id++), spec(prompt, outputs(rng))));
      }
      ring.turn(v);
      const double cost = sc.step_cost.plan_us(ring.in_flight[static_cast<std::size_t>(v)]);
      filled += cost;
      costliest = std::max(costliest, cost);
      const Request* waiting_head = nullptr;
      for (RequestId id : f.scheduler->request_ids_in_order()) {
        const Request* r = f.scheduler->find(id);
        if (r->state == RequestState::kWaiting) {
          waiting_head = r;
          break;
        }
      }
      if (waiting_head != nullptr && waiting_head->id == head) {
        run.longest_head_wait = std::max(run.longest_head_wait, ++head_wait);
      } else {
        head = waiting_head != nullptr ? waiting_head->id : RequestId();
        head_wait = waiting_head != nullptr ? 1 : 0;
      }
    }
    lasted += costliest * static_cast<double>(g);
  }
  run.bubble = 1.0 - filled / lasted;
  return run;
}

TEST(SchedulerVirtualEngines, LookaheadShrinksThePipelineBubble) {
  // Mixed load: 80% short prompts (20-120 tokens), 20% long (800-2000), 20-200 output tokens.
  for (std::int64_t g : {2, 4}) {
    const BubbleRun lookahead = measure_bubble(g, true);
    const BubbleRun greedy = measure_bubble(g, false);
    std::printf("g=%ld bubble fraction: lookahead %.3f, off %.3f; longest queue-head wait %ld calls\n",
                static_cast<long>(g), lookahead.bubble, greedy.bubble, static_cast<long>(lookahead.longest_head_wait));
    EXPECT_LT(lookahead.bubble, 0.6 * greedy.bubble);
    EXPECT_LE(lookahead.longest_head_wait, 2 * g);
  }
}

}  // namespace
}  // namespace kun::engine
