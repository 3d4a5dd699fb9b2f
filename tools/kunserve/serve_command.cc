#include "tools/kunserve/serve_command.h"

#include <csignal>
#include <atomic>
#include <functional>
#include <chrono>
#include <filesystem>
#include <iostream>
#include <memory>
#include <thread>

#include <nlohmann/json.hpp>

#include "common/log.h"
#include "model/tokenizer.h"
#include "kernels/kernels.h"
#include "runtime/cluster_runtime.h"
#include "server/http_server.h"
#include "tools/kunserve/cluster_args.h"
#include "tools/kunserve/model_args.h"
#ifdef KUN_HAVE_MPI
#include <condition_variable>
#include <cstdlib>
#include <mutex>

#include "runtime/mpi/mpi_fleet.h"
#include "runtime/mpi/mpi_session.h"
#include "runtime/mpi/mpi_transport.h"
#endif

namespace kun::tools {
namespace {

std::atomic<bool> g_stop{false};
extern "C" void on_signal(int) { g_stop.store(true); }

struct ServeArgs {
  ModelArgs model;
  ClusterArgs cluster;
  std::string policy = "kunserve";
  std::string host = "127.0.0.1";
  int port = 8000;
  int io_threads = 2;
  std::string tokenizer;          // path; default: the model's own tokenizer (directory or GGUF), else synthetic
  std::string served_model_name;  // default: the model's display name
  double max_seconds = 0;         // stop after this long (0: until SIGINT / SIGTERM)
  double drain_timeout_s = 30;    // SIGTERM/SIGINT: how long in-flight requests may finish
  std::string api_key;            // --api-key or $KUNSERVE_API_KEY
  bool metrics_require_api_key = false;
  std::vector<std::string> allowed_origins;
  std::vector<std::string> allowed_hosts;
  std::string runtime = "inprocess";  // inprocess | mpi
  int mpi_peer_timeout_ms = 2000;     // a device rank silent this long is lost
  int mpi_heartbeat_ms = 100;
  bool devices_given = false;         // --devices on the command line (set after parsing)
};

// What the MPI runtime adds to serving (empty for in-process).
struct ServeHooks {
  std::function<StatusOr<std::unique_ptr<runtime::DeviceFleet>>(const runtime::FleetOptions&, const model::WeightSource&)>
      make_fleet;
  std::string runtime_banner;        // e.g. ", runtime mpi: 4 device ranks"
  std::function<bool()> device_lost;  // polled by the serve loop
  std::function<void()> end_job;      // after a device loss; does not return
};

// GET /v1/kunserve/events: the runtime's bounded transition history, newest last.
std::string events_json(const runtime::ClusterRuntime& rt, std::size_t capacity) {
  nlohmann::json list = nlohmann::json::array();
  for (const runtime::ClusterEvent& ev : rt.events()) {
    list.push_back({{"time_us", ev.time_us},
                    {"kind", ev.kind},
                    {"group", ev.group},
                    {"instances", ev.instances},
                    {"bytes", ev.bytes},
                    {"latency_ms", ev.latency_ms},
                    {"requests_moved", ev.requests_moved},
                    {"requests_recomputed", ev.requests_recomputed},
                    {"reason", ev.reason}});
  }
  const std::uint64_t total = rt.events_total();
  nlohmann::json out = {{"object", "list"},
                        {"capacity", capacity},
                        {"total", total},
                        {"dropped", total - list.size()},
                        {"data", std::move(list)}};
  return out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

Status run_serve(const ServeArgs& a, const ServeHooks& hooks) {
  cluster::Policy policy;
  if (!cluster::parse_policy(a.policy, &policy)) {
    return invalid_argument("unknown --policy '" + a.policy + "' (recompute | swap | migrate | kunserve)");
  }
  KUN_ASSIGN_OR_RETURN(auto weights, a.model.open());
  const model::ModelConfig& config = weights->config();
  KUN_ASSIGN_OR_RETURN(auto tokenizer, a.model.open_tokenizer(a.tokenizer, config.vocab_size));
  KUN_ASSIGN_OR_RETURN(DType dtype, a.model.device_dtype(config));
  const std::string name = a.served_model_name.empty() ? a.model.display_name() : a.served_model_name;
  KUN_ASSIGN_OR_RETURN(DType kv_dtype, a.model.kv_dtype());
  KUN_ASSIGN_OR_RETURN(runtime::ClusterOptions options, a.cluster.build(config, dtype, kv_dtype, policy, name));
  KUN_RETURN_IF_ERROR(a.cluster.cap_context_to_kv(config, &options));
  options.make_fleet = hooks.make_fleet;
  SteadyClock clock;
  KUN_ASSIGN_OR_RETURN(auto rt, runtime::ClusterRuntime::create(options, *weights, &clock));
  // The admitted context must fit every instance's real KV cache (the estimate in
  // ClusterArgs::build must agree with what the devices got).
  for (const engine::InstanceStats& is : rt->stats().instances) {
    const std::int64_t tokens = is.kv_blocks_total / config.num_layers * a.cluster.block_size;
    if (tokens < rt->model_info().max_context_tokens) {
      return internal_error("instance " + std::to_string(is.instance) + " holds " + std::to_string(tokens) +
                            " KV tokens, less than max_model_len " +
                            std::to_string(rt->model_info().max_context_tokens));
    }
  }
  KUN_LOG(kInfo) << "max_model_len " << rt->model_info().max_context_tokens << " tokens; kernels: isa "
                 << kernels::isa_name(kernels::active_isa()) << ", gemm activations "
                 << kernels::gemm_activations_name(kernels::active_gemm_activations());
  rt->start();
  server::ServerConfig sc;
  sc.host = a.host;
  sc.port = static_cast<std::uint16_t>(a.port);
  sc.io_threads = a.io_threads;
  sc.model_name = name;
  if (a.drain_timeout_s < 0 || a.drain_timeout_s > 86400) return invalid_argument("--drain-timeout-s must be in [0, 86400]");
  sc.drain_timeout_ms = static_cast<int>(a.drain_timeout_s * 1000);
  sc.api_key = a.api_key;
  sc.metrics_require_api_key = a.metrics_require_api_key;
  if (sc.metrics_require_api_key && sc.api_key.empty()) {
    return invalid_argument("--metrics-require-api-key needs --api-key (or KUNSERVE_API_KEY)");
  }
  sc.allowed_origins = a.allowed_origins;
  sc.allowed_hosts = a.allowed_hosts;
  const runtime::ClusterRuntime* rt_raw = rt.get();
  const auto capacity = static_cast<std::size_t>(a.cluster.event_history);
  sc.json_routes["/v1/kunserve/events"] = [rt_raw, capacity] { return events_json(*rt_raw, capacity); };
  auto http = server::HttpServer::start(sc, *rt, *tokenizer);
  if (!http.ok()) {
    rt->stop();
    return http.status();
  }
  std::string hosts;
  for (const std::string& h : server::effective_allowed_hosts(sc)) hosts += (hosts.empty() ? "" : ",") + h;
  KUN_LOG(kInfo) << "allowed Host headers: " << hosts << "; API key " << (sc.api_key.empty() ? "off" : "on")
                 << "; CORS " << (sc.allowed_origins.empty() ? "off" : "on");
  std::cout << "kunserve serving " << name << " on http://" << a.host << ":" << (*http)->port() << " (" << a.cluster.devices
            << " devices, policy " << a.policy << hooks.runtime_banner << ")" << std::endl;
  std::signal(SIGINT, on_signal);
  std::signal(SIGTERM, on_signal);
  const auto start = std::chrono::steady_clock::now();
  while (!g_stop.load()) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    if (hooks.device_lost && hooks.device_lost()) {
      // The executor cannot serve on without the device yet: open streams get an error event,
      // other requests a 503, and the job ends (the runtime is not stopped: its steps wait on
      // the lost device).
      (*http)->stop(std::chrono::milliseconds(0));
      hooks.end_job();
    }
    if (a.max_seconds > 0 &&
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() >= a.max_seconds) {
      break;
    }
  }
  std::cout << "kunserve: shutting down (draining for up to " << a.drain_timeout_s << " s)" << std::endl;
  (*http)->stop();
  rt->stop();
  return ok_status();
}

#ifdef KUN_HAVE_MPI
bool started_by_mpirun() {
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "PMI_SIZE"}) {
    if (std::getenv(v) != nullptr) return true;
  }
  return false;
}

