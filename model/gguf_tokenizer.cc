#include "model/gguf_tokenizer.h"
#include "model/weight_source.h"

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>
#include <unordered_map>

#include <nlohmann/json.hpp>

namespace kun::model {
namespace {

using json = nlohmann::json;

// tokenizer.ggml.token_type values (llama.cpp's llama_token_type, SentencePiece's Type).
constexpr std::int64_t kTokenNormal = 1;
constexpr std::int64_t kTokenUnknown = 2;
constexpr std::int64_t kTokenControl = 3;
constexpr std::int64_t kTokenUserDefined = 4;
constexpr std::int64_t kTokenByte = 6;

// Pre-tokenizer split patterns by tokenizer.ggml.pre name (the ones HuggingFace ships for these
// families; the same strings appear in their tokenizer.json files).
constexpr const char* kLlama3Pattern =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
constexpr const char* kQwen2Pattern =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

std::string join_path(const GgufFile& f, std::string_view key) { return f.path() + ": " + std::string(key); }

// A required array of `element` values.
StatusOr<const std::vector<GgufValue>*> array_of(const GgufFile& f, std::string_view key, GgufValueType element) {
  const GgufValue* v = f.find_key(key);
  if (v == nullptr) return invalid_argument(join_path(f, key) + " is missing");
  if (v->type != GgufValueType::kArray || v->array_type != element) {
    return invalid_argument(join_path(f, key) + " is not an array of the expected type");
  }
  return &v->array;
}

// An optional token id in [0, n); -1 when absent.
StatusOr<std::int64_t> token_id(const GgufFile& f, std::string_view key, std::int64_t n) {
  const GgufValue* v = f.find_key(key);
  if (v == nullptr) return std::int64_t{-1};
  KUN_ASSIGN_OR_RETURN(std::int64_t id, f.get_int(key));
  if (id < 0 || id >= n) {
    return invalid_argument(join_path(f, key) + " = " + std::to_string(id) + " is outside the vocabulary of " +
                            std::to_string(n) + " tokens");
  }
  return id;
}

bool bool_or(const GgufFile& f, std::string_view key, bool fallback) {
  const GgufValue* v = f.find_key(key);
  if (v == nullptr || v->type != GgufValueType::kBool) return fallback;
  return v->i != 0;
}

// Protocol buffer encoding, enough for SentencePiece's ModelProto.
void put_varint(std::string& out, std::uint64_t v) {
  while (v >= 0x80) {
    out.push_back(static_cast<char>((v & 0x7F) | 0x80));
    v >>= 7;
  }
  out.push_back(static_cast<char>(v));
}
void put_key(std::string& out, int field, int wire) { put_varint(out, static_cast<std::uint64_t>(field) << 3 | static_cast<unsigned>(wire)); }
void put_bytes(std::string& out, int field, std::string_view bytes) {
  put_key(out, field, 2);
  put_varint(out, bytes.size());
  out.append(bytes);
}
void put_int(std::string& out, int field, std::int64_t v) {
  put_key(out, field, 0);
  put_varint(out, static_cast<std::uint64_t>(v));
}
void put_float(std::string& out, int field, float v) {
  put_key(out, field, 5);
  char b[4];
  std::memcpy(b, &v, 4);
  out.append(b, 4);
}

StatusOr<std::unique_ptr<Tokenizer>> load_llama_vocab(const GgufFile& f, const std::vector<GgufValue>& tokens,
                                                      const json& config) {
  const std::size_t n = tokens.size();
  KUN_ASSIGN_OR_RETURN(const auto* scores, array_of(f, "tokenizer.ggml.scores", GgufValueType::kFloat32));
  KUN_ASSIGN_OR_RETURN(const auto* types, array_of(f, "tokenizer.ggml.token_type", GgufValueType::kInt32));
  if (scores->size() != n || types->size() != n) {
    return invalid_argument(f.path() + ": tokenizer.ggml.scores / token_type have " + std::to_string(scores->size()) +
                            " / " + std::to_string(types->size()) + " entries for " + std::to_string(n) + " tokens");
  }
  KUN_ASSIGN_OR_RETURN(std::int64_t unk, token_id(f, "tokenizer.ggml.unknown_token_id", static_cast<std::int64_t>(n)));
  KUN_ASSIGN_OR_RETURN(std::int64_t bos, token_id(f, "tokenizer.ggml.bos_token_id", static_cast<std::int64_t>(n)));
  KUN_ASSIGN_OR_RETURN(std::int64_t eos, token_id(f, "tokenizer.ggml.eos_token_id", static_cast<std::int64_t>(n)));
  // The vocabulary as a SentencePiece BPE ModelProto (tokenizer.h reads those).
  std::string proto;
  bool byte_fallback = false;
  for (std::size_t i = 0; i < n; ++i) {
    std::string piece;
    put_bytes(piece, 1, tokens[i].s);
    put_float(piece, 2, static_cast<float>((*scores)[i].f));
    put_int(piece, 3, (*types)[i].i);
    byte_fallback = byte_fallback || (*types)[i].i == kTokenByte;
    put_bytes(proto, 1, piece);
  }
  std::string trainer;
  put_int(trainer, 3, 2);  // BPE
  put_int(trainer, 35, byte_fallback ? 1 : 0);
  put_int(trainer, 40, unk);
  put_int(trainer, 41, bos);
  put_int(trainer, 42, eos);
  put_bytes(proto, 2, trainer);
  std::string normalizer;
  put_int(normalizer, 3, bool_or(f, "tokenizer.ggml.add_space_prefix", true) ? 1 : 0);
  put_int(normalizer, 4, 0);  // llama.cpp keeps runs of spaces
  put_bytes(proto, 3, normalizer);
  return load_sentencepiece_model(proto, config.dump(), f.path());
}

StatusOr<std::unique_ptr<Tokenizer>> load_gpt2_vocab(const GgufFile& f, const std::vector<GgufValue>& tokens,
                                                     const json& config) {
  const std::size_t n = tokens.size();
  KUN_ASSIGN_OR_RETURN(const auto* merges, array_of(f, "tokenizer.ggml.merges", GgufValueType::kString));
  const std::vector<GgufValue>* types = nullptr;
  if (f.find_key("tokenizer.ggml.token_type") != nullptr) {
    KUN_ASSIGN_OR_RETURN(types, array_of(f, "tokenizer.ggml.token_type", GgufValueType::kInt32));
    if (types->size() != n) {
      return invalid_argument(f.path() + ": tokenizer.ggml.token_type has " + std::to_string(types->size()) +
                              " entries for " + std::to_string(n) + " tokens");
    }
  }
  std::string pre = "default";
  if (f.find_key("tokenizer.ggml.pre") != nullptr) {
    KUN_ASSIGN_OR_RETURN(pre, f.get_string("tokenizer.ggml.pre"));
  }
  json byte_level = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", true}};
  json pre_tokenizer;
  bool ignore_merges = false;
  if (pre == "llama-bpe" || pre == "llama3" || pre == "qwen2") {
    byte_level["use_regex"] = false;
    const char* pattern = pre == "qwen2" ? kQwen2Pattern : kLlama3Pattern;
    pre_tokenizer = {{"type", "Sequence"},
                     {"pretokenizers",
                      json::array({json{{"type", "Split"},
                                        {"pattern", {{"Regex", pattern}}},
                                        {"behavior", "Isolated"},
                                        {"invert", false}},
                                   byte_level})}};
    ignore_merges = pre != "qwen2";
  } else if (pre == "default" || pre == "gpt-2" || pre == "gpt2") {
    // "gpt-2" is llama.cpp's name for GPT-2's pattern; "gpt2" is what this writer wrote before it
    // used llama.cpp's names (llama.cpp rejects it), still read.
    pre_tokenizer = byte_level;
  } else {
    return unimplemented(f.path() + ": tokenizer.ggml.pre '" + pre +
                         "' is not supported (llama-bpe, llama3, qwen2, gpt-2 or default)");
  }
  json vocab = json::object();
  json added = json::array();
  for (std::size_t i = 0; i < n; ++i) {
    const std::string& text = tokens[i].s;
    const std::int64_t type = types != nullptr ? (*types)[i].i : kTokenNormal;
    if (type == kTokenControl || type == kTokenUserDefined || type == kTokenUnknown) {
      added.push_back({{"id", i}, {"content", text}, {"special", type != kTokenUserDefined}, {"single_word", false},
                       {"lstrip", false}, {"rstrip", false}, {"normalized", type == kTokenUserDefined}});
    }
    if (!vocab.contains(text)) vocab[text] = i;
  }
  json merge_list = json::array();
  for (const GgufValue& m : *merges) merge_list.push_back(m.s);
  json tokenizer = {
      {"model",
       {{"type", "BPE"}, {"vocab", std::move(vocab)}, {"merges", std::move(merge_list)}, {"ignore_merges", ignore_merges},
        {"byte_fallback", false}, {"fuse_unk", false}, {"unk_token", nullptr}}},
      {"added_tokens", std::move(added)},
      {"normalizer", nullptr},
      {"pre_tokenizer", std::move(pre_tokenizer)},
      {"decoder", {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}}}};
  return load_tokenizer_from_json(tokenizer.dump(), config.dump(), f.path());
}

}  // namespace

