// Device memory (issue 12) and stage messages that carry block-table changes (issue 14):
// - the activations and workspace are a segment of the device's arena, counted in its capacity,
//   so the device's snapshot balances (weights + workspace + KV + free = capacity);
// - a device too small for weights + workspace refuses at start, naming the sizes;
// - a scheduler that could plan a step bigger than the workspace is refused, and a stage that asks
//   for more anyway gets an error;
// - each agent keeps the block tables of the executors that run stages on it, the stage messages
//   carry only what changed (far fewer bytes than whole tables, same tokens), a resync gives the
//   same tokens, and the tables go when the executor does.
#include <gtest/gtest.h>

#include <chrono>
#include <thread>

#include "runtime/device_fleet.h"
#include "runtime/pipeline_executor.h"
#include "runtime/tests/test_models.h"

namespace kun::runtime {
namespace {

using testing::tiny_weights;

FleetOptions fleet_options(const model::ModelConfig& c, std::int64_t kv_pages) {
  FleetOptions o;
  o.num_devices = 1;
  o.device.weight_dtype = c.dtype;
  o.device.page_bytes = 64 << 10;
  o.device.max_batched_tokens = 256;
  o.device.max_sequences = 8;
  o.device.max_context_tokens = 512;
  o.device.capacity_bytes = device_param_bytes(c, c.dtype, 0, c.num_layers, o.device.page_bytes) +
                            device_workspace_bytes(c, o.device) + kv_pages * o.device.page_bytes;
  return o;
}

TEST(DeviceMemoryTest, WorkspaceIsInTheArenaAndTheSnapshotBalances) {
  auto w = tiny_weights();
  const model::ModelConfig& c = w->config();
  const FleetOptions o = fleet_options(c, 40);
  auto fleet = InProcessFleet::create(o, *w);
  ASSERT_TRUE(fleet.ok()) << fleet.status().to_string();
  const DeviceGeometry& g = (*fleet)->geometry(0);
  const std::int64_t workspace = device_workspace_bytes(c, o.device);
  EXPECT_GT(workspace, 0);
  EXPECT_EQ(g.workspace_bytes, workspace);
  EXPECT_EQ(g.max_batched_tokens, 256);
  EXPECT_EQ(g.max_context_tokens, 512);
  AgentClient client((*fleet)->front_end());
  auto snap = client.snapshot((*fleet)->endpoint_of(0));
  ASSERT_TRUE(snap.ok()) << snap.status().to_string();
  EXPECT_EQ(snap->workspace_bytes(), workspace);
  EXPECT_EQ(snap->weight_bytes(), device_param_bytes(c, c.dtype, 0, c.num_layers, o.device.page_bytes));
  // Every page is accounted for, and the KV got exactly what the budget left after the workspace.
  EXPECT_EQ(snap->kv_pages, 40);
  EXPECT_EQ(snap->free_pages, 0);
  EXPECT_EQ(snap->used_bytes(), snap->capacity_bytes());
  EXPECT_EQ(snap->capacity_bytes(), o.device.capacity_bytes);
  // The workspace grows with the step it holds.
  DeviceOptions bigger = o.device;
  bigger.max_batched_tokens *= 4;
  EXPECT_GT(device_workspace_bytes(c, bigger), workspace);
  // The integrity check sees the workspace as a segment of its own: pages still balance.
  auto checked = client.check_integrity((*fleet)->endpoint_of(0));
  ASSERT_TRUE(checked.ok());
  EXPECT_EQ(checked->param_pages + checked->workspace_pages + checked->kv_pages + checked->free_pages, checked->num_pages);
  (*fleet)->shutdown();
}

TEST(DeviceMemoryTest, ADeviceTooSmallForWeightsPlusWorkspaceRefusesAtStart) {
  auto w = tiny_weights();
  const model::ModelConfig& c = w->config();
  FleetOptions o = fleet_options(c, 0);
  // Room for the weights (and then some) but one page short of weights + workspace.
  o.device.capacity_bytes -= o.device.page_bytes;
  ASSERT_GT(o.device.capacity_bytes, device_param_bytes(c, c.dtype, 0, c.num_layers, o.device.page_bytes));
  auto fleet = InProcessFleet::create(o, *w);
  ASSERT_FALSE(fleet.ok());
  EXPECT_EQ(fleet.status().code(), StatusCode::kResourceExhausted);
  EXPECT_NE(fleet.status().message().find("workspace"), std::string::npos) << fleet.status().to_string();
  EXPECT_NE(fleet.status().message().find("parameters need"), std::string::npos) << fleet.status().to_string();
  // Smaller than the workspace alone: refused before any weight is read.
  o.device.capacity_bytes = device_workspace_bytes(c, o.device) - o.device.page_bytes;
  auto dev = VirtualDevice::create(o.device, c);
  ASSERT_FALSE(dev.ok());
  EXPECT_EQ(dev.status().code(), StatusCode::kResourceExhausted);
  EXPECT_NE(dev.status().message().find("cannot hold its activations and workspace"), std::string::npos)
      << dev.status().to_string();
}

TEST(DeviceMemoryTest, ASchedulerBeyondTheWorkspaceIsRefused) {
  auto w = tiny_weights();
  const model::ModelConfig& c = w->config();
  InstanceOptions opt;
  opt.device = fleet_options(c, 64).device;
  opt.scheduler.max_num_batched_tokens = 512;  // the device holds 256 tokens per step
  opt.scheduler.max_model_len = 256;
  ManualClock clock;
  auto inst = SingleInstance::create(opt, *w, &clock);
  ASSERT_FALSE(inst.ok());
  EXPECT_EQ(inst.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(inst.status().message().find("max_num_batched_tokens 512"), std::string::npos) << inst.status().to_string();
  opt.scheduler.max_num_batched_tokens = 256;
  opt.scheduler.max_model_len = 1024;  // contexts of 512 at most
  inst = SingleInstance::create(opt, *w, &clock);
  ASSERT_FALSE(inst.ok());
  EXPECT_NE(inst.status().message().find("max_model_len"), std::string::npos) << inst.status().to_string();
  // fit_workspace_to sizes the device for the scheduler; more sequences than max_sequences are
  // fine (logits in passes).
  fit_workspace_to(opt.scheduler, c, &opt.device);
  EXPECT_EQ(opt.device.max_context_tokens, std::min<std::int64_t>(1024, c.max_position_embeddings));
  opt.device.capacity_bytes = device_param_bytes(c, c.dtype, 0, c.num_layers, opt.device.page_bytes) +
                              device_workspace_bytes(c, opt.device) + 64 * opt.device.page_bytes;
  inst = SingleInstance::create(opt, *w, &clock);
  EXPECT_TRUE(inst.ok()) << inst.status().to_string();
  // A fused group's virtual engine has 1/g of the budget for prompts, but its decodes ride
  // outside that share up to the instance's whole budget: the workspace holds the whole step.
  DeviceOptions fused_device = opt.device;
  fit_workspace_to(engine::fused_scheduler_config(opt.scheduler, 4, 16), c, &fused_device);
  EXPECT_EQ(fused_device.max_batched_tokens, 256);
}

// A step as the engine plans it for one sequence of `n` prompt tokens, its KV in block `first + l`
// of layer l (consecutive blocks of the device's KV pages).
engine::StepPlan prompt_step(std::int64_t n, const DeviceGeometry& g, std::int64_t first, std::int64_t num_layers) {
  engine::StepPlan plan;
  engine::ScheduledSequence seq;
  seq.id = RequestId(1);
  for (std::int64_t t = 0; t < n; ++t) seq.tokens.push_back(static_cast<std::int32_t>(5 + 11 * t));
  seq.sample = true;
  const std::int64_t blocks = ceil_div(n, g.kv_block_size);
  for (std::int64_t l = 0; l < num_layers; ++l) {
    engine::LayerBlockList list{static_cast<std::int32_t>(l), 0, {}};
    for (std::int64_t b = 0; b < blocks; ++b) {
      const std::int64_t i = first + l * blocks + b;
      list.blocks.push_back(g.kv_page_ids[static_cast<std::size_t>(i / g.blocks_per_page)] * g.blocks_per_page + i % g.blocks_per_page);
    }
    seq.kv.push_back(std::move(list));
  }
  plan.sequences.push_back(std::move(seq));
  return plan;
}

TEST(DeviceMemoryTest, AStepBeyondTheWorkspaceGetsAnErrorAndTheAgentGoesOn) {
  auto w = tiny_weights();
  const model::ModelConfig& c = w->config();
  FleetOptions o = fleet_options(c, 64);
  o.device.max_batched_tokens = 16;
  o.device.capacity_bytes = device_param_bytes(c, c.dtype, 0, c.num_layers, o.device.page_bytes) +
                            device_workspace_bytes(c, o.device) + 64 * o.device.page_bytes;
  auto fleet = InProcessFleet::create(o, *w);
  ASSERT_TRUE(fleet.ok()) << fleet.status().to_string();
  DeviceFleet& f = **fleet;
  const std::vector<StageSpec> stages = {StageSpec{f.endpoint_of(0), 0, c.num_layers}};
  StageKvTables tables(0, c.num_layers);
  const auto run = [&](const engine::StepPlan& plan) {
    tables.apply(plan, [](std::int32_t, std::int64_t block) { return block; });
    const std::uint64_t tag = f.front_end().next_tag();
    RecvMatch match;
    match.port = Port::kReply;
    match.src = f.endpoint_of(0);
    match.tag = tag;
    RecvHandle reply = f.front_end().recv(match);
    MessageHeader h;
    h.dst = f.endpoint_of(0);
    h.kind = TransferKind::kControl;
    h.port = Port::kStage;
    h.op = static_cast<std::uint16_t>(AgentOp::kRunStage);
    h.tag = tag;
    f.front_end().send_owned(std::move(h), encode_stage_request(plan, tables, 0, stages, f.front_end_id(), 99, true));
    EXPECT_TRUE(reply.wait_for(std::chrono::seconds(30)));
    EXPECT_TRUE(reply.wait().ok());
    return reply.take();
  };
  Message m = run(prompt_step(17, f.geometry(0), 0, c.num_layers));
  EXPECT_EQ(m.header.error, static_cast<std::int32_t>(StatusCode::kInvalidArgument));
  const std::string text(reinterpret_cast<const char*>(m.payload.data()), m.payload.size());
  EXPECT_NE(text.find("exceeds device"), std::string::npos) << text;
  EXPECT_NE(text.find("max_batched_tokens"), std::string::npos) << text;
  // A step that fits runs.
  EXPECT_EQ(run(prompt_step(16, f.geometry(0), 0, c.num_layers)).header.error, 0);
  f.shutdown();
}

// One request decoding through a real engine over one device: the tokens, and the stage bytes.
struct Decoded {
  std::vector<std::int32_t> tokens;
  std::int64_t stage_bytes = 0;
};
Decoded decode(const model::WeightSource& w, engine::PlanKv plan_kv, std::int64_t resync_every) {
  testing::InstanceShape shape;
  shape.kv_token_blocks = 64;
  shape.scheduler.plan_kv = plan_kv;
  shape.scheduler.max_num_batched_tokens = 64;
  ManualClock clock;
  auto inst = testing::make_instance(w, shape, &clock);
  Decoded d;
  for (int r = 0; r < 3; ++r) {
    engine::RequestSpec spec;
    for (int t = 0; t < 40 + 7 * r; ++t) spec.prompt_tokens.push_back(3 + (t * 17 + r) % 200);
    spec.max_tokens = 60;
    spec.ignore_eos = true;
    auto id = inst->engine().submit(spec, [&d](const engine::TokenEvent& ev) {
      if (ev.token >= 0) d.tokens.push_back(ev.token);
    });
    KUN_CHECK(id.ok()) << id.status().to_string();
  }
  std::int64_t steps = 0;
  while (inst->engine().run_step()) {
    if (resync_every > 0 && ++steps % resync_every == 0) inst->executor().resync();
  }
  inst->check_integrity();
  d.stage_bytes = inst->executor().stage_message_bytes();
  return d;
}

TEST(DeviceMemoryTest, StageMessagesCarryTableChangesAndGiveTheSameTokens) {
  auto w = tiny_weights();
  const Decoded full = decode(*w, engine::PlanKv::kFullTables, 0);
  const Decoded changes = decode(*w, engine::PlanKv::kChanges, 0);
  const Decoded resynced = decode(*w, engine::PlanKv::kChanges, 5);
  ASSERT_EQ(full.tokens.size(), 180u);
  EXPECT_EQ(changes.tokens, full.tokens);
  EXPECT_EQ(resynced.tokens, full.tokens);
  // Whole tables every step against changes only: 3 requests x all layers x ~6 blocks each step.
  EXPECT_LT(changes.stage_bytes * 3, full.stage_bytes) << changes.stage_bytes << " vs " << full.stage_bytes;
  EXPECT_LT(changes.stage_bytes, resynced.stage_bytes);
}

TEST(DeviceMemoryTest, AgentsDropAnExecutorsTablesWithIt) {
  auto w = tiny_weights();
  const model::ModelConfig& c = w->config();
  auto fleet = InProcessFleet::create(fleet_options(c, 64), *w);
  ASSERT_TRUE(fleet.ok()) << fleet.status().to_string();
  DeviceFleet& f = **fleet;
  const auto tables_held = [&] {
    auto counters = f.counters(0);
    KUN_CHECK(counters.ok());
    return counters->table_executors;
  };
  std::vector<std::int32_t> first;
  {
    PipelineExecutor a({StageSpec{f.endpoint_of(0), 0, c.num_layers}}, f.front_end());
    PipelineExecutor b({StageSpec{f.endpoint_of(0), 0, c.num_layers}}, f.front_end());
    EXPECT_NE(a.id(), b.id());
    first = a.execute(prompt_step(9, f.geometry(0), 0, c.num_layers)).sampled_tokens;
    // The same request id under another executor: its own table (other blocks), same token.
    EXPECT_EQ(b.execute(prompt_step(9, f.geometry(0), 64, c.num_layers)).sampled_tokens, first);
    EXPECT_EQ(tables_held(), 2);
  }
  // The drops travel behind the executors' last stage messages; the stage thread applies them.
  for (int i = 0; i < 200 && tables_held() != 0; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  EXPECT_EQ(tables_held(), 0);
  // A stage request that appends to a table the agent never got is an error, not an abort.
  engine::StepPlan plan = prompt_step(9, f.geometry(0), 0, c.num_layers);
  StageKvTables tables(0, c.num_layers);
  tables.apply(plan, [](std::int32_t, std::int64_t block) { return block; });
  plan.sequences[0].kv_kind = engine::KvListKind::kAppended;
  const std::vector<StageSpec> stages = {StageSpec{f.endpoint_of(0), 0, c.num_layers}};
  for (const bool resync : {false, true}) {
    const std::uint64_t tag = f.front_end().next_tag();
    RecvMatch match;
    match.port = Port::kReply;
    match.src = f.endpoint_of(0);
    match.tag = tag;
    RecvHandle reply = f.front_end().recv(match);
    MessageHeader h;
    h.dst = f.endpoint_of(0);
    h.kind = TransferKind::kControl;
    h.port = Port::kStage;
    h.op = static_cast<std::uint16_t>(AgentOp::kRunStage);
    h.tag = tag;
    // Not a resync for an executor the agent does not know: refused. A resync: runs.
    f.front_end().send_owned(std::move(h), encode_stage_request(plan, tables, 0, stages, f.front_end_id(), 12345, resync));
    ASSERT_TRUE(reply.wait_for(std::chrono::seconds(30)));
    ASSERT_TRUE(reply.wait().ok());
    Message m = reply.take();
    if (resync) {
      EXPECT_EQ(m.header.error, 0);
    } else {
      EXPECT_EQ(m.header.error, static_cast<std::int32_t>(StatusCode::kFailedPrecondition));
      const std::string text(reinterpret_cast<const char*>(m.payload.data()), m.payload.size());
      EXPECT_NE(text.find("no block tables of executor 12345"), std::string::npos) << text;
    }
  }
  f.shutdown();
}

}  // namespace
}  // namespace kun::runtime
