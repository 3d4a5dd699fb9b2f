#include "runtime/pipeline_executor.h"

#include <algorithm>
#include <chrono>
#include <cstring>

#include "common/check.h"
#include "runtime/device_agent.h"

namespace kun::runtime {
namespace {
std::atomic<std::uint64_t> g_next_executor_id{1};

std::int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
}  // namespace

PipelineExecutor::PipelineExecutor(std::vector<StageSpec> stages, MessageTransport& front_end)
    : stages_(std::move(stages)),
      front_end_(front_end),
      id_(g_next_executor_id.fetch_add(1, std::memory_order_relaxed)),
      tables_(0, stages_.empty() ? 1 : stages_.back().layer_end),
      stage_synced_(stages_.size(), 0),
      stage_last_end_ns_(stages_.size(), 0) {
  KUN_CHECK(!stages_.empty());
  KUN_CHECK_EQ(stages_.front().layer_begin, 0);
  for (std::size_t s = 0; s < stages_.size(); ++s) {
    KUN_CHECK(stages_[s].layer_begin < stages_[s].layer_end) << "stage " << s << " has no layers";
    KUN_CHECK(stages_[s].endpoint >= 0 && stages_[s].endpoint != front_end_.device()) << "stage " << s << " endpoint";
    if (s > 0) KUN_CHECK_EQ(stages_[s].layer_begin, stages_[s - 1].layer_end) << "stages must cover consecutive layers";
  }
}

PipelineExecutor::~PipelineExecutor() {
  // Steps still in flight finish on their agents; their replies are dropped with the handles.
  for (InFlight& f : in_flight_) (void)f.reply.wait();
  // The agents drop this executor's block tables (after its last stage message: same order).
  for (std::size_t s = 0; s < stages_.size(); ++s) {
    if (!stage_synced_[s]) continue;
    MessageHeader h;
    h.dst = stages_[s].endpoint;
    h.kind = TransferKind::kControl;
    h.port = Port::kStage;
    h.op = static_cast<std::uint16_t>(AgentOp::kDropTables);
    h.request_id = static_cast<std::int64_t>(id_);
    front_end_.send_owned(std::move(h), {});
  }
}

void PipelineExecutor::resync() { std::fill(stage_synced_.begin(), stage_synced_.end(), 0); }

PipelineExecutor::StageTime PipelineExecutor::stage_time() const {
  return StageTime{busy_ns_.load(std::memory_order_relaxed), idle_ns_.load(std::memory_order_relaxed)};
}

void PipelineExecutor::submit(int slot, const engine::StepPlan* plan) {
  KUN_CHECK(slot >= 0 && slot < max_in_flight()) << "slot " << slot;
  InFlight f;
  f.slot = slot;
  f.tag = front_end_.next_tag();
  f.submit_ns = now_ns();
  RecvMatch match;
  match.port = Port::kReply;
  match.src = stages_.back().endpoint;
  match.tag = f.tag;
  f.reply = front_end_.recv(match);  // posted before the step leaves
  // Every plan's table changes, in submission order (an empty plan may still release requests).
  tables_.apply(*plan, [](std::int32_t, std::int64_t block) { return block; });
  for (std::size_t s = 0; s < stages_.size(); ++s) {
    MessageHeader h;
    h.dst = stages_[s].endpoint;
    h.kind = TransferKind::kControl;
    h.port = Port::kStage;
    h.op = static_cast<std::uint16_t>(AgentOp::kRunStage);
    h.tag = f.tag;
    h.request_id = plan->step_index;
    std::vector<std::byte> payload = encode_stage_request(*plan, tables_, s, stages_, front_end_.device(), id_, !stage_synced_[s]);
    stage_synced_[s] = 1;
    stage_message_bytes_.fetch_add(static_cast<std::int64_t>(payload.size()), std::memory_order_relaxed);
    front_end_.send_owned(std::move(h), std::move(payload));
  }
  in_flight_.push_back(std::move(f));
}

std::pair<int, engine::StepResult> PipelineExecutor::wait_any() {
  KUN_CHECK(!in_flight_.empty()) << "wait_any with nothing submitted";
  InFlight f = std::move(in_flight_.front());
  in_flight_.pop_front();
  const Status waited = f.reply.wait();
  KUN_CHECK(waited.ok()) << "step on stages ending at device " << stages_.back().endpoint << ": " << waited.to_string();
  Message m = f.reply.take();
  if (m.header.error != 0) {
    const std::string text(reinterpret_cast<const char*>(m.payload.data()), m.payload.size());
    KUN_CHECK(false) << "step failed on the pipeline: " << text;
  }
  StageTrailer trailer;
  auto at = decode_stage_output(m.payload, &trailer);
  KUN_CHECK(at.ok()) << at.status().to_string();
  KUN_CHECK_EQ(trailer.stage_times_ns.size(), 2 * stages_.size()) << "stage timings";
  engine::StepResult result;
  const std::size_t body = m.payload.size() - *at;
  result.sampled_tokens.resize(body / sizeof(std::int32_t));
  if (body > 0) std::memcpy(result.sampled_tokens.data(), m.payload.data() + *at, result.sampled_tokens.size() * sizeof(std::int32_t));
  const std::int64_t end = now_ns();
  result.duration_us = (end - f.submit_ns) / 1000;
  // Busy: each stage's run. Idle: the time a stage waited for this step once it was in flight
  // and the stage was free (its previous step done), i.e. the bubble in front of it.
  std::int64_t busy = 0, idle = 0;
  for (std::size_t s = 0; s < stages_.size(); ++s) {
    const std::int64_t start_ns = trailer.stage_times_ns[2 * s];
    const std::int64_t end_ns = trailer.stage_times_ns[2 * s + 1];
    busy += std::max<std::int64_t>(0, end_ns - start_ns);
    if (stages_.size() > 1) idle += std::max<std::int64_t>(0, start_ns - std::max(stage_last_end_ns_[s], f.submit_ns));
    stage_last_end_ns_[s] = end_ns;
  }
  busy_ns_.fetch_add(busy, std::memory_order_relaxed);
  idle_ns_.fetch_add(idle, std::memory_order_relaxed);
  front_end_.recycle(std::move(m.payload));
  return {f.slot, std::move(result)};
}

engine::StepResult PipelineExecutor::execute(const engine::StepPlan& plan) {
  submit(0, &plan);
  return wait_any().second;
}

}  // namespace kun::runtime
