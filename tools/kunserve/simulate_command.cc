#include <algorithm>
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "sim/cluster_sim.h"
#include "tools/kunserve/serve_command.h"
#include "tools/kunserve/trace_args.h"
#include "workload/report.h"

namespace kun::tools {
namespace {

struct SimulateArgs {
  TraceArgs trace;
  std::string gpu = "a100-80gb";
  std::string link = "nvlink-a100";
  std::string model = "llama-2-7b";
  std::int64_t instances = 4;
  std::string policies = "recompute,swap,migrate,kunserve";
  std::string json_path;
  std::string timeline_prefix;
  double slo_ttft_ms = 1000.0;
  double slo_tpot_ms = 200.0;
  std::string stale_kv = "exchange";
};

Status run_simulate(SimulateArgs a) {
  // Simulated GPUs serve real-length prompts: no length scaling unless asked.
  KUN_ASSIGN_OR_RETURN(workload::Trace trace, a.trace.load(1 << 20));
  std::cout << "trace: " << trace.name << ", " << trace.size() << " requests over " << trace.span_us() / 1e6 << " s; "
            << a.instances << " x " << a.gpu << ", " << a.model << ", link " << a.link << std::endl;
  std::vector<workload::Report> reports;
  nlohmann::json all = nlohmann::json::array();
  std::stringstream ss(a.policies);
  std::string p;
  while (std::getline(ss, p, ',')) {
    if (p.empty()) continue;
    sim::SimConfig c;
    c.gpu = a.gpu;
    c.link = a.link;
    c.model_name = a.model;
    c.num_instances = a.instances;
    c.label = p;
    // As the bench: "kunserve/<stale-kv>[/no-lookahead]" (default strategy: --stale-kv).
    KUN_ASSIGN_OR_RETURN(cluster::PolicyVariant variant, cluster::parse_policy_variant(p));
    c.policy = variant.policy;
    if (!cluster::parse_stale_kv_strategy(a.stale_kv, &c.stale_kv)) {
      return invalid_argument("--stale-kv must be recompute, remote-attention or exchange, not '" + a.stale_kv + "'");
    }
    if (variant.stale_kv) c.stale_kv = *variant.stale_kv;
    if (!variant.lookahead) c.scheduler.balance_virtual_engines = false;
    c.seed = a.trace.seed;
    c.slo = workload::SloSpec{a.slo_ttft_ms, a.slo_tpot_ms};
    KUN_ASSIGN_OR_RETURN(sim::SimReport r, sim::run_simulation(c, trace));
    reports.push_back(r.report);
    all.push_back(r.to_json());
    if (!a.timeline_prefix.empty()) {
      std::string stem = p;  // "kunserve/exchange" -> "kunserve_exchange"
      std::replace(stem.begin(), stem.end(), '/', '_');
      std::ofstream f(a.timeline_prefix + stem + "_timeline.csv");
      f << workload::timeline_to_csv(r.timeline);
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
  CLI::App* cmd = app->add_subcommand("simulate", "Run the same policies on a modelled GPU cluster (virtual time)");
  a->trace.add_to(cmd);
  cmd->add_option("--gpu", a->gpu, "a100-80gb | h100-80gb | h200");
  cmd->add_option("--link", a->link, "nvlink-a100 | nvlink | pcie4 | pcie5 | ib | ib-hdr");
  cmd->add_option("--sim-model", a->model, "llama-2-7b | llama-2-13b | llama-2-70b | llama-3-8b | qwen2.5-7b | a preset");
  cmd->add_option("--instances", a->instances);
  cmd->add_option("--policies", a->policies,
                  "comma-separated: recompute,swap,migrate,kunserve; kunserve/<stale-kv>[/no-lookahead] picks the "
                  "stale-request strategy (and turns off lookahead batching in fused groups)");
  cmd->add_option("--stale-kv", a->stale_kv,
                  "kunserve's requests running at a drop: recompute | remote-attention | exchange (default; "
                  "a kunserve/<stale-kv> policy overrides it)");
  cmd->add_option("--json", a->json_path);
  cmd->add_option("--timeline-prefix", a->timeline_prefix, "write <prefix><policy>_timeline.csv");
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