// `serve --runtime mpi`: rank 0 serves (HTTP, router, coordinator, schedulers, executors) over an
// MpiFleet; ranks 1..N build and serve one device each (runtime/README.md, "MPI").
Status run_serve_mpi(ServeArgs a, int* exit_code) {
  namespace rm = runtime::mpi;
  if (!started_by_mpirun()) {
    return failed_precondition(
        "--runtime mpi runs one process per device plus the front end and must be started by mpirun: "
        "mpirun -np N+1 kunserve serve --runtime mpi ... (N devices; as root add --allow-run-as-root, with more ranks "
        "than cores --oversubscribe)");
  }
  KUN_ASSIGN_OR_RETURN(auto session, rm::MpiSession::init(nullptr, nullptr));
  const int rank = session->rank();
  const int size = session->size();
  // A refusal every rank reaches: rank 0 says why while MPI is up (the others wait for it in
  // MPI_Finalize, so mpirun cannot end rank 0 before the message is out); all exit 2.
  const auto refuse = [&](const Status& why) {
    if (rank == 0) std::cerr << "kunserve serve: " << why.to_string() << std::endl;
    *exit_code = 2;
    return Status(why.code(), "");
  };
  if (size < 2) {
    return refuse(failed_precondition("--runtime mpi needs at least 2 ranks (rank 0 front end, ranks 1..N devices); "
                                      "mpirun started " + std::to_string(size)));
  }
  if (a.devices_given && a.cluster.devices != size - 1) {
    return refuse(invalid_argument("--devices " + std::to_string(a.cluster.devices) + " but the job has " +
                                   std::to_string(size - 1) + " device ranks: start mpirun -np " +
                                   std::to_string(a.cluster.devices + 1) + " or leave --devices out"));
  }
  a.cluster.devices = size - 1;
  // Every rank opens the model itself; a rank that cannot is named by the identity check.
  auto weights = a.model.open();
  rm::NodeIdentity id;
  id.model = weights.ok() ? a.model.display_name() + (a.model.load_format == "dummy" ? ":seed" + std::to_string(a.model.seed) : "")
                          : "(cannot open: " + weights.status().message() + ")";
  id.preset = a.model.load_format == "dummy" ? a.model.preset : "-";
  id.dtype = a.model.dtype + "/kv-" + a.model.kv_cache_dtype;
  id.gemm = std::string(kernels::gemm_activations_name(kernels::active_gemm_activations()));
  id.build_id = rm::this_build_id();
  const Status agreed = rm::check_identity(id);
  if (!agreed.ok()) return refuse(agreed);
  if (!weights.ok()) return refuse(weights.status());  // every rank failed the same way

  struct Loss {
    std::mutex mu;
    bool lost = false;
    int rank = -1;
    std::string why;
  };
  auto loss = std::make_shared<Loss>();
  rm::MpiTransportOptions topt;
  topt.peer_timeout = std::chrono::milliseconds(a.mpi_peer_timeout_ms);
  topt.heartbeat_period = std::chrono::milliseconds(a.mpi_heartbeat_ms);
  rm::MpiSession* session_raw = session.get();
  rm::MpiTransport* transport_raw = nullptr;
  if (rank == 0) {
    topt.on_peer_failure = [loss, session_raw, &transport_raw](int peer, const Status& why) {
      {
        std::lock_guard<std::mutex> lock(loss->mu);
        if (!loss->lost) {
          loss->lost = true;
          loss->rank = peer;
          loss->why = why.message();
        }
      }
      // One write, so that other ranks' lines forwarded by mpirun cannot land inside it.
      std::cerr << ("kunserve: device rank " + std::to_string(peer) + " lost: " + why.message() + "; ending the job\n")
                << std::flush;
      // The serve loop ends the job within 100 ms after answering the open requests; should it
      // not, this does (the transport stalls meanwhile, so no step sees the failure).
      std::this_thread::sleep_for(std::chrono::seconds(5));
      if (transport_raw != nullptr && rm::mpirun_recovery_enabled()) (void)transport_raw->terminate_peer(peer);
      session_raw->abort(3);
    };
  }
  KUN_ASSIGN_OR_RETURN(auto transport, rm::MpiTransport::create(topt));
  transport_raw = transport.get();
  if (rank != 0) {
    const model::WeightSource* w = weights->get();
    *exit_code = rm::serve_device_rank(*session, *transport, [w](const std::string& key) -> StatusOr<const model::WeightSource*> {
      if (!key.empty()) return invalid_argument("unknown weights '" + key + "'");
      return w;
    });
    transport.reset();
    return ok_status();
  }
  if (rm::mpirun_recovery_enabled()) {
    KUN_LOG(kInfo) << "mpirun --enable-recovery: a device rank that dies does not end the job at once; the front end ends it";
  }
  const auto timeout = std::chrono::milliseconds(a.mpi_peer_timeout_ms + 60000);  // building a device loads its weights
  ServeHooks hooks;
  hooks.make_fleet = rm::mpi_fleet_factory(*transport, "", timeout);
  hooks.runtime_banner = ", runtime mpi: " + std::to_string(size - 1) + " device ranks";
  hooks.device_lost = [loss] {
    std::lock_guard<std::mutex> lock(loss->mu);
    return loss->lost;
  };
  hooks.end_job = [loss, session_raw, transport_raw] {
    int lost_rank = -1;
    {
      std::lock_guard<std::mutex> lock(loss->mu);
      lost_rank = loss->rank;
    }
    if (rm::mpirun_recovery_enabled()) (void)transport_raw->terminate_peer(lost_rank);
    session_raw->abort(3);
  };
  const Status served = run_serve(a, hooks);
  const Status released = rm::release_device_ranks(*transport, timeout);
  const Status closed = transport->shutdown();
  if (!released.ok() || !closed.ok()) {
    std::cerr << "kunserve serve: " << (released.ok() ? closed : released).to_string() << "; ending the job" << std::endl;
    session->abort(3);
  }
  transport.reset();
  return served;
}
#endif

}  // namespace

