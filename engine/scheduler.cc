#include "engine/scheduler.h"

#include <algorithm>
#include <numeric>
#include <string>

#include "common/check.h"
#include "common/log.h"

namespace kun::engine {
namespace {

// Lookahead window per virtual engine: enough queue to fill a round of g micro-batches several
// requests deep, small enough that planning stays cheap and near the head of the queue.
constexpr std::int64_t kLookaheadPerVirtualEngine = 4;

}  // namespace

const char* request_state_name(RequestState s) {
  switch (s) {
    case RequestState::kWaiting: return "waiting";
    case RequestState::kRunning: return "running";
    case RequestState::kSwapped: return "swapped";
    case RequestState::kFinished: return "finished";
  }
  return "?";
}

const char* finish_reason_name(FinishReason r) {
  switch (r) {
    case FinishReason::kNone: return "none";
    case FinishReason::kLength: return "length";
    case FinishReason::kStop: return "stop";
    case FinishReason::kCancelled: return "cancelled";
    case FinishReason::kError: return "error";
  }
  return "?";
}

const char* preemption_mode_name(PreemptionMode m) {
  return m == PreemptionMode::kSwap ? "swap" : "recompute";
}

bool parse_preemption_mode(const std::string& s, PreemptionMode* out) {
  if (s == "recompute") { *out = PreemptionMode::kRecompute; return true; }
  if (s == "swap") { *out = PreemptionMode::kSwap; return true; }
  return false;
}

SchedulerConfig fused_scheduler_config(SchedulerConfig c, std::int64_t g, std::int64_t min_step_tokens) {
  KUN_CHECK_GE(g, 1);
  if (g == 1) return c;
  c.enable_chunked_prefill = true;
  c.num_virtual_engines = g;
  if (c.balance_virtual_engines) {
    c.max_step_tokens_with_decodes = c.max_num_batched_tokens;
    c.max_num_batched_tokens = std::max(min_step_tokens, c.max_num_batched_tokens / g);
  }
  c.max_num_seqs *= g;
  c.max_waiting_requests *= g;
  return c;
}

Status SchedulerConfig::validate() const {
  if (max_num_seqs <= 0) return invalid_argument("max_num_seqs must be > 0");
  if (max_num_batched_tokens <= 0) return invalid_argument("max_num_batched_tokens must be > 0");
  if (max_prefill_chunk_tokens < 0) return invalid_argument("max_prefill_chunk_tokens must be >= 0");
  if (max_waiting_requests <= 0) return invalid_argument("max_waiting_requests must be > 0");
  if (max_model_len <= 1) return invalid_argument("max_model_len must be > 1");
  if (num_virtual_engines < 1) return invalid_argument("num_virtual_engines must be >= 1");
  if (max_step_tokens_with_decodes < 0) return invalid_argument("max_step_tokens_with_decodes must be >= 0");
  if (min_prefill_chunk_tokens < 0) return invalid_argument("min_prefill_chunk_tokens must be >= 0");
  if (step_cost.fixed_us < 0 || step_cost.per_token_us < 0 || step_cost.per_context_token_us < 0) {
    return invalid_argument("step_cost terms must be >= 0");
  }
  if (!enable_chunked_prefill && max_num_batched_tokens < max_model_len) {
    return invalid_argument("without chunked prefill max_num_batched_tokens must be >= max_model_len");
  }
  return ok_status();
}

Scheduler::Scheduler(SchedulerConfig config, KvManager* kv, const Clock* clock)
    : config_(std::move(config)), kv_(kv), clock_(clock) {
  KUN_CHECK_OK(config_.validate());
  KUN_CHECK(kv_ != nullptr && clock_ != nullptr);
}

Status validate_request(const RequestSpec& spec, const SchedulerConfig& config) {
  if (spec.prompt_tokens.empty()) return invalid_argument("prompt must contain at least one token");
  if (spec.max_tokens <= 0) return invalid_argument("max_tokens must be >= 1, got " + std::to_string(spec.max_tokens));
  KUN_RETURN_IF_ERROR(model::validate_sampling(spec.sampling));
  for (std::int32_t t : spec.prompt_tokens) {
    if (t < 0 || (config.vocab_size > 0 && t >= config.vocab_size)) {
      return invalid_argument("prompt token id " + std::to_string(t) + " is outside the vocabulary [0, " +
                              std::to_string(config.vocab_size) + ")");
    }
  }
  const auto prompt_len = static_cast<std::int64_t>(spec.prompt_tokens.size());
  if (prompt_len + spec.max_tokens > config.max_model_len) {
    return out_of_range("prompt (" + std::to_string(prompt_len) + " tokens) + max_tokens (" +
                        std::to_string(spec.max_tokens) + ") exceeds the context length " +
                        std::to_string(config.max_model_len));
  }
  return ok_status();
}

Status Scheduler::add_request(RequestId id, RequestSpec spec, QueueBound bound) {
  if (requests_.count(id) != 0) return invalid_argument("duplicate request id " + std::to_string(id.value));
  KUN_RETURN_IF_ERROR(validate_request(spec, config_));
  const auto prompt_len = static_cast<std::int64_t>(spec.prompt_tokens.size());
  if (kv_->layer_blocks_for(prompt_len + spec.max_tokens) > kv_->total_blocks()) {
    return out_of_range("request needs more KV blocks than the instance has");
  }
  if (bound == QueueBound::kEnforce && static_cast<std::int64_t>(waiting_.size()) >= config_.max_waiting_requests) {
    return overloaded("waiting queue is full (" + std::to_string(config_.max_waiting_requests) + " requests)");
  }
  Request r;
  r.id = id;
  r.spec = std::move(spec);
  r.timings.arrival_us = clock_->now_us();
  blocks_demanded_ += kv_->layer_blocks_for(r.num_tokens());
  requests_.emplace(id, std::move(r));
  waiting_.push_back(id);
  return ok_status();
}

void Scheduler::remove_from_queues(RequestId id, RequestState state, const Request* r) {
  // The request's state names its queue (check_invariants), so a finishing running request does
  // not walk a waiting queue thousands long.
  std::deque<RequestId>* q = state == RequestState::kWaiting   ? &waiting_
                             : state == RequestState::kSwapped ? &swapped_
                             : state == RequestState::kRunning ? &running_
                                                               : nullptr;
  KUN_CHECK(q != nullptr) << "request " << id << " is " << request_state_name(state) << ", in no queue";
  q->erase(std::remove(q->begin(), q->end(), id), q->end());
  if (q != &running_) return;
  invalidate_loads();
  if (running_ptrs_valid_ && r != nullptr && r->virtual_engine >= 0 &&
      r->virtual_engine < static_cast<std::int64_t>(running_ptrs_by_ve_.size())) {
    // Keep the views (each in admission order, like running_): a request finishes at nearly every
    // step of a large group, and rebuilding looked every running request up again.
    Request* p = const_cast<Request*>(r);
    running_ptrs_.erase(std::remove(running_ptrs_.begin(), running_ptrs_.end(), p), running_ptrs_.end());
    auto& of_ve = running_ptrs_by_ve_[static_cast<std::size_t>(r->virtual_engine)];
    of_ve.erase(std::remove(of_ve.begin(), of_ve.end(), p), of_ve.end());
  } else {
    running_ptrs_valid_ = false;
    invalidate_loads();
  }
}

TokenEvent Scheduler::cancel(RequestId id) {
  Request* found = requests_.find(id);
  if (found == nullptr) return TokenEvent{};
  Request& r = *found;
  finish(r, FinishReason::kCancelled);
  ++counters_.cancelled;
  TokenEvent ev = make_event(r, -1);
  blocks_demanded_ -= kv_->layer_blocks_for(r.num_tokens());
  requests_.erase(id);
  return ev;
}

void Scheduler::finish(Request& r, FinishReason reason) {
  kv_->release(r.id);
  remove_from_queues(r.id, r.state, &r);
  r.state = RequestState::kFinished;
  r.finish_reason = reason;
  r.timings.finish_us = clock_->now_us();
}

void Scheduler::requeue_without_kv(Request& r, bool by_transition) {
  // Only a request that had computed KV changes cause: one already waiting to recompute keeps the
  // cause of the loss it is recomputing.
  if (r.num_computed > 0) r.kv_lost_in_transition = by_transition;
  r.num_computed = 0;
  r.state = RequestState::kWaiting;
  r.virtual_engine = -1;
}

TokenEvent Scheduler::make_event(const Request& r, std::int32_t token) const {
  TokenEvent ev;
  ev.id = r.id;
  ev.token = token;
  ev.time_us = clock_->now_us();
  ev.finished = r.state == RequestState::kFinished;
  ev.reason = r.finish_reason;
  ev.num_prompt_tokens = r.num_prompt_tokens();
  ev.num_generated_tokens = r.num_output_tokens();
  ev.num_recomputed_tokens = r.num_recomputed_tokens;
  ev.num_transition_recomputed_tokens = r.num_transition_recomputed_tokens;
  ev.timings = r.timings;
  return ev;
}

std::int64_t Scheduler::chunk_for(const Request& r, std::int64_t budget) const {
  std::int64_t n = std::min(r.num_uncomputed(), budget);
  if (config_.max_prefill_chunk_tokens > 0) n = std::min(n, config_.max_prefill_chunk_tokens);
  if (typical_chunk_cap_ > 0) n = std::min(n, typical_chunk_cap_);
  return n;
}

std::vector<std::int64_t> Scheduler::admission_history() const {
  if (recent_prompts_.size() < kPromptHistory) return recent_prompts_;
  std::vector<std::int64_t> out;
  out.reserve(kPromptHistory);
  for (std::size_t i = 0; i < kPromptHistory; ++i) out.push_back(recent_prompts_[(recent_prompts_next_ + i) % kPromptHistory]);
  return out;
}

void Scheduler::set_admission_history(const std::vector<std::int64_t>& oldest_first) {
  const std::size_t n = std::min(oldest_first.size(), kPromptHistory);
  recent_prompts_.assign(oldest_first.end() - static_cast<std::ptrdiff_t>(n), oldest_first.end());
  recent_prompts_next_ = recent_prompts_.size() % kPromptHistory;
}

std::int64_t Scheduler::compute_typical_chunk_cap() const {
  // A long prompt in one micro-batch makes it the pipeline's bottleneck however the rest is
  // spread; cut to the size of a typical (median) prompt, its pieces are items the lookahead can
  // balance like any short prompt. The lower median leans to the short side of a bimodal mix.
  if (!lookahead() || recent_prompts_.empty()) return 0;
  std::vector<std::int64_t> lengths = recent_prompts_;
  const auto median = lengths.begin() + static_cast<std::ptrdiff_t>((lengths.size() - 1) / 2);
  std::nth_element(lengths.begin(), median, lengths.end());
  const std::int64_t floor =
      config_.min_prefill_chunk_tokens > 0 ? config_.min_prefill_chunk_tokens : kv_->block_size_tokens();
  return std::max(lengths[static_cast<std::size_t>(median - lengths.begin())], floor);
}

void Scheduler::add_to_plan(Request& r, std::int64_t n, StepPlan* plan) {
  ScheduledSequence s;
  s.id = r.id;
  s.start_pos = r.num_computed;
  if (!token_buffers_.empty()) {
    s.tokens = std::move(token_buffers_.back());
    token_buffers_.pop_back();
    s.tokens.clear();
  }
  s.tokens.reserve(static_cast<std::size_t>(n));
  for (std::int64_t p = r.num_computed; p < r.num_computed + n; ++p) s.tokens.push_back(r.token_at(p));
  s.sample = r.num_computed + n == r.num_tokens();
  s.sampling = r.spec.sampling;
  s.sample_index = static_cast<std::uint64_t>(r.num_output_tokens());
  kv_->describe_for_plan(r.id, config_.plan_kv, &s);
  if (r.timings.first_scheduled_us < 0) r.timings.first_scheduled_us = clock_->now_us();
  // Tokens that were computed once already (before a recompute preemption) are recomputation.
  const std::int64_t redo = std::min(r.num_computed + n, r.max_computed) - r.num_computed;
  if (redo > 0) {
    r.num_recomputed_tokens += redo;
    counters_.recomputed_tokens += redo;
    if (r.kv_lost_in_transition) {
      r.num_transition_recomputed_tokens += redo;
      counters_.transition_recomputed_tokens += redo;
    }
  }
  plan->sequences.push_back(std::move(s));
}

void Scheduler::recycle(StepPlan&& plan) {
  constexpr std::size_t kMaxBuffers = 4096;
  for (ScheduledSequence& s : plan.sequences) {
    if (token_buffers_.size() >= kMaxBuffers) break;
    // Small ones only: a long prefill chunk's buffer would sit in the pool for decodes.
    if (s.tokens.capacity() > 0 && s.tokens.capacity() <= 64) token_buffers_.push_back(std::move(s.tokens));
  }
  plan.sequences.clear();
}

RequestId Scheduler::pick_victim(std::int64_t ve, RequestId except, const std::vector<RequestId>& scheduled) const {
  auto eligible = [&](RequestId id) {
    return id != except && requests_.at(id).virtual_engine == ve &&
           std::find(scheduled.begin(), scheduled.end(), id) == scheduled.end();
  };
  if (config_.victim_order == VictimOrder::kNewestFirst) {
    for (auto it = running_.rbegin(); it != running_.rend(); ++it) {
      if (eligible(*it)) return *it;
    }
  } else {
    for (RequestId id : running_) {
      if (eligible(id)) return id;
    }
  }
  return RequestId();
}

void Scheduler::preempt(Request& victim, StepPlan* plan) {
  const std::int64_t held = kv_->tokens_held(victim.id);
  ++victim.num_preemptions;
  running_.erase(std::remove(running_.begin(), running_.end(), victim.id), running_.end());
  running_ptrs_valid_ = false;
  invalidate_loads();
  if (config_.preemption == PreemptionMode::kSwap && held > 0) {
    const std::size_t before = plan->swap_out.size();
    if (kv_->swap_out(victim.id, &plan->swap_out)) {
      counters_.blocks_swapped_out += static_cast<std::int64_t>(plan->swap_out.size() - before);
      ++counters_.preemptions_swap;
      victim.state = RequestState::kSwapped;
      swapped_.push_back(victim.id);
      KUN_LOG(kDebug) << "preempt request " << victim.id << " by swap: " << held << " tokens to host";
      return;
    }
    ++counters_.swap_fallbacks_to_recompute;
    KUN_LOG(kInfo) << "swap space full: preempting request " << victim.id << " by recompute instead";
  }
  kv_->release(victim.id);
  requeue_without_kv(victim, /*by_transition=*/false);
  waiting_.push_front(victim.id);
  ++counters_.preemptions_recompute;
  KUN_LOG(kDebug) << "preempt request " << victim.id << " by recompute: " << held << " tokens dropped";
}

const std::vector<Request*>& Scheduler::running_requests() const {
  if (!running_ptrs_valid_) {
    running_ptrs_.clear();
    running_ptrs_by_ve_.resize(static_cast<std::size_t>(config_.num_virtual_engines));
    for (auto& v : running_ptrs_by_ve_) v.clear();
    // IdMap values do not move (growth included) until erased, and a request leaves running_
    // (which updates or invalidates this) before it is erased.
    for (RequestId id : running_) {
      auto* r = const_cast<Request*>(&requests_.at(id));
      running_ptrs_.push_back(r);
      if (r->virtual_engine >= 0) running_ptrs_by_ve_[static_cast<std::size_t>(r->virtual_engine)].push_back(r);
    }
    running_ptrs_valid_ = true;
  }
  return running_ptrs_;
}

const std::vector<Request*>& Scheduler::running_requests(std::int64_t ve) const {
  running_requests();
  return running_ptrs_by_ve_[static_cast<std::size_t>(ve)];
}

std::vector<std::int64_t> Scheduler::running_per_ve() const {
  std::vector<std::int64_t> load(static_cast<std::size_t>(config_.num_virtual_engines), 0);
  for (RequestId id : running_) {
    const std::int64_t ve = requests_.at(id).virtual_engine;
    if (ve >= 0) ++load[static_cast<std::size_t>(ve)];
  }
  return load;
}

std::vector<double> Scheduler::predicted_loads() const {
  // Each virtual engine's sum is kept until one of its requests changes (a step's result, an
  // admission, a request leaving or arriving) or the chunk cap moves: a round of g schedule()
  // calls asked for every virtual engine's load g times, a walk over every running request each.
  // A sum is recomputed in running-request order, so it is the same to the bit either way.
  const auto g = static_cast<std::size_t>(config_.num_virtual_engines);
  if (ve_load_.size() != g) {
    ve_load_.assign(g, 0.0);
    ve_load_valid_.assign(g, 0);
  }
  if (ve_load_cap_ != typical_chunk_cap_) {
    invalidate_loads();
    ve_load_cap_ = typical_chunk_cap_;
  }
  for (std::size_t v = 0; v < g; ++v) {
    if (ve_load_valid_[v] != 0) continue;
    double load = config_.step_cost.fixed_us;
    for (const Request* r : running_requests(static_cast<std::int64_t>(v))) {
      // A decode's next chunk is its one newest token, a prefill's the chunk it gets with a whole
      // step budget; for a request in flight that is the chunk now running, a close stand-in for
      // the next one.
      load += config_.step_cost.sequence_us(r->num_computed, chunk_for(*r, config_.max_num_batched_tokens));
    }
    ve_load_[v] = load;
    ve_load_valid_[v] = 1;
  }
  return ve_load_;
}

std::int64_t Scheduler::least_loaded_ve() const {
  const std::vector<std::int64_t> load = running_per_ve();
  return std::min_element(load.begin(), load.end()) - load.begin();
}

bool Scheduler::schedule_running(std::int64_t ve, StepPlan* plan, std::int64_t* budget, std::int64_t* decode_room) {
  bool preempted = false;
  std::vector<RequestId>& scheduled = scheduled_;
  scheduled.clear();
  // A copy of this virtual engine's running requests in admission order: preemption below edits
  // running_ (but erases no request, so the pointers stay valid).
  running_order_ = running_requests(ve);
  // Each request's record and its KV record are cache misses under a large batch: start loading
  // them a few requests ahead (the request's a little earlier, since its id leads to the other).
  constexpr std::size_t kAhead = 8;
  for (std::size_t i = 0; i < std::min(kAhead, running_order_.size()); ++i) __builtin_prefetch(running_order_[i]);
  for (std::size_t i = 0; i < running_order_.size(); ++i) {
    if (*budget <= 0 && *decode_room <= 0) break;
    if (i + 2 * kAhead < running_order_.size()) __builtin_prefetch(running_order_[i + 2 * kAhead]);
    if (i + kAhead < running_order_.size()) {
      const Request* ahead = running_order_[i + kAhead];
      kv_->prefetch(ahead->id);
      if (!ahead->output_tokens.empty()) __builtin_prefetch(&ahead->output_tokens.back());
    }
    Request& r = *running_order_[i];
    if (r.state != RequestState::kRunning) continue;  // preempted earlier in this loop
    KUN_CHECK_EQ(r.virtual_engine, ve) << "request " << r.id;
    const RequestId id = r.id;
    // A decode (one token left to compute) spends the decode room first, when there is one.
    const bool from_room = *decode_room > 0 && r.num_uncomputed() == 1;
    const std::int64_t n = from_room ? 1 : chunk_for(r, *budget);
    if (n <= 0) continue;
    bool self_preempted = false;
    // try_grow: can_grow then grow in one lookup (nothing changes when it cannot).
    while (!kv_->try_grow(id, r.num_computed + n)) {
      RequestId victim = pick_victim(ve, id, scheduled);
      preempted = true;
      if (!victim.valid()) {
        preempt(r, plan);
        self_preempted = true;
        break;
      }
      preempt(requests_.at(victim), plan);
    }
    if (self_preempted) continue;
    add_to_plan(r, n, plan);
    scheduled.push_back(id);
    *(from_room ? decode_room : budget) -= n;
  }
  return preempted;
}

void Scheduler::schedule_swapped(std::int64_t ve, StepPlan* plan, std::int64_t* budget) {
  while (!swapped_.empty() && *budget > 0 &&
         static_cast<std::int64_t>(running_.size()) < config_.max_num_seqs) {
    Request& r = requests_.at(swapped_.front());
    if (!kv_->can_swap_in(r.id)) break;
    const std::int64_t n = chunk_for(r, *budget);
    // Blocks for the swapped tokens plus this step's chunk must both fit.
    std::vector<BlockCopy> copies;
    KUN_CHECK(kv_->swap_in(r.id, &copies));
    if (!kv_->can_grow(r.id, r.num_computed + n)) {
      // Undo by swapping straight back out is wasteful; instead keep it resident and let the
      // running phase of the next step grow it.
      counters_.blocks_swapped_in += static_cast<std::int64_t>(copies.size());
      plan->swap_in.insert(plan->swap_in.end(), copies.begin(), copies.end());
      swapped_.pop_front();
      r.state = RequestState::kRunning;
      r.virtual_engine = ve;
      running_.push_back(r.id);
      running_ptrs_valid_ = false;
      invalidate_loads();
      break;
    }
    counters_.blocks_swapped_in += static_cast<std::int64_t>(copies.size());
    plan->swap_in.insert(plan->swap_in.end(), copies.begin(), copies.end());
    swapped_.pop_front();
    r.state = RequestState::kRunning;
    r.virtual_engine = ve;
    running_.push_back(r.id);
    running_ptrs_valid_ = false;
    invalidate_loads();
    KUN_CHECK_OK(kv_->grow(r.id, r.num_computed + n));
    add_to_plan(r, n, plan);
    *budget -= n;
  }
}

void Scheduler::admit(Request& r, std::int64_t ve, std::int64_t n, StepPlan* plan) {
  KUN_CHECK_OK(kv_->grow(r.id, r.num_computed + n));
  if (r.timings.first_scheduled_us < 0) {  // first admission: its prompt joins the typical length
    if (recent_prompts_.size() < kPromptHistory) {
      recent_prompts_.push_back(r.num_prompt_tokens());
    } else {
      recent_prompts_[recent_prompts_next_] = r.num_prompt_tokens();
    }
    recent_prompts_next_ = (recent_prompts_next_ + 1) % kPromptHistory;
  }
  r.state = RequestState::kRunning;
  r.virtual_engine = ve;
  running_.push_back(r.id);
  if (static_cast<std::size_t>(ve) < ve_load_valid_.size()) ve_load_valid_[static_cast<std::size_t>(ve)] = 0;  // only its load moved
  if (running_ptrs_valid_) {  // appended in admission order, as a rebuild would
    running_ptrs_.push_back(&r);
    running_ptrs_by_ve_[static_cast<std::size_t>(ve)].push_back(&r);
  }
  add_to_plan(r, n, plan);
}

void Scheduler::schedule_waiting(std::int64_t ve, StepPlan* plan, std::int64_t* budget) {
  if (lookahead()) {
    schedule_waiting_lookahead(ve, plan, budget);
    return;
  }
  while (!waiting_.empty() && *budget > 0 &&
         static_cast<std::int64_t>(running_.size()) < config_.max_num_seqs) {
    Request& r = requests_.at(waiting_.front());
    if (!config_.enable_chunked_prefill && r.num_uncomputed() > *budget) break;
    const std::int64_t n = chunk_for(r, *budget);
    if (!kv_->can_grow(r.id, r.num_computed + n)) break;  // FCFS: the head waits for blocks
    waiting_.pop_front();
    admit(r, ve, n, plan);
    *budget -= n;
  }
}

void Scheduler::schedule_waiting_lookahead(std::int64_t ve, StepPlan* plan, std::int64_t* budget) {
  // The g micro-batches of a round run through the same stages one after another, so a round
  // lasts g times the costliest one: balance predicted step cost, not request count. Plan the
  // head of the queue over all virtual engines (longest-first onto the least loaded, the LPT
  // multiway partition) and admit only what lands here; the rest waits for its virtual engine,
  // whose own schedule() plans again with the loads as they are then.
  if (waiting_.empty()) return;
  const std::int64_t g = config_.num_virtual_engines;
  const RequestId head = waiting_.front();
  if (head != watched_head_) {
    watched_head_ = head;
    head_passed_over_ = 0;
  }
  const std::int64_t room = config_.max_num_seqs - static_cast<std::int64_t>(running_.size());
  const std::int64_t window =
      std::min({static_cast<std::int64_t>(waiting_.size()), room, kLookaheadPerVirtualEngine * g});
  if (window <= 0) return;
  const auto w = static_cast<std::size_t>(window);
  std::vector<RequestId> ids(waiting_.begin(), waiting_.begin() + static_cast<std::ptrdiff_t>(w));
  std::vector<std::int64_t> first_chunk(w);
  std::vector<double> cost(w);
  for (std::size_t i = 0; i < w; ++i) {
    const Request& r = requests_.at(ids[i]);
    first_chunk[i] = chunk_for(r, config_.max_num_batched_tokens);
    cost[i] = config_.step_cost.sequence_us(r.num_computed, first_chunk[i]);
  }
  std::vector<double> load = predicted_loads();
  std::vector<std::int64_t> owner(w, -1);
  // Replanning at every call means the plan moves with each arrival, finish and chunk, so the
  // head could be planned elsewhere again and again (onto a virtual engine whose step is slow
  // to come back, say). Once it has been passed over by g calls in a row, a whole round, it is
  // this virtual engine's: admitted now or, short of budget or blocks, nothing passes it.
  const bool head_due = head_passed_over_ >= g;
  if (head_due) {
    owner[0] = ve;
    load[static_cast<std::size_t>(ve)] += cost[0];
  }
  std::vector<std::size_t> order(w);
  std::iota(order.begin(), order.end(), std::size_t{0});
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return cost[a] > cost[b]; });
  for (std::size_t i : order) {
    if (owner[i] >= 0) continue;
    auto best = static_cast<std::size_t>(ve);  // ties: this virtual engine, the one about to run
    for (std::size_t v = 0; v < load.size(); ++v) {
      if (load[v] < load[best]) best = v;
    }
    owner[i] = static_cast<std::int64_t>(best);
    load[best] += cost[i];
  }
  // Admit ours in queue order. A request ahead that cannot get blocks for its first chunk holds
  // back everyone behind it, whichever virtual engine it is planned for (FCFS head-of-line
  // blocking, as without lookahead).
  std::vector<RequestId> admitted;
  for (std::size_t i = 0; i < w; ++i) {
    if (*budget <= 0 || static_cast<std::int64_t>(running_.size()) >= config_.max_num_seqs) break;
    Request& r = requests_.at(ids[i]);
    const bool mine = owner[i] == ve;
    if (mine && !config_.enable_chunked_prefill && r.num_uncomputed() > *budget) break;
    const std::int64_t n = mine ? chunk_for(r, *budget) : first_chunk[i];
    if (!kv_->can_grow(r.id, r.num_computed + n)) break;
    if (!mine) continue;
    admit(r, ve, n, plan);
    admitted.push_back(r.id);
    *budget -= n;
  }
  for (RequestId id : admitted) waiting_.erase(std::find(waiting_.begin(), waiting_.end(), id));
  if (!waiting_.empty() && waiting_.front() == head) ++head_passed_over_;
}

