#include "tools/kunserve/bench_command.h"

#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/log.h"
#include "common/units.h"
#include "runtime/cluster_runtime.h"
#include "tools/bench_client/bench_client.h"
#include "tools/bench_client/plots.h"
#include "tools/kunserve/builtin_trace.h"
#include "tools/kunserve/in_process_replay.h"
#include "tools/kunserve/model_args.h"
#include "workload/generators.h"
#include "workload/report.h"
#include "workload/trace.h"

namespace kun::tools {
namespace {

struct BenchArgs {
  ModelArgs model;
  bool in_process = false;
  std::string host = "127.0.0.1";
  int port = 8000;
  std::string served_model = "kunserve";
  std::string policies = "recompute,swap,migrate,kunserve";
  std::int64_t devices = 4;
  std::int64_t kv_tokens_per_device = 1024;
  int threads = 1;
  std::int64_t block_size = 16;
  std::string trace = "builtin";  // builtin | PATH (Azure or BurstGPT CSV) | poisson | gamma | mmpp
  double rate_rps = 4.0;
  double cv = 4.0;
  double duration_s = 30.0;
  double time_scale = 8.0;     // arrivals compressed by this factor
  double length_scale = 0.05;  // prompt lengths scaled by this factor
  double output_scale = 1.0;   // output lengths scaled by this factor
  double upscale = 1.0;
  std::int64_t max_prompt = 512;
  std::int64_t max_output = 64;
  std::int64_t max_requests = 0;
  std::uint64_t seed = 0;
  double slo_ttft_ms = 1000.0;
  double slo_tpot_ms = 200.0;
  std::string json_path;
  std::string out_dir;
  double link_gbps = 0.0;
  std::int64_t link_latency_us = 0;
  std::int64_t monitor_period_ms = 500;
  std::int64_t max_waiting = 4096;
};

StatusOr<workload::Trace> load_trace(const BenchArgs& a, std::int64_t max_context) {
  workload::Trace trace;
  if (a.trace == "builtin") {
    KUN_ASSIGN_OR_RETURN(trace, workload::parse_azure_csv(builtin_azure_code_window_csv(), "azure-code-burst-window"));
  } else if (a.trace == "poisson" || a.trace == "gamma" || a.trace == "mmpp") {
    workload::Trace lengths_source;
    KUN_ASSIGN_OR_RETURN(lengths_source, workload::parse_azure_csv(builtin_azure_code_window_csv(), "azure-code-burst-window"));
    const auto duration_us = static_cast<std::int64_t>(a.duration_s * 1e6);
    if (a.trace == "poisson") {
      workload::PoissonSpec spec;
      spec.rate_rps = a.rate_rps;
      spec.duration_us = duration_us;
      spec.seed = a.seed;
      spec.lengths = workload::LengthModel::empirical(lengths_source);
      trace = workload::generate_poisson(spec);
    } else if (a.trace == "gamma") {
      workload::GammaSpec spec;
      spec.rate_rps = a.rate_rps;
      spec.cv = a.cv;
      spec.duration_us = duration_us;
      spec.seed = a.seed;
      spec.lengths = workload::LengthModel::empirical(lengths_source);
      trace = workload::generate_gamma(spec);
    } else {
      workload::MmppSpec spec;
      spec.duration_us = duration_us;
      spec.seed = a.seed;
      spec.lengths = workload::LengthModel::empirical(lengths_source);
      trace = workload::generate_mmpp(spec);
    }
  } else {
    KUN_ASSIGN_OR_RETURN(trace, workload::read_trace_csv(a.trace));
  }
  if (a.time_scale != 1.0 && a.trace != "poisson" && a.trace != "gamma" && a.trace != "mmpp") {
    trace = workload::time_compress(trace, a.time_scale);
  }
  if (a.upscale != 1.0) trace = workload::upscale(trace, a.upscale, a.seed);
  for (auto& r : trace.requests) {
    r.prompt_tokens = std::max<std::int32_t>(1, static_cast<std::int32_t>(r.prompt_tokens * a.length_scale));
    r.output_tokens = std::max<std::int32_t>(1, static_cast<std::int32_t>(r.output_tokens * a.output_scale));
  }
  trace = workload::clip_lengths(trace, static_cast<std::int32_t>(std::min<std::int64_t>(max_context, a.max_prompt + a.max_output)),
                                 static_cast<std::int32_t>(a.max_output));
  if (a.max_requests > 0 && static_cast<std::int64_t>(trace.size()) > a.max_requests) {
    trace.requests.resize(static_cast<std::size_t>(a.max_requests));
  }
  return trace;
}

std::vector<std::string> split_list(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (!item.empty()) out.push_back(item);
  }
  return out;
}

struct PolicyRun {
  workload::Report report;
  std::vector<workload::RequestRecord> records;
  std::vector<workload::GaugeSample> gauges;
  nlohmann::json extra;
};

StatusOr<PolicyRun> run_in_process(const BenchArgs& a, const model::WeightSource& weights, const std::string& policy_name,
                                   const workload::Trace& trace, const workload::SloSpec& slo) {
  const model::ModelConfig& config = weights.config();
  cluster::Policy policy;
  if (!cluster::parse_policy(policy_name, &policy)) {
    return invalid_argument("unknown policy '" + policy_name + "' (recompute | swap | migrate | kunserve)");
  }
  KUN_ASSIGN_OR_RETURN(DType dtype, a.model.device_dtype(config));
  runtime::ClusterOptions o;
  o.num_instances = a.devices;
  o.device.num_threads = a.threads;
  o.device.kv_block_size = a.block_size;
  o.device.weight_dtype = dtype;
  o.device.page_bytes = 256 * kKiB;
  kv::KvGeometry g{a.block_size, config.num_kv_heads, config.head_dim};
  const std::int64_t per_page = g.blocks_per_page(o.device.page_bytes);
  const std::int64_t kv_pages = ceil_div(g.blocks_for_tokens(a.kv_tokens_per_device) * config.num_layers, per_page);
  o.device.capacity_bytes = runtime::device_param_bytes(config, dtype, 0, config.num_layers, o.device.page_bytes) +
                            kv_pages * o.device.page_bytes;
  o.scheduler.max_num_batched_tokens = 512;
  o.scheduler.max_waiting_requests = a.max_waiting;
  o.scheduler.preemption = policy == cluster::Policy::kSwap ? engine::PreemptionMode::kSwap : engine::PreemptionMode::kRecompute;
  o.host_swap_blocks = policy == cluster::Policy::kSwap ? 4 * g.blocks_for_tokens(a.kv_tokens_per_device) * config.num_layers : 0;
  o.coordinator.policy = policy;
  o.coordinator.monitor.sample_period_us = a.monitor_period_ms * 1000;
  o.link.bandwidth_bytes_per_s = a.link_gbps * 1e9;
  o.link.latency_us = a.link_latency_us;
  o.model_name = a.model.display_name();
  SteadyClock clock;
  KUN_ASSIGN_OR_RETURN(auto rt, runtime::ClusterRuntime::create(o, weights, &clock));
  rt->start();
  ReplayOptions ro;
  ro.vocab_size = config.vocab_size;
  ro.seed = a.seed;
  ro.progress = true;
  ReplayResult rr = replay_in_process(*rt, trace, ro);
  rt->stop();
  PolicyRun run;
  run.report = workload::build_report(rr.records, policy_name, slo);
  run.records = std::move(rr.records);
  run.gauges = std::move(rr.gauges);
  const engine::ServingStats st = rt->stats();
  const runtime::TransferStats ts = rt->transfer_stats();
  run.extra["preemptions"] = st.num_preemptions;
  run.extra["drops"] = st.drops_total;
  run.extra["restores"] = st.restores_total;
  run.extra["drop_latency_ms"] = st.drop_latency_ms;
  run.extra["restore_latency_ms"] = st.restore_latency_ms;
  run.extra["kv_blocks_migrated"] = st.kv_blocks_exchanged_total;
  nlohmann::json bytes;
  for (int k = 0; k < static_cast<int>(runtime::TransferKind::kCount); ++k) {
    bytes[runtime::transfer_kind_name(static_cast<runtime::TransferKind>(k))] = ts.bytes[static_cast<std::size_t>(k)];
  }
  run.extra["transfer_bytes"] = bytes;
  run.extra["link_model"] = o.link.describe();
  run.extra["wall_s"] = rr.wall_s;
  return run;
}

StatusOr<PolicyRun> run_against_server(const BenchArgs& a, const workload::Trace& trace, const workload::SloSpec& slo,
                                       std::int64_t vocab) {
  bench::BenchClientConfig c;
  c.host = a.host;
  c.port = static_cast<std::uint16_t>(a.port);
  c.model = a.served_model;
  c.vocab_size = static_cast<std::int32_t>(vocab);
  c.seed = a.seed;
  c.metrics_interval_ms = 500;
  KUN_ASSIGN_OR_RETURN(bench::BenchResult br, bench::run_bench(c, trace));
  PolicyRun run;
  run.report = workload::build_report(br.records, a.policies, slo);
  run.records = std::move(br.records);
  run.gauges = std::move(br.gauges);
  run.extra["wall_s"] = static_cast<double>(br.wall_us) / 1e6;
  return run;
}

Status write_outputs(const BenchArgs& a, const std::vector<PolicyRun>& runs, const workload::Trace& trace) {
  if (!a.json_path.empty()) {
    nlohmann::json all = nlohmann::json::array();
    for (const auto& r : runs) {
      nlohmann::json j = workload::report_to_json(r.report);
      j["runtime"] = r.extra;
      j["trace"] = {{"name", trace.name}, {"requests", trace.size()}};
      all.push_back(j);
    }
    std::ofstream f(a.json_path);
    if (!f) return invalid_argument("cannot write " + a.json_path);
    f << (runs.size() == 1 ? all[0].dump(2) : all.dump(2)) << "\n";
  }
  if (a.out_dir.empty()) return ok_status();
  std::error_code ec;
  std::filesystem::create_directories(a.out_dir, ec);
  if (ec) return invalid_argument("cannot create " + a.out_dir + ": " + ec.message());
  std::vector<std::pair<std::string, std::string>> cdfs;
  for (const auto& r : runs) {
    const std::string base = a.out_dir + "/" + r.report.policy;
    const workload::Timeline tl = workload::build_timeline(r.records, r.gauges);
    KUN_RETURN_IF_ERROR(bench::write_text_file(base + "_timeline.csv", workload::timeline_to_csv(tl)));
    KUN_RETURN_IF_ERROR(bench::write_text_file(base + "_ttft_cdf.csv", bench::ttft_cdf_csv(r.records)));
    cdfs.emplace_back(r.report.policy, base + "_ttft_cdf.csv");
    const std::string script = base + "_timeline.gp";
    KUN_RETURN_IF_ERROR(bench::write_text_file(
        script, bench::timeline_plot_script(tl, base + "_timeline.csv", base + "_timeline.png", "policy " + r.report.policy)));
    Status s = bench::run_gnuplot(script);
    if (!s.ok()) {
      KUN_LOG(kWarn) << "plot skipped: " << s.to_string();
    }
  }
  const std::string cdf_script = a.out_dir + "/ttft_cdf.gp";
  KUN_RETURN_IF_ERROR(bench::write_text_file(cdf_script, bench::ttft_cdf_plot_script(cdfs, a.out_dir + "/ttft_cdf.png", "TTFT CDF")));
  Status s = bench::run_gnuplot(cdf_script);
  if (!s.ok()) {
    KUN_LOG(kWarn) << "plot skipped: " << s.to_string();
  }
  return ok_status();
}

Status run_bench_command(const BenchArgs& a) {
  KUN_ASSIGN_OR_RETURN(auto weights, a.model.open());
  const model::ModelConfig& config = weights->config();
  KUN_ASSIGN_OR_RETURN(workload::Trace trace, load_trace(a, config.max_position_embeddings));
  const workload::SloSpec slo{a.slo_ttft_ms, a.slo_tpot_ms};
  std::cout << "trace: " << trace.name << ", " << trace.size() << " requests over " << trace.span_us() / 1e6 << " s\n";
  std::vector<PolicyRun> runs;
  if (a.in_process) {
    for (const std::string& p : split_list(a.policies)) {
      std::cout << "policy " << p << ": " << a.devices << " in-process devices, KV for " << a.kv_tokens_per_device
                << " tokens each" << std::endl;
      KUN_ASSIGN_OR_RETURN(PolicyRun run, run_in_process(a, *weights, p, trace, slo));
      std::cout << "  " << run.extra.dump() << std::endl;
      runs.push_back(std::move(run));
    }
  } else {
    KUN_ASSIGN_OR_RETURN(PolicyRun run, run_against_server(a, trace, slo, config.vocab_size));
    runs.push_back(std::move(run));
  }
  std::vector<workload::Report> reports;
  for (const auto& r : runs) reports.push_back(r.report);
  std::cout << workload::format_report_table(reports) << std::flush;
  if (runs.size() > 1) {
    const auto& base = runs.front().report;
    for (const auto& r : runs) {
      std::printf("p99 TTFT %s / %s = %.2fx\n", base.policy.c_str(), r.report.policy.c_str(),
                  base.ttft_ms.p99 / r.report.ttft_ms.p99);
    }
  }
  return write_outputs(a, runs, trace);
}

}  // namespace

