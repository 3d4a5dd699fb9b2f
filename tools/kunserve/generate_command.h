// `kunserve generate`: load a model on one device and generate from a prompt of token ids.
#pragma once

#include <CLI/CLI.hpp>

namespace kun::tools {
// Registers the subcommand; the callback runs it and sets *exit_code.
void add_generate_command(CLI::App* app, int* exit_code);
void add_gen_model_command(CLI::App* app, int* exit_code);
}  // namespace kun::tools
