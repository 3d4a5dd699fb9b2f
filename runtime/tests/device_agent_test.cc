// Device agents over the in-process hub: remote attention runs on the holder (its counters say
// so) and gives exactly the output of attending locally against the same history; blocks move
// between agents intact; bad requests are refused with a clear error and the agent keeps serving;
// a dropped layer's pages show up as KV in the snapshot. The same checks run over MPI in
// runtime/mpi/tests (kun_mpi_node --scenario cluster).
#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <random>
#include <vector>

#include "model/config.h"
#include "model/weight_source.h"
#include "runtime/device_agent.h"

namespace kun::runtime {
namespace {

std::unique_ptr<model::WeightSource> tiny_weights() {
  auto config = model::preset_config("tiny");
  KUN_CHECK(config.ok()) << config.status().to_string();
  return model::synthetic_weights(*config, 7);
}

std::unique_ptr<VirtualDevice> make_device(const model::WeightSource& w, const std::string& name) {
  auto dev = create_full_device(name, w, /*kv_token_blocks=*/64, /*block_size=*/16, /*num_threads=*/1);
  KUN_CHECK(dev.ok()) << dev.status().to_string();
  return std::move(dev).value();
}

std::vector<std::int64_t> first_blocks(const DeviceSnapshot& s, std::int64_t n, std::int64_t skip = 0) {
  std::vector<std::int64_t> ids;
  for (std::int64_t p : s.kv_page_ids) {
    for (std::int64_t slot = 0; slot < s.blocks_per_page; ++slot) {
      if (skip-- > 0) continue;
      ids.push_back(p * s.blocks_per_page + slot);
      if (static_cast<std::int64_t>(ids.size()) == n) return ids;
    }
  }
  return ids;
}

class DeviceAgentTest : public ::testing::TestWithParam<bool> {
 protected:
  void SetUp() override {
    weights_ = tiny_weights();
    LinkModel link;
    if (GetParam()) {
      link.bandwidth_bytes_per_s = 2e9;
      link.latency_us = 20;
    }
    hub_ = std::make_unique<InProcessMessageHub>(3, link);
    for (int d = 1; d < 3; ++d) {
      devices_.push_back(make_device(*weights_, "dev" + std::to_string(d)));
      agents_.push_back(std::make_unique<DeviceAgent>(*devices_.back(), hub_->endpoint(d)));
      agents_.back()->start();
    }
  }
  void TearDown() override {
    for (auto& a : agents_) a->stop();
    agents_.clear();
    hub_.reset();
  }
  DeviceAgent& agent(int d) { return *agents_[static_cast<std::size_t>(d - 1)]; }

