// Cost model of the simulator (DESIGN.md section 5, "Simulation"): how long a step of a batch
// takes on a range of layers of one GPU, and how long a transfer takes on a link.
//
// Per decoder layer (bf16 weights and activations, tensor-parallel degree 1):
//   GEMM (QKV, O, gate+up, down): max(FLOPs / (eff_flops * peak), bytes / (eff_bw * HBM)) + overhead
//   elementwise (2 norms, rope, act, add): bytes / (eff_elem_bw * HBM) + overhead
//   attention: max(FLOPs / (attn_eff_flops * peak), (KV read + q/out) bytes / (attn_eff_bw * HBM))
//              + overhead, per sequence (prefill chunks attend to their prefix and causally
//              to themselves; a decode token reads the whole context)
// plus, per step, a fixed overhead (scheduling, launch, sampling), the embedding gather on the
// first stage and the LM head GEMM for sampled tokens on the last stage.
//
// The GEMM and elementwise constants are fitted (sim/calibration/fit_cost_model.py) to the
// measured per-operator timings in ../shared/gpu-profiles/compute (Vidur's profiles, A100 and
// H100, Llama-2-7B / Llama-3-8B, TP 1) and shipped here, so the simulator does not need
// ../shared. The attention profiles are not available: attention is an uncalibrated roofline.
// H200 has no profile: it reuses the H100 efficiencies with its own bandwidth and capacity.
// Links: time = latency + bytes / bandwidth, fitted to gpu-profiles/network/*/send_recv.csv
// (NVLink, InfiniBand); PCIe figures are nominal (no measurement available).
//
// Pure code, no state beyond construction: any thread may call it.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"
#include "model/config.h"