StepPlan Scheduler::schedule(std::int64_t ve) {
  KUN_CHECK(ve >= 0 && ve < config_.num_virtual_engines) << "virtual engine " << ve;
  kv_->begin_step();
  StepPlan plan;
  plan.step_index = counters_.steps;
  // About this virtual engine's share of the running requests (grows past it when admitting).
  plan.sequences.reserve(running_.size() / static_cast<std::size_t>(config_.num_virtual_engines) + 16);
  typical_chunk_cap_ = compute_typical_chunk_cap();
  std::int64_t budget = config_.max_num_batched_tokens;
  // Decodes outside the budget (fused groups): the room above the prompt share, up to the step's cap.
  std::int64_t decode_room = std::max<std::int64_t>(0, config_.max_step_tokens_with_decodes - budget);
  if (config_.priority == StepPriority::kPrefillFirst) {
    schedule_swapped(ve, &plan, &budget);
    schedule_waiting(ve, &plan, &budget);
    schedule_running(ve, &plan, &budget, &decode_room);
  } else {
    const bool preempted = schedule_running(ve, &plan, &budget, &decode_room);
    if (!preempted) {
      schedule_swapped(ve, &plan, &budget);
      if (swapped_.empty()) schedule_waiting(ve, &plan, &budget);
    }
  }
  if (!plan.sequences.empty() || !plan.swap_in.empty() || !plan.swap_out.empty()) {
    ++counters_.steps;
    // Only a plan an executor will run may carry them (empty plans are not submitted); a
    // cost-model executor keeps no tables.
    if (config_.plan_kv != PlanKv::kOffsiteOnly) plan.kv_released = kv_->take_released();
  }
  if (config_.plan_kv == PlanKv::kOffsiteOnly) kv_->take_released();
  return plan;
}