void add_bench_command(CLI::App* app, int* exit_code) {
  auto a = std::make_shared<BenchArgs>();
  CLI::App* cmd = app->add_subcommand("bench", "Replay a trace under one or more policies and report latencies");
  a->model.add_to(cmd);
  cmd->add_flag("--in-process", a->in_process, "run the policies in this process (no HTTP server)");
  cmd->add_option("--host", a->host, "server host (server mode)");
  cmd->add_option("--port", a->port, "server port (server mode)");
  cmd->add_option("--served-model", a->served_model, "model name sent to the server");
  cmd->add_option("--policies", a->policies, "comma-separated: recompute,swap,migrate,kunserve (in-process)");
  cmd->add_option("--devices", a->devices, "in-process devices (one instance each)");
  cmd->add_option("--kv-tokens-per-device", a->kv_tokens_per_device, "KV capacity per device in tokens");
  cmd->add_option("--threads", a->threads, "kernel threads per device");
  cmd->add_option("--block-size", a->block_size);
  cmd->add_option("--trace", a->trace, "builtin | PATH (Azure or BurstGPT CSV) | poisson | gamma | mmpp");
  cmd->add_option("--rate", a->rate_rps, "generated traces: requests/s");
  cmd->add_option("--cv", a->cv, "gamma trace: inter-arrival CV");
  cmd->add_option("--duration-s", a->duration_s, "generated traces: duration");
  cmd->add_option("--time-scale", a->time_scale, "compress arrivals by this factor");
  cmd->add_option("--length-scale", a->length_scale, "scale prompt lengths by this factor");
  cmd->add_option("--output-scale", a->output_scale, "scale output lengths by this factor (long generations)");
  cmd->add_option("--upscale", a->upscale, "TraceUpscaler-style request up-scaling factor");
  cmd->add_option("--max-prompt", a->max_prompt);
  cmd->add_option("--max-output", a->max_output);
  cmd->add_option("--max-requests", a->max_requests);
  cmd->add_option("--trace-seed", a->seed, "seed of generated traces, up-scaling and prompt token ids");
  cmd->add_option("--slo-ttft-ms", a->slo_ttft_ms);
  cmd->add_option("--slo-tpot-ms", a->slo_tpot_ms);
  cmd->add_option("--json", a->json_path, "write the report(s) as JSON");
  cmd->add_option("--out-dir", a->out_dir, "write timeline CSVs and PNG plots here");
  cmd->add_option("--link-gbps", a->link_gbps, "pace transfers at this bandwidth (0: off)");
  cmd->add_option("--link-latency-us", a->link_latency_us);
  cmd->add_option("--monitor-period-ms", a->monitor_period_ms, "demand sampling period");
  cmd->add_option("--max-waiting", a->max_waiting, "bounded waiting queue per instance");
  cmd->callback([a, exit_code] {
    Status s = run_bench_command(*a);
    if (!s.ok()) {
      std::cerr << "kunserve bench: " << s.to_string() << std::endl;
      *exit_code = 1;
    }
  });
}

}  // namespace kun::tools
