// InProcessFleet: devices come up behind agents, and the front end learns their geometry by
// message only (the numbers must match what a device of the same options has).
#include <gtest/gtest.h>

#include "model/config.h"
#include "model/weight_source.h"
#include "runtime/device_fleet.h"
#include "runtime/pipeline_executor.h"

namespace kun::runtime {
namespace {

TEST(DeviceFleetTest, GeometryGatheredByMessageMatchesTheDevices) {
  auto config = model::preset_config("tiny");
  ASSERT_TRUE(config.ok());
  auto weights = model::synthetic_weights(*config, 7);
  FleetOptions opt;
  opt.num_devices = 3;
  opt.device.capacity_bytes = 64ll << 20;
  opt.device.page_bytes = 64 << 10;
  opt.host_swap_blocks = 5;
  auto fleet = InProcessFleet::create(opt, *weights);
  ASSERT_TRUE(fleet.ok()) << fleet.status().to_string();
  ASSERT_EQ((*fleet)->num_devices(), 3);
  // A device built here with the same options, for the expected numbers.
  auto ref = VirtualDevice::create(opt.device, *config);
  ASSERT_TRUE(ref.ok());
  ASSERT_TRUE((*ref)->load_weights(*weights, 0, config->num_layers).ok());
  const auto kv_pages = (*ref)->give_free_pages_to_kv();
  for (int d = 0; d < 3; ++d) {
    const DeviceGeometry& g = (*fleet)->geometry(d);
    EXPECT_EQ(g.device, (*fleet)->endpoint_of(d));
    EXPECT_EQ((*fleet)->device_at(g.device), d);
    EXPECT_EQ(g.num_layers, config->num_layers);
    EXPECT_EQ(g.page_bytes, opt.device.page_bytes);
    EXPECT_EQ(g.num_pages, (*ref)->arena().num_pages());
    EXPECT_EQ(g.blocks_per_page, (*ref)->kv_storage().blocks_per_page());
    EXPECT_EQ(g.block_bytes, (*ref)->kv_storage().block_bytes());
    EXPECT_EQ(g.pages_per_layer, (*ref)->pages_per_layer());
    EXPECT_EQ(g.layer_segment_bytes, (*ref)->layer_segment_bytes());
    EXPECT_EQ(g.host_swap_blocks, 5);
    EXPECT_EQ(g.kv_dtype, static_cast<std::int32_t>(opt.device.kv_dtype));
    EXPECT_EQ(static_cast<std::int64_t>(g.resident_layers.size()), config->num_layers);
    EXPECT_EQ(g.kv_page_ids.size(), kv_pages.size());
  }
  EXPECT_EQ((*fleet)->front_end().device(), (*fleet)->front_end_id());
  (*fleet)->shutdown();
  (*fleet)->shutdown();  // idempotent
}

// A step as the engine would plan it: one sequence of `n` prompt tokens sampled greedily, layer l's
// KV in block blocks[l] on stage holder[l].
engine::StepPlan one_sequence_step(std::int64_t n, const std::vector<std::int64_t>& blocks, const std::vector<int>& holder) {
  engine::StepPlan plan;
  engine::ScheduledSequence seq;
  seq.id = RequestId(1);
  for (std::int64_t t = 0; t < n; ++t) seq.tokens.push_back(static_cast<std::int32_t>(5 + 11 * t));
  seq.sample = true;
  for (std::size_t l = 0; l < blocks.size(); ++l) {
    seq.kv.push_back(engine::LayerBlockList{static_cast<std::int32_t>(l), holder[l], {blocks[l]}});
  }
  plan.sequences.push_back(std::move(seq));
  return plan;
}

// Block `i` of the KV pages a device reported.
std::int64_t kv_block(const DeviceGeometry& g, std::int64_t i) {
  return g.kv_page_ids[static_cast<std::size_t>(i / g.blocks_per_page)] * g.blocks_per_page + i % g.blocks_per_page;
}

TEST(DeviceFleetTest, StagesRunByMessageMatchOneDeviceAndRemoteAttentionRunsOnTheHolder) {
  auto config = model::preset_config("tiny");
  ASSERT_TRUE(config.ok());
  auto weights = model::synthetic_weights(*config, 7);
  FleetOptions opt;
  opt.num_devices = 2;
  opt.device.capacity_bytes = 64ll << 20;
  opt.device.page_bytes = 64 << 10;
  auto fleet = InProcessFleet::create(opt, *weights);
  ASSERT_TRUE(fleet.ok()) << fleet.status().to_string();
  DeviceFleet& f = **fleet;
  const std::int64_t L = config->num_layers;
  ASSERT_GE(L, 2);
  const auto blocks_from = [&](int device, std::int64_t first) {
    std::vector<std::int64_t> b;
    for (std::int64_t l = 0; l < L; ++l) b.push_back(kv_block(f.geometry(device), first + l));
    return b;
  };
  // Reference: one stage on device 0, KV there.
  PipelineExecutor one({StageSpec{f.endpoint_of(0), 0, L}}, f.front_end());
  const auto ref = one.execute(one_sequence_step(7, blocks_from(0, 0), std::vector<int>(static_cast<std::size_t>(L), 0)));
  ASSERT_EQ(ref.sampled_tokens.size(), 1u);
  // Two stages, each layer's KV on its own stage: activations cross from device 0's agent to 1's.
  const std::int64_t half = L / 2;
  PipelineExecutor two({StageSpec{f.endpoint_of(0), 0, half}, StageSpec{f.endpoint_of(1), half, L}}, f.front_end());
  std::vector<int> own(static_cast<std::size_t>(L), 0);
  std::vector<std::int64_t> split_blocks = blocks_from(0, L);
  for (std::int64_t l = half; l < L; ++l) {
    own[static_cast<std::size_t>(l)] = 1;
    split_blocks[static_cast<std::size_t>(l)] = kv_block(f.geometry(1), l);
  }
  EXPECT_EQ(two.execute(one_sequence_step(7, split_blocks, own)).sampled_tokens, ref.sampled_tokens);
  // Two stages, every layer's KV on device 0: stage 1 asks device 0 for attention.
  const auto before = f.counters(0);
  ASSERT_TRUE(before.ok());
  EXPECT_EQ(two.execute(one_sequence_step(7, blocks_from(0, 2 * L), std::vector<int>(static_cast<std::size_t>(L), 0))).sampled_tokens,
            ref.sampled_tokens);
  const auto after = f.counters(0);
  ASSERT_TRUE(after.ok());
  EXPECT_EQ(after->attention_requests_for_others - before->attention_requests_for_others, L - half);
  EXPECT_EQ(after->attention_tokens_for_others - before->attention_tokens_for_others, 7 * (L - half));
  EXPECT_GT(f.transfer_stats().bytes_of(TransferKind::kActivation), 0);
  EXPECT_GT(f.transfer_stats().bytes_of(TransferKind::kRemoteAttention), 0);
}

TEST(DeviceFleetTest, AStageThatCannotRunAnswersWithAnErrorAndTheAgentGoesOn) {
  auto config = model::preset_config("tiny");
  ASSERT_TRUE(config.ok());
  auto weights = model::synthetic_weights(*config, 7);
  FleetOptions opt;
  opt.num_devices = 2;
  opt.device.capacity_bytes = 64ll << 20;
  opt.device.page_bytes = 64 << 10;
  auto fleet = InProcessFleet::create(opt, *weights);
  ASSERT_TRUE(fleet.ok()) << fleet.status().to_string();
  DeviceFleet& f = **fleet;
  const std::int64_t L = config->num_layers;
  AgentClient client(f.front_end());
  ASSERT_TRUE(client.drop_layer(f.endpoint_of(1), L - 1).ok());
  // A two-stage step whose second stage lacks its last layer: the error comes back as the reply.
  std::vector<std::int64_t> blocks;
  for (std::int64_t l = 0; l < L; ++l) blocks.push_back(kv_block(f.geometry(0), l));
  const engine::StepPlan plan = one_sequence_step(3, blocks, std::vector<int>(static_cast<std::size_t>(L), 0));
  const std::vector<StageSpec> stages = {StageSpec{f.endpoint_of(0), 0, 1}, StageSpec{f.endpoint_of(1), 1, L}};
  const std::uint64_t tag = f.front_end().next_tag();
  RecvMatch match;
  match.port = Port::kReply;
  match.src = f.endpoint_of(1);
  match.tag = tag;
  RecvHandle reply = f.front_end().recv(match);
  StageKvTables tables(0, L);
  tables.apply(plan, [](std::int32_t, std::int64_t block) { return block; });
  for (std::size_t s = 0; s < stages.size(); ++s) {
    MessageHeader h;
    h.dst = stages[s].endpoint;
    h.kind = TransferKind::kControl;
    h.port = Port::kStage;
    h.op = static_cast<std::uint16_t>(AgentOp::kRunStage);
    h.tag = tag;
    f.front_end().send_owned(std::move(h), encode_stage_request(plan, tables, s, stages, f.front_end_id(), /*executor=*/1, /*resync=*/true));
  }
  ASSERT_TRUE(reply.wait_for(std::chrono::seconds(30)));
  ASSERT_TRUE(reply.wait().ok());
  Message m = reply.take();
  EXPECT_EQ(m.header.error, static_cast<std::int32_t>(StatusCode::kFailedPrecondition));
  const std::string text(reinterpret_cast<const char*>(m.payload.data()), m.payload.size());
  EXPECT_NE(text.find("is not resident"), std::string::npos) << text;
  // A malformed stage request is refused too, and the agent keeps serving.
  {
    const std::uint64_t bad_tag = f.front_end().next_tag();
    RecvMatch bad_match;
    bad_match.port = Port::kReply;
    bad_match.src = f.endpoint_of(0);
    bad_match.tag = bad_tag;
    RecvHandle bad_reply = f.front_end().recv(bad_match);
    MessageHeader h;
    h.dst = f.endpoint_of(0);
    h.kind = TransferKind::kControl;
    h.port = Port::kStage;
    h.op = static_cast<std::uint16_t>(AgentOp::kRunStage);
    h.tag = bad_tag;
    f.front_end().send_owned(std::move(h), std::vector<std::byte>(5, std::byte{1}));
    ASSERT_TRUE(bad_reply.wait_for(std::chrono::seconds(30)));
    ASSERT_TRUE(bad_reply.wait().ok());
    EXPECT_EQ(bad_reply.take().header.error, static_cast<std::int32_t>(StatusCode::kDataLoss));
  }
  PipelineExecutor one({StageSpec{f.endpoint_of(0), 0, L}}, f.front_end());
  EXPECT_EQ(one.execute(plan).sampled_tokens.size(), 1u);
}

}  // namespace
}  // namespace kun::runtime
