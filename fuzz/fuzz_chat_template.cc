// libFuzzer target: chat templates. The input is split at 0xFF bytes: the first field picks the
// template family and generation prompt, then (role, content) pairs. Every family renders or
// returns an error (never crashes); detection runs on the raw text too; the tokenizer's
// apply_chat_template (ChatML from tokenizer_config.json) renders valid UTF-8 messages.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "fuzz/fuzz_util.h"
#include "model/chat_template.h"
#include "server/utf8.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static const auto tokenizer = kun::fuzz::byte_level_tokenizer();
  const auto fields = kun::fuzz::split_fields(data, size, 33);
  (void)kun::model::detect_chat_template_kind(
      std::string_view(reinterpret_cast<const char*>(data), size));
  const std::string_view head = fields[0];
  const std::uint8_t selector = head.empty() ? 0 : static_cast<std::uint8_t>(head[0]);
  kun::model::ChatTemplate tmpl;
  constexpr kun::model::ChatTemplateKind kKinds[] = {
      kun::model::ChatTemplateKind::kNone, kun::model::ChatTemplateKind::kLlama3, kun::model::ChatTemplateKind::kChatMl,
      kun::model::ChatTemplateKind::kLlama2, kun::model::ChatTemplateKind::kMistral};
  tmpl.kind = kKinds[selector % 5];
  tmpl.bos_token = (selector & 0x10) ? "<s>" : "";
  tmpl.eos_token = (selector & 0x20) ? "</s>" : "";
  tmpl.default_system = (selector & 0x40) ? "You are helpful." : "";
  const bool add_generation_prompt = (selector & 0x80) != 0;
  std::vector<kun::model::ChatMessage> messages;
  bool all_valid = true;
  for (std::size_t i = 1; i + 1 < fields.size(); i += 2) {
    kun::model::ChatMessage m;
    m.role = std::string(fields[i]);
    m.content = std::string(fields[i + 1]);
    all_valid = all_valid && kun::server::is_valid_utf8(m.role) && kun::server::is_valid_utf8(m.content);
    messages.push_back(std::move(m));
  }
  auto rendered = kun::model::render_chat_template(tmpl, messages, add_generation_prompt);
  if (rendered.ok() && all_valid && !kun::server::is_valid_utf8(*rendered)) {
    kun::fuzz::fail("rendered chat of valid UTF-8 messages is not valid UTF-8");
  }
  if (all_valid) {
    auto applied = tokenizer->apply_chat_template(messages, add_generation_prompt);
    if (applied.ok()) (void)tokenizer->encode(*applied, false);
  }
  return 0;
}