StatusOr<std::unique_ptr<Tokenizer>> load_gguf_tokenizer(const GgufFile& f) {
  if (f.find_key("tokenizer.ggml.model") == nullptr) return not_found(f.path() + ": no tokenizer.ggml.model");
  KUN_ASSIGN_OR_RETURN(std::string kind, f.get_string("tokenizer.ggml.model"));
  KUN_ASSIGN_OR_RETURN(const auto* tokens, array_of(f, "tokenizer.ggml.tokens", GgufValueType::kString));
  if (tokens->empty()) return invalid_argument(f.path() + ": tokenizer.ggml.tokens is empty");
  const auto n = static_cast<std::int64_t>(tokens->size());
  // Special tokens and options, as tokenizer_config.json would give them.
  json config = json::object();
  KUN_ASSIGN_OR_RETURN(std::int64_t bos, token_id(f, "tokenizer.ggml.bos_token_id", n));
  KUN_ASSIGN_OR_RETURN(std::int64_t eos, token_id(f, "tokenizer.ggml.eos_token_id", n));
  KUN_ASSIGN_OR_RETURN(std::int64_t pad, token_id(f, "tokenizer.ggml.padding_token_id", n));
  if (bos >= 0) config["bos_token"] = (*tokens)[static_cast<std::size_t>(bos)].s;
  if (eos >= 0) config["eos_token"] = (*tokens)[static_cast<std::size_t>(eos)].s;
  if (pad >= 0) config["pad_token"] = (*tokens)[static_cast<std::size_t>(pad)].s;
  config["add_bos_token"] = bool_or(f, "tokenizer.ggml.add_bos_token", kind == "llama");
  config["add_eos_token"] = bool_or(f, "tokenizer.ggml.add_eos_token", false);
  if (f.find_key("tokenizer.chat_template") != nullptr) {
    KUN_ASSIGN_OR_RETURN(std::string tmpl, f.get_string("tokenizer.chat_template"));
    config["chat_template"] = tmpl;
  }
  if (kind == "llama") return load_llama_vocab(f, *tokens, config);
  if (kind == "gpt2") return load_gpt2_vocab(f, *tokens, config);
  return unimplemented(f.path() + ": tokenizer.ggml.model '" + kind + "' is not supported (llama or gpt2)");
}

