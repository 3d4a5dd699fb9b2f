// Chat templates of the supported model families, recognised from the chat_template text of
// tokenizer_config.json (or, without one, from the vocabulary's special tokens) and rendered
// natively: no general Jinja engine.
//   kLlama3:  <|begin_of_text|><|start_header_id|>ROLE<|end_header_id|>\n\nCONTENT<|eot_id|>...
//   kChatMl:  <|im_start|>ROLE\nCONTENT<|im_end|>\n... (Qwen; adds Qwen's default system prompt
//             when the template has one and the conversation has no system message)
//   kLlama2:  <s>[INST] <<SYS>>\nSYSTEM\n<</SYS>>\n\nUSER [/INST] ASSISTANT </s><s>[INST] ...
//   kMistral: <s>[INST] USER [/INST]ASSISTANT</s>[INST] ... (no system role)
// The rendered text starts with the BOS token's text where the family's template does: encode it
// with add_special_tokens=false. Pure functions: safe from any thread.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"
#include "model/tokenizer.h"

namespace kun::model {

enum class ChatTemplateKind { kNone, kLlama3, kChatMl, kLlama2, kMistral };

struct ChatTemplate {
  ChatTemplateKind kind = ChatTemplateKind::kNone;
  std::string bos_token;       // text of the BOS token ("" if none)
  std::string eos_token;       // text of the EOS token ("" if none)
  std::string default_system;  // ChatML: system prompt added when none is given ("" = none)
};

std::string_view chat_template_kind_name(ChatTemplateKind kind);

// Recognises the family from a Jinja chat_template text; kNone if it is none of the supported.
ChatTemplateKind detect_chat_template_kind(std::string_view template_text);

StatusOr<std::string> render_chat_template(const ChatTemplate& chat_template,
                                           const std::vector<ChatMessage>& messages,
                                           bool add_generation_prompt);

}  // namespace kun::model
