// The forward path allocates no buffer (issue 12): a device's ForwardPass computes in the
// workspace carved from its arena, the GEMM's scratch included (kernels::LinearScratch), so a step
// (layers, local attention, logits) allocates nothing sized by the step, on any thread: counted
// with a replaced global operator new on every thread of the process (the calling thread and the
// device pool's workers). What remains are small std::function temporaries; the kernels'
// thread_local GEMM buffers (their fallback without scratch) must never be used by a device.
#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <cstdlib>
#include <functional>
#include <new>
#include <vector>

#include "runtime/tests/test_models.h"
#include "runtime/virtual_device.h"

// The replacements below pair operator new with malloc and delete with free, which GCC cannot see
// through once they are inlined into the standard containers of this file.
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"

namespace {
std::atomic<bool> g_counting{false};
std::atomic<std::int64_t> g_allocations{0};
std::atomic<std::size_t> g_largest{0};
}  // namespace

void* operator new(std::size_t n) {
  if (g_counting.load(std::memory_order_relaxed)) {
    g_allocations.fetch_add(1, std::memory_order_relaxed);
    std::size_t seen = g_largest.load(std::memory_order_relaxed);
    while (n > seen && !g_largest.compare_exchange_weak(seen, n, std::memory_order_relaxed)) {
    }
  }
  if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }

