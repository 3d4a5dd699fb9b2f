// `kunserve serve` (OpenAI-compatible HTTP over an in-process cluster) and `kunserve simulate`
// (the same policies on a modelled GPU cluster).
#pragma once

#include <CLI/CLI.hpp>

namespace kun::tools {
void add_serve_command(CLI::App* app, int* exit_code);
void add_simulate_command(CLI::App* app, int* exit_code);
// `kunserve calibrate`: measures this machine's CPU device, writes a simulator device profile.
void add_calibrate_command(CLI::App* app, int* exit_code);
}  // namespace kun::tools
