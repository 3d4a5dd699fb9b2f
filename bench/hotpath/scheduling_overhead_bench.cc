// Scheduling + planning time per decode step at scale (issue 14, "hot path that scales with
// context"), against the step time a GPU would need for the same batch (sim/'s cost model).
//
// N running sequences with C-token contexts on an L-layer model (default 256 x 8K on Llama-3-8B's
// 32 layers) decode step after step through the real engine::Scheduler and KvManager over one
// device's KV allocator (or a fused group's g allocators). The executor does no math: it keeps the
// block tables an executor needs (engine::KvTableMirror, as runtime/'s PipelineExecutor does) and
// gathers, for every (sequence, layer), the block list attention would read. Timed per step:
// schedule() + the executor's table work + apply_result().
//
// Both plan representations run in the same process, interleaved, median of --reps:
//   full-tables  every planned sequence carries every layer's whole block list each step (the
//                representation before this benchmark; the executor rebuilds its tables from it)
//   changes      the whole table once, then only appended blocks (the default)
// The executor also encodes each step's kRunStage message for every stage as runtime/'s
// PipelineExecutor does (runtime::encode_stage_request), timed apart ("encode us") and counted in
// bytes: with full tables a stage message carries every (sequence, layer)'s block list each step,
// as every stage message did before the agents kept block tables; with changes only the new blocks.
// A CLI report; nothing here runs in the test suite.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "common/check.h"
#include "common/clock.h"
#include "engine/kv_manager.h"
#include "engine/kv_table_mirror.h"
#include "engine/scheduler.h"
#include "kv/block_allocator.h"
#include "kv/kv_geometry.h"
#include "runtime/stage_message.h"
#include "sim/cost_model.h"

using namespace kun;

namespace {

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Keeps block tables from the plans and gathers each (sequence, layer)'s blocks as attention
// would; samples a fixed token.
class TableKeepingExecutor final : public engine::StepExecutor {
 public:
  TableKeepingExecutor(std::int64_t num_layers, std::int64_t num_stages, std::int32_t token)
      : tables_(0, num_layers), token_(token), synced_(static_cast<std::size_t>(num_stages), 0) {
    for (std::int64_t s = 0; s < num_stages; ++s) {
      stages_.push_back(runtime::StageSpec{static_cast<int>(s + 1), s * num_layers / num_stages, (s + 1) * num_layers / num_stages});
    }
  }
  engine::StepResult execute(const engine::StepPlan& plan) override {
    tables_.apply(plan, [](std::int32_t, std::int64_t block) { return block; });
    // The stage messages, as PipelineExecutor::submit builds them (a resync the first time).
    const double e0 = now_s();
    std::int64_t bytes = 0;
    for (std::size_t s = 0; s < stages_.size(); ++s) {
      bytes += static_cast<std::int64_t>(runtime::encode_stage_request(plan, tables_, s, stages_, 0, 1, !synced_[s]).size());
      synced_[s] = 1;
    }
    encode_s_ += now_s() - e0;
    stage_bytes_ += bytes;
    cells_.clear();
    std::int64_t blocks = 0;
    for (const engine::ScheduledSequence& s : plan.sequences) {
      const auto* table = tables_.table(s.id);
      KUN_CHECK(table != nullptr) << "no table for request " << s.id;
      for (const auto& layer : *table) {
        cells_.push_back(&layer);
        blocks += static_cast<std::int64_t>(layer.blocks.size());
      }
    }
    blocks_seen_ += blocks;
    engine::StepResult r;
    for (const engine::ScheduledSequence& s : plan.sequences) {
      if (s.sample) r.sampled_tokens.push_back(token_);
    }
    return r;
  }
  std::int64_t blocks_seen() const { return blocks_seen_; }
  double encode_s() const { return encode_s_; }
  std::int64_t stage_bytes() const { return stage_bytes_; }