namespace kun::sim {

// Intra-node all-reduce of `tp` GPUs: latency + bytes / bandwidth (fitted, see the .cc).
struct AllReduceFit {
  std::int64_t tp = 0;
  double latency_us = 0.0;
  double bytes_per_s = 0.0;
};

struct GpuSpec {
  std::string name;
  double peak_flops = 0.0;        // dense bf16 FLOP/s
  double hbm_bytes_per_s = 0.0;   // peak HBM bandwidth
  std::int64_t memory_bytes = 0;  // device memory capacity
  // Fitted efficiencies (fractions of peak) and per-kernel overheads.
  double gemm_flops_eff = 0.7;
  double gemm_bw_eff = 0.8;
  double gemm_overhead_us = 10.0;
  double elem_bw_eff = 0.5;
  double elem_overhead_us = 3.0;
  // Attention roofline (not calibrated: no attention profiles).
  double attn_flops_eff = 0.5;
  double attn_bw_eff = 0.7;
  double attn_overhead_us = 6.0;
  // Fixed per-step cost (scheduling, launch of the step, sampling), not calibrated.
  double step_overhead_us = 1500.0;
  bool calibrated = false;  // true when the constants come from a measured profile of this GPU
  std::int64_t dtype_bytes = 2;  // weights, activations and KV (bf16 on GPUs; f32 on the CPU profile)
  std::vector<AllReduceFit> all_reduce;  // by TP degree (2, 4, 8); empty: no tensor parallelism
  // Devices that share a host's cores and memory (a measured CPU profile, sim/device_profile.h):
  // host_contention[k-1] = how much longer a step takes while k devices compute at once than the
  // table says (k = 1: the runtime's own threads and events against the directly stepped
  // instance the table was measured on). Empty: devices are independent (GPUs).
  std::vector<double> host_contention;
  // And a fixed time per step at k devices computing (host_contention_us[k-1], same length or
  // empty): a step at k devices takes host_contention[k-1] x its table time +
  // host_contention_us[k-1]. On an oversubscribed host a device thread woken by its step's message
  // first waits for a core, whatever the step's size (measured on this 2-core host at 4 devices:
  // about 4 ms, against a 2.3 ms decode step alone), so small steps slow down more than large
  // ones and one factor cannot fit both.
  std::vector<double> host_contention_us;
  // The same fixed time for a fused group's round (host_contention_fused_us[k-1], same length as
  // host_contention or empty: then host_contention_us). Fitted apart because it is not the same
  // wait: the runtime keeps g micro-batches of a group in flight, so a stage thread often finds
  // the next micro-batch's message already there when it ends one and does not sleep, and the
  // engine's turnaround for one slot overlaps the others' compute (measured on this 2-core host
  // at 4 devices computing: about 1.3-1.9 ms per round against 2.2-3.3 ms per independent step).
  std::vector<double> host_contention_fused_us;
  // And a step that starts on a unit idle for at least host_idle_gap_us[i] (increasing; the
  // largest knot at or below the spell) takes host_idle_us[i] more (fitted to a run's steps,
  // sim/device_profile.h; empty: nothing). Measured on this host: a lone request's decode step
  // after 30-300 ms idle took 4.2-6.0 ms against 2.2-2.5 ms right after another step (the
  // woken device thread and its cold caches; the fit of a(1) averaged the two before).
  std::vector<double> host_idle_gap_us;
  std::vector<double> host_idle_us;
  // And the contended independent step's shape (fitted to a run's steps, sim/device_profile.h;
  // a fused round has its own, below): at k devices computing, a step of new tokens in [knots[i], knots[i + 1]) is slowed by
  // host_contention[k-1] x host_contention_tokens[k-1][i] (empty, or a row shorter than the
  // knots: 1), the knots being host_contention_token_knots (empty: the step table's). Measured:
  // at 4 devices on this 2-core host a 1-token decode step took 2.9x its table time, one of 3-4
  // tokens 4.9x, a 17-32-token prefill 2.1x, though the one-device table is flat from 1 to 4
  // tokens; one factor per k put the simulated baselines' busy decode steps 20-25 % short. The
  // fit's knots split the table's 2-3 bin (s11d: decode steps of 3 sequences came out 12-15 %
  // short in the simulator, of 2 sequences 3-6 % long).
  std::vector<std::vector<double>> host_contention_tokens;
  std::vector<double> host_contention_token_knots;
  // The same shape for a fused round, by its largest micro-batch's new tokens (fitted to the
  // fused micro-batches with their own b; empty: 1). Measured in s11c: the bench's fused
  // micro-batches of 1 / 2 / 4 / 6+ sequences took 4.1 / 5.7 / 9.5 / 13.4 ms, the simulator's
  // 4.7 / 6.6 / 7.9 / 11.3 with a(k) alone.
  std::vector<std::vector<double>> host_contention_fused_tokens;
  // A drop's time per layer freed, after its sources' steps in flight ended: the runtime's
  // control round trip with the member's agent (drop_layer), which returns the layer's pages
  // (fitted to a run's drops, `bench` runtime.drop_quiesce_ms / drop_layers; measured on this
  // 2-core host: 11-14 ms for the 8 layers a pair of llama-30m instances frees). 0: none (GPUs).
  double drop_layer_us = 0.0;
  // And a step with swap copies waits host_swap_us after each paced copy (a swap-out, a swap-in),
  // not computing, beyond the link time, a(k) x table and b(k) (fitted to a run's swap steps,
  // sim/device_profile.h; 0: nothing). The agent's thread sleeps on the paced host link, and on
  // an oversubscribed host it gets a core back late. Measured on this 2-core host at 4 devices:
  // the bench's one-request swap steps took 6.3-7.4 ms more than its plain decode steps for 8
  // layer blocks (about 2.3 ms of link time), the simulator's 3.1-5.2 ms; fitted 0-2.3 ms.
  double host_swap_us = 0.0;
  std::int64_t page_bytes = 0;  // the device's memory page (0: the simulator's default)
  // Measured step-time table (a CPU profile, sim/device_profile.h), replacing the roofline: a
  // step of an instance computing t new tokens (all L layers, embedding, LM head for one
  // sampled token) takes table(t) (linear between the knots, the last slope beyond), plus
  // sample_us per further sampled token and attn_pair_us per attended (query, key) pair (for a
  // decode token: the tokens it reads), plus step_overhead_us (the engine's time
  // outside the executor). A stage with k of the L layers takes k / L of the table and attention
  // terms (the sampled tokens on the last stage). Empty: the roofline above.
  std::vector<double> table_tokens;
  std::vector<double> table_us;
  double sample_us = 0.0;
  double attn_pair_us = 0.0;
  std::string measured_model;  // the model preset a measured table holds for ("": any)
  // Slowdown of a step with `busy_devices` devices of the host computing (1.0 without contention);
  // fractional counts (a fused group's stages busy part of a round) interpolate linearly.
  double contention_factor(double busy_devices) const;
  // host_contention_us at `busy_devices` (interpolated like contention_factor; 0 when empty).
  double contention_latency_us(double busy_devices) const;
  // host_contention_fused_us at `busy_devices`, or contention_latency_us when that is empty.
  double fused_contention_latency_us(double busy_devices) const;
  // host_contention_tokens (fused: host_contention_fused_tokens) at `busy_devices` (linear
  // between counts, the last row beyond) for a step of `new_tokens` (1 when empty).
  double contention_shape(double busy_devices, std::int64_t new_tokens, bool fused = false) const;
  // The contended shape's bin of a step of `new_tokens` (knot_bin over
  // host_contention_token_knots, or the step table's knots when that is empty);
  // host_contention_tokens' columns.
  std::size_t token_bin(std::int64_t new_tokens) const;
  // host_idle_us for a step after `idle_us` of idleness (0 below the first knot or when empty).
  double idle_wake_us(double idle_us) const;
};

// The largest knot at or below `tokens` (0 below the first or without knots).
std::size_t knot_bin(const std::vector<double>& knots, std::int64_t tokens);

// "a100" / "a100-80gb", "h100" / "h100-80gb", "h200", or the path of a measured device profile
// (a name ending in ".json", sim/device_profile.h; e.g. sim/profiles/cpu-llama-30m-t1.json).
// kNotFound for others.
StatusOr<GpuSpec> gpu_spec(std::string_view name);
std::vector<std::string> gpu_names();

struct LinkSpec {
  std::string name;
  double bytes_per_s = 0.0;
  double latency_us = 0.0;
  bool calibrated = false;
};

// "nvlink" (= "nvlink-h100"), "nvlink-a100", "pcie4", "pcie5", "ib" (= "ib-ndr", 400 Gb/s, H100
// DGX measured), "ib-hdr" (A100 DGX measured). kNotFound for others.
StatusOr<LinkSpec> link_spec(std::string_view name);
std::vector<std::string> link_names();
// latency + bytes / bandwidth, in microseconds (0 for 0 bytes).
double transfer_us(const LinkSpec& link, std::int64_t bytes);

// GPU-scale model shapes for the simulator ("llama-2-7b", "llama-2-13b", "llama-3-8b",
// "llama-2-70b", "qwen2.5-7b"), falling back to model::preset_config for the synthetic presets.
StatusOr<model::ModelConfig> sim_model_config(std::string_view name);
std::vector<std::string> sim_model_names();

// One sequence's share of a step: new_tokens computed after context_tokens already cached.
struct SeqWork {
  std::int64_t context_tokens = 0;
  std::int64_t new_tokens = 0;
  bool sample = false;
};

class CostModel {
 public:
  // Bytes of one KV cache element: the engine's KV dtype (kv::KvGeometry's default, bf16), so the
  // simulator's KV capacity and attention traffic follow the same arithmetic as the devices.
  static std::int64_t kv_element_bytes();

