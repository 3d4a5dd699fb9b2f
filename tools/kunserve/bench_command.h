// `kunserve bench`: replays a trace under one or more policies and prints a side-by-side report.
// In-process mode starts a ClusterRuntime per policy in this process (the burst demo); server
// mode drives any OpenAI-compatible server over HTTP with the streaming load generator.
#pragma once

#include <CLI/CLI.hpp>

namespace kun::tools {
void add_bench_command(CLI::App* app, int* exit_code);
}  // namespace kun::tools
