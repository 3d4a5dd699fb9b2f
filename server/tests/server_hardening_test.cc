// Production hardening of the HTTP server (issue 13) over real sockets against the fake front
// door: RFC 9112 framing (Transfer-Encoding, Host), Content-Type, bounded and library-free
// error messages, API keys, CORS, the Host allow list, graceful drain, half-closed clients and
// the rule that a request failing before generation gets an HTTP error, never 200 + an event.
#include <gtest/gtest.h>

#include <sys/socket.h>

#include <thread>

#include <nlohmann/json.hpp>

#include "server/tests/server_test_util.h"

namespace kun::server::testing {
namespace {

using nlohmann::json;
using namespace std::chrono_literals;

std::string completion_body(int max_tokens, bool stream) {
  return R"({"prompt":"hello","max_tokens":)" + std::to_string(max_tokens) +
         (stream ? R"(,"stream":true})" : "}");
}

// A raw request with exactly the given header lines (no defaults added).
std::string raw_request(const std::string& method, const std::string& path, const std::string& headers,
                        const std::string& body = "", const std::string& version = "HTTP/1.1") {
  return method + " " + path + " " + version + "\r\n" + headers + "\r\n" + body;
}

// ---------------------------------------------------------------------------------------------
// Transfer-Encoding: anything but exactly "chunked" is refused and the connection closed, so a
// request hidden in the body is never parsed (no request smuggling / desync).

TEST(Framing, UnsupportedTransferEncodingClosesWithoutAnsweringTheSmuggledRequest) {
  ServerHarness h;
  const std::string smuggled = "GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
  const std::vector<std::string> codings = {"gzip", "identity", "chunked, chunked", "gzip, chunked",
                                            "chunked\r\nTransfer-Encoding: chunked", "deflate"};
  for (const std::string& te : codings) {
    RawConnection c(h.port());
    ASSERT_TRUE(c.connected());
    ASSERT_TRUE(c.send_all("POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                           "Transfer-Encoding: " + te + "\r\n\r\n" + smuggled));
    HttpResponse r = c.read_response(5000);
    EXPECT_TRUE(r.status == 400 || r.status == 501) << te << ": " << r.status;
    EXPECT_EQ(r.header("connection"), "close") << te;
    expect_error_shape(r);
    // The connection ends and nothing else is answered: the smuggled GET got no response.
    EXPECT_TRUE(c.wait_closed(4000)) << te;
    EXPECT_EQ(c.buffer().find("HTTP/1.1"), std::string::npos) << te << ": " << c.buffer();
  }
  // Transfer-Encoding together with Content-Length is refused too.
  RawConnection c(h.port());
  ASSERT_TRUE(c.send_all("POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n" + smuggled));
  HttpResponse r = c.read_response(5000);
  EXPECT_EQ(r.status, 400);
  EXPECT_TRUE(c.wait_closed(4000));
  EXPECT_EQ(c.buffer().find("HTTP/1.1"), std::string::npos) << c.buffer();
  // Plain chunked still works (any letter case).
  const std::string body = completion_body(3, false);
  char size[16];
  std::snprintf(size, sizeof(size), "%zx", body.size());
  RawConnection ok(h.port());
  ASSERT_TRUE(ok.send_all("POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                          "Transfer-Encoding: Chunked\r\n\r\n" + std::string(size) + "\r\n" + body + "\r\n0\r\n\r\n"));
  EXPECT_EQ(ok.read_response(5000).status, 200);
}

TEST(Framing, HostHeaderIsRequiredOnceAndMustBeAllowed) {
  ServerHarness h;  // binds 127.0.0.1: the default allow list is localhost / 127.0.0.1 / ::1
  EXPECT_EQ(exchange(h.port(), raw_request("GET", "/v1/models", "")).status, 400);
  // HTTP/1.0 may omit Host (no browser does, so no rebinding risk).
  EXPECT_EQ(exchange(h.port(), raw_request("GET", "/v1/models", "", "", "HTTP/1.0")).status, 200);
  HttpResponse two = exchange(h.port(), raw_request("GET", "/v1/models", "Host: 127.0.0.1\r\nHost: localhost\r\n"));
  EXPECT_EQ(two.status, 400);
  HttpResponse evil = exchange(h.port(), raw_request("GET", "/v1/models", "Host: attacker.example:8000\r\n"));
  EXPECT_EQ(evil.status, 400);
  EXPECT_EQ(expect_error_shape(evil)["error"]["code"], "invalid_host");
  for (const std::string host : {"127.0.0.1", "localhost:8000", "LOCALHOST", "[::1]:8000", "127.0.0.1:1"}) {
    EXPECT_EQ(exchange(h.port(), raw_request("GET", "/v1/models", "Host: " + host + "\r\n")).status, 200) << host;
  }
  // /health is checked too (a rebinding page could otherwise probe it).
  EXPECT_EQ(exchange(h.port(), raw_request("GET", "/health", "Host: attacker.example\r\n")).status, 400);
}

TEST(Framing, ExplicitHostAllowList) {
  ServerConfig any;
  any.allowed_hosts = {"*"};
  ServerHarness h(FakeConfig{}, any);
  EXPECT_EQ(exchange(h.port(), raw_request("GET", "/v1/models", "Host: whatever.example\r\n")).status, 200);
  ServerConfig listed;
  listed.allowed_hosts = {"api.example.com"};
  ServerHarness h2(FakeConfig{}, listed);
  EXPECT_EQ(exchange(h2.port(), raw_request("GET", "/v1/models", "Host: API.example.com:443\r\n")).status, 200);
  EXPECT_EQ(exchange(h2.port(), raw_request("GET", "/v1/models", "Host: 127.0.0.1\r\n")).status, 400);
  EXPECT_EQ(effective_allowed_hosts(ServerConfig{}), (std::vector<std::string>{"localhost", "127.0.0.1", "::1"}));
  ServerConfig wide;
  wide.host = "0.0.0.0";
  EXPECT_EQ(effective_allowed_hosts(wide), std::vector<std::string>{"*"});
}

TEST(Framing, PostBodiesMustBeJson) {
  ServerHarness h;
  const std::string body = completion_body(2, false);
  auto post_with = [&](const std::string& content_type) {
    std::string headers = "Host: 127.0.0.1\r\nContent-Length: " + std::to_string(body.size()) + "\r\n";
    if (!content_type.empty()) headers += "Content-Type: " + content_type + "\r\n";
    return exchange(h.port(), raw_request("POST", "/v1/completions", headers, body));
  };
  for (const std::string ct : {"text/plain", "", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                               "application/json; charset=latin1", "application/jsonx"}) {
    HttpResponse r = post_with(ct);
    EXPECT_EQ(r.status, 415) << "'" << ct << "'";
    EXPECT_EQ(expect_error_shape(r)["error"]["code"], "unsupported_media_type");
  }
  EXPECT_EQ(h.fake().submit_count(), 0);
  for (const std::string ct : {"application/json", "application/json; charset=utf-8", "Application/JSON;charset=\"UTF-8\""}) {
    EXPECT_EQ(post_with(ct).status, 200) << ct;
  }
}

// ---------------------------------------------------------------------------------------------
// Error messages: bounded, no JSON-library internals, no overflow near 2^63.

TEST(ErrorMessages, BoundedAndInOurOwnWords) {
  ServerHarness h;
  const std::string digits(100'000, '7');
  const std::vector<std::string> bodies = {
      R"({"prompt":"x","max_tokens":)" + digits + "}",
      R"({"prompt":"x","temperature":)" + digits + "." + digits + "}",
      R"({"prompt": )",
      R"({"prompt":"x"} junk)",
      "{'prompt':'x'}",
      "[" + std::string(50'000, '1') + "x]",
      R"({"prompt":")" + std::string(60'000, 'a') + R"(",})",
  };
  for (const std::string& body : bodies) {
    HttpResponse r = h.post("/v1/completions", body);
    EXPECT_EQ(r.status, 400);
    EXPECT_LT(r.body.size(), 2048u) << "an error body echoed " << r.body.size() << " bytes";
    const std::string message = expect_error_shape(r)["error"]["message"];
    EXPECT_EQ(message.find("json.exception"), std::string::npos) << message;
    EXPECT_EQ(message.find("parse_error"), std::string::npos) << message;
  }
  // A long unknown path and a model name are clipped too.
  HttpResponse nf = h.get("/" + std::string(10'000, 'p'));
  EXPECT_EQ(nf.status, 404);
  EXPECT_LT(nf.body.size(), 1024u);
  HttpResponse nm = h.post("/v1/completions", R"({"prompt":"x","model":")" + std::string(50'000, 'm') + R"("})");
  EXPECT_EQ(nm.status, 404);
  EXPECT_LT(nm.body.size(), 2048u);
}

TEST(ErrorMessages, MaxTokensNearTwoToThe63DoesNotOverflow) {
  ServerHarness h;
  for (const std::string v : {"9223372036854775807", "9223372036854775806", "9223372036854775000"}) {
    HttpResponse r = h.post("/v1/completions", R"({"prompt":"hello","max_tokens":)" + v + "}");
    EXPECT_EQ(r.status, 400);
    const std::string message = expect_error_shape(r)["error"]["message"];
    EXPECT_EQ(message.find("-9"), std::string::npos) << "negative token count: " << message;
    EXPECT_NE(message.find(v), std::string::npos) << message;
  }
  ServerHarness h2(FakeConfig{.max_context_tokens = 0});
  HttpResponse r = h2.post("/v1/completions", R"({"prompt":"hello","max_tokens":9223372036854775807})");
  EXPECT_EQ(r.status, 400);
  EXPECT_EQ(h2.fake().submit_count(), 0);
}

// ---------------------------------------------------------------------------------------------
// API key and CORS.

TEST(ApiKey, BearerTokenOnV1RoutesOnly) {
  ServerConfig sc;
  sc.api_key = "sk-test-123";
  ServerHarness h(FakeConfig{}, sc);
  const std::string body = completion_body(2, false);
  auto with_auth = [&](const std::string& auth) {
    return exchange(h.port(), make_request("POST", "/v1/completions", body, auth.empty() ? "" : "Authorization: " + auth + "\r\n"));
  };
  for (const std::string bad : {"", "Bearer wrong", "Bearer sk-test-12", "Bearer sk-test-1234", "Basic c2stdGVzdC0xMjM=",
                                "sk-test-123", "Bearer"}) {
    HttpResponse r = with_auth(bad);
    EXPECT_EQ(r.status, 401) << "'" << bad << "'";
    EXPECT_EQ(expect_error_shape(r)["error"]["code"], "invalid_api_key");
    EXPECT_EQ(r.header("www-authenticate"), "Bearer");
  }
  EXPECT_EQ(h.fake().submit_count(), 0);
  EXPECT_EQ(with_auth("Bearer sk-test-123").status, 200);
  EXPECT_EQ(with_auth("bearer sk-test-123").status, 200);
  EXPECT_EQ(h.get("/v1/models").status, 401);
  EXPECT_EQ(exchange(h.port(), make_request("GET", "/v1/models", "", "Authorization: Bearer sk-test-123\r\n")).status, 200);
  EXPECT_EQ(h.get("/health").status, 200);
  EXPECT_EQ(h.get("/metrics").status, 200);  // open unless metrics_require_api_key

  ServerConfig locked = sc;
  locked.metrics_require_api_key = true;
  ServerHarness h2(FakeConfig{}, locked);
  EXPECT_EQ(h2.get("/metrics").status, 401);
  EXPECT_EQ(exchange(h2.port(), make_request("GET", "/metrics", "", "Authorization: Bearer sk-test-123\r\n")).status, 200);
  EXPECT_EQ(h2.get("/health").status, 200);
}

TEST(Cors, OffByDefaultAndAllowListWhenConfigured) {
  const std::string origin_hdr = "Origin: https://app.example\r\n";
  {
    ServerHarness h;
    HttpResponse r = exchange(h.port(), make_request("GET", "/v1/models", "", origin_hdr));
    EXPECT_EQ(r.status, 200);
    EXPECT_EQ(r.header("access-control-allow-origin"), "");
    HttpResponse pre = exchange(h.port(), make_request("OPTIONS", "/v1/completions", "",
                                                       origin_hdr + "Access-Control-Request-Method: POST\r\n"));
    EXPECT_EQ(pre.status, 405);
  }
  ServerConfig sc;
  sc.allowed_origins = {"https://app.example"};
  sc.api_key = "k";  // preflight requests carry no credentials and still succeed
  ServerHarness h(FakeConfig{}, sc);
  HttpResponse pre = exchange(h.port(), make_request("OPTIONS", "/v1/completions", "",
                                                     origin_hdr + "Access-Control-Request-Method: POST\r\n"
                                                                  "Access-Control-Request-Headers: authorization, content-type\r\n"));
  EXPECT_EQ(pre.status, 204);
  EXPECT_EQ(pre.header("access-control-allow-origin"), "https://app.example");
  EXPECT_NE(pre.header("access-control-allow-methods").find("POST"), std::string::npos);
  EXPECT_NE(pre.header("access-control-allow-headers").find("Authorization"), std::string::npos);
  HttpResponse post = exchange(h.port(), make_request("POST", "/v1/completions", completion_body(2, false),
                                                      origin_hdr + "Authorization: Bearer k\r\n"));
  EXPECT_EQ(post.status, 200);
  EXPECT_EQ(post.header("access-control-allow-origin"), "https://app.example");
  HttpResponse stream = exchange(h.port(), make_request("POST", "/v1/completions", completion_body(2, true),
                                                        origin_hdr + "Authorization: Bearer k\r\n"));
  EXPECT_EQ(stream.status, 200);
  EXPECT_EQ(stream.header("access-control-allow-origin"), "https://app.example");
  const std::string evil = "Origin: https://evil.example\r\n";
  EXPECT_EQ(exchange(h.port(), make_request("OPTIONS", "/v1/completions", "", evil)).status, 403);
  HttpResponse other = exchange(h.port(), make_request("GET", "/v1/models", "", evil + "Authorization: Bearer k\r\n"));
  EXPECT_EQ(other.status, 200);
  EXPECT_EQ(other.header("access-control-allow-origin"), "");
}

// ---------------------------------------------------------------------------------------------
// A request that fails before generating anything gets an HTTP error even when streaming.

TEST(Validation, StreamFailingBeforeGenerationGetsAnHttpError) {
  FakeConfig fc;
  fc.async_reject_over_tokens = 100;
  ServerHarness h(fc);
  for (bool stream : {false, true}) {
    HttpResponse r = h.post("/v1/completions", completion_body(200, stream));
    EXPECT_EQ(r.status, 400) << "stream " << stream << ": " << r.body;
    EXPECT_EQ(expect_error_shape(r)["error"]["code"], "context_length_exceeded");
    HttpResponse chat = h.post("/v1/chat/completions",
                               R"({"messages":[{"role":"user","content":"hi"}],"max_tokens":200,"stream":)" +
                                   std::string(stream ? "true" : "false") + "}");
    EXPECT_EQ(chat.status, 400) << chat.body;
  }
  // Within the limit streams as before.
  HttpResponse ok = h.post("/v1/completions", completion_body(5, true));
  EXPECT_EQ(ok.status, 200);
  EXPECT_EQ(sse_data(ok.body).back(), "[DONE]");
}

// ---------------------------------------------------------------------------------------------
// Graceful drain.

TEST(Drain, NewConnectionsGet503WithRetryAfterWhileInFlightRequestsFinish) {
  FakeConfig fc;
  fc.inter_token_us = 5000;
  ServerConfig sc;
  sc.drain_timeout_ms = 10000;
  ServerHarness h(fc, sc);
  RawConnection stream(h.port());
  ASSERT_TRUE(stream.send_all(make_request("POST", "/v1/completions", completion_body(150, true))));
  ASSERT_TRUE(h.fake().wait_active_at_least(1, 2000ms));
  std::thread stopper([&] { h.server().stop(); });
  // New connections are accepted and answered 503 + Retry-After (not refused) during the drain.
  HttpResponse during;
  for (int i = 0; i < 200; ++i) {
    during = exchange(h.port(), make_request("GET", "/health", ""), 2000);
    if (during.status == 503) break;
    std::this_thread::sleep_for(5ms);
  }
  EXPECT_EQ(during.status, 503);
  EXPECT_EQ(during.header("retry-after"), "1");
  EXPECT_EQ(during.header("connection"), "close");
  HttpResponse gen = exchange(h.port(), make_request("POST", "/v1/completions", completion_body(3, false)), 2000);
  EXPECT_EQ(gen.status, 503);
  EXPECT_GE(h.server().num_in_flight(), 1u);
  // The stream started before the drain finishes normally.
  HttpResponse r = stream.read_response(10000);
  EXPECT_EQ(r.status, 200);
  ASSERT_FALSE(sse_data(r.body).empty());
  EXPECT_EQ(sse_data(r.body).back(), "[DONE]");
  EXPECT_EQ(r.body.find("\"error\""), std::string::npos) << r.body;
  EXPECT_TRUE(r.complete);
  stopper.join();
  EXPECT_EQ(h.fake().cancel_count(), 0);
}

TEST(Drain, AtTheDeadlineStreamsGetAnErrorEventAndDoneAndOthersA503) {
  FakeConfig fc;
  fc.inter_token_us = 10000;
  ServerConfig sc;
  sc.drain_timeout_ms = 200;
  ServerHarness h(fc, sc);
  RawConnection stream(h.port());
  RawConnection plain(h.port());
  ASSERT_TRUE(stream.send_all(make_request("POST", "/v1/completions", completion_body(400, true))));
  ASSERT_TRUE(plain.send_all(make_request("POST", "/v1/completions", completion_body(400, false))));
  ASSERT_TRUE(h.fake().wait_active_at_least(2, 2000ms));
  std::this_thread::sleep_for(50ms);  // a few tokens out
  std::thread stopper([&] { h.server().stop(); });
  HttpResponse s = stream.read_response(5000);
  HttpResponse p = plain.read_response(5000);
  stopper.join();
  EXPECT_EQ(s.status, 200);
  EXPECT_TRUE(s.complete) << "the chunked stream must end with its terminator";
  const auto events = sse_data(s.body);
  ASSERT_GE(events.size(), 2u) << s.body;
  EXPECT_EQ(events.back(), "[DONE]");
  const json err = json::parse(events[events.size() - 2], nullptr, false);
  ASSERT_TRUE(err.is_object() && err.contains("error")) << events[events.size() - 2];
  EXPECT_EQ(err["error"]["code"], "service_unavailable");
  EXPECT_EQ(p.status, 503);
  EXPECT_FALSE(p.header("retry-after").empty());
  expect_error_shape(p);
  EXPECT_TRUE(h.fake().wait_idle(2000ms));
  EXPECT_EQ(h.fake().used_blocks(), 0);
  EXPECT_EQ(h.fake().cancel_count(), 2);
}

// ---------------------------------------------------------------------------------------------
// Half-closed clients get their whole response; only a reset (or failed write) cancels.

TEST(HalfClose, ClientThatShutsDownItsWriteSideGetsTheWholeResponse) {
  FakeConfig fc;
  fc.inter_token_us = 2000;
  ServerHarness h(fc);
  for (bool stream : {false, true}) {
    RawConnection c(h.port());
    ASSERT_TRUE(c.send_all(make_request("POST", "/v1/completions", completion_body(40, stream))));
    ASSERT_EQ(::shutdown(c.fd(), SHUT_WR), 0);
    HttpResponse r = c.read_response(10000);
    EXPECT_EQ(r.status, 200) << "stream " << stream;
    EXPECT_TRUE(r.complete);
    if (stream) {
      EXPECT_EQ(sse_data(r.body).back(), "[DONE]");
      EXPECT_EQ(r.body.find("\"error\""), std::string::npos);
    } else {
      const json j = json::parse(r.body, nullptr, false);
      ASSERT_TRUE(j.is_object()) << r.body;
      EXPECT_EQ(j["usage"]["completion_tokens"], 40);
    }
    EXPECT_TRUE(c.wait_closed(3000));
  }
  EXPECT_EQ(h.fake().cancel_count(), 0);
  EXPECT_EQ(h.server().metrics().client_disconnect_cancels.load(), 0);
  // A reset still cancels at once.
  RawConnection gone(h.port());
  ASSERT_TRUE(gone.send_all(make_request("POST", "/v1/completions", completion_body(400, false))));
  ASSERT_TRUE(h.fake().wait_active_at_least(1, 2000ms));
  gone.abort();
  EXPECT_TRUE(h.fake().wait_idle(2000ms));
  EXPECT_EQ(h.fake().cancel_count(), 1);
}

// ---------------------------------------------------------------------------------------------
// Extra JSON routes (e.g. /v1/kunserve/events) are GET-only and behind the API key.

TEST(JsonRoutes, ServedAndProtected) {
  ServerConfig sc;
  sc.api_key = "k";
  sc.json_routes["/v1/kunserve/events"] = [] { return std::string(R"({"object":"list","data":[]})"); };
  ServerHarness h(FakeConfig{}, sc);
  EXPECT_EQ(h.get("/v1/kunserve/events").status, 401);
  HttpResponse r = exchange(h.port(), make_request("GET", "/v1/kunserve/events", "", "Authorization: Bearer k\r\n"));
  EXPECT_EQ(r.status, 200);
  EXPECT_EQ(r.body, R"({"object":"list","data":[]})");
  EXPECT_EQ(exchange(h.port(), make_request("POST", "/v1/kunserve/events", "{}", "Authorization: Bearer k\r\n")).status,
            405);
}

}  // namespace
}  // namespace kun::server::testing
