// Unit tests of the pure parts of server/: UTF-8 validation, stop sequences, request parsing,
// response formatting, Status -> HTTP mapping and the Prometheus rendering.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "server/api_error.h"
#include "server/metrics.h"
#include "server/openai_protocol.h"
#include "server/stop_matcher.h"
#include "server/tests/byte_tokenizer.h"
#include "server/utf8.h"

namespace kun::server {
namespace {

using nlohmann::json;
using testing::ByteTokenizer;

TEST(Utf8, AcceptsWellFormed) {
  EXPECT_TRUE(is_valid_utf8(""));
  EXPECT_TRUE(is_valid_utf8("hello"));
  EXPECT_TRUE(is_valid_utf8("h\xC3\xA9llo \xE2\x82\xAC \xF0\x9F\x98\x80"));
}

TEST(Utf8, RejectsMalformed) {
  std::size_t at = 0;
  EXPECT_FALSE(is_valid_utf8("ab\xFF", &at));
  EXPECT_EQ(at, 2u);
  EXPECT_FALSE(is_valid_utf8("\xC0\xAF"));          // overlong
  EXPECT_FALSE(is_valid_utf8("\xED\xA0\x80"));      // surrogate
  EXPECT_FALSE(is_valid_utf8("\xF4\x90\x80\x80"));  // > U+10FFFF
  EXPECT_FALSE(is_valid_utf8("\xE2\x82"));          // truncated
  EXPECT_FALSE(is_valid_utf8("\x80"));              // lone continuation
}

TEST(StopMatcher, TruncatesAtFirstMatchAcrossPieces) {
  StopMatcher m({"STOP", "xyz"});
  std::string out;
  for (std::string_view piece : {"hel", "lo S", "T", "OP after"}) out += m.push(piece);
  EXPECT_TRUE(m.matched());
  EXPECT_EQ(out, "hello ");
  EXPECT_EQ(m.push("more"), "");
}

TEST(StopMatcher, ReleasesHeldBackTextWhenNoMatch) {
  StopMatcher m({"STOP"});
  std::string out = m.push("abc ST");
  EXPECT_EQ(out, "abc ");  // "ST" might start "STOP"
  out += m.push("X");
  EXPECT_EQ(out, "abc STX");
  out += m.push("S");
  out += m.flush();
  EXPECT_EQ(out, "abc STXS");
  EXPECT_FALSE(m.matched());
}

TEST(StopMatcher, EarliestOfSeveralStops) {
  StopMatcher m({"bb", "a"});
  EXPECT_EQ(m.push("xxbba"), "xx");
}

TEST(StopMatcher, NoStopsPassesThrough) {
  StopMatcher m({""});
  EXPECT_EQ(m.push("abc"), "abc");
  EXPECT_EQ(m.flush(), "");
}

std::optional<ApiError> parse(Endpoint ep, const std::string& body, ParsedRequest& out) {
  return parse_request(ep, body, ProtocolLimits{}, out);
}

TEST(Protocol, ParsesCompletionFields) {
  ParsedRequest r;
  auto e = parse(Endpoint::kCompletions,
                 R"({"model":"m","prompt":"hi","max_tokens":5,"temperature":0.5,"top_p":0.9,
                     "top_k":3,"seed":7,"stop":["a","b"],"ignore_eos":true,"stream":true,
                     "stream_options":{"include_usage":true},"n":1,"logprobs":null})",
                 r);
  ASSERT_FALSE(e) << e->message;
  EXPECT_EQ(r.model, "m");
  EXPECT_EQ(r.prompt_text, "hi");
  EXPECT_EQ(r.max_tokens, 5);
  EXPECT_FLOAT_EQ(r.sampling.temperature, 0.5f);
  EXPECT_FLOAT_EQ(r.sampling.top_p, 0.9f);
  EXPECT_EQ(r.sampling.top_k, 3);
  EXPECT_EQ(r.sampling.seed, 7u);
  EXPECT_EQ(r.stop, (std::vector<std::string>{"a", "b"}));
  EXPECT_TRUE(r.ignore_eos);
  EXPECT_TRUE(r.stream);
  EXPECT_TRUE(r.include_usage);
}

