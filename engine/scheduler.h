// Per-instance scheduler: continuous batching with vLLM-V1-like semantics (DESIGN.md 3, issue 3).
//
// Pure policy: it reads a Clock and its own state and decides the next step's batch; it has no
// threads, no I/O and no device memory (KV blocks are bookkept by KvManager), so the simulator
// runs it unchanged. One owner: the engine thread (or the simulator's event loop).
//
// A step: every request has a token sequence (prompt + generated tokens) and num_computed, the
// prefix whose KV is cached. A step computes the next chunk of each scheduled request (a prefill
// chunk, or the one newest token when decoding) and samples a token for requests whose chunk
// reaches the end. Admission is by KV blocks: a request is scheduled only if blocks for its
// chunk are available; when running requests cannot grow, victims are preempted (recompute:
// free KV and requeue at the head; swap: copy KV to a bounded host space and back later).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <map>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "common/clock.h"
#include "common/id_map.h"
#include "common/status.h"
#include "engine/api.h"
#include "engine/kv_manager.h"
#include "engine/request.h"
#include "engine/step.h"
#include "engine/step_cost.h"

namespace kun::engine {

enum class PreemptionMode { kRecompute, kSwap };
enum class VictimOrder { kNewestFirst, kOldestFirst };
enum class StepPriority { kDecodeFirst, kPrefillFirst };
const char* preemption_mode_name(PreemptionMode m);
bool parse_preemption_mode(const std::string& s, PreemptionMode* out);

struct SchedulerConfig {
  std::int64_t max_num_seqs = 64;
  std::int64_t max_num_batched_tokens = 2048;
  bool enable_chunked_prefill = true;
  // Upper bound of one prefill chunk (0: only the step's token budget limits it).
  std::int64_t max_prefill_chunk_tokens = 0;
  StepPriority priority = StepPriority::kDecodeFirst;
  PreemptionMode preemption = PreemptionMode::kRecompute;
  VictimOrder victim_order = VictimOrder::kNewestFirst;
  std::int64_t max_waiting_requests = 4096;  // bounded queue: beyond it submit is kOverloaded
  std::int64_t max_model_len = 4096;         // prompt + output tokens
  std::int64_t vocab_size = 0;               // for validating prompt token ids (0: unchecked)
  std::int32_t eos_token_id = -1;
  // Virtual engines (DESIGN.md 3.4): disjoint request sets, each scheduled and run as its own
  // step so a g-stage pipeline keeps g steps in flight. 1 for an independent instance.
  std::int64_t num_virtual_engines = 1;
  // Lookahead batch formation for virtual engines (g > 1): a virtual engine's schedule() plans
  // the head of the waiting queue over all g virtual engines, longest-first onto the least loaded
  // by predicted step cost (step_cost), and admits only the requests planned onto itself; prefill
  // chunks are capped at the typical (median) recent prompt length, so a long prompt spreads over
  // several rounds in pieces the size of the short ones. Off: the engine scheduled first takes
  // what fits, chunks are limited by the step budget only.
  bool balance_virtual_engines = true;
  // Predicted step time, the load that lookahead balances (set from the model's shape).
  StepCostModel step_cost;
  // Floor of the typical-length chunk cap (0: one KV block).
  std::int64_t min_prefill_chunk_tokens = 0;
  // Decodes outside the token budget (fused groups with lookahead; 0: off, an independent
  // instance, where decodes count against max_num_batched_tokens). When > 0, a running
  // sequence's one next token (a decode) does not spend max_num_batched_tokens, which is then the
  // virtual engine's share of prompt (prefill) tokens; a step carries at most this many tokens in
  // all (the instance's step budget, what a device's workspace holds), decodes first taking the
  // room above the share. fused_scheduler_config sets it.
  std::int64_t max_step_tokens_with_decodes = 0;
  // What a planned sequence's `kv` carries (step.h): kChanges (default) the whole table the
  // first time and after a rewrite, then only appended blocks, so a step's plan does not grow
  // with context x layers; kFullTables every layer's whole block list every step (the old
  // representation, for benchmarks); kOffsiteOnly only the layers held off the device that runs
  // them, without ids (the simulator's cost model needs no more).
  PlanKv plan_kv = PlanKv::kChanges;
  Status validate() const;
};

struct SchedulerCounters {
  std::int64_t steps = 0;
  std::int64_t preemptions_recompute = 0;
  std::int64_t preemptions_swap = 0;
  std::int64_t swap_fallbacks_to_recompute = 0;  // swap space full
  std::int64_t blocks_swapped_out = 0;
  std::int64_t blocks_swapped_in = 0;
  std::int64_t prompt_tokens = 0;
  std::int64_t generated_tokens = 0;
  std::int64_t recomputed_tokens = 0;  // tokens computed again (recompute preemption or a transition)
  std::int64_t transition_recomputed_tokens = 0;  // of those, after a transition dropped the KV
  std::int64_t finished = 0;
  std::int64_t cancelled = 0;
};

// The scheduler configuration of a fused group of g instances (DESIGN.md 3.4): chunked prefill
// on, g virtual engines, batch and queue bounds g instances' worth. With balanced virtual engines
// (lookahead) each one's step gets 1/g of the instance's token budget (at least
// min_step_tokens) for prompt tokens, so a round of g steps carries one instance step's prompt
// tokens, plus its running sequences' decodes (one token each), which do not spend the share
// (a group holds g instances' sequences: counted against 1/g of one instance's budget, 256
// sequences per virtual engine filled a 256-token share at g = 8 and no prompt got a token); a
// step never exceeds the instance's whole budget (max_step_tokens_with_decodes). Without
// lookahead each gets the whole budget, decodes included. The caller sets step_cost from the
// model's shape.
SchedulerConfig fused_scheduler_config(SchedulerConfig instance, std::int64_t g, std::int64_t min_step_tokens);

// Checks a request against the configuration alone (no scheduler state), so a front door can
// answer 400 at once: empty prompt, token ids outside the vocabulary, bad sampling values,
// max_tokens < 1, prompt + max_tokens beyond max_model_len.
Status validate_request(const RequestSpec& spec, const SchedulerConfig& config);

class Scheduler {
 public:
  Scheduler(SchedulerConfig config, KvManager* kv, const Clock* clock);

