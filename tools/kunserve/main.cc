// kunserve: the command-line entry point (DESIGN.md section 4, tools/).
#include <CLI/CLI.hpp>

#include "tools/kunserve/bench_command.h"
#include "tools/kunserve/generate_command.h"
#include "tools/kunserve/serve_command.h"

int main(int argc, char** argv) {
  CLI::App app{"kunserve: LLM serving that drops replicated parameters instead of KV cache under overload"};
  app.require_subcommand(1);
  int exit_code = 0;
  kun::tools::add_gen_model_command(&app, &exit_code);
  kun::tools::add_generate_command(&app, &exit_code);
  kun::tools::add_bench_command(&app, &exit_code);
  kun::tools::add_serve_command(&app, &exit_code);
  kun::tools::add_simulate_command(&app, &exit_code);
  kun::tools::add_calibrate_command(&app, &exit_code);
  CLI11_PARSE(app, argc, argv);
  return exit_code;
}
