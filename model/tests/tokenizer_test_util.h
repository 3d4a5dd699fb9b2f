// Helpers shared by the tokenizer tests.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

namespace kun::model::testing {

// Minimal protobuf writer for building SentencePiece tokenizer.model files in tests.
class ProtoWriter {
 public:
  void varint(std::uint64_t v) {
    while (v >= 0x80) {
      out_.push_back(static_cast<char>((v & 0x7F) | 0x80));
      v >>= 7;
    }
    out_.push_back(static_cast<char>(v));
  }
  void key(int field, int wire) { varint(static_cast<std::uint64_t>(field) << 3 | static_cast<std::uint64_t>(wire)); }
  void bytes(int field, std::string_view s) {
    key(field, 2);
    varint(s.size());
    out_.append(s);
  }
  void int_field(int field, std::int64_t v) {
    key(field, 0);
    varint(static_cast<std::uint64_t>(v));
  }
  void float_field(int field, float f) {
    key(field, 5);
    std::uint32_t bits = 0;
    std::memcpy(&bits, &f, 4);
    for (int i = 0; i < 4; ++i) out_.push_back(static_cast<char>((bits >> (8 * i)) & 0xFF));
  }
  const std::string& str() const { return out_; }

 private:
  std::string out_;
};

struct SpPieceSpec {
  std::string piece;
  float score;
  int type;  // 1 normal, 2 unknown, 3 control, 4 user defined, 6 byte
};

// ModelProto with BPE model type, the given pieces, byte_fallback and the Llama normalizer
// settings (add_dummy_prefix on, remove_extra_whitespaces off).
inline std::string make_sentencepiece_model(const std::vector<SpPieceSpec>& pieces) {
  ProtoWriter model;
  for (const auto& p : pieces) {
    ProtoWriter piece;
    piece.bytes(1, p.piece);
    piece.float_field(2, p.score);
    piece.int_field(3, p.type);
    model.bytes(1, piece.str());
  }
  ProtoWriter trainer;
  trainer.int_field(3, 2);   // model_type = BPE
  trainer.int_field(35, 1);  // byte_fallback
  trainer.int_field(40, 0);  // unk_id
  trainer.int_field(41, 1);  // bos_id
  trainer.int_field(42, 2);  // eos_id
  model.bytes(2, trainer.str());
  ProtoWriter normalizer;
  normalizer.bytes(1, "identity");
  normalizer.int_field(3, 1);  // add_dummy_prefix
  normalizer.int_field(4, 0);  // remove_extra_whitespaces
  model.bytes(3, normalizer.str());
  return model.str();
}

}  // namespace kun::model::testing