  // Validates and queues a request. kInvalidArgument / kOutOfRange for a bad request,
  // kOverloaded when the waiting queue is full, unless the caller already admitted the request
  // against its own queue bound (Engine::submit_as): a request the client was told is accepted
  // must not fail later because a transition moved other requests into the queue meanwhile.
  enum class QueueBound { kEnforce, kAlreadyAdmitted };
  Status add_request(RequestId id, RequestSpec spec, QueueBound bound = QueueBound::kEnforce);
  // Removes a request wherever it is and frees its blocks at once. Returns its final event, or
  // nothing (finished = false) when the id is unknown.
  TokenEvent cancel(RequestId id);

  // Decides the next step of virtual engine `ve`: only its running requests, and waiting ones it
  // admits (which then belong to it). An empty plan means nothing can run there now. Requests of
  // other virtual engines are never touched (they may be in flight).
  StepPlan schedule(std::int64_t ve = 0);
  // Predicted cost (config().step_cost) of each virtual engine's next step over its running
  // requests: fixed cost plus each request's next chunk at its current context.
  std::vector<double> predicted_loads() const;
  // The prefill chunk cap from recent prompt lengths (0: none; only with lookahead on).
  std::int64_t typical_chunk_tokens() const { return typical_chunk_cap_; }
  // Prompt lengths of the recent first admissions, oldest first (at most the last 64): the
  // history behind the lookahead's chunk cap. A cluster carries it from the schedulers of
  // instances that fuse into a group, and from a group to the instances it splits into, so a
  // transition does not start the lookahead cold.
  std::vector<std::int64_t> admission_history() const;
  // Replaces the history (keeps the newest 64 entries of `oldest_first`).
  void set_admission_history(const std::vector<std::int64_t>& oldest_first);
  // Applies a step's sampled tokens; returns the token events in plan order (final events
  // included). Finished requests are removed and their blocks freed.
  std::vector<TokenEvent> apply_result(const StepPlan& plan, const StepResult& result);

  // Optional: hands a plan whose result was applied back, so its sequences' token buffers are
  // reused by later plans instead of allocated again (one allocation per planned sequence per
  // step was a sixth of an overloaded simulation).
  void recycle(StepPlan&& plan);

  // ---- moving requests between schedulers (drop, restore, migration) ----
  // Takes a request out of this scheduler. With keep_kv its blocks stay allocated (the caller
  // copies them and then calls release_detached()); without, they are freed and the request will
  // recompute (num_computed = 0). Returns nothing for an unknown id.
  std::optional<Request> detach(RequestId id, bool keep_kv);
  void release_detached(RequestId id);
  // Ids in the order a move should re-admit them: running (admission order), swapped, waiting.
  std::vector<RequestId> request_ids_in_order() const;
  // Inserts a detached request. with_kv: it joins the running set holding blocks for its
  // num_computed tokens (kResourceExhausted if they do not fit; nothing changes) and the caller
  // fills them (block_lists()); otherwise it queues at the back and recomputes.
  Status adopt(Request r, bool with_kv);
  // Inserts a detached running request whose KV the caller already placed in this scheduler's
  // KvManager (KvManager::import_tables): it keeps running from num_computed, no recompute.
  void adopt_with_imported_kv(Request r);
  std::vector<LayerBlockList> block_lists(RequestId id) const { return kv_->block_lists(id); }
  std::int64_t kv_blocks_held(RequestId id) const { return kv_->layer_blocks_for(kv_->tokens_held(id)); }
  const KvManager& kv() const { return *kv_; }

  bool has_unfinished() const { return !requests_.empty(); }
  std::int64_t num_running() const { return static_cast<std::int64_t>(running_.size()); }
  std::int64_t num_waiting() const { return static_cast<std::int64_t>(waiting_.size() + swapped_.size()); }
  const SchedulerCounters& counters() const { return counters_; }
  const SchedulerConfig& config() const { return config_; }
  // Demand: blocks needed by running + waiting requests at their current lengths over capacity.
  double demand() const;
  // Layer blocks that not-yet-admitted requests (waiting, swapped) need at their current lengths.
  std::int64_t pending_blocks() const;
  InstanceStats report() const;
  const Request* find(RequestId id) const;
  // Aborts (KUN_CHECK) if scheduler and KV bookkeeping disagree: every request in exactly one
  // queue, running requests hold blocks for num_computed tokens, waiting ones hold none.
  void check_invariants() const;

