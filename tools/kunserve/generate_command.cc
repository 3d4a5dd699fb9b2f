#include "tools/kunserve/generate_command.h"

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <iostream>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/log.h"
#include "common/units.h"
#include "kernels/kernels.h"
#include "model/config.h"
#include "model/gguf.h"
#include "model/gguf_tokenizer.h"
#include "runtime/single_instance.h"
#include "tools/kunserve/model_args.h"

namespace kun::tools {
namespace {

struct GenerateArgs {
  ModelArgs model;
  std::int64_t prompt_len = 16;
  std::string prompt_tokens;
  std::string prompt;     // text, encoded with the model's tokenizer
  std::string tokenizer;  // path; default: the model's own (GGUF or directory), else synthetic
  std::int64_t max_tokens = 32;
  int threads = 2;
  bool json = false;
  float temperature = 0.0f;
  float top_p = 1.0f;
  std::int64_t top_k = 0;
  std::uint64_t sample_seed = 0;
  std::int64_t block_size = 16;
  std::int64_t capacity_mib = 0;
  bool ignore_eos = true;
};

StatusOr<std::vector<std::int32_t>> parse_tokens(const std::string& text) {
  std::vector<std::int32_t> out;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    try {
      std::size_t used = 0;
      long v = std::stol(item, &used);
      if (used != item.size()) return invalid_argument("--prompt-tokens: '" + item + "' is not an integer");
      out.push_back(static_cast<std::int32_t>(v));
    } catch (const std::exception&) {
      return invalid_argument("--prompt-tokens: '" + item + "' is not an integer");
    }
  }
  return out;
}

// Deterministic prompt of n token ids in [3, vocab) for --prompt-len.
std::vector<std::int32_t> synthetic_prompt(std::int64_t n, std::int64_t vocab) {
  std::vector<std::int32_t> out;
  std::uint64_t x = 0x12345678u;
  for (std::int64_t i = 0; i < n; ++i) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    out.push_back(static_cast<std::int32_t>(3 + (x >> 33) % static_cast<std::uint64_t>(vocab - 3)));
  }
  return out;
}