  // tp: tensor-parallel degree inside an instance (Megatron-style: QKV and gate+up split by
  // columns, O and down by rows, attention heads and KV heads split t ways, two all-reduces of the
  // hidden states per layer, the LM head split by vocabulary). Times are one GPU's; byte counts
  // below are the instance's (all t GPUs) unless named per_gpu.
  CostModel(GpuSpec gpu, model::ModelConfig model, std::int64_t tp = 1);
  // Why a TP degree does not fit the model or the GPU (empty: it does).
  static std::string tp_problem(const GpuSpec& gpu, const model::ModelConfig& model, std::int64_t tp);

  const GpuSpec& gpu() const { return gpu_; }
  const model::ModelConfig& model() const { return model_; }
  std::int64_t tp() const { return tp_; }
  // One all-reduce of `bytes` over the instance's t GPUs (0 for t = 1).
  double all_reduce_us(double bytes) const;

  // Per-operator predictions in microseconds (the calibration test compares them to profiles).
  double gemm_us(std::int64_t tokens, std::int64_t in_features, std::int64_t out_features) const;
  double elementwise_us(double bytes) const;
  // The four GEMMs of one layer.
  double layer_gemms_us(std::int64_t tokens) const;
  // All non-attention operators of one layer (GEMMs + norms, rope, activation, residual add).
  double layer_linear_us(std::int64_t tokens) const;
  // Attention of one layer for the batch.
  double layer_attention_us(std::span<const SeqWork> seqs) const;
  // A whole step over num_layers layers; the first stage gathers embeddings, the last runs the
  // final norm and the LM head for the sampled tokens. Includes the per-step overhead unless
  // told otherwise (a pipeline stage's micro-batch pays it once per step, not per stage).
  double step_us(std::span<const SeqWork> seqs, std::int64_t num_layers, bool first_stage, bool last_stage,
                 bool include_step_overhead = true) const;
  // step_us in two parts: what depends on the batch only (one walk over its sequences), then a
  // stage's share of it. A fused round prices each micro-batch on every one of its g stages, so
  // the walk is done once per micro-batch instead of g times; the result is the same to the bit.
  struct BatchTerms {
    std::int64_t tokens = 0;
    std::int64_t sampled = 0;
    double pairs = 0.0;          // measured device: attended (query, key) pairs
    double per_layer_us = 0.0;   // GPU roofline: one layer's linear + attention time
  };
  BatchTerms batch_terms(std::span<const SeqWork> seqs) const;
  double step_us(const BatchTerms& batch, std::int64_t num_layers, bool first_stage, bool last_stage,
                 bool include_step_overhead = true) const;

  // The measured table at `tokens` new tokens (GpuSpec::table_tokens non-empty).
  double table_us(double tokens) const;

  // Memory arithmetic (bytes).
  std::int64_t layer_param_bytes() const;
  std::int64_t non_layer_param_bytes() const;  // embeddings, LM head, final norm
  std::int64_t total_param_bytes() const;
  std::int64_t kv_bytes_per_token_per_layer() const;  // K and V, kv_element_bytes() each
  // Activation bytes that cross a pipeline boundary for `tokens` tokens (hidden states).
  std::int64_t activation_bytes(std::int64_t tokens) const;
  // Remote attention (DESIGN.md 3.5) for `tokens` tokens of one layer whose KV is on another
  // device: q, k and v go to the KV holder, the attention output comes back.
  std::int64_t remote_attention_send_bytes(std::int64_t tokens) const;
  std::int64_t remote_attention_return_bytes(std::int64_t tokens) const;

 private:
  GpuSpec gpu_;
  model::ModelConfig model_;
  std::int64_t tp_ = 1;
  AllReduceFit all_reduce_;
};

}  // namespace kun::sim
