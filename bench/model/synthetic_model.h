// SyntheticModel: a preset's synthetic weights (seed 0) loaded into page-aligned buffers the way
// the device arena lays them out (one segment per layer, the embedding, the head), for the
// forward-pass breakdown benches that time the model without an engine. With `memfd`, each buffer
// is a shared mapping of a fallocated memfd, as memory/device_arena.cc makes; otherwise private
// anonymous memory. Loading failures abort with the status text (a bench has nothing to recover).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <sys/mman.h>
#include <unistd.h>

#include "common/status.h"
#include "common/units.h"
#include "memory/huge_pages.h"
#include "model/config.h"
#include "model/forward.h"
#include "model/weight_source.h"

namespace kun::bench {

// Activation rows the way a device's workspace holds them: zeroed, on huge pages from a huge-page
// boundary, so every row of a 16-multiple width starts on a cache line (a std::vector of this
// size starts 16 bytes past a page, and every row store then straddles two lines).
class Floats {
 public:
  explicit Floats(std::int64_t n, float fill = 0.0f)
      : n_(n), p_(reinterpret_cast<float*>(memory::allocate_on_huge_pages(n * static_cast<std::int64_t>(sizeof(float))))) {
    if (p_ == nullptr) std::abort();
    if (fill != 0.0f) {
      for (std::int64_t i = 0; i < n_; ++i) p_[i] = fill;
    }
  }
  ~Floats() { std::free(p_); }
  Floats(const Floats&) = delete;
  Floats& operator=(const Floats&) = delete;
  float* data() const { return p_; }
  std::size_t size() const { return static_cast<std::size_t>(n_); }
  float& operator[](std::size_t i) const { return p_[i]; }

 private:
  std::int64_t n_;
  float* p_;
};

class WeightBuffer {
 public:
  // The weights sit on huge pages where the kernel gives them, as a device arena's do: with
  // `memfd`, a shared memfd mapping made as the arena makes its own
  // (memory::create_committed_memfd); otherwise private memory. KUN_HUGE_PAGES=0 keeps OS pages,
  // for both alike.
  WeightBuffer(std::int64_t bytes, bool memfd) {
    const std::int64_t huge = memory::huge_pages_requested() ? memory::kernel_huge_page_bytes() : 0;
    size_ = static_cast<std::size_t>(round_up(bytes, huge > 0 ? huge : std::int64_t{4096}));
    if (memfd) {
      auto m = memory::create_committed_memfd("kun_bench_weights", static_cast<std::int64_t>(size_), huge);
      if (!m.ok()) {
        std::fprintf(stderr, "memfd weights: %s\n", m.status().to_string().c_str());
        std::abort();
      }
      fd_ = m->fd;
      p_ = m->base;
    } else {
      p_ = memory::allocate_on_huge_pages(static_cast<std::int64_t>(size_));
      if (p_ == nullptr) std::abort();
    }
  }
  ~WeightBuffer() {
    if (fd_ >= 0) {
      ::munmap(p_, size_);
      ::close(fd_);
    } else {
      std::free(p_);
    }
  }
  WeightBuffer(const WeightBuffer&) = delete;
  WeightBuffer& operator=(const WeightBuffer&) = delete;
  std::byte* data() const { return p_; }
  std::size_t size() const { return size_; }

 private:
  std::size_t size_ = 0;
  std::byte* p_ = nullptr;
  int fd_ = -1;
};

class SyntheticModel {
 public:
  SyntheticModel(const model::ModelConfig& c, bool memfd) {
    const DType dt = c.dtype;
    auto source = model::synthetic_weights(c, 0);
    const auto layout = model::LayerSegmentLayout::compute(c, dt);
    for (std::int64_t l = 0; l < c.num_layers; ++l) {
      buffers_.push_back(std::make_unique<WeightBuffer>(layout.total_bytes, memfd));
      must(model::load_layer_segment(*source, l, dt, {buffers_.back()->data(), static_cast<std::size_t>(layout.total_bytes)}));
      layers_.push_back(model::layer_weights_at(buffers_.back()->data(), c, dt));
    }
    const std::int64_t emb_bytes = model::embedding_segment_bytes(c, dt);
    const std::int64_t head_bytes = model::HeadSegmentLayout::compute(c, dt).total_bytes;
    buffers_.push_back(std::make_unique<WeightBuffer>(emb_bytes, memfd));
    std::byte* emb = buffers_.back()->data();
    must(model::load_embedding_segment(*source, dt, {emb, static_cast<std::size_t>(emb_bytes)}));
    buffers_.push_back(std::make_unique<WeightBuffer>(head_bytes, memfd));
    std::byte* head = buffers_.back()->data();
    must(model::load_head_segment(*source, dt, {head, static_cast<std::size_t>(head_bytes)}));
    head_ = model::head_weights_at(emb, head, c, dt);
  }
  const std::vector<model::LayerWeights>& layers() const { return layers_; }
  const model::HeadWeights& head() const { return head_; }

 private:
  static void must(const Status& s) {
    if (!s.ok()) {
      std::fprintf(stderr, "loading synthetic weights: %s\n", s.to_string().c_str());
      std::abort();
    }
  }
  std::vector<std::unique_ptr<WeightBuffer>> buffers_;
  std::vector<model::LayerWeights> layers_;
  model::HeadWeights head_;
};

// Paged KV for one sequence of `tokens` tokens on every layer, in `block_size`-token blocks of
// `kv_dtype` elements (the layout model::ForwardPass::attend_local reads), zero-filled.
class SequenceKvCache {
 public:
  SequenceKvCache(const model::ModelConfig& c, std::int64_t tokens, std::int64_t block_size, DType kv_dtype)
      : blocks_(ceil_div(tokens, block_size)),
        memory_(static_cast<std::size_t>(c.num_layers)),
        pointers_(static_cast<std::size_t>(c.num_layers)) {
    const std::int64_t block_bytes = 2 * c.num_kv_heads * block_size * c.head_dim * dtype_bytes(kv_dtype);
    for (std::size_t l = 0; l < memory_.size(); ++l) {
      memory_[l].assign(static_cast<std::size_t>(blocks_ * block_bytes), std::byte{0});
      for (std::int64_t b = 0; b < blocks_; ++b) pointers_[l].push_back(memory_[l].data() + b * block_bytes);
    }
  }
  model::LayerKv layer(std::int64_t l) { return model::LayerKv{pointers_[static_cast<std::size_t>(l)].data(), blocks_}; }

 private:
  std::int64_t blocks_;
  std::vector<std::vector<std::byte>> memory_;
  std::vector<std::vector<std::byte*>> pointers_;
};

// The breakdown benches' --attention f32|amx (empty: what a device with these weights
// uses, kernels::attention_arithmetic_for), for A/B runs of the attention arithmetic. False for an
// unknown value, or amx without AMX-BF16.
inline bool parse_attention_arithmetic(const std::string& flag, DType weight_dtype, kernels::AttentionArithmetic* out) {
  if (flag.empty()) {
    *out = kernels::attention_arithmetic_for(weight_dtype);
  } else if (flag == "f32") {
    *out = kernels::AttentionArithmetic::kF32;
  } else if (flag == "amx" && kernels::gemm_activations_supported(kernels::GemmActivations::kAmx)) {
    *out = kernels::AttentionArithmetic::kAmx;
  } else {
    return false;
  }
  return true;
}

}  // namespace kun::bench
