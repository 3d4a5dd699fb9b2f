// Device profiles measured on a machine (issue 15): the CostModel constants of a device that is
// not a GPU of cost_model.cc's table, fitted to steps the real engine timed there.
//
// `kunserve calibrate` (tools/) runs one real instance (runtime::SingleInstance: the device, its
// kernel threads, the engine's scheduler and event delivery) over a set of batches, records each
// step's sequences (context, new tokens, sampled) and its wall time, measures how much slower a
// step gets when k devices of the same host compute at once (`GpuSpec::host_contention`), fits
// the roofline constants of GpuSpec to the steps here (`fit_device_spec`) and writes a JSON file
// (sim/profiles/*.json). `gpu_spec("path/to/profile.json")` loads it, so `kunserve simulate --gpu
// sim/profiles/cpu-....json` runs on the measured device without ../shared.
//
// File format (JSON object): "format": "kunserve-device-profile-1", "spec" (every GpuSpec
// constant, see to_json), "preset" (the model it was measured with), "threads" (kernel threads
// per device), "weight_dtype", "kv_dtype", "page_bytes" (the device page), "host" (CPU model,
// cores), "contention" (slowdown of a step with k = 1, 2, ... devices computing at once),
// "steps" (each measured step: "us" wall, "exec_us" executor, "seqs" as [context, new_tokens,
// sample] triples), "fit"
// (median and p90 of |predicted - measured| / measured over the steps).
//
// Pure code (file I/O only in load / save); any thread.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/status.h"
#include "model/config.h"
#include "sim/cost_model.h"

namespace kun::sim {

struct ProfileStep {
  std::vector<SeqWork> seqs;
  double measured_us = 0.0;  // wall time of the engine's step
  double exec_us = 0.0;      // of which the executor's (the forward pass); 0: unknown
};

struct FitError {
  double median = 0.0;  // of |predicted - measured| / measured
  double p90 = 0.0;
  double mean_signed = 0.0;  // mean of (predicted - measured) / measured: bias
  std::int64_t steps = 0;
};

struct DeviceProfile {
  GpuSpec spec;                 // fitted constants (calibrated = true)
  std::string preset;           // model preset it was measured with
  std::int64_t threads = 1;     // kernel threads per device
  std::string weight_dtype = "bf16";
  std::string kv_dtype = "bf16";
  std::string host;             // CPU model and core count
  std::vector<ProfileStep> steps;
  FitError fit;
  nlohmann::json to_json() const;
  static StatusOr<DeviceProfile> from_json(const nlohmann::json& j);
};

StatusOr<DeviceProfile> load_device_profile(const std::string& path);
Status save_device_profile(const DeviceProfile& profile, const std::string& path);

// Predicted time of a one-stage step (every layer, embedding and LM head, step overhead).
double predicted_step_us(const CostModel& cost, std::span<const SeqWork> seqs);
FitError fit_error(const GpuSpec& spec, const model::ModelConfig& model, std::span<const ProfileStep> steps);

// Fits the measured-table constants of a device (GpuSpec::table_*, sample_us, attn_*_us,
// step_overhead_us) to the steps: step_overhead_us = median of (wall - executor) time; the
// executor time by linear least squares on relative error over hat functions of the new-token
// count at `knots` (those with steps nearby), the extra sampled tokens and the attended (query,
// key) pairs (a negative attention or sampling coefficient is dropped and the rest refitted; the
// table is then made non-decreasing). Other constants stay as in `start`. Steps without exec_us count as all
// executor time.
std::vector<double> default_table_knots();

// Host contention at one device count (GpuSpec::host_contention and host_contention_us): the
// least-squares line measured = factor x predicted + fixed_us over (predicted, measured) step
// times, unweighted (the mean time is what a simulation must match). A negative fixed_us or a
// factor below 0.5 (no sign of a fixed wait, or too few step sizes) gives the ratio of the sums
// with fixed_us = 0; no samples give factor 1.
struct ContentionFit {
  double factor = 1.0;
  double fixed_us = 0.0;
};
ContentionFit fit_contention(std::span<const std::pair<double, double>> predicted_measured_us);
GpuSpec fit_device_spec(const GpuSpec& start, const model::ModelConfig& model, std::span<const ProfileStep> steps,
                        std::vector<double> knots = default_table_knots());

}  // namespace kun::sim
