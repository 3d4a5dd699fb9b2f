// safetensors reader and writer (https://huggingface.co/docs/safetensors), plus the read-only
// memory-mapped file both weight formats use.
//
// Layout: u64 little-endian header length N | N bytes of JSON header | data. The header maps
// tensor names to {"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to the data
// section) and may hold "__metadata__": {string: string}.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "common/dtype.h"
#include "common/status.h"
#include "model/weight_source.h"

namespace kun::model {

// A whole file mapped read-only (MAP_PRIVATE, PROT_READ). Empty files map to size 0. Only a
// regular file is opened (O_NONBLOCK, so a FIFO fails instead of waiting for a writer).
class MappedFile {
 public:
  static StatusOr<std::unique_ptr<MappedFile>> open(const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const std::uint8_t* data() const { return data_; }
  std::uint64_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  MappedFile() = default;
  std::string path_;
  const std::uint8_t* data_ = nullptr;
  std::uint64_t size_ = 0;
};

// Converts n elements from a possibly misaligned source (file bytes) into dst.
void convert_tensor_bytes(const std::uint8_t* src, DType src_type, void* dst, DType dst_type, std::int64_t n);

struct SafetensorsTensor {
  std::string name;
  std::string dtype_name;      // as in the header: "F32", "BF16", "I64", ...
  bool dtype_supported = false;  // F32 / F16 / BF16
  DType dtype = DType::kF32;   // valid when dtype_supported
  std::vector<std::int64_t> shape;
  std::uint64_t data_begin = 0;  // absolute offsets in the file
  std::uint64_t data_end = 0;
};

// One parsed and validated .safetensors file. Construction checks: header length within the
// file, valid JSON, every entry well formed, known dtype, byte size == product(shape) * element
// size, and the tensors tile the data section exactly (no gap, no overlap, no trailing bytes;
// a header length off by one shifts every tensor and fails here).
class SafetensorsFile {
 public:
  static constexpr std::uint64_t kMaxHeaderBytes = std::uint64_t{100} << 20;

  static StatusOr<std::unique_ptr<SafetensorsFile>> open(const std::string& path);
  // Parses and validates a whole file held in memory (the fuzz target's entry); `path` only
  // names it in errors. The tensors' data_begin / data_end are offsets into `bytes`.
  static Status parse(const std::string& path, const std::uint8_t* bytes, std::uint64_t size,
                      std::vector<SafetensorsTensor>* tensors, std::map<std::string, std::string>* metadata);

  const std::string& path() const { return file_->path(); }
  const std::vector<SafetensorsTensor>& tensors() const { return tensors_; }
  const SafetensorsTensor* find(std::string_view name) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const std::uint8_t* tensor_data(const SafetensorsTensor& t) const { return file_->data() + t.data_begin; }

 private:
  SafetensorsFile() = default;
  std::unique_ptr<MappedFile> file_;
  std::vector<SafetensorsTensor> tensors_;
  std::map<std::string, std::size_t, std::less<>> index_;
  std::map<std::string, std::string> metadata_;
};

// A tensor to write: `fill` writes exactly num_elements * dtype_bytes(dtype) bytes into dst.
struct TensorWriteSpec {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<std::int64_t> shape;
  std::function<Status(void* dst, std::int64_t bytes)> fill;
  std::int64_t num_bytes() const;
};

// Writes one .safetensors file (header padded with spaces to a multiple of 8 bytes). Writes to
// a temporary name and renames on success.
Status write_safetensors_file(const std::string& path, const std::vector<TensorWriteSpec>& tensors,
                              const std::map<std::string, std::string>& metadata = {});

// Opens a safetensors model directory: config.json plus model.safetensors, or the shards named
// by model.safetensors.index.json, or (without index) every *.safetensors file in the directory.
// Validates the tensors (validate_weights).
StatusOr<std::unique_ptr<WeightSource>> open_safetensors_dir(const std::string& dir,
                                                             const WeightCheckOptions& options = {});

}  // namespace kun::model
