// The forward path allocates no buffer (issue 12): a device's ForwardPass computes in the
// workspace carved from its arena, so a step (layers, local attention, logits) allocates nothing
// sized by the step. Counted with a replaced global operator new, on the calling thread only.
// What remains are the kernels' small std::function temporaries for their thread pool dispatch
// and their per-thread GEMM packing buffers (kernels/), which grow once to the largest GEMM a
// thread has run: one kernel thread here, so the warm-up step grows them deterministically (with
// more threads, which rows the calling thread takes varies from call to call).
#include <gtest/gtest.h>

#include <cstdlib>
#include <functional>
#include <new>

#include "runtime/tests/test_models.h"
#include "runtime/virtual_device.h"

// The replacements below pair operator new with malloc and delete with free, which GCC cannot see
// through once they are inlined into the standard containers of this file.
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"

namespace {
thread_local bool t_counting = false;
thread_local std::int64_t t_allocations = 0;
thread_local std::size_t t_largest = 0;
}  // namespace

void* operator new(std::size_t n) {
  if (t_counting) {
    ++t_allocations;
    if (n > t_largest) t_largest = n;
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

template <typename Fn>
Counted count(Fn&& fn) {
  t_allocations = 0;
  t_largest = 0;
  t_counting = true;
  fn();
  t_counting = false;
  return Counted{t_allocations, t_largest};
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
  model::ForwardPass warm(c, dev.options().kv_block_size, dev.options().kv_dtype, &dev.pool(),
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

}  // namespace
}  // namespace kun::runtime
