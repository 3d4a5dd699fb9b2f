// `kunserve calibrate`: measures this machine's CPU device as the simulator's cost model sees it
// and writes a device profile (sim/device_profile.h) for `kunserve simulate --gpu FILE`.
//
// One real instance (runtime::SingleInstance: a virtual device with the bench's page size and
// kernel threads, the engine's scheduler, executor and event delivery) runs batches shaped like
// serving: decode batches of 1-32 sequences at short and long contexts, prefills of 4-500 tokens
// and a mixed stream of short requests. Every engine step is timed (wall time of run_step) and
// its sequences (context, new tokens, sampled) recorded; the cost model's constants are fitted
// to them. Then k = 1..--max-devices instances run the same decode loop at once, each on its own
// thread, as the in-process runtime's devices do, and the slowdown of a step against k = 1 is
// the profile's host contention (the devices share the host's cores and memory bandwidth).
#include <algorithm>
#include <condition_variable>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <limits>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>

#include "common/log.h"
#include "common/units.h"
#include "kv/kv_geometry.h"
#include "model/config.h"
#include "model/weight_source.h"
#include "runtime/cluster_runtime.h"
#include "runtime/single_instance.h"
#include "runtime/virtual_device.h"
#include "sim/device_profile.h"
#include "tools/kunserve/cluster_args.h"
#include "tools/kunserve/serve_command.h"