Status run_generate(const GenerateArgs& a) {
  KUN_ASSIGN_OR_RETURN(auto weights, a.model.open());
  const model::ModelConfig& config = weights->config();
  KUN_ASSIGN_OR_RETURN(auto tokenizer, a.model.open_tokenizer(a.tokenizer, config.vocab_size));
  std::vector<std::int32_t> prompt;
  if (!a.prompt.empty() && !a.prompt_tokens.empty()) return invalid_argument("give --prompt or --prompt-tokens, not both");
  if (!a.prompt.empty()) {
    prompt = tokenizer->encode(a.prompt, true);
    if (prompt.empty()) return invalid_argument("--prompt encodes to no tokens");
  } else if (!a.prompt_tokens.empty()) {
    KUN_ASSIGN_OR_RETURN(prompt, parse_tokens(a.prompt_tokens));
  } else {
    prompt = synthetic_prompt(a.prompt_len, config.vocab_size);
  }
  KUN_ASSIGN_OR_RETURN(DType dtype, a.model.device_dtype(config));
  runtime::InstanceOptions opt;
  opt.device.name = "dev0";
  opt.device.num_threads = a.threads;
  opt.device.kv_block_size = a.block_size;
  opt.device.weight_dtype = dtype;
  KUN_ASSIGN_OR_RETURN(opt.device.kv_dtype, a.model.kv_dtype());
  const std::int64_t total_tokens = static_cast<std::int64_t>(prompt.size()) + a.max_tokens;
  opt.scheduler.max_model_len = config.max_position_embeddings;
  opt.scheduler.max_num_batched_tokens = std::max<std::int64_t>(2048, static_cast<std::int64_t>(prompt.size()));
  runtime::fit_workspace_to(opt.scheduler, config, &opt.device);  // activations for the largest step
  opt.device.capacity_bytes = a.capacity_mib > 0 ? a.capacity_mib * kMiB
                                                 : capacity_for(config, dtype, opt.device.kv_dtype, total_tokens, a.block_size,
                                                                opt.device.page_bytes) +
                                                       runtime::device_workspace_bytes(config, opt.device);
  opt.model_name = a.model.display_name();
  SteadyClock clock;
  const auto load_start = std::chrono::steady_clock::now();
  KUN_ASSIGN_OR_RETURN(auto instance, runtime::SingleInstance::create(opt, *weights, &clock));
  const double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - load_start).count();

  engine::RequestSpec spec;
  spec.prompt_tokens = prompt;
  spec.max_tokens = a.max_tokens;
  spec.ignore_eos = a.ignore_eos;
  spec.sampling.temperature = a.temperature;
  spec.sampling.top_p = a.top_p;
  spec.sampling.top_k = a.top_k;
  spec.sampling.seed = a.sample_seed;
  std::vector<std::int32_t> tokens;
  engine::TokenEvent final_event;
  KUN_ASSIGN_OR_RETURN(RequestId id, instance->engine().submit(spec, [&](const engine::TokenEvent& ev) {
    if (ev.token >= 0) tokens.push_back(ev.token);
    if (ev.finished) final_event = ev;
  }));
  (void)id;
  while (instance->engine().run_step()) {
  }
  if (final_event.reason == engine::FinishReason::kError) return final_event.error;
  const auto& t = final_event.timings;
  const double prefill_s = static_cast<double>(t.first_token_us - t.first_scheduled_us) / 1e6;
  const double decode_s = static_cast<double>(t.finish_us - t.first_token_us) / 1e6;
  const double prefill_tps = prefill_s > 0 ? static_cast<double>(prompt.size()) / prefill_s : 0.0;
  const double decode_tps = decode_s > 0 && tokens.size() > 1 ? static_cast<double>(tokens.size() - 1) / decode_s : 0.0;
  if (a.json) {
    nlohmann::json j;
    j["model"] = opt.model_name;
    j["isa"] = std::string(kernels::isa_name(kernels::active_isa()));
    j["gemm_activations"] = std::string(kernels::gemm_activations_name(kernels::active_gemm_activations()));
    j["threads"] = a.threads;
    j["prompt_tokens"] = prompt.size();
    j["prompt_token_ids"] = prompt;
    j["tokens"] = tokens;
    j["text"] = tokenizer->decode(tokens, true);
    j["finish_reason"] = engine::finish_reason_name(final_event.reason);
    j["load_s"] = load_s;
    j["prefill_s"] = prefill_s;
    j["decode_s"] = decode_s;
    j["prefill_tokens_per_s"] = prefill_tps;
    j["decode_tokens_per_s"] = decode_tps;
    std::cout << j.dump() << std::endl;
  } else {
    std::cout << "model: " << opt.model_name << " (" << config.num_layers << " layers, hidden " << config.hidden_size
              << ", " << dtype_name(dtype) << ", isa " << kernels::isa_name(kernels::active_isa()) << ", gemm activations "
              << kernels::gemm_activations_name(kernels::active_gemm_activations()) << ", " << a.threads << " threads)\n";
    std::cout << "prompt: " << prompt.size() << " tokens\ntokens:";
    for (std::int32_t tok : tokens) std::cout << ' ' << tok;
    std::cout << "\ntext: " << tokenizer->decode(tokens, true);
    std::cout << "\nfinish: " << engine::finish_reason_name(final_event.reason) << "\n";
    std::printf("load %.2f s, prefill %.1f tokens/s, decode %.1f tokens/s\n", load_s, prefill_tps, decode_tps);
  }
  return ok_status();
}

struct GenModelArgs {
  std::string preset = "tiny";
  std::string format = "safetensors";
  std::string dtype = "bf16";
  std::uint64_t seed = 0;
  std::string out;
  std::int64_t shard_mib = 0;
  std::string tokenizer;  // tokenizer.json to embed (gguf): sets the vocabulary size and bos/eos
};