TEST(Protocol, PromptForms) {
  for (const char* body : {R"({"prompt":[1,2,3]})", R"({"prompt":[[1,2,3]]})"}) {
    ParsedRequest r;
    ASSERT_FALSE(parse(Endpoint::kCompletions, body, r)) << body;
    EXPECT_EQ(r.prompt_token_ids, (std::vector<std::int32_t>{1, 2, 3}));
  }
  ParsedRequest r;
  ASSERT_FALSE(parse(Endpoint::kCompletions, R"({"prompt":["x"]})", r));
  EXPECT_EQ(r.prompt_text, "x");
  for (const char* body : {R"({"prompt":["a","b"]})", R"({"prompt":[]})", R"({"prompt":5})",
                           R"({"prompt":[1,"a"]})", R"({"prompt":[-1]})", R"({})"}) {
    ParsedRequest bad;
    auto e = parse(Endpoint::kCompletions, body, bad);
    ASSERT_TRUE(e) << body;
    EXPECT_EQ(e->http_status, 400);
    EXPECT_EQ(e->param, "prompt") << body;
  }
}

TEST(Protocol, FieldErrorsNameTheField) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {R"({"prompt":"x","max_tokens":"5"})", "max_tokens"},
      {R"({"prompt":"x","max_tokens":1.5})", "max_tokens"},
      {R"({"prompt":"x","max_tokens":0})", "max_tokens"},
      {R"({"prompt":"x","max_completion_tokens":-3})", "max_completion_tokens"},
      {R"({"prompt":"x","temperature":"hot"})", "temperature"},
      {R"({"prompt":"x","temperature":3})", "temperature"},
      {R"({"prompt":"x","top_p":0})", "top_p"},
      {R"({"prompt":"x","top_k":-2})", "top_k"},
      {R"({"prompt":"x","n":2})", "n"},
      {R"({"prompt":"x","stop":5})", "stop"},
      {R"({"prompt":"x","stream":"yes"})", "stream"},
      {R"({"prompt":"x","stream_options":{"include_usage":true}})", "stream_options"},
      {R"({"prompt":"x","logprobs":3})", "logprobs"},
      {R"({"prompt":"x","echo":true})", "echo"},
      {R"({"prompt":"x","model":7})", "model"},
      {R"({"prompt":"x","seed":1e3})", "seed"},
  };
  for (const auto& [body, field] : cases) {
    ParsedRequest r;
    auto e = parse(Endpoint::kCompletions, body, r);
    ASSERT_TRUE(e) << body;
    EXPECT_EQ(e->http_status, 400) << body;
    EXPECT_EQ(e->param, field) << body;
    EXPECT_NE(e->message.find(field), std::string::npos) << e->message;
  }
}

TEST(Protocol, ChatMessages) {
  ParsedRequest r;
  ASSERT_FALSE(parse(Endpoint::kChatCompletions,
                     R"({"messages":[{"role":"developer","content":"be brief"},
                                     {"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}],
                         "max_completion_tokens":4,"max_tokens":100})",
                     r));
  ASSERT_EQ(r.messages.size(), 2u);
  EXPECT_EQ(r.messages[0].role, "system");
  EXPECT_EQ(r.messages[1].content, "ab");
  EXPECT_EQ(r.max_tokens, 4);  // max_completion_tokens wins
  for (const char* body : {R"({"messages":[]})", R"({"messages":"hi"})",
                           R"({"messages":[{"role":"robot","content":"x"}]})",
                           R"({"messages":[{"content":"x"}]})", R"({"messages":[{"role":"user"}]})",
                           R"({"messages":[{"role":"user","content":"x"}],"logprobs":true})"}) {
    ParsedRequest bad;
    auto e = parse(Endpoint::kChatCompletions, body, bad);
    ASSERT_TRUE(e) << body;
    EXPECT_EQ(e->http_status, 400);
  }
}

TEST(Protocol, MalformedAndDeepJson) {
  ParsedRequest r;
  auto e = parse(Endpoint::kCompletions, "{\"prompt\": ", r);
  ASSERT_TRUE(e);
  EXPECT_EQ(e->http_status, 400);
  e = parse(Endpoint::kCompletions, std::string(100000, '['), r);
  ASSERT_TRUE(e);
  EXPECT_NE(e->message.find("nested"), std::string::npos);
  e = parse(Endpoint::kCompletions, R"({"prompt":"x","temperature":NaN})", r);
  ASSERT_TRUE(e);
  e = parse(Endpoint::kCompletions, R"({"prompt":"x","temperature":1e999})", r);
  ASSERT_TRUE(e);
  e = parse(Endpoint::kCompletions, "[1,2]", r);
  ASSERT_TRUE(e);
}

