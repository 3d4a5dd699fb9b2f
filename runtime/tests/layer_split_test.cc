// Splitting the layers across two or four layer ranges on different devices (as a pipeline
// would), and computing attention where the KV lives rather than where the weights are (the split
// attention call), gives the same greedy tokens as the whole model on one device; so does a paged
// KV of block size 16 or 256 with blocks handed out in any order (issue 2).
#include <memory>
#include <vector>

#include <gtest/gtest.h>

#include "kv/block_allocator.h"
#include "kv/block_table.h"
#include "runtime/tests/test_models.h"

namespace kun::runtime {
namespace {

// One device holding layers [begin, end) and the KV of one sequence for those layers.
struct Stage {
  std::unique_ptr<VirtualDevice> device;
  std::unique_ptr<kv::KvBlockAllocator> allocator;
  std::unique_ptr<kv::BlockTable> table;
  std::int64_t begin = 0, end = 0;
  std::vector<std::vector<std::byte*>> ptrs;  // per layer (absolute index)
};

Stage make_stage(const model::WeightSource& w, std::int64_t begin, std::int64_t end, std::int64_t kv_layers_begin,
                 std::int64_t kv_layers_end, std::int64_t block_size, kv::AllocationOrder order) {
  const auto& c = w.config();
  Stage s;
  s.begin = begin;
  s.end = end;
  DeviceOptions opt;
  opt.kv_block_size = block_size;
  opt.weight_dtype = c.dtype;
  opt.page_bytes = 256 * 1024;
  opt.capacity_bytes = device_param_bytes(c, c.dtype, begin, std::max(end, begin +
                       1), opt.page_bytes) + device_workspace_bytes(c, opt) + 64 * opt.page_bytes;
  auto dev = VirtualDevice::create(opt, c);
  KUN_CHECK(dev.ok()) << dev.status().to_string();
  s.device = std::move(dev).value();
  if (end > begin) KUN_CHECK_OK(s.device->load_weights(w, begin, end));
  auto pages = s.device->give_free_pages_to_kv();
  s.allocator = std::make_unique<kv::KvBlockAllocator>(s.device->kv_storage().blocks_per_page(), order, 99);
  KUN_CHECK_OK(s.allocator->add_pages(pages));
  if (kv_layers_end > kv_layers_begin) {
    s.table = std::make_unique<kv::BlockTable>(block_size, kv_layers_begin, kv_layers_end);
  }
  s.ptrs.resize(static_cast<std::size_t>(c.num_layers));
  return s;
}

void grow(Stage& s, std::int64_t tokens) {
  if (!s.table) return;
  KUN_CHECK_OK(s.table->append_tokens(tokens - s.table->num_tokens(), *s.allocator));
  for (std::int64_t l : s.table->layers()) {
    auto& p = s.ptrs[static_cast<std::size_t>(l)];
    p.clear();
    for (kv::BlockId b : s.table->layer_blocks(l)) p.push_back(s.device->kv_storage().block_data(b));
  }
}

// Greedy generation where layer range i runs on stages[i] (weights and KV), or, with kv_stage
// set, every layer's attention runs on kv_stage which holds all the KV (remote attention).
std::vector<std::int32_t> generate(std::vector<Stage>& stages, Stage* kv_stage, const std::vector<std::int32_t>& prompt,
                                   std::int64_t max_tokens) {
  const auto& c = stages.front().device->config();
  const std::int64_t H = c.hidden_size;
  std::vector<std::int32_t> seq = prompt;
  std::vector<std::int32_t> out;
  std::int64_t computed = 0;
  std::vector<float> hidden, logits(static_cast<std::size_t>(c.vocab_size));
  for (std::int64_t step = 0; step < max_tokens; ++step) {
    const std::int64_t n = static_cast<std::int64_t>(seq.size()) - computed;
    const model::SequenceSlice slice{computed, n};
    hidden.assign(static_cast<std::size_t>(n * H), 0.0f);
    stages.front().device->forward().embed(stages.front().device->head_weights(), seq.data() + computed, n, hidden.data());
    for (Stage& s : stages) {
      Stage& kv_owner = kv_stage ? *kv_stage : s;
      grow(kv_owner, computed + n);
      // Activations move to the stage's own buffer (a transport would carry them).
      std::vector<float> stage_hidden = hidden;
      s.device->forward().run_layers(
          s.begin, s.end, std::span(&slice, 1), stage_hidden.data(), [&](std::int64_t l) { return s.device->layer_weights(l); },
          [&](std::int64_t l, std::int64_t, const model::SequenceSlice& sl, const float* qkv, float* attn_out) {
            auto& p = kv_owner.ptrs[static_cast<std::size_t>(l)];
            kv_owner.device->forward().attend_local(sl, qkv, model::LayerKv{p.data(), static_cast<std::int64_t>(p.size())}, attn_out);
          });
      hidden = stage_hidden;
    }
    Stage& last = stages.back();
    const std::int64_t row = n - 1;
    last.device->forward().logits(last.device->head_weights(), hidden.data(), std::span(&row, 1), logits.data());
    std::vector<float> scratch;
    const std::int32_t tok = model::sample_token(logits.data(), c.vocab_size, model::SamplingParams{}, 0, &scratch);
    out.push_back(tok);
    computed = static_cast<std::int64_t>(seq.size());
    seq.push_back(tok);
  }
  return out;
}

std::vector<Stage> split(const model::WeightSource& w, std::int64_t parts, std::int64_t block_size, bool kv_on_stage,
                         kv::AllocationOrder order = kv::AllocationOrder::kDeterministic) {
  const std::int64_t L = w.config().num_layers;
  std::vector<Stage> stages;
  for (std::int64_t i = 0; i < parts; ++i) {
    const std::int64_t b = i * L / parts, e = (i + 1) * L / parts;
    stages.push_back(make_stage(w, b, e, kv_on_stage ? b : 0, kv_on_stage ? e : 0, block_size, order));
  }
  return stages;
}

std::vector<std::int32_t> test_prompt(std::int64_t n, std::int64_t vocab) {
  std::vector<std::int32_t> p;
  for (std::int64_t i = 0; i < n; ++i) p.push_back(static_cast<std::int32_t>(3 + (i * 7919) % (vocab - 3)));
  return p;
}

TEST(LayerSplitTest, TwoAndFourRangesMatchWholeModel) {
  auto w = testing::tiny_weights("tiny", DType::kBF16);
  const auto prompt = test_prompt(40, w->config().vocab_size);
  auto whole = split(*w, 1, 16, true);
  const auto expected = generate(whole, nullptr, prompt, 32);
  for (std::int64_t parts : {2, 4}) {
    auto stages = split(*w, parts, 16, true);
    EXPECT_EQ(generate(stages, nullptr, prompt, 32), expected) << parts << " layer ranges";
  }
}

TEST(LayerSplitTest, AttentionOnAnotherDeviceMatches) {
  auto w = testing::tiny_weights("tiny-llama3", DType::kBF16);
  const auto prompt = test_prompt(33, w->config().vocab_size);
  auto whole = split(*w, 1, 16, true);
  const auto expected = generate(whole, nullptr, prompt, 24);
  // Weights on two stage devices, every layer's KV (and so its attention) on a third device.
  auto stages = split(*w, 2, 16, false);
  Stage kv_device = make_stage(*w, 0, 0, 0, w->config().num_layers, 16, kv::AllocationOrder::kDeterministic);
  EXPECT_EQ(generate(stages, &kv_device, prompt, 24), expected);
}

TEST(PagedKvTest, BlockSizeAndAllocationOrderDoNotChangeTokens) {
  auto w = testing::tiny_weights("tiny", DType::kBF16);
  const auto prompt = test_prompt(300, w->config().vocab_size);
  auto b16 = split(*w, 1, 16, true);
  const auto expected = generate(b16, nullptr, prompt, 20);
  auto b256 = split(*w, 1, 256, true);
  EXPECT_EQ(generate(b256, nullptr, prompt, 20), expected) << "block size 256";
  auto shuffled = split(*w, 2, 16, true, kv::AllocationOrder::kShuffled);
  EXPECT_EQ(generate(shuffled, nullptr, prompt, 20), expected) << "shuffled block order";
}

}  // namespace
}  // namespace kun::runtime
