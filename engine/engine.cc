#include "engine/engine.h"

#include <chrono>
#include <utility>

#include "common/check.h"
#include "common/log.h"
#include "common/units.h"

namespace kun::engine {
namespace {

// KvManager::layer_blocks_for for a prompt, with a copy of the manager's shape (off the engine thread).
std::int64_t prompt_layer_blocks(std::size_t tokens, std::int64_t block_tokens, std::int64_t layers) {
  return ceil_div(static_cast<std::int64_t>(tokens), block_tokens) * layers;
}

}  // namespace

Engine::Engine(EngineConfig config, KvManager* kv, StepExecutor* executor, const Clock* clock)
    : config_(std::move(config)), executor_(executor), clock_(clock), scheduler_(config_.scheduler, kv, clock) {
  KUN_CHECK(executor_ != nullptr);
  KUN_CHECK_LE(config_.scheduler.num_virtual_engines, executor_->max_in_flight())
      << "more virtual engines than the executor keeps in flight";
  slots_.resize(static_cast<std::size_t>(config_.scheduler.num_virtual_engines));
  publish_stats();
}

Engine::~Engine() { stop(); }

void Engine::start() {
  KUN_CHECK(!thread_.joinable()) << "engine started twice";
  thread_ = std::thread([this] { loop(); });
}

void Engine::stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_ && !thread_.joinable()) return;
    stopping_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) {
    thread_.join();  // the loop completed its in-flight steps on the way out
  } else {
    quiesce();  // thread-less (tests): no step may outlive the engine that owns its plan
  }
}

StatusOr<RequestId> Engine::submit(RequestSpec spec, TokenCallback on_event) {
  RequestId id;
  {
    std::lock_guard<std::mutex> lock(mu_);
    id = RequestId(next_id_++);
  }
  KUN_RETURN_IF_ERROR(submit_as(id, std::move(spec), std::move(on_event)));
  return id;
}

Status Engine::submit_as(RequestId id, RequestSpec spec, TokenCallback on_event) {
  KUN_RETURN_IF_ERROR(validate_request(spec, config_.scheduler));
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) return unavailable("engine is shutting down");
    if (queued_estimate_ >= config_.scheduler.max_waiting_requests) {
      return overloaded("waiting queue is full (" + std::to_string(config_.scheduler.max_waiting_requests) +
                        " requests); retry later");
    }
    ++queued_estimate_;
    inbox_pending_blocks_ += prompt_layer_blocks(spec.prompt_tokens.size(), published_block_tokens_, published_layers_);
    pending_callbacks_.emplace(id, std::move(on_event));
    inbox_.submits.emplace_back(id, std::move(spec));
  }
  cv_.notify_all();
  return ok_status();
}

void Engine::pause() {
  std::unique_lock<std::mutex> lock(mu_);
  if (!thread_.joinable()) return;
  pause_requested_ = true;
  cv_.notify_all();
  cv_.wait(lock, [this] { return paused_ || stopping_; });
}

void Engine::resume() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    pause_requested_ = false;
  }
  cv_.notify_all();
}

std::optional<Engine::Detached> Engine::detach(RequestId id, bool keep_kv) {
  quiesce();
  std::optional<Request> r = scheduler_.detach(id, keep_kv);
  if (!r) return std::nullopt;
  Detached d{std::move(*r), nullptr};
  auto it = callbacks_.find(id);
  if (it != callbacks_.end()) {
    d.callback = std::move(it->second);
    callbacks_.erase(it);
  }
  publish_stats();
  return d;
}

std::vector<Engine::Detached> Engine::detach_all() {
  quiesce();
  std::vector<Detached> out;
  for (RequestId id : scheduler_.request_ids_in_order()) {
    auto d = detach(id, /*keep_kv=*/false);
    KUN_CHECK(d.has_value());
    out.push_back(std::move(*d));
  }
  return out;
}

