#include "tools/kunserve/trace_args.h"

#include <algorithm>

#include "tools/kunserve/builtin_trace.h"
#include "workload/generators.h"

namespace kun::tools {

void TraceArgs::add_to(CLI::App* cmd) {
  cmd->add_option("--trace", source, "builtin | PATH (Azure or BurstGPT CSV) | poisson | gamma | mmpp");
  cmd->add_option("--rate", rate_rps, "generated traces: requests/s");
  cmd->add_option("--cv", cv, "gamma trace: inter-arrival CV");
  cmd->add_option("--duration-s", duration_s, "generated traces: duration");
  cmd->add_option("--time-scale", time_scale, "compress arrivals by this factor");
  cmd->add_option("--max-gap-s", max_gap_s, "cap idle gaps between arrivals at this many seconds (0: keep them)");
  cmd->add_option("--length-scale", length_scale, "scale prompt lengths by this factor");
  cmd->add_option("--output-scale", output_scale, "scale output lengths by this factor (long generations)");
  cmd->add_option("--upscale", upscale, "TraceUpscaler-style request up-scaling factor");
  cmd->add_option("--max-prompt", max_prompt);
  cmd->add_option("--max-output", max_output);
  cmd->add_option("--max-requests", max_requests);
  cmd->add_option("--trace-seed", seed, "seed of generated traces, up-scaling and prompt token ids");
}

StatusOr<workload::Trace> TraceArgs::load(std::int64_t max_context) const {
  const TraceArgs& a = *this;
  workload::Trace trace;
  if (a.source == "builtin") {
    KUN_ASSIGN_OR_RETURN(trace, workload::parse_azure_csv(builtin_azure_code_window_csv(), "azure-code-burst-window"));
  } else if (a.source == "poisson" || a.source == "gamma" || a.source == "mmpp") {
    workload::Trace lengths_source;
    KUN_ASSIGN_OR_RETURN(lengths_source, workload::parse_azure_csv(builtin_azure_code_window_csv(), "azure-code-burst-window"));
    const auto duration_us = static_cast<std::int64_t>(a.duration_s * 1e6);
    if (a.source == "poisson") {
      workload::PoissonSpec spec;
      spec.rate_rps = a.rate_rps;
      spec.duration_us = duration_us;
      spec.seed = a.seed;
      spec.lengths = workload::LengthModel::empirical(lengths_source);
      trace = workload::generate_poisson(spec);
    } else if (a.source == "gamma") {
      workload::GammaSpec spec;
      spec.rate_rps = a.rate_rps;
      spec.cv = a.cv;
      spec.duration_us = duration_us;
      spec.seed = a.seed;
      spec.lengths = workload::LengthModel::empirical(lengths_source);
      trace = workload::generate_gamma(spec);
    } else {
      workload::MmppSpec spec;
      spec.duration_us = duration_us;
      spec.seed = a.seed;
      spec.lengths = workload::LengthModel::empirical(lengths_source);
      trace = workload::generate_mmpp(spec);
    }
  } else {
    KUN_ASSIGN_OR_RETURN(trace, workload::read_trace_csv(a.source));
  }
  if (a.time_scale != 1.0 && a.source != "poisson" && a.source != "gamma" && a.source != "mmpp") {
    trace = workload::time_compress(trace, a.time_scale);
  }
  if (a.max_gap_s > 0.0) trace = workload::cap_idle_gaps(trace, static_cast<std::int64_t>(a.max_gap_s * 1e6));
  if (a.upscale != 1.0) trace = workload::upscale(trace, a.upscale, a.seed);
  for (auto& r : trace.requests) {
    r.prompt_tokens = std::max<std::int32_t>(1, static_cast<std::int32_t>(r.prompt_tokens * a.length_scale));
    r.output_tokens = std::max<std::int32_t>(1, static_cast<std::int32_t>(r.output_tokens * a.output_scale));
  }
  trace = workload::clip_lengths(trace, static_cast<std::int32_t>(std::min<std::int64_t>(max_context, a.max_prompt + a.max_output)),
                                 static_cast<std::int32_t>(a.max_output));
  if (a.max_requests > 0 && static_cast<std::int64_t>(trace.size()) > a.max_requests) {
    trace.requests.resize(static_cast<std::size_t>(a.max_requests));
  }
  return trace;
}

}  // namespace kun::tools