std::vector<TokenEvent> Scheduler::apply_result(const StepPlan& plan, const StepResult& result) {
  invalidate_loads();  // requests advance
  std::vector<TokenEvent> events;
  events.reserve(plan.sequences.size());
  std::size_t sampled = 0;
  constexpr std::size_t kAhead = 8;  // records loaded ahead (cache misses under a large batch)
  const std::size_t num_seqs = plan.sequences.size();
  for (std::size_t i = 0; i < std::min(kAhead, num_seqs); ++i) {
    if (const Request* ahead = requests_.find(plan.sequences[i].id)) __builtin_prefetch(ahead);
  }
  for (std::size_t i = 0; i < num_seqs; ++i) {
    const ScheduledSequence& s = plan.sequences[i];
    if (i + kAhead < num_seqs) {
      if (const Request* ahead = requests_.find(plan.sequences[i + kAhead].id)) __builtin_prefetch(ahead);
    }
    Request* found = requests_.find(s.id);
    if (s.sample) ++sampled;
    if (found == nullptr) continue;  // cancelled while the step ran
    Request& r = *found;
    if (r.state != RequestState::kRunning) continue;
    KUN_CHECK_EQ(r.num_computed, s.start_pos) << "request " << r.id << " advanced twice";
    const auto n = static_cast<std::int64_t>(s.tokens.size());
    if (s.start_pos >= r.max_computed && s.start_pos < r.num_prompt_tokens()) {
      counters_.prompt_tokens += std::min(n, r.num_prompt_tokens() - s.start_pos);
    }
    r.num_computed += n;
    r.max_computed = std::max(r.max_computed, r.num_computed);
    if (!s.sample) continue;
    KUN_CHECK_LE(sampled, result.sampled_tokens.size()) << "executor returned too few samples";
    const std::int32_t token = result.sampled_tokens[sampled - 1];
    const std::int64_t blocks_before = kv_->layer_blocks_for(r.num_tokens());
    r.output_tokens.push_back(token);
    blocks_demanded_ += kv_->layer_blocks_for(r.num_tokens()) - blocks_before;
    ++counters_.generated_tokens;
    if (r.timings.first_token_us < 0) r.timings.first_token_us = clock_->now_us();
    FinishReason reason = FinishReason::kNone;
    const auto& stops = r.spec.stop_token_ids;
    if (!r.spec.ignore_eos && token == config_.eos_token_id) {
      reason = FinishReason::kStop;
    } else if (std::find(stops.begin(), stops.end(), token) != stops.end()) {
      reason = FinishReason::kStop;
    } else if (r.num_output_tokens() >= r.spec.max_tokens || r.num_tokens() >= config_.max_model_len) {
      reason = FinishReason::kLength;
    }
    if (reason != FinishReason::kNone) {
      finish(r, reason);
      ++counters_.finished;
      events.push_back(make_event(r, token));
      blocks_demanded_ -= kv_->layer_blocks_for(r.num_tokens());
      requests_.erase(s.id);
    } else {
      events.push_back(make_event(r, token));
    }
  }
  KUN_CHECK_EQ(sampled, result.sampled_tokens.size()) << "sample count mismatch";
  return events;
}

