#include "server/tests/fake_front_door.h"

#include <algorithm>
#include <limits>

namespace kun::server::testing {
namespace {

std::vector<std::int32_t> default_script(const engine::RequestSpec& spec) {
  static constexpr std::string_view kText = "The quick brown fox jumps over the lazy dog. ";
  std::vector<std::int32_t> out;
  out.reserve(static_cast<std::size_t>(spec.max_tokens));
  for (std::int64_t i = 0; i < spec.max_tokens; ++i) {
    out.push_back(static_cast<unsigned char>(kText[static_cast<std::size_t>(i) % kText.size()]));
  }
  return out;
}

}  // namespace

FakeFrontDoor::FakeFrontDoor(FakeConfig config)
    : config_(std::move(config)), origin_(std::chrono::steady_clock::now()) {
  info_.name = config_.model_name;
  info_.max_context_tokens = config_.max_context_tokens;
  info_.vocab_size = config_.vocab_size;
  info_.eos_token_id = config_.eos_token_id;
  if (!config_.script) config_.script = default_script;
  thread_ = std::thread([this] { run(); });
}

FakeFrontDoor::~FakeFrontDoor() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

std::int64_t FakeFrontDoor::now_us() const {
  return std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - origin_)
      .count();
}

std::int64_t FakeFrontDoor::blocks_for(std::int64_t tokens) const {
  return (tokens + config_.block_size_tokens - 1) / config_.block_size_tokens;
}

StatusOr<RequestId> FakeFrontDoor::submit(engine::RequestSpec spec, engine::TokenCallback on_event) {
  if (spec.prompt_tokens.empty()) return invalid_argument("empty prompt");
  if (spec.max_tokens < 1) return invalid_argument("max_tokens must be >= 1");
  if (static_cast<std::int64_t>(spec.prompt_tokens.size()) + spec.max_tokens > config_.max_context_tokens) {
    return out_of_range("prompt + max_tokens exceed the context");
  }
  std::vector<std::int32_t> script = config_.script(spec);
  std::lock_guard<std::mutex> lock(mu_);
  if (unavailable_ || stop_) return unavailable("fake engine is shutting down");
  if (config_.async_reject_over_tokens > 0 &&
      static_cast<std::int64_t>(spec.prompt_tokens.size()) + spec.max_tokens > config_.async_reject_over_tokens) {
    Req r;
    r.id = RequestId(next_id_++);
    r.spec = std::move(spec);
    Delivery d;
    d.cb = std::move(on_event);
    d.ev = make_final(r, engine::FinishReason::kError, -1);
    d.ev.error = out_of_range("request needs more KV blocks than the instance has");
    ++submits_;
    pending_finals_.push_back(std::move(d));
    cv_.notify_all();
    return r.id;
  }
  if (active_.size() >= config_.max_requests) return overloaded("fake engine queue is full");
  const std::int64_t blocks = blocks_for(static_cast<std::int64_t>(spec.prompt_tokens.size()));
  if (used_blocks_ + blocks > config_.kv_blocks_total) return overloaded("fake engine out of KV blocks");
  Req r;
  r.id = RequestId(next_id_++);
  r.spec = std::move(spec);
  r.cb = std::move(on_event);
  r.script = std::move(script);
  r.timings.arrival_us = now_us();
  r.timings.first_scheduled_us = r.timings.arrival_us;
  r.next_due_us = r.timings.arrival_us + config_.first_token_us;
  r.blocks = blocks;
  used_blocks_ += blocks;
  prompt_tokens_total_ += static_cast<std::int64_t>(r.spec.prompt_tokens.size());
  ++submits_;
  if (log_on_) live_logs_[r.id.value].prompt_tokens = r.spec.prompt_tokens;
  const RequestId id = r.id;
  active_.emplace(id.value, std::move(r));
  max_active_seen_ = std::max(max_active_seen_, active_.size());
  cv_.notify_all();
  return id;
}

