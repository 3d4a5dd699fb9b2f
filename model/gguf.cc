#include "model/gguf.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>

namespace kun::model {
namespace {

constexpr std::uint32_t kMagic = 0x46554747u;  // "GGUF" read as little-endian u32
constexpr std::uint32_t kMaxDims = 4;
constexpr int kMaxArrayDepth = 4;

// Bounds-checked little-endian cursor over the mapped bytes.
class Reader {
 public:
  Reader(const std::uint8_t* data, std::uint64_t size, const std::string& path)
      : data_(data), size_(size), path_(path) {}

  std::uint64_t pos() const { return pos_; }
  std::uint64_t remaining() const { return size_ - pos_; }

  Status need(std::uint64_t n, std::string_view what) const {
    if (n > remaining()) {
      return data_loss(path_ + ": truncated GGUF file: need " + std::to_string(n) + " bytes for " +
                       std::string(what) + " at offset " + std::to_string(pos_) + ", file has " +
                       std::to_string(size_) + " bytes");
    }
    return ok_status();
  }

  template <typename T>
  Status read(T* out, std::string_view what) {
    KUN_RETURN_IF_ERROR(need(sizeof(T), what));
    std::memcpy(out, data_ + pos_, sizeof(T));  // host is little-endian (x86-64 / aarch64)
    pos_ += sizeof(T);
    return ok_status();
  }

  Status read_string(std::string* out, std::string_view what) {
    std::uint64_t len = 0;
    KUN_RETURN_IF_ERROR(read(&len, what));
    KUN_RETURN_IF_ERROR(need(len, what));
    out->assign(reinterpret_cast<const char*>(data_ + pos_), static_cast<std::size_t>(len));
    pos_ += len;
    return ok_status();
  }

 private:
  const std::uint8_t* data_;
  std::uint64_t size_;
  const std::string& path_;
  std::uint64_t pos_ = 0;
};

std::uint64_t scalar_size(GgufValueType t) {
  switch (t) {
    case GgufValueType::kUint8:
    case GgufValueType::kInt8:
    case GgufValueType::kBool:
      return 1;
    case GgufValueType::kUint16:
    case GgufValueType::kInt16:
      return 2;
    case GgufValueType::kUint32:
    case GgufValueType::kInt32:
    case GgufValueType::kFloat32:
      return 4;
    case GgufValueType::kUint64:
    case GgufValueType::kInt64:
    case GgufValueType::kFloat64:
      return 8;
    case GgufValueType::kString:
      return 8;  // at least its length
    case GgufValueType::kArray:
      return 12;  // at least type + count
  }
  return 0;
}

Status read_value(Reader& r, GgufValueType type, GgufValue* out, const std::string& where, int depth) {
  out->type = type;
  switch (type) {
    case GgufValueType::kUint8: { std::uint8_t v{}; KUN_RETURN_IF_ERROR(r.read(&v, where)); out->u = v; out->i = v; return ok_status(); }
    case GgufValueType::kInt8: { std::int8_t v{}; KUN_RETURN_IF_ERROR(r.read(&v, where)); out->i = v; return ok_status(); }
    case GgufValueType::kUint16: { std::uint16_t v{}; KUN_RETURN_IF_ERROR(r.read(&v, where)); out->u = v; out->i = v; return ok_status(); }
    case GgufValueType::kInt16: { std::int16_t v{}; KUN_RETURN_IF_ERROR(r.read(&v, where)); out->i = v; return ok_status(); }
    case GgufValueType::kUint32: { std::uint32_t v{}; KUN_RETURN_IF_ERROR(r.read(&v, where)); out->u = v; out->i = v; return ok_status(); }
    case GgufValueType::kInt32: { std::int32_t v{}; KUN_RETURN_IF_ERROR(r.read(&v, where)); out->i = v; return ok_status(); }
    case GgufValueType::kUint64: {
      std::uint64_t v{};
      KUN_RETURN_IF_ERROR(r.read(&v, where));
      out->u = v;
      out->i = v > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())
                   ? std::numeric_limits<std::int64_t>::max()
                   : static_cast<std::int64_t>(v);
      return ok_status();
    }
    case GgufValueType::kInt64: { std::int64_t v{}; KUN_RETURN_IF_ERROR(r.read(&v, where)); out->i = v; return ok_status(); }
    case GgufValueType::kFloat32: { float v{}; KUN_RETURN_IF_ERROR(r.read(&v, where)); out->f = v; return ok_status(); }
    case GgufValueType::kFloat64: { double v{}; KUN_RETURN_IF_ERROR(r.read(&v, where)); out->f = v; return ok_status(); }
    case GgufValueType::kBool: {
      std::uint8_t v{};
      KUN_RETURN_IF_ERROR(r.read(&v, where));
      if (v > 1) return {StatusCode::kDataLoss, where + ": bool value " + std::to_string(v) + " is not 0 or 1"};
      out->i = v;
      return ok_status();
    }
    case GgufValueType::kString:
      return r.read_string(&out->s, where);
    case GgufValueType::kArray: {
      if (depth >= kMaxArrayDepth) return data_loss(where + ": arrays nested too deeply");
      std::uint32_t et = 0;
      std::uint64_t count = 0;
      KUN_RETURN_IF_ERROR(r.read(&et, where));
      KUN_RETURN_IF_ERROR(r.read(&count, where));
      if (et > static_cast<std::uint32_t>(GgufValueType::kFloat64)) {
        return data_loss(where + ": unknown array element type " + std::to_string(et));
      }
      out->array_type = static_cast<GgufValueType>(et);
      const std::uint64_t min_elem = scalar_size(out->array_type);
      if (count > r.remaining() / min_elem) {
        return data_loss(where + ": array of " + std::to_string(count) + " elements runs past the end of the file");
      }
      out->array.resize(static_cast<std::size_t>(count));
      for (auto& e : out->array) KUN_RETURN_IF_ERROR(read_value(r, out->array_type, &e, where, depth + 1));
      return ok_status();
    }
  }
  return data_loss(where + ": unknown value type " + std::to_string(static_cast<std::uint32_t>(type)));
}

std::uint64_t align_up(std::uint64_t x, std::uint64_t a) { return (x + a - 1) / a * a; }

// Appends little-endian bytes.
class Writer {
 public:
  template <typename T>
  void put(T v) {
    const auto* p = reinterpret_cast<const std::uint8_t*>(&v);
    buf_.insert(buf_.end(), p, p + sizeof(T));
  }
  void put_string(std::string_view s) {
    put<std::uint64_t>(s.size());
    buf_.insert(buf_.end(), s.begin(), s.end());
  }
  void put_value(const GgufValue& v) {
    switch (v.type) {
      case GgufValueType::kUint8: put<std::uint8_t>(static_cast<std::uint8_t>(v.u)); break;
      case GgufValueType::kInt8: put<std::int8_t>(static_cast<std::int8_t>(v.i)); break;
      case GgufValueType::kUint16: put<std::uint16_t>(static_cast<std::uint16_t>(v.u)); break;
      case GgufValueType::kInt16: put<std::int16_t>(static_cast<std::int16_t>(v.i)); break;
      case GgufValueType::kUint32: put<std::uint32_t>(static_cast<std::uint32_t>(v.u)); break;
      case GgufValueType::kInt32: put<std::int32_t>(static_cast<std::int32_t>(v.i)); break;
      case GgufValueType::kUint64: put<std::uint64_t>(v.u); break;
      case GgufValueType::kInt64: put<std::int64_t>(v.i); break;
      case GgufValueType::kFloat32: put<float>(static_cast<float>(v.f)); break;
      case GgufValueType::kFloat64: put<double>(v.f); break;
      case GgufValueType::kBool: put<std::uint8_t>(v.i ? 1 : 0); break;
      case GgufValueType::kString: put_string(v.s); break;
      case GgufValueType::kArray:
        put<std::uint32_t>(static_cast<std::uint32_t>(v.array_type));
        put<std::uint64_t>(v.array.size());
        for (const auto& e : v.array) put_value(e);
        break;
    }
  }
  void pad_to(std::uint64_t alignment) {
    while (buf_.size() % alignment != 0) buf_.push_back(0);
  }
  std::vector<std::uint8_t>& bytes() { return buf_; }

