// Synthetic weights (vLLM's --load-format dummy): every value is a pure function of
// (seed, tensor name, element index), so any tensor (or any part of one) can be produced alone,
// in any order, on any number of threads.
#include <algorithm>
#include <bit>
#include <cmath>
#include <map>
#include <thread>
#include <vector>

#include "model/weight_source.h"

namespace kun::model {
namespace {

constexpr std::uint64_t kGolden = 0x9e3779b97f4a7c15ull;

std::uint64_t splitmix64(std::uint64_t x) {
  x += kGolden;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

std::uint64_t fnv1a(std::string_view s) {
  std::uint64_t h = 0xcbf29ce484222325ull;
  for (char c : s) {
    h ^= static_cast<std::uint8_t>(c);
    h *= 0x100000001b3ull;
  }
  return h;
}

// Approximately standard normal (Irwin-Hall of four 16-bit uniforms): mean 0, variance 1,
// bounded by +-2*sqrt(3). One 64-bit hash per value keeps generation at a few ns per element.
inline float approx_normal(std::uint64_t stream, std::uint64_t index) {
  const std::uint64_t r = splitmix64(stream ^ (index * kGolden));
  const auto sum = static_cast<std::int64_t>((r & 0xffff) + ((r >> 16) & 0xffff) + ((r >> 32) & 0xffff) + (r >> 48));
  constexpr float kScale = 1.7320508075688772f / 65536.0f;  // sqrt(3) / 2^16
  return static_cast<float>(sum - 131070) * kScale;
}

inline float round_to(float v, DType t) {
  switch (t) {
    case DType::kF32: return v;
    case DType::kF16: return f16_to_f32(f32_to_f16(v));
    case DType::kBF16: return bf16_to_f32(f32_to_bf16(v));
  }
  return v;
}

// value = offset + scale * N(0, 1)-ish
struct Distribution {
  float offset = 0.0f;
  float scale = 1.0f;
};

Distribution distribution_for(const ModelConfig& c, const TensorInfo& info) {
  const std::string& n = info.name;
  const auto hidden = static_cast<float>(c.hidden_size);
  // Tied embeddings: logit_v = (w * h / rms(h)) . E_v, so logit std = |w| * scale * sqrt(hidden),
  // and the last token's own embedding, still in the residual stream, lifts its own logit by
  // about scale * sqrt(hidden) / rms(h) standard deviations. An embedding scale of
  // 1/sqrt(hidden) keeps that lift near 1 sigma (no self-repetition); the final norm weight ~4
  // then gives logits a std of ~4.
  if (n == "model.norm.weight" && c.tie_word_embeddings) return {4.0f, 0.2f};
  if (n.ends_with("norm.weight")) return {1.0f, 0.05f};  // RMSNorm weights near 1
  // Small biases: a large v bias adds the same vector at every position and drowns the tokens.
  if (n.ends_with(".bias")) return {0.0f, 0.1f};
  if (n == "model.embed_tokens.weight") {
    return {0.0f, c.tie_word_embeddings ? 1.0f / std::sqrt(hidden) : 1.0f};  // untied: N(0, 1)
  }
  // Untied LM head: logit std ~5 for the unit-rms final norm output.
  if (n == "lm_head.weight") return {0.0f, 5.0f / std::sqrt(hidden)};
  // Projections [out, in]: N(0, 1/fan_in) keeps activations at unit scale layer after layer.
  const auto fan_in = static_cast<float>(info.shape.size() > 1 ? info.shape[1] : 1);
  return {0.0f, 1.0f / std::sqrt(fan_in)};
}

// Fills dst[begin, end): each value rounded once to the stored dtype, then stored as Dst.
template <DType kStored, DType kDst>
void fill_range(const Distribution& d, std::uint64_t stream, void* dst, std::int64_t begin, std::int64_t end) {
  for (std::int64_t i = begin; i < end; ++i) {
    const float v = round_to(d.offset + d.scale * approx_normal(stream, static_cast<std::uint64_t>(i)), kStored);
    if constexpr (kDst == DType::kF32) {
      static_cast<float*>(dst)[i] = v;
    } else if constexpr (kDst == kStored) {
      // Already exact in this type: truncation gives the same bits as rounding.
      static_cast<std::uint16_t*>(dst)[i] =
          kDst == DType::kBF16 ? static_cast<std::uint16_t>(std::bit_cast<std::uint32_t>(v) >> 16) : f32_to_f16(v);
    } else if constexpr (kDst == DType::kF16) {
      static_cast<std::uint16_t*>(dst)[i] = f32_to_f16(v);
    } else {
      static_cast<std::uint16_t*>(dst)[i] = f32_to_bf16(v);
    }
  }
}

template <DType kStored>
void dispatch_dst(DType dst_type, const Distribution& d, std::uint64_t stream, void* dst, std::int64_t b,
                  std::int64_t e) {
  switch (dst_type) {
    case DType::kF32: fill_range<kStored, DType::kF32>(d, stream, dst, b, e); return;
    case DType::kF16: fill_range<kStored, DType::kF16>(d, stream, dst, b, e); return;
    case DType::kBF16: fill_range<kStored, DType::kBF16>(d, stream, dst, b, e); return;
  }
}

void dispatch_fill(DType stored, DType dst_type, const Distribution& d, std::uint64_t stream, void* dst,
                   std::int64_t b, std::int64_t e) {
  switch (stored) {
    case DType::kF32: dispatch_dst<DType::kF32>(dst_type, d, stream, dst, b, e); return;
    case DType::kF16: dispatch_dst<DType::kF16>(dst_type, d, stream, dst, b, e); return;
    case DType::kBF16: dispatch_dst<DType::kBF16>(dst_type, d, stream, dst, b, e); return;
  }
}

template <typename Fn>
void parallel_chunks(std::int64_t n, Fn fn) {
  constexpr std::int64_t kMinPerThread = std::int64_t{1} << 18;
  const std::int64_t hw = std::max<std::int64_t>(1, std::thread::hardware_concurrency());
  const std::int64_t threads = std::clamp<std::int64_t>(n / kMinPerThread, 1, std::min<std::int64_t>(hw, 16));
  if (threads == 1) {
    fn(0, n);
    return;
  }
  std::vector<std::thread> pool;
  const std::int64_t per = (n + threads - 1) / threads;
  for (std::int64_t t = 1; t < threads; ++t) {
    const std::int64_t b = t * per, e = std::min(n, b + per);
    if (b < e) pool.emplace_back([=] { fn(b, e); });
  }
  fn(0, std::min(n, per));
  for (auto& th : pool) th.join();
}

class SyntheticSource final : public WeightSource {
 public:
  SyntheticSource(ModelConfig config, std::uint64_t seed) : config_(std::move(config)), seed_(seed) {
    for (auto& t : expected_tensors(config_)) tensors_.emplace(t.name, t);
  }

  const ModelConfig& config() const override { return config_; }
  std::string describe() const override {
    return "synthetic(seed=" + std::to_string(seed_) + ", " + config_.architecture + ")";
  }
  bool has_tensor(std::string_view name) const override { return tensors_.find(name) != tensors_.end(); }
  StatusOr<TensorInfo> tensor_info(std::string_view name) const override {
    auto it = tensors_.find(name);
    if (it == tensors_.end()) return not_found("tensor '" + std::string(name) + "' not found in " + describe());
    return it->second;
  }

  std::vector<std::string> tensor_names() const override {
    std::vector<std::string> out;
    for (const auto& [name, info] : tensors_) out.push_back(name);
    return out;
  }

  Status read_tensor(std::string_view name, DType dst_dtype, void* dst, std::int64_t dst_bytes) const override {
    KUN_ASSIGN_OR_RETURN(TensorInfo info, tensor_info(name));
    const std::int64_t n = info.num_elements();
    if (dst_bytes != n * dtype_bytes(dst_dtype)) {
      return invalid_argument(describe() + ": tensor '" + info.name + "': destination has " +
                              std::to_string(dst_bytes) + " bytes, need " + std::to_string(n * dtype_bytes(dst_dtype)));
    }
    const Distribution d = distribution_for(config_, info);
    const std::uint64_t stream = splitmix64(seed_ ^ splitmix64(fnv1a(info.name)));
    const DType stored = config_.dtype;
    parallel_chunks(n, [&](std::int64_t begin, std::int64_t end) {
      dispatch_fill(stored, dst_dtype, d, stream, dst, begin, end);
    });
    return ok_status();
  }

 private:
  ModelConfig config_;
  std::uint64_t seed_;
  std::map<std::string, TensorInfo, std::less<>> tensors_;
};

}  // namespace

std::unique_ptr<WeightSource> synthetic_weights(const ModelConfig& config, std::uint64_t seed) {
  KUN_CHECK_OK(config.validate());
  return std::make_unique<SyntheticSource>(config, seed);
}

}  // namespace kun::model
