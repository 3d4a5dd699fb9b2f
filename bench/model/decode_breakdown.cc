// decode_breakdown [--preset P] [--threads T] [--steps R] [--context C] [--batch B] [--memfd]
//                  [--per-sequence-attention]
//
// Splits one decode step of B sequences (default 1; every sequence at position C over the same
// cached K/V) of the forward pass (no engine) into where its time goes, to
// tell the kernels' own loss from the per-step overheads (issue 2). R repetitions, each:
//  * the read-bandwidth probe (256 MiB, best of 5: the same probe as model_bench) right before
//    the steps, so a machine whose bandwidth drifts (a shared host) is compared with itself;
//  * one untimed step (the probe leaves caches and TLBs cold), then 3 full steps (median):
//    run_layers over every layer + logits for one token at position C (local paged attention
//    over C cached tokens, every sequence of a layer in one batch as the device agent runs it;
//    --per-sequence-attention: one attend_local call per sequence, as before the batch);
//  * linear only: the same sequence of GEMM calls (qkv, o, gate_up + silu_mul, down per layer, lm
//    head) back to back on the same pool, nothing else;
//  * each linear kind summed over the layers, each call timed on its own.
// "rest" (full step minus linear only) is the norms, rope, attention, residual adds and the
// thread hand-offs between them. Figures are medians over the repetitions (the mean of the full
// steps too: model_bench reports means, which occasional multi-millisecond stalls of a shared
// host inflate). --memfd puts the weights in a shared memfd mapping as the device arena does.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <span>
#include <string>
#include <vector>

#include "common/units.h"
#include "kernels/kernels.h"
#include "kernels/roofline.h"
#include "model/config.h"
#include "model/forward.h"
#include "model/weight_source.h"
#include "synthetic_model.h"

using namespace kun;

namespace {

double now_us() {
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  std::string preset = "llama-350m";
  int threads = 2, steps = 30;
  std::int64_t context = 48;
  bool memfd = false;
  bool per_sequence_attention = false;
  std::int64_t batch = 1;
  std::string attention_flag;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--preset" && i + 1 < argc) preset = argv[++i];
    else if (a == "--threads" && i + 1 < argc) threads = std::atoi(argv[++i]);
    else if (a == "--steps" && i + 1 < argc) steps = std::atoi(argv[++i]);
    else if (a == "--context" && i + 1 < argc) context = std::atoll(argv[++i]);
    else if (a == "--batch" && i + 1 < argc) batch = std::max<std::int64_t>(1, std::atoll(argv[++i]));
    else if (a == "--memfd") memfd = true;
    else if (a == "--per-sequence-attention") per_sequence_attention = true;
    else if (a == "--attention" && i + 1 < argc) attention_flag = argv[++i];
    else {
      std::fprintf(stderr,
                   "usage: %s [--preset P] [--threads T] [--steps S] [--context C] [--batch B] [--memfd] "
                   "[--per-sequence-attention] [--attention f32|amx]\n",
                   argv[0]);
      return 2;
    }
  }
  if (steps < 1) steps = 1;
  auto config = model::preset_config(preset);
  if (!config.ok()) return 1;
  const model::ModelConfig& c = *config;
  const DType dt = c.dtype;
  const bench::SyntheticModel model_weights(c, memfd);
  const std::vector<model::LayerWeights>& lw = model_weights.layers();
  const model::HeadWeights& hw = model_weights.head();

