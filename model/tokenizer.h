// Tokenizers: HuggingFace tokenizer.json (byte-level BPE as in Llama 3 / Qwen2, and
// SentencePiece-style BPE with Metaspace/ByteFallback as in Llama 2), SentencePiece
// tokenizer.model, and a deterministic synthetic vocabulary for dummy models.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace kun::model {

struct ChatMessage {
  std::string role;  // "system" | "user" | "assistant"
  std::string content;
};

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  virtual std::vector<std::int32_t> encode(std::string_view text, bool add_special_tokens) const = 0;
  // Decodes ids to UTF-8 text. Invalid byte sequences (a token sequence cut inside a character)
  // become U+FFFD, as HuggingFace does.
  virtual std::string decode(std::span<const std::int32_t> ids, bool skip_special_tokens) const = 0;
  virtual std::int64_t vocab_size() const = 0;
  virtual std::int32_t bos_token_id() const = 0;  // -1 if none
  virtual std::int32_t eos_token_id() const = 0;  // -1 if none
  virtual bool is_special(std::int32_t id) const = 0;
  // Renders a conversation with the model family's chat template (Llama 3, Qwen ChatML,
  // Llama 2 [INST]) into the prompt text; errors for roles the template does not support.
  virtual StatusOr<std::string> apply_chat_template(const std::vector<ChatMessage>& messages,
                                                    bool add_generation_prompt) const = 0;
};

// Turns a stream of token ids into text pieces that never split a UTF-8 character: push()
// returns the text that became final with this token (possibly empty); flush() returns the rest.
class IncrementalDetokenizer {
 public:
  IncrementalDetokenizer(const Tokenizer& tokenizer, bool skip_special_tokens);
  std::string push(std::int32_t id);
  std::string flush();

 private:
  const Tokenizer& tokenizer_;
  bool skip_special_tokens_;
  std::vector<std::int32_t> ids_;
  std::size_t prefix_offset_ = 0;  // ids before this are fully emitted
  std::size_t emitted_bytes_ = 0;  // bytes of decode(ids_[prefix_offset_..]) already emitted
};

// Loads tokenizer.json (or tokenizer.model) from a model directory or a file path, reading
// tokenizer_config.json beside it for the chat template and special tokens when present.
StatusOr<std::unique_ptr<Tokenizer>> load_tokenizer(const std::string& path);
// The same from file contents already in memory: `tokenizer_json` is a tokenizer.json text,
// `config_json` a tokenizer_config.json text or empty; `source` names the file in errors.
StatusOr<std::unique_ptr<Tokenizer>> load_tokenizer_from_json(std::string_view tokenizer_json,
                                                              std::string_view config_json,
                                                              const std::string& source);
// A SentencePiece tokenizer.model (protobuf ModelProto; BPE models, as Llama 2 / Mistral ship).
StatusOr<std::unique_ptr<Tokenizer>> load_sentencepiece_model(std::string_view model_bytes,
                                                              std::string_view config_json,
                                                              const std::string& source);
// A deterministic vocabulary of `vocab_size` ids for synthetic models (same text round-trips).
std::unique_ptr<Tokenizer> synthetic_tokenizer(std::int64_t vocab_size);

// A real byte-level BPE vocabulary (GPT-2 style) of exactly `vocab_size` ids for synthetic models,
// as the texts of a tokenizer.json and its tokenizer_config.json: id 0 "<s>" (BOS, added to every
// encoding), id 1 "</s>" (EOS), ids 2..257 the 256 bytes, then merges in a fixed deterministic
// order (" a".." z", the letter pairs, then longer pieces built from earlier ones), and a ChatML
// chat template. gen-model embeds it in GGUF files, so every GGUF file we write carries a
// vocabulary other readers accept. vocab_size must be at least 258.
struct TokenizerFiles {
  std::string tokenizer_json;
  std::string tokenizer_config_json;
};
TokenizerFiles synthetic_bpe_tokenizer_files(std::int64_t vocab_size);

// The GPT-2 ByteLevel text standing for `bytes` (each byte one printable code point).
std::string byte_level_text(std::string_view bytes);

}  // namespace kun::model