namespace kun::tools {
namespace {

struct CalibrateArgs {
  std::string preset = "llama-30m";
  int threads = 1;
  std::string kv_cache_dtype = "bf16";
  std::string out = "sim/profiles/cpu-llama-30m-t1.json";
  int max_devices = 4;
  int reps = 2;
  std::int64_t block_size = 16;
  // Requests running at once on each device while host contention is measured (2: a device whose
  // KV holds one or two requests). A profile meant to predict a bench should be measured at the
  // bench's --max-num-seqs: a step of 8 sequences loses more to a shared host than one of 2.
  std::int64_t contention_seqs = 2;
  // --fit-steps: instead of measuring, fit the host contention of --profile to the step logs of
  // real runs (`bench --in-process --out-dir`: POLICY_steps.csv) and write it to --out.
  std::vector<std::string> fit_steps;
  std::string profile;
  double swap_us_per_block = 0.0;
  std::string bench_json;  // with host_link_gbps: swap_us_per_block from the run's swap bytes
  double host_link_gbps = 0.0;
  // With --fit-steps: scale the fitted host to the speed it had over these steps (one policy's
  // window of the run, sim::host_speed_ratio).
  std::string window_steps;
};

std::string host_description() {
  std::ifstream f("/proc/cpuinfo");
  std::string line, model = "unknown CPU";
  while (std::getline(f, line)) {
    if (line.rfind("model name", 0) == 0) {
      const auto colon = line.find(':');
      if (colon != std::string::npos) model = line.substr(colon + 2);
      break;
    }
  }
  return model + ", " + std::to_string(std::thread::hardware_concurrency()) + " hardware threads";
}

StatusOr<std::unique_ptr<runtime::SingleInstance>> make_instance(const CalibrateArgs& a, const model::ModelConfig& config,
                                                                 const model::WeightSource& weights, DType kv_dtype,
                                                                 const Clock* clock, std::int64_t max_num_seqs = 64) {
  runtime::InstanceOptions opt;
  opt.device.num_threads = a.threads;
  opt.device.weight_dtype = config.dtype;
  opt.device.kv_dtype = kv_dtype;
  opt.device.kv_block_size = a.block_size;
  opt.device.page_bytes = kDevicePageBytes;
  const std::int64_t kv_tokens = 32 * 640;  // room for every batch below without preemption
  opt.scheduler.max_num_batched_tokens = 512;  // bench's default step budget
  opt.scheduler.max_num_seqs = max_num_seqs;
  runtime::fit_workspace_to(opt.scheduler, config, &opt.device);
  opt.device.capacity_bytes = runtime::device_param_bytes(config, config.dtype, 0, config.num_layers, opt.device.page_bytes) +
                              runtime::device_workspace_bytes(config, opt.device) +
                              runtime::kv_pages_for_tokens(config, opt.device, kv_tokens) * opt.device.page_bytes;
  return runtime::SingleInstance::create(opt, weights, clock);
}

engine::RequestSpec request(std::int64_t prompt, std::int64_t output, std::int64_t salt, std::int64_t vocab) {
  engine::RequestSpec spec;
  for (std::int64_t t = 0; t < prompt; ++t) spec.prompt_tokens.push_back(static_cast<std::int32_t>(3 + (salt * 97 + t * 13) % (vocab - 3)));
  spec.max_tokens = static_cast<std::int32_t>(std::max<std::int64_t>(1, output));
  spec.ignore_eos = true;
  return spec;
}

// Runs the engine until idle; records every step's work and wall time when `out` is given.
// Returns the summed wall time and the number of steps.
std::pair<double, std::int64_t> drain(engine::Engine& engine, std::vector<sim::ProfileStep>* out, std::vector<sim::SeqWork>* last,
                                      double* exec_us) {
  double total = 0.0;
  std::int64_t steps = 0;
  for (;;) {
    last->clear();
    *exec_us = 0.0;
    const auto t0 = std::chrono::steady_clock::now();
    const bool worked = engine.run_step();
    const double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
    if (!worked) break;
    if (last->empty()) continue;  // a step that only moved requests
    total += us;
    ++steps;
    if (out != nullptr) out->push_back({*last, us, *exec_us});
  }
  return {total, steps};
}

Status run_calibrate(const CalibrateArgs& a) {
  KUN_ASSIGN_OR_RETURN(model::ModelConfig config, model::preset_config(a.preset));
  DType kv_dtype = DType::kBF16;
  if (a.kv_cache_dtype == "f32") {
    kv_dtype = DType::kF32;
  } else if (a.kv_cache_dtype != "bf16") {
    return invalid_argument("--kv-cache-dtype must be bf16 or f32");
  }
  if (a.max_devices < 1 || a.reps < 1 || a.threads < 1 || a.contention_seqs < 1) {
    return invalid_argument("--max-devices, --reps, --threads and --contention-seqs must be >= 1");
  }
  auto weights = model::synthetic_weights(config, 0);
  SteadyClock clock;
  std::cout << "calibrating " << a.preset << " (" << dtype_name(config.dtype) << " weights, " << a.kv_cache_dtype << " KV), "
            << a.threads << " kernel thread(s) per device on " << host_description() << std::endl;

  std::vector<sim::ProfileStep> steps;
  {
    KUN_ASSIGN_OR_RETURN(auto inst, make_instance(a, config, *weights, kv_dtype, &clock));
    engine::Engine& engine = inst->engine();
    std::vector<sim::SeqWork> last;
    double exec = 0.0;
    engine.set_step_observer([&](const engine::StepPlan& plan, const engine::StepResult& r) {
      for (const auto& s : plan.sequences) last.push_back({s.start_pos, static_cast<std::int64_t>(s.tokens.size()), s.sample});
      exec += static_cast<double>(r.duration_us);
    });
    std::int64_t salt = 0;
    const auto submit = [&](std::int64_t prompt, std::int64_t output) {
      auto r = engine.submit(request(prompt, output, salt++, config.vocab_size), nullptr);
      KUN_CHECK(r.ok()) << r.status().to_string();
    };
    // Warm-up (page faults, caches), not recorded.
    for (int i = 0; i < 4; ++i) submit(16, 16);
    drain(engine, nullptr, &last, &exec);
    for (int rep = 0; rep < a.reps; ++rep) {
      // Decode batches at short contexts (the serving demo's range) and long ones (attention).
      for (std::int64_t batch : {1, 2, 4, 8, 16, 32}) {
        for (std::int64_t prompt : {16, 24}) {
          for (std::int64_t i = 0; i < batch; ++i) submit(prompt, 40);
          drain(engine, &steps, &last, &exec);
        }
      }
      for (std::int64_t batch : {1, 4, 8}) {
        for (std::int64_t i = 0; i < batch; ++i) submit(400, 24);
        drain(engine, &steps, &last, &exec);
      }
      // Prefills alone.
      for (std::int64_t prompt : {4, 8, 32, 64, 128, 256, 500}) {
        submit(prompt, 2);
        drain(engine, &steps, &last, &exec);
      }
      // A mixed stream: waves of short requests joining running ones (prefill + decode steps).
      for (int wave = 0; wave < 12; ++wave) {
        for (int i = 0; i < 6; ++i) submit(1 + (wave * 7 + i * 5) % 30, 1 + (wave * 11 + i * 3) % 32);
        for (int s = 0; s < 6; ++s) {
          last.clear();
          exec = 0.0;
          const auto t0 = std::chrono::steady_clock::now();
          if (!engine.run_step()) break;
          const double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
          if (!last.empty()) steps.push_back({last, us, exec});
        }
      }
      drain(engine, &steps, &last, &exec);
    }
  }

  // The step table first: the contention runs below are read against it.
  sim::GpuSpec start;
  start.name = "cpu-" + a.preset + "-t" + std::to_string(a.threads);
  start.peak_flops = 50e9;
  start.hbm_bytes_per_s = 10e9;
  start.gemm_flops_eff = 1.0;
  start.gemm_bw_eff = 1.0;
  start.elem_bw_eff = 1.0;
  start.gemm_overhead_us = 2.0;
  start.elem_overhead_us = 1.0;
  start.attn_flops_eff = 0.5;
  start.attn_bw_eff = 0.5;
  start.attn_overhead_us = 2.0;
  start.step_overhead_us = 100.0;
  start.dtype_bytes = dtype_bytes(config.dtype);
  start.page_bytes = kDevicePageBytes;
  start.memory_bytes = runtime::device_param_bytes(config, config.dtype, 0, config.num_layers, kDevicePageBytes) +
                       1024 * config.num_layers * config.kv_bytes_per_token_per_layer(kv_dtype);
  start.measured_model = a.preset;
  sim::DeviceProfile p;
  p.spec = sim::fit_device_spec(start, config, steps);
  const sim::CostModel fitted(p.spec, config);

  // Host contention, through the in-process cluster runtime itself (its engine, stage and link
  // threads): k devices each serving the same requests (contention_seqs running at a time, as a
  // device whose KV holds one or two requests), every step recorded (ClusterOptions::
  // record_steps). While all k devices are serving (until the first one runs out of work), a
  // step's executor time against the table's prediction for it is fitted as a x table + b by
  // least squares (each step counts by its time, so the fit holds the mean: the total the
  // simulator charges): a is how much slower the shared cores compute, b the fixed time a woken
  // device thread waits for a core. Prompts of 8-64 tokens give prefill steps beside the decode
  // steps, so that the two are told apart.
  const int per_device = static_cast<int>(12 * a.contention_seqs) * a.reps;
  const auto contention_request = [&](int r) { return request(8 + (r * 13) % 57, 24, r, config.vocab_size); };
  {
    // For reference only: the same requests through a single instance stepped from this thread.
    KUN_ASSIGN_OR_RETURN(auto inst, make_instance(a, config, *weights, kv_dtype, &clock, a.contention_seqs));
    engine::Engine& engine = inst->engine();
    std::vector<sim::SeqWork> last;
    double exec = 0.0;
    for (int r = 0; r < 4; ++r) KUN_CHECK(engine.submit(contention_request(r), nullptr).ok());
    drain(engine, nullptr, &last, &exec);  // warm
    const auto t0 = std::chrono::steady_clock::now();
    for (int r = 0; r < per_device; ++r) KUN_CHECK(engine.submit(contention_request(r), nullptr).ok());
    drain(engine, nullptr, &last, &exec);
    const double alone_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::cout << "  one instance stepped directly, " << per_device << " requests: " << std::fixed << std::setprecision(2)
              << alone_s << " s" << std::defaultfloat << std::endl;
  }
  // k = 1 is measured first and again last (both count: the host's load drifts).
  std::vector<int> counts;
  for (int k = 1; k <= a.max_devices; ++k) counts.push_back(k);
  counts.push_back(1);
  // Per k: (predicted, measured) executor microseconds of the steps taken while all k served.
  std::vector<std::vector<std::pair<double, double>>> samples(static_cast<std::size_t>(a.max_devices) + 1);
  for (const int k : counts) {
    ClusterArgs ca;
    ca.devices = k;
    ca.threads = a.threads;
    ca.block_size = a.block_size;
    ca.kv_tokens_per_device = 1024;
    ca.max_num_seqs = a.contention_seqs;
    KUN_ASSIGN_OR_RETURN(runtime::ClusterOptions o,
                         ca.build(config, config.dtype, kv_dtype, cluster::Policy::kRecompute, a.preset));
    o.router.policy = cluster::RoutePolicy::kRoundRobin;  // the same requests on every device
    o.record_steps = true;
    KUN_ASSIGN_OR_RETURN(auto rt, runtime::ClusterRuntime::create(o, *weights, &clock));
    rt->start();
    std::mutex mu;
    std::condition_variable cv;
    std::int64_t open = 0;
    const auto t0 = std::chrono::steady_clock::now();
    for (int r = 0; r < per_device; ++r) {
      for (int d = 0; d < k; ++d) {
        {
          std::lock_guard<std::mutex> lock(mu);
          ++open;
        }
        auto id = rt->submit(contention_request(r), [&](const engine::TokenEvent& ev) {
          if (!ev.finished) return;
          std::lock_guard<std::mutex> lock(mu);
          --open;
          cv.notify_all();
        });
        KUN_CHECK(id.ok()) << id.status().to_string();
      }
    }
    {
      std::unique_lock<std::mutex> lock(mu);
      cv.wait(lock, [&] { return open == 0; });
    }
    const double wall_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    rt->stop();
    const std::vector<runtime::StepRecord> recs = rt->step_records();
    std::vector<std::int64_t> last_end(static_cast<std::size_t>(k), 0);
    for (const runtime::StepRecord& r : recs) {
      auto& e = last_end[static_cast<std::size_t>(r.first_instance)];
      e = std::max(e, r.end_us);
    }
    std::int64_t all_serving_until = std::numeric_limits<std::int64_t>::max();
    for (std::int64_t e : last_end) all_serving_until = std::min(all_serving_until, e);
    std::int64_t used = 0;
    for (const runtime::StepRecord& r : recs) {
      if (r.end_us > all_serving_until || r.sequences == 0) continue;
      sim::CostModel::BatchTerms b;
      b.tokens = r.new_tokens;
      b.sampled = r.sampled;
      b.pairs = static_cast<double>(r.attended_pairs);
      samples[static_cast<std::size_t>(k)].emplace_back(fitted.step_us(b, config.num_layers, true, true),
                                                        static_cast<double>(r.duration_us));
      ++used;
    }
    std::cout << "  " << k << " device(s) at once, " << per_device << " requests each: " << std::fixed << std::setprecision(2)
              << wall_s << " s, " << used << " steps while all served" << std::defaultfloat << std::endl;
  }
  std::vector<double> contention, contention_us;
  std::cout << "  host contention, a step's time = a x table + b at k devices:";
  for (int k = 1; k <= a.max_devices; ++k) {
    const sim::ContentionFit fit = sim::fit_contention(samples[static_cast<std::size_t>(k)]);
    const double slope = fit.factor, intercept = fit.fixed_us;
    contention.push_back(slope);
    contention_us.push_back(intercept);
    const double decode = fitted.table_us(1);
    std::cout << " k=" << k << ": a " << std::fixed << std::setprecision(2) << slope << ", b " << std::setprecision(0) << intercept
              << " us (a 1-token step " << std::setprecision(2) << (slope * decode + intercept) / decode << "x)";
  }
  std::cout << std::defaultfloat << std::endl;

  p.spec.host_contention = contention;
  p.spec.host_contention_us = contention_us;
  p.preset = a.preset;
  p.threads = a.threads;
  p.weight_dtype = std::string(dtype_name(config.dtype));
  p.kv_dtype = a.kv_cache_dtype;
  p.host = host_description();
  p.steps = steps;
  p.fit = sim::fit_error(p.spec, config, steps);
  const sim::GpuSpec& g = p.spec;
  std::cout << "fitted over " << steps.size() << " steps: engine overhead " << g.step_overhead_us
            << " us per step; executor time at 1 / 8 / 32 / 128 new tokens " << std::fixed << std::setprecision(0)
            << fitted.table_us(1) << " / " << fitted.table_us(8) << " / " << fitted.table_us(32) << " / " << fitted.table_us(128)
            << " us; per further sampled token " << g.sample_us << " us; attention " << std::setprecision(3) << g.attn_pair_us
            << " us per (query, key) pair" << std::defaultfloat << std::endl;
  std::cout << "step time error |predicted - measured| / measured: median " << p.fit.median * 100 << " %, p90 "
            << p.fit.p90 * 100 << " %, bias " << p.fit.mean_signed * 100 << " %" << std::endl;
  KUN_RETURN_IF_ERROR(sim::save_device_profile(p, a.out));
  std::cout << "wrote " << a.out << std::endl;
  return ok_status();
}

}  // namespace

std::string read_whole_file(const std::string& path, Status* status) {
  std::ifstream f(path, std::ios::binary);
  if (!f) {
    *status = invalid_argument("cannot read '" + path + "'");
    return {};
  }
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// The host as a real run saw it: the profile's step table stays, its host contention is fitted
// to the runs' own steps (sim::fit_host_contention), one curve for all of them.
Status run_fit_contention(const CalibrateArgs& a) {
  if (a.profile.empty()) return invalid_argument("--fit-steps needs --profile (the step table to keep)");
  KUN_ASSIGN_OR_RETURN(sim::DeviceProfile p, sim::load_device_profile(a.profile));
  KUN_ASSIGN_OR_RETURN(model::ModelConfig config, sim::sim_model_config(p.spec.measured_model));
  const auto read_steps = [](const std::string& path) -> StatusOr<std::vector<sim::RecordedStep>> {
    Status read;
    const std::string text = read_whole_file(path, &read);
    KUN_RETURN_IF_ERROR(read);
    return sim::parse_recorded_steps(text, path);
  };
  std::vector<std::vector<sim::RecordedStep>> runs;
  for (const std::string& path : a.fit_steps) {
    KUN_ASSIGN_OR_RETURN(std::vector<sim::RecordedStep> steps, read_steps(path));
    runs.push_back(std::move(steps));
  }
  double swap_us = a.swap_us_per_block;
  if (!a.bench_json.empty()) {
    Status read;
    const std::string text = read_whole_file(a.bench_json, &read);
    KUN_RETURN_IF_ERROR(read);
    const nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded()) return invalid_argument("'" + a.bench_json + "' is not JSON");
    double swap_bytes = 0;
    double drop_work_ms = 0;
    std::int64_t layers_dropped = 0;
    for (const nlohmann::json& r : j.is_array() ? j : nlohmann::json::array({j})) {
      const nlohmann::json rt = r.value("runtime", nlohmann::json::object());
      const nlohmann::json t = rt.value("transfer_bytes", nlohmann::json::object());
      swap_bytes += t.value("swap_in", 0.0) + t.value("swap_out", 0.0);
      // A drop's time per layer freed: its latency beyond waiting for its sources' steps in
      // flight, over the layers its members freed.
      const auto latency = rt.value("drop_latency_ms", std::vector<double>{});
      const auto quiesce = rt.value("drop_quiesce_ms", std::vector<double>{});
      const auto dropped = rt.value("drop_layers", std::vector<std::int64_t>{});
      if (quiesce.size() != latency.size() || dropped.size() != latency.size()) continue;  // an older bench's report
      for (std::size_t i = 0; i < latency.size(); ++i) {
        drop_work_ms += std::max(0.0, latency[i] - quiesce[i]);
        layers_dropped += dropped[i];
      }
    }
    // The run's swap copy time per layer block: its swap bytes over the logs' swap blocks, at the
    // host link's pace.
    std::int64_t blocks = 0;
    for (const auto& run : runs) {
      for (const sim::RecordedStep& r : run) blocks += r.swap_blocks;
    }
    if (blocks > 0 && a.host_link_gbps > 0) swap_us = swap_bytes / static_cast<double>(blocks) / (a.host_link_gbps * 1e9) * 1e6;
    if (layers_dropped > 0) {
      p.spec.drop_layer_us = drop_work_ms * 1000.0 / static_cast<double>(layers_dropped);
      std::cout << "drops: " << std::fixed << std::setprecision(0) << p.spec.drop_layer_us << " us per layer freed ("
                << layers_dropped << " layers)" << std::defaultfloat << "\n";
    }
  }
  const sim::CostModel table(p.spec, config);
  const auto max_devices = std::max<std::int64_t>(4, static_cast<std::int64_t>(p.spec.host_contention.size()));
  const sim::HostContentionFit fit = sim::fit_host_contention(table, config.num_layers, runs, swap_us, max_devices);
  std::cout << "| devices computing | steps | mean measured / table | fitted a | fitted b us | a 1-token step, x table "
               "| fused steps | fused round b us |\n"
            << "|---|---|---|---|---|---|---|---|\n";
  const double one = table.table_us(1);
  for (std::size_t k = 0; k < fit.factor.size(); ++k) {
    std::cout << "| " << k + 1 << " | " << fit.steps[k] << " | " << std::fixed << std::setprecision(2)
              << fit.measured_over_table[k] << " | " << fit.factor[k] << " | " << std::setprecision(0) << fit.fixed_us[k]
              << " | " << std::setprecision(2) << (fit.factor[k] * one + fit.fixed_us[k]) / one << " | " << fit.fused_steps[k]
              << " | " << std::setprecision(0) << fit.fused_fixed_us[k] << " |" << std::defaultfloat << "\n";
  }
  std::cout << std::flush;
  std::cout << "\n| idle before the step, ms | steps | extra us |\n|---|---|---|\n";
  for (std::size_t i = 0; i < fit.idle_gap_us.size(); ++i) {
    std::cout << "| >= " << fit.idle_gap_us[i] / 1000.0 << " | " << fit.idle_steps[i] << " | " << std::fixed << std::setprecision(0)
              << fit.idle_us[i] << " |" << std::defaultfloat << "\n";
  }
  std::cout << std::flush;
  if (!fit.token_shape.empty()) {
    std::cout << "\n| devices computing | step-time multiplier by new tokens (" ;
    for (std::size_t i = 0; i < fit.token_knots.size(); ++i) std::cout << (i ? " / " : "") << ">=" << fit.token_knots[i];
    std::cout << ") |\n|---|---|\n";
    for (std::size_t k = 0; k < fit.token_shape.size(); ++k) {
      std::cout << "| " << k + 1 << " | ";
      for (std::size_t i = 0; i < fit.token_shape[k].size(); ++i) {
        std::cout << (i ? " / " : "") << std::fixed << std::setprecision(2) << fit.token_shape[k][i] << std::defaultfloat;
      }
      std::cout << " |\n";
    }
    std::cout << std::flush;
  }
  sim::apply_host_fit(fit, &p.spec);
  std::cout << "\nsteps with swap copies: " << fit.swap_steps << ", " << std::fixed << std::setprecision(0)
            << fit.swap_extra_us << " us each beyond their link time, a x table and b" << std::defaultfloat << "\n";
  if (!a.window_steps.empty()) {
    KUN_ASSIGN_OR_RETURN(std::vector<sim::RecordedStep> window, read_steps(a.window_steps));
    const double ratio = sim::host_speed_ratio(table, config.num_layers, p.spec, window, swap_us);
    std::cout << "host speed over " << a.window_steps << ": " << std::fixed << std::setprecision(3) << ratio
              << "x the run's fit (its host terms scaled by it)" << std::defaultfloat << "\n";
    sim::scale_host_speed(&p.spec, ratio);
  }
  return sim::save_device_profile(p, a.out);
}

void add_calibrate_command(CLI::App* app, int* exit_code) {
  auto a = std::make_shared<CalibrateArgs>();
  CLI::App* cmd = app->add_subcommand(
      "calibrate", "Measure this machine's CPU device and write a device profile for `simulate --gpu FILE`");
  cmd->add_option("--preset", a->preset, "model preset (synthetic weights) to measure with");
  cmd->add_option("--threads", a->threads, "kernel threads per device (bench's --threads)");
  cmd->add_option("--kv-cache-dtype", a->kv_cache_dtype, "bf16 | f32");
  cmd->add_option("--block-size", a->block_size, "KV block size in tokens");
  cmd->add_option("--out", a->out, "profile file to write");
  cmd->add_option("--max-devices", a->max_devices, "measure host contention with up to this many devices at once");
  cmd->add_option("--reps", a->reps, "repetitions of the step set");
  cmd->add_option("--contention-seqs", a->contention_seqs,
                  "requests running at once on each device while host contention is measured (a bench's --max-num-seqs)");
  cmd->add_option("--fit-steps", a->fit_steps,
                  "measure nothing: fit --profile's host contention to these step logs of real runs "
                  "(bench --in-process --out-dir: POLICY_steps.csv) and write it to --out");
  cmd->add_option("--profile", a->profile, "with --fit-steps: the profile whose step table is kept");
  cmd->add_option("--swap-us-per-block", a->swap_us_per_block,
                  "with --fit-steps: time a step spends copying one swapped layer block (not computing)");
  cmd->add_option("--bench-json", a->bench_json, "with --fit-steps: the runs' bench report, from which a drop's time "
                  "per layer freed is derived, and with --host-link-gbps the swap copy time per block");
  cmd->add_option("--window-steps", a->window_steps,
                  "with --fit-steps: scale the fitted host to its speed over this step log (one policy's window)");
  cmd->add_option("--host-link-gbps", a->host_link_gbps, "with --bench-json: the runs' --host-link-gbps");
  cmd->callback([a, exit_code] {
    Status s = a->fit_steps.empty() ? run_calibrate(*a) : run_fit_contention(*a);
    if (!s.ok()) {
      std::cerr << "kunserve calibrate: " << s.to_string() << std::endl;
      *exit_code = 1;
    }
  });
}

}  // namespace kun::tools