  kernels::ThreadPool pool(threads);
  // The engine's default KV cache; a workspace for the prompt run (context tokens) and the batch.
  const model::ForwardLimits limits{std::max<std::int64_t>(context, batch), batch, context + 1};
  kernels::AttentionArithmetic arithmetic;
  if (!bench::parse_attention_arithmetic(attention_flag, c.dtype, &arithmetic)) {
    std::fprintf(stderr, "--attention %s: f32, or amx where the CPU has AMX-BF16\n", attention_flag.c_str());
    return 2;
  }
  model::ForwardPass fwd(c, c.dtype, 16, DType::kBF16, arithmetic, &pool, limits);
  // KV: context + 1 tokens per layer, filled by a prompt run first.
  const std::int64_t bs = 16;
  const std::int64_t ctx = context + 1;
  bench::SequenceKvCache kv(c, ctx, bs, fwd.kv_dtype());
  auto weights = [&](std::int64_t l) { return lw[static_cast<std::size_t>(l)]; };
  auto attention = [&](std::int64_t l, std::int64_t, const model::SequenceSlice& s, const float* qkv, float* out) {
    fwd.attend_local(s, qkv, kv.layer(l), out);
  };
  // As the device agent does: every sequence's KV is here, so a layer's attention is one batch.
  auto local_kv = [&](std::int64_t l, std::int64_t, model::LayerKv* out) {
    *out = kv.layer(l);
    return true;
  };
  const std::int64_t H = c.hidden_size;
  const bench::Floats hidden(std::max(ctx, batch) * H);
  const bench::Floats logits(batch * c.vocab_size);
  {
    std::vector<std::int32_t> prompt(static_cast<std::size_t>(context));
    for (std::int64_t t = 0; t < context; ++t) prompt[t] = static_cast<std::int32_t>(3 + (t * 31) % (c.vocab_size - 3));
    fwd.embed(hw, prompt.data(), context, hidden.data());
    const model::SequenceSlice s{0, context};
    fwd.run_layers(0, c.num_layers, std::span(&s, 1), hidden.data(), weights, attention);
  }

  const std::int64_t db = dtype_bytes(dt);
  const std::int64_t step_bytes = (c.num_layers * c.layer_param_count() + c.embedding_param_count()) * db;
  std::printf("%s (%s), %d threads, isa %s, gemm activations %s, batch %lld, context %lld, attention %s (%s); step reads %.1f MB\n",
              preset.c_str(), std::string(dtype_name(dt)).c_str(), threads,
              std::string(kernels::isa_name(kernels::active_isa())).c_str(),
              std::string(kernels::gemm_activations_name(kernels::active_gemm_activations())).c_str(),
              static_cast<long long>(batch), static_cast<long long>(context), per_sequence_attention ? "per sequence" : "batched",
              arithmetic == kernels::AttentionArithmetic::kAmx ? "amx" : "f32",
              static_cast<double>(step_bytes) / 1e6);