 private:
  std::vector<std::uint8_t> buf_;
};

std::uint32_t ggml_type_of(DType t) {
  switch (t) {
    case DType::kF32: return kGgmlTypeF32;
    case DType::kF16: return kGgmlTypeF16;
    case DType::kBF16: return kGgmlTypeBF16;
  }
  return kGgmlTypeF32;
}

std::string gguf_arch_of(const ModelConfig& c) { return c.architecture == "qwen2" ? "qwen2" : "llama"; }

// Which permutation (head count) applies to an HF tensor of this config; 0 = none.
std::int64_t permute_heads(const ModelConfig& c, std::string_view arch, std::string_view hf_name) {
  if (arch != "llama") return 0;
  auto ends = [&](std::string_view s) { return hf_name.ends_with(s); };
  if (ends(".self_attn.q_proj.weight") || ends(".self_attn.q_proj.bias")) return c.num_heads;
  if (ends(".self_attn.k_proj.weight") || ends(".self_attn.k_proj.bias")) return c.num_kv_heads;
  return 0;
}

struct LayerNameMap {
  const char* hf;
  const char* gguf;
};
constexpr LayerNameMap kLayerNames[] = {
    {"input_layernorm.weight", "attn_norm.weight"},
    {"self_attn.q_proj.weight", "attn_q.weight"},
    {"self_attn.k_proj.weight", "attn_k.weight"},
    {"self_attn.v_proj.weight", "attn_v.weight"},
    {"self_attn.q_proj.bias", "attn_q.bias"},
    {"self_attn.k_proj.bias", "attn_k.bias"},
    {"self_attn.v_proj.bias", "attn_v.bias"},
    {"self_attn.o_proj.weight", "attn_output.weight"},
    {"post_attention_layernorm.weight", "ffn_norm.weight"},
    {"mlp.gate_proj.weight", "ffn_gate.weight"},
    {"mlp.up_proj.weight", "ffn_up.weight"},
    {"mlp.down_proj.weight", "ffn_down.weight"},
};

// Parses "<prefix><int>.<rest>"; false if it does not match.
bool split_layer(std::string_view name, std::string_view prefix, std::int64_t* layer, std::string_view* rest) {
  if (!name.starts_with(prefix)) return false;
  name.remove_prefix(prefix.size());
  std::size_t i = 0;
  std::int64_t v = 0;
  while (i < name.size() && name[i] >= '0' && name[i] <= '9' && i < 9) {
    v = v * 10 + (name[i] - '0');
    ++i;
  }
  if (i == 0 || i >= name.size() || name[i] != '.') return false;
  *layer = v;
  *rest = name.substr(i + 1);
  return true;
}

// llama3 rope parameters that llama.cpp-converted files carry only as rope_freqs factors.
constexpr RopeScaling kKnownLlama3Scalings[] = {
    {RopeScaling::Type::kLlama3, 8.0f, 1.0f, 4.0f, 8192},   // Llama 3.1
    {RopeScaling::Type::kLlama3, 32.0f, 1.0f, 4.0f, 8192},  // Llama 3.2
};

std::vector<float> rope_freq_factors(const ModelConfig& c) {
  ModelConfig base = c;
  base.rope_scaling = RopeScaling{};
  const auto unscaled = base.rope_inv_freq();
  const auto scaled = c.rope_inv_freq();
  std::vector<float> f(unscaled.size());
  for (std::size_t i = 0; i < f.size(); ++i) f[i] = unscaled[i] / scaled[i];
  return f;
}

class GgufSource final : public WeightSource {
 public:
  GgufSource(std::unique_ptr<GgufFile> file, ModelConfig config)
      : file_(std::move(file)), config_(std::move(config)), arch_(gguf_arch_of(config_)) {
    for (const auto& t : file_->tensors()) {
      if (auto hf = gguf_to_hf_name(t.name)) by_hf_.emplace(*hf, &t);
    }
  }

