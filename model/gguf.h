// GGUF (version 3) reader and writer for the llama and qwen2 architectures.
//
// File layout (all little-endian): "GGUF" | u32 version | u64 tensor_count | u64 kv_count |
// kv_count x (string key, u32 value type, value) | tensor_count x (string name, u32 n_dims,
// n_dims x u64 dims (fastest-varying first, i.e. reversed w.r.t. row-major/HF order), u32 ggml
// type, u64 offset relative to the data section) | padding to general.alignment (default 32) |
// data. Strings are u64 length + bytes.
//
// Model convention (llama.cpp's converter): for the "llama" architecture the rows of q_proj and
// k_proj (weights and biases) are permuted per head so that llama.cpp's interleaved RoPE equals
// HuggingFace's rotate_half RoPE. write_gguf_model applies the permutation and the weight
// source returned by open_gguf_weights undoes it: readers see HF names in HF layout.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "common/dtype.h"
#include "common/status.h"
#include "model/config.h"
#include "model/safetensors.h"
#include "model/weight_source.h"

namespace kun::model {

enum class GgufValueType : std::uint32_t {
  kUint8 = 0,
  kInt8 = 1,
  kUint16 = 2,
  kInt16 = 3,
  kUint32 = 4,
  kInt32 = 5,
  kFloat32 = 6,
  kBool = 7,
  kString = 8,
  kArray = 9,
  kUint64 = 10,
  kInt64 = 11,
  kFloat64 = 12,
};

// ggml tensor types this project reads and writes.
inline constexpr std::uint32_t kGgmlTypeF32 = 0;
inline constexpr std::uint32_t kGgmlTypeF16 = 1;
inline constexpr std::uint32_t kGgmlTypeBF16 = 30;
inline constexpr std::uint32_t kGgufDefaultAlignment = 32;
inline constexpr std::uint32_t kGgufVersion = 3;

struct GgufValue {
  GgufValueType type = GgufValueType::kUint32;
  std::int64_t i = 0;    // signed integer types and bool
  std::uint64_t u = 0;   // unsigned integer types
  double f = 0.0;        // float types
  std::string s;         // string
  GgufValueType array_type = GgufValueType::kUint8;
  std::vector<GgufValue> array;

  bool is_integer() const;
  bool is_float() const { return type == GgufValueType::kFloat32 || type == GgufValueType::kFloat64; }

  static GgufValue u32(std::uint32_t v);
  static GgufValue i32(std::int32_t v);
  static GgufValue u64(std::uint64_t v);
  static GgufValue f32(float v);
  static GgufValue boolean(bool v);
  static GgufValue str(std::string v);
};

struct GgufTensor {
  std::string name;
  std::vector<std::uint64_t> dims;  // GGUF order (fastest-varying first)
  std::uint32_t ggml_type = 0;
  bool type_supported = false;      // F32 / F16 / BF16
  DType dtype = DType::kF32;        // valid when type_supported
  std::uint64_t data_begin = 0;     // absolute file offset
  std::uint64_t num_bytes = 0;      // 0 when the type is not supported (size unknown)
  // Row-major (HF) shape: dims reversed.
  std::vector<std::int64_t> shape() const;
};

std::string ggml_type_name(std::uint32_t type);

// One parsed and validated GGUF file, memory-mapped.
class GgufFile {
 public:
  static StatusOr<std::unique_ptr<GgufFile>> open(const std::string& path);

  const std::string& path() const { return file_->path(); }
  std::uint32_t version() const { return version_; }
  std::uint32_t alignment() const { return alignment_; }
  const std::map<std::string, GgufValue, std::less<>>& metadata() const { return metadata_; }
  const GgufValue* find_key(std::string_view key) const;
  const std::vector<GgufTensor>& tensors() const { return tensors_; }
  const GgufTensor* find_tensor(std::string_view name) const;
  const std::uint8_t* tensor_data(const GgufTensor& t) const { return file_->data() + t.data_begin; }

  // Typed metadata lookups; errors name the file and the key.
  StatusOr<std::int64_t> get_int(std::string_view key) const;
  StatusOr<double> get_float(std::string_view key) const;
  StatusOr<std::string> get_string(std::string_view key) const;

 private:
  GgufFile() = default;
  std::unique_ptr<MappedFile> file_;
  std::uint32_t version_ = 0;
  std::uint32_t alignment_ = kGgufDefaultAlignment;
  std::map<std::string, GgufValue, std::less<>> metadata_;
  std::vector<GgufTensor> tensors_;
  std::map<std::string, std::size_t, std::less<>> index_;
};

// Writes a GGUF v3 file. Tensor shapes in `tensors` are row-major (HF order); the writer stores
// them reversed. Tensor dtypes map to ggml F32 / F16 / BF16. general.alignment is written (and
// used) when alignment != 32.
Status write_gguf_file(const std::string& path, const std::vector<std::pair<std::string, GgufValue>>& metadata,
                       const std::vector<TensorWriteSpec>& tensors,
                       std::uint32_t alignment = kGgufDefaultAlignment);

// HF <-> GGUF tensor names ("model.layers.3.self_attn.q_proj.weight" <-> "blk.3.attn_q.weight").
std::optional<std::string> hf_to_gguf_name(std::string_view hf_name);
std::optional<std::string> gguf_to_hf_name(std::string_view gguf_name);

// llama.cpp's q/k row permutation for `n_head` heads of `rows / n_head` rows each:
// file row of HF row r, and its inverse.
std::int64_t gguf_permuted_row(std::int64_t hf_row, std::int64_t rows, std::int64_t n_head);

// The model config a GGUF file describes (general.architecture llama | qwen2).
StatusOr<ModelConfig> gguf_model_config(const GgufFile& file);

// Opens a .gguf model; exposes HF names and layout; validates all expected tensors.
StatusOr<std::unique_ptr<WeightSource>> open_gguf_weights(const std::string& path,
                                                          const WeightCheckOptions& options = {});

// Writes `source` as a GGUF model: matrices in `dtype`, 1-D tensors (norms, biases) in F32 as
// llama.cpp does; q/k permuted for the llama architecture (mistral is written as llama).
// `extra_metadata` (e.g. the tokenizer.ggml.* keys of gguf_tokenizer.h) is written after the
// model's keys; a key given there replaces the model's own (bos/eos ids).
using GgufMetadata = std::vector<std::pair<std::string, GgufValue>>;
Status write_gguf_model(const WeightSource& source, DType dtype, const std::string& path,
                        const GgufMetadata& extra_metadata = {});

}  // namespace kun::model
