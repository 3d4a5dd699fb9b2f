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
// One engine step as the runtime recorded it (runtime::StepRecord; `kunserve bench --in-process
// --out-dir DIR` writes a run's steps to DIR/POLICY_steps.csv with these column names).
struct RecordedStep {
  std::int64_t end_us = 0;
  std::int64_t duration_us = 0;   // the executor's
  std::int64_t unit_devices = 1;  // g of the fused group that ran it (1: an independent instance)
  std::int64_t sequences = 0;
  std::int64_t new_tokens = 0;
  std::int64_t sampled = 0;
  std::int64_t attended_pairs = 0;
  std::int64_t swap_blocks = 0;
  std::int64_t first_instance = 0;  // its unit's first member (optional column)
};
// The same columns as `bench --out-dir`'s POLICY_steps.csv (`simulate --timeline-prefix` writes
// a simulation's steps with it).
std::string recorded_steps_csv(std::span<const RecordedStep> steps);
// Parses a POLICY_steps.csv (header row with at least the columns above but first_instance, any
// order; other columns are ignored). `source` names the file in errors.
StatusOr<std::vector<RecordedStep>> parse_recorded_steps(const std::string& csv, const std::string& source);

// For each step of one run, how many devices computed on average while it computed: 1 plus the
// other steps' computing time inside its computing span, over that span. A step with swap copies
// computes only after them and the wait that follows (its first swap_us_per_block x swap_blocks
// + swap_wait_us: it waits on the paced host link, then for a core), as the simulator runs it.
std::vector<double> devices_computing(std::span<const RecordedStep> steps, double swap_us_per_block,
                                      double swap_wait_us = 0.0);

// For each step of one run, how long its unit had been idle before it started: since the latest
// end of a step whose unit had the same first instance (a fused group's first step follows its
// first member's last step; in the simulator likewise, ClusterSim::start_steps); the first step
// of each first instance: infinity.
std::vector<double> idle_before(std::span<const RecordedStep> steps);
// The idle spells fit_host_contention bins the steps after (GpuSpec::host_idle_gap_us): 10, 30,
// 100 and 300 ms.
std::vector<double> default_idle_gap_knots_us();
inline constexpr std::int64_t kMinIdleSteps = 5;
// The token counts fit_host_contention bins the contended shape by: 1, 2, 3, 4, 6, 8, then the
// powers of two to 512.
std::vector<double> default_shape_token_knots();

// Host contention fitted to real runs' own steps (the simulator's a(k) x table + b(k),
// GpuSpec::host_contention / host_contention_us): each run's independent-instance steps without
// swap copies are binned by devices_computing (rounded, 1..max_devices) and fit_contention gives
// a and b per count against `cost`'s prediction for the step; a count with fewer than min_steps
// steps takes the previous count's values (count 1: a = 1, b = 0). Steps that started after an
// idle spell of 10 ms or more (idle_before) are fitted apart (idle_us below).
struct HostContentionFit {
  std::vector<double> factor;          // a, by device count 1..max_devices
  std::vector<double> fixed_us;        // b
  std::vector<std::int64_t> steps;     // steps in each count's bin
  std::vector<double> measured_over_table;  // sum of measured over sum of predicted (0: no steps)
  // GpuSpec::host_contention_fused_us: the mean of measured - a x table over the fused groups'
  // steps (micro-batches) without swap copies at that count; with fewer than min_steps, the
  // count below's fused value if it had enough, else fixed_us.
  std::vector<double> fused_fixed_us;
  std::vector<std::int64_t> fused_steps;
  // GpuSpec::host_idle_gap_us / host_idle_us: steps that started after their unit idled at least
  // idle_gap_us[i] (less than the next knot) took idle_us[i] beyond their kind's a x table + b, on
  // average (fewer than kMinIdleSteps: the shorter spell's value, the first 0). Those steps are
  // left out of a, b and the fused b.
  std::vector<double> idle_gap_us;
  std::vector<double> idle_us;
  std::vector<std::int64_t> idle_steps;
  // GpuSpec::host_contention_tokens: per count, per bin of token_knots (new tokens), the
  // independent steps' sum of (measured - b) over the sum of a x table (fewer than min_steps in a
  // bin: 1); empty when the profile has no step table. idle_us and the swap wait are fitted with
  // it (and the fused shape).
  std::vector<std::vector<double>> token_shape;
  std::vector<double> token_knots;  // GpuSpec::host_contention_token_knots: default_shape_token_knots()
  // GpuSpec::host_contention_fused_tokens: the same over the fused groups' micro-batches (not
  // after an idle spell), their (measured - the fused b) over a x table.
  std::vector<std::vector<double>> fused_token_shape;
  // GpuSpec::host_swap_us: the independent steps with swap copies (not after an idle spell) took
  // this much beyond swap_us_per_block x their blocks + a x shape x table + b, on average (the
  // simulator's price of a step with one paced copy, the devices counted as computing being
  // those of its forward; 0 with fewer than min_steps or below 0).
  double swap_extra_us = 0.0;
  std::int64_t swap_steps = 0;
};
HostContentionFit fit_host_contention(const CostModel& cost, std::int64_t num_layers,
                                      std::span<const std::vector<RecordedStep>> runs, double swap_us_per_block,
                                      std::int64_t max_devices, std::int64_t min_steps = 20);

// A fit's host terms into a GpuSpec (all of them: a, b, the fused b, both shapes and their knots,
// the idle spells and extras, the swap wait), which the simulator then reads.
void apply_host_fit(const HostContentionFit& fit, GpuSpec* spec);

// The host's speed over one window of steps (one policy's ~20 s of a bench run) against a host
// fitted over the whole run (`host`: apply_host_fit's spec): the window's steps' measured time
// over what the simulator's pricing of them on `host` gives (a x shape x table + b, a fused
// round's b, the idle and swap extras; link time left out of both). Above 1: the host was slower in this window. On a shared 2-core
// host the level drifts from one policy's window to the next (measured: the same policy's p50
// TTFT 353 and 675 ms in two windows of one bench run), while the shape of the contention curve
// needs the whole run's steps to be fitted well (a fused policy's window has few independent
// steps at each count).
double host_speed_ratio(const CostModel& cost, std::int64_t num_layers, const GpuSpec& host,
                        std::span<const RecordedStep> window, double swap_us_per_block);
// A host `ratio` times slower: every fitted host term (a, b, the fused rounds' b, the idle and
// swap extras) times ratio; the step table and links unchanged.
void scale_host_speed(GpuSpec* spec, double ratio);

GpuSpec fit_device_spec(const GpuSpec& start, const model::ModelConfig& model, std::span<const ProfileStep> steps,
                        std::vector<double> knots = default_table_knots());

}  // namespace kun::sim