engine::TokenEvent FakeFrontDoor::make_final(Req& r, engine::FinishReason reason, std::int32_t token) const {
  engine::TokenEvent ev;
  ev.id = r.id;
  ev.token = token;
  ev.time_us = now_us();
  ev.finished = true;
  ev.reason = reason;
  ev.num_prompt_tokens = static_cast<std::int64_t>(r.spec.prompt_tokens.size());
  ev.num_generated_tokens = r.generated;
  r.timings.finish_us = ev.time_us;
  ev.timings = r.timings;
  return ev;
}

void FakeFrontDoor::cancel(RequestId id) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = active_.find(id.value);
    if (it == active_.end()) return;
    Req& r = it->second;
    used_blocks_ -= r.blocks;  // freed at once
    ++cancels_;
    ++finished_total_;
    Delivery d;
    d.cb = std::move(r.cb);
    d.ev = make_final(r, engine::FinishReason::kCancelled, -1);
    pending_finals_.push_back(std::move(d));
    auto log = live_logs_.find(id.value);
    if (log != live_logs_.end()) {
      done_logs_.push_back(std::move(log->second));
      live_logs_.erase(log);
    }
    active_.erase(it);
  }
  cv_.notify_all();
  idle_cv_.notify_all();
}

void FakeFrontDoor::run() {
  std::vector<Delivery> batch;
  std::vector<std::pair<std::int64_t, std::int64_t>> emitted;  // (request, steady ns)
  std::unique_lock<std::mutex> lock(mu_);
  while (!stop_) {
    // Collect everything due now.
    batch.clear();
    while (!pending_finals_.empty()) {
      batch.push_back(std::move(pending_finals_.front()));
      pending_finals_.pop_front();
    }
    const std::int64_t now = now_us();
    std::int64_t next_due = std::numeric_limits<std::int64_t>::max();
    bool freed = false;
    for (auto it = active_.begin(); it != active_.end();) {
      Req& r = it->second;
      if (r.next_due_us > now) {
        next_due = std::min(next_due, r.next_due_us);
        ++it;
        continue;
      }
      const std::size_t k = static_cast<std::size_t>(r.generated);
      const std::int32_t token = k < r.script.size() ? r.script[k] : config_.eos_token_id;
      ++r.generated;
      ++generation_tokens_total_;
      if (r.generated == 1) r.timings.first_token_us = now;
      const std::int64_t len = static_cast<std::int64_t>(r.spec.prompt_tokens.size()) + r.generated;
      const std::int64_t need = blocks_for(len);
      used_blocks_ += need - r.blocks;
      r.blocks = need;
      const bool is_eos = token == config_.eos_token_id && !r.spec.ignore_eos;
      const bool is_stop_id = std::find(r.spec.stop_token_ids.begin(), r.spec.stop_token_ids.end(),
                                        token) != r.spec.stop_token_ids.end();
      Delivery d;
      d.log_id = r.id;
      if (is_eos || is_stop_id || r.generated >= r.spec.max_tokens) {
        d.cb = std::move(r.cb);
        d.ev = make_final(r, (is_eos || is_stop_id) ? engine::FinishReason::kStop
                                                    : engine::FinishReason::kLength,
                          token);
        used_blocks_ -= r.blocks;
        ++finished_total_;
        batch.push_back(std::move(d));
        it = active_.erase(it);
        freed = true;
        continue;
      }
      d.cb = r.cb;
      d.ev.id = r.id;
      d.ev.token = token;
      d.ev.time_us = now;
      d.ev.num_prompt_tokens = static_cast<std::int64_t>(r.spec.prompt_tokens.size());
      d.ev.num_generated_tokens = r.generated;
      d.ev.timings = r.timings;
      batch.push_back(std::move(d));
      // Absolute schedule: no drift, a late wake-up catches up.
      r.next_due_us = r.timings.arrival_us + config_.first_token_us +
                      r.generated * config_.inter_token_us;
      next_due = std::min(next_due, r.next_due_us);
      ++it;
    }
    if (freed) idle_cv_.notify_all();
    if (batch.empty()) {
      if (next_due == std::numeric_limits<std::int64_t>::max()) {
        cv_.wait(lock);
      } else {
        cv_.wait_until(lock, origin_ + std::chrono::microseconds(next_due));
      }
      continue;
    }
    const bool log_on = log_on_;
    delivering_ = batch.size();  // idle only once these callbacks have run
    lock.unlock();
    emitted.clear();
    for (auto& d : batch) {
      if (log_on && d.ev.token >= 0 && d.log_id.valid()) {
        emitted.emplace_back(d.log_id.value, std::chrono::duration_cast<std::chrono::nanoseconds>(
                                                 std::chrono::steady_clock::now().time_since_epoch())
                                                 .count());
      }
      d.cb(d.ev);
    }
    lock.lock();
    delivering_ = 0;
    idle_cv_.notify_all();
    if (log_on) {
      for (const auto& [rid, ns] : emitted) {
        auto log = live_logs_.find(rid);
        if (log != live_logs_.end()) log->second.emit_ns.push_back(ns);
      }
      for (const auto& d : batch) {
        if (!d.ev.finished) continue;
        auto log = live_logs_.find(d.ev.id.value);
        if (log != live_logs_.end()) {
          done_logs_.push_back(std::move(log->second));
          live_logs_.erase(log);
        }
      }
    }
  }
}