namespace kun::runtime {
namespace {

struct Counted {
  std::int64_t allocations = 0;
  std::size_t largest = 0;
};

// Allocations on every thread while fn runs (the device pool's workers only run inside fn's
// kernel calls, so all they allocate is counted).
template <typename Fn>
Counted count(Fn&& fn) {
  g_allocations.store(0);
  g_largest.store(0);
  g_counting.store(true);
  fn();
  g_counting.store(false);
  return Counted{g_allocations.load(), g_largest.load()};
}

// Pointers to `blocks_per_layer` KV blocks of every layer of a device (one sequence's cache).
std::vector<std::vector<std::byte*>> sequence_blocks(VirtualDevice& dev, std::int64_t blocks_per_layer) {
  const std::int64_t L = dev.config().num_layers;
  std::vector<std::vector<std::byte*>> blocks(static_cast<std::size_t>(L));
  kv::KvStorage& store = dev.kv_storage();
  const std::vector<memory::PageId> kv_pages = dev.arena().kv_pages();
  const std::int64_t per_page = store.blocks_per_page();
  KUN_CHECK_GE(static_cast<std::int64_t>(kv_pages.size()) * per_page, blocks_per_layer * L);
  for (std::int64_t l = 0; l < L; ++l) {
    for (std::int64_t b = 0; b < blocks_per_layer; ++b) {
      const std::int64_t i = l * blocks_per_layer + b;
      const std::int64_t id = kv_pages[static_cast<std::size_t>(i / per_page)].value * per_page + i % per_page;
      blocks[static_cast<std::size_t>(l)].push_back(store.block_data(kv::BlockId(id)));
    }
  }
  return blocks;
}

TEST(ForwardAllocationTest, AStepOnTheDeviceAllocatesNoBuffer) {
  auto w = testing::tiny_weights();
  const model::ModelConfig& c = w->config();
  auto dev_or = create_full_device("alloc", *w, /*kv_token_blocks=*/8, /*block_size=*/16, /*num_threads=*/1);
  ASSERT_TRUE(dev_or.ok()) << dev_or.status().to_string();
  VirtualDevice& dev = **dev_or;
  const DeviceOwnerScope scope(dev);
  model::ForwardPass& fwd = dev.forward();
  const std::int64_t H = c.hidden_size;
  const std::int64_t L = c.num_layers;
  // One sequence's KV: 4 blocks (64 tokens) on every layer.
  std::vector<std::vector<std::byte*>> blocks(static_cast<std::size_t>(L));
  kv::KvStorage& store = dev.kv_storage();
  const std::vector<memory::PageId> kv_pages = dev.arena().kv_pages();
  const std::int64_t per_page = store.blocks_per_page();
  ASSERT_GE(static_cast<std::int64_t>(kv_pages.size()) * per_page, 4 * L);
  for (std::int64_t l = 0; l < L; ++l) {
    for (std::int64_t b = 0; b < 4; ++b) {
      const std::int64_t i = l * 4 + b;
      const std::int64_t id = kv_pages[static_cast<std::size_t>(i / per_page)].value * per_page + i % per_page;
      blocks[static_cast<std::size_t>(l)].push_back(store.block_data(kv::BlockId(id)));
    }
  }
  const std::function<model::LayerWeights(std::int64_t)> weights = [&](std::int64_t l) { return dev.layer_weights(l); };
  model::ForwardPass* pass = nullptr;  // the pass the step runs on
  const model::AttentionFn attention = [&](std::int64_t l, std::int64_t, const model::SequenceSlice& s, const float* qkv,
                                           float* out) {
    const auto& b = blocks[static_cast<std::size_t>(l)];
    pass->attend_local(s, qkv, model::LayerKv{b.data(), static_cast<std::int64_t>(b.size())}, out);
  };
  const model::HeadWeights head = dev.head_weights();
  std::vector<std::int32_t> tokens(32);
  for (std::size_t t = 0; t < tokens.size(); ++t) tokens[t] = static_cast<std::int32_t>(3 + 7 * t);
  const std::span<float> hidden = dev.stage_activations();
  const std::span<float> logits = dev.stage_logits();
  const auto step = [&](model::ForwardPass& on, std::int64_t start, std::int64_t n) {
    pass = &on;
    const model::SequenceSlice slice{start, n};
    on.embed(head, tokens.data() + start, n, hidden.data());
    on.run_layers(0, L, std::span(&slice, 1), hidden.data(), weights, attention);
    const std::int64_t row = n - 1;
    on.logits(head, hidden.data(), std::span(&row, 1), logits.data());
  };
  // Warm-up on another pass (its workspace on the heap): the kernels' per-thread packing buffers
  // reach a 16-token step. The device's own pass then runs for the first time: its buffers were
  // carved from the arena when the device was made, so even its first steps allocate none.
  model::ForwardPass warm(c, dev.options().weight_dtype, dev.options().kv_block_size, dev.options().kv_dtype,
                          kernels::attention_arithmetic_for(dev.options().weight_dtype), &dev.pool(),
                          model::ForwardLimits{16, 1, 64, false});
  step(warm, 0, 16);
  const Counted prefill = count([&] { step(fwd, 16, 8); });
  const Counted decode = count([&] { step(fwd, 24, 1); });
  // Nothing the size of an activation row (H floats) or more is allocated by a step, and the
  // number of allocations does not grow with the step's tokens.
  const auto row_bytes = static_cast<std::size_t>(H) * sizeof(float);
  EXPECT_LT(prefill.largest, row_bytes) << prefill.allocations << " allocations";
  EXPECT_LT(decode.largest, row_bytes) << decode.allocations << " allocations";
  EXPECT_LE(prefill.allocations, decode.allocations + L) << "allocations grew with the step's tokens";
}

// Steps at the workspace's limit (max_batched_tokens tokens of prefill, then max_sequences logit
// rows) on a 2-thread device with bf16 weights (the GEMM's kPanelPairs path, the one with
// scratch): after a 1-token warm-up, nothing the size of an activation row is allocated on any
// thread (the GEMM's packed activations alone would be (T + 8)(K + 1) floats), and the kernels'
// thread_local fallback is never used.
TEST(ForwardAllocationTest, StepsAtTheWorkspaceLimitKeepTheGemmScratchInTheWorkspaceOnEveryThread) {
  auto w = testing::tiny_weights("tiny", DType::kBF16);
  const model::ModelConfig& c = w->config();
  const std::int64_t block = 16;
  const std::int64_t T = DeviceOptions{}.max_batched_tokens;
  const std::int64_t blocks_per_layer = T / block + 1;
  auto dev_or = create_full_device("alloc2", *w, blocks_per_layer, block, /*num_threads=*/2);
  ASSERT_TRUE(dev_or.ok()) << dev_or.status().to_string();
  VirtualDevice& dev = **dev_or;
  ASSERT_EQ(dev.options().max_batched_tokens, T);
  ASSERT_EQ(dev.pool().num_threads(), 2);
  const DeviceOwnerScope scope(dev);
  const model::LayerWeights lw0 = dev.layer_weights(0);
  for (const kernels::WeightView* v : {&lw0.qkv, &lw0.o, &lw0.gate_up, &lw0.down}) {
    ASSERT_EQ(v->layout, kernels::gemm_weight_layout(kernels::active_gemm_activations()))
        << "the test needs the GEMM path that uses scratch";
  }
  model::ForwardPass& fwd = dev.forward();
  const std::int64_t L = c.num_layers;
  const auto blocks = sequence_blocks(dev, blocks_per_layer);
  const std::function<model::LayerWeights(std::int64_t)> weights = [&](std::int64_t l) { return dev.layer_weights(l); };
  const model::AttentionFn attention = [&](std::int64_t l, std::int64_t, const model::SequenceSlice& s, const float* qkv,
                                           float* out) {
    const auto& b = blocks[static_cast<std::size_t>(l)];
    fwd.attend_local(s, qkv, model::LayerKv{b.data(), static_cast<std::int64_t>(b.size())}, out);
  };
  const model::HeadWeights head = dev.head_weights();
  std::vector<std::int32_t> tokens(static_cast<std::size_t>(T + 1));
  for (std::size_t t = 0; t < tokens.size(); ++t) tokens[t] = static_cast<std::int32_t>((3 + 7 * t) % 2000);
  const std::span<float> hidden = dev.stage_activations();
  const std::span<float> logits = dev.stage_logits();
  const std::int64_t logit_rows = dev.options().max_sequences;
  std::vector<std::int64_t> rows(static_cast<std::size_t>(logit_rows));
  const auto step = [&](std::int64_t start, std::int64_t n) {
    const model::SequenceSlice slice{start, n};
    fwd.embed(head, tokens.data() + start, n, hidden.data());
    fwd.run_layers(0, L, std::span(&slice, 1), hidden.data(), weights, attention);
    const std::int64_t m = std::min<std::int64_t>(n, logit_rows);
    for (std::int64_t r = 0; r < m; ++r) rows[static_cast<std::size_t>(r)] = n - m + r;
    fwd.logits(head, hidden.data(), std::span(rows.data(), static_cast<std::size_t>(m)), logits.data());
  };
  const std::int64_t fallback_before = kernels::linear_thread_local_scratch_uses();
  step(0, 1);  // warm-up: 1 token
  const Counted at_limit = count([&] { step(0, T); });  // the same sequence again, at the limit
  const auto row_bytes = static_cast<std::size_t>(c.hidden_size) * sizeof(float);
  EXPECT_LT(at_limit.largest, row_bytes) << at_limit.allocations << " allocations in a " << T << "-token step";
  EXPECT_EQ(kernels::linear_thread_local_scratch_uses(), fallback_before)
      << "the device's forward pass used the kernels' thread_local GEMM scratch instead of its workspace";
}

// A tied bf16 embedding is kept once, in the LM head's GEMM layout (kPanelPairs), so the logits
// run on the panel kernels: the segment has the row-major byte count, holds exactly the packed
// embedding, the head's view is the embedding's, and the token lookup gathers each row out of the
// panels bit for bit (widened bf16, as from the source).
TEST(ForwardAllocationTest, ATiedEmbeddingIsOneCopyInTheHeadsGemmLayout) {
  auto w = testing::tiny_weights("tiny-qwen2", DType::kBF16);
  const model::ModelConfig& c = w->config();
  ASSERT_TRUE(c.tie_word_embeddings);
  const std::int64_t V = c.vocab_size;
  const std::int64_t H = c.hidden_size;
  // The layout this process's GEMM reads (kPanelPairs; kNarrowPanelPairs under KUN_GEMM_ACTIVATIONS=amx).
  const kernels::WeightLayout gemm_layout = kernels::gemm_weight_layout(kernels::active_gemm_activations());
  EXPECT_EQ(model::embedding_layout(c, DType::kBF16), gemm_layout);
  EXPECT_EQ(model::embedding_segment_bytes(c, DType::kBF16), V * H * 2);  // one copy, row-major's size
  auto dev_or = create_full_device("tied", *w, /*kv_token_blocks=*/8, /*block_size=*/16, /*num_threads=*/2);
  ASSERT_TRUE(dev_or.ok()) << dev_or.status().to_string();
  VirtualDevice& dev = **dev_or;
  const DeviceOwnerScope scope(dev);
  const model::HeadWeights head = dev.head_weights();
  EXPECT_EQ(head.embedding.layout, gemm_layout);
  EXPECT_EQ(head.lm_head.data, head.embedding.data);
  EXPECT_EQ(head.lm_head.layout, gemm_layout);
  // The segment is the source embedding packed.
  std::vector<std::uint16_t> source(static_cast<std::size_t>(V * H));
  ASSERT_TRUE(w->read_tensor("model.embed_tokens.weight", DType::kBF16, source.data(),
                             static_cast<std::int64_t>(source.size() * 2))
                  .ok());
  std::vector<std::uint16_t> packed(source.size());
  kernels::pack_panel_pairs(source.data(), V, H, packed.data(), gemm_layout);
  EXPECT_EQ(std::memcmp(head.embedding.data, packed.data(), packed.size() * 2), 0);
  // embed() reads rows of every panel, first and last columns included.
  std::vector<std::int32_t> tokens = {0, 1, 63, 64, 65, 127, 1000, static_cast<std::int32_t>(V - 2),
                                      static_cast<std::int32_t>(V - 1)};
  const auto n = static_cast<std::int64_t>(tokens.size());
  std::vector<float> hidden(static_cast<std::size_t>(n * H));
  dev.forward().embed(head, tokens.data(), n, hidden.data());
  std::vector<float> expected(static_cast<std::size_t>(H));
  for (std::int64_t t = 0; t < n; ++t) {
    const std::int64_t row = tokens[static_cast<std::size_t>(t)];
    convert_dtype(source.data() + row * H, DType::kBF16, expected.data(), DType::kF32, H);
    EXPECT_EQ(std::memcmp(hidden.data() + t * H, expected.data(), expected.size() * sizeof(float)), 0) << "token " << row;
  }
  // Untied or not bf16: the embedding stays row-major.
  model::ModelConfig untied = c;
  untied.tie_word_embeddings = false;
  EXPECT_EQ(model::embedding_layout(untied, DType::kBF16), kernels::WeightLayout::kRowMajor);
  EXPECT_EQ(model::embedding_layout(c, DType::kF32), kernels::WeightLayout::kRowMajor);
}

// The forward workspace holds the MLP's [tokens][2F] gate/up products only where the device's
// layer weights do not take the fused GEMM (silu_mul in the AMX GEMM's epilogue): the plan made
// from the config and the weight dtype agrees with the weights the device loaded, the bytes saved
// are exactly that buffer, and weights that do not fuse abort on a pass sized without it.
TEST(ForwardAllocationTest, TheWorkspaceHoldsTheGateUpProductsOnlyWhereTheMlpDoesNotFuse) {
  // llama-30m: F = 1408, a multiple of 64, so its bf16 gate/up weight fuses in every GEMM mode
  // (the tiny preset's F = 688 fuses only on the AMX GEMM's 16-column panels).
  auto w = testing::tiny_weights("llama-30m", DType::kBF16);
  const model::ModelConfig& c = w->config();
  auto dev_or = create_full_device("fused", *w, /*kv_token_blocks=*/8, /*block_size=*/16, /*num_threads=*/1);
  ASSERT_TRUE(dev_or.ok()) << dev_or.status().to_string();
  VirtualDevice& dev = **dev_or;
  const DeviceOwnerScope scope(dev);
  const model::LayerWeights lw0 = dev.layer_weights(0);
  const bool fused = kernels::linear_silu_mul_fuses(lw0.gate_up, kernels::active_gemm_activations());
  EXPECT_EQ(fused, model::mlp_gate_up_fused(c, dev.options().weight_dtype));
  EXPECT_FALSE(model::mlp_gate_up_fused(c, DType::kF32));

  const model::ForwardLimits limits{64, 4, 128, false};
  const kernels::AttentionArithmetic arithmetic = kernels::attention_arithmetic_for(DType::kBF16);
  const std::int64_t bf16_bytes = model::forward_workspace_bytes(c, DType::kBF16, limits, 1, arithmetic);
  const std::int64_t f32_bytes = model::forward_workspace_bytes(c, DType::kF32, limits, 1, arithmetic);
  const std::int64_t products = limits.max_tokens * 2 * c.intermediate_size * static_cast<std::int64_t>(sizeof(float));
  EXPECT_EQ(f32_bytes - bf16_bytes, fused ? products : 0);
  ASSERT_TRUE(fused) << "a bf16 gate/up weight with F = " << c.intermediate_size << " fuses in GEMM mode "
                     << kernels::gemm_activations_name(kernels::active_gemm_activations());

  // A pass sized for fused weights, handed a gate/up weight that does not fuse.
  model::ForwardPass& fwd = dev.forward();
  std::vector<float> attn_out(static_cast<std::size_t>(c.q_dim()), 0.25f);
  std::vector<float> hidden(static_cast<std::size_t>(c.hidden_size), 0.5f);
  model::LayerWeights unfused = lw0;
  unfused.gate_up.layout = kernels::WeightLayout::kRowMajor;
  EXPECT_DEATH(fwd.attention_output_and_mlp(unfused, attn_out.data(), 1, hidden.data()),
               "does not take the fused GEMM this forward pass was sized for");
  fwd.attention_output_and_mlp(lw0, attn_out.data(), 1, hidden.data());  // the loaded weights run
  EXPECT_TRUE(std::isfinite(hidden[0]));
}

}  // namespace
}  // namespace kun::runtime