  const ModelConfig& config() const override { return config_; }
  std::string describe() const override { return file_->path() + " (gguf)"; }
  std::string tensor_origin(std::string_view) const override { return file_->path(); }
  bool has_tensor(std::string_view name) const override { return by_hf_.find(name) != by_hf_.end(); }
  // HF names where the GGUF name maps to one, the GGUF name otherwise; rope_freqs.weight is
  // consumed by the config (rope scaling) and is not a weight.
  std::vector<std::string> tensor_names() const override {
    std::vector<std::string> out;
    for (const auto& t : file_->tensors()) {
      if (t.name == "rope_freqs.weight") continue;
      out.push_back(gguf_to_hf_name(t.name).value_or(t.name));
    }
    return out;
  }
  std::optional<StoredTensor> stored_tensor(std::string_view name) const override {
    auto it = by_hf_.find(name);
    if (it == by_hf_.end() || !it->second->type_supported) return std::nullopt;
    const GgufTensor& t = *it->second;
    return StoredTensor{file_->tensor_data(t), t.dtype,
                        static_cast<std::int64_t>(t.num_bytes / static_cast<std::uint64_t>(dtype_bytes(t.dtype)))};
  }

  StatusOr<TensorInfo> tensor_info(std::string_view name) const override {
    auto it = by_hf_.find(name);
    if (it == by_hf_.end()) {
      return not_found("tensor '" + std::string(name) + "' (GGUF '" + hf_to_gguf_name(name).value_or("?") +
                       "') not found in " + describe());
    }
    const GgufTensor& t = *it->second;
    if (!t.type_supported) {
      return unimplemented(file_->path() + ": tensor '" + t.name + "' has ggml type " + ggml_type_name(t.ggml_type) +
                           " (supported: F32, F16, BF16)");
    }
    return TensorInfo{std::string(name), t.dtype, t.shape()};
  }

  Status read_tensor(std::string_view name, DType dst_dtype, void* dst, std::int64_t dst_bytes) const override {
    KUN_ASSIGN_OR_RETURN(TensorInfo info, tensor_info(name));
    const GgufTensor& t = *by_hf_.find(name)->second;
    const std::int64_t n = info.num_elements();
    if (dst_bytes != n * dtype_bytes(dst_dtype)) {
      return invalid_argument(file_->path() + ": tensor '" + t.name + "': destination has " + std::to_string(dst_bytes) +
                              " bytes, need " + std::to_string(n * dtype_bytes(dst_dtype)));
    }
    const std::uint8_t* src = file_->tensor_data(t);
    const std::int64_t heads = permute_heads(config_, arch_, name);
    if (heads == 0) {
      convert_tensor_bytes(src, info.dtype, dst, dst_dtype, n);
      return ok_status();
    }
    const std::int64_t rows = info.shape[0];
    const std::int64_t cols = info.shape.size() > 1 ? info.shape[1] : 1;
    if (rows % (2 * heads) != 0) {
      return data_loss(file_->path() + ": tensor '" + t.name + "' has " + std::to_string(rows) +
                       " rows, not a multiple of 2 x " + std::to_string(heads) + " heads");
    }
    const std::int64_t src_row_bytes = cols * dtype_bytes(info.dtype);
    const std::int64_t dst_row_bytes = cols * dtype_bytes(dst_dtype);
    auto* out = static_cast<std::uint8_t*>(dst);
    for (std::int64_t r = 0; r < rows; ++r) {
      const std::int64_t fr = gguf_permuted_row(r, rows, heads);
      convert_tensor_bytes(src + fr * src_row_bytes, info.dtype, out + r * dst_row_bytes, dst_dtype, cols);
    }
    return ok_status();
  }

 private:
  std::unique_ptr<GgufFile> file_;
  ModelConfig config_;
  std::string arch_;
  std::map<std::string, const GgufTensor*, std::less<>> by_hf_;
};

}  // namespace

bool GgufValue::is_integer() const {
  switch (type) {
    case GgufValueType::kUint8:
    case GgufValueType::kInt8:
    case GgufValueType::kUint16:
    case GgufValueType::kInt16:
    case GgufValueType::kUint32:
    case GgufValueType::kInt32:
    case GgufValueType::kUint64:
    case GgufValueType::kInt64:
      return true;
    default:
      return false;
  }
}

GgufValue GgufValue::u32(std::uint32_t v) {
  GgufValue x;
  x.type = GgufValueType::kUint32;
  x.u = v;
  x.i = v;
  return x;
}
GgufValue GgufValue::i32(std::int32_t v) {
  GgufValue x;
  x.type = GgufValueType::kInt32;
  x.i = v;
  return x;
}
GgufValue GgufValue::u64(std::uint64_t v) {
  GgufValue x;
  x.type = GgufValueType::kUint64;
  x.u = v;
  x.i = static_cast<std::int64_t>(v);
  return x;
}
GgufValue GgufValue::f32(float v) {
  GgufValue x;
  x.type = GgufValueType::kFloat32;
  x.f = v;
  return x;
}
GgufValue GgufValue::boolean(bool v) {
  GgufValue x;
  x.type = GgufValueType::kBool;
  x.i = v ? 1 : 0;
  return x;
}
GgufValue GgufValue::str(std::string v) {
  GgufValue x;
  x.type = GgufValueType::kString;
  x.s = std::move(v);
  return x;
}