std::optional<Request> Scheduler::detach(RequestId id, bool keep_kv) {
  Request* found = requests_.find(id);
  if (found == nullptr) return std::nullopt;
  Request r = std::move(*found);
  requests_.erase(id);
  blocks_demanded_ -= kv_->layer_blocks_for(r.num_tokens());
  remove_from_queues(id, r.state);
  if (!keep_kv) {
    kv_->release(id);
    requeue_without_kv(r, /*by_transition=*/true);
  }
  return r;
}

void Scheduler::release_detached(RequestId id) {
  KUN_CHECK(requests_.count(id) == 0) << "request " << id << " is still scheduled here";
  kv_->release(id);
}

std::vector<RequestId> Scheduler::request_ids_in_order() const {
  std::vector<RequestId> ids(running_.begin(), running_.end());
  ids.insert(ids.end(), swapped_.begin(), swapped_.end());
  ids.insert(ids.end(), waiting_.begin(), waiting_.end());
  return ids;
}

Status Scheduler::adopt(Request r, bool with_kv) {
  KUN_CHECK(requests_.count(r.id) == 0) << "request " << r.id << " adopted twice";
  const RequestId id = r.id;
  if (with_kv && r.num_computed > 0) {
    KUN_RETURN_IF_ERROR(kv_->grow(id, r.num_computed));
    r.state = RequestState::kRunning;
    r.virtual_engine = least_loaded_ve();
    running_.push_back(id);
    running_ptrs_valid_ = false;
    invalidate_loads();
  } else {
    requeue_without_kv(r, /*by_transition=*/true);  // the KV it had is not carried over
    waiting_.push_back(id);
  }
  blocks_demanded_ += kv_->layer_blocks_for(r.num_tokens());
  requests_.emplace(id, std::move(r));
  return ok_status();
}