  std::unique_ptr<model::WeightSource> weights_;
  std::unique_ptr<InProcessMessageHub> hub_;
  std::vector<std::unique_ptr<VirtualDevice>> devices_;
  std::vector<std::unique_ptr<DeviceAgent>> agents_;
};

TEST_P(DeviceAgentTest, RemoteAttentionRunsOnTheHolderAndMatchesLocalAttention) {
  AgentClient client(hub_->endpoint(0));  // device 0: a stage without the KV
  auto ref_dev = make_device(*weights_, "reference");
  model::ForwardPass& ref = ref_dev->forward();
  auto snap = client.snapshot(2);
  ASSERT_TRUE(snap.ok()) << snap.status().to_string();
  const auto holder_blocks = first_blocks(*snap, 3);
  ASSERT_EQ(holder_blocks.size(), 3u);
  std::vector<std::byte*> ref_ptrs;
  for (std::int64_t b : first_blocks(*snap, 3)) ref_ptrs.push_back(ref_dev->kv_storage().key_block(kv::BlockId(b)));
  const model::LayerKv ref_kv{ref_ptrs.data(), 3};

  std::mt19937 rng(5);
  std::normal_distribution<float> nd;
  const std::int64_t row = ref.qkv_row();
  const std::int64_t qd = weights_->config().q_dim();
  std::int64_t pos = 0, tokens = 0;
  const std::vector<std::int64_t> steps = {19, 1, 1, 1, 1};  // a prefill, then decodes
  for (std::int64_t n : steps) {
    std::vector<float> qkv(static_cast<std::size_t>(n * row));
    for (float& f : qkv) f = nd(rng);
    const model::SequenceSlice slice{pos, n};
    auto remote = client.append_attend(2, /*request_id=*/42, /*layer=*/1, slice, holder_blocks, qkv);
    ASSERT_TRUE(remote.ok()) << remote.status().to_string();
    std::vector<float> local(static_cast<std::size_t>(n * qd));
    ref.attend_local(slice, qkv.data(), ref_kv, local.data());
    ASSERT_EQ(remote->size(), local.size());
    EXPECT_EQ(0, std::memcmp(remote->data(), local.data(), local.size() * sizeof(float))) << "step at " << pos;
    pos += n;
    tokens += n;
  }
  EXPECT_EQ(agent(2).counters().attention_requests_for_others, static_cast<std::int64_t>(steps.size()));
  EXPECT_EQ(agent(2).counters().attention_tokens_for_others, tokens);
  EXPECT_EQ(agent(1).counters().attention_requests_for_others, 0);
  EXPECT_GT(hub_->stats().bytes_of(TransferKind::kRemoteAttention), 0);
}

TEST_P(DeviceAgentTest, BlocksMoveBetweenAgentsIntact) {
  AgentClient client(hub_->endpoint(0));
  auto s1 = client.snapshot(1);
  auto s2 = client.snapshot(2);
  ASSERT_TRUE(s1.ok() && s2.ok());
  const auto src = first_blocks(*s1, 5, 2);
  const auto dst = first_blocks(*s2, 5, 7);
  const std::int64_t block_bytes = devices_[0]->kv_storage().block_bytes();
  std::vector<std::byte> data(static_cast<std::size_t>(5 * block_bytes));
  for (std::size_t i = 0; i < data.size(); ++i) data[i] = static_cast<std::byte>((i * 131 + 7) & 0xff);
  ASSERT_TRUE(client.write_blocks(1, src, data).ok());
  const std::int64_t kv_bytes_before = hub_->stats().bytes_of(TransferKind::kKvExchange);
  const Status sent = client.send_blocks(1, src, 2, dst);
  ASSERT_TRUE(sent.ok()) << sent.to_string();
  auto back = client.read_blocks(2, dst);
  ASSERT_TRUE(back.ok()) << back.status().to_string();
  EXPECT_EQ(*back, data);
  EXPECT_EQ(agent(2).counters().blocks_written, 5);
  EXPECT_EQ(agent(1).counters().blocks_read, 5);
  EXPECT_EQ(hub_->stats().bytes_of(TransferKind::kKvExchange) - kv_bytes_before, 5 * block_bytes)
      << "the blocks crossed from device 1 to device 2 as one KV message";
}

TEST_P(DeviceAgentTest, BadRequestsAreRefusedAndTheAgentKeepsServing) {
  AgentClient client(hub_->endpoint(0));
  auto s = client.snapshot(1);
  ASSERT_TRUE(s.ok());
  const std::int64_t param_block = 0;  // page 0 holds parameters, not KV
  ASSERT_LT(s->kv_page_ids.front(), s->num_pages);
  const Status w = client.write_blocks(1, std::vector<std::int64_t>{param_block},
                                       std::vector<std::byte>(static_cast<std::size_t>(devices_[0]->kv_storage().block_bytes())));
  EXPECT_EQ(w.code(), StatusCode::kInvalidArgument) << w.to_string();
  EXPECT_NE(w.message().find("not in a KV page"), std::string::npos) << w.message();
  const auto blocks = first_blocks(*s, 1);
  auto short_qkv = client.append_attend(1, 1, 0, model::SequenceSlice{0, 2}, blocks, std::vector<float>(3));
  EXPECT_EQ(short_qkv.status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(client.drop_layer(1, 99).status().code(), StatusCode::kInvalidArgument);
  const Status pull_resident = client.pull_layer(1, 0, 2, std::vector<std::int64_t>{});
  EXPECT_EQ(pull_resident.code(), StatusCode::kFailedPrecondition) << pull_resident.to_string();
  EXPECT_EQ(agent(1).counters().requests_refused, 4);
  EXPECT_TRUE(client.snapshot(1).ok()) << "the agent stopped serving after bad requests";
}

TEST_P(DeviceAgentTest, DropLayerTurnsItsPagesIntoKv) {
  AgentClient client(hub_->endpoint(0));
  auto before = client.snapshot(2);
  ASSERT_TRUE(before.ok());
  auto dropped = client.drop_layer(2, 1);
  ASSERT_TRUE(dropped.ok()) << dropped.status().to_string();
  EXPECT_EQ(static_cast<std::int64_t>(dropped->size()), devices_[1]->pages_per_layer());
  auto after = client.snapshot(2);
  ASSERT_TRUE(after.ok());
  EXPECT_EQ(after->kv_pages - before->kv_pages, devices_[1]->pages_per_layer());
  EXPECT_EQ(after->resident_layers.size() + 1, before->resident_layers.size());
  for (std::int64_t l : after->resident_layers) EXPECT_NE(l, 1);
  EXPECT_EQ(client.drop_layer(2, 1).status().code(), StatusCode::kFailedPrecondition) << "dropped twice";
}

TEST_P(DeviceAgentTest, PullLayerRestoresTheWeightsFromAPeer) {
  AgentClient client(hub_->endpoint(0));
  auto before = client.snapshot(2);
  ASSERT_TRUE(before.ok());
  auto pages = client.drop_layer(2, 1);
  ASSERT_TRUE(pages.ok());
  // From a device that lacks the layer too: refused, nothing changes.
  ASSERT_TRUE(client.drop_layer(1, 1).ok());
  const Status from_empty = client.pull_layer(2, 1, 1, *pages);
  EXPECT_EQ(from_empty.code(), StatusCode::kFailedPrecondition) << from_empty.to_string();
  EXPECT_NE(from_empty.message().find("does not hold layer 1"), std::string::npos) << from_empty.message();
  // Device 0 becomes a third agent holding every layer (requests now come from device 1).
  auto third_dev = make_device(*weights_, "dev0");
  DeviceAgent third(*third_dev, hub_->endpoint(0));
  third.start();
  AgentClient from1(hub_->endpoint(1));
  const std::int64_t weight_bytes_before = hub_->stats().bytes_of(TransferKind::kWeights);
  const Status pulled = from1.pull_layer(2, 1, 0, *pages);
  ASSERT_TRUE(pulled.ok()) << pulled.to_string();
  EXPECT_EQ(hub_->stats().bytes_of(TransferKind::kWeights) - weight_bytes_before, devices_[1]->layer_segment_bytes());
  auto after = from1.snapshot(2);
  ASSERT_TRUE(after.ok());
  EXPECT_EQ(after->resident_layers, before->resident_layers);
  EXPECT_EQ(after->layer_checksums, before->layer_checksums) << "the pulled weights differ from the dropped ones";
  EXPECT_EQ(after->kv_pages, before->kv_pages);
  third.stop();
}

INSTANTIATE_TEST_SUITE_P(Links, DeviceAgentTest, ::testing::Values(false, true),
                         [](const auto& param_info) { return param_info.param ? "Paced" : "Unpaced"; });

}  // namespace
}  // namespace kun::runtime
