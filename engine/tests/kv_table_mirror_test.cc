// Plans that carry block-table changes (PlanKv::kChanges): an executor applying every plan to a
// KvTableMirror holds, for every planned request, exactly the tables KvManager has, through
// admission, growth, recompute and swap preemption, cancels, virtual engines, a stale request's
// layers moving devices (live KV exchange) and a repack, while the plans carry only new blocks.
#include <gtest/gtest.h>

#include <map>
#include <memory>
#include <random>
#include <vector>

#include "common/clock.h"
#include "engine/kv_manager.h"
#include "engine/kv_table_mirror.h"
#include "engine/scheduler.h"
#include "engine/tests/scheduler_test_util.h"
#include "kv/block_allocator.h"

namespace kun::engine {
namespace {

constexpr std::int64_t kLayers = 4;
constexpr std::int64_t kBlockSize = 4;

struct Instance {
  std::vector<std::unique_ptr<kv::KvBlockAllocator>> allocators;
  std::unique_ptr<KvManager> kv;
  ManualClock clock;
  std::unique_ptr<Scheduler> scheduler;
  // `devices` devices (layer l on device l * devices / kLayers) of `pages` pages of 4 blocks.
  Instance(std::int64_t devices, std::int64_t pages, SchedulerConfig config, std::int64_t host_swap_blocks,
           kv::AllocationOrder order) {
    std::vector<kv::KvBlockAllocator*> ptrs;
    for (std::int64_t d = 0; d < devices; ++d) {
      auto a = std::make_unique<kv::KvBlockAllocator>(4, order, static_cast<std::uint64_t>(d + 1));
      std::vector<kv::PageId> ids;
      for (std::int64_t p = 0; p < pages; ++p) ids.emplace_back(p);
      KUN_CHECK_OK(a->add_pages(ids));
      ptrs.push_back(a.get());
      allocators.push_back(std::move(a));
    }
    std::vector<std::int32_t> layer_device;
    for (std::int64_t l = 0; l < kLayers; ++l) layer_device.push_back(static_cast<std::int32_t>(l * devices / kLayers));
    kv = std::make_unique<KvManager>(kBlockSize, ptrs, layer_device, host_swap_blocks);
    scheduler = std::make_unique<Scheduler>(config, kv.get(), &clock);
  }
};

// Every planned request's mirrored table equals KvManager's (device and blocks of every layer).
void expect_mirror_matches(const KvTableMirror<std::int64_t>& mirror, const KvManager& kv, const StepPlan& plan) {
  for (const ScheduledSequence& s : plan.sequences) {
    const std::vector<LayerBlockList> truth = kv.block_lists(s.id);
    ASSERT_EQ(static_cast<std::int64_t>(truth.size()), kLayers) << "request " << s.id;
    for (const LayerBlockList& want : truth) {
      const auto* got = mirror.find(s.id, want.layer);
      ASSERT_NE(got, nullptr) << "request " << s.id << " layer " << want.layer;
      EXPECT_EQ(got->device, want.device) << "request " << s.id << " layer " << want.layer;
      EXPECT_EQ(got->blocks, want.blocks) << "request " << s.id << " layer " << want.layer;
    }
  }
}

std::int64_t ids_in(const StepPlan& plan) {
  std::int64_t n = 0;
  for (const auto& s : plan.sequences) {
    for (const auto& l : s.kv) n += static_cast<std::int64_t>(l.blocks.size());
  }
  return n;
}

struct Outcome {
  std::int64_t ids_sent = 0;
  std::int64_t appended_plans = 0;  // sequences planned as kAppended
  std::int64_t tables_sent = 0;     // sequences planned as kTable
  std::int64_t released = 0;
  std::int64_t preemptions = 0;
  std::vector<std::vector<std::int32_t>> outputs;  // by request
};

// A random workload (arrivals, cancels, growth past the pool: preemption) run step by step.
Outcome run_workload(PlanKv mode, PreemptionMode preemption, std::int64_t devices, kv::AllocationOrder order,
                     std::uint64_t seed) {
  SchedulerConfig c;
  c.max_num_seqs = 8;
  c.max_num_batched_tokens = 24;
  c.max_model_len = 64;
  c.preemption = preemption;
  c.plan_kv = mode;
  c.num_virtual_engines = devices;
  Instance inst(devices, /*pages=*/12, c, /*host_swap_blocks=*/preemption == PreemptionMode::kSwap ? 200 : 0, order);
  KvTableMirror<std::int64_t> mirror(0, kLayers);
  std::mt19937_64 rng(seed);
  Outcome out;
  constexpr int kRequests = 40;
  out.outputs.resize(kRequests + 1);
  int next = 1;
  for (int step = 0; step < 600 && (next <= kRequests || inst.scheduler->has_unfinished()); ++step) {
    if (next <= kRequests && rng() % 3 == 0) {
      const auto prompt = static_cast<std::int64_t>(1 + rng() % 20);
      const auto max_tokens = static_cast<std::int64_t>(1 + rng() % 24);
      KUN_CHECK_OK(inst.scheduler->add_request(RequestId(next++), testing::spec(prompt, max_tokens)));
    }
    if (rng() % 29 == 0 && next > 2) inst.scheduler->cancel(RequestId(static_cast<std::int64_t>(1 + rng() % static_cast<std::uint64_t>(next - 1))));
    for (std::int64_t ve = 0; ve < devices; ++ve) {
      const StepPlan plan = inst.scheduler->schedule(ve);
      if (plan.sequences.empty() && plan.swap_in.empty() && plan.swap_out.empty()) {
        EXPECT_TRUE(plan.kv_released.empty()) << "an empty plan is not run, so it must not carry releases";
        continue;
      }
      mirror.apply(plan, [](std::int32_t, std::int64_t b) { return b; });
      expect_mirror_matches(mirror, *inst.kv, plan);
      out.ids_sent += ids_in(plan);
      out.released += static_cast<std::int64_t>(plan.kv_released.size());
      for (const auto& s : plan.sequences) (s.kv_kind == KvListKind::kAppended ? out.appended_plans : out.tables_sent)++;
      for (const TokenEvent& ev : testing::apply(*inst.scheduler, plan)) {
        if (ev.token >= 0) out.outputs[static_cast<std::size_t>(ev.id.value)].push_back(ev.token);
      }
      inst.scheduler->check_invariants();
      inst.clock.advance_us(1000);
    }
  }
  EXPECT_FALSE(inst.scheduler->has_unfinished());
  const auto& k = inst.scheduler->counters();
  out.preemptions = k.preemptions_recompute + k.preemptions_swap;
  // Released tables are dropped: what the mirror keeps is bounded by what is running.
  EXPECT_LE(static_cast<std::int64_t>(mirror.num_requests()), c.max_num_seqs * devices) << "released tables were kept";
  return out;
}

TEST(KvTableMirror, ChangesKeepTheExecutorsTablesExactThroughPreemption) {
  for (PreemptionMode p : {PreemptionMode::kRecompute, PreemptionMode::kSwap}) {
    for (std::int64_t devices : {1, 2}) {
      for (kv::AllocationOrder order : {kv::AllocationOrder::kDeterministic, kv::AllocationOrder::kShuffled}) {
        SCOPED_TRACE(::testing::Message() << preemption_mode_name(p) << " devices " << devices
                                        << (order == kv::AllocationOrder::kShuffled ? " shuffled" : ""));
        const Outcome changes = run_workload(PlanKv::kChanges, p, devices, order, 11);
        const Outcome full = run_workload(PlanKv::kFullTables, p, devices, order, 11);
        // The same schedule either way (the representation changes nothing else) ...
        EXPECT_EQ(changes.outputs, full.outputs);
        EXPECT_EQ(changes.preemptions, full.preemptions);
        EXPECT_GT(changes.preemptions, 0) << "the workload must overflow the pool";
        EXPECT_GT(changes.released, 0);
        // ... with far fewer block ids: decodes inside a block carry none.
        EXPECT_GT(changes.appended_plans, changes.tables_sent);
        EXPECT_EQ(full.appended_plans, 0);
        EXPECT_LT(changes.ids_sent * 3, full.ids_sent) << "changes " << changes.ids_sent << " full " << full.ids_sent;
      }
    }
  }
}

// A stale request holds every layer on device 0 (remote attention); moving a layer home and a
// repack rewrite its blocks: the next plan sends its whole table again.
TEST(KvTableMirror, MovedLayersAndRepacksResendTheWholeTable) {
  SchedulerConfig c;
  c.plan_kv = PlanKv::kChanges;
  c.num_virtual_engines = 2;
  Instance inst(2, 16, c, 0, kv::AllocationOrder::kDeterministic);
  KvTableMirror<std::int64_t> mirror(0, kLayers);
  const RequestId id(1);
  std::map<std::int32_t, kv::BlockTable> tables;
  tables.emplace(0, kv::BlockTable(kBlockSize, 0, kLayers));
  tables.emplace(1, kv::BlockTable(kBlockSize, 0, 0));
  KUN_CHECK_OK(tables.at(0).append_tokens(6, *inst.allocators[0]));
  KUN_CHECK_OK(tables.at(1).append_tokens(6, *inst.allocators[1]));
  inst.kv->import_tables(id, 6, std::move(tables));
  Request r;
  r.id = id;
  r.spec = testing::spec(6, 20);
  r.num_computed = 6;
  r.max_computed = 6;
  r.output_tokens = {5};
  inst.scheduler->adopt_with_imported_kv(std::move(r));
  const auto mirrored = [&](std::int64_t layer) {
    const auto* l = mirror.find(id, layer);
    KUN_CHECK(l != nullptr) << "layer " << layer << " not mirrored";
    return *l;
  };
  const auto step = [&](KvListKind want) {
    for (std::int64_t ve = 0; ve < 2; ++ve) {
      const StepPlan plan = inst.scheduler->schedule(ve);
      if (plan.sequences.empty()) continue;
      EXPECT_EQ(plan.sequences[0].kv_kind, want);
      mirror.apply(plan, [](std::int32_t, std::int64_t b) { return b; });
      expect_mirror_matches(mirror, *inst.kv, plan);
      testing::apply(*inst.scheduler, plan);
      return;
    }
    ADD_FAILURE() << "nothing planned";
  };
  step(KvListKind::kTable);     // first plan here
  step(KvListKind::kAppended);  // token 7 stays in block 1
  EXPECT_EQ(mirrored(3).device, 0);
  ASSERT_TRUE(inst.kv->move_layer(id, 3, [](auto, const auto&, auto, const auto&) {}).ok());
  step(KvListKind::kTable);
  EXPECT_EQ(mirrored(3).device, 1);
  step(KvListKind::kAppended);
  // Repack on device 1: its blocks of layers 2-3 move elsewhere on device 1.
  std::vector<kv::BlockMove> moves;
  for (std::int64_t b : mirrored(3).blocks) {
    auto to = inst.allocators[1]->allocate(1);
    ASSERT_TRUE(to.ok());
    moves.push_back({kv::BlockId(b), to->front()});
  }
  EXPECT_EQ(inst.kv->remap_blocks(1, moves), static_cast<std::int64_t>(moves.size()));
  for (const auto& m : moves) inst.allocators[1]->free(m.from);
  step(KvListKind::kTable);
  inst.kv->check_integrity();
}

TEST(KvTableMirror, AppendToAnUnknownTableAborts) {
  KvTableMirror<std::int64_t> mirror(0, 2);
  StepPlan plan;
  ScheduledSequence s;
  s.id = RequestId(9);
  s.kv_kind = KvListKind::kAppended;
  plan.sequences.push_back(s);
  EXPECT_DEATH(mirror.apply(plan, [](std::int32_t, std::int64_t b) { return b; }), "never got");
}

}  // namespace
}  // namespace kun::engine
