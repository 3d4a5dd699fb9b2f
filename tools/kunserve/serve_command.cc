#include "tools/kunserve/serve_command.h"

#include <csignal>
#include <atomic>
#include <chrono>
#include <filesystem>
#include <iostream>
#include <memory>
#include <thread>

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
};

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
  SteadyClock clock;
  KUN_ASSIGN_OR_RETURN(auto rt, runtime::ClusterRuntime::create(options, *weights, &clock));
  rt->start();
  server::ServerConfig sc;
  sc.host = a.host;
  sc.port = static_cast<std::uint16_t>(a.port);
  sc.io_threads = a.io_threads;
  sc.model_name = name;
  auto http = server::HttpServer::start(sc, *rt, *tokenizer);
  if (!http.ok()) {
    rt->stop();
    return http.status();
  }
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
  std::cout << "kunserve: shutting down" << std::endl;
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
  cmd->callback([a, exit_code] {
    Status s = run_serve(*a);
    if (!s.ok()) {
      std::cerr << "kunserve serve: " << s.to_string() << std::endl;
      *exit_code = 1;
    }
  });
}

}  // namespace kun::tools