void Engine::adopt_with_imported_kv(Detached d) {
  const RequestId id = d.request.id;
  scheduler_.adopt_with_imported_kv(std::move(d.request));
  callbacks_.emplace(id, std::move(d.callback));
  publish_stats();
}

Status Engine::adopt(Detached d, bool with_kv) {
  const RequestId id = d.request.id;
  KUN_RETURN_IF_ERROR(scheduler_.adopt(std::move(d.request), with_kv));
  callbacks_.emplace(id, std::move(d.callback));
  publish_stats();
  return ok_status();
}

void Engine::cancel(RequestId id) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    inbox_.cancels.push_back(id);
  }
  cv_.notify_all();
}

ServingStats Engine::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return published_;
}

Engine::PublishedView Engine::published_view() const {
  std::lock_guard<std::mutex> lock(mu_);
  return PublishedView{published_, queued_estimate_, inbox_pending_blocks_};
}

std::vector<RequestSummary> Engine::request_summaries() const {
  std::lock_guard<std::mutex> lock(mu_);
  return published_requests_;
}

void Engine::drain_inbox() {
  Inbox inbox;
  std::map<RequestId, TokenCallback> callbacks;
  {
    std::lock_guard<std::mutex> lock(mu_);
    std::swap(inbox, inbox_);
    std::swap(callbacks, pending_callbacks_);
  }
  for (auto& [id, cb] : callbacks) callbacks_.emplace(id, std::move(cb));
  for (auto& [id, spec] : inbox.submits) {
    // submit_as admitted it against queued_estimate_; an adopt since then (a transition) may
    // have filled the queue, but the client already has its answer: the request stays.
    Status s = scheduler_.add_request(id, std::move(spec), Scheduler::QueueBound::kAlreadyAdmitted);
    if (!s.ok()) {
      TokenEvent ev;
      ev.id = id;
      ev.finished = true;
      ev.reason = FinishReason::kError;
      ev.error = s;
      ev.time_us = clock_->now_us();
      deliver(ev);
    }
  }
  for (RequestId id : inbox.cancels) {
    if (in_flight_.count(id) != 0) {
      deferred_cancels_.push_back(id);  // its step is running: cancel when it comes back
      continue;
    }
    TokenEvent ev = scheduler_.cancel(id);
    if (ev.finished) deliver(ev);
  }
}

void Engine::deliver(const TokenEvent& ev) {
  auto it = callbacks_.find(ev.id);
  if (it == callbacks_.end()) return;
  if (it->second) it->second(ev);
  if (ev.finished) callbacks_.erase(it);
}

bool Engine::any_in_flight() const {
  for (const Slot& slot : slots_) {
    if (slot.busy) return true;
  }
  return false;
}

void Engine::submit_free_slots() {
  for (std::size_t ve = 0; ve < slots_.size(); ++ve) {
    if (slots_[ve].busy || !scheduler_.has_unfinished()) continue;
    StepPlan plan = scheduler_.schedule(static_cast<std::int64_t>(ve));
    if (plan.sequences.empty() && plan.swap_in.empty() && plan.swap_out.empty()) continue;
    Slot& slot = slots_[ve];
    slot.plan = std::move(plan);
    slot.busy = true;
    for (const ScheduledSequence& seq : slot.plan.sequences) in_flight_[seq.id] = static_cast<int>(ve);
    executor_->submit(static_cast<int>(ve), &slot.plan);
  }
}

void Engine::complete_one() {
  auto [index, result] = executor_->wait_any();
  Slot& slot = slots_[static_cast<std::size_t>(index)];
  KUN_CHECK(slot.busy) << "executor finished slot " << index << " which had no step";
  for (const ScheduledSequence& seq : slot.plan.sequences) in_flight_.erase(seq.id);
  std::vector<TokenEvent> events = scheduler_.apply_result(slot.plan, result);
  slot.busy = false;
  for (const TokenEvent& ev : events) deliver(ev);
  if (observer_) observer_(slot.plan, result);
  std::vector<RequestId> still_deferred;
  for (RequestId id : deferred_cancels_) {
    if (in_flight_.count(id) != 0) {
      still_deferred.push_back(id);
      continue;
    }
    TokenEvent ev = scheduler_.cancel(id);
    if (ev.finished) deliver(ev);
  }
  deferred_cancels_ = std::move(still_deferred);
  publish_stats();
}

