// Engine: one instance's serving loop behind the FrontDoor API (issue 3).
//
// Threads: front-end threads (HTTP, CLI, tests) call submit / cancel / stats; they only post to a
// mutex-protected inbox and read a published stats snapshot. The engine thread owns the
// Scheduler (and so the KvManager) and calls the StepExecutor synchronously, step after step.
// Token callbacks run on the engine thread and must not block.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "common/clock.h"
#include "engine/api.h"
#include "engine/kv_manager.h"
#include "engine/scheduler.h"
#include "engine/step.h"

namespace kun::engine {

struct EngineConfig {
  SchedulerConfig scheduler;
  ModelInfo model;
  bool publish_requests = false;  // keep a per-request summary for request_summaries()
};

// A request as cluster policy sees it (migration chooses among these).
struct RequestSummary {
  RequestId id;
  bool running = false;
  std::int64_t tokens = 0;
  std::int64_t blocks_held = 0;
};

class Engine final : public FrontDoor {
 public:
  // kv and executor must outlive the engine; the engine owns the scheduler over them.
  Engine(EngineConfig config, KvManager* kv, StepExecutor* executor, const Clock* clock);
  ~Engine() override;
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Starts the engine thread. Without start(), tests drive the engine with run_step().
  void start();
  // Stops the thread; unfinished requests get a final kError/kUnavailable event.
  void stop();

  // FrontDoor
  const ModelInfo& model_info() const override { return config_.model; }
  StatusOr<RequestId> submit(RequestSpec spec, TokenCallback on_event) override;
  void cancel(RequestId id) override;
  ServingStats stats() const override;
  // The latest published per-request summaries (empty unless publish_requests).
  std::vector<RequestSummary> request_summaries() const;
  // The last published stats with what was submitted since (the inbox), read under one lock so
  // that a publish cannot fall between them (a request counted twice or not at all).
  // queued_estimate: waiting as of the publish plus the inbox, what the queue bound admits against
  // and what a router should count, since stats() does not see a request before the step in
  // flight ends. unpublished_pending_blocks: the KV layer blocks the inbox's prompts will want,
  // which stats().pending_blocks does not count yet; a demand monitor adds it, or a burst that
  // arrives during a long step is seen a step late and the drop waits (simulated H100 13B sweep:
  // 1.8x recompute/kunserve at 23.8 req/s instead of 50x).
  struct PublishedView {
    ServingStats stats;
    std::int64_t queued_estimate = 0;
    std::int64_t unpublished_pending_blocks = 0;
  };
  PublishedView published_view() const;

  // Submits under an id chosen by the caller (a cluster front door that routes requests to
  // engines); the same errors as submit().
  Status submit_as(RequestId id, RequestSpec spec, TokenCallback on_event);

  // ---- moving requests between engines (drop, restore, migration) ----
  // Parks the engine thread at the next step boundary and returns once it is parked (no-op for
  // an engine without a thread). While paused the caller may use the calls below.
  void pause();
  void resume();
  struct Detached {
    Request request;
    TokenCallback callback;
  };
  // Takes a request (and its callback) out; see Scheduler::detach. Paused or thread-less only.
  std::optional<Detached> detach(RequestId id, bool keep_kv);
  // Every request, in re-admission order (running, swapped, waiting), after draining the inbox.
  std::vector<Detached> detach_all();
  Status adopt(Detached d, bool with_kv);
  // Adopts a running request whose KV the caller imported into this engine's KvManager.
  void adopt_with_imported_kv(Detached d);
  Scheduler& mutable_scheduler() { return scheduler_; }

  // Drains the inbox, starts a step on every free virtual engine that has work, and completes
  // one in-flight step; returns false when idle. Only from the engine thread, or from a test
  // when start() was not called.
  bool run_step();
  // Completes every in-flight step (no step is running afterwards) and moves posted submits and
  // cancels into the scheduler, so the scheduler holds every request of this engine.
  void quiesce();
  const Scheduler& scheduler() const { return scheduler_; }
  // Called after every step on the engine thread (tests check invariants here).
  void set_step_observer(std::function<void(const StepPlan&, const StepResult&)> fn) { observer_ = std::move(fn); }
  // Work between steps on the engine thread, with this engine's KvManager to itself (live KV
  // exchange): called after each step completes and before the next submit, so it overlaps the
  // other virtual engines' running steps and stalls only the requests of the one that finished.
  // `in_flight(id)` says whether a running step uses request id; those requests' blocks must not
  // be touched. Set before start().
  using BetweenStepsFn = std::function<void(const std::function<bool(RequestId)>& in_flight)>;
  void set_between_steps(BetweenStepsFn fn) { between_steps_ = std::move(fn); }

 private:
  struct Inbox {
    std::deque<std::pair<RequestId, RequestSpec>> submits;
    std::deque<RequestId> cancels;
  };
  void loop();
  void drain_inbox();
  void submit_free_slots();
  void complete_one();
  bool any_in_flight() const;
  void deliver(const TokenEvent& ev);
  void publish_stats();

  EngineConfig config_;
  StepExecutor* executor_;
  const Clock* clock_;
  Scheduler scheduler_;
  std::map<RequestId, TokenCallback> callbacks_;  // engine thread only
  struct Slot {
    StepPlan plan;
    bool busy = false;
  };
  std::vector<Slot> slots_;                  // one per virtual engine; engine thread only
  std::map<RequestId, int> in_flight_;       // request -> slot running it; engine thread only
  std::vector<RequestId> deferred_cancels_;  // cancels of in-flight requests; engine thread only
  std::function<void(const StepPlan&, const StepResult&)> observer_;
  BetweenStepsFn between_steps_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  Inbox inbox_;                  // guarded by mu_
  ServingStats published_;       // guarded by mu_
  std::vector<RequestSummary> published_requests_;  // guarded by mu_
  std::int64_t queued_estimate_ = 0;  // waiting + inbox, guarded by mu_
  std::int64_t inbox_pending_blocks_ = 0;  // layer blocks the inbox's prompts want, guarded by mu_
  // The KV manager's block size and layers as of the last publish (submit_as converts a prompt to
  // layer blocks with them off the engine thread), guarded by mu_.
  std::int64_t published_block_tokens_ = 1;
  std::int64_t published_layers_ = 0;
  std::int64_t next_id_ = 1;     // guarded by mu_
  std::map<RequestId, TokenCallback> pending_callbacks_;  // guarded by mu_
  bool stopping_ = false;        // guarded by mu_
  bool pause_requested_ = false; // guarded by mu_
  bool paused_ = false;          // guarded by mu_
  std::thread thread_;
};

}  // namespace kun::engine
