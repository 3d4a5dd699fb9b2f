#include "sim/cost_model.h"

#include <algorithm>
#include <cctype>
#include <cmath>

#include "common/check.h"
#include "kv/kv_geometry.h"
#include "sim/device_profile.h"

namespace kun::sim {
namespace {

std::string lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

// Fitted by sim/calibration/fit_cost_model.py on ../shared/gpu-profiles/compute (TP 1).
// A100: Llama-2-7B + Llama-3-8B; H100: Llama-2-7B. Fit error in sim/README.md.
GpuSpec a100() {
  GpuSpec g;
  g.name = "a100-80gb";
  g.peak_flops = 312e12;
  g.hbm_bytes_per_s = 2.039e12;
  g.memory_bytes = static_cast<std::int64_t>(80.0 * 1e9);
  g.gemm_flops_eff = 0.70;
  g.gemm_bw_eff = 0.90;
  g.gemm_overhead_us = 16.0;
  g.elem_bw_eff = 0.50;
  g.elem_overhead_us = 3.0;
  g.calibrated = true;
  // all_reduce.csv of a100_dgx (NVLink/NVSwitch, devices_per_node = num_workers), messages
  // >= 64 KiB; median error 1.9 / 3.2 / 3.8 %.
  g.all_reduce = {{2, 44.0, 170e9}, {4, 59.0, 124e9}, {8, 39.0, 74e9}};
  return g;
}

GpuSpec h100() {
  GpuSpec g;
  g.name = "h100-80gb";
  g.peak_flops = 989e12;
  g.hbm_bytes_per_s = 3.35e12;
  g.memory_bytes = static_cast<std::int64_t>(80.0 * 1e9);
  g.gemm_flops_eff = 0.70;
  g.gemm_bw_eff = 0.88;
  g.gemm_overhead_us = 12.0;
  g.elem_bw_eff = 0.58;
  g.elem_overhead_us = 2.5;
  g.step_overhead_us = 1200.0;
  g.calibrated = true;
  // all_reduce.csv of h100_dgx; median error 1.5 / 1.6 / 2.6 %.
  g.all_reduce = {{2, 16.0, 288e9}, {4, 21.0, 228e9}, {8, 37.0, 210e9}};
  return g;
}

GpuSpec h200() {
  GpuSpec g = h100();  // same SM complex; no profile: H100 efficiencies, own memory system
  g.name = "h200";
  g.hbm_bytes_per_s = 4.8e12;
  g.memory_bytes = static_cast<std::int64_t>(141.0 * 1e9);
  g.calibrated = false;
  return g;
}

}  // namespace

StatusOr<GpuSpec> gpu_spec(std::string_view name) {
  const std::string n = lower(name);
  if (n == "a100" || n == "a100-80gb") return a100();
  if (n == "h100" || n == "h100-80gb") return h100();
  if (n == "h200") return h200();
  if (n.size() > 5 && n.substr(n.size() - 5) == ".json") {
    KUN_ASSIGN_OR_RETURN(DeviceProfile p, load_device_profile(std::string(name)));
    return p.spec;
  }
  return not_found("unknown GPU '" + std::string(name) + "' (known: a100-80gb h100-80gb h200)");
}

namespace {

// A measured per-device-count curve at a fractional count: linear between the measured counts,
// the first below one device, proportional to the count beyond the last (the cores are shared by
// more devices than were measured).
double interpolate_by_devices(const std::vector<double>& by_count, double busy_devices) {
  if (busy_devices <= 1.0) return by_count.front();
  const auto n = static_cast<double>(by_count.size());
  if (busy_devices >= n) return by_count.back() * busy_devices / n;
  const auto lo = static_cast<std::size_t>(std::floor(busy_devices));  // 1 <= lo < n
  const double frac = busy_devices - static_cast<double>(lo);
  return by_count[lo - 1] * (1.0 - frac) + by_count[lo] * frac;
}

}  // namespace

double GpuSpec::contention_factor(double busy_devices) const {
  if (host_contention.empty()) return 1.0;
  return std::max(0.1, interpolate_by_devices(host_contention, busy_devices));
}

double GpuSpec::contention_latency_us(double busy_devices) const {
  if (host_contention_us.empty()) return 0.0;
  return std::max(0.0, interpolate_by_devices(host_contention_us, busy_devices));
}

std::size_t knot_bin(const std::vector<double>& knots, std::int64_t tokens) {
  std::size_t bin = 0;
  for (std::size_t i = 0; i < knots.size(); ++i) {
    if (static_cast<double>(tokens) >= knots[i]) bin = i;
  }
  return bin;
}

std::size_t GpuSpec::token_bin(std::int64_t new_tokens) const {
  return knot_bin(host_contention_token_knots.empty() ? table_tokens : host_contention_token_knots, new_tokens);
}

double GpuSpec::contention_shape(double busy_devices, std::int64_t new_tokens, bool fused) const {
  const std::vector<std::vector<double>>& rows = fused ? host_contention_fused_tokens : host_contention_tokens;
  if (rows.empty()) return 1.0;
  const std::size_t bin = token_bin(new_tokens);
  const auto at = [&](std::size_t row) {
    const std::vector<double>& r = rows[std::min(row, rows.size() - 1)];
    return bin < r.size() ? r[bin] : 1.0;
  };
  if (busy_devices <= 1.0) return at(0);
  const auto lo = static_cast<std::size_t>(std::floor(busy_devices));  // >= 1
  const double frac = busy_devices - static_cast<double>(lo);
  return at(lo - 1) * (1.0 - frac) + at(lo) * frac;
}

double GpuSpec::idle_wake_us(double idle_us) const {
  double out = 0.0;
  for (std::size_t i = 0; i < host_idle_gap_us.size() && i < host_idle_us.size(); ++i) {
    if (idle_us >= host_idle_gap_us[i]) out = host_idle_us[i];
  }
  return out;
}

double GpuSpec::fused_contention_latency_us(double busy_devices) const {
  if (host_contention_fused_us.empty()) return contention_latency_us(busy_devices);
  return std::max(0.0, interpolate_by_devices(host_contention_fused_us, busy_devices));
}

std::vector<std::string> gpu_names() { return {"a100-80gb", "h100-80gb", "h200"}; }

StatusOr<LinkSpec> link_spec(std::string_view name) {
  const std::string n = lower(name);
  // NVLink and InfiniBand: fitted to gpu-profiles/network/*/send_recv.csv (2 workers,
  // devices_per_node 2 = intra-node NVLink, 1 = across nodes).
  if (n == "nvlink" || n == "nvlink-h100") return LinkSpec{"nvlink-h100", 359.5e9, 7.0, true};
  if (n == "nvlink-a100") return LinkSpec{"nvlink-a100", 318.5e9, 14.5, true};
  if (n == "ib" || n == "ib-ndr") return LinkSpec{"ib-ndr", 36.0e9, 12.5, true};
  if (n == "ib-hdr") return LinkSpec{"ib-hdr", 7.5e9, 0.5, true};
  // PCIe: nominal effective rates of x16 links (no measurement available).
  if (n == "pcie4") return LinkSpec{"pcie4", 25e9, 10.0, false};
  if (n == "pcie5") return LinkSpec{"pcie5", 50e9, 10.0, false};
  return not_found("unknown link '" + std::string(name) + "' (known: nvlink nvlink-a100 pcie4 pcie5 ib ib-hdr)");
}

std::vector<std::string> link_names() { return {"nvlink", "nvlink-a100", "pcie4", "pcie5", "ib", "ib-hdr"}; }

double transfer_us(const LinkSpec& link, std::int64_t bytes) {
  if (bytes <= 0) return 0.0;
  KUN_CHECK(link.bytes_per_s > 0) << link.name;
  return link.latency_us + static_cast<double>(bytes) / link.bytes_per_s * 1e6;
}

StatusOr<model::ModelConfig> sim_model_config(std::string_view name) {
  const std::string n = lower(name);
  model::ModelConfig c;
  c.architecture = "llama";
  c.dtype = DType::kBF16;
  if (n == "llama-2-7b") {
    c.vocab_size = 32000; c.hidden_size = 4096; c.intermediate_size = 11008; c.num_layers = 32;
    c.num_heads = 32; c.num_kv_heads = 32; c.head_dim = 128; c.max_position_embeddings = 4096;
  } else if (n == "llama-2-13b") {
    c.vocab_size = 32000; c.hidden_size = 5120; c.intermediate_size = 13824; c.num_layers = 40;
    c.num_heads = 40; c.num_kv_heads = 40; c.head_dim = 128; c.max_position_embeddings = 4096;
  } else if (n == "llama-2-70b") {
    c.vocab_size = 32000; c.hidden_size = 8192; c.intermediate_size = 28672; c.num_layers = 80;
    c.num_heads = 64; c.num_kv_heads = 8; c.head_dim = 128; c.max_position_embeddings = 4096;
  } else if (n == "llama-3-8b") {
    c.vocab_size = 128256; c.hidden_size = 4096; c.intermediate_size = 14336; c.num_layers = 32;
    c.num_heads = 32; c.num_kv_heads = 8; c.head_dim = 128; c.max_position_embeddings = 8192;
    c.rope_theta = 500000.0f; c.bos_token_id = 128000; c.eos_token_id = 128001;
  } else if (n == "qwen2.5-7b") {
    c.architecture = "qwen2"; c.attention_bias = true;
    c.vocab_size = 152064; c.hidden_size = 3584; c.intermediate_size = 18944; c.num_layers = 28;
    c.num_heads = 28; c.num_kv_heads = 4; c.head_dim = 128; c.max_position_embeddings = 32768;
    c.rope_theta = 1000000.0f; c.rms_norm_eps = 1e-6f; c.bos_token_id = 151643; c.eos_token_id = 151643;
  } else {
    auto preset = model::preset_config(name);
    if (!preset.ok()) {
      return not_found("unknown model '" + std::string(name) +
                       "' (sim models: llama-2-7b llama-2-13b llama-2-70b llama-3-8b qwen2.5-7b, or a model preset)");
    }
    return preset;
  }
  return c;
}

std::vector<std::string> sim_model_names() {
  std::vector<std::string> names = {"llama-2-7b", "llama-2-13b", "llama-2-70b", "llama-3-8b", "qwen2.5-7b"};
  for (auto& p : model::preset_names()) names.push_back(p);
  return names;
}

std::string CostModel::tp_problem(const GpuSpec& gpu, const model::ModelConfig& m, std::int64_t tp) {
  if (tp < 1) return "--tp must be >= 1";
  if (tp == 1) return "";
  const bool fitted = std::any_of(gpu.all_reduce.begin(), gpu.all_reduce.end(), [&](const AllReduceFit& f) { return f.tp == tp; });
  if (!fitted) return "no all-reduce profile for TP " + std::to_string(tp) + " on " + gpu.name + " (2, 4 or 8 on GPUs)";
  if (m.num_heads % tp != 0) return "TP " + std::to_string(tp) + " does not divide the " + std::to_string(m.num_heads) + " attention heads";
  if (m.num_kv_heads % tp != 0 && tp % m.num_kv_heads != 0) {
    return "TP " + std::to_string(tp) + " and the " + std::to_string(m.num_kv_heads) + " KV heads do not divide";
  }
  if (m.intermediate_size % tp != 0) return "TP " + std::to_string(tp) + " does not divide the MLP width";
  return "";
}

CostModel::CostModel(GpuSpec gpu, model::ModelConfig model, std::int64_t tp)
    : gpu_(std::move(gpu)), model_(std::move(model)), tp_(tp) {
  KUN_CHECK(gpu_.peak_flops > 0 && gpu_.hbm_bytes_per_s > 0) << gpu_.name;
  KUN_CHECK(model_.num_layers > 0 && model_.hidden_size > 0 && model_.head_dim > 0) << "model shape";
  const std::string problem = tp_problem(gpu_, model_, tp_);
  KUN_CHECK(problem.empty()) << problem;
  for (const AllReduceFit& f : gpu_.all_reduce) {
    if (f.tp == tp_) all_reduce_ = f;
  }
  KUN_CHECK_EQ(gpu_.table_tokens.size(), gpu_.table_us.size()) << gpu_.name << ": step-time table";
  for (std::size_t i = 1; i < gpu_.table_tokens.size(); ++i) {
    KUN_CHECK_GT(gpu_.table_tokens[i], gpu_.table_tokens[i - 1]) << gpu_.name << ": table knots must increase";
  }
  KUN_CHECK(gpu_.table_tokens.empty() || gpu_.table_tokens[0] > 0) << gpu_.name << ": table knots must be > 0";
}

double CostModel::all_reduce_us(double bytes) const {
  if (tp_ == 1 || bytes <= 0) return 0.0;
  return all_reduce_.latency_us + bytes / all_reduce_.bytes_per_s * 1e6;
}

double CostModel::gemm_us(std::int64_t tokens, std::int64_t in_features, std::int64_t out_features) const {
  if (tokens <= 0) return 0.0;
  const double t = static_cast<double>(tokens);
  const double k = static_cast<double>(in_features);
  const double n = static_cast<double>(out_features);
  const double flops = 2.0 * t * k * n;
  const double bytes = static_cast<double>(gpu_.dtype_bytes) * (k * n + t * k + t * n);
  const double compute_s = flops / (gpu_.gemm_flops_eff * gpu_.peak_flops);
  const double memory_s = bytes / (gpu_.gemm_bw_eff * gpu_.hbm_bytes_per_s);
  return std::max(compute_s, memory_s) * 1e6 + gpu_.gemm_overhead_us;
}

double CostModel::elementwise_us(double bytes) const {
  if (bytes <= 0) return 0.0;
  return bytes / (gpu_.elem_bw_eff * gpu_.hbm_bytes_per_s) * 1e6 + gpu_.elem_overhead_us;
}

double CostModel::layer_gemms_us(std::int64_t tokens) const {
  // Column-parallel QKV and gate+up, row-parallel O and down: each GPU has 1/t of the columns
  // or rows (KV heads fewer than t are replicated: each GPU keeps one).
  const std::int64_t h = model_.hidden_size;
  const std::int64_t e = model_.intermediate_size / tp_;
  const std::int64_t q = model_.q_dim() / tp_;
  const std::int64_t kv = std::max<std::int64_t>(model_.kv_dim() / tp_, model_.head_dim);
  return gemm_us(tokens, h, q + 2 * kv) + gemm_us(tokens, q, h) + gemm_us(tokens, h, 2 * e) + gemm_us(tokens, e, h);
}

double CostModel::layer_linear_us(std::int64_t tokens) const {
  if (tokens <= 0) return 0.0;
  const double t = static_cast<double>(tokens);
  const double b = static_cast<double>(gpu_.dtype_bytes);
  const double h = static_cast<double>(model_.hidden_size);
  const double e = static_cast<double>(model_.intermediate_size / tp_);
  const double qk = static_cast<double>(model_.q_dim() + model_.kv_dim()) / static_cast<double>(tp_);
  double us = layer_gemms_us(tokens);
  us += 2 * all_reduce_us(t * h * b);       // after O and after down (TP > 1)
  us += 2 * elementwise_us(2 * t * h * b);  // input and post-attention RMSNorm (read + write)
  us += elementwise_us(2 * t * qk * b);     // rope on q and k
  us += elementwise_us(3 * t * e * b);      // SiLU(gate) * up
  us += elementwise_us(3 * t * h * b);      // residual add
  return us;
}

double CostModel::layer_attention_us(std::span<const SeqWork> seqs) const {
  double flops = 0.0;
  double bytes = 0.0;
  const double b = static_cast<double>(gpu_.dtype_bytes);
  const double kvb = static_cast<double>(kv_element_bytes());
  // Each GPU runs 1/t of the heads (and holds 1/t of the KV heads, at least one).
  const double qd = static_cast<double>(model_.q_dim() / tp_);
  const double kvd = static_cast<double>(std::max<std::int64_t>(model_.kv_dim() / tp_, model_.head_dim));
  bool any = false;
  for (const SeqWork& s : seqs) {
    if (s.new_tokens <= 0) continue;
    any = true;
    const double n = static_cast<double>(s.new_tokens);
    const double c = static_cast<double>(s.context_tokens);
    const double pairs = n * c + n * (n + 1.0) / 2.0;  // causal: token i sees c + i + 1 keys
    flops += 4.0 * pairs * qd;                         // QK^T and PV
    bytes += (c + n) * 2.0 * kvd * kvb;                // K and V read (the new ones written)
    bytes += 2.0 * n * qd * b;                         // q in, output out
  }
  if (!any) return 0.0;
  const double compute_s = flops / (gpu_.attn_flops_eff * gpu_.peak_flops);
  const double memory_s = bytes / (gpu_.attn_bw_eff * gpu_.hbm_bytes_per_s);
  return std::max(compute_s, memory_s) * 1e6 + gpu_.attn_overhead_us;
}

double CostModel::table_us(double tokens) const {
  const std::vector<double>& x = gpu_.table_tokens;
  const std::vector<double>& y = gpu_.table_us;
  if (x.size() == 1) return y[0] * tokens / x[0];
  std::size_t i = 1;
  while (i + 1 < x.size() && tokens > x[i]) ++i;  // segment [x[i-1], x[i]]; the last one extrapolates
  const double slope = (y[i] - y[i - 1]) / (x[i] - x[i - 1]);
  return std::max(0.0, y[i - 1] + slope * (tokens - x[i - 1]));
}

double CostModel::step_us(std::span<const SeqWork> seqs, std::int64_t num_layers, bool first_stage,
                          bool last_stage, bool include_step_overhead) const {
  return step_us(batch_terms(seqs), num_layers, first_stage, last_stage, include_step_overhead);
}

CostModel::BatchTerms CostModel::batch_terms(std::span<const SeqWork> seqs) const {
  BatchTerms b;
  for (const SeqWork& s : seqs) {
    b.tokens += s.new_tokens;
    if (s.sample) ++b.sampled;
  }
  if (b.tokens == 0) return b;
  if (!gpu_.table_tokens.empty()) {
    for (const SeqWork& s : seqs) {
      const double n = static_cast<double>(s.new_tokens);
      const double c = static_cast<double>(s.context_tokens);
      b.pairs += n * c + n * (n + 1.0) / 2.0;
    }
    return b;
  }
  b.per_layer_us = layer_linear_us(b.tokens) + layer_attention_us(seqs);
  return b;
}

double CostModel::step_us(const BatchTerms& batch, std::int64_t num_layers, bool first_stage, bool last_stage,
                          bool include_step_overhead) const {
  const std::int64_t tokens = batch.tokens;
  const std::int64_t sampled = batch.sampled;
  if (tokens == 0) return 0.0;
  double us = include_step_overhead ? gpu_.step_overhead_us : 0.0;
  if (!gpu_.table_tokens.empty()) {
    // Measured device (CPU profile): the table and attention terms per layer, sampling last.
    const double share = static_cast<double>(num_layers) / static_cast<double>(model_.num_layers);
    us += share * (table_us(static_cast<double>(tokens)) + gpu_.attn_pair_us * batch.pairs);
    if (last_stage && sampled > 1) us += gpu_.sample_us * static_cast<double>(sampled - 1);
    (void)first_stage;
    return us;
  }
  us += batch.per_layer_us * static_cast<double>(num_layers);
  const double b = static_cast<double>(gpu_.dtype_bytes);
  const double h = static_cast<double>(model_.hidden_size);
  if (first_stage) us += elementwise_us(2.0 * static_cast<double>(tokens) * h * b);  // embedding gather
  if (last_stage && sampled > 0) {
    us += elementwise_us(2.0 * static_cast<double>(sampled) * h * b);  // final norm
    us += gemm_us(sampled, model_.hidden_size, model_.vocab_size / tp_);  // LM head, split by vocabulary
    us += all_reduce_us(static_cast<double>(sampled * model_.vocab_size / tp_) * b);  // gather the logits
  }
  return us;
}

std::int64_t CostModel::layer_param_bytes() const { return model_.layer_param_count() * gpu_.dtype_bytes; }

std::int64_t CostModel::non_layer_param_bytes() const {
  return (model_.total_param_count() - model_.num_layers * model_.layer_param_count()) * gpu_.dtype_bytes;
}

std::int64_t CostModel::total_param_bytes() const { return model_.total_param_count() * gpu_.dtype_bytes; }

std::int64_t CostModel::kv_element_bytes() { return kv::KvGeometry{}.element_bytes(); }

std::int64_t CostModel::kv_bytes_per_token_per_layer() const {
  // Over the t GPUs; KV heads fewer than t are replicated (each GPU keeps one head).
  return 2 * std::max<std::int64_t>(model_.kv_dim() / tp_, model_.head_dim) * tp_ * kv_element_bytes();
}

std::int64_t CostModel::activation_bytes(std::int64_t tokens) const {
  return tokens * model_.hidden_size * gpu_.dtype_bytes;
}

std::int64_t CostModel::remote_attention_send_bytes(std::int64_t tokens) const {
  return tokens * (model_.q_dim() + 2 * model_.kv_dim()) * gpu_.dtype_bytes;
}

std::int64_t CostModel::remote_attention_return_bytes(std::int64_t tokens) const {
  return tokens * model_.q_dim() * gpu_.dtype_bytes;
}

}  // namespace kun::sim