StatusOr<std::unique_ptr<Tokenizer>> load_gguf_tokenizer(const std::string& path) {
  KUN_ASSIGN_OR_RETURN(auto file, GgufFile::open(path));
  return load_gguf_tokenizer(*file);
}

// ---------------------------------------------------------------------------------------------
// Writing

namespace {

StatusOr<std::string> read_text(const std::filesystem::path& p) {
  return read_regular_text_file(p.string());  // only regular files: a FIFO would block forever
}

GgufValue string_array(std::vector<std::string> values) {
  GgufValue v;
  v.type = GgufValueType::kArray;
  v.array_type = GgufValueType::kString;
  v.array.reserve(values.size());
  for (auto& s : values) v.array.push_back(GgufValue::str(std::move(s)));
  return v;
}

template <typename T, typename Make>
GgufValue array_value(GgufValueType element, const std::vector<T>& values, Make make) {
  GgufValue v;
  v.type = GgufValueType::kArray;
  v.array_type = element;
  v.array.reserve(values.size());
  for (const T& x : values) v.array.push_back(make(x));
  return v;
}

// Every {"type": ...} step of a normalizer / pre-tokenizer / decoder, flattening Sequences.
void collect_steps(const json& node, std::vector<const json*>* out) {
  if (!node.is_object()) return;
  for (const char* key : {"normalizers", "pretokenizers", "decoders"}) {
    if (auto it = node.find(key); it != node.end() && it->is_array()) {
      for (const json& e : *it) collect_steps(e, out);
      return;
    }
  }
  out->push_back(&node);
}

bool has_step(const json& node, std::string_view type) {
  std::vector<const json*> steps;
  collect_steps(node, &steps);
  return std::any_of(steps.begin(), steps.end(), [&](const json* s) { return s->value("type", "") == type; });
}

bool is_byte_piece(const std::string& s) {
  return s.size() == 6 && s.rfind("<0x", 0) == 0 && s[5] == '>' && std::isxdigit(static_cast<unsigned char>(s[3])) &&
         std::isxdigit(static_cast<unsigned char>(s[4]));
}

}  // namespace

