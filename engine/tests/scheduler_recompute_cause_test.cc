// Recomputation by cause: the scheduler counts every prefill token it computes a second time, and
// of those the ones redone because a cluster transition (drop, restore, migration) took the
// request out without its KV, as against a recompute preemption under memory pressure. The
// stale-KV strategies are judged by the second count. Pure scheduler + KV bookkeeping, no model.
#include <gtest/gtest.h>

#include <memory>
#include <optional>
#include <vector>

#include "common/clock.h"
#include "engine/kv_manager.h"
#include "engine/scheduler.h"
#include "engine/tests/scheduler_test_util.h"
#include "kv/block_allocator.h"

namespace kun::engine {
namespace {

using testing::spec;

constexpr std::int64_t kLayers = 4;
constexpr std::int64_t kBlockSize = 16;

// One device, one virtual engine, `pages` pages of 4 blocks each for KV.
struct Instance {
  ManualClock clock;
  kv::KvBlockAllocator allocator{4};
  std::unique_ptr<KvManager> kv;
  std::unique_ptr<Scheduler> scheduler;

  explicit Instance(std::int64_t pages) {
    std::vector<kv::PageId> ids;
    for (std::int64_t p = 0; p < pages; ++p) ids.emplace_back(p);
    KUN_CHECK_OK(allocator.add_pages(ids));
    kv = std::make_unique<KvManager>(kBlockSize, std::vector<kv::KvBlockAllocator*>{&allocator},
                                     std::vector<std::int32_t>(kLayers, 0), 0);
    SchedulerConfig sc;
    sc.max_num_batched_tokens = 256;
    scheduler = std::make_unique<Scheduler>(sc, kv.get(), &clock);
  }

  // Runs one step as if the model ran it (every sampled token is 5); returns the final events.
  std::vector<TokenEvent> step() {
    const StepPlan plan = scheduler->schedule(0);
    std::vector<TokenEvent> finals;
    for (TokenEvent& ev : testing::apply(*scheduler, plan)) {
      if (ev.finished) finals.push_back(ev);
    }
    scheduler->check_invariants();
    return finals;
  }

  std::vector<TokenEvent> drain() {
    std::vector<TokenEvent> finals;
    for (int i = 0; i < 1000 && scheduler->has_unfinished(); ++i) {
      for (TokenEvent& ev : step()) finals.push_back(ev);
    }
    EXPECT_FALSE(scheduler->has_unfinished());
    return finals;
  }
};

TEST(SchedulerRecomputeCause, PreemptionIsNotATransition) {
  // Two requests that each grow to 60 tokens (16 layer blocks) in 24 blocks: one is preempted.
  Instance a(6);
  ASSERT_TRUE(a.scheduler->add_request(RequestId(1), spec(20, 40)).ok());
  ASSERT_TRUE(a.scheduler->add_request(RequestId(2), spec(20, 40)).ok());
  const std::vector<TokenEvent> finals = a.drain();
  ASSERT_EQ(finals.size(), 2u);
  EXPECT_GT(a.scheduler->counters().preemptions_recompute, 0);
  EXPECT_GT(a.scheduler->counters().recomputed_tokens, 0);
  EXPECT_EQ(a.scheduler->counters().transition_recomputed_tokens, 0);
  std::int64_t per_request = 0;
  for (const TokenEvent& ev : finals) {
    per_request += ev.num_recomputed_tokens;
    EXPECT_EQ(ev.num_transition_recomputed_tokens, 0);
  }
  EXPECT_EQ(per_request, a.scheduler->counters().recomputed_tokens);
}

TEST(SchedulerRecomputeCause, DetachWithoutKvIsATransition) {
  Instance a(64), b(64);
  ASSERT_TRUE(a.scheduler->add_request(RequestId(1), spec(20, 10)).ok());
  for (int i = 0; i < 4; ++i) a.step();  // prompt and three decodes: 23 tokens computed
  std::optional<Request> r = a.scheduler->detach(RequestId(1), /*keep_kv=*/false);
  ASSERT_TRUE(r.has_value());
  ASSERT_TRUE(b.scheduler->adopt(std::move(*r), /*with_kv=*/false).ok());
  const std::vector<TokenEvent> finals = b.drain();
  ASSERT_EQ(finals.size(), 1u);
  EXPECT_EQ(finals[0].num_recomputed_tokens, 23);
  EXPECT_EQ(finals[0].num_transition_recomputed_tokens, 23);
  EXPECT_EQ(b.scheduler->counters().transition_recomputed_tokens, 23);
  EXPECT_EQ(a.kv->tokens_held(RequestId(1)), 0);
}

TEST(SchedulerRecomputeCause, KvThatFitsNowhereIsATransition) {
  // As a restore does when a gathered request fits on no member: detached with its KV, which the
  // caller then frees before adopting it without KV.
  Instance a(64), b(64);
  ASSERT_TRUE(a.scheduler->add_request(RequestId(1), spec(20, 10)).ok());
  for (int i = 0; i < 3; ++i) a.step();
  std::optional<Request> r = a.scheduler->detach(RequestId(1), /*keep_kv=*/true);
  ASSERT_TRUE(r.has_value());
  a.scheduler->release_detached(RequestId(1));
  ASSERT_TRUE(b.scheduler->adopt(std::move(*r), /*with_kv=*/false).ok());
  const std::vector<TokenEvent> finals = b.drain();
  ASSERT_EQ(finals.size(), 1u);
  EXPECT_EQ(finals[0].num_transition_recomputed_tokens, 22);
  EXPECT_EQ(finals[0].num_recomputed_tokens, 22);
}

TEST(SchedulerRecomputeCause, MovingAPreemptedRequestKeepsItsCause) {
  // Preempted before a transition: it lost its KV to memory pressure, and moving it while it
  // waits loses nothing more.
  Instance a(6), b(64);
  ASSERT_TRUE(a.scheduler->add_request(RequestId(1), spec(20, 40)).ok());
  ASSERT_TRUE(a.scheduler->add_request(RequestId(2), spec(20, 40)).ok());
  std::optional<RequestId> victim;
  for (int i = 0; i < 100 && !victim; ++i) {
    a.step();
    for (RequestId id : {RequestId(1), RequestId(2)}) {
      const Request* r = a.scheduler->find(id);
      if (r != nullptr && r->state == RequestState::kWaiting && r->max_computed > 0) victim = id;
    }
  }
  ASSERT_TRUE(victim.has_value()) << "no request was preempted";
  std::optional<Request> r = a.scheduler->detach(*victim, /*keep_kv=*/false);
  ASSERT_TRUE(r.has_value());
  const std::int64_t lost = r->max_computed;
  ASSERT_TRUE(b.scheduler->adopt(std::move(*r), /*with_kv=*/false).ok());
  const std::vector<TokenEvent> finals = b.drain();
  ASSERT_EQ(finals.size(), 1u);
  EXPECT_EQ(finals[0].num_recomputed_tokens, lost);
  EXPECT_EQ(finals[0].num_transition_recomputed_tokens, 0);
}

}  // namespace
}  // namespace kun::engine