void add_serve_command(CLI::App* app, int* exit_code) {
  auto a = std::make_shared<ServeArgs>();
  CLI::App* cmd = app->add_subcommand("serve", "Serve the OpenAI-compatible HTTP API over in-process devices");
  a->model.add_to(cmd);
  a->cluster.add_to(cmd);
  cmd->add_option("--policy", a->policy, "recompute | swap | migrate | kunserve");
  cmd->add_option("--host", a->host);
  cmd->add_option("--port", a->port, "0: any free port");
  cmd->add_option("--io-threads", a->io_threads);
  cmd->add_option("--tokenizer", a->tokenizer, "tokenizer.json / tokenizer.model / .gguf (default: the model's own, a GGUF file's embedded tokenizer included; else synthetic)");
  cmd->add_option("--served-model-name", a->served_model_name);
  cmd->add_option("--max-seconds", a->max_seconds, "stop after this many seconds (0: until SIGINT/SIGTERM)");
  cmd->add_option("--drain-timeout-s", a->drain_timeout_s,
                  "on SIGTERM/SIGINT: seconds in-flight requests may finish (new requests get 503); then streams get an "
                  "error event and [DONE], other requests 503");
  cmd->add_option("--api-key", a->api_key, "require 'Authorization: Bearer KEY' on /v1/*")->envname("KUNSERVE_API_KEY");
  cmd->add_flag("--metrics-require-api-key", a->metrics_require_api_key, "/metrics also requires the API key");
  cmd->add_option("--allowed-origins", a->allowed_origins, "CORS: origins allowed to call the API ('*': any); default: CORS off")
      ->delimiter(',');
  cmd->add_option("--allowed-hosts", a->allowed_hosts,
                  "Host headers accepted ('*': any); default: localhost/127.0.0.1/::1 when --host is loopback, else any")
      ->delimiter(',');
  cmd->add_option("--runtime", a->runtime,
                  "inprocess: every device in this process (default); mpi: one MPI rank per device, started as "
                  "mpirun -np N+1 kunserve serve --runtime mpi ...")
      ->check(CLI::IsMember({"inprocess", "mpi"}));
  cmd->add_option("--mpi-peer-timeout-ms", a->mpi_peer_timeout_ms, "--runtime mpi: a device rank silent this long is lost")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--mpi-heartbeat-ms", a->mpi_heartbeat_ms, "--runtime mpi: heartbeat period between ranks")
      ->check(CLI::PositiveNumber);
  cmd->callback([a, exit_code, cmd] {
    Status s;
    if (a->runtime == "mpi") {
#ifdef KUN_HAVE_MPI
      a->devices_given = cmd->count("--devices") > 0;
      if (a->mpi_peer_timeout_ms <= a->mpi_heartbeat_ms) {
        s = invalid_argument("--mpi-peer-timeout-ms must exceed --mpi-heartbeat-ms");
      } else {
        s = run_serve_mpi(*a, exit_code);
      }
      if (!s.ok() && s.message().empty()) {  // a refused start: rank 0 said why
        if (*exit_code == 0) *exit_code = 1;
        return;
      }
#else
      s = unimplemented("this kunserve was built without MPI (install libopenmpi-dev and openmpi-bin, then reconfigure)");
#endif
    } else {
      s = run_serve(*a, ServeHooks{});
    }
    if (!s.ok()) {
      std::cerr << "kunserve serve: " << s.to_string() << std::endl;
      if (*exit_code == 0) *exit_code = 1;
    }
  });
}

}  // namespace kun::tools