engine::ServingStats FakeFrontDoor::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  engine::ServingStats s = extra_;
  if (s.instances.empty()) {
    engine::InstanceStats inst;
    inst.instance = 0;
    s.instances.push_back(inst);
  }
  auto& i0 = s.instances[0];
  i0.num_running = static_cast<std::int64_t>(active_.size());
  i0.num_waiting = 0;
  i0.kv_blocks_total = config_.kv_blocks_total;
  i0.kv_blocks_free = config_.kv_blocks_total - used_blocks_;
  i0.demand = static_cast<double>(used_blocks_) / static_cast<double>(config_.kv_blocks_total);
  s.prompt_tokens_total = prompt_tokens_total_;
  s.generation_tokens_total = generation_tokens_total_;
  s.requests_finished_total = finished_total_;
  return s;
}

void FakeFrontDoor::set_unavailable(bool unavailable) {
  std::lock_guard<std::mutex> lock(mu_);
  unavailable_ = unavailable;
}

void FakeFrontDoor::set_extra_stats(engine::ServingStats extra) {
  std::lock_guard<std::mutex> lock(mu_);
  extra_ = std::move(extra);
}

std::int64_t FakeFrontDoor::used_blocks() const {
  std::lock_guard<std::mutex> lock(mu_);
  return used_blocks_;
}

std::size_t FakeFrontDoor::active_requests() const {
  std::lock_guard<std::mutex> lock(mu_);
  return active_.size();
}

std::size_t FakeFrontDoor::max_active_seen() const {
  std::lock_guard<std::mutex> lock(mu_);
  return max_active_seen_;
}

std::int64_t FakeFrontDoor::cancel_count() const {
  std::lock_guard<std::mutex> lock(mu_);
  return cancels_;
}

std::int64_t FakeFrontDoor::submit_count() const {
  std::lock_guard<std::mutex> lock(mu_);
  return submits_;
}

bool FakeFrontDoor::wait_idle(std::chrono::milliseconds timeout) const {
  std::unique_lock<std::mutex> lock(mu_);
  // Idle means every request's final event has reached its callback, not only that the
  // request left the active set (the callback runs after, outside the lock).
  return idle_cv_.wait_for(lock, timeout, [this] {
    return active_.empty() && pending_finals_.empty() && delivering_ == 0;
  });
}

bool FakeFrontDoor::wait_active_at_least(std::size_t n, std::chrono::milliseconds timeout) const {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (active_.size() >= n) return true;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  return false;
}

void FakeFrontDoor::enable_emit_log(bool on) {
  std::lock_guard<std::mutex> lock(mu_);
  log_on_ = on;
}

std::vector<FakeFrontDoor::EmitLog> FakeFrontDoor::take_emit_log() {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<EmitLog> out;
  out.swap(done_logs_);
  return out;
}

}  // namespace kun::server::testing