std::vector<std::int64_t> GgufTensor::shape() const {
  std::vector<std::int64_t> s;
  for (auto it = dims.rbegin(); it != dims.rend(); ++it) s.push_back(static_cast<std::int64_t>(*it));
  return s;
}

std::string ggml_type_name(std::uint32_t type) {
  static const char* const kNames[] = {"F32",  "F16",  "Q4_0", "Q4_1", "Q4_2", "Q4_3",    "Q5_0",    "Q5_1",
                                       "Q8_0", "Q8_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",    "Q6_K",    "Q8_K",
                                       "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S", "IQ2_S",
                                       "IQ4_XS", "I8", "I16", "I32", "I64", "F64", "IQ1_M", "BF16"};
  if (type < sizeof(kNames) / sizeof(kNames[0])) return kNames[type];
  return "type#" + std::to_string(type);
}

StatusOr<std::unique_ptr<GgufFile>> GgufFile::open(const std::string& path) {
  KUN_ASSIGN_OR_RETURN(auto mapped, MappedFile::open(path));
  std::unique_ptr<GgufFile> f(new GgufFile());
  Reader r(mapped->data(), mapped->size(), path);
  std::uint32_t magic = 0;
  KUN_RETURN_IF_ERROR(r.read(&magic, "the magic"));
  if (magic != kMagic) return data_loss(path + ": not a GGUF file (bad magic)");
  KUN_RETURN_IF_ERROR(r.read(&f->version_, "the version"));
  if (f->version_ != 2 && f->version_ != 3) {
    return unimplemented(path + ": GGUF version " + std::to_string(f->version_) + " is not supported (2 or 3)");
  }
  std::uint64_t tensor_count = 0, kv_count = 0;
  KUN_RETURN_IF_ERROR(r.read(&tensor_count, "the tensor count"));
  KUN_RETURN_IF_ERROR(r.read(&kv_count, "the metadata count"));
  // Each key-value needs >= 13 bytes and each tensor info >= 28, which bounds the counts.
  if (kv_count > r.remaining() / 13 || tensor_count > r.remaining() / 28) {
    return data_loss(path + ": tensor count " + std::to_string(tensor_count) + " / metadata count " +
                     std::to_string(kv_count) + " cannot fit in the file (truncated or corrupt)");
  }
  for (std::uint64_t k = 0; k < kv_count; ++k) {
    std::string key;
    KUN_RETURN_IF_ERROR(r.read_string(&key, "metadata key #" + std::to_string(k)));
    const std::string where = path + ": metadata '" + key + "'";
    std::uint32_t type = 0;
    KUN_RETURN_IF_ERROR(r.read(&type, where));
    if (type > static_cast<std::uint32_t>(GgufValueType::kFloat64)) {
      return data_loss(where + ": unknown value type " + std::to_string(type));
    }
    GgufValue v;
    KUN_RETURN_IF_ERROR(read_value(r, static_cast<GgufValueType>(type), &v, where, 0));
    if (!f->metadata_.emplace(key, std::move(v)).second) return data_loss(where + ": duplicate key");
  }
  if (const GgufValue* a = f->find_key("general.alignment")) {
    if (!a->is_integer() || a->i <= 0 || a->i > (1 << 20) || (a->i & (a->i - 1)) != 0 || a->i % 8 != 0) {
      return data_loss(path + ": metadata 'general.alignment' must be a power of two >= 8, got " +
                       std::to_string(a->i));
    }
    f->alignment_ = static_cast<std::uint32_t>(a->i);
  }
  std::vector<std::uint64_t> rel_offsets;
  for (std::uint64_t k = 0; k < tensor_count; ++k) {
    GgufTensor t;
    KUN_RETURN_IF_ERROR(r.read_string(&t.name, "tensor info #" + std::to_string(k)));
    const std::string where = path + ": tensor '" + t.name + "'";
    std::uint32_t n_dims = 0;
    KUN_RETURN_IF_ERROR(r.read(&n_dims, where));
    if (n_dims == 0 || n_dims > kMaxDims) return data_loss(where + ": " + std::to_string(n_dims) + " dims (1..4 allowed)");
    std::uint64_t numel = 1;
    for (std::uint32_t d = 0; d < n_dims; ++d) {
      std::uint64_t dim = 0;
      KUN_RETURN_IF_ERROR(r.read(&dim, where));
      if (dim == 0 || dim > (std::uint64_t{1} << 40) || numel > (std::uint64_t{1} << 48) / dim) {
        return data_loss(where + ": dim " + std::to_string(dim) + " is zero or too large");
      }
      numel *= dim;
      t.dims.push_back(dim);
    }
    KUN_RETURN_IF_ERROR(r.read(&t.ggml_type, where));
    std::uint64_t offset = 0;
    KUN_RETURN_IF_ERROR(r.read(&offset, where));
    if (offset % f->alignment_ != 0) {
      return data_loss(where + ": data offset " + std::to_string(offset) + " is not a multiple of the alignment " +
                       std::to_string(f->alignment_));
    }
    if (t.ggml_type == kGgmlTypeF32) {
      t.type_supported = true;
      t.dtype = DType::kF32;
    } else if (t.ggml_type == kGgmlTypeF16) {
      t.type_supported = true;
      t.dtype = DType::kF16;
    } else if (t.ggml_type == kGgmlTypeBF16) {
      t.type_supported = true;
      t.dtype = DType::kBF16;
    }
    if (t.type_supported) t.num_bytes = numel * static_cast<std::uint64_t>(dtype_bytes(t.dtype));
    if (f->index_.count(t.name) != 0) return data_loss(where + ": duplicate tensor name");
    f->index_.emplace(t.name, f->tensors_.size());
    rel_offsets.push_back(offset);
    f->tensors_.push_back(std::move(t));
  }
  const std::uint64_t data_start = align_up(r.pos(), f->alignment_);
  if (data_start > mapped->size() && !f->tensors_.empty()) {
    return data_loss(path + ": truncated GGUF file: data section starts at " + std::to_string(data_start) +
                     " past the end (" + std::to_string(mapped->size()) + " bytes)");
  }
  const std::uint64_t data_size = data_start <= mapped->size() ? mapped->size() - data_start : 0;
  for (std::size_t k = 0; k < f->tensors_.size(); ++k) {
    GgufTensor& t = f->tensors_[k];
    const std::uint64_t off = rel_offsets[k];
    if (off > data_size || t.num_bytes > data_size - off) {
      return data_loss(path + ": tensor '" + t.name + "': data [" + std::to_string(off) + ", " +
                       std::to_string(off + t.num_bytes) + ") runs past the data section of " +
                       std::to_string(data_size) + " bytes (file truncated?)");
    }
    t.data_begin = data_start + off;
  }
  std::vector<const GgufTensor*> sorted;
  for (const auto& t : f->tensors_) {
    if (t.type_supported) sorted.push_back(&t);
  }
  std::sort(sorted.begin(), sorted.end(),
            [](const GgufTensor* a, const GgufTensor* b) { return a->data_begin < b->data_begin; });
  for (std::size_t k = 1; k < sorted.size(); ++k) {
    if (sorted[k]->data_begin < sorted[k - 1]->data_begin + sorted[k - 1]->num_bytes) {
      return data_loss(path + ": tensor '" + sorted[k]->name + "' overlaps tensor '" + sorted[k - 1]->name +
                       "' in the data section");
    }
  }
  // When every tensor's size is known, the tensors must tile the data section up to alignment
  // padding: no gap of a whole alignment unit or more, nothing after the last tensor's padding.
  if (sorted.size() == f->tensors_.size() && !sorted.empty()) {
    std::uint64_t expect_begin = data_start;
    std::string previous = "the start of the data section";
    for (const GgufTensor* t : sorted) {
      if (t->data_begin != expect_begin) {
        return data_loss(path + ": tensor '" + t->name + "' starts at data offset " +
                         std::to_string(t->data_begin - data_start) + " but " + previous + " ends (padded) at " +
                         std::to_string(expect_begin - data_start) + ": a gap of " +
                         std::to_string(t->data_begin - expect_begin) + " bytes (corrupt offsets?)");
      }
      expect_begin = align_up(t->data_begin + t->num_bytes, f->alignment_);
      previous = "tensor '" + t->name + "'";
    }
    const GgufTensor* last = sorted.back();
    if (mapped->size() > expect_begin) {
      return data_loss(path + ": " + std::to_string(mapped->size() - expect_begin) + " trailing bytes after tensor '" +
                       last->name + "' and its padding (corrupt offsets or a truncated tensor list?)");
    }
  }
  f->file_ = std::move(mapped);
  return f;
}