Status run_gen_model(const GenModelArgs& a) {
  KUN_ASSIGN_OR_RETURN(model::ModelConfig config, model::preset_config(a.preset));
  DType dtype;
  if (!parse_dtype(a.dtype, &dtype)) return invalid_argument("unknown --dtype '" + a.dtype + "' (f32 | f16 | bf16)");
  config.dtype = dtype;
  model::GgufTokenizerMetadata vocab;
  if (!a.tokenizer.empty() && a.format != "gguf") {
    return invalid_argument("--tokenizer is embedded in GGUF files only (--format gguf)");
  }
  if (a.format == "gguf" && a.tokenizer != "none") {
    if (a.tokenizer.empty()) {
      // Every GGUF file carries a vocabulary (other readers refuse one without): a real byte-level
      // BPE of the preset's vocabulary size.
      const model::TokenizerFiles files = model::synthetic_bpe_tokenizer_files(config.vocab_size);
      KUN_ASSIGN_OR_RETURN(vocab, model::gguf_tokenizer_metadata_from_json(files.tokenizer_json, files.tokenizer_config_json,
                                                                           "synthetic BPE vocabulary"));
    } else {
      KUN_ASSIGN_OR_RETURN(vocab, model::gguf_tokenizer_metadata(a.tokenizer));
    }
    config.vocab_size = vocab.vocab_size;
    config.bos_token_id = vocab.bos_token_id;
    config.eos_token_id = vocab.eos_token_id;
  }
  auto source = model::synthetic_weights(config, a.seed);
  if (a.format == "safetensors") {
    KUN_RETURN_IF_ERROR(model::write_safetensors_dir(*source, dtype, a.out, a.shard_mib * kMiB));
  } else if (a.format == "gguf") {
    KUN_RETURN_IF_ERROR(model::write_gguf_model(*source, dtype, a.out, vocab.metadata));
  } else {
    return invalid_argument("unknown --format '" + a.format + "' (safetensors | gguf)");
  }
  std::cout << "wrote " << a.preset << " (" << config.total_param_count() << " parameters, " << a.dtype << ") as "
            << a.format << " to " << a.out << std::endl;
  return ok_status();
}

}  // namespace

void add_generate_command(CLI::App* app, int* exit_code) {
  auto args = std::make_shared<GenerateArgs>();
  CLI::App* cmd = app->add_subcommand("generate", "Generate tokens from a prompt on one device");
  args->model.add_to(cmd);
  cmd->add_option("--prompt-len", args->prompt_len, "length of a synthetic prompt");
  cmd->add_option("--prompt-tokens", args->prompt_tokens, "comma-separated prompt token ids");
  cmd->add_option("--prompt", args->prompt, "prompt text, encoded with the model's tokenizer");
  cmd->add_option("--tokenizer", args->tokenizer,
                  "tokenizer.json / tokenizer.model / .gguf (default: the model's own, a GGUF file's embedded "
                  "tokenizer included; else synthetic)");
  cmd->add_option("--max-tokens", args->max_tokens, "tokens to generate");
  cmd->add_option("--threads", args->threads, "kernel threads");
  cmd->add_flag("--json", args->json, "print one JSON object");
  cmd->add_option("--temperature", args->temperature, "0: greedy");
  cmd->add_option("--top-p", args->top_p);
  cmd->add_option("--top-k", args->top_k);
  cmd->add_option("--sample-seed", args->sample_seed);
  cmd->add_option("--block-size", args->block_size, "KV block size in tokens");
  cmd->add_option("--capacity-mib", args->capacity_mib, "device capacity (default: parameters + KV of the request)");
  cmd->add_option("--ignore-eos", args->ignore_eos, "keep generating past EOS (default true)");
  cmd->callback([args, exit_code] {
    Status s = run_generate(*args);
    if (!s.ok()) {
      std::cerr << "kunserve generate: " << s.to_string() << std::endl;
      *exit_code = 1;
    }
  });
}

void add_gen_model_command(CLI::App* app, int* exit_code) {
  auto args = std::make_shared<GenModelArgs>();
  CLI::App* cmd = app->add_subcommand("gen-model", "Write a synthetic model in a real format");
  cmd->add_option("--preset", args->preset, "tiny | tiny-qwen2 | tiny-llama3 | llama-350m | llama-1b");
  cmd->add_option("--format", args->format, "safetensors | gguf");
  cmd->add_option("--dtype", args->dtype, "bf16 | f16 | f32");
  cmd->add_option("--seed", args->seed);
  cmd->add_option("--out", args->out, "output directory (safetensors) or file (gguf)")->required();
  cmd->add_option("--shard-mib", args->shard_mib, "max safetensors shard size (0: one file)");
  cmd->add_option("--tokenizer", args->tokenizer,
                  "tokenizer.json (file or directory) to embed as tokenizer.ggml.* (gguf); the model takes its "
                  "vocabulary size and bos/eos ids. Default: a synthetic byte-level BPE vocabulary of the "
                  "preset's size; 'none' writes no vocabulary");
  cmd->callback([args, exit_code] {
    Status s = run_gen_model(*args);
    if (!s.ok()) {
      std::cerr << "kunserve gen-model: " << s.to_string() << std::endl;
      *exit_code = 1;
    }
  });
}

}  // namespace kun::tools
