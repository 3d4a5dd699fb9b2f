// Shared fixture pieces for the server's socket tests: a fake front door, a byte tokenizer and
// an HttpServer on an ephemeral 127.0.0.1 port, stopped at the end of each test.
#pragma once

#include <gtest/gtest.h>

#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "server/http_server.h"
#include "server/tests/byte_tokenizer.h"
#include "server/tests/fake_front_door.h"
#include "server/tests/test_client.h"

namespace kun::server::testing {

// Tokens of `text` (one per byte), optionally followed by EOS.
inline std::vector<std::int32_t> byte_tokens(std::string_view text, bool eos) {
  std::vector<std::int32_t> out;
  for (char c : text) out.push_back(static_cast<unsigned char>(c));
  if (eos) out.push_back(ByteTokenizer::kEos);
  return out;
}

class ServerHarness {
 public:
  explicit ServerHarness(FakeConfig fake_config = {}, ServerConfig config = {}) {
    fake_ = std::make_unique<FakeFrontDoor>(std::move(fake_config));
    config.host = "127.0.0.1";
    config.port = 0;
    auto server = HttpServer::start(config, *fake_, tokenizer_);
    EXPECT_TRUE(server.ok()) << server.status().to_string();
    if (server.ok()) server_ = std::move(server).value();
  }
  ~ServerHarness() {
    if (server_) server_->stop();
    server_.reset();
    fake_.reset();
  }
  std::uint16_t port() const { return server_->port(); }
  FakeFrontDoor& fake() { return *fake_; }
  HttpServer& server() { return *server_; }
  const ByteTokenizer& tokenizer() const { return tokenizer_; }

  HttpResponse post(const std::string& path, const std::string& body, const std::string& headers = "") {
    return exchange(port(), make_request("POST", path, body, headers));
  }
  HttpResponse get(const std::string& path) { return exchange(port(), make_request("GET", path, "")); }

 private:
  ByteTokenizer tokenizer_;
  std::unique_ptr<FakeFrontDoor> fake_;
  std::unique_ptr<HttpServer> server_;
};

// Checks OpenAI's error shape; returns the parsed body.
inline nlohmann::json expect_error_shape(const HttpResponse& r) {
  nlohmann::json j = nlohmann::json::parse(r.body, nullptr, false);
  EXPECT_FALSE(j.is_discarded()) << r.body;
  if (j.is_discarded()) return j;
  EXPECT_TRUE(j.is_object() && j.contains("error")) << r.body;
  const auto& e = j["error"];
  EXPECT_TRUE(e.is_object()) << r.body;
  EXPECT_TRUE(e.contains("message") && e["message"].is_string() && !e["message"].get<std::string>().empty())
      << r.body;
  EXPECT_TRUE(e.contains("type") && e["type"].is_string()) << r.body;
  EXPECT_TRUE(e.contains("param") && (e["param"].is_null() || e["param"].is_string())) << r.body;
  EXPECT_TRUE(e.contains("code") && (e["code"].is_null() || e["code"].is_string())) << r.body;
  EXPECT_EQ(r.header("content-type"), "application/json");
  return j;
}

}  // namespace kun::server::testing