namespace {

// `text` is a tokenizer.json, `config_text` its tokenizer_config.json (or empty); `source` names
// the tokenizer.json in errors.
StatusOr<GgufTokenizerMetadata> tokenizer_metadata(std::string_view text, std::string_view config_text,
                                                   const std::string& source) {
  const json j = json::parse(text.begin(), text.end(), nullptr, false);
  if (j.is_discarded() || !j.is_object() || !j.contains("model") || !j["model"].is_object()) {
    return invalid_argument(source + ": not a tokenizer.json object with a model");
  }
  const json& model = j["model"];
  if (model.value("type", "") != "BPE" || !model.contains("vocab") || !model["vocab"].is_object()) {
    return unimplemented(source + ": only BPE tokenizer.json models can be embedded in GGUF");
  }
  // The tokenizer itself, for what the files settle together (bos/eos, whether BOS is added).
  KUN_ASSIGN_OR_RETURN(auto tok, load_tokenizer_from_json(text, config_text, source));
  json config = json::object();
  if (!config_text.empty()) {
    config = json::parse(config_text.begin(), config_text.end(), nullptr, false);
    if (config.is_discarded() || !config.is_object()) return invalid_argument(source + ": tokenizer_config.json is not a JSON object");
  }

  // Tokens by id: the model's vocabulary plus added tokens.
  std::int64_t n = 0;
  for (const auto& [text_key, id] : model["vocab"].items()) {
    if (!id.is_number_integer() || id.get<std::int64_t>() < 0) return invalid_argument(source + ": bad vocab id");
    n = std::max(n, id.get<std::int64_t>() + 1);
  }
  const json added = j.value("added_tokens", json::array());
  for (const json& a : added) n = std::max(n, a.value("id", std::int64_t{-1}) + 1);
  std::vector<std::string> tokens(static_cast<std::size_t>(n));
  std::vector<std::int32_t> types(static_cast<std::size_t>(n), static_cast<std::int32_t>(kTokenNormal));
  std::vector<bool> present(static_cast<std::size_t>(n), false);
  for (const auto& [text_key, id] : model["vocab"].items()) {
    tokens[static_cast<std::size_t>(id.get<std::int64_t>())] = text_key;
    present[static_cast<std::size_t>(id.get<std::int64_t>())] = true;
  }
  const std::string unk_text = model.contains("unk_token") && model["unk_token"].is_string() ? model["unk_token"].get<std::string>() : "";
  for (const json& a : added) {
    const auto id = static_cast<std::size_t>(a.value("id", std::int64_t{0}));
    tokens[id] = a.value("content", "");
    present[id] = true;
    types[id] = static_cast<std::int32_t>(a.value("special", false) ? (tokens[id] == unk_text ? kTokenUnknown : kTokenControl)
                                                                    : kTokenUserDefined);
  }
  for (std::size_t i = 0; i < tokens.size(); ++i) {
    if (!present[i]) return invalid_argument(source + ": token id " + std::to_string(i) + " is not in the vocabulary");
  }
  // Merges as "a b" strings (tokenizer.json has them as strings or as [a, b] pairs).
  std::vector<std::string> merges;
  if (auto m = model.find("merges"); m != model.end() && m->is_array()) {
    merges.reserve(m->size());
    for (const json& e : *m) {
      if (e.is_string()) merges.push_back(e.get<std::string>());
      else if (e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_string())
        merges.push_back(e[0].get<std::string>() + " " + e[1].get<std::string>());
      else return invalid_argument(source + ": malformed merge");
    }
  }

  GgufTokenizerMetadata out;
  GgufMetadata& kv = out.metadata;
  const bool byte_level = has_step(j.value("pre_tokenizer", json()), "ByteLevel") || has_step(j.value("decoder", json()), "ByteLevel");
  const bool sentencepiece = !byte_level && (model.value("byte_fallback", false) || has_step(j.value("decoder", json()), "ByteFallback"));
  if (byte_level) {
    // llama.cpp's names (llama-vocab.cpp): it refuses a file whose pre-tokenizer it does not know.
    std::string pre = "gpt-2";
    const json pre_tokenizer = j.value("pre_tokenizer", json());
    std::vector<const json*> steps;
    collect_steps(pre_tokenizer, &steps);
    for (const json* s : steps) {
      if (s->value("type", "") != "Split") continue;
      const std::string pattern = s->contains("pattern") ? (*s)["pattern"].value("Regex", "") : "";
      if (pattern == kLlama3Pattern) pre = "llama-bpe";
      else if (pattern == kQwen2Pattern) pre = "qwen2";
      else return unimplemented(source + ": pre-tokenizer pattern has no tokenizer.ggml.pre name: " + pattern);
    }
    kv.emplace_back("tokenizer.ggml.model", GgufValue::str("gpt2"));
    kv.emplace_back("tokenizer.ggml.pre", GgufValue::str(pre));
    kv.emplace_back("tokenizer.ggml.tokens", string_array(tokens));
    kv.emplace_back("tokenizer.ggml.token_type", array_value(GgufValueType::kInt32, types, [](std::int32_t t) { return GgufValue::i32(t); }));
    kv.emplace_back("tokenizer.ggml.merges", string_array(std::move(merges)));
  } else if (sentencepiece) {
    // SentencePiece BPE merges the pair whose result scores best: score = -(rank of the first
    // merge producing the token); pieces no merge produces score below every merged one.
    std::unordered_map<std::string, std::int64_t> first_rank;
    for (std::size_t r = 0; r < merges.size(); ++r) {
      const auto sp = merges[r].find(' ');
      if (sp == std::string::npos) return invalid_argument(source + ": malformed merge '" + merges[r] + "'");
      first_rank.emplace(merges[r].substr(0, sp) + merges[r].substr(sp + 1), static_cast<std::int64_t>(r));
    }
    std::vector<float> scores(tokens.size(), 0.0f);
    for (std::size_t i = 0; i < tokens.size(); ++i) {
      if (types[i] != kTokenNormal) continue;
      if (is_byte_piece(tokens[i])) {
        types[i] = static_cast<std::int32_t>(kTokenByte);
        continue;
      }
      auto it = first_rank.find(tokens[i]);
      scores[i] = it != first_rank.end() ? -static_cast<float>(it->second) : -1e9f;
    }
    kv.emplace_back("tokenizer.ggml.model", GgufValue::str("llama"));
    kv.emplace_back("tokenizer.ggml.pre", GgufValue::str("default"));
    kv.emplace_back("tokenizer.ggml.tokens", string_array(tokens));
    kv.emplace_back("tokenizer.ggml.scores", array_value(GgufValueType::kFloat32, scores, [](float s) { return GgufValue::f32(s); }));
    kv.emplace_back("tokenizer.ggml.token_type", array_value(GgufValueType::kInt32, types, [](std::int32_t t) { return GgufValue::i32(t); }));
    kv.emplace_back("tokenizer.ggml.add_space_prefix", GgufValue::boolean(has_step(j.value("normalizer", json()), "Prepend")));
  } else {
    return unimplemented(source + ": a BPE model that is neither byte-level nor byte-fallback (SentencePiece-style)");
  }
  out.vocab_size = n;
  out.bos_token_id = tok->bos_token_id();
  out.eos_token_id = tok->eos_token_id();
  if (out.bos_token_id >= 0) kv.emplace_back("tokenizer.ggml.bos_token_id", GgufValue::u32(static_cast<std::uint32_t>(out.bos_token_id)));
  if (out.eos_token_id >= 0) kv.emplace_back("tokenizer.ggml.eos_token_id", GgufValue::u32(static_cast<std::uint32_t>(out.eos_token_id)));
  if (!unk_text.empty()) {
    for (std::size_t i = 0; i < tokens.size(); ++i) {
      if (tokens[i] == unk_text) {
        kv.emplace_back("tokenizer.ggml.unknown_token_id", GgufValue::u32(static_cast<std::uint32_t>(i)));
        break;
      }
    }
  }
  std::string pad;
  if (auto p = config.find("pad_token"); p != config.end()) {
    pad = p->is_string() ? p->get<std::string>() : (p->is_object() ? p->value("content", "") : "");
  }
  if (!pad.empty()) {
    for (std::size_t i = 0; i < tokens.size(); ++i) {
      if (tokens[i] == pad) {
        kv.emplace_back("tokenizer.ggml.padding_token_id", GgufValue::u32(static_cast<std::uint32_t>(i)));
        break;
      }
    }
  }
  // Whether encoding adds BOS / EOS, as the files together decide it.
  const std::vector<std::int32_t> empty = tok->encode("", true);
  kv.emplace_back("tokenizer.ggml.add_bos_token",
                  GgufValue::boolean(!empty.empty() && empty.front() == out.bos_token_id && out.bos_token_id >= 0));
  kv.emplace_back("tokenizer.ggml.add_eos_token",
                  GgufValue::boolean(!empty.empty() && empty.back() == out.eos_token_id && out.eos_token_id >= 0));
  if (auto t = config.find("chat_template"); t != config.end() && t->is_string()) {
    kv.emplace_back("tokenizer.chat_template", GgufValue::str(t->get<std::string>()));
  }
  return out;
}

}  // namespace

StatusOr<GgufTokenizerMetadata> gguf_tokenizer_metadata_from_json(std::string_view tokenizer_json,
                                                                   std::string_view config_json,
                                                                   const std::string& source) {
  try {
    return tokenizer_metadata(tokenizer_json, config_json, source);
  } catch (const nlohmann::json::exception& e) {  // a field of an unexpected JSON type
    return invalid_argument(source + ": unexpected tokenizer.json / tokenizer_config.json content: " + e.what());
  }
}

StatusOr<GgufTokenizerMetadata> gguf_tokenizer_metadata(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::path file(path);
  if (fs::is_directory(file, ec)) file /= "tokenizer.json";
  if (file.extension() != ".json") {
    return unimplemented(path + ": only tokenizer.json can be embedded in GGUF (not a SentencePiece .model)");
  }
  KUN_ASSIGN_OR_RETURN(std::string text, read_text(file));
  std::string config_text;
  const fs::path config_path = file.parent_path() / "tokenizer_config.json";
  if (fs::exists(config_path, ec)) {
    KUN_ASSIGN_OR_RETURN(config_text, read_text(config_path));
  }
  return gguf_tokenizer_metadata_from_json(text, config_text, file.string());
}

}  // namespace kun::model