 private:
  // Schedules up to `budget` tokens of running requests; returns false if it preempted.
  // With max_step_tokens_with_decodes, decodes spend *decode_room first (then *budget).
  bool schedule_running(std::int64_t ve, StepPlan* plan, std::int64_t* budget, std::int64_t* decode_room);
  void schedule_swapped(std::int64_t ve, StepPlan* plan, std::int64_t* budget);
  void schedule_waiting(std::int64_t ve, StepPlan* plan, std::int64_t* budget);
  // Lookahead admission of virtual engine `ve` (balance_virtual_engines with g > 1).
  void schedule_waiting_lookahead(std::int64_t ve, StepPlan* plan, std::int64_t* budget);
  // Resets a request whose KV is gone (the caller released it) to recompute from the start;
  // by_transition: a drop / restore / migration lost the KV, not a recompute preemption.
  static void requeue_without_kv(Request& r, bool by_transition);
  // Moves a waiting request into ve's running set and plans its first chunk of n tokens.
  void admit(Request& r, std::int64_t ve, std::int64_t n, StepPlan* plan);
  bool lookahead() const { return config_.num_virtual_engines > 1 && config_.balance_virtual_engines; }
  std::int64_t compute_typical_chunk_cap() const;
  std::vector<std::int64_t> running_per_ve() const;  // running requests of each virtual engine
  std::int64_t least_loaded_ve() const;
  std::int64_t chunk_for(const Request& r, std::int64_t budget) const;
  void add_to_plan(Request& r, std::int64_t n, StepPlan* plan);
  // Picks a running request not yet in this step's plan, other than `except`; invalid if none.
  RequestId pick_victim(std::int64_t ve, RequestId except, const std::vector<RequestId>& scheduled) const;
  void preempt(Request& victim, StepPlan* plan);
  void finish(Request& r, FinishReason reason);
  TokenEvent make_event(const Request& r, std::int32_t token) const;
  // Removes the request from the queue its state names (CHECKs it is in one).
  // `r` (optional, the request itself) lets a running request leave the running views without
  // rebuilding them.
  void remove_from_queues(RequestId id, RequestState state, const Request* r = nullptr);

  SchedulerConfig config_;
  KvManager* kv_;
  const Clock* clock_;
  // Looked up for every running request several times per step: an IdMap (common/id_map.h;
  // every walk over it is an order-free sum).
  IdMap<RequestId, Request> requests_;
  std::deque<RequestId> waiting_;
  std::deque<RequestId> swapped_;
  std::deque<RequestId> running_;  // admission order
  // Scratch of schedule_running (kept to avoid an allocation per step).
  std::vector<Request*> running_order_;
  std::vector<RequestId> scheduled_;
  std::vector<std::vector<std::int32_t>> token_buffers_;  // from recycle(), for add_to_plan
  // running_ as pointers into requests_, rebuilt after running_ changes: the per-virtual-engine
  // walks (schedule_running, predicted_loads) run g times a round over every running request
  // and looked each one up.
  const std::vector<Request*>& running_requests() const;
  const std::vector<Request*>& running_requests(std::int64_t ve) const;  // of one virtual engine
  mutable std::vector<Request*> running_ptrs_;
  mutable std::vector<std::vector<Request*>> running_ptrs_by_ve_;
  mutable bool running_ptrs_valid_ = false;
  // predicted_loads() per virtual engine, valid until one of its requests changes or the chunk
  // cap it was computed with (ve_load_cap_) moves.
  mutable std::vector<double> ve_load_;
  mutable std::vector<char> ve_load_valid_;
  mutable std::int64_t ve_load_cap_ = -1;
  void invalidate_loads() const { std::fill(ve_load_valid_.begin(), ve_load_valid_.end(), 0); }
  SchedulerCounters counters_;
  // Layer blocks every request needs at its current length (the numerator of demand()), kept as
  // requests arrive, grow, leave and come (the monitor samples it every period; a sum over
  // thousands of queued requests per sample was a tenth of an overloaded simulation).
  std::int64_t blocks_demanded_ = 0;
  std::int64_t recount_blocks_demanded() const;  // the same sum from scratch (check_invariants)
  // Prompt lengths of the last kPromptHistory first admissions (a ring), for the typical chunk.
  static constexpr std::size_t kPromptHistory = 64;
  std::vector<std::int64_t> recent_prompts_;
  std::size_t recent_prompts_next_ = 0;
  std::int64_t typical_chunk_cap_ = 0;  // fixed at the start of each schedule()
  // Starvation guard of the lookahead: how many consecutive lookahead admissions left the
  // current queue head waiting.
  RequestId watched_head_;
  std::int64_t head_passed_over_ = 0;
};

}  // namespace kun::engine
