// Cost model sanity and calibration against ../shared/gpu-profiles (skipped when absent).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "common/test_support.h"
#include "sim/cost_model.h"
#include "sim/sim_executor.h"

namespace kun::sim {
namespace {

CostModel make(const std::string& gpu, const std::string& model) {
  auto g = gpu_spec(gpu);
  auto m = sim_model_config(model);
  EXPECT_TRUE(g.ok() && m.ok());
  return CostModel(*g, *m);
}

TEST(CostModel, LookupsAndErrors) {
  for (const auto& n : gpu_names()) EXPECT_TRUE(gpu_spec(n).ok()) << n;
  for (const auto& n : link_names()) EXPECT_TRUE(link_spec(n).ok()) << n;
  for (const auto& n : sim_model_names()) EXPECT_TRUE(sim_model_config(n).ok()) << n;
  EXPECT_EQ(gpu_spec("v100").status().code(), StatusCode::kNotFound);
  EXPECT_EQ(link_spec("carrier-pigeon").status().code(), StatusCode::kNotFound);
  EXPECT_EQ(sim_model_config("gpt-5").status().code(), StatusCode::kNotFound);
  EXPECT_GT(gpu_spec("h200")->memory_bytes, gpu_spec("h100")->memory_bytes);
}

TEST(CostModel, RooflineShape) {
  const CostModel a100 = make("a100", "llama-2-7b");
  const CostModel h100 = make("h100", "llama-2-7b");
  // Parameters: about 6.7e9 x 2 bytes.
  EXPECT_NEAR(static_cast<double>(a100.total_param_bytes()) / 1e9, 13.5, 0.3);
  EXPECT_EQ(a100.kv_bytes_per_token_per_layer(), 2 * 4096 * 2);
  // Decode is weight-bandwidth bound: 1..32 tokens cost about the same.
  EXPECT_LT(a100.layer_linear_us(32) / a100.layer_linear_us(1), 1.2);
  // Large prefill is compute bound: doubling tokens about doubles time.
  EXPECT_NEAR(a100.layer_linear_us(8192) / a100.layer_linear_us(4096), 2.0, 0.1);
  // Monotone in tokens; H100 faster than A100.
  double prev = 0;
  for (std::int64_t t : {1, 16, 64, 256, 1024, 4096}) {
    const double us = a100.layer_linear_us(t);
    EXPECT_GE(us, prev);
    prev = us;
    EXPECT_LT(h100.layer_linear_us(t), us);
  }
  // Attention: decode reads KV, grows with context.
  std::vector<SeqWork> short_ctx(32, SeqWork{128, 1, true});
  std::vector<SeqWork> long_ctx(32, SeqWork{4000, 1, true});
  EXPECT_GT(a100.layer_attention_us(long_ctx), 5 * a100.layer_attention_us(short_ctx) - 50);
  // A decode step of 32 sequences on Llama-2-7B/A100: tens of ms, not micro- or whole seconds.
  const double step = a100.step_us(short_ctx, 32, true, true);
  EXPECT_GT(step, 8'000);
  EXPECT_LT(step, 40'000);
  // Transfers.
  const LinkSpec nv = *link_spec("nvlink-a100");
  EXPECT_EQ(transfer_us(nv, 0), 0.0);
  EXPECT_NEAR(transfer_us(nv, 64LL << 20), 64.0 * 1048576 / 318.5e9 * 1e6 + 14.5, 1e-6);
}

TEST(CostModel, TensorParallelSplitsComputeAndAddsAllReduces) {
  auto gpu = gpu_spec("a100-80gb");
  auto model = sim_model_config("llama-2-13b");
  ASSERT_TRUE(gpu.ok() && model.ok());
  const CostModel one(*gpu, *model, 1);
  const CostModel four(*gpu, *model, 4);
  // The fitted A100 all-reduce: 59 us + bytes / 124 GB/s for 4 GPUs.
  EXPECT_DOUBLE_EQ(four.all_reduce_us(124e6), 59.0 + 1000.0);
  EXPECT_EQ(one.all_reduce_us(1e6), 0.0);
  // A large prefill is compute-bound: TP 4 takes a bit more than 1/4 (the all-reduces).
  std::vector<SeqWork> prefill = {{0, 4096, true}};
  const double t1 = one.step_us(prefill, 40, true, true, false);
  const double t4 = four.step_us(prefill, 40, true, true, false);
  EXPECT_GT(t4, t1 / 4.0);
  EXPECT_LT(t4, t1 / 4.0 * 1.5);
  // The instance's KV per token and layer is unchanged by the split (MHA: heads divide by 4).
  EXPECT_EQ(four.kv_bytes_per_token_per_layer(), one.kv_bytes_per_token_per_layer());
  // GQA with fewer KV heads than GPUs replicates them: Llama-2-70B has 8 KV heads.
  auto big = sim_model_config("llama-2-70b");
  ASSERT_TRUE(big.ok());
  EXPECT_EQ(CostModel(*gpu, *big, 8).kv_bytes_per_token_per_layer(), CostModel(*gpu, *big, 1).kv_bytes_per_token_per_layer());
  EXPECT_FALSE(CostModel::tp_problem(*gpu, *big, 3).empty());
}

TEST(SimExecutor, DurationsTokensAndPipeline) {
  const CostModel cost = make("a100", "llama-2-7b");
  SimExecutorConfig cfg;
  cfg.host_link = *link_spec("pcie4");
  cfg.stage_link = *link_spec("nvlink-a100");
  cfg.eos_token_id = 2;
  cfg.vocab_size = 32000;
  SimExecutor single(&cost, cfg);
  engine::StepPlan plan;
  for (int i = 0; i < 8; ++i) {
    engine::ScheduledSequence s;
    s.id = RequestId(i);
    s.start_pos = 100;
    s.tokens.assign(256, 5);
    s.sample = true;
    s.sample_index = 3;
    plan.sequences.push_back(s);
  }
  auto r1 = single.execute(plan);
  auto r2 = single.execute(plan);
  ASSERT_EQ(r1.sampled_tokens.size(), 8u);
  EXPECT_EQ(r1.sampled_tokens, r2.sampled_tokens);
  EXPECT_EQ(r1.duration_us, r2.duration_us);
  for (auto t : r1.sampled_tokens) {
    EXPECT_NE(t, 2);
    EXPECT_GE(t, 0);
    EXPECT_LT(t, 32000);
  }
  EXPECT_NEAR(static_cast<double>(r1.duration_us), cost.step_us(std::vector<SeqWork>(8, SeqWork{100, 256, true}), 32, true, true), 1.0);
  // Swap copies add PCIe time.
  engine::StepPlan swap = plan;
  swap.swap_in.resize(1000);
  EXPECT_GT(single.duration_us(swap), r1.duration_us + 10'000);
  // A 2-stage pipeline over the same batch split into two equal micro-batches (two virtual
  // engines) is faster than one device but slower than half, with a small bubble (the stages'
  // layers are equal, the embedding and the head are not).
  cfg.stage_layers = {16, 16};
  SimExecutor pipe(&cost, cfg);
  engine::StepPlan half_a, half_b;
  for (int i = 0; i < 8; ++i) (i < 4 ? half_a : half_b).sequences.push_back(plan.sequences[static_cast<std::size_t>(i)]);
  const auto p = pipe.round_duration_us({half_a, half_b});
  EXPECT_LT(p, r1.duration_us);
  EXPECT_GT(p, r1.duration_us / 2);
  const auto balanced = pipe.execute_round({half_a, half_b});
  ASSERT_EQ(balanced.size(), 2u);
  EXPECT_EQ(balanced[0].duration_us, p);
  EXPECT_EQ(balanced[1].sampled_tokens.size(), 4u);
  const double busy = pipe.counters().stage_busy_us, idle = pipe.counters().stage_idle_us;
  EXPECT_GT(busy, 0.0);
  EXPECT_LT(idle / (busy + idle), 0.1);
  // The whole batch as one micro-batch (one virtual engine took it all) crosses both stages in
  // turn: no faster than one device, and one stage idles at any time.
  EXPECT_GT(pipe.duration_us(plan), r1.duration_us);
  pipe.execute(plan);
  const double idle1 = pipe.counters().stage_idle_us - idle, busy1 = pipe.counters().stage_busy_us - busy;
  EXPECT_NEAR(idle1 / (busy1 + idle1), 0.5, 0.05);
  // Unbalanced micro-batches (7 + 1 sequences): bound by the big one's trip through the pipeline.
  engine::StepPlan big, small;
  for (int i = 0; i < 8; ++i) (i < 7 ? big : small).sequences.push_back(plan.sequences[static_cast<std::size_t>(i)]);
  EXPECT_GT(pipe.round_duration_us({big, small}), p);
  EXPECT_EQ(pipe.round_duration_us({big, small}), pipe.duration_us(big));
}

// ---- Calibration against the measured profiles ----

std::filesystem::path profiles_dir() {
  return test_support::source_dir() / ".." / "shared" / "gpu-profiles";
}

std::vector<std::map<std::string, std::string>> read_csv(const std::filesystem::path& p) {
  std::ifstream in(p);
  std::string line;
  std::vector<std::string> header;
  std::vector<std::map<std::string, std::string>> rows;
  auto split = [](const std::string& s) {
    std::vector<std::string> out;
    std::stringstream ss(s);
    std::string cell;
    while (std::getline(ss, cell, ',')) out.push_back(cell);
    return out;
  };
  if (!std::getline(in, line)) return rows;
  header = split(line);
  while (std::getline(in, line)) {
    auto cells = split(line);
    std::map<std::string, std::string> row;
    for (std::size_t i = 0; i < header.size() && i < cells.size(); ++i) row[header[i]] = cells[i];
    rows.push_back(std::move(row));
  }
  return rows;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

struct Case {
  const char* gpu;
  const char* dir;
  const char* model;
};

TEST(Calibration, LayerTimesMatchMeasuredProfiles) {
  const auto root = profiles_dir();
  if (!std::filesystem::exists(root / "compute")) GTEST_SKIP() << "no " << root;
  const std::vector<Case> cases = {{"a100", "a100", "llama-2-7b"}, {"a100", "a100", "llama-3-8b"},
                                   {"h100", "h100", "llama-2-7b"}};
  const std::vector<std::string> ops = {"attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj",
                                        "input_layernorm", "attn_rope", "post_attention_layernorm", "mlp_act", "add"};
  for (const Case& c : cases) {
    const std::string sub = std::string(c.model) == "llama-2-7b" ? "meta-llama/Llama-2-7b-hf" : "meta-llama/Meta-Llama-3-8B";
    const auto path = root / "compute" / c.dir / sub / "mlp.csv";
    ASSERT_TRUE(std::filesystem::exists(path)) << path;
    const CostModel cost = make(c.gpu, c.model);
    std::vector<double> errs, gemm_errs;
    for (const auto& row : read_csv(path)) {
      if (row.at("num_tensor_parallel_workers") != "1") continue;
      const std::int64_t t = std::stoll(row.at("num_tokens"));
      if (t < 64) continue;
      double measured = 0.0, gemm_measured = 0.0;
      for (std::size_t i = 0; i < ops.size(); ++i) {
        const double ms = std::stod(row.at("time_stats." + ops[i] + ".median"));
        measured += ms * 1000.0;
        if (i < 4) gemm_measured += ms * 1000.0;
      }
      errs.push_back(std::abs(cost.layer_linear_us(t) - measured) / measured);
      gemm_errs.push_back(std::abs(cost.layer_gemms_us(t) - gemm_measured) / gemm_measured);
    }
    ASSERT_GT(errs.size(), 100u);
    const double med = median(errs), gmed = median(gemm_errs);
    const double worst = *std::max_element(errs.begin(), errs.end());
    std::printf("%s %s: layer median |rel err| %.1f%% (max %.1f%%), GEMMs median %.1f%%, n=%zu\n", c.gpu, c.model,
                med * 100, worst * 100, gmed * 100, errs.size());
    EXPECT_LT(med, 0.10) << c.gpu << " " << c.model;  // fit gives 3-6 %
    EXPECT_LT(gmed, 0.10) << c.gpu << " " << c.model;
    EXPECT_LT(worst, 0.45) << c.gpu << " " << c.model;
  }
}

TEST(Calibration, LinksMatchMeasuredSendRecv) {
  const auto root = profiles_dir();
  if (!std::filesystem::exists(root / "network")) GTEST_SKIP() << "no " << root;
  struct L { const char* setup; const char* dpn; const char* link; };
  for (const L& l : {L{"a100_dgx", "2", "nvlink-a100"}, L{"h100_dgx", "2", "nvlink"}, L{"h100_dgx", "1", "ib"},
                     L{"a100_dgx", "1", "ib-hdr"}}) {
    const LinkSpec spec = *link_spec(l.link);
    std::vector<double> errs;
    for (const auto& row : read_csv(root / "network" / l.setup / "send_recv.csv")) {
      if (row.at("devices_per_node") != l.dpn) continue;
      const std::int64_t size = std::stoll(row.at("size"));
      if (size < (1 << 20)) continue;
      const double measured = std::stod(row.at("time_stats.send_recv.median")) * 1000.0;
      errs.push_back(std::abs(transfer_us(spec, size) - measured) / measured);
    }
    ASSERT_GT(errs.size(), 50u) << l.setup;
    const double med = median(errs);
    std::printf("%s (devices_per_node %s) as %s: median |rel err| %.1f%% for >= 1 MiB, n=%zu\n", l.setup, l.dpn,
                l.link, med * 100, errs.size());
    EXPECT_LT(med, 0.10) << l.setup;
  }
}

}  // namespace
}  // namespace kun::sim
