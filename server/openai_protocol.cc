#include "server/openai_protocol.h"

#include <cmath>
#include <limits>

#include <nlohmann/json.hpp>

namespace kun::server {
namespace {

using nlohmann::json;

// Without a known context length, max_tokens is still bounded so that no sum downstream
// (prompt + max_tokens) can overflow.
constexpr std::int64_t kMaxTokensWithoutContext = std::int64_t{1} << 40;

// Deepest nesting of [ and { outside strings (bounded so hostile bodies cannot blow the stack).
std::size_t json_depth(std::string_view s) {
  std::size_t depth = 0, max_depth = 0;
  bool in_string = false, escaped = false;
  for (char c : s) {
    if (in_string) {
      if (escaped) {
        escaped = false;
      } else if (c == '\\') {
        escaped = true;
      } else if (c == '"') {
        in_string = false;
      }
      continue;
    }
    if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      max_depth = std::max(max_depth, ++depth);
    } else if ((c == ']' || c == '}') && depth > 0) {
      --depth;
    }
  }
  return max_depth;
}

const char* type_name(const json& v) {
  switch (v.type()) {
    case json::value_t::null: return "null";
    case json::value_t::boolean: return "boolean";
    case json::value_t::string: return "string";
    case json::value_t::array: return "array";
    case json::value_t::object: return "object";
    case json::value_t::number_integer:
    case json::value_t::number_unsigned: return "integer";
    case json::value_t::number_float: return "number";
    default: return "unknown";
  }
}

ApiError wrong_type(const std::string& field, const char* expected, const json& got) {
  return bad_request("'" + field + "' must be " + expected + ", got " + type_name(got), field);
}

// Field accessors: absent or null -> nullopt and no error.
const json* field(const json& obj, const char* name) {
  auto it = obj.find(name);
  if (it == obj.end() || it->is_null()) return nullptr;
  return &*it;
}

std::optional<ApiError> get_bool(const json& obj, const char* name, bool& out) {
  const json* v = field(obj, name);
  if (v == nullptr) return std::nullopt;
  if (!v->is_boolean()) return wrong_type(name, "a boolean", *v);
  out = v->get<bool>();
  return std::nullopt;
}

std::optional<ApiError> get_int(const json& obj, const char* name, std::optional<std::int64_t>& out) {
  const json* v = field(obj, name);
  if (v == nullptr) return std::nullopt;
  if (v->is_number_unsigned()) {
    if (v->get<std::uint64_t>() > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) {
      return bad_request("'" + std::string(name) + "' is out of range", name);
    }
    out = static_cast<std::int64_t>(v->get<std::uint64_t>());
    return std::nullopt;
  }
  if (!v->is_number_integer()) return wrong_type(name, "an integer", *v);
  out = v->get<std::int64_t>();
  return std::nullopt;
}

std::optional<ApiError> get_number(const json& obj, const char* name, std::optional<double>& out) {
  const json* v = field(obj, name);
  if (v == nullptr) return std::nullopt;
  if (!v->is_number()) return wrong_type(name, "a number", *v);
  const double d = v->get<double>();
  if (!std::isfinite(d)) return bad_request("'" + std::string(name) + "' must be a finite number", name);
  out = d;
  return std::nullopt;
}

// Token ids: an array of integers.
std::optional<ApiError> get_token_array(const json& arr, const std::string& name,
                                        std::vector<std::int32_t>& out) {
  out.clear();
  out.reserve(arr.size());
  for (const auto& t : arr) {
    if (!t.is_number_integer()) return wrong_type(name, "an array of integer token ids", t);
    const std::int64_t id = t.get<std::int64_t>();
    if (id < 0 || id > std::numeric_limits<std::int32_t>::max()) {
      return bad_request("'" + name + "' contains token id " + std::to_string(id) +
                             " outside the vocabulary",
                         name);
    }
    out.push_back(static_cast<std::int32_t>(id));
  }
  return std::nullopt;
}

std::optional<ApiError> parse_prompt(const json& body, ParsedRequest& out) {
  const json* p = field(body, "prompt");
  if (p == nullptr) return bad_request("'prompt' is required", "prompt");
  if (p->is_string()) {
    out.prompt_text = p->get<std::string>();
    return std::nullopt;
  }
  if (!p->is_array()) {
    return wrong_type("prompt", "a string, an array of token ids, or a one-element array of either", *p);
  }
  if (p->empty()) return bad_request("'prompt' must not be empty", "prompt");
  const json& first = (*p)[0];
  if (first.is_number_integer()) return get_token_array(*p, "prompt", out.prompt_token_ids);
  if (first.is_string() || first.is_array()) {
    if (p->size() != 1) {
      return bad_request("batched prompts are not supported: 'prompt' must hold exactly one prompt",
                         "prompt");
    }
    if (first.is_string()) {
      out.prompt_text = first.get<std::string>();
      return std::nullopt;
    }
    if (first.empty()) return bad_request("'prompt' must not be empty", "prompt");
    return get_token_array(first, "prompt", out.prompt_token_ids);
  }
  return wrong_type("prompt", "a string, an array of token ids, or a one-element array of either", first);
}

std::optional<ApiError> parse_messages(const json& body, ParsedRequest& out) {
  const json* m = field(body, "messages");
  if (m == nullptr) return bad_request("'messages' is required", "messages");
  if (!m->is_array()) return wrong_type("messages", "an array", *m);
  if (m->empty()) return bad_request("'messages' must contain at least one message", "messages");
  for (std::size_t i = 0; i < m->size(); ++i) {
    const json& msg = (*m)[i];
    const std::string where = "messages[" + std::to_string(i) + "]";
    if (!msg.is_object()) return wrong_type(where, "an object", msg);
    const json* role = field(msg, "role");
    if (role == nullptr) return bad_request("'" + where + ".role' is required", where + ".role");
    if (!role->is_string()) return wrong_type(where + ".role", "a string", *role);
    std::string r = role->get<std::string>();
    if (r == "developer") r = "system";
    if (r != "system" && r != "user" && r != "assistant") {
      return bad_request("'" + where + ".role' must be one of system, developer, user, assistant; got '" +
                             role->get<std::string>() + "'",
                         where + ".role");
    }
    model::ChatMessage cm;
    cm.role = std::move(r);
    const json* content = field(msg, "content");
    if (content == nullptr) {
      if (cm.role != "assistant") {
        return bad_request("'" + where + ".content' is required", where + ".content");
      }
    } else if (content->is_string()) {
      cm.content = content->get<std::string>();
    } else if (content->is_array()) {
      for (std::size_t k = 0; k < content->size(); ++k) {
        const json& part = (*content)[k];
        const std::string pwhere = where + ".content[" + std::to_string(k) + "]";
        if (!part.is_object()) return wrong_type(pwhere, "an object", part);
        const json* type = field(part, "type");
        if (type == nullptr || !type->is_string() || type->get<std::string>() != "text") {
          return bad_request("only content parts of type 'text' are supported", pwhere + ".type");
        }
        const json* text = field(part, "text");
        if (text == nullptr || !text->is_string()) {
          return bad_request("'" + pwhere + ".text' must be a string", pwhere + ".text");
        }
        cm.content += text->get<std::string>();
      }
    } else {
      return wrong_type(where + ".content", "a string or an array of text parts", *content);
    }
    out.messages.push_back(std::move(cm));
  }
  return std::nullopt;
}

std::optional<ApiError> parse_body(Endpoint endpoint, const json& body, const ProtocolLimits& limits,
                                   ParsedRequest& out) {
  if (!body.is_object()) return bad_request("the request body must be a JSON object");
  out.endpoint = endpoint;

  if (const json* m = field(body, "model")) {
    if (!m->is_string()) return wrong_type("model", "a string", *m);
    out.model = m->get<std::string>();
  }
  if (endpoint == Endpoint::kCompletions) {
    if (auto e = parse_prompt(body, out)) return e;
    if (const json* echo = field(body, "echo")) {
      if (!echo->is_boolean()) return wrong_type("echo", "a boolean", *echo);
      if (echo->get<bool>()) return bad_request("'echo' is not supported", "echo");
    }
    if (const json* suffix = field(body, "suffix")) {
      if (!suffix->is_string()) return wrong_type("suffix", "a string", *suffix);
      if (!suffix->get<std::string>().empty()) return bad_request("'suffix' is not supported", "suffix");
    }
    std::optional<std::int64_t> best_of;
    if (auto e = get_int(body, "best_of", best_of)) return e;
    if (best_of && *best_of != 1) return bad_request("only 'best_of' = 1 is supported", "best_of");
    // logprobs is an integer here; anything but null/0 asks for something we do not compute.
    if (const json* lp = field(body, "logprobs")) {
      if (!lp->is_number_integer() && !lp->is_boolean()) return wrong_type("logprobs", "an integer", *lp);
      const bool wants = lp->is_boolean() ? lp->get<bool>() : lp->get<std::int64_t>() != 0;
      if (wants) return bad_request("'logprobs' is not supported by this server", "logprobs");
    }
  } else {
    if (auto e = parse_messages(body, out)) return e;
    if (const json* lp = field(body, "logprobs")) {
      if (!lp->is_boolean()) return wrong_type("logprobs", "a boolean", *lp);
      if (lp->get<bool>()) return bad_request("'logprobs' is not supported by this server", "logprobs");
    }
    std::optional<std::int64_t> top_logprobs;
    if (auto e = get_int(body, "top_logprobs", top_logprobs)) return e;
    if (top_logprobs && *top_logprobs != 0) {
      return bad_request("'top_logprobs' is not supported by this server", "top_logprobs");
    }
    if (const json* tools = field(body, "tools")) {
      if (!tools->is_array()) return wrong_type("tools", "an array", *tools);
      if (!tools->empty()) return bad_request("'tools' are not supported by this server", "tools");
    }
    if (const json* rf = field(body, "response_format")) {
      if (!rf->is_object()) return wrong_type("response_format", "an object", *rf);
      const json* t = field(*rf, "type");
      if (t == nullptr || !t->is_string() || t->get<std::string>() != "text") {
        return bad_request("only response_format type 'text' is supported", "response_format");
      }
    }
  }

  // Lengths.
  std::optional<std::int64_t> max_tokens, max_completion_tokens;
  if (auto e = get_int(body, "max_tokens", max_tokens)) return e;
  if (auto e = get_int(body, "max_completion_tokens", max_completion_tokens)) return e;
  const char* max_field = "max_tokens";
  if (max_completion_tokens) {
    max_tokens = max_completion_tokens;
    max_field = "max_completion_tokens";
  }
  if (max_tokens && *max_tokens < 1) {
    return bad_request("'" + std::string(max_field) + "' must be at least 1, got " +
                           std::to_string(*max_tokens),
                       max_field);
  }
  out.max_tokens = max_tokens;
  out.max_tokens_field = max_field;

  // n: only 1.
  std::optional<std::int64_t> n;
  if (auto e = get_int(body, "n", n)) return e;
  if (n && *n != 1) return bad_request("only 'n' = 1 is supported, got " + std::to_string(*n), "n");

  // Sampling.
  std::optional<double> temperature, top_p, presence, frequency;
  if (auto e = get_number(body, "temperature", temperature)) return e;
  if (temperature) {
    if (*temperature < 0.0 || *temperature > 2.0) {
      return bad_request("'temperature' must be in [0, 2]", "temperature");
    }
    out.sampling.temperature = static_cast<float>(*temperature);
  } else {
    out.sampling.temperature = 1.0f;  // OpenAI's default
  }
  if (auto e = get_number(body, "top_p", top_p)) return e;
  if (top_p) {
    if (*top_p <= 0.0 || *top_p > 1.0) return bad_request("'top_p' must be in (0, 1]", "top_p");
    out.sampling.top_p = static_cast<float>(*top_p);
  }
  std::optional<std::int64_t> top_k, seed;
  if (auto e = get_int(body, "top_k", top_k)) return e;
  if (top_k) {
    if (*top_k < -1) return bad_request("'top_k' must be -1 (off), 0 (off) or positive", "top_k");
    out.sampling.top_k = *top_k < 0 ? 0 : *top_k;
  }
  if (auto e = get_int(body, "seed", seed)) return e;
  if (seed) out.sampling.seed = static_cast<std::uint64_t>(*seed);
  if (auto e = get_number(body, "presence_penalty", presence)) return e;
  if (presence && *presence != 0.0) {
    return bad_request("'presence_penalty' is not supported (only 0)", "presence_penalty");
  }
  if (auto e = get_number(body, "frequency_penalty", frequency)) return e;
  if (frequency && *frequency != 0.0) {
    return bad_request("'frequency_penalty' is not supported (only 0)", "frequency_penalty");
  }

  // Stop sequences.
  if (const json* stop = field(body, "stop")) {
    if (stop->is_string()) {
      out.stop.push_back(stop->get<std::string>());
    } else if (stop->is_array()) {
      for (const auto& s : *stop) {
        if (!s.is_string()) return wrong_type("stop", "a string or an array of strings", s);
        out.stop.push_back(s.get<std::string>());
      }
    } else {
      return wrong_type("stop", "a string or an array of strings", *stop);
    }
    if (out.stop.size() > limits.max_stop_sequences) {
      return bad_request("at most " + std::to_string(limits.max_stop_sequences) +
                             " stop sequences are supported",
                         "stop");
    }
    for (const auto& s : out.stop) {
      if (s.size() > limits.max_stop_bytes) return bad_request("a stop sequence is too long", "stop");
    }
  }
  if (const json* ids = field(body, "stop_token_ids")) {
    if (!ids->is_array()) return wrong_type("stop_token_ids", "an array of integers", *ids);
    if (auto e = get_token_array(*ids, "stop_token_ids", out.stop_token_ids)) return e;
  }
  if (auto e = get_bool(body, "ignore_eos", out.ignore_eos)) return e;
  if (auto e = get_bool(body, "skip_special_tokens", out.skip_special_tokens)) return e;

  // Streaming.
  if (auto e = get_bool(body, "stream", out.stream)) return e;
  if (const json* so = field(body, "stream_options")) {
    if (!so->is_object()) return wrong_type("stream_options", "an object", *so);
    if (!out.stream) {
      return bad_request("'stream_options' is only allowed when 'stream' is true", "stream_options");
    }
    const json* iu = field(*so, "include_usage");
    if (iu != nullptr) {
      if (!iu->is_boolean()) return wrong_type("stream_options.include_usage", "a boolean", *iu);
      out.include_usage = iu->get<bool>();
    }
  }
  if (const json* user = field(body, "user")) {
    if (!user->is_string()) return wrong_type("user", "a string", *user);
  }
  return std::nullopt;
}

}  // namespace