TEST(Protocol, PrepareChecksModelAndContext) {
  ByteTokenizer tok;
  engine::ModelInfo info{"m", 32, 258, 257};
  {
    ParsedRequest r;
    ASSERT_FALSE(parse(Endpoint::kCompletions, R"({"model":"other","prompt":"x"})", r));
    PreparedRequest p;
    auto e = prepare_request(std::move(r), tok, info, "m", ProtocolLimits{}, p);
    ASSERT_TRUE(e);
    EXPECT_EQ(e->http_status, 404);
    EXPECT_EQ(e->code, "model_not_found");
  }
  {
    ParsedRequest r;
    ASSERT_FALSE(parse(Endpoint::kCompletions, R"({"prompt":"0123456789012345678901234567890123"})", r));
    PreparedRequest p;
    auto e = prepare_request(std::move(r), tok, info, "m", ProtocolLimits{}, p);
    ASSERT_TRUE(e);
    EXPECT_EQ(e->code, "context_length_exceeded");
  }
  {
    ParsedRequest r;
    ASSERT_FALSE(parse(Endpoint::kCompletions, R"({"prompt":"abc","max_tokens":29})", r));
    PreparedRequest p;
    auto e = prepare_request(std::move(r), tok, info, "m", ProtocolLimits{}, p);
    ASSERT_TRUE(e);
    EXPECT_EQ(e->param, "max_tokens");
  }
  {
    ParsedRequest r;
    ASSERT_FALSE(parse(Endpoint::kCompletions, R"({"prompt":"abc","max_tokens":28})", r));
    PreparedRequest p;
    ASSERT_FALSE(prepare_request(std::move(r), tok, info, "m", ProtocolLimits{}, p));
    EXPECT_EQ(p.spec.prompt_tokens.size(), 4u);  // <s> a b c
    EXPECT_EQ(p.spec.max_tokens, 28);
  }
  {
    ParsedRequest r;
    ASSERT_FALSE(parse(Endpoint::kChatCompletions, R"({"messages":[{"role":"user","content":"hi"}]})", r));
    PreparedRequest p;
    ASSERT_FALSE(prepare_request(std::move(r), tok, info, "m", ProtocolLimits{}, p));
    const std::string expected = "<|user|>hi\n<|assistant|>";
    EXPECT_EQ(p.spec.prompt_tokens.size(), expected.size());
    EXPECT_EQ(p.spec.max_tokens, 32 - static_cast<std::int64_t>(expected.size()));
  }
  {
    ParsedRequest r;
    ASSERT_FALSE(parse(Endpoint::kCompletions, R"({"prompt":[1,2,300]})", r));
    PreparedRequest p;
    auto e = prepare_request(std::move(r), tok, info, "m", ProtocolLimits{}, p);
    ASSERT_TRUE(e);
    EXPECT_NE(e->message.find("vocabulary"), std::string::npos);
  }
}

TEST(Formatter, CompletionChunks) {
  ResponseFormatter f(Endpoint::kCompletions, "cmpl-1", 123, "m", false);
  EXPECT_EQ(f.text_chunk("a\"b"),
            "data: {\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"created\":123,\"model\":\"m\","
            "\"choices\":[{\"index\":0,\"text\":\"a\\\"b\",\"logprobs\":null,\"finish_reason\":null}]}\n\n");
  EXPECT_EQ(f.finish_chunks("", "length"),
            "data: {\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"created\":123,\"model\":\"m\","
            "\"choices\":[{\"index\":0,\"text\":\"\",\"logprobs\":null,\"finish_reason\":\"length\"}]}\n\n");
  EXPECT_EQ(f.usage_chunk(3, 4),
            "data: {\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"created\":123,\"model\":\"m\","
            "\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4,\"total_tokens\":7}}\n\n");
}

TEST(Formatter, ChatChunksAndFullResponse) {
  ResponseFormatter f(Endpoint::kChatCompletions, "chatcmpl-1", 5, "m", true);
  const json role = json::parse(f.role_chunk().substr(6));
  EXPECT_EQ(role["object"], "chat.completion.chunk");
  EXPECT_EQ(role["choices"][0]["delta"], (json{{"role", "assistant"}, {"content", ""}}));
  EXPECT_TRUE(role.contains("usage") && role["usage"].is_null());
  const json full = json::parse(f.full_response("hi", "stop", 2, 1));
  EXPECT_EQ(full["object"], "chat.completion");
  EXPECT_EQ(full["choices"][0]["message"]["content"], "hi");
  EXPECT_EQ(full["usage"]["total_tokens"], 3);
}

