// Effect of growing fused groups (cluster::Planner::plan_growth) in the simulator: at a few loads,
// p99 TTFT of recompute against kunserve with groups capped at 2 members (the planner before
// growth) and with groups allowed to grow 2 -> 4 -> 8, all on the same trace in one run.
// Figures are ratios recompute / kunserve (higher: kunserve better).
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "sim/cluster_sim.h"
#include "workload/generators.h"

namespace {

using namespace kun;

struct Row {
  double p99_ttft_ms = 0, mean_tpot_ms = 0;
  std::int64_t drops = 0, grows = 0, preemptions = 0;
};

Row run(const sim::SimConfig& c, const workload::Trace& t) {
  auto rep = sim::run_simulation(c, t);
  if (!rep.ok()) {
    std::fprintf(stderr, "simulation failed: %s\n", rep.status().to_string().c_str());
    std::exit(1);
  }
  return Row{rep->report.ttft_ms.p99, rep->report.tpot_ms.mean, rep->counters.drops, rep->counters.grows,
             rep->counters.preemptions};
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"group growth in the simulator: recompute vs kunserve (groups capped at 2) vs kunserve (2, 4, 8)"};
  std::string model = "llama-2-13b", gpu = "a100-80gb", link = "nvlink-a100";
  std::int64_t instances = 8, duration_s = 60;
  std::vector<double> rates = {6, 8, 10, 12};
  double cv = 3.0, prompt_mean = 1500, output_mean = 300;
  std::uint64_t seed = 1;
  bool sustained_check = false;
  app.add_option("--sim-model", model);
  app.add_option("--gpu", gpu);
  app.add_option("--link", link);
  app.add_option("--instances", instances);
  app.add_option("--duration-s", duration_s);
  app.add_option("--rates", rates, "requests/s, one run per rate")->delimiter(',');
  app.add_option("--cv", cv, "gamma inter-arrival CV");
  app.add_option("--prompt-mean", prompt_mean);
  app.add_option("--output-mean", output_mean);
  app.add_option("--seed", seed);
  app.add_flag("--sustained-check", sustained_check,
               "instead: kunserve drops with the sustained-overload vote off vs on (monitor.sustained_overload_samples 0 vs 6)");
  CLI11_PARSE(app, argc, argv);

  std::printf("%s on %lld x %s, gamma cv %.1f, %lld s, prompt ~%.0f output ~%.0f tokens\n", model.c_str(),
              static_cast<long long>(instances), gpu.c_str(), cv, static_cast<long long>(duration_s), prompt_mean,
              output_mean);
  std::printf("%6s | %10s %10s %10s | %9s %9s | %12s %12s | %s\n", "rps", "p99 rec", "p99 cap2", "p99 grow",
              "rec/cap2", "rec/grow", "drops cap2", "drops+grows", "wall s");
  for (double rate : rates) {
    const auto t0 = std::chrono::steady_clock::now();
    workload::GammaSpec spec;
    spec.rate_rps = rate;
    spec.cv = cv;
    spec.duration_us = duration_s * 1'000'000;
    spec.lengths = workload::LengthModel::lognormal(prompt_mean, 0.6, output_mean, 0.6);
    spec.seed = seed;
    const workload::Trace trace = workload::clip_lengths(workload::generate_gamma(spec), 4096, 2048);
    sim::SimConfig c;
    c.gpu = gpu;
    c.link = link;
    c.model_name = model;
    c.num_instances = instances;
    c.scheduler.max_num_seqs = 256;
    c.scheduler.max_num_batched_tokens = 2048;
    c.scheduler.max_model_len = 4096;
    c.seed = seed;
    if (sustained_check) {
      c.policy = cluster::Policy::kKunServe;
      c.coordinator.monitor.sustained_overload_samples = 0;
      const Row off = run(c, trace);
      c.coordinator.monitor.sustained_overload_samples = 6;
      const Row on = run(c, trace);
      std::printf("%6.1f | sustained vote off: drops %lld p99 %.0f ms | on: drops %lld grows %lld p99 %.0f ms\n", rate,
                  static_cast<long long>(off.drops), off.p99_ttft_ms, static_cast<long long>(on.drops),
                  static_cast<long long>(on.grows), on.p99_ttft_ms);
      continue;
    }
    c.policy = cluster::Policy::kRecompute;
    const Row rec = run(c, trace);
    c.policy = cluster::Policy::kKunServe;
    c.coordinator.planner.max_degree = 2;
    const Row cap2 = run(c, trace);
    c.coordinator.planner.max_degree = 0;
    const Row grow = run(c, trace);
    const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("%6.1f | %10.0f %10.0f %10.0f | %9.2f %9.2f | %12lld %6lld+%-5lld | %.1f\n", rate, rec.p99_ttft_ms,
                cap2.p99_ttft_ms, grow.p99_ttft_ms, rec.p99_ttft_ms / cap2.p99_ttft_ms, rec.p99_ttft_ms / grow.p99_ttft_ms,
                static_cast<long long>(cap2.drops), static_cast<long long>(grow.drops), static_cast<long long>(grow.grows),
                wall);
    std::fflush(stdout);
  }
  return 0;
}
