#include "tools/kunserve/bench_command.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/log.h"
#include "common/units.h"
#include "runtime/cluster_runtime.h"
#include "tools/bench_client/bench_client.h"
#include "tools/bench_client/plots.h"
#include "tools/kunserve/in_process_replay.h"
#include "tools/kunserve/cluster_args.h"
#include "tools/kunserve/model_args.h"
#include "tools/kunserve/trace_args.h"
#include "workload/report.h"
#include "workload/trace.h"

namespace kun::tools {
namespace {

struct BenchArgs {
  ModelArgs model;
  bool in_process = false;
  std::string host = "127.0.0.1";
  int port = 8000;
  std::string served_model;  // empty: the first id of the server's GET /v1/models
  std::string policies = "recompute,swap,migrate,kunserve";
  std::string api_key;
  TraceArgs trace;
  ClusterArgs cluster;
  double slo_ttft_ms = 1000.0;
  double slo_tpot_ms = 200.0;
  std::string json_path;
  std::string out_dir;
};

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
  std::vector<runtime::StepRecord> steps;  // in-process runs with --out-dir
};

StatusOr<PolicyRun> run_in_process(const BenchArgs& a, const model::WeightSource& weights, const std::string& policy_name,
                                   const workload::Trace& trace, const workload::SloSpec& slo) {
  const model::ModelConfig& config = weights.config();
  // "kunserve/<stale-kv>[/no-lookahead]": the #5 ablation runs the variants side by side.
  KUN_ASSIGN_OR_RETURN(cluster::PolicyVariant variant, cluster::parse_policy_variant(policy_name));
  const cluster::Policy policy = variant.policy;
  ClusterArgs cluster_args = a.cluster;
  if (variant.stale_kv) cluster_args.stale_kv = cluster::stale_kv_strategy_name(*variant.stale_kv);
  if (!variant.lookahead) cluster_args.balance_fused = false;
  KUN_ASSIGN_OR_RETURN(DType dtype, a.model.device_dtype(config));
  KUN_ASSIGN_OR_RETURN(DType kv_dtype, a.model.kv_dtype());
  KUN_ASSIGN_OR_RETURN(runtime::ClusterOptions o, cluster_args.build(config, dtype, kv_dtype, policy, a.model.display_name()));
  o.record_steps = !a.out_dir.empty();
  SteadyClock clock;
  KUN_ASSIGN_OR_RETURN(auto rt, runtime::ClusterRuntime::create(o, weights, &clock));
  rt->start();
  ReplayOptions ro;
  ro.vocab_size = config.vocab_size;
  ro.seed = a.trace.seed;
  ro.progress = true;
  const std::int64_t replay_begin_us = clock.now_us();
  ReplayResult rr = replay_in_process(*rt, trace, ro);
  rt->stop();
  PolicyRun run;
  run.steps = rt->step_records();
  run.report = workload::build_report(rr.records, policy_name, slo);
  run.records = std::move(rr.records);
  run.gauges = std::move(rr.gauges);
  const engine::ServingStats st = rt->stats();
  const runtime::TransferStats ts = rt->transfer_stats();
  run.extra["preemptions"] = st.num_preemptions;
  run.extra["drops"] = st.drops_total;
  run.extra["restores"] = st.restores_total;
  run.extra["grows"] = st.grows_total;  // regroups of live groups (runtime/cluster_regroup.cc)
  run.extra["shrinks"] = st.shrinks_total;
  run.extra["drop_latency_ms"] = st.drop_latency_ms;
  run.extra["drop_quiesce_ms"] = st.drop_quiesce_ms;  // per drop: the part spent waiting for steps in flight
  run.extra["drop_layers"] = st.drop_layers;          // per drop: layers freed (sim: GpuSpec::drop_layer_us)
  run.extra["restore_latency_ms"] = st.restore_latency_ms;
  run.extra["kv_blocks_migrated"] = st.kv_blocks_exchanged_total;
  const double stage_s = st.pipeline_stage_busy_s + st.pipeline_stage_idle_s;
  run.extra["fused_stage_busy_s"] = st.pipeline_stage_busy_s;
  run.extra["bubble_fraction"] = stage_s > 0.0 ? st.pipeline_stage_idle_s / stage_s : 0.0;
  nlohmann::json bytes;
  for (int k = 0; k < static_cast<int>(runtime::TransferKind::kCount); ++k) {
    bytes[runtime::transfer_kind_name(static_cast<runtime::TransferKind>(k))] = ts.bytes[static_cast<std::size_t>(k)];
  }
  run.extra["transfer_bytes"] = bytes;
  run.extra["bulk_chunks_deferred"] = ts.bulk_chunks_deferred;  // KV / weight chunks that let activations go first
  run.extra["link_model"] = o.link.describe();
  run.extra["host_link_model"] = o.host_link.describe();
  run.extra["wall_s"] = rr.wall_s;
  // When each transition happened, in seconds of the trace (kunserve simulate logs its own).
  nlohmann::json transitions = nlohmann::json::array();
  for (const runtime::ClusterEvent& ev : rt->events()) {
    transitions.push_back({{"kind", ev.kind}, {"group", ev.group}, {"t_s", static_cast<double>(ev.time_us - replay_begin_us) / 1e6}});
  }
  run.extra["transitions"] = transitions;
  if (policy == cluster::Policy::kKunServe) {
    run.extra["stale_kv"] = cluster::stale_kv_strategy_name(o.stale_kv);
    run.extra["lookahead"] = o.scheduler.balance_virtual_engines;
    run.extra["recomputed_tokens"] = st.recomputed_tokens_total;
    run.extra["transition_recomputed_tokens"] = st.transition_recomputed_tokens_total;
    // Requests running when their instance fused (stale) against the rest.
    std::set<std::int64_t> stale_ids;
    for (const runtime::ClusterEvent& ev : rt->events()) {
      for (RequestId id : ev.stale_requests) stale_ids.insert(id.value);
    }
    std::vector<workload::RequestRecord> stale, fresh;
    for (const auto& r : run.records) (stale_ids.count(r.front_door_id) != 0 ? stale : fresh).push_back(r);
    const auto summary = [&](const std::vector<workload::RequestRecord>& recs) {
      const workload::Report rep = workload::build_report(recs, policy_name, slo);
      // The engine's count of prefill tokens redone for these requests, and of those the ones
      // redone because a transition dropped their KV (the rest: recompute preemptions later on).
      std::int64_t recomputed = 0, by_transition = 0;
      for (const auto& r : recs) {
        recomputed += std::max<std::int64_t>(0, r.recomputed_tokens);
        by_transition += std::max<std::int64_t>(0, r.transition_recomputed_tokens);
      }
      return nlohmann::json{{"requests", recs.size()},
                            {"ttft_p99_ms", rep.ttft_ms.p99},
                            {"tpot_mean_ms", rep.tpot_ms.mean},
                            {"recomputed_tokens", recomputed},
                            {"transition_recomputed_tokens", by_transition}};
    };
    // Restores: how long the live gather ran while the group decoded, and the KV it moved, against
    // what the split still had to move stop-and-copy.
    std::vector<double> gather_ms;
    std::int64_t gathered_live = 0, gathered_at_split = 0;
    for (const runtime::ClusterEvent& ev : rt->events()) {
      if (ev.kind != "restore") continue;
      gather_ms.push_back(ev.gather_ms);
      gathered_live += ev.kv_blocks_gathered_live;
      gathered_at_split += ev.kv_blocks_exchanged;
    }
    run.extra["restore_gather_ms"] = gather_ms;
    run.extra["restore_kv_blocks_gathered_live"] = gathered_live;
    run.extra["restore_kv_blocks_gathered_at_split"] = gathered_at_split;
    run.extra["stale_requests"] = summary(stale);
    run.extra["new_requests"] = summary(fresh);
  }
  return run;
}

StatusOr<PolicyRun> run_against_server(const BenchArgs& a, const workload::Trace& trace, const workload::SloSpec& slo,
                                       std::int64_t vocab) {
  bench::BenchClientConfig c;
  c.host = a.host;
  c.port = static_cast<std::uint16_t>(a.port);
  c.api_key = a.api_key;
  c.model = a.served_model;
  if (c.model.empty()) {
    KUN_ASSIGN_OR_RETURN(c.model, bench::fetch_served_model(c));
    std::cout << "server model: " << c.model << std::endl;
  }
  c.vocab_size = static_cast<std::int32_t>(vocab);
  c.seed = a.trace.seed;
  c.metrics_interval_ms = 500;
  KUN_ASSIGN_OR_RETURN(bench::BenchResult br, bench::run_bench(c, trace));
  PolicyRun run;
  run.report = workload::build_report(br.records, a.policies, slo);
  run.records = std::move(br.records);
  run.gauges = std::move(br.gauges);
  run.extra["wall_s"] = static_cast<double>(br.wall_us) / 1e6;
  run.extra["metrics_samples"] = run.gauges.size();
  run.extra["metrics_poll_errors"] = br.metrics_errors;
  if (br.metrics_errors > 0) {
    std::cout << "warning: " << br.metrics_errors << " /metrics poll(s) failed" << std::endl;
  }
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
    std::string file_stem = r.report.policy;  // "kunserve/exchange" -> "kunserve_exchange"
    std::replace(file_stem.begin(), file_stem.end(), '/', '_');
    const std::string base = a.out_dir + "/" + file_stem;
    const workload::Timeline tl = workload::build_timeline(r.records, r.gauges);
    KUN_RETURN_IF_ERROR(bench::write_text_file(base + "_timeline.csv", workload::timeline_to_csv(tl)));
    KUN_RETURN_IF_ERROR(bench::write_text_file(base + "_ttft_cdf.csv", bench::ttft_cdf_csv(r.records)));
    cdfs.emplace_back(r.report.policy, base + "_ttft_cdf.csv");
    KUN_RETURN_IF_ERROR(bench::write_text_file(base + "_requests.csv", bench::requests_csv(r.records)));
    if (!r.steps.empty()) {
      // Every engine step, read back by sim::parse_recorded_steps (kunserve calibrate --fit-steps).
      std::string csv = "end_us,duration_us,unit_devices,first_instance,sequences,new_tokens,sampled,attended_pairs,swap_blocks\n";
      for (const runtime::StepRecord& st : r.steps) {
        csv += std::to_string(st.end_us) + "," + std::to_string(st.duration_us) + "," + std::to_string(st.unit_devices) + "," +
               std::to_string(st.first_instance) + "," + std::to_string(st.sequences) + "," + std::to_string(st.new_tokens) + "," +
               std::to_string(st.sampled) + "," + std::to_string(st.attended_pairs) + "," + std::to_string(st.swap_blocks) + "\n";
      }
      KUN_RETURN_IF_ERROR(bench::write_text_file(base + "_steps.csv", csv));
    }
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

// A failed or rejected request's reason, once per distinct message (at most 5), so a run that
// lost requests says why.
void print_distinct_errors(const std::vector<workload::RequestRecord>& records) {
  std::map<std::string, int> errors;
  for (const auto& r : records) {
    if (!r.error.empty()) ++errors[r.error];
  }
  int shown = 0;
  for (const auto& [message, count] : errors) {
    if (shown++ == 5) break;
    std::cout << "  " << count << " request(s) failed: " << message << std::endl;
  }
}

Status run_bench_command(const BenchArgs& a) {
  KUN_ASSIGN_OR_RETURN(auto weights, a.model.open());
  const model::ModelConfig& config = weights->config();
  KUN_ASSIGN_OR_RETURN(workload::Trace trace, a.trace.load(config.max_position_embeddings));
  const workload::SloSpec slo{a.slo_ttft_ms, a.slo_tpot_ms};
  std::cout << "trace: " << trace.name << ", " << trace.size() << " requests over " << trace.span_us() / 1e6 << " s\n";
  std::vector<PolicyRun> runs;
  if (a.in_process) {
    for (const std::string& p : split_list(a.policies)) {
      std::cout << "policy " << p << ": " << a.cluster.devices << " in-process devices, KV for " << a.cluster.kv_tokens_per_device
                << " tokens each" << std::endl;
      KUN_ASSIGN_OR_RETURN(PolicyRun run, run_in_process(a, *weights, p, trace, slo));
      std::cout << "  " << run.extra.dump() << std::endl;
      print_distinct_errors(run.records);
      runs.push_back(std::move(run));
    }
  } else {
    KUN_ASSIGN_OR_RETURN(PolicyRun run, run_against_server(a, trace, slo, config.vocab_size));
    print_distinct_errors(run.records);
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
  a->model.require_model = false;  // the in-process comparison runs a dummy model unless told otherwise
  a->model.add_to(cmd);
  cmd->add_flag("--in-process", a->in_process, "run the policies in this process (no HTTP server)");
  cmd->add_option("--host", a->host, "server host (server mode)");
  cmd->add_option("--port", a->port, "server port (server mode)");
  cmd->add_option("--served-model", a->served_model, "model name sent to the server (default: the first of its /v1/models)");
  cmd->add_option("--api-key", a->api_key, "server mode: the server's API key (sent as a Bearer token)")
      ->envname("KUNSERVE_API_KEY");
  cmd->add_option("--policies", a->policies, "comma-separated: recompute,swap,migrate,kunserve; kunserve/<stale-kv>[/no-lookahead] picks the stale-request strategy and turns off lookahead batching in fused groups (in-process)");
  a->trace.add_to(cmd);
  a->cluster.add_to(cmd);
  cmd->add_option("--slo-ttft-ms", a->slo_ttft_ms);
  cmd->add_option("--slo-tpot-ms", a->slo_tpot_ms);
  cmd->add_option("--json", a->json_path, "write the report(s) as JSON");
  cmd->add_option("--out-dir", a->out_dir, "write timeline CSVs, PNG plots and (in-process) every engine step (POLICY_steps.csv) here");
  cmd->callback([a, exit_code] {
    Status s = run_bench_command(*a);
    if (!s.ok()) {
      std::cerr << "kunserve bench: " << s.to_string() << std::endl;
      *exit_code = 1;
    }
  });
}

}  // namespace kun::tools
