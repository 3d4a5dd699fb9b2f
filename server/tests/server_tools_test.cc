// External tools against a server on the fake front door: `promtool check metrics` on /metrics
// and the official `openai` npm client (tests/node/openai_client_test.mjs).
#include <gtest/gtest.h>

#include "common/test_support.h"

#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "server/tests/server_test_util.h"

namespace kun::server::testing {
namespace {

std::string find_program(const std::string& name) {
  for (const char* dir : {"/usr/bin", "/usr/local/bin", "/bin"}) {
    const std::string p = std::string(dir) + "/" + name;
    if (::access(p.c_str(), X_OK) == 0) return p;
  }
  return "";
}

// Runs a shell command (bounded with timeout(1) by the callers), returning its exit code and output.
int run_command(const std::string& cmd, std::string& output) { return test_support::run_shell(cmd, &output); }

TEST(Promtool, AcceptsMetricsOutput) {
  const std::string promtool = find_program("promtool");
  if (promtool.empty()) KUN_SKIP_OR_FAIL_IN_CI("promtool not installed");
  ServerHarness h;
  engine::ServingStats extra;
  for (int i = 0; i < 2; ++i) {
    engine::InstanceStats inst;
    inst.instance = i;
    inst.group = 0;
    inst.group_state = "DROPPED";
    inst.dropped_param_bytes = 1 << 20;
    extra.instances.push_back(inst);
  }
  extra.num_preemptions = 3;
  extra.kv_blocks_exchanged_total = 42;
  extra.recomputed_tokens_total = 70;
  extra.transition_recomputed_tokens_total = 30;
  extra.drops_total = 2;
  extra.grows_total = 4;
  extra.shrinks_total = 5;
  extra.transition_failures_total["split"] = 1;
  extra.drop_latency_ms = {3.5, 12.0};
  extra.restore_latency_ms = {40.0};
  h.fake().set_extra_stats(extra);
  // Some traffic so the histograms have observations.
  ASSERT_EQ(h.post("/v1/completions", R"({"prompt":"x","max_tokens":5})").status, 200);
  ASSERT_EQ(h.post("/v1/completions", R"({"prompt":"x","max_tokens":5,"stream":true})").status, 200);
  ASSERT_EQ(h.post("/v1/completions", R"({"prompt":"x","max_tokens":30,"stop":"fox"})").status, 200);
  ASSERT_EQ(h.post("/v1/completions", R"({"prompt":"x","n":3})").status, 400);
  ASSERT_TRUE(h.fake().wait_idle(std::chrono::milliseconds(2000)));
  const HttpResponse r = h.get("/metrics");
  ASSERT_EQ(r.status, 200);
  for (const char* name :
       {"vllm:num_requests_running{", "vllm:num_requests_waiting{", "vllm:gpu_cache_usage_perc{",
        "vllm:kv_cache_usage_perc{", "vllm:num_preemptions_total{model_name=\"fake-model\"} 3",
        "vllm:prompt_tokens_total{", "vllm:generation_tokens_total{",
        "vllm:time_to_first_token_seconds_count{model_name=\"fake-model\"} 3",
        "vllm:time_per_output_token_seconds_bucket{", "vllm:inter_token_latency_seconds_sum{",
        "vllm:e2e_request_latency_seconds_count{model_name=\"fake-model\"} 3",
        "vllm:request_queue_time_seconds_bucket{",
        "vllm:request_success_total{model_name=\"fake-model\",finished_reason=\"stop\"} 1",
        "vllm:request_success_total{model_name=\"fake-model\",finished_reason=\"length\"} 2",
        "kunserve_instance_memory_demand{instance=\"1\"}", "kunserve_group_state{instance=\"1\",state=\"DROPPED\"} 1",
        "kunserve_group_state{instance=\"1\",state=\"INITIAL\"} 0", "kunserve_dropped_param_bytes{instance=\"0\"} 1048576",
        "kunserve_kv_blocks_exchanged_total 42", "kunserve_recomputed_tokens_total{cause=\"transition\"} 30",
        "kunserve_recomputed_tokens_total{cause=\"preemption\"} 40", "kunserve_drop_latency_seconds_count 2",
        "kunserve_restore_latency_seconds_bucket{le=\"0.05\"} 1", "kunserve_grows_total 4", "kunserve_shrinks_total 5",
        "kunserve_transition_failures_total{kind=\"split\"} 1", "kunserve_transition_failures_total{kind=\"drop\"} 0",
        "kunserve_transition_failures_total{kind=\"kv_move\"} 0", "kunserve_transition_failures_total{kind=\"grow\"} 0", "kunserve_http_responses_total{code=\"400\"} 1"}) {
    EXPECT_NE(r.body.find(name), std::string::npos) << "missing: " << name;
  }
  const std::string path = ::testing::TempDir() + "/kun_server_metrics.txt";
  {
    std::ofstream f(path);
    f << r.body;
  }
  // promtool exits 1 on a parse error and 3 when it only has lint findings. Its linter flags
  // every name with ':' (reserved for recording rules by convention), which the vLLM-compatible
  // vllm:* names carry by design: that finding is the only one allowed.
  std::string out;
  const int rc = run_command("timeout 30 " + promtool + " check metrics < " + path, out);
  EXPECT_TRUE(rc == 0 || rc == 3) << out << "\n---\n" << r.body;
  std::istringstream lines(out);
  std::string line;
  int colon_findings = 0;
  while (std::getline(lines, line)) {
    if (line.empty()) continue;
    if (line.rfind("vllm:", 0) == 0 && line.find("should not contain ':'") != std::string::npos) {
      ++colon_findings;
      continue;
    }
    ADD_FAILURE() << "promtool finding: " << line;
  }
  std::printf("[promtool] exit %d, %d findings about ':' in vllm:* names, no other findings\n", rc,
              colon_findings);
  // The same exposition with ':' replaced must be entirely lint-clean (HELP/TYPE, counter
  // suffixes, histogram buckets of the vllm families included).
  std::string renamed = r.body;
  for (std::size_t p = 0; (p = renamed.find("vllm:", p)) != std::string::npos;) renamed.replace(p, 5, "vllm_");
  {
    std::ofstream f(path);
    f << renamed;
  }
  const int rc2 = run_command("timeout 30 " + promtool + " check metrics < " + path, out);
  EXPECT_EQ(rc2, 0) << out;
  std::filesystem::remove(path);
}

TEST(OpenAiNodeClient, CompletionsAndChatStreamingAndNot) {
  const std::string node = find_program("node");
  const std::string src = KUN_SOURCE_DIR;
  if (node.empty()) KUN_SKIP_OR_FAIL_IN_CI("node not installed");
  if (!std::filesystem::exists(src + "/tests/node/node_modules/openai/package.json")) {
    KUN_SKIP_OR_FAIL_IN_CI("the openai npm package is not installed (cd tests/node && npm install)");
  }
  ServerHarness h;
  std::string out;
  const std::string cmd = "cd " + src + "/tests/node && KUN_BASE_URL=http://127.0.0.1:" +
                          std::to_string(h.port()) + "/v1 KUN_MODEL=fake-model timeout 60 " + node +
                          " openai_client_test.mjs";
  const int rc = run_command(cmd, out);
  std::printf("%s", out.c_str());
  EXPECT_EQ(rc, 0) << out;
  EXPECT_NE(out.find("10 checks passed"), std::string::npos) << out;
}

}  // namespace
}  // namespace kun::server::testing
