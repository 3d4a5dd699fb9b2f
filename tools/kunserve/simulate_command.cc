// `kunserve simulate`: the policies on a modelled cluster in virtual time (sim/), with the cluster
// options of `bench --in-process` (shared ClusterArgs), shipped scenarios, load sweeps (ratios
// per point, JSON / CSV, a gnuplot PNG of p99 TTFT against load) and a speed report.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "common/log.h"
#include "sim/cluster_sim.h"
#include "tools/bench_client/plots.h"
#include "tools/kunserve/cluster_args.h"
#include "tools/kunserve/serve_command.h"
#include "tools/kunserve/trace_args.h"
#include "workload/report.h"

namespace kun::tools {
namespace {

// A shipped configuration: model, hardware and trace shaping of one experiment.
struct Scenario {
  std::string name;
  std::string about;
  std::string model;
  std::string gpu;
  std::string link;
  std::int64_t tp = 1;
  std::int64_t instances = 8;
  double time_scale = 1.0;
  double length_scale = 1.0;
  double output_scale = 1.0;
  std::int64_t max_prompt = 4096;
  std::int64_t max_output = 2048;
  std::string sweep;  // default load sweep
  std::int64_t max_num_seqs = 256;  // vLLM's default: memory, not this cap, bounds the batch
};

std::vector<Scenario> scenarios() {
  // The builtin Azure code window (compiled in), made decode-heavy (prompts / 4, outputs x 32 or
  // x 64: its outputs are short, median 13 tokens) so that KV memory, not prefill compute, is what
  // runs out; the load axis is arrival compression (time-scale).
  return {
      {"llama70b-tp4-a100x8",
       "Llama-2-70B, TP 4 per instance, 2 instances on 8 A100-80GB (NVLink), outputs x64 (up to 3K tokens): the artifact's main target", "llama-2-70b",
       "a100-80gb", "nvlink-a100", 4, 2, 1.0, 0.25, 64.0, 1024, 3072, "time-scale=0.2,0.3,0.4,0.6,0.8", 512},
      {"llama13b-a100x8", "Llama-2-13B, 8 single-GPU instances on A100-80GB (NVLink)", "llama-2-13b", "a100-80gb",
       "nvlink-a100", 1, 8, 1.0, 0.25, 32.0, 4096, 2048, "time-scale=2,2.5,3,3.5,4,5,6,7,8,10"},
      {"llama13b-h100x8",
       "Llama-2-13B, 8 single-GPU instances on H100-80GB (NVLink): the 13B scenario on the paper's GPU (same memory, "
       "about 3x the compute)",
       "llama-2-13b", "h100-80gb", "nvlink", 1, 8, 1.0, 0.25, 32.0, 4096, 2048, "time-scale=3,4,5,6,7,8,10,12,14"},
      {"cot-llama2-7b-a100x8",
       "long generations (chain of thought): Llama-2-7B, 8 A100-80GB, prompts / 4, outputs x64 (up to 3K tokens)",
       "llama-2-7b", "a100-80gb", "nvlink-a100", 1, 8, 1.0, 0.25, 64.0, 1024, 3072, "time-scale=6,8,10,12,16"},
  };
}

struct SimulateArgs {
  TraceArgs trace;
  ClusterArgs cluster;
  CLI::App* cmd = nullptr;  // to ask which options were given
  std::string scenario;
  std::string gpu = "a100-80gb";
  std::string link = "nvlink-a100";
  std::string model = "llama-2-7b";
  std::int64_t tp = 1;
  std::string policies = "recompute,swap,migrate,kunserve";
  std::string json_path;
  std::string timeline_prefix;
  double slo_ttft_ms = 1000.0;
  double slo_tpot_ms = 200.0;
  std::string sweep;         // "time-scale=a,b,c" or "upscale=a,b,c"
  std::string sweep_out = "sweep";  // prefix of the sweep's .json / .csv / .png
  bool sweep_capped = true;  // also run kunserve with groups capped at 2 members
  bool sweep_ideal = true;   // also run the memory bound "ideal" (see make_config)
  bool speed = false;        // print simulated seconds per wall second per run
  bool live_stats = false;   // SimConfig::live_stats
  bool scenario_max_num_seqs = false;  // the scenario set max_num_seqs
  // Cluster policy thresholds (the artifact's defaults; cluster/README.md).
  double planner_target = 0.95;         // a plan covers when demand <= this x fused capacity
  double drop_threshold = 0.95;         // drop-eligible demand
  double restore_threshold = 0.5;       // restore / shrink-eligible demand
  std::int64_t sustained_samples = 6;   // sustained-overload vote (0: off)
  bool given(const std::string& option) const { return cmd->get_option(option)->count() > 0; }
  // --gpu names a measured device profile (a CPU, `kunserve calibrate`): the simulated cluster is
  // the in-process runtime's, so every cluster option takes bench's value, given or default.
  bool device_profile() const { return gpu.size() > 5 && gpu.substr(gpu.size() - 5) == ".json"; }
  bool cluster_option(const std::string& option) const { return device_profile() || given(option); }
};

// Applies a scenario's settings to every option the user did not give.
Status apply_scenario(SimulateArgs& a) {
  if (a.scenario.empty()) return ok_status();
  for (const Scenario& s : scenarios()) {
    if (s.name != a.scenario) continue;
    if (!a.given("--sim-model")) a.model = s.model;
    if (!a.given("--gpu")) a.gpu = s.gpu;
    if (!a.given("--link")) a.link = s.link;
    if (!a.given("--tp")) a.tp = s.tp;
    if (!a.given("--devices")) a.cluster.devices = s.instances;
    if (!a.given("--max-num-seqs")) {
      a.cluster.max_num_seqs = s.max_num_seqs;
      a.scenario_max_num_seqs = true;
    }
    if (!a.given("--time-scale")) a.trace.time_scale = s.time_scale;
    if (!a.given("--length-scale")) a.trace.length_scale = s.length_scale;
    if (!a.given("--output-scale")) a.trace.output_scale = s.output_scale;
    if (!a.given("--max-prompt")) a.trace.max_prompt = s.max_prompt;
    if (!a.given("--max-output")) a.trace.max_output = s.max_output;
    if (a.sweep == "default") a.sweep = s.sweep;
    std::cout << "scenario " << s.name << ": " << s.about << std::endl;
    return ok_status();
  }
  std::string known;
  for (const Scenario& s : scenarios()) known += " " + s.name;
  return invalid_argument("unknown --scenario '" + a.scenario + "' (known:" + known + "; or list)");
}

// The SimConfig of one policy run: sim defaults, then the cluster options the user gave.
StatusOr<sim::SimConfig> make_config(const SimulateArgs& a, const std::string& policy) {
  sim::SimConfig c;
  c.gpu = a.gpu;
  c.link = a.link;
  c.model_name = a.model;
  c.tp = a.tp;
  c.num_instances = a.cluster.devices;
  c.label = policy;
  // "kunserve/<stale-kv>[/no-lookahead]" as the bench; "kunserve@g2" caps groups at 2 members.
  // "ideal": what no memory-elastic policy can beat with this memory arithmetic: recompute on
  // instances that each hold, from the start and at no cost, the KV a member of the largest
  // allowed group holds (a fused group of 8 grows a 13B member's pool x1.51), with no pipeline,
  // transition or exchange cost.
  std::string p = policy == "ideal" ? "recompute" : policy;
  std::vector<std::int64_t> cap;
  if (const auto at = p.find("@g"); at != std::string::npos) {
    cap = {std::stoll(p.substr(at + 2))};
    p = p.substr(0, at);
  }
  KUN_ASSIGN_OR_RETURN(cluster::PolicyVariant variant, cluster::parse_policy_variant(p));
  c.policy = variant.policy;
  const ClusterArgs& k = a.cluster;
  if (!cluster::parse_stale_kv_strategy(k.stale_kv, &c.stale_kv)) {
    return invalid_argument("--stale-kv must be recompute, remote-attention or exchange, not '" + k.stale_kv + "'");
  }
  if (variant.stale_kv) c.stale_kv = *variant.stale_kv;
  if (a.cluster_option("--balance-fused")) c.scheduler.balance_virtual_engines = k.balance_fused;
  if (!variant.lookahead) c.scheduler.balance_virtual_engines = false;
  if (a.cluster_option("--kv-tokens-per-device")) c.kv_tokens_per_instance = k.kv_tokens_per_device;
  if (a.cluster_option("--block-size")) c.block_size_tokens = k.block_size;
  if (a.cluster_option("--max-batched-tokens")) c.scheduler.max_num_batched_tokens = k.max_batched_tokens;
  if (a.cluster_option("--max-num-seqs") || a.scenario_max_num_seqs) c.scheduler.max_num_seqs = k.max_num_seqs;
  if (a.cluster_option("--max-waiting")) c.scheduler.max_waiting_requests = k.max_waiting;
  if (a.cluster_option("--link-gbps")) c.link_gbps = k.link_gbps;
  c.link_latency_us = static_cast<double>(k.link_latency_us);
  if (a.cluster_option("--host-link-gbps")) c.host_link_gbps = k.host_link_gbps;
  c.host_link_latency_us = static_cast<double>(k.host_link_latency_us);
  if (a.cluster_option("--monitor-period-ms")) {
    c.timeline_period_us = k.monitor_period_ms * 1000;
    c.coordinator.monitor.sample_period_us = k.monitor_period_ms * 1000;
  }
  if (a.cluster_option("--group-sizes")) c.allowed_degrees = k.group_sizes;
  if (!cap.empty()) c.allowed_degrees = cap;
  c.coordinator.planner.target_utilization = a.planner_target;
  c.coordinator.planner.grow_groups = k.grow_groups;  // shared with bench and serve (ClusterArgs)
  c.coordinator.planner.shrink_groups = k.shrink_groups;
  c.coordinator.planner.trend_horizon_samples = k.trend_horizon_samples;
  c.coordinator.planner.trend_samples = k.trend_samples;
  c.coordinator.planner.grow_on_trend = k.grow_on_trend;
  c.coordinator.monitor.drop_demand_threshold = a.drop_threshold;
  c.coordinator.monitor.restore_demand_threshold = a.restore_threshold;
  c.coordinator.monitor.sustained_overload_samples = a.sustained_samples;
  if (a.device_profile()) {
    // The measured table holds for the model it was measured with: that model by default.
    KUN_ASSIGN_OR_RETURN(sim::GpuSpec spec, sim::gpu_spec(a.gpu));
    if (!a.given("--sim-model") && !spec.measured_model.empty()) c.model_name = spec.measured_model;
  }
  c.live_stats = a.live_stats;
  c.exchange_requests_per_round = k.exchange_per_round;
  c.restore_gather_timeout_us = k.restore_gather_timeout_ms * 1000;
  c.seed = a.trace.seed;
  c.slo = workload::SloSpec{a.slo_ttft_ms, a.slo_tpot_ms};
  // Prompts up to the model's context (4,096 was clipped silently before).
  auto mc = sim::sim_model_config(c.model_name);
  if (mc.ok() && mc->max_position_embeddings > 0) c.scheduler.max_model_len = mc->max_position_embeddings;
  if (policy == "ideal") {
    KUN_ASSIGN_OR_RETURN(std::unique_ptr<sim::ClusterSim> probe, sim::ClusterSim::create(c));
    const sim::MemoryPlan plan = probe->memory_plan();
    std::int64_t largest = 1;
    for (std::int64_t g : c.allowed_degrees.empty() ? cluster::ClusterShape{}.allowed_degrees : c.allowed_degrees) {
      if (g <= c.num_instances) largest = std::max(largest, g);
    }
    for (const sim::MemoryPlan::Growth& g : plan.growth) {
      if (g.group_size == largest) c.kv_tokens_per_instance = g.kv_tokens / g.group_size;
    }
  }
  return c;
}

std::vector<std::string> split_list(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string p;
  while (std::getline(ss, p, ',')) {
    if (!p.empty()) out.push_back(p);
  }
  return out;
}

struct PolicyRun {
  std::string policy;
  sim::SimReport report;
  double wall_s = 0.0;
};

StatusOr<std::vector<PolicyRun>> run_policies(const SimulateArgs& a, const workload::Trace& trace,
                                              const std::vector<std::string>& policies) {
  std::vector<PolicyRun> runs;
  for (const std::string& p : policies) {
    KUN_ASSIGN_OR_RETURN(sim::SimConfig c, make_config(a, p));
    c.record_steps = !a.timeline_prefix.empty();
    const auto t0 = std::chrono::steady_clock::now();
    KUN_ASSIGN_OR_RETURN(sim::SimReport r, sim::run_simulation(c, trace));
    const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (a.speed) {
      const std::ios_base::fmtflags flags = std::cout.flags();  // a sweep prints its table in fixed
      const std::streamsize precision = std::cout.precision();
      const double simulated = static_cast<double>(r.end_us) / 1e6;
      std::cout << "speed " << p << ": " << std::fixed << std::setprecision(1) << simulated << " simulated s in "
                << std::setprecision(2) << wall << " wall s = " << std::setprecision(0) << simulated / wall
                << " simulated s per wall s; " << static_cast<double>(r.instants) / wall << " instants/s, "
                << static_cast<double>(r.counters.steps) / wall << " steps/s" << std::endl;
      std::cout.flags(flags);
      std::cout.precision(precision);
    }
    runs.push_back({p, std::move(r), wall});
  }
  return runs;
}

double ratio(double a, double b) { return b > 0.0 ? a / b : 0.0; }

Status run_sweep(const SimulateArgs& a, std::vector<std::string> policies) {
  const auto eq = a.sweep.find('=');
  if (eq == std::string::npos) return invalid_argument("--sweep takes time-scale=a,b,c or upscale=a,b,c");
  const std::string axis = a.sweep.substr(0, eq);
  if (axis != "time-scale" && axis != "upscale") return invalid_argument("--sweep axis must be time-scale or upscale");
  std::vector<double> points;
  for (const std::string& v : split_list(a.sweep.substr(eq + 1))) points.push_back(std::stod(v));
  if (points.empty()) return invalid_argument("--sweep needs at least one value");
  if (std::find(policies.begin(), policies.end(), "kunserve") == policies.end()) policies.push_back("kunserve");
  if (std::find(policies.begin(), policies.end(), "recompute") == policies.end()) policies.insert(policies.begin(), "recompute");
  if (a.sweep_capped) policies.push_back("kunserve@g2");
  if (a.sweep_ideal) policies.push_back("ideal");
  nlohmann::json out = nlohmann::json::array();
  std::ostringstream csv;
  csv << axis << ",policy,requests,rate_rps,ttft_p50_ms,ttft_p99_ms,tpot_mean_ms,drops,ratio_ttft_p99_vs_kunserve,"
               "ratio_tpot_mean_vs_kunserve\n";
  struct Row {
    double x = 0, rate = 0;
    std::vector<double> p99;  // per policy
    double ratio_rec = 0, ratio_rec_capped = 0;
    double ratio_rec_ideal = 0;  // recompute over the ideal: the most any policy could give
  };
  std::vector<Row> rows;
  std::cout << std::fixed << std::setprecision(2);
  for (double x : points) {
    TraceArgs t = a.trace;
    (axis == "time-scale" ? t.time_scale : t.upscale) = x;
    KUN_ASSIGN_OR_RETURN(workload::Trace trace, t.load(1 << 20));
    KUN_ASSIGN_OR_RETURN(std::vector<PolicyRun> runs, run_policies(a, trace, policies));
    const double rate = trace.span_us() > 0 ? static_cast<double>(trace.size()) / (static_cast<double>(trace.span_us()) / 1e6) : 0;
    const workload::Report* kun = nullptr;
    const workload::Report* capped = nullptr;
    const workload::Report* ideal = nullptr;
    for (const auto& r : runs) {
      if (r.policy == "kunserve") kun = &r.report.report;
      if (r.policy == "kunserve@g2") capped = &r.report.report;
      if (r.policy == "ideal") ideal = &r.report.report;
    }
    Row row{x, rate, {}, 0, 0, 0};
    std::cout << axis << " " << x << " (" << rate << " req/s):";
    for (const auto& r : runs) {
      const workload::Report& rep = r.report.report;
      const double rt = ratio(rep.ttft_ms.p99, kun->ttft_ms.p99);
      const double rp = ratio(rep.tpot_ms.mean, kun->tpot_ms.mean);
      row.p99.push_back(rep.ttft_ms.p99);
      if (r.policy == "recompute") {
        row.ratio_rec = rt;
        row.ratio_rec_capped = capped != nullptr ? ratio(rep.ttft_ms.p99, capped->ttft_ms.p99) : 0.0;
        row.ratio_rec_ideal = ideal != nullptr ? ratio(rep.ttft_ms.p99, ideal->ttft_ms.p99) : 0.0;
      }
      csv << x << "," << r.policy << "," << trace.size() << "," << rate << "," << rep.ttft_ms.p50 << "," << rep.ttft_ms.p99
          << "," << rep.tpot_ms.mean << "," << r.report.counters.drops << "," << rt << "," << rp << "\n";
      out.push_back({{axis, x},
                     {"policy", r.policy},
                     {"rate_rps", rate},
                     {"ttft_p50_ms", rep.ttft_ms.p50},
                     {"ttft_p99_ms", rep.ttft_ms.p99},
                     {"tpot_mean_ms", rep.tpot_ms.mean},
                     {"drops", r.report.counters.drops},
                     {"ratio_ttft_p99_vs_kunserve", rt},
                     {"ratio_tpot_mean_vs_kunserve", rp}});
      if (r.policy != "kunserve") std::cout << "  " << r.policy << "/kunserve p99 TTFT " << rt << "x TPOT " << rp << "x;";
    }
    std::cout << "  kunserve p99 TTFT " << kun->ttft_ms.p99 << " ms" << std::endl;
    rows.push_back(row);
  }
  // Width of the load range (in the axis' units, between neighbouring points) where kunserve's
  // p99 TTFT is at least 10x lower than recompute's, and the same with groups capped at 2.
  const auto band = [&](bool use_capped) {
    double width = 0.0;
    for (std::size_t i = 0; i + 1 < rows.size(); ++i) {
      const double r0 = use_capped ? rows[i].ratio_rec_capped : rows[i].ratio_rec;
      const double r1 = use_capped ? rows[i + 1].ratio_rec_capped : rows[i + 1].ratio_rec;
      if (r0 >= 10.0 && r1 >= 10.0) width += rows[i + 1].rate - rows[i].rate;
    }
    return width;
  };
  double peak = 0.0, bound = 0.0;
  for (const Row& r : rows) {
    peak = std::max(peak, r.ratio_rec);
    bound = std::max(bound, r.ratio_rec_ideal);
  }
  std::cout << "recompute/kunserve p99 TTFT: peak " << peak << "x; 10x band " << band(false) << " req/s wide";
  if (a.sweep_capped) std::cout << " (groups capped at 2: " << band(true) << " req/s)";
  if (a.sweep_ideal) std::cout << "; recompute/ideal (the bound of any policy with this memory) peaks at " << bound << "x";
  std::cout << std::defaultfloat << std::endl;
  {
    std::ofstream f(a.sweep_out + ".json");
    if (!f) return invalid_argument("cannot write " + a.sweep_out + ".json");
    f << nlohmann::json{{"axis", axis},
                        {"points", out},
                        {"peak_recompute_over_kunserve_ttft_p99", peak},
                        {"band_10x_rps", band(false)},
                        {"band_10x_rps_capped_g2", band(true)},
                        {"peak_recompute_over_ideal_ttft_p99", bound}}
                 .dump(2)
      << "\n";
  }
  std::ofstream(a.sweep_out + ".csv") << csv.str();
  // p99 TTFT against load, one line per policy (log scale).
  std::ofstream dat(a.sweep_out + ".dat");
  for (const Row& r : rows) {
    dat << r.rate;
    for (double v : r.p99) dat << " " << std::max(v, 1.0);
    dat << "\n";
  }
  dat.close();
  std::ofstream gp(a.sweep_out + ".gp");
  gp << "set terminal png noenhanced size 900,560\nset output '" << a.sweep_out << ".png'\nset logscale y\n"
     << "set xlabel 'load (requests/s)'\nset ylabel 'p99 TTFT (ms)'\nset key top left\nset grid\nplot ";
  for (std::size_t i = 0; i < policies.size(); ++i) {
    gp << (i ? ", " : "") << "'" << a.sweep_out << ".dat' using 1:" << i + 2 << " with linespoints title '" << policies[i] << "'";
  }
  gp << "\n";
  gp.close();
  const std::string cmd = "gnuplot '" + a.sweep_out + ".gp' 2>/dev/null";
  if (std::system(cmd.c_str()) == 0) {
    std::cout << "wrote " << a.sweep_out << ".json, .csv, .png" << std::endl;
  } else {
    std::cout << "wrote " << a.sweep_out << ".json, .csv (gnuplot not available: no .png; " << a.sweep_out
              << ".gp is the script)" << std::endl;
  }
  return ok_status();
}

Status run_simulate(SimulateArgs a) {
  if (a.scenario == "list") {
    for (const Scenario& s : scenarios()) {
      std::cout << std::left << std::setw(24) << s.name << s.about << "\n" << std::setw(24) << "" << "sweep: " << s.sweep
                << "\n";
    }
    return ok_status();
  }
  KUN_RETURN_IF_ERROR(apply_scenario(a));
  if (a.sweep == "default") return invalid_argument("--sweep default needs a --scenario");
  // Simulated GPUs serve real-length prompts: no length scaling unless asked.
  KUN_ASSIGN_OR_RETURN(workload::Trace trace, a.trace.load(1 << 20));
  std::cout << "trace: " << trace.name << ", " << trace.size() << " requests over " << trace.span_us() / 1e6 << " s; "
            << a.cluster.devices << " x " << (a.tp > 1 ? "TP" + std::to_string(a.tp) + " " : "") << a.gpu << ", "
            << a.model << ", link " << a.link << std::endl;
  const std::vector<std::string> policies = split_list(a.policies);
  {
    // The memory arithmetic, from the first policy's configuration.
    KUN_ASSIGN_OR_RETURN(sim::SimConfig c, make_config(a, policies.empty() ? "recompute" : policies.front()));
    KUN_ASSIGN_OR_RETURN(auto s, sim::ClusterSim::create(c));
    std::cout << s->memory_plan().to_text() << std::flush;
  }
  if (!a.sweep.empty()) {
    // A sweep runs many simulations: the coordinator's per-transition info lines drown the table.
    if (std::getenv("KUN_LOG_LEVEL") == nullptr) set_log_level(LogLevel::kWarn);
    return run_sweep(a, policies);
  }
  KUN_ASSIGN_OR_RETURN(std::vector<PolicyRun> runs, run_policies(a, trace, policies));
  std::vector<workload::Report> reports;
  nlohmann::json all = nlohmann::json::array();
  for (const PolicyRun& r : runs) {
    reports.push_back(r.report.report);
    all.push_back(r.report.to_json());
    if (r.report.counters.clipped > 0) {
      std::cout << r.policy << ": " << r.report.counters.clipped << " requests clipped to the model's context" << std::endl;
    }
    if (!a.timeline_prefix.empty()) {
      std::string stem = r.policy;  // "kunserve/exchange" -> "kunserve_exchange"
      std::replace(stem.begin(), stem.end(), '/', '_');
      std::ofstream f(a.timeline_prefix + stem + "_timeline.csv");
      f << workload::timeline_to_csv(r.report.timeline);
      KUN_RETURN_IF_ERROR(bench::write_text_file(a.timeline_prefix + stem + "_requests.csv", bench::requests_csv(r.report.records)));
      KUN_RETURN_IF_ERROR(bench::write_text_file(a.timeline_prefix + stem + "_steps.csv", sim::recorded_steps_csv(r.report.steps)));
    }
  }
  std::cout << workload::format_report_table(reports) << std::flush;
  if (!a.json_path.empty()) {
    std::ofstream f(a.json_path);
    if (!f) return invalid_argument("cannot write " + a.json_path);
    f << all.dump(2) << "\n";
  }
  return ok_status();
}

}  // namespace

void add_simulate_command(CLI::App* app, int* exit_code) {
  auto a = std::make_shared<SimulateArgs>();
  a->trace.length_scale = 1.0;
  a->trace.max_prompt = 8192;
  a->trace.max_output = 2048;
  a->trace.time_scale = 1.0;
  // Sim defaults, not the CPU runtime's: only the options given change the simulated cluster.
  a->cluster.devices = 4;
  CLI::App* cmd = app->add_subcommand("simulate", "Run the same policies on a modelled GPU cluster (virtual time)");
  a->cmd = cmd;
  a->trace.add_to(cmd);
  a->cluster.add_to(cmd);
  cmd->add_option("--scenario", a->scenario, "a shipped scenario (list: print them); options given override it");
  cmd->add_option("--gpu", a->gpu,
                  "a100-80gb | h100-80gb | h200 | a measured device profile FILE.json (kunserve calibrate; e.g. "
                  "sim/profiles/cpu-llama-30m-t1.json: then every cluster option takes bench's default)");
  cmd->add_option("--link", a->link, "nvlink-a100 | nvlink | pcie4 | pcie5 | ib | ib-hdr");
  cmd->add_option("--sim-model", a->model, "llama-2-7b | llama-2-13b | llama-2-70b | llama-3-8b | qwen2.5-7b | a preset");
  cmd->add_option("--tp", a->tp, "tensor-parallel GPUs per instance (1, 2, 4, 8)");
  cmd->add_option("--policies", a->policies,
                  "comma-separated: recompute,swap,migrate,kunserve; kunserve/<stale-kv>[/no-lookahead] picks the "
                  "stale-request strategy (and turns off lookahead batching in fused groups); kunserve@g2 caps groups "
                  "at 2 members");
  cmd->add_option("--sweep", a->sweep,
                  "load sweep: time-scale=a,b,c or upscale=a,b,c (default: the scenario's); writes per-policy ratios "
                  "to kunserve, <sweep-out>.json/.csv/.png");
  cmd->add_option("--sweep-out", a->sweep_out, "file prefix of the sweep's outputs");
  cmd->add_option("--sweep-capped", a->sweep_capped, "sweeps also run kunserve with groups capped at 2 members");
  cmd->add_option("--sweep-ideal", a->sweep_ideal,
                  "sweeps also run 'ideal': recompute on instances that each hold the KV of a member of the largest "
                  "group from the start, at no cost (the p99 TTFT no memory-elastic policy can beat)");
  cmd->add_option("--planner-target", a->planner_target,
                  "a group covers when its demand <= this x its fused capacity (artifact: 0.95; lower forms larger "
                  "groups)")
      ->check(CLI::Range(0.05, 1.0));
  cmd->add_option("--drop-threshold", a->drop_threshold, "demand at which a sample votes drop (artifact: 0.95)")
      ->check(CLI::Range(0.05, 2.0));
  cmd->add_option("--restore-threshold", a->restore_threshold,
                  "demand at or below which a sample votes restore or shrink (artifact: 0.5)")
      ->check(CLI::Range(0.0, 1.0));
  cmd->add_option("--sustained-overload-samples", a->sustained_samples,
                  "consecutive samples at the drop threshold with requests waiting that vote drop (0: off)")
      ->check(CLI::NonNegativeNumber);
  cmd->add_flag("--live-stats", a->live_stats,
                "route and tick on the live schedulers (before session 9), not on what the engines last published "
                "as the runtime does");
  cmd->add_flag("--speed", a->speed, "print simulated seconds per wall second, instants/s and steps/s per run");
  cmd->add_option("--json", a->json_path);
  cmd->add_option("--timeline-prefix", a->timeline_prefix, "write <prefix><policy>_timeline.csv, <prefix><policy>_requests.csv (one row per request) and <prefix><policy>_steps.csv (every step, the columns of bench --out-dir)");
  cmd->add_option("--slo-ttft-ms", a->slo_ttft_ms);
  cmd->add_option("--slo-tpot-ms", a->slo_tpot_ms);
  cmd->callback([a, exit_code] {
    Status s = run_simulate(*a);
    if (!s.ok()) {
      std::cerr << "kunserve simulate: " << s.to_string() << std::endl;
      *exit_code = 1;
    }
  });
}

}  // namespace kun::tools