const GgufValue* GgufFile::find_key(std::string_view key) const {
  auto it = metadata_.find(key);
  return it == metadata_.end() ? nullptr : &it->second;
}

const GgufTensor* GgufFile::find_tensor(std::string_view name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

StatusOr<std::int64_t> GgufFile::get_int(std::string_view key) const {
  const GgufValue* v = find_key(key);
  if (v == nullptr) return not_found(path() + ": missing metadata key '" + std::string(key) + "'");
  if (!v->is_integer()) return invalid_argument(path() + ": metadata key '" + std::string(key) + "' is not an integer");
  if (v->type == GgufValueType::kUint64 && v->u > (std::uint64_t{1} << 62)) {
    return invalid_argument(path() + ": metadata key '" + std::string(key) + "' is out of range");
  }
  return v->i;
}

StatusOr<double> GgufFile::get_float(std::string_view key) const {
  const GgufValue* v = find_key(key);
  if (v == nullptr) return not_found(path() + ": missing metadata key '" + std::string(key) + "'");
  if (v->is_float()) return v->f;
  if (v->is_integer()) return static_cast<double>(v->i);
  return invalid_argument(path() + ": metadata key '" + std::string(key) + "' is not a number");
}

StatusOr<std::string> GgufFile::get_string(std::string_view key) const {
  const GgufValue* v = find_key(key);
  if (v == nullptr) return not_found(path() + ": missing metadata key '" + std::string(key) + "'");
  if (v->type != GgufValueType::kString) {
    return invalid_argument(path() + ": metadata key '" + std::string(key) + "' is not a string");
  }
  return v->s;
}

Status write_gguf_file(const std::string& path, const std::vector<std::pair<std::string, GgufValue>>& metadata,
                       const std::vector<TensorWriteSpec>& tensors, std::uint32_t alignment) {
  if (alignment == 0 || (alignment & (alignment - 1)) != 0 || alignment % 8 != 0) {
    return invalid_argument(path + ": GGUF alignment must be a power of two >= 8, got " + std::to_string(alignment));
  }
  std::vector<std::pair<std::string, GgufValue>> kvs = metadata;
  const bool has_alignment_key =
      std::any_of(kvs.begin(), kvs.end(), [](const auto& kv) { return kv.first == "general.alignment"; });
  if (!has_alignment_key && alignment != kGgufDefaultAlignment) {
    kvs.emplace_back("general.alignment", GgufValue::u32(alignment));
  }
  Writer w;
  w.put<std::uint32_t>(kMagic);
  w.put<std::uint32_t>(kGgufVersion);
  w.put<std::uint64_t>(tensors.size());
  w.put<std::uint64_t>(kvs.size());
  for (const auto& [key, value] : kvs) {
    w.put_string(key);
    w.put<std::uint32_t>(static_cast<std::uint32_t>(value.type));
    w.put_value(value);
  }
  std::uint64_t offset = 0;
  for (const auto& t : tensors) {
    if (t.shape.empty() || t.shape.size() > kMaxDims) {
      return invalid_argument(path + ": tensor '" + t.name + "' has " + std::to_string(t.shape.size()) +
                              " dims (1..4 allowed in GGUF)");
    }
    w.put_string(t.name);
    w.put<std::uint32_t>(static_cast<std::uint32_t>(t.shape.size()));
    for (auto it = t.shape.rbegin(); it != t.shape.rend(); ++it) w.put<std::uint64_t>(static_cast<std::uint64_t>(*it));
    w.put<std::uint32_t>(ggml_type_of(t.dtype));
    w.put<std::uint64_t>(offset);
    offset = align_up(offset + static_cast<std::uint64_t>(t.num_bytes()), alignment);
  }
  w.pad_to(alignment);

  const std::string tmp = path + ".tmp";
  std::FILE* out = std::fopen(tmp.c_str(), "wb");
  if (out == nullptr) return not_found(tmp + ": cannot create: " + std::strerror(errno));
  auto fail = [&](Status s) {
    std::fclose(out);
    std::remove(tmp.c_str());
    return s;
  };
  if (std::fwrite(w.bytes().data(), 1, w.bytes().size(), out) != w.bytes().size()) {
    return fail(data_loss(tmp + ": write failed"));
  }
  std::vector<std::uint8_t> buf;
  for (const auto& t : tensors) {
    const auto bytes = static_cast<std::size_t>(t.num_bytes());
    buf.assign(align_up(bytes, alignment), 0);
    Status s = t.fill(buf.data(), t.num_bytes());
    if (!s.ok()) return fail(s.with_context(path + ": tensor '" + t.name + "'"));
    if (std::fwrite(buf.data(), 1, buf.size(), out) != buf.size()) {
      return fail(data_loss(tmp + ": write failed at tensor '" + t.name + "'"));
    }
  }
  if (std::fclose(out) != 0) {
    std::remove(tmp.c_str());
    return data_loss(tmp + ": close failed");
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) return data_loss(path + ": rename failed: " + ec.message());
  return ok_status();
}

std::optional<std::string> hf_to_gguf_name(std::string_view hf) {
  if (hf == "model.embed_tokens.weight") return "token_embd.weight";
  if (hf == "model.norm.weight") return "output_norm.weight";
  if (hf == "lm_head.weight") return "output.weight";
  std::int64_t layer = 0;
  std::string_view rest;
  if (!split_layer(hf, "model.layers.", &layer, &rest)) return std::nullopt;
  for (const auto& m : kLayerNames) {
    if (rest == m.hf) return "blk." + std::to_string(layer) + "." + m.gguf;
  }
  return std::nullopt;
}

std::optional<std::string> gguf_to_hf_name(std::string_view g) {
  if (g == "token_embd.weight") return "model.embed_tokens.weight";
  if (g == "output_norm.weight") return "model.norm.weight";
  if (g == "output.weight") return "lm_head.weight";
  std::int64_t layer = 0;
  std::string_view rest;
  if (!split_layer(g, "blk.", &layer, &rest)) return std::nullopt;
  for (const auto& m : kLayerNames) {
    if (rest == m.gguf) return "model.layers." + std::to_string(layer) + "." + m.hf;
  }
  return std::nullopt;
}

std::int64_t gguf_permuted_row(std::int64_t hf_row, std::int64_t rows, std::int64_t n_head) {
  // HF row (head h, half s, index i) = h*hd + s*hd/2 + i  ->  file row h*hd + 2*i + s.
  const std::int64_t hd = rows / n_head;
  const std::int64_t half = hd / 2;
  const std::int64_t h = hf_row / hd;
  const std::int64_t within = hf_row % hd;
  const std::int64_t s = within / half;
  const std::int64_t i = within % half;
  return h * hd + 2 * i + s;
}

StatusOr<ModelConfig> gguf_model_config(const GgufFile& f) {
  KUN_ASSIGN_OR_RETURN(std::string arch, f.get_string("general.architecture"));
  if (arch != "llama" && arch != "qwen2") {
    return unimplemented(f.path() + ": unsupported architecture '" + arch +
                         "' in metadata 'general.architecture' (supported: llama, qwen2)");
  }
  ModelConfig c;
  c.architecture = arch;
  const std::string p = arch + ".";
  KUN_ASSIGN_OR_RETURN(c.num_layers, f.get_int(p + "block_count"));
  KUN_ASSIGN_OR_RETURN(c.hidden_size, f.get_int(p + "embedding_length"));
  KUN_ASSIGN_OR_RETURN(c.intermediate_size, f.get_int(p + "feed_forward_length"));
  KUN_ASSIGN_OR_RETURN(c.num_heads, f.get_int(p + "attention.head_count"));
  c.num_kv_heads = c.num_heads;
  if (f.find_key(p + "attention.head_count_kv")) {
    KUN_ASSIGN_OR_RETURN(c.num_kv_heads, f.get_int(p + "attention.head_count_kv"));
  }
  KUN_ASSIGN_OR_RETURN(c.max_position_embeddings, f.get_int(p + "context_length"));
  KUN_ASSIGN_OR_RETURN(double eps, f.get_float(p + "attention.layer_norm_rms_epsilon"));
  c.rms_norm_eps = static_cast<float>(eps);
  c.rope_theta = 10000.0f;
  if (f.find_key(p + "rope.freq_base")) {
    KUN_ASSIGN_OR_RETURN(double theta, f.get_float(p + "rope.freq_base"));
    c.rope_theta = static_cast<float>(theta);
  }
  c.head_dim = c.num_heads > 0 ? c.hidden_size / c.num_heads : 0;
  if (f.find_key(p + "attention.key_length")) {
    KUN_ASSIGN_OR_RETURN(c.head_dim, f.get_int(p + "attention.key_length"));
  }
  if (f.find_key(p + "rope.dimension_count")) {
    KUN_ASSIGN_OR_RETURN(std::int64_t rope_dims, f.get_int(p + "rope.dimension_count"));
    if (rope_dims != c.head_dim) {
      return unimplemented(f.path() + ": metadata '" + p + "rope.dimension_count' = " + std::to_string(rope_dims) +
                           " differs from head_dim " + std::to_string(c.head_dim) + " (partial RoPE unsupported)");
    }
  }
  const GgufTensor* embd = f.find_tensor("token_embd.weight");
  if (embd == nullptr) return not_found(f.path() + ": missing tensor 'token_embd.weight'");
  if (embd->dims.size() != 2) return data_loss(f.path() + ": tensor 'token_embd.weight' is not 2-D");
  c.vocab_size = static_cast<std::int64_t>(embd->dims[1]);
  if (!embd->type_supported) {
    return unimplemented(f.path() + ": tensor 'token_embd.weight' has ggml type " + ggml_type_name(embd->ggml_type) +
                         " (supported: F32, F16, BF16)");
  }
  c.dtype = embd->dtype;
  c.tie_word_embeddings = f.find_tensor("output.weight") == nullptr;
  c.attention_bias = arch == "qwen2" || f.find_tensor("blk.0.attn_q.bias") != nullptr;
  c.bos_token_id = -1;
  c.eos_token_id = -1;
  if (f.find_key("tokenizer.ggml.bos_token_id")) {
    KUN_ASSIGN_OR_RETURN(c.bos_token_id, f.get_int("tokenizer.ggml.bos_token_id"));
  }
  if (f.find_key("tokenizer.ggml.eos_token_id")) {
    KUN_ASSIGN_OR_RETURN(c.eos_token_id, f.get_int("tokenizer.ggml.eos_token_id"));
  }

  // Rope scaling: linear via rope.scaling.type; llama3 via the rope_freqs tensor (llama.cpp),
  // with exact parameters from our kunserve.rope.llama3.* keys when present.
  if (f.find_key(p + "rope.scaling.type")) {
    KUN_ASSIGN_OR_RETURN(std::string type, f.get_string(p + "rope.scaling.type"));
    if (type == "linear") {
      c.rope_scaling.type = RopeScaling::Type::kLinear;
      KUN_ASSIGN_OR_RETURN(double factor, f.get_float(p + "rope.scaling.factor"));
      c.rope_scaling.factor = static_cast<float>(factor);
    } else if (type != "none") {
      return unimplemented(f.path() + ": metadata '" + p + "rope.scaling.type' = '" + type +
                           "' is not supported (none, linear)");
    }
  }
  if (const GgufTensor* rf = f.find_tensor("rope_freqs.weight")) {
    if (c.rope_scaling.type != RopeScaling::Type::kNone) {
      return unimplemented(f.path() + ": both rope_freqs.weight and a rope scaling type are present");
    }
    if (f.find_key("kunserve.rope.llama3.factor")) {
      RopeScaling r;
      r.type = RopeScaling::Type::kLlama3;
      KUN_ASSIGN_OR_RETURN(double factor, f.get_float("kunserve.rope.llama3.factor"));
      KUN_ASSIGN_OR_RETURN(double low, f.get_float("kunserve.rope.llama3.low_freq_factor"));
      KUN_ASSIGN_OR_RETURN(double high, f.get_float("kunserve.rope.llama3.high_freq_factor"));
      KUN_ASSIGN_OR_RETURN(r.original_max_position_embeddings,
                           f.get_int("kunserve.rope.llama3.original_context_length"));
      r.factor = static_cast<float>(factor);
      r.low_freq_factor = static_cast<float>(low);
      r.high_freq_factor = static_cast<float>(high);
      c.rope_scaling = r;
    } else {
      // A llama.cpp conversion: recognise the published Llama 3.x parameter sets by their factors.
      if (rf->ggml_type != kGgmlTypeF32 || rf->dims.size() != 1 ||
          static_cast<std::int64_t>(rf->dims[0]) * 2 != c.head_dim) {
        return data_loss(f.path() + ": tensor 'rope_freqs.weight' must be F32 of head_dim/2 elements");
      }
      std::vector<float> factors(static_cast<std::size_t>(rf->dims[0]));
      std::memcpy(factors.data(), f.tensor_data(*rf), factors.size() * sizeof(float));
      bool matched = false;
      for (const RopeScaling& known : kKnownLlama3Scalings) {
        ModelConfig trial = c;
        trial.rope_scaling = known;
        if (!trial.validate().ok()) continue;
        const auto expect = rope_freq_factors(trial);
        bool same = true;
        for (std::size_t i = 0; i < expect.size(); ++i) {
          if (std::fabs(expect[i] - factors[i]) > 1e-3f * std::fabs(expect[i])) same = false;
        }
        if (same) {
          c.rope_scaling = known;
          matched = true;
          break;
        }
      }
      if (!matched) {
        return unimplemented(f.path() + ": tensor 'rope_freqs.weight' holds rope factors that match no known "
                             "llama3 rope scaling");
      }
    }
  }
  KUN_RETURN_IF_ERROR(c.validate().with_context(f.path()));
  return c;
}

StatusOr<std::unique_ptr<WeightSource>> open_gguf_weights(const std::string& path, const WeightCheckOptions& options) {
  KUN_ASSIGN_OR_RETURN(auto file, GgufFile::open(path));
  KUN_ASSIGN_OR_RETURN(ModelConfig config, gguf_model_config(*file));
  auto source = std::make_unique<GgufSource>(std::move(file), std::move(config));
  KUN_RETURN_IF_ERROR(validate_weights(*source, options));
  return std::unique_ptr<WeightSource>(std::move(source));
}

Status write_gguf_model(const WeightSource& source, DType dtype, const std::string& path,
                        const GgufMetadata& extra_metadata) {
  const ModelConfig& c = source.config();
  KUN_RETURN_IF_ERROR(c.validate().with_context(source.describe()));
  const std::string arch = gguf_arch_of(c);
  const std::string p = arch + ".";
  std::vector<std::pair<std::string, GgufValue>> kv;
  auto u32 = [](std::int64_t v) { return GgufValue::u32(static_cast<std::uint32_t>(v)); };
  kv.emplace_back("general.architecture", GgufValue::str(arch));
  kv.emplace_back("general.name", GgufValue::str("kunserve-" + c.architecture));
  kv.emplace_back("general.alignment", GgufValue::u32(kGgufDefaultAlignment));
  kv.emplace_back("general.file_type", GgufValue::u32(dtype == DType::kF32 ? 0 : (dtype == DType::kF16 ? 1 : 32)));
  kv.emplace_back(p + "block_count", u32(c.num_layers));
  kv.emplace_back(p + "context_length", u32(c.max_position_embeddings));
  kv.emplace_back(p + "embedding_length", u32(c.hidden_size));
  kv.emplace_back(p + "feed_forward_length", u32(c.intermediate_size));
  kv.emplace_back(p + "attention.head_count", u32(c.num_heads));
  kv.emplace_back(p + "attention.head_count_kv", u32(c.num_kv_heads));
  kv.emplace_back(p + "attention.key_length", u32(c.head_dim));
  kv.emplace_back(p + "attention.value_length", u32(c.head_dim));
  kv.emplace_back(p + "attention.layer_norm_rms_epsilon", GgufValue::f32(c.rms_norm_eps));
  kv.emplace_back(p + "rope.freq_base", GgufValue::f32(c.rope_theta));
  kv.emplace_back(p + "rope.dimension_count", u32(c.head_dim));
  kv.emplace_back(p + "vocab_size", u32(c.vocab_size));
  if (c.rope_scaling.type == RopeScaling::Type::kLinear) {
    kv.emplace_back(p + "rope.scaling.type", GgufValue::str("linear"));
    kv.emplace_back(p + "rope.scaling.factor", GgufValue::f32(c.rope_scaling.factor));
  } else if (c.rope_scaling.type == RopeScaling::Type::kLlama3) {
    kv.emplace_back("kunserve.rope.llama3.factor", GgufValue::f32(c.rope_scaling.factor));
    kv.emplace_back("kunserve.rope.llama3.low_freq_factor", GgufValue::f32(c.rope_scaling.low_freq_factor));
    kv.emplace_back("kunserve.rope.llama3.high_freq_factor", GgufValue::f32(c.rope_scaling.high_freq_factor));
    kv.emplace_back("kunserve.rope.llama3.original_context_length",
                    u32(c.rope_scaling.original_max_position_embeddings));
  }
  if (c.bos_token_id >= 0) kv.emplace_back("tokenizer.ggml.bos_token_id", u32(c.bos_token_id));
  if (c.eos_token_id >= 0) kv.emplace_back("tokenizer.ggml.eos_token_id", u32(c.eos_token_id));
  for (const auto& entry : extra_metadata) {  // (clang 14 cannot capture a structured binding)
    const auto& key = entry.first;
    std::erase_if(kv, [&key](const auto& e) { return e.first == key; });
    kv.emplace_back(key, entry.second);
  }

  std::vector<TensorWriteSpec> specs;
  for (const TensorInfo& info : expected_tensors(c)) {
    auto gname = hf_to_gguf_name(info.name);
    KUN_CHECK(gname.has_value()) << "no GGUF name for " << info.name;
    TensorWriteSpec spec;
    spec.name = *gname;
    spec.shape = info.shape;
    spec.dtype = info.shape.size() == 1 ? DType::kF32 : dtype;
    const std::int64_t heads = permute_heads(c, arch, info.name);
    const std::string hf_name = info.name;
    const DType st = spec.dtype;
    const std::vector<std::int64_t> shape = info.shape;
    spec.fill = [&source, hf_name, st, shape, heads](void* dst, std::int64_t bytes) -> Status {
      if (heads == 0) return source.read_tensor(hf_name, st, dst, bytes);
      std::vector<std::uint8_t> tmp(static_cast<std::size_t>(bytes));
      KUN_RETURN_IF_ERROR(source.read_tensor(hf_name, st, tmp.data(), bytes));
      const std::int64_t rows = shape[0];
      const std::int64_t row_bytes = bytes / rows;
      auto* out = static_cast<std::uint8_t*>(dst);
      for (std::int64_t r = 0; r < rows; ++r) {
        std::memcpy(out + gguf_permuted_row(r, rows, heads) * row_bytes, tmp.data() + r * row_bytes,
                    static_cast<std::size_t>(row_bytes));
      }
      return ok_status();
    };
    specs.push_back(std::move(spec));
  }
  if (c.rope_scaling.type == RopeScaling::Type::kLlama3) {
    TensorWriteSpec rf;
    rf.name = "rope_freqs.weight";
    rf.dtype = DType::kF32;
    rf.shape = {c.head_dim / 2};
    const auto factors = rope_freq_factors(c);
    rf.fill = [factors](void* dst, std::int64_t bytes) -> Status {
      std::memcpy(dst, factors.data(), static_cast<std::size_t>(bytes));
      return ok_status();
    };
    specs.push_back(std::move(rf));
  }
  return write_gguf_file(path, kv, specs, kGgufDefaultAlignment);
}

}  // namespace kun::model
