// Trace selection and shaping shared by `kunserve bench` and `kunserve simulate`.
#pragma once

#include <cstdint>
#include <string>

#include <CLI/CLI.hpp>

#include "common/status.h"
#include "workload/trace.h"

namespace kun::tools {

struct TraceArgs {
  std::string source = "builtin";  // builtin | PATH (Azure or BurstGPT CSV) | poisson | gamma | mmpp
  double rate_rps = 4.0;
  double cv = 4.0;
  double duration_s = 30.0;
  double time_scale = 8.0;     // arrivals compressed by this factor (file traces)
  double max_gap_s = 0.0;      // > 0: idle gaps between arrivals capped at this (after compression)
  double length_scale = 0.05;  // prompt lengths scaled by this factor
  double output_scale = 1.0;   // output lengths scaled by this factor
  double upscale = 1.0;
  std::int64_t max_prompt = 512;
  std::int64_t max_output = 64;
  std::int64_t max_requests = 0;
  std::uint64_t seed = 0;
  void add_to(CLI::App* cmd);
  StatusOr<workload::Trace> load(std::int64_t max_context) const;
};

}  // namespace kun::tools
