// Admission is decided once: a request Engine::submit accepted (the client already got its HTTP
// 200) must not fail later because the scheduler's waiting queue filled up in between (requests
// adopted from another engine during a transition, or preempted back to waiting). Found by
// scripts/soak.sh: streams failed mid-way with "waiting queue is full" under forced transitions.
#include <gtest/gtest.h>

#include <memory>
#include <vector>

#include "common/clock.h"
#include "engine/engine.h"
#include "engine/kv_manager.h"
#include "engine/tests/scheduler_test_util.h"
#include "kv/block_allocator.h"

namespace kun::engine {
namespace {

using testing::spec;

constexpr std::int64_t kLayers = 2;
constexpr std::int64_t kBlockSize = 16;

class TokenFiveExecutor final : public StepExecutor {
 public:
  StepResult execute(const StepPlan& plan) override {
    StepResult r;
    for (const auto& s : plan.sequences) {
      if (s.sample) r.sampled_tokens.push_back(5);
    }
    return r;
  }
};

// A thread-less engine (driven by run_step) on one device of `pages` pages.
struct TestEngine {
  ManualClock clock;
  kv::KvBlockAllocator allocator{4};
  std::unique_ptr<KvManager> kv;
  TokenFiveExecutor executor;
  std::unique_ptr<Engine> engine;

  TestEngine(std::int64_t pages, std::int64_t max_waiting) {
    std::vector<kv::PageId> ids;
    for (std::int64_t p = 0; p < pages; ++p) ids.emplace_back(p);
    KUN_CHECK_OK(allocator.add_pages(ids));
    kv = std::make_unique<KvManager>(kBlockSize, std::vector<kv::KvBlockAllocator*>{&allocator},
                                     std::vector<std::int32_t>(kLayers, 0), 0);
    EngineConfig c;
    c.scheduler.max_num_batched_tokens = 256;
    c.scheduler.max_waiting_requests = max_waiting;
    c.model.max_context_tokens = 1024;
    engine = std::make_unique<Engine>(c, kv.get(), &executor, &clock);
  }
};

TEST(EngineAdmission, AcceptedRequestIsNotRejectedLaterByAFullQueue) {
  TestEngine a(64, /*max_waiting=*/1);
  std::vector<TokenEvent> finals;
  auto record = [&finals](const TokenEvent& ev) {
    if (ev.finished) finals.push_back(ev);
  };
  // r1 is admitted and starts running: the waiting queue is empty again.
  ASSERT_TRUE(a.engine->submit_as(RequestId(1), spec(16, 64), record).ok());
  a.engine->run_step();
  EXPECT_EQ(a.engine->scheduler().num_waiting(), 0);
  // r2 is admitted (the queue is empty) and waits in the engine's inbox for the next step.
  ASSERT_TRUE(a.engine->submit_as(RequestId(2), spec(16, 8), record).ok());
  // Before that step a transition moves a request from another engine into the waiting queue.
  TestEngine b(64, 4);
  ASSERT_TRUE(b.engine->submit_as(RequestId(100), spec(16, 8), record).ok());
  auto moved = b.engine->detach_all();
  ASSERT_EQ(moved.size(), 1u);
  ASSERT_TRUE(a.engine->adopt(std::move(moved[0]), /*with_kv=*/false).ok());
  // The next submit is refused up front: the queue is full now.
  EXPECT_EQ(a.engine->submit_as(RequestId(3), spec(16, 8), record).code(), StatusCode::kOverloaded);
  for (int i = 0; i < 500 && finals.size() < 3; ++i) a.engine->run_step();
  ASSERT_EQ(finals.size(), 3u);
  for (const TokenEvent& ev : finals) {
    EXPECT_NE(ev.reason, FinishReason::kError) << "request " << ev.id.value << ": " << ev.error.to_string();
  }
}

// A request submitted since the last publish is in no published count: unpublished_pending_blocks
// (published_view) carries the KV its prompt wants (what the demand monitor adds), until the step that takes it in
// publishes it as pending or running.
TEST(EngineAdmission, PromptsSubmittedSinceThePublishCountAsPendingBlocks) {
  TestEngine a(64, /*max_waiting=*/8);
  auto ignore = [](const TokenEvent&) {};
  EXPECT_EQ(a.engine->published_view().unpublished_pending_blocks, 0);
  ASSERT_TRUE(a.engine->submit_as(RequestId(1), spec(40, 4), ignore).ok());  // 3 token blocks
  ASSERT_TRUE(a.engine->submit_as(RequestId(2), spec(16, 4), ignore).ok());  // 1 token block
  EXPECT_EQ(a.engine->stats().instances.front().pending_blocks, 0);
  EXPECT_EQ(a.engine->published_view().unpublished_pending_blocks, (3 + 1) * kLayers);
  EXPECT_EQ(a.engine->published_view().unpublished_pending_blocks, a.kv->layer_blocks_for(40) + a.kv->layer_blocks_for(16));
  a.engine->run_step();
  EXPECT_EQ(a.engine->published_view().unpublished_pending_blocks, 0);
  EXPECT_GT(a.engine->stats().instances.front().blocks_demanded, 0);
}

}  // namespace
}  // namespace kun::engine
