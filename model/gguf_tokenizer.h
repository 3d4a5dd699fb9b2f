// The tokenizer embedded in a GGUF file (tokenizer.ggml.*), both ways.
//
// Reading: tokenizer.ggml.model "llama" (SentencePiece-style BPE: tokens, scores, token_type,
// byte fallback through <0xNN> tokens) or "gpt2" (byte-level BPE: tokens, merges, token_type,
// tokenizer.ggml.pre naming the pre-tokenizer regex: "llama-bpe" or "llama3" (Llama 3), "qwen2",
// or "gpt-2"/"default"; "gpt2", which this writer wrote before, too), special token ids (bos, eos, unknown, padding), add_bos_token /
// add_eos_token / add_space_prefix, and tokenizer.chat_template. The vocabulary is handed to the
// tokenizer.json / tokenizer.model implementation of tokenizer.h, so a GGUF tokenizer encodes and
// decodes exactly as the same vocabulary does from those files.
//
// Writing: the same keys from a HuggingFace tokenizer.json (with tokenizer_config.json beside
// it), as llama.cpp's converter lays them out, so other GGUF readers load the vocabulary.
#pragma once

#include <memory>
#include <string>

#include "common/status.h"
#include "model/gguf.h"
#include "model/tokenizer.h"

namespace kun::model {

// The file's tokenizer; kNotFound when it has no tokenizer.ggml.model (use another tokenizer),
// kInvalidArgument / kDataLoss / kUnimplemented naming the file and key for a malformed or
// unsupported vocabulary.
StatusOr<std::unique_ptr<Tokenizer>> load_gguf_tokenizer(const GgufFile& file);
StatusOr<std::unique_ptr<Tokenizer>> load_gguf_tokenizer(const std::string& path);

// A vocabulary to embed in a GGUF file, and the special token ids it defines.
struct GgufTokenizerMetadata {
  GgufMetadata metadata;        // tokenizer.ggml.* and tokenizer.chat_template
  std::int64_t vocab_size = 0;  // number of tokens (the model's embedding rows must match)
  std::int32_t bos_token_id = -1;
  std::int32_t eos_token_id = -1;
};

// tokenizer.ggml.* keys for the tokenizer.json at `path` (a file or a model directory; BPE
// models only: byte-level as Llama 3 / Qwen2 / GPT-2, or SentencePiece-style with byte fallback
// as Llama 2). Errors name the file for anything GGUF cannot express.
StatusOr<GgufTokenizerMetadata> gguf_tokenizer_metadata(const std::string& path);
// The same from the files' texts (`config_json` may be empty); `source` names them in errors.
StatusOr<GgufTokenizerMetadata> gguf_tokenizer_metadata_from_json(std::string_view tokenizer_json,
                                                                   std::string_view config_json,
                                                                   const std::string& source);

}  // namespace kun::model