std::optional<ApiError> parse_request(Endpoint endpoint, std::string_view body,
                                      const ProtocolLimits& limits, ParsedRequest& out) {
  if (json_depth(body) > limits.max_json_depth) {
    return bad_request("the JSON body is nested too deeply (more than " +
                       std::to_string(limits.max_json_depth) + " levels)");
  }
  try {
    const json parsed = json::parse(body.begin(), body.end());
    return parse_body(endpoint, parsed, limits, out);
  } catch (const json::parse_error& e) {
    // Our own words: the library's message carries its internal error ids and echoes the
    // offending token (which may be a 100,000-digit number).
    return bad_request("could not parse the JSON body of the request: syntax error at byte " +
                       std::to_string(e.byte));
  } catch (const json::out_of_range&) {
    return bad_request("the JSON body contains a number too large to represent");
  } catch (const json::exception&) {
    return bad_request("the JSON body is not valid JSON");
  }
}

std::optional<ApiError> prepare_request(ParsedRequest&& parsed, const model::Tokenizer& tokenizer,
                                        const engine::ModelInfo& info,
                                        std::string_view served_model_name,
                                        const ProtocolLimits& limits, PreparedRequest& out) {
  if (parsed.model && *parsed.model != served_model_name) {
    ApiError e;
    e.http_status = 404;
    e.type = "invalid_request_error";
    e.message = "The model `" + *parsed.model + "` does not exist.";
    e.param = "model";
    e.code = "model_not_found";
    return e;
  }
  out.endpoint = parsed.endpoint;
  auto& spec = out.spec;
  const char* prompt_field = parsed.endpoint == Endpoint::kChatCompletions ? "messages" : "prompt";
  if (parsed.endpoint == Endpoint::kChatCompletions) {
    StatusOr<std::string> text = tokenizer.apply_chat_template(parsed.messages, true);
    if (!text.ok()) return api_error_from_status(text.status(), -1, std::string("messages"));
    spec.prompt_tokens = tokenizer.encode(*text, false);
  } else if (parsed.prompt_text) {
    spec.prompt_tokens = tokenizer.encode(*parsed.prompt_text, true);
  } else {
    spec.prompt_tokens = std::move(parsed.prompt_token_ids);
  }
  if (spec.prompt_tokens.empty()) {
    return bad_request(std::string("'") + prompt_field + "' must not be empty", prompt_field);
  }
  const std::int64_t vocab = info.vocab_size > 0 ? info.vocab_size : tokenizer.vocab_size();
  for (std::int32_t id : spec.prompt_tokens) {
    if (id < 0 || id >= vocab) {
      return bad_request("'prompt' contains token id " + std::to_string(id) +
                             " outside the vocabulary (size " + std::to_string(vocab) + ")",
                         prompt_field);
    }
  }
  const auto prompt_len = static_cast<std::int64_t>(spec.prompt_tokens.size());
  const std::int64_t ctx = info.max_context_tokens;
  if (ctx > 0 && prompt_len >= ctx) {
    return bad_request("This model's maximum context length is " + std::to_string(ctx) +
                           " tokens. However, your prompt has " + std::to_string(prompt_len) +
                           " tokens, leaving no room for output. Please reduce the length of the " +
                           prompt_field + ".",
                       prompt_field, "context_length_exceeded");
  }
  std::int64_t max_tokens = 0;
  if (parsed.max_tokens) {
    max_tokens = *parsed.max_tokens;
    if (ctx > 0 && max_tokens > ctx - prompt_len) {
      // prompt_len < ctx here, so the sum cannot overflow unless max_tokens is near 2^63.
      const std::int64_t total = max_tokens > std::numeric_limits<std::int64_t>::max() - prompt_len
                                     ? std::numeric_limits<std::int64_t>::max()
                                     : prompt_len + max_tokens;
      return bad_request("This model's maximum context length is " + std::to_string(ctx) +
                             " tokens. However, you requested " +
                             (total == std::numeric_limits<std::int64_t>::max() ? std::string("more than ") : std::string()) +
                             std::to_string(total) + " tokens (" + std::to_string(prompt_len) + " in the " + prompt_field +
                             ", " + std::to_string(max_tokens) +
                             " in the completion). Please reduce the length of the " + prompt_field +
                             " or '" + parsed.max_tokens_field + "'.",
                         parsed.max_tokens_field, "context_length_exceeded");
    }
    if (ctx <= 0 && max_tokens > kMaxTokensWithoutContext) {
      return bad_request("'" + parsed.max_tokens_field + "' must be at most " +
                             std::to_string(kMaxTokensWithoutContext),
                         parsed.max_tokens_field);
    }
  } else if (parsed.endpoint == Endpoint::kCompletions) {
    max_tokens = limits.default_completion_max_tokens;
    if (ctx > 0) max_tokens = std::min(max_tokens, ctx - prompt_len);
  } else {
    max_tokens = ctx > 0 ? ctx - prompt_len : limits.default_completion_max_tokens;
  }
  spec.max_tokens = max_tokens;
  spec.sampling = parsed.sampling;
  spec.stop_token_ids = std::move(parsed.stop_token_ids);
  for (std::int32_t id : spec.stop_token_ids) {
    if (id >= vocab) {
      return bad_request("'stop_token_ids' contains token id " + std::to_string(id) +
                             " outside the vocabulary",
                         "stop_token_ids");
    }
  }
  spec.ignore_eos = parsed.ignore_eos;
  out.stop = std::move(parsed.stop);
  out.stream = parsed.stream;
  out.include_usage = parsed.include_usage;
  out.skip_special_tokens = parsed.skip_special_tokens;
  return std::nullopt;
}