TEST(Errors, StatusMapping) {
  EXPECT_EQ(api_error_from_status(invalid_argument("x"), 1).http_status, 400);
  EXPECT_EQ(api_error_from_status(out_of_range("x"), 1).http_status, 400);
  EXPECT_EQ(api_error_from_status(not_found("x"), 1).http_status, 404);
  const ApiError over = api_error_from_status(overloaded("x"), 2);
  EXPECT_EQ(over.http_status, 429);
  EXPECT_EQ(over.retry_after_s, 2);
  EXPECT_EQ(api_error_from_status(unavailable("x"), 1).http_status, 503);
  EXPECT_EQ(api_error_from_status(internal_error("x"), 1).http_status, 500);
  const json body = json::parse(error_body(bad_request("bad \xFF", "max_tokens")));
  EXPECT_EQ(body["error"]["param"], "max_tokens");
  EXPECT_EQ(body["error"]["type"], "invalid_request_error");
  EXPECT_TRUE(body["error"]["code"].is_null());
}

TEST(Errors, MessagesAreBoundedAtACharacterBoundary) {
  EXPECT_EQ(bounded_message("short"), "short");
  // A message of two-byte characters whose cut point falls inside one.
  std::string long_message = "x";
  for (int i = 0; i < 2000; ++i) long_message += "\xC3\xA9";  // U+00E9
  const std::string cut = bounded_message(long_message);
  EXPECT_LT(cut.size(), kMaxErrorMessageBytes + 64);
  EXPECT_TRUE(is_valid_utf8(cut)) << "a character was split";
  EXPECT_NE(cut.find("more bytes)"), std::string::npos);
  ApiError e = bad_request(std::string(100'000, '9'));
  EXPECT_LT(error_body(e).size(), 2 * kMaxErrorMessageBytes);
}

TEST(Protocol, ParseErrorsInOurOwnWords) {
  ParsedRequest out;
  for (const std::string& body : {std::string("{\"prompt\": "), std::string("{\"max_tokens\":") + std::string(5000, '9') + "}",
                                 std::string("[1e99999]"), std::string("nul")}) {
    auto e = parse_request(Endpoint::kCompletions, body, ProtocolLimits{}, out);
    ASSERT_TRUE(e.has_value()) << body;
    EXPECT_EQ(e->http_status, 400);
    EXPECT_EQ(e->message.find("json.exception"), std::string::npos) << e->message;
    EXPECT_LT(e->message.size(), 200u) << e->message;
  }
}

TEST(Metrics, RendersHistogramsAndKunServeFamilies) {
  ServerMetrics m;
  RequestObserver obs;
  engine::TokenEvent ev;
  ev.token = 1;
  ev.time_us = 1000;
  obs.on_event(ev, m);
  ev.time_us = 3000;
  obs.on_event(ev, m);
  ev.finished = true;
  ev.reason = engine::FinishReason::kLength;
  ev.timings = {0, 100, 1000, 3000};
  obs.on_event(ev, m);
  engine::ServingStats stats;
  engine::InstanceStats inst;
  inst.instance = 1;
  inst.group_state = "DROPPED";
  inst.kv_blocks_total = 10;
  inst.kv_blocks_free = 4;
  stats.instances.push_back(inst);
  stats.drop_latency_ms = {5.0, 50.0};
  const std::string text = render_metrics(m, stats, "my\"model");
  EXPECT_NE(text.find("vllm:gpu_cache_usage_perc{model_name=\"my\\\"model\"} 0.6"), std::string::npos) << text;
  EXPECT_NE(text.find("vllm:time_per_output_token_seconds_count{model_name=\"my\\\"model\"} 2"),
            std::string::npos);
  EXPECT_NE(text.find("vllm:time_to_first_token_seconds_bucket{model_name=\"my\\\"model\",le=\"0.001\"} 1"),
            std::string::npos);
  EXPECT_NE(text.find("kunserve_group_state{instance=\"1\",state=\"DROPPED\"} 1"), std::string::npos);
  EXPECT_NE(text.find("kunserve_drop_latency_seconds_count 2"), std::string::npos);
  EXPECT_NE(text.find("vllm:request_success_total{model_name=\"my\\\"model\",finished_reason=\"length\"} 1"),
            std::string::npos);
}

}  // namespace
}  // namespace kun::server