 private:
  runtime::StageKvTables tables_;
  std::vector<const engine::KvTableMirror<std::int64_t>::Layer*> cells_;
  std::int32_t token_;
  std::int64_t blocks_seen_ = 0;
  std::vector<runtime::StageSpec> stages_;
  std::vector<char> synced_;
  double encode_s_ = 0;
  std::int64_t stage_bytes_ = 0;
};

struct Setup {
  std::int64_t seqs = 256;
  std::int64_t context = 8192;
  std::int64_t steps = 64;
  std::int64_t stages = 1;
  std::int64_t block_size = 16;
  model::ModelConfig model;
};

struct Timing {
  double schedule_s = 0, execute_s = 0, apply_s = 0, encode_s = 0;
  std::int64_t rounds = 0;
  std::int64_t plan_block_ids = 0;  // block ids carried by the timed plans
  std::int64_t stage_bytes = 0;     // kRunStage message bytes of the timed plans (every stage)
  double per_round_us() const { return (schedule_s + execute_s + apply_s) / static_cast<double>(rounds) * 1e6; }
};

Timing run(const Setup& s, engine::PlanKv mode) {
  const std::int64_t L = s.model.num_layers;
  const std::int64_t g = s.stages;
  kv::KvGeometry geo{s.block_size, s.model.num_kv_heads, s.model.head_dim, DType::kBF16};
  const std::int64_t page_bytes = 2LL << 20;
  const std::int64_t bpp = geo.blocks_per_page(page_bytes);
  // Early sequences decode while later ones prefill: room for those tokens too.
  const std::int64_t budget = 65536;
  const std::int64_t max_tokens = s.steps + 2 * ceil_div(s.seqs * s.context, budget) + 8;
  const std::int64_t max_len = s.context + max_tokens;
  const std::int64_t blocks_per_device = s.seqs * geo.blocks_for_tokens(max_len) * ceil_div(L, g);
  std::vector<std::unique_ptr<kv::KvBlockAllocator>> allocators;
  std::vector<kv::KvBlockAllocator*> devices;
  for (std::int64_t d = 0; d < g; ++d) {
    allocators.push_back(std::make_unique<kv::KvBlockAllocator>(bpp));
    std::vector<kv::PageId> pages;
    for (std::int64_t p = 0; p < ceil_div(blocks_per_device, bpp); ++p) pages.push_back(kv::PageId(p));
    KUN_CHECK_OK(allocators.back()->add_pages(pages));
    devices.push_back(allocators.back().get());
  }
  std::vector<std::int32_t> layer_device;
  for (std::int64_t l = 0; l < L; ++l) layer_device.push_back(static_cast<std::int32_t>(l * g / L));
  engine::KvManager kv(s.block_size, devices, layer_device, 0);
  engine::SchedulerConfig config;
  config.max_num_seqs = s.seqs;
  config.max_num_batched_tokens = budget;
  config.max_model_len = max_len;
  config.max_waiting_requests = s.seqs;
  config.num_virtual_engines = g;
  config.plan_kv = mode;
  config.eos_token_id = -1;
  ManualClock clock;
  engine::Scheduler scheduler(config, &kv, &clock);
  for (std::int64_t i = 0; i < s.seqs; ++i) {
    engine::RequestSpec spec;
    spec.prompt_tokens.assign(static_cast<std::size_t>(s.context), static_cast<std::int32_t>(1 + i % 1000));
    spec.max_tokens = max_tokens;
    spec.ignore_eos = true;
    KUN_CHECK_OK(scheduler.add_request(RequestId(i + 1), std::move(spec)));
  }
  TableKeepingExecutor executor(L, g, 7);
  Timing t;
  // Prefill until every sequence decodes (untimed), then time `steps` rounds of decode.
  const auto all_decoding = [&] {
    if (scheduler.num_waiting() != 0) return false;
    for (std::int64_t i = 0; i < s.seqs; ++i) {
      const engine::Request* r = scheduler.find(RequestId(i + 1));
      if (r == nullptr || r->num_computed < r->num_prompt_tokens()) return false;
    }
    return true;
  };
  bool timing = false;
  std::int64_t timed = 0;
  while (timed < s.steps) {
    timing = timing || all_decoding();
    for (std::int64_t ve = 0; ve < g; ++ve) {
      const double t0 = now_s();
      const engine::StepPlan plan = scheduler.schedule(ve);
      const double t1 = now_s();
      const double encode_before = executor.encode_s();
      const std::int64_t bytes_before = executor.stage_bytes();
      const engine::StepResult result = executor.execute(plan);
      const double t2 = now_s();
      const double encode = executor.encode_s() - encode_before;
      scheduler.apply_result(plan, result);
      const double t3 = now_s();
      clock.advance_us(1000);
      if (timing) {
        t.schedule_s += t1 - t0;
        t.execute_s += t2 - t1 - encode;
        t.encode_s += encode;
        t.stage_bytes += executor.stage_bytes() - bytes_before;
        t.apply_s += t3 - t2;
        for (const auto& seq : plan.sequences) {
          for (const auto& list : seq.kv) t.plan_block_ids += static_cast<std::int64_t>(list.blocks.size());
        }
      }
    }
    if (timing) {
      ++t.rounds;
      ++timed;
    }
  }
  KUN_CHECK_EQ(scheduler.num_running(), s.seqs) << "a sequence finished or was preempted during the timed steps";
  scheduler.check_invariants();
  return t;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"scheduling + planning time per step against a GPU's step time"};
  Setup s;
  std::string sim_model = "llama-3-8b";
  std::vector<std::string> gpus = {"a100-80gb", "h100-80gb"};
  int reps = 3;
  app.add_option("--seqs", s.seqs, "running sequences");
  app.add_option("--context", s.context, "context tokens of each sequence");
  app.add_option("--steps", s.steps, "timed decode steps (rounds of g micro-batches for --stages g)");
  app.add_option("--stages", s.stages, "devices of a fused group (layer ranges L/g each; 1: an independent instance)");
  app.add_option("--block-size", s.block_size, "KV block size in tokens");
  app.add_option("--sim-model", sim_model, "model shape (sim/ names: llama-3-8b, llama-2-7b, ...)");
  app.add_option("--gpus", gpus, "GPUs whose modelled step time is the reference");
  app.add_option("--reps", reps, "repetitions of each representation (median reported)");
  CLI11_PARSE(app, argc, argv);
  auto model = sim::sim_model_config(sim_model);
  if (!model.ok()) {
    std::fprintf(stderr, "%s\n", model.status().to_string().c_str());
    return 1;
  }
  s.model = *model;
  if (s.seqs < 1 || s.context < 1 || s.steps < 1 || s.stages < 1 || s.stages > s.model.num_layers || reps < 1) {
    std::fprintf(stderr, "bad arguments\n");
    return 1;
  }
  std::printf("%lld running sequences x %lld-token contexts, %s (%lld layers), block %lld tokens, %lld stage(s), %lld timed steps, median of %d\n",
              static_cast<long long>(s.seqs), static_cast<long long>(s.context), sim_model.c_str(),
              static_cast<long long>(s.model.num_layers), static_cast<long long>(s.block_size),
              static_cast<long long>(s.stages), static_cast<long long>(s.steps), reps);
  const std::vector<std::pair<const char*, engine::PlanKv>> modes = {{"full-tables", engine::PlanKv::kFullTables},
                                                                     {"changes", engine::PlanKv::kChanges}};
  std::vector<std::vector<Timing>> runs(modes.size());
  for (int r = 0; r < reps; ++r) {
    for (std::size_t m = 0; m < modes.size(); ++m) runs[m].push_back(run(s, modes[m].second));
  }
  // The GPU's step for the same batch: every sequence decodes one token at its context.
  std::vector<sim::SeqWork> work(static_cast<std::size_t>(s.seqs), sim::SeqWork{s.context + s.steps / 2, 1, true});
  std::vector<std::pair<std::string, double>> gpu_us;
  for (const std::string& name : gpus) {
    auto spec = sim::gpu_spec(name);
    if (!spec.ok()) {
      std::fprintf(stderr, "%s\n", spec.status().to_string().c_str());
      return 1;
    }
    sim::CostModel cost(*spec, s.model);
    gpu_us.emplace_back(name, cost.step_us(work, s.model.num_layers, true, true));
  }
  std::printf("\n%-12s %10s %10s %10s %10s %14s %10s %14s", "plan", "sched us", "exec us", "apply us", "total us",
              "ids per step", "encode us", "stage B/step");
  for (const auto& [name, us] : gpu_us) std::printf(" %12s", ("/ " + name).c_str());
  std::printf("\n");
  std::vector<double> totals, stage_bytes_per_step;
  for (std::size_t m = 0; m < modes.size(); ++m) {
    std::vector<double> sched, exec, apply, total, encode;
    double ids = 0, stage_bytes = 0;
    for (const Timing& t : runs[m]) {
      const double n = static_cast<double>(t.rounds);
      sched.push_back(t.schedule_s / n * 1e6);
      exec.push_back(t.execute_s / n * 1e6);
      apply.push_back(t.apply_s / n * 1e6);
      total.push_back(t.per_round_us());
      encode.push_back(t.encode_s / n * 1e6);
      ids = static_cast<double>(t.plan_block_ids) / n;
      stage_bytes = static_cast<double>(t.stage_bytes) / n;
    }
    stage_bytes_per_step.push_back(stage_bytes);
    const double tot = median(total);
    totals.push_back(tot);
    std::printf("%-12s %10.1f %10.1f %10.1f %10.1f %14.0f %10.1f %14.0f", modes[m].first, median(sched), median(exec),
                median(apply), tot, ids, median(encode), stage_bytes);
    for (const auto& [name, us] : gpu_us) std::printf(" %11.2f%%", 100.0 * tot / us);
    std::printf("\n");
  }
  std::printf("\nmodelled GPU step for the batch:");
  for (const auto& [name, us] : gpu_us) std::printf(" %s %.1f ms", name.c_str(), us / 1000.0);
  std::printf("\nfull-tables / changes: %.1fx (target: changes under 2 %% of the GPU step)\n", totals[0] / totals[1]);
  std::printf("stage message bytes per step, full tables / changes: %.0fx (%.0f B / %.0f B)\n",
              stage_bytes_per_step[0] / stage_bytes_per_step[1], stage_bytes_per_step[0], stage_bytes_per_step[1]);
  return 0;
}
