// The bf16 KV cache (the default) against the f32 option on one device (issue 14): KV bytes per
// token halve, computed from the geometry and measured from the arena (the tokens a fixed
// capacity holds, and the bytes a prefill actually writes into the KV pages), and the bf16 cache's
// logits stay close to the f32 cache's.
#include <cstring>
#include <memory>
#include <vector>

#include <gtest/gtest.h>

#include "kv/block_allocator.h"
#include "kv/block_table.h"
#include "runtime/tests/test_models.h"

namespace kun::runtime {
namespace {

constexpr std::byte kPoison{0xff};

struct Measured {
  std::int64_t geometry_bytes_per_token = 0;  // all layers
  std::int64_t arena_tokens = 0;              // tokens of KV (all layers) the device's KV pages hold
  std::int64_t written_bytes = 0;             // KV bytes the prefill changed
  std::int64_t tokens = 0;
  std::vector<float> logits;                  // last position
};

Measured prefill(const model::WeightSource& w, DType kv_dtype, const std::vector<std::int32_t>& prompt) {
  const auto& c = w.config();
  DeviceOptions opt;
  opt.weight_dtype = c.dtype;
  opt.kv_dtype = kv_dtype;
  opt.page_bytes = 64 * 1024;
  opt.capacity_bytes = device_param_bytes(c, c.dtype, 0, c.num_layers, opt.page_bytes) +
                       device_workspace_bytes(c, opt) + 32 * opt.page_bytes;
  auto dev_or = VirtualDevice::create(opt, c);
  KUN_CHECK(dev_or.ok()) << dev_or.status().to_string();
  VirtualDevice& dev = **dev_or;
  KUN_CHECK_OK(dev.load_weights(w, 0, c.num_layers));
  const auto pages = dev.give_free_pages_to_kv();
  Measured m;
  m.geometry_bytes_per_token = dev.kv_geometry().bytes_per_token_per_layer() * c.num_layers;
  const std::int64_t layer_blocks = static_cast<std::int64_t>(pages.size()) * dev.kv_storage().blocks_per_page();
  m.arena_tokens = layer_blocks / c.num_layers * opt.kv_block_size;
  for (memory::PageId p : pages) std::memset(dev.arena().page_data(p), 0xff, static_cast<std::size_t>(opt.page_bytes));

  kv::KvBlockAllocator alloc(dev.kv_storage().blocks_per_page());
  KUN_CHECK_OK(alloc.add_pages(pages));
  kv::BlockTable table(opt.kv_block_size, 0, c.num_layers);
  m.tokens = static_cast<std::int64_t>(prompt.size());
  KUN_CHECK_OK(table.append_tokens(m.tokens, alloc));
  std::vector<std::vector<std::byte*>> ptrs(static_cast<std::size_t>(c.num_layers));
  for (std::int64_t l = 0; l < c.num_layers; ++l) {
    for (kv::BlockId b : table.layer_blocks(l)) ptrs[static_cast<std::size_t>(l)].push_back(dev.kv_storage().block_data(b));
  }
  auto& fwd = dev.forward();
  std::vector<float> hidden(static_cast<std::size_t>(m.tokens * c.hidden_size));
  fwd.embed(dev.head_weights(), prompt.data(), m.tokens, hidden.data());
  const model::SequenceSlice slice{0, m.tokens};
  fwd.run_layers(
      0, c.num_layers, std::span(&slice, 1), hidden.data(), [&](std::int64_t l) { return dev.layer_weights(l); },
      [&](std::int64_t l, std::int64_t, const model::SequenceSlice& s, const float* qkv, float* out) {
        auto& p = ptrs[static_cast<std::size_t>(l)];
        fwd.attend_local(s, qkv, model::LayerKv{p.data(), static_cast<std::int64_t>(p.size())}, out);
      });
  m.logits.resize(static_cast<std::size_t>(c.vocab_size));
  const std::int64_t row = m.tokens - 1;
  fwd.logits(dev.head_weights(), hidden.data(), std::span(&row, 1), m.logits.data());
  for (memory::PageId p : pages) {
    const std::byte* d = dev.arena().page_data(p);
    for (std::int64_t i = 0; i < opt.page_bytes; ++i) m.written_bytes += d[i] != kPoison ? 1 : 0;
  }
  return m;
}

TEST(KvCacheDtype, Bf16HalvesKvBytesPerTokenInGeometryAndArena) {
  auto w = testing::tiny_weights();
  const auto& c = w->config();
  std::vector<std::int32_t> prompt;
  for (int i = 0; i < 37; ++i) prompt.push_back(static_cast<std::int32_t>(3 + (i * 97) % (c.vocab_size - 3)));
  const Measured bf16 = prefill(*w, DType::kBF16, prompt);
  const Measured f32 = prefill(*w, DType::kF32, prompt);

  // Geometry: 2 * kv_dim * element bytes per layer.
  EXPECT_EQ(bf16.geometry_bytes_per_token, 2 * c.kv_dim() * 2 * c.num_layers);
  EXPECT_EQ(f32.geometry_bytes_per_token, 2 * bf16.geometry_bytes_per_token);
  EXPECT_EQ(bf16.geometry_bytes_per_token, c.kv_bytes_per_token_per_layer(DType::kBF16) * c.num_layers);

  // Arena: the same capacity holds twice the tokens.
  ASSERT_GT(f32.arena_tokens, 0);
  EXPECT_EQ(bf16.arena_tokens, 2 * f32.arena_tokens);

  // Bytes the prefill wrote into the KV pages: at most tokens x bytes per token (nothing outside
  // the tokens' rows), and all of it but the bytes that happen to equal the poison (bf16 and f32
  // K/V of a random model: about 1 in 256).
  for (const Measured* m : {&bf16, &f32}) {
    const std::int64_t expected = m->tokens * m->geometry_bytes_per_token;
    EXPECT_LE(m->written_bytes, expected);
    EXPECT_GE(m->written_bytes, expected * 97 / 100);
  }
  const double ratio = static_cast<double>(f32.written_bytes) / static_cast<double>(bf16.written_bytes);
  std::printf("KV bytes per token, all layers: bf16 %lld, f32 %lld (geometry); measured %.1f vs %.1f, ratio %.3f\n",
              static_cast<long long>(bf16.geometry_bytes_per_token), static_cast<long long>(f32.geometry_bytes_per_token),
              static_cast<double>(bf16.written_bytes) / static_cast<double>(bf16.tokens),
              static_cast<double>(f32.written_bytes) / static_cast<double>(f32.tokens), ratio);
  EXPECT_NEAR(ratio, 2.0, 0.05);

  // The bf16 cache changes the logits by K/V rounding only.
  double max_diff = 0, max_ref = 0;
  for (std::size_t i = 0; i < f32.logits.size(); ++i) {
    max_diff = std::max(max_diff, std::abs(static_cast<double>(bf16.logits[i]) - f32.logits[i]));
    max_ref = std::max(max_ref, std::abs(static_cast<double>(f32.logits[i])));
  }
  std::printf("last-position logits, bf16 vs f32 KV: max |diff| %.3g, relative %.3g\n", max_diff, max_diff / max_ref);
  EXPECT_GT(max_diff, 0.0) << "the bf16 cache must actually round";
  EXPECT_LT(max_diff / max_ref, 2e-2);
}

TEST(KvCacheDtype, UnsupportedDtypeIsAClearError) {
  auto w = testing::tiny_weights();
  DeviceOptions opt;
  opt.kv_dtype = DType::kF16;
  opt.capacity_bytes = 64 * opt.page_bytes;
  auto dev = VirtualDevice::create(opt, w->config());
  ASSERT_FALSE(dev.ok());
  EXPECT_EQ(dev.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(dev.status().to_string().find("f16"), std::string::npos) << dev.status().to_string();
}

}  // namespace
}  // namespace kun::runtime
