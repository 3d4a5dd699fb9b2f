// libFuzzer target: raw bytes off a socket through what the server does before the engine sees
// a request: Beast's request parser (the server's header and body limits), then for a POST to
// a /v1 endpoint the UTF-8 check, parse_request and prepare_request (tokenizing, chat template,
// length checks), and the error body of any rejection. Nothing may crash, leak or hang.
#include <cstddef>
#include <cstdint>
#include <string>

#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include "fuzz/fuzz_util.h"
#include "server/api_error.h"
#include "server/http_server.h"
#include "server/openai_protocol.h"
#include "server/utf8.h"

namespace {

namespace http = boost::beast::http;
using kun::server::Endpoint;

const kun::model::Tokenizer& tokenizer() {
  static const auto t = kun::fuzz::byte_level_tokenizer();
  return *t;
}

void handle_body(Endpoint endpoint, std::string_view body) {
  const kun::server::ServerConfig config;
  if (!kun::server::is_valid_utf8(body)) return;
  kun::server::ParsedRequest parsed;
  auto err = kun::server::parse_request(endpoint, body, config.limits, parsed);
  if (err) {
    (void)kun::server::error_body(*err);
    return;
  }
  kun::engine::ModelInfo info;
  info.name = "fuzz-model";
  info.max_context_tokens = 256;
  info.vocab_size = tokenizer().vocab_size();
  info.eos_token_id = tokenizer().eos_token_id();
  kun::server::PreparedRequest prepared;
  err = kun::server::prepare_request(std::move(parsed), tokenizer(), info, "fuzz-model", config.limits, prepared);
  if (err) (void)kun::server::error_body(*err);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const kun::server::ServerConfig config;
  http::request_parser<http::string_body> parser;
  parser.header_limit(static_cast<std::uint32_t>(config.max_header_bytes));
  parser.body_limit(config.max_body_bytes);
  parser.eager(true);
  boost::beast::error_code ec;
  std::size_t used = 0;
  // Feed in two pieces, as a socket might deliver them, to exercise the parser's resumption.
  const std::size_t split = size > 0 ? data[0] % (size + 1) : 0;
  used += parser.put(boost::asio::buffer(data, split), ec);
  if (ec == http::error::need_more) ec = {};
  if (!ec) used += parser.put(boost::asio::buffer(data + used, size - used), ec);
  if (ec == http::error::need_more && !parser.is_done()) {
    parser.put_eof(ec);
  }
  if (ec || !parser.is_done()) return 0;
  const auto& req = parser.get();
  if (req.method() != http::verb::post) return 0;
  const std::string_view target(req.target().data(), req.target().size());
  if (target == "/v1/completions") handle_body(Endpoint::kCompletions, req.body());
  if (target == "/v1/chat/completions") handle_body(Endpoint::kChatCompletions, req.body());
  return 0;
}