const char* openai_finish_reason(engine::FinishReason reason) {
  return reason == engine::FinishReason::kLength ? "length" : "stop";
}

std::string json_quote(std::string_view s) {
  return json(std::string(s)).dump(-1, ' ', false, json::error_handler_t::replace);
}

ResponseFormatter::ResponseFormatter(Endpoint endpoint, std::string id, std::int64_t created,
                                     std::string model, bool include_usage)
    : endpoint_(endpoint),
      id_(std::move(id)),
      created_(created),
      model_(std::move(model)),
      include_usage_(include_usage) {
  prefix_ = "data: {\"id\":" + json_quote(id_) + ",\"object\":\"" +
            (endpoint_ == Endpoint::kChatCompletions ? "chat.completion.chunk" : "text_completion") +
            "\",\"created\":" + std::to_string(created_) + ",\"model\":" + json_quote(model_) +
            ",\"choices\":[";
}

std::string ResponseFormatter::chunk(std::string_view choice_body) const {
  std::string out = prefix_;
  out += "{\"index\":0,";
  out += choice_body;
  out += "}]";
  if (include_usage_) out += ",\"usage\":null";
  out += "}\n\n";
  return out;
}

std::string ResponseFormatter::role_chunk() const {
  return chunk(R"("delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null)");
}

