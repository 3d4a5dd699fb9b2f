// The server over real sockets on 127.0.0.1 against the fake front door: malformed input,
// SSE wire format, stop sequences, disconnects, overload, keep-alive and shutdown.
#include <gtest/gtest.h>

#include <set>
#include <thread>

#include <nlohmann/json.hpp>

#include "server/tests/server_test_util.h"
#include "server/utf8.h"

namespace kun::server::testing {
namespace {

using nlohmann::json;
using namespace std::chrono_literals;

// ---------------------------------------------------------------------------------------------
// (a) Malformed input: every case gets the right status and OpenAI's error shape, and the
// server keeps serving afterwards.

struct BadCase {
  std::string name;
  std::string raw;  // a complete HTTP request
  int status;
  std::string param;  // expected error.param ("" = not checked)
  std::string code;   // expected error.code ("" = not checked)
};

std::string post(const std::string& path, const std::string& body) {
  return make_request("POST", path, body);
}
std::string complete(const std::string& body) { return post("/v1/completions", body); }
std::string chat(const std::string& body) { return post("/v1/chat/completions", body); }

std::vector<BadCase> bad_cases() {
  const std::string msgs = R"("messages":[{"role":"user","content":"hi"}])";
  std::vector<BadCase> c = {
      {"truncated_json", complete(R"({"prompt": )"), 400, "", ""},
      {"not_an_object", complete("[1,2,3]"), 400, "", ""},
      {"empty_body", complete(""), 400, "", ""},
      {"trailing_garbage", complete(R"({"prompt":"x"} junk)"), 400, "", ""},
      {"single_quotes", complete("{'prompt':'x'}"), 400, "", ""},
      {"prompt_number", complete(R"({"prompt":42})"), 400, "prompt", ""},
      {"prompt_missing", complete(R"({"max_tokens":3})"), 400, "prompt", ""},
      {"prompt_batched", complete(R"({"prompt":["a","b"]})"), 400, "prompt", ""},
      {"prompt_token_out_of_vocab", complete(R"({"prompt":[1,2,99999]})"), 400, "prompt", ""},
      {"prompt_too_long", complete(R"({"prompt":")" + std::string(600, 'a') + R"("})"), 400, "prompt",
       "context_length_exceeded"},
      {"prompt_plus_max_tokens_too_long", complete(R"({"prompt":"abc","max_tokens":510})"), 400,
       "max_tokens", "context_length_exceeded"},
      {"max_tokens_string", complete(R"({"prompt":"x","max_tokens":"10"})"), 400, "max_tokens", ""},
      {"max_tokens_negative", complete(R"({"prompt":"x","max_tokens":-1})"), 400, "max_tokens", ""},
      {"max_tokens_zero", complete(R"({"prompt":"x","max_tokens":0})"), 400, "max_tokens", ""},
      {"max_tokens_huge", complete(R"({"prompt":"x","max_tokens":1000000000000})"), 400, "max_tokens", ""},
      {"max_tokens_beyond_int64", complete(R"({"prompt":"x","max_tokens":99999999999999999999})"), 400,
       "max_tokens", ""},
      {"max_tokens_fraction", complete(R"({"prompt":"x","max_tokens":2.5})"), 400, "max_tokens", ""},
      {"temperature_nan", complete(R"({"prompt":"x","temperature":NaN})"), 400, "", ""},
      {"temperature_infinity", complete(R"({"prompt":"x","temperature":Infinity})"), 400, "", ""},
      {"temperature_overflow", complete(R"({"prompt":"x","temperature":1e999})"), 400, "", ""},
      {"temperature_string", complete(R"({"prompt":"x","temperature":"warm"})"), 400, "temperature", ""},
      {"temperature_negative", complete(R"({"prompt":"x","temperature":-0.5})"), 400, "temperature", ""},
      {"top_p_out_of_range", complete(R"({"prompt":"x","top_p":1.5})"), 400, "top_p", ""},
      {"top_k_negative", complete(R"({"prompt":"x","top_k":-7})"), 400, "top_k", ""},
      {"seed_string", complete(R"({"prompt":"x","seed":"7"})"), 400, "seed", ""},
      {"n_two", complete(R"({"prompt":"x","n":2})"), 400, "n", ""},
      {"stop_number", complete(R"({"prompt":"x","stop":7})"), 400, "stop", ""},
      {"stream_string", complete(R"({"prompt":"x","stream":"true"})"), 400, "stream", ""},
      {"stream_options_without_stream", complete(R"({"prompt":"x","stream_options":{"include_usage":true}})"),
       400, "stream_options", ""},
      {"logprobs_requested", complete(R"({"prompt":"x","logprobs":5})"), 400, "logprobs", ""},
      {"unknown_model", complete(R"({"model":"gpt-17","prompt":"x"})"), 404, "model", "model_not_found"},
      {"invalid_utf8_body", complete("{\"prompt\":\"\xC3\x28 \xFF\"}"), 400, "", ""},
      {"deeply_nested", complete(std::string(10000, '[') + std::string(10000, ']')), 400, "", ""},
      {"chat_empty_messages", chat(R"({"messages":[]})"), 400, "messages", ""},
      {"chat_messages_string", chat(R"({"messages":"hello"})"), 400, "messages", ""},
      {"chat_bad_role", chat(R"({"messages":[{"role":"wizard","content":"x"}]})"), 400, "messages[0].role", ""},
      {"chat_missing_content", chat(R"({"messages":[{"role":"user"}]})"), 400, "messages[0].content", ""},
      {"chat_content_number", chat(R"({"messages":[{"role":"user","content":5}]})"), 400,
       "messages[0].content", ""},
      {"chat_n_three", chat("{" + msgs + R"(,"n":3})"), 400, "n", ""},
      {"chat_logprobs_true", chat("{" + msgs + R"(,"logprobs":true})"), 400, "logprobs", ""},
      {"chat_max_completion_tokens_negative", chat("{" + msgs + R"(,"max_completion_tokens":-5})"), 400,
       "max_completion_tokens", ""},
      {"unknown_route", make_request("GET", "/v1/nothing", ""), 404, "", "not_found"},
      {"unknown_route_post", post("/v2/completions", R"({"prompt":"x"})"), 404, "", ""},
      {"get_on_completions", make_request("GET", "/v1/completions", ""), 405, "", "method_not_allowed"},
      {"delete_models", make_request("DELETE", "/v1/models", ""), 405, "", ""},
      {"post_health", post("/health", "{}"), 405, "", ""},
      {"body_over_limit",
       "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: " +
           std::to_string(5u << 20) + "\r\n\r\n{",
       413, "", ""},
      {"chunked_body_over_limit",
       "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n" +
           std::string("100000\r\n") + std::string(0x100000, 'a') + "\r\n" + std::string("400000\r\n") +
           std::string(0x400000, 'a') + "\r\n0\r\n\r\n",
       413, "", ""},
      {"garbage_request_line", "HELLO THERE\r\n\r\n", 400, "", ""},
      {"header_too_large",
       "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + std::string(20000, 'a') + "\r\n\r\n", 431, "", ""},
  };
  return c;
}

class MalformedInput : public ::testing::Test {
 protected:
  static ServerConfig config() {
    ServerConfig c;
    c.max_body_bytes = 4u << 20;
    return c;
  }
};

TEST_F(MalformedInput, EveryCaseGetsTheRightStatusAndTheServerKeepsServing) {
  ServerHarness h(FakeConfig{}, config());
  const auto cases = bad_cases();
  ASSERT_GE(cases.size(), 30u);
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    const HttpResponse r = exchange(h.port(), c.raw);
    ASSERT_EQ(r.status, c.status) << r.body;
    const json j = expect_error_shape(r);
    if (!c.param.empty()) {
      EXPECT_EQ(j["error"]["param"], c.param) << r.body;
    }
    if (!c.code.empty()) {
      EXPECT_EQ(j["error"]["code"], c.code) << r.body;
    }
    if (!c.param.empty()) {
      // The message names the field.
      EXPECT_NE(j["error"]["message"].get<std::string>().find(c.param.substr(0, c.param.find('['))),
                std::string::npos)
          << r.body;
    }
    if (c.status == 405) {
      EXPECT_FALSE(r.header("allow").empty());
    }
    // Still serving after every case.
    const HttpResponse ok = h.get("/health");
    ASSERT_EQ(ok.status, 200);
  }
  // And a real request still works.
  const HttpResponse r = h.post("/v1/completions", R"({"prompt":"hi","max_tokens":4})");
  ASSERT_EQ(r.status, 200) << r.body;
  EXPECT_EQ(json::parse(r.body)["choices"][0]["text"], "The ");
  EXPECT_EQ(h.fake().submit_count(), 1);  // no malformed request reached the engine
}

TEST_F(MalformedInput, ConnectionStaysUsableAfterA400) {
  ServerHarness h;
  RawConnection c(h.port());
  ASSERT_TRUE(c.send_all(complete(R"({"prompt":"x","n":2})")));
  HttpResponse r1 = c.read_response();
  EXPECT_EQ(r1.status, 400);
  ASSERT_TRUE(c.send_all(complete(R"({"prompt":"x","max_tokens":2})")));
  HttpResponse r2 = c.read_response();
  EXPECT_EQ(r2.status, 200) << r2.body;
}

// ---------------------------------------------------------------------------------------------
// (b) Streaming wire format.

FakeConfig scripted(std::string text, bool eos = true) {
  FakeConfig fc;
  fc.script = [text = std::move(text), eos](const engine::RequestSpec&) { return byte_tokens(text, eos); };
  return fc;
}

TEST(Streaming, CompletionChunksExactShape) {
  ServerHarness h(scripted("Hello"));
  const HttpResponse r = h.post("/v1/completions", R"({"model":"fake-model","prompt":"hi","stream":true})");
  ASSERT_EQ(r.status, 200);
  EXPECT_EQ(r.header("content-type"), "text/event-stream");
  EXPECT_EQ(r.header("transfer-encoding"), "chunked");
  ASSERT_TRUE(r.complete);
  const auto events = sse_data(r.body);
  ASSERT_EQ(events.size(), 7u) << r.body;  // 5 tokens, finish, [DONE]
  EXPECT_EQ(events.back(), "[DONE]");
  EXPECT_TRUE(r.body.size() >= 14 && r.body.substr(r.body.size() - 14) == "data: [DONE]\n\n");
  std::string id;
  std::int64_t created = 0;
  std::string text;
  for (std::size_t i = 0; i + 1 < events.size(); ++i) {
    const json j = json::parse(events[i]);
    // Exact key set and order.
    std::vector<std::string> keys;
    for (auto it = j.begin(); it != j.end(); ++it) keys.push_back(it.key());
    EXPECT_EQ(std::set<std::string>(keys.begin(), keys.end()),
              (std::set<std::string>{"id", "object", "created", "model", "choices"}));
    EXPECT_EQ(events[i].rfind("{\"id\":\"cmpl-", 0), 0u) << events[i];
    EXPECT_EQ(j["object"], "text_completion");
    EXPECT_EQ(j["model"], "fake-model");
    if (i == 0) {
      id = j["id"];
      created = j["created"];
    }
    EXPECT_EQ(j["id"], id);
    EXPECT_EQ(j["created"], created);
    ASSERT_EQ(j["choices"].size(), 1u);
    const json& ch = j["choices"][0];
    EXPECT_EQ(ch["index"], 0);
    EXPECT_TRUE(ch["logprobs"].is_null());
    text += ch["text"].get<std::string>();
    if (i + 2 < events.size()) {
      EXPECT_TRUE(ch["finish_reason"].is_null());
      EXPECT_EQ(ch["text"].get<std::string>().size(), 1u);
    } else {
      EXPECT_EQ(ch["finish_reason"], "stop");
      EXPECT_EQ(ch["text"], "");
    }
  }
  EXPECT_EQ(text, "Hello");
  // The exact bytes of one chunk.
  EXPECT_EQ(events[0], "{\"id\":\"" + id + "\",\"object\":\"text_completion\",\"created\":" +
                           std::to_string(created) +
                           ",\"model\":\"fake-model\",\"choices\":[{\"index\":0,\"text\":\"H\","
                           "\"logprobs\":null,\"finish_reason\":null}]}");
}

TEST(Streaming, UsageChunkWhenRequested) {
  ServerHarness h(scripted("abc"));
  const HttpResponse r = h.post(
      "/v1/completions", R"({"prompt":"hi","stream":true,"stream_options":{"include_usage":true}})");
  ASSERT_EQ(r.status, 200);
  const auto events = sse_data(r.body);
  ASSERT_EQ(events.size(), 6u) << r.body;  // 3 tokens, finish, usage, [DONE]
  for (std::size_t i = 0; i < 4; ++i) {
    const json j = json::parse(events[i]);
    EXPECT_TRUE(j.contains("usage") && j["usage"].is_null()) << events[i];
  }
  const json usage = json::parse(events[4]);
  EXPECT_TRUE(usage["choices"].is_array() && usage["choices"].empty());
  EXPECT_EQ(usage["usage"]["prompt_tokens"], 3);      // <s> h i
  EXPECT_EQ(usage["usage"]["completion_tokens"], 4);  // a b c </s>
  EXPECT_EQ(usage["usage"]["total_tokens"], 7);
  EXPECT_EQ(events[5], "[DONE]");
}

TEST(Streaming, ChatChunks) {
  ServerHarness h(scripted("Hi!"));
  const HttpResponse r = h.post("/v1/chat/completions",
                                R"({"messages":[{"role":"user","content":"hello"}],"stream":true,
                                    "stream_options":{"include_usage":true}})");
  ASSERT_EQ(r.status, 200);
  const auto events = sse_data(r.body);
  ASSERT_EQ(events.size(), 7u) << r.body;  // role, H, i, !, finish, usage, [DONE]
  const json first = json::parse(events[0]);
  EXPECT_EQ(first["object"], "chat.completion.chunk");
  EXPECT_EQ(events[0].rfind("{\"id\":\"chatcmpl-", 0), 0u);
  EXPECT_EQ(first["choices"][0]["delta"], (json{{"role", "assistant"}, {"content", ""}}));
  std::string text;
  for (int i = 1; i <= 3; ++i) {
    const json j = json::parse(events[static_cast<std::size_t>(i)]);
    EXPECT_TRUE(j["choices"][0]["finish_reason"].is_null());
    EXPECT_FALSE(j["choices"][0]["delta"].contains("role"));
    text += j["choices"][0]["delta"]["content"].get<std::string>();
  }
  EXPECT_EQ(text, "Hi!");
  const json fin = json::parse(events[4]);
  EXPECT_EQ(fin["choices"][0]["delta"], json::object());
  EXPECT_EQ(fin["choices"][0]["finish_reason"], "stop");
  const json usage = json::parse(events[5]);
  EXPECT_TRUE(usage["choices"].empty());
  EXPECT_EQ(usage["usage"]["completion_tokens"], 4);
  EXPECT_EQ(events[6], "[DONE]");
}

TEST(Streaming, LengthFinishAndNonStreamBodies) {
  ServerHarness h;
  HttpResponse r = h.post("/v1/completions", R"({"prompt":"x","max_tokens":9,"stream":true})");
  auto events = sse_data(r.body);
  ASSERT_GE(events.size(), 2u);
  EXPECT_EQ(json::parse(events[events.size() - 2])["choices"][0]["finish_reason"], "length");

  r = h.post("/v1/completions", R"({"prompt":"x","max_tokens":9})");
  ASSERT_EQ(r.status, 200);
  json j = json::parse(r.body);
  EXPECT_EQ(j["object"], "text_completion");
  EXPECT_EQ(j["choices"][0]["text"], "The quick");
  EXPECT_EQ(j["choices"][0]["finish_reason"], "length");
  EXPECT_TRUE(j["choices"][0]["logprobs"].is_null());
  EXPECT_EQ(j["usage"], (json{{"prompt_tokens", 2}, {"completion_tokens", 9}, {"total_tokens", 11}}));

  r = h.post("/v1/chat/completions", R"({"messages":[{"role":"user","content":"x"}],"max_tokens":3})");
  ASSERT_EQ(r.status, 200);
  j = json::parse(r.body);
  EXPECT_EQ(j["object"], "chat.completion");
  EXPECT_EQ(j["choices"][0]["message"], (json{{"role", "assistant"}, {"content", "The"}}));
  EXPECT_EQ(j["choices"][0]["finish_reason"], "length");
}

TEST(Streaming, MultiByteCharactersAreNeverSplit) {
  const std::string text = "h\xC3\xA9llo \xE2\x82\xAC \xF0\x9F\x98\x80!";  // héllo € 😀!
  ServerHarness h(scripted(text));
  const HttpResponse r = h.post("/v1/completions", R"({"prompt":"x","stream":true})");
  std::string all;
  for (const auto& ev : sse_data(r.body)) {
    if (ev == "[DONE]") continue;
    const std::string piece = json::parse(ev)["choices"][0]["text"];
    EXPECT_TRUE(is_valid_utf8(piece));
    EXPECT_EQ(piece.find("\xEF\xBF\xBD"), std::string::npos);
    all += piece;
  }
  EXPECT_EQ(all, text);
}

TEST(Streaming, TokenIdPromptsAndHttp10) {
  ServerHarness h(scripted("ok"));
  HttpResponse r = h.post("/v1/completions", R"({"prompt":[[104,105]],"max_tokens":5})");
  ASSERT_EQ(r.status, 200) << r.body;
  EXPECT_EQ(json::parse(r.body)["usage"]["prompt_tokens"], 2);
  // HTTP/1.0 client: no chunked encoding, the stream ends with the connection.
  const std::string body = R"({"prompt":"x","stream":true})";
  r = exchange(h.port(), "POST /v1/completions HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: " + std::to_string(body.size()) +
                             "\r\n\r\n" + body);
  ASSERT_EQ(r.status, 200);
  EXPECT_TRUE(r.header("transfer-encoding").empty());
  ASSERT_FALSE(sse_data(r.body).empty()) << r.body;
  EXPECT_EQ(sse_data(r.body).back(), "[DONE]");
}

// ---------------------------------------------------------------------------------------------
// (c) Stop sequences.

TEST(StopSequences, TruncateOutputAndFreeTheRequest) {
  ServerHarness h(scripted("Hello world. Goodbye world.", false));
  HttpResponse r = h.post("/v1/completions", R"({"prompt":"x","max_tokens":40,"stop":"wor"})");
  ASSERT_EQ(r.status, 200) << r.body;
  json j = json::parse(r.body);
  EXPECT_EQ(j["choices"][0]["text"], "Hello ");
  EXPECT_EQ(j["choices"][0]["finish_reason"], "stop");
  EXPECT_EQ(j["usage"]["completion_tokens"], 9);  // "Hello wor"
  EXPECT_TRUE(h.fake().wait_idle(2000ms));
  EXPECT_EQ(h.fake().used_blocks(), 0);
  EXPECT_EQ(h.fake().cancel_count(), 1);

  // Streaming, several stops, the earliest wins; text never includes a stop prefix.
  r = h.post("/v1/completions", R"({"prompt":"x","max_tokens":40,"stop":["Good","d. "],"stream":true})");
  std::string text;
  const auto events = sse_data(r.body);
  ASSERT_GE(events.size(), 2u);
  for (const auto& ev : events) {
    if (ev == "[DONE]") continue;
    text += json::parse(ev)["choices"][0]["text"].get<std::string>();
  }
  EXPECT_EQ(text, "Hello worl");
  EXPECT_EQ(json::parse(events[events.size() - 2])["choices"][0]["finish_reason"], "stop");

  // A stop string that never appears leaves the output whole, even with a held-back prefix.
  r = h.post("/v1/completions", R"({"prompt":"x","max_tokens":27,"stop":["world!"]})");
  j = json::parse(r.body);
  EXPECT_EQ(j["choices"][0]["text"], "Hello world. Goodbye world.");
  EXPECT_EQ(j["choices"][0]["finish_reason"], "length");

  // Chat, stop in the middle of the stream.
  r = h.post("/v1/chat/completions",
             R"({"messages":[{"role":"user","content":"x"}],"stop":[". "],"max_tokens":40})");
  j = json::parse(r.body);
  EXPECT_EQ(j["choices"][0]["message"]["content"], "Hello world");
}

// ---------------------------------------------------------------------------------------------
// (d) A client that disconnects mid-stream cancels its request; the fake frees its blocks.

TEST(Disconnect, MidStreamFreesBlocksAtOnce) {
  FakeConfig fc;
  fc.inter_token_us = 5000;
  fc.block_size_tokens = 4;
  ServerHarness h(fc);
  RawConnection c(h.port());
  ASSERT_TRUE(c.send_all(complete(R"({"prompt":"hello there","max_tokens":400,"stream":true})")));
  // Wait for a few chunks.
  for (int i = 0; i < 100 && c.buffer().size() < 600; ++i) c.read_more(100);
  ASSERT_GE(c.buffer().size(), 600u);
  ASSERT_EQ(h.fake().active_requests(), 1u);
  const std::int64_t used = h.fake().used_blocks();
  EXPECT_GT(used, 3);
  const auto t0 = std::chrono::steady_clock::now();
  c.close();
  ASSERT_TRUE(h.fake().wait_idle(2000ms));
  const double freed_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_EQ(h.fake().used_blocks(), 0);
  EXPECT_EQ(h.fake().cancel_count(), 1);
  // "At once": well before the next scripted tokens (5 ms apart) would have mattered.
  EXPECT_LT(freed_ms, 100.0);
  std::printf("[disconnect] %lld blocks freed %.3f ms after the client closed\n",
              static_cast<long long>(used), freed_ms);
  EXPECT_EQ(h.server().metrics().client_disconnect_cancels.load(), 1);
  // Still serving.
  EXPECT_EQ(h.get("/health").status, 200);
}

TEST(Disconnect, ResetAndNonStreamingAlsoCancel) {
  FakeConfig fc;
  fc.inter_token_us = 5000;
  ServerHarness h(fc);
  {
    RawConnection c(h.port());
    ASSERT_TRUE(c.send_all(complete(R"({"prompt":"x","max_tokens":300})")));  // non-streaming
    ASSERT_TRUE(h.fake().wait_active_at_least(1, 2000ms));
    c.abort();  // RST
  }
  ASSERT_TRUE(h.fake().wait_idle(2000ms));
  EXPECT_EQ(h.fake().used_blocks(), 0);
  EXPECT_EQ(h.fake().cancel_count(), 1);
}

// ---------------------------------------------------------------------------------------------
// (e) A full queue gets 429 with Retry-After; 503 when the engine is unavailable.

TEST(Overload, FullQueueGets429WithRetryAfter) {
  FakeConfig fc;
  fc.max_requests = 2;
  fc.inter_token_us = 5000;
  ServerConfig sc;
  sc.retry_after_s = 3;
  ServerHarness h(fc, sc);
  RawConnection a(h.port()), b(h.port());
  ASSERT_TRUE(a.send_all(complete(R"({"prompt":"x","max_tokens":100,"stream":true})")));
  ASSERT_TRUE(b.send_all(complete(R"({"prompt":"x","max_tokens":100,"stream":true})")));
  ASSERT_TRUE(h.fake().wait_active_at_least(2, 2000ms));
  HttpResponse r = h.post("/v1/completions", R"({"prompt":"x","max_tokens":5})");
  EXPECT_EQ(r.status, 429);
  EXPECT_EQ(r.header("retry-after"), "3");
  json j = expect_error_shape(r);
  EXPECT_EQ(j["error"]["type"], "rate_limit_error");
  r = h.post("/v1/chat/completions", R"({"messages":[{"role":"user","content":"x"}],"stream":true})");
  EXPECT_EQ(r.status, 429);  // an error before streaming starts is a plain JSON error
  expect_error_shape(r);
  a.close();
  b.close();
  ASSERT_TRUE(h.fake().wait_idle(2000ms));
  r = h.post("/v1/completions", R"({"prompt":"x","max_tokens":5})");
  EXPECT_EQ(r.status, 200);

  h.fake().set_unavailable(true);
  r = h.post("/v1/completions", R"({"prompt":"x","max_tokens":5})");
  EXPECT_EQ(r.status, 503);
  EXPECT_EQ(r.header("retry-after"), "3");
  expect_error_shape(r);
}

// ---------------------------------------------------------------------------------------------
// Keep-alive, pipelining, the simple routes, shutdown.

TEST(Connection, KeepAliveAndPipelining) {
  ServerHarness h(scripted("xy"));
  RawConnection c(h.port());
  // Two requests in one write: the second is answered after the first.
  ASSERT_TRUE(c.send_all(complete(R"({"prompt":"a","stream":true})") + make_request("GET", "/v1/models", "")));
  HttpResponse r1 = c.read_response();
  ASSERT_EQ(r1.status, 200);
  ASSERT_FALSE(sse_data(r1.body).empty()) << r1.body;
  EXPECT_EQ(sse_data(r1.body).back(), "[DONE]");
  HttpResponse r2 = c.read_response();
  ASSERT_EQ(r2.status, 200);
  json models = json::parse(r2.body);
  EXPECT_EQ(models["object"], "list");
  EXPECT_EQ(models["data"][0]["id"], "fake-model");
  EXPECT_EQ(models["data"][0]["object"], "model");
  // Connection: close is honoured.
  ASSERT_TRUE(c.send_all(make_request("GET", "/health", "", "", false)));
  HttpResponse r3 = c.read_response();
  EXPECT_EQ(r3.status, 200);
  EXPECT_EQ(r3.header("connection"), "close");
  EXPECT_TRUE(c.wait_closed(2000));
}

TEST(Connection, RoutesAndExpectContinue) {
  ServerHarness h;
  EXPECT_EQ(h.get("/health").status, 200);
  HttpResponse r = h.get("/v1/models/fake-model");
  EXPECT_EQ(r.status, 200);
  EXPECT_EQ(json::parse(r.body)["id"], "fake-model");
  r = h.get("/v1/models/other");
  EXPECT_EQ(r.status, 404);
  expect_error_shape(r);
  r = h.get("/metrics?x=1");
  EXPECT_EQ(r.status, 200);
  EXPECT_EQ(r.header("content-type").rfind("text/plain; version=0.0.4", 0), 0u);
  const std::string body = R"({"prompt":"x","max_tokens":2})";
  r = exchange(h.port(), "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nExpect: 100-continue\r\n"
                         "Content-Type: application/json\r\n"
                         "Content-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body);
  EXPECT_EQ(r.status, 200) << r.body;
}

TEST(Connection, IdleConnectionsTimeOut) {
  ServerConfig sc;
  sc.header_timeout_ms = 200;
  ServerHarness h(FakeConfig{}, sc);
  RawConnection c(h.port());
  ASSERT_TRUE(c.send_all("GET /health HTTP/1.1\r\n"));  // never finishes its header
  EXPECT_TRUE(c.wait_closed(3000));
}

TEST(Shutdown, DrainsInFlightStreamsAndRefusesNewWork) {
  FakeConfig fc;
  fc.inter_token_us = 2000;
  ServerConfig sc;
  sc.drain_timeout_ms = 5000;
  ServerHarness h(fc, sc);
  RawConnection streaming(h.port());
  RawConnection idle(h.port());
  ASSERT_TRUE(idle.send_all(make_request("GET", "/health", "")));
  ASSERT_EQ(idle.read_response().status, 200);
  ASSERT_TRUE(streaming.send_all(complete(R"({"prompt":"x","max_tokens":50,"stream":true})")));
  ASSERT_TRUE(h.fake().wait_active_at_least(1, 2000ms));
  std::thread stopper([&] { h.server().stop(); });
  // The idle keep-alive connection is closed; the stream runs to completion.
  EXPECT_TRUE(idle.wait_closed(3000));
  HttpResponse r = streaming.read_response(5000);
  EXPECT_EQ(r.status, 200);
  ASSERT_FALSE(sse_data(r.body).empty()) << r.body;
  EXPECT_EQ(sse_data(r.body).back(), "[DONE]");
  stopper.join();
  EXPECT_EQ(h.fake().cancel_count(), 0);
  RawConnection late(h.port());
  EXPECT_FALSE(late.connected() && late.send_all(make_request("GET", "/health", "")) &&
               late.read_response(1000).status == 200);
}

TEST(Shutdown, CancelsWhatDoesNotFinishInTime) {
  FakeConfig fc;
  fc.inter_token_us = 10000;
  ServerConfig sc;
  sc.drain_timeout_ms = 100;
  ServerHarness h(fc, sc);
  RawConnection c(h.port());
  ASSERT_TRUE(c.send_all(complete(R"({"prompt":"x","max_tokens":400,"stream":true})")));
  ASSERT_TRUE(h.fake().wait_active_at_least(1, 2000ms));
  const auto t0 = std::chrono::steady_clock::now();
  h.server().stop();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 3s);
  EXPECT_TRUE(h.fake().wait_idle(2000ms));
  EXPECT_EQ(h.fake().used_blocks(), 0);
  EXPECT_EQ(h.fake().cancel_count(), 1);
}

TEST(Concurrency, ManyParallelStreamsOnFewThreads) {
  FakeConfig fc;
  fc.inter_token_us = 5000;  // 100 tokens: each stream lives ~0.5 s, so all overlap
  ServerHarness h(fc);
  constexpr int kClients = 64;
  std::vector<std::unique_ptr<RawConnection>> conns;
  for (int i = 0; i < kClients; ++i) {
    conns.push_back(std::make_unique<RawConnection>(h.port()));
    ASSERT_TRUE(conns.back()->send_all(complete(R"({"prompt":"x","max_tokens":100,"stream":true})")));
  }
  EXPECT_TRUE(h.fake().wait_active_at_least(kClients, std::chrono::milliseconds(5000)));
  int ok = 0;
  for (auto& c : conns) {
    HttpResponse r = c->read_response(10000);
    const auto ev = sse_data(r.body);
    // 99 one-token chunks, the finish chunk carrying the 100th token, [DONE].
    if (r.status == 200 && ev.size() == 101 && ev.back() == "[DONE]") ++ok;
  }
  EXPECT_EQ(ok, kClients);
}

}  // namespace
}  // namespace kun::server::testing
