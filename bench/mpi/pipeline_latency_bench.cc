// Added per-token latency of a 4-stage fused pipeline under MPI against in-process, in one run
// (issue 12):
//
//   mpirun -np 5 --oversubscribe --bind-to none pipeline_latency_bench [--tokens 64] [--repeats 3]
//
// Rank 0 builds the same 4-instance cluster twice per repeat, alternating: once with every
// device in its own process (InProcessFleet), once over ranks 1..4 (MpiFleet, one process per
// device). In each it fuses all 4 instances into one group (a forced drop: every device keeps a
// quarter of the layers, g = 4 stages) and decodes one request alone, so each token crosses the
// 4 stages in turn: front end -> stage 1 -> ... -> stage 4 -> front end. The figure is the median
// inter-token latency (first token excluded) over the request, the median of that over repeats,
// per runtime; reported with their difference (the latency MPI adds per token) and ratio.
#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <iostream>
#include <mutex>
#include <vector>

#include <CLI/CLI.hpp>

#include "common/units.h"
#include "model/config.h"
#include "model/weight_source.h"
#include "runtime/cluster_runtime.h"
#include "runtime/mpi/mpi_fleet.h"
#include "runtime/mpi/mpi_session.h"
#include "runtime/mpi/mpi_transport.h"

namespace kun::bench {
namespace {

using runtime::ClusterOptions;
using runtime::ClusterRuntime;

struct Args {
  std::string preset = "tiny";
  std::int64_t tokens = 64;
  std::int64_t prompt = 32;
  int repeats = 3;
  int threads = 1;
};

ClusterOptions cluster_options(const model::ModelConfig& c, const Args& a) {
  ClusterOptions o;
  o.num_instances = 4;
  o.device.kv_block_size = 16;
  o.device.weight_dtype = c.dtype;
  o.device.num_threads = a.threads;
  o.device.page_bytes = 64 * 1024;
  kv::KvGeometry g{16, c.num_kv_heads, c.head_dim};
  const std::int64_t per_page = g.blocks_per_page(o.device.page_bytes);
  const std::int64_t blocks = 2 * ceil_div(a.prompt + a.tokens, 16) + 8;
  o.device.capacity_bytes = runtime::device_param_bytes(c, c.dtype, 0, c.num_layers, o.device.page_bytes) +
                            runtime::device_workspace_bytes(c, o.device) +
                            ceil_div(blocks * c.num_layers, per_page) * o.device.page_bytes;
  o.scheduler.max_num_batched_tokens = 256;
  o.coordinator.policy = cluster::Policy::kKunServe;
  o.run_policy_thread = false;
  return o;
}

double median(std::vector<double> v) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Median inter-token latency (ms) of one request decoded alone through a fused group of 4.
StatusOr<double> fused_itl_ms(const model::WeightSource& w, ClusterOptions o, const Args& a) {
  SteadyClock clock;
  KUN_ASSIGN_OR_RETURN(auto rt, ClusterRuntime::create(o, w, &clock));
  rt->start();
  KUN_ASSIGN_OR_RETURN(std::int64_t group, rt->drop({0, 1, 2, 3}));
  (void)group;
  std::mutex mu;
  std::condition_variable cv;
  std::vector<std::chrono::steady_clock::time_point> at;
  bool done = false;
  Status error;
  engine::RequestSpec spec;
  for (std::int64_t t = 0; t < a.prompt; ++t) spec.prompt_tokens.push_back(static_cast<std::int32_t>(3 + (t * 7) % 200));
  spec.max_tokens = a.tokens;
  spec.ignore_eos = true;
  KUN_RETURN_IF_ERROR(rt->submit(spec, [&](const engine::TokenEvent& ev) {
                          std::lock_guard<std::mutex> lock(mu);
                          if (ev.token >= 0) at.push_back(std::chrono::steady_clock::now());
                          if (ev.finished) {
                            done = true;
                            error = ev.error;
                          }
                          cv.notify_all();
                        }).status());
  {
    std::unique_lock<std::mutex> lock(mu);
    if (!cv.wait_for(lock, std::chrono::seconds(300), [&] { return done; })) return deadline_exceeded("request did not finish");
  }
  rt->stop();
  KUN_RETURN_IF_ERROR(error);
  std::vector<double> gaps;
  for (std::size_t i = 1; i < at.size(); ++i) gaps.push_back(std::chrono::duration<double, std::milli>(at[i] - at[i - 1]).count());
  return median(gaps);
}

int run(int argc, char** argv) {
  namespace rm = runtime::mpi;
  auto session = rm::MpiSession::init(&argc, &argv);
  if (!session.ok()) {
    std::cerr << session.status().to_string() << std::endl;
    return 1;
  }
  Args a;
  CLI::App app{"Per-token latency of a 4-stage fused pipeline: MPI against in-process"};
  app.add_option("--preset", a.preset);
  app.add_option("--tokens", a.tokens, "tokens decoded per request")->check(CLI::Range(2, 4096));
  app.add_option("--prompt", a.prompt, "prompt tokens")->check(CLI::Range(1, 4096));
  app.add_option("--repeats", a.repeats)->check(CLI::Range(1, 100));
  app.add_option("--threads", a.threads, "kernel threads per device")->check(CLI::Range(1, 64));
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    (*session)->abort(app.exit(e) == 0 ? 0 : 2);
  }
  if ((*session)->size() != 5) {
    if ((*session)->rank() == 0) std::cerr << "run with mpirun -np 5 (front end + 4 devices)" << std::endl;
    return 2;
  }
  auto config = model::preset_config(a.preset);
  if (!config.ok()) {
    if ((*session)->rank() == 0) std::cerr << config.status().to_string() << std::endl;
    return 2;
  }
  const auto weights = model::synthetic_weights(*config, 7);
  rm::MpiTransportOptions topt;
  topt.peer_timeout = std::chrono::milliseconds(20000);
  auto transport = rm::MpiTransport::create(topt);
  if (!transport.ok()) (*session)->abort(2);
  const std::chrono::milliseconds timeout(120000);
  if ((*session)->rank() != 0) {
    const model::WeightSource* w = weights.get();
    const int rc = rm::serve_device_rank(**session, **transport,
                                         [w](const std::string&) -> StatusOr<const model::WeightSource*> { return w; });
    transport->reset();
    return rc;
  }
  std::vector<double> in_process, over_mpi;
  for (int r = 0; r < a.repeats; ++r) {
    for (bool mpi : {false, true}) {
      ClusterOptions o = cluster_options(weights->config(), a);
      if (mpi) o.make_fleet = rm::mpi_fleet_factory(**transport, "", timeout);
      auto itl = fused_itl_ms(*weights, o, a);
      if (!itl.ok()) {
        std::cerr << (mpi ? "mpi: " : "in-process: ") << itl.status().to_string() << std::endl;
        (*session)->abort(1);
      }
      (mpi ? over_mpi : in_process).push_back(*itl);
      std::printf("repeat %d %-10s median inter-token latency %.3f ms\n", r, mpi ? "mpi" : "in-process", *itl);
    }
  }
  const double ip = median(in_process), mp = median(over_mpi);
  std::printf("4-stage fused pipeline, preset %s, %lld-token prompt, %lld tokens decoded alone, %d repeats (medians):\n",
              a.preset.c_str(), static_cast<long long>(a.prompt), static_cast<long long>(a.tokens), a.repeats);
  std::printf("  in-process  %.3f ms/token\n  mpi         %.3f ms/token\n  added by MPI %.3f ms/token (x%.2f)\n", ip, mp,
              mp - ip, ip > 0 ? mp / ip : 0.0);
  const Status released = rm::release_device_ranks(**transport, timeout);
  const Status closed = (*transport)->shutdown();
  if (!released.ok() || !closed.ok()) (*session)->abort(3);
  transport->reset();
  return 0;
}

}  // namespace
}  // namespace kun::bench

int main(int argc, char** argv) { return kun::bench::run(argc, argv); }
