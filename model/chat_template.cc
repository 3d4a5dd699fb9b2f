#include "model/chat_template.h"

namespace kun::model {
namespace {

std::string_view trim(std::string_view s) {
  const auto is_space = [](char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' ||
                                            c == '\f' || c == '\v'; };
  while (!s.empty() && is_space(s.front())) s.remove_prefix(1);
  while (!s.empty() && is_space(s.back())) s.remove_suffix(1);
  return s;
}

Status bad_role(std::string_view family, std::size_t index, std::string_view role) {
  return invalid_argument("messages[" + std::to_string(index) + "].role: '" + std::string(role) +
                          "' is not supported by the " + std::string(family) + " chat template");
}

StatusOr<std::string> render_llama3(const ChatTemplate& t, const std::vector<ChatMessage>& msgs,
                                    bool add_generation_prompt) {
  std::string out = t.bos_token;
  for (std::size_t i = 0; i < msgs.size(); ++i) {
    const auto& m = msgs[i];
    if (m.role != "system" && m.role != "user" && m.role != "assistant" && m.role != "ipython" &&
        m.role != "tool") {
      return bad_role("Llama 3", i, m.role);
    }
    out.append("<|start_header_id|>").append(m.role).append("<|end_header_id|>\n\n");
    out += trim(m.content);
    out += "<|eot_id|>";
  }
  if (add_generation_prompt) out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
  return out;
}

StatusOr<std::string> render_chatml(const ChatTemplate& t, const std::vector<ChatMessage>& msgs,
                                    bool add_generation_prompt) {
  std::string out;
  if (!t.default_system.empty() && (msgs.empty() || msgs[0].role != "system")) {
    out.append("<|im_start|>system\n").append(t.default_system).append("<|im_end|>\n");
  }
  for (std::size_t i = 0; i < msgs.size(); ++i) {
    const auto& m = msgs[i];
    if (m.role != "system" && m.role != "user" && m.role != "assistant" && m.role != "tool") {
      return bad_role("ChatML", i, m.role);
    }
    out.append("<|im_start|>").append(m.role).append("\n").append(m.content).append("<|im_end|>\n");
  }
  if (add_generation_prompt) out += "<|im_start|>assistant\n";
  return out;
}

// Llama 2 and Mistral: user/assistant alternate, starting with user (after an optional system
// message for Llama 2).
StatusOr<std::string> render_inst(const ChatTemplate& t, const std::vector<ChatMessage>& msgs,
                                  bool llama2) {
  const std::string_view family = llama2 ? "Llama 2" : "Mistral";
  std::size_t first = 0;
  std::string system;
  if (!msgs.empty() && msgs[0].role == "system") {
    if (!llama2) return bad_role(family, 0, "system");
    system = msgs[0].content;
    first = 1;
  }
  std::string out;
  if (!llama2) out += t.bos_token;
  for (std::size_t i = first; i < msgs.size(); ++i) {
    const auto& m = msgs[i];
    const bool expect_user = (i - first) % 2 == 0;
    if (m.role != "user" && m.role != "assistant") return bad_role(family, i, m.role);
    if ((m.role == "user") != expect_user) {
      return invalid_argument("messages[" + std::to_string(i) + "].role: the " +
                              std::string(family) +
                              " chat template needs user and assistant roles to alternate, "
                              "starting with user");
    }
    if (m.role == "user") {
      if (llama2) {
        std::string content = m.content;
        if (i == first && !system.empty()) {
          std::string with_system("<<SYS>>\n");
          with_system.append(system).append("\n<</SYS>>\n\n").append(content);
          content = std::move(with_system);
        }
        out.append(t.bos_token).append("[INST] ").append(trim(content)).append(" [/INST]");
      } else {
        out.append("[INST] ").append(m.content).append(" [/INST]");
      }
    } else {
      if (llama2) {
        out.append(" ").append(trim(m.content)).append(" ").append(t.eos_token);
      } else {
        out.append(m.content).append(t.eos_token);
      }
    }
  }
  return out;
}

}  // namespace

std::string_view chat_template_kind_name(ChatTemplateKind kind) {
  switch (kind) {
    case ChatTemplateKind::kNone: return "none";
    case ChatTemplateKind::kLlama3: return "llama3";
    case ChatTemplateKind::kChatMl: return "chatml";
    case ChatTemplateKind::kLlama2: return "llama2";
    case ChatTemplateKind::kMistral: return "mistral";
  }
  return "none";
}

ChatTemplateKind detect_chat_template_kind(std::string_view text) {
  if (text.find("<|start_header_id|>") != std::string_view::npos) return ChatTemplateKind::kLlama3;
  if (text.find("<|im_start|>") != std::string_view::npos) return ChatTemplateKind::kChatMl;
  if (text.find("[INST]") != std::string_view::npos) {
    return text.find("<<SYS>>") != std::string_view::npos ? ChatTemplateKind::kLlama2
                                                          : ChatTemplateKind::kMistral;
  }
  return ChatTemplateKind::kNone;
}

StatusOr<std::string> render_chat_template(const ChatTemplate& chat_template,
                                           const std::vector<ChatMessage>& messages,
                                           bool add_generation_prompt) {
  switch (chat_template.kind) {
    case ChatTemplateKind::kLlama3:
      return render_llama3(chat_template, messages, add_generation_prompt);
    case ChatTemplateKind::kChatMl:
      return render_chatml(chat_template, messages, add_generation_prompt);
    case ChatTemplateKind::kLlama2:
      return render_inst(chat_template, messages, true);
    case ChatTemplateKind::kMistral:
      return render_inst(chat_template, messages, false);
    case ChatTemplateKind::kNone:
      break;
  }
  return unimplemented("this tokenizer has no supported chat template (Llama 3, ChatML, "
                       "Llama 2 or Mistral)");
}

}  // namespace kun::model