void Scheduler::adopt_with_imported_kv(Request r) {
  KUN_CHECK(requests_.count(r.id) == 0) << "request " << r.id << " adopted twice";
  KUN_CHECK_GE(kv_->tokens_held(r.id), r.num_computed) << "request " << r.id << " was imported without its KV";
  r.state = RequestState::kRunning;
  r.virtual_engine = least_loaded_ve();
  running_.push_back(r.id);
  running_ptrs_valid_ = false;
  invalidate_loads();
  blocks_demanded_ += kv_->layer_blocks_for(r.num_tokens());
  requests_.emplace(r.id, std::move(r));
}

std::int64_t Scheduler::recount_blocks_demanded() const {
  std::int64_t needed = 0;
  for (const auto& [id, r] : requests_) needed += kv_->layer_blocks_for(r.num_tokens());
  return needed;
}

double Scheduler::demand() const {
  const std::int64_t total = kv_->total_blocks();
  return total > 0 ? static_cast<double>(blocks_demanded_) / static_cast<double>(total) : 0.0;
}

std::int64_t Scheduler::pending_blocks() const {
  // Every request is waiting, swapped or running, and blocks_demanded_ sums all of them: walk the
  // shorter side. Under overload the queue is thousands long and the monitor samples every period.
  if (waiting_.size() + swapped_.size() > running_.size()) {
    std::int64_t running = 0;
    for (const Request* r : running_requests()) running += kv_->layer_blocks_for(r->num_tokens());
    return blocks_demanded_ - running;
  }
  std::int64_t pending = 0;
  for (RequestId id : waiting_) pending += kv_->layer_blocks_for(requests_.at(id).num_tokens());
  for (RequestId id : swapped_) pending += kv_->layer_blocks_for(requests_.at(id).num_tokens());
  return pending;
}