  const bench::Floats x(batch * std::max(c.intermediate_size, c.q_dim()) * 2, 0.01f);
  const bench::Floats y(batch * std::max<std::int64_t>(c.vocab_size, 2 * c.intermediate_size));
  const bench::Floats act(batch * c.intermediate_size);
  enum { kQkv, kO, kGateUp, kDown, kHead, kKinds };
  // gate_up as the forward pass runs it: linear_silu_mul (silu_mul fused where linear_silu_mul_fuses).
  const char* names[kKinds] = {"qkv", "o", "gate_up+silu", "down", "lm_head"};
  std::int64_t kind_bytes[kKinds] = {};
  for (const model::LayerWeights& w : lw) {
    kind_bytes[kQkv] += w.qkv.rows * w.qkv.cols * db;
    kind_bytes[kO] += w.o.rows * w.o.cols * db;
    kind_bytes[kGateUp] += w.gate_up.rows * w.gate_up.cols * db;
    kind_bytes[kDown] += w.down.rows * w.down.cols * db;
  }
  kind_bytes[kHead] = hw.lm_head.rows * hw.lm_head.cols * db;
  // The machine may be shared, so every repetition measures the bandwidth right before its steps
  // and each figure is reported as the median of per-repetition values. The first step after
  // the probe is run untimed (the probe's 256 MiB pass leaves the caches and TLBs cold).
  struct Stats {
    std::vector<double> bws, full, lin, full_x, lin_x, kind_us[kKinds], kind_x[kKinds];
  };
  Stats S;
  std::vector<std::int64_t> rows(static_cast<std::size_t>(batch));
  for (std::int64_t b = 0; b < batch; ++b) rows[static_cast<std::size_t>(b)] = b;
  const std::vector<model::SequenceSlice> slices(static_cast<std::size_t>(batch), model::SequenceSlice{context, 1});
  auto step = [&](std::int32_t tok) {
    std::vector<std::int32_t> toks(static_cast<std::size_t>(batch), tok);
    fwd.embed(hw, toks.data(), batch, hidden.data());
    fwd.run_layers(0, c.num_layers, std::span(slices), hidden.data(), weights, attention,
                   per_sequence_attention ? model::LocalKvFn() : model::LocalKvFn(local_kv));
    fwd.logits(hw, hidden.data(), std::span(rows), logits.data());
  };
  for (int i = 0; i < steps + 1; ++i) {
    const double bw = kernels::measure_read_bandwidth_bytes_per_s(&pool, 256 * kMiB);
    step(5);
    // Full decode steps at position `context` (the KV slot is overwritten each time).
    std::vector<double> fulls;
    for (int r = 0; r < 3; ++r) {
      const double t0 = now_us();
      step(6 + r);
      fulls.push_back(now_us() - t0);
    }
    const double full_us = median(fulls);
    // The same linear calls back to back, then again with every call timed on its own.
    double kus[kKinds] = {};
    double lin_us = 0;
    for (int each = 0; each < 2; ++each) {
      auto call = [&](int kind, const kernels::WeightView& w) {
        const double c0 = each ? now_us() : 0.0;
        if (kind == kGateUp) {
          kernels::linear_silu_mul(x.data(), batch, w, y.data(), act.data(), &pool);
        } else {
          kernels::linear(x.data(), batch, w, nullptr, y.data(), &pool);
        }
        if (each) {
          const double d = now_us() - c0;
          kus[kind] += d;
        }
      };
      const double t0 = now_us();
      for (const model::LayerWeights& w : lw) {
        call(kQkv, w.qkv);
        call(kO, w.o);
        call(kGateUp, w.gate_up);
        call(kDown, w.down);
      }
      call(kHead, hw.lm_head);
      if (!each) lin_us = now_us() - t0;
    }
    if (i == 0) continue;  // warm-up
    const double roof_us = static_cast<double>(step_bytes) / bw * 1e6;
    S.bws.push_back(bw / 1e9);
    S.full.push_back(full_us);
    S.lin.push_back(lin_us);
    S.full_x.push_back(roof_us / full_us);
    S.lin_x.push_back(roof_us / lin_us);
    for (int k = 0; k < kKinds; ++k) {
      S.kind_us[k].push_back(kus[k]);
      S.kind_x[k].push_back(static_cast<double>(kind_bytes[k]) / bw * 1e6 / kus[k]);
    }
  }
  {
    std::printf("read bandwidth (256 MiB, best of 5, before each repetition): median %.1f GB/s, min %.1f, max %.1f\n",
                median(S.bws), *std::min_element(S.bws.begin(), S.bws.end()), *std::max_element(S.bws.begin(), S.bws.end()));
    std::printf("%-26s %10s %8s\n", "part (median of reps)", "us", "xBW");
    auto row = [&](const char* name, double us, double ratio) {
      if (ratio > 0) {
        std::printf("%-26s %10.0f %8.2f\n", name, us, ratio);
      } else {
        std::printf("%-26s %10.0f\n", name, us);
      }
    };
    row("full decode step", median(S.full), median(S.full_x));
    double mean_full = 0, mean_roof = 0;
    for (std::size_t i = 0; i < S.full.size(); ++i) {
      mean_full += S.full[i] / static_cast<double>(S.full.size());
      mean_roof += S.full[i] * S.full_x[i] / static_cast<double>(S.full.size());
    }
    row("full decode step (mean)", mean_full, mean_roof / mean_full);
    row("linear calls only", median(S.lin), median(S.lin_x));
    std::vector<double> rest;
    for (std::size_t i = 0; i < S.full.size(); ++i) rest.push_back(S.full[i] - S.lin[i]);
    row("rest (full - linear)", median(rest), 0);
    for (int k = 0; k < kKinds; ++k) {
      row((std::string("  ") + names[k] + " (each timed)").c_str(), median(S.kind_us[k]), median(S.kind_x[k]));
    }
  }
  return 0;
}
