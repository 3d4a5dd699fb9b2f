#include "tools/kunserve/serve_command.h"

#include <csignal>
#include <atomic>
#include <chrono>
#include <filesystem>
#include <iostream>
#include <memory>
#include <thread>

#include <nlohmann/json.hpp>

#include "common/log.h"
#include "model/tokenizer.h"
#include "runtime/cluster_runtime.h"
#include "server/http_server.h"
#include "tools/kunserve/cluster_args.h"
#include "tools/kunserve/model_args.h"

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

Status run_serve(const ServeArgs& a) {
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
  KUN_LOG(kInfo) << "max_model_len " << rt->model_info().max_context_tokens << " tokens";
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
            << " devices, policy " << a.policy << ")" << std::endl;
  std::signal(SIGINT, on_signal);
  std::signal(SIGTERM, on_signal);
  const auto start = std::chrono::steady_clock::now();
  while (!g_stop.load()) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
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
  cmd->callback([a, exit_code] {
    Status s = run_serve(*a);
    if (!s.ok()) {
      std::cerr << "kunserve serve: " << s.to_string() << std::endl;
      *exit_code = 1;
    }
  });
}

}  // namespace kun::tools