InstanceStats Scheduler::report() const {
  InstanceStats s;
  s.num_running = num_running();
  s.num_waiting = num_waiting();
  s.kv_blocks_total = kv_->total_blocks();
  s.kv_blocks_free = kv_->free_blocks();
  s.demand = demand();
  s.pending_blocks = pending_blocks();
  s.blocks_demanded = blocks_demanded_;
  return s;
}

const Request* Scheduler::find(RequestId id) const {
  return requests_.find(id);
}

void Scheduler::check_invariants() const {
  std::size_t queued = waiting_.size() + swapped_.size() + running_.size();
  KUN_CHECK_EQ(queued, requests_.size()) << "a request is in no queue or in two";
  KUN_CHECK_EQ(blocks_demanded_, recount_blocks_demanded()) << "running count of demanded KV blocks is off";
  std::int64_t pending = 0;
  for (RequestId id : waiting_) pending += kv_->layer_blocks_for(requests_.at(id).num_tokens());
  for (RequestId id : swapped_) pending += kv_->layer_blocks_for(requests_.at(id).num_tokens());
  KUN_CHECK_EQ(pending_blocks(), pending) << "pending KV blocks off against a walk of the queues";
  for (RequestId id : waiting_) {
    const Request& r = requests_.at(id);
    KUN_CHECK(r.state == RequestState::kWaiting) << "request " << id << " in waiting queue is " << request_state_name(r.state);
    KUN_CHECK_EQ(kv_->tokens_held(id), 0) << "waiting request " << id << " holds KV";
  }
  for (RequestId id : swapped_) {
    KUN_CHECK(requests_.at(id).state == RequestState::kSwapped);
    KUN_CHECK(kv_->is_swapped(id)) << "request " << id;
  }
  for (RequestId id : running_) {
    const Request& r = requests_.at(id);
    KUN_CHECK(r.state == RequestState::kRunning) << "request " << id;
    KUN_CHECK(r.virtual_engine >= 0 && r.virtual_engine < config_.num_virtual_engines) << "request " << id;
    KUN_CHECK_GE(kv_->tokens_held(id), r.num_computed) << "running request " << id << " lacks blocks";
    KUN_CHECK_LT(r.num_computed, r.num_tokens()) << "request " << id << " computed past its tokens";
  }
  kv_->check_integrity();
}

}  // namespace kun::engine