void Engine::quiesce() {
  while (any_in_flight()) complete_one();
  drain_inbox();  // nothing is in flight now, so every cancel drained here applies at once
  KUN_CHECK(deferred_cancels_.empty()) << deferred_cancels_.size() << " cancels deferred with no step in flight";
}

bool Engine::run_step() {
  drain_inbox();
  submit_free_slots();
  if (!any_in_flight()) {
    publish_stats();
    return false;
  }
  complete_one();
  // The virtual engine that just finished is idle until the next submit: its requests may move
  // now, while the other virtual engines' steps keep running.
  if (between_steps_) between_steps_([this](RequestId id) { return in_flight_.count(id) != 0; });
  return true;
}

void Engine::loop() {
  while (true) {
    bool want_pause;
    {
      std::unique_lock<std::mutex> lock(mu_);
      if (stopping_) break;
      want_pause = pause_requested_;
    }
    if (want_pause) {
      quiesce();  // park only with no step in flight
      std::unique_lock<std::mutex> lock(mu_);
      paused_ = true;
      cv_.notify_all();
      cv_.wait(lock, [this] { return !pause_requested_ || stopping_; });
      paused_ = false;
      if (stopping_) break;
      continue;
    }
    if (run_step()) continue;
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait_for(lock, std::chrono::milliseconds(50), [this] {
      return stopping_ || pause_requested_ || !inbox_.submits.empty() || !inbox_.cancels.empty();
    });
  }
  // Unfinished requests get a final error event so no client waits forever.
  quiesce();
  drain_inbox();
  std::vector<RequestId> open;
  for (const auto& [id, cb] : callbacks_) open.push_back(id);
  for (RequestId id : open) {
    TokenEvent ev = scheduler_.cancel(id);
    ev.id = id;
    ev.finished = true;
    ev.reason = FinishReason::kError;
    ev.error = unavailable("engine stopped");
    deliver(ev);
  }
}

void Engine::publish_stats() {
  ServingStats s;
  InstanceStats inst = scheduler_.report();
  s.instances.push_back(inst);
  const SchedulerCounters& c = scheduler_.counters();
  s.num_preemptions = c.preemptions_recompute + c.preemptions_swap;
  s.recomputed_tokens_total = c.recomputed_tokens;
  s.transition_recomputed_tokens_total = c.transition_recomputed_tokens;
  s.prompt_tokens_total = c.prompt_tokens;
  s.generation_tokens_total = c.generated_tokens;
  s.requests_finished_total = c.finished;
  std::vector<RequestSummary> requests;
  if (config_.publish_requests) {
    for (RequestId id : scheduler_.request_ids_in_order()) {
      const Request* r = scheduler_.find(id);
      requests.push_back(RequestSummary{id, r->state == RequestState::kRunning, r->num_tokens(),
                                        scheduler_.kv_blocks_held(id)});
    }
  }
  std::lock_guard<std::mutex> lock(mu_);
  published_ = std::move(s);
  published_requests_ = std::move(requests);
  std::int64_t inbox = static_cast<std::int64_t>(inbox_.submits.size());
  queued_estimate_ = scheduler_.num_waiting() + inbox;
  published_block_tokens_ = scheduler_.kv().block_size_tokens();
  published_layers_ = scheduler_.kv().num_layers();
  inbox_pending_blocks_ = 0;
  for (const auto& [id, spec] : inbox_.submits) {
    inbox_pending_blocks_ += prompt_layer_blocks(spec.prompt_tokens.size(), published_block_tokens_, published_layers_);
  }
}

}  // namespace kun::engine