std::string ResponseFormatter::text_chunk(std::string_view text) const {
  if (endpoint_ == Endpoint::kChatCompletions) {
    return chunk("\"delta\":{\"content\":" + json_quote(text) +
                 "},\"logprobs\":null,\"finish_reason\":null");
  }
  return chunk("\"text\":" + json_quote(text) + ",\"logprobs\":null,\"finish_reason\":null");
}

std::string ResponseFormatter::finish_chunks(std::string_view text, const char* finish_reason) const {
  const std::string reason = json_quote(finish_reason);
  if (endpoint_ == Endpoint::kChatCompletions) {
    std::string out = text.empty() ? std::string() : text_chunk(text);
    out += chunk("\"delta\":{},\"logprobs\":null,\"finish_reason\":" + reason);
    return out;
  }
  return chunk("\"text\":" + json_quote(text) + ",\"logprobs\":null,\"finish_reason\":" + reason);
}

std::string ResponseFormatter::usage_chunk(std::int64_t prompt_tokens,
                                           std::int64_t completion_tokens) const {
  std::string out = prefix_;
  out += "],\"usage\":{\"prompt_tokens\":" + std::to_string(prompt_tokens) +
         ",\"completion_tokens\":" + std::to_string(completion_tokens) +
         ",\"total_tokens\":" + std::to_string(prompt_tokens + completion_tokens) + "}}\n\n";
  return out;
}

std::string ResponseFormatter::error_event(const ApiError& error) {
  return "data: " + error_body(error) + "\n\n";
}

std::string ResponseFormatter::full_response(std::string_view text, const char* finish_reason,
                                             std::int64_t prompt_tokens,
                                             std::int64_t completion_tokens) const {
  json j;
  j["id"] = id_;
  j["object"] = endpoint_ == Endpoint::kChatCompletions ? "chat.completion" : "text_completion";
  j["created"] = created_;
  j["model"] = model_;
  json choice;
  choice["index"] = 0;
  if (endpoint_ == Endpoint::kChatCompletions) {
    choice["message"] = {{"role", "assistant"}, {"content", std::string(text)}};
  } else {
    choice["text"] = std::string(text);
  }
  choice["logprobs"] = nullptr;
  choice["finish_reason"] = finish_reason;
  j["choices"] = json::array({choice});
  j["usage"] = {{"prompt_tokens", prompt_tokens},
                {"completion_tokens", completion_tokens},
                {"total_tokens", prompt_tokens + completion_tokens}};
  return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

}  // namespace kun::server
