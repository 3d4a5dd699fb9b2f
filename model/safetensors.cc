#include "model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <numeric>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

namespace kun::model {
namespace {

using Json = nlohmann::json;
namespace fs = std::filesystem;

// Element size of every dtype the safetensors spec names; 0 if unknown.
std::int64_t safetensors_elem_bytes(std::string_view d) {
  if (d == "BOOL" || d == "U8" || d == "I8" || d == "F8_E4M3" || d == "F8_E5M2") return 1;
  if (d == "I16" || d == "U16" || d == "F16" || d == "BF16") return 2;
  if (d == "I32" || d == "U32" || d == "F32") return 4;
  if (d == "I64" || d == "U64" || d == "F64") return 8;
  return 0;
}

const char* safetensors_dtype_name(DType t) {
  switch (t) {
    case DType::kF32: return "F32";
    case DType::kF16: return "F16";
    case DType::kBF16: return "BF16";
  }
  return "F32";
}

std::string shape_string(const std::vector<std::int64_t>& s) {
  std::string out = "[";
  for (std::size_t i = 0; i < s.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(s[i]);
  }
  return out + "]";
}

Status parse_header(const std::string& path, const std::uint8_t* data, std::uint64_t file_size,
                    std::vector<SafetensorsTensor>* tensors, std::map<std::string, std::string>* metadata) {
  if (file_size < 8) {
    return data_loss(path + ": truncated safetensors file: " + std::to_string(file_size) +
                     " bytes, need at least 8 for the header length");
  }
  std::uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | data[i];
  if (header_len > SafetensorsFile::kMaxHeaderBytes) {
    return data_loss(path + ": safetensors header length " + std::to_string(header_len) +
                     " exceeds the limit of " + std::to_string(SafetensorsFile::kMaxHeaderBytes) + " bytes");
  }
  if (header_len > file_size - 8) {
    return data_loss(path + ": safetensors header length " + std::to_string(header_len) +
                     " runs past the end of the file (" + std::to_string(file_size) + " bytes): truncated?");
  }
  const std::uint64_t data_start = 8 + header_len;
  const std::uint64_t data_size = file_size - data_start;
  Json header;
  try {
    header = Json::parse(data + 8, data + 8 + header_len);
  } catch (const Json::exception& e) {
    return data_loss(path + ": safetensors header is not valid JSON: " + e.what());
  }
  if (!header.is_object()) return data_loss(path + ": safetensors header is not a JSON object");

  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const Json& v = it.value();
    if (name == "__metadata__") {
      if (!v.is_object()) return data_loss(path + ": __metadata__ must be an object of strings");
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string()) {
          return data_loss(path + ": __metadata__ entry '" + m.key() + "' is not a string");
        }
        (*metadata)[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    const std::string where = path + ": tensor '" + name + "'";
    if (!v.is_object()) return data_loss(where + ": header entry is not an object");
    auto dt = v.find("dtype");
    auto sh = v.find("shape");
    auto off = v.find("data_offsets");
    if (dt == v.end() || !dt->is_string()) return data_loss(where + ": missing or non-string 'dtype'");
    if (sh == v.end() || !sh->is_array()) return data_loss(where + ": missing or non-array 'shape'");
    if (off == v.end() || !off->is_array() || off->size() != 2) {
      return data_loss(where + ": 'data_offsets' must be [begin, end]");
    }
    SafetensorsTensor t;
    t.name = name;
    t.dtype_name = dt->get<std::string>();
    const std::int64_t elem = safetensors_elem_bytes(t.dtype_name);
    if (elem == 0) return data_loss(where + ": unknown dtype '" + t.dtype_name + "'");
    t.dtype_supported = parse_dtype(t.dtype_name, &t.dtype);
    std::uint64_t numel = 1;
    bool overflow = false;
    for (const Json& d : *sh) {
      if (!d.is_number_unsigned()) return data_loss(where + ": shape has a non-integer or negative dim " + d.dump());
      const std::uint64_t dim = d.get<std::uint64_t>();
      if (dim > (std::uint64_t{1} << 40)) overflow = true;
      t.shape.push_back(static_cast<std::int64_t>(std::min<std::uint64_t>(dim, std::uint64_t{1} << 40)));
      if (dim != 0 && numel > (std::numeric_limits<std::uint64_t>::max() >> 8) / dim) overflow = true;
      numel *= dim;
    }
    if (overflow) return data_loss(where + ": shape " + sh->dump() + " is too large");
    for (const Json& o : *off) {
      if (!o.is_number_unsigned()) return data_loss(where + ": data_offsets entry " + o.dump() + " is not a non-negative integer");
    }
    const std::uint64_t begin = (*off)[0].get<std::uint64_t>();
    const std::uint64_t end = (*off)[1].get<std::uint64_t>();
    if (begin > end) {
      return data_loss(where + ": data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) + "] are reversed");
    }
    if (end > data_size) {
      return data_loss(where + ": data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) +
                       "] run past the data section of " + std::to_string(data_size) + " bytes (file truncated?)");
    }
    const std::uint64_t expect = numel * static_cast<std::uint64_t>(elem);
    if (end - begin != expect) {
      return data_loss(where + ": byte size " + std::to_string(end - begin) + " does not match dtype " +
                       t.dtype_name + " and shape " + shape_string(t.shape) + " (" + std::to_string(expect) +
                       " bytes)");
    }
    t.data_begin = data_start + begin;
    t.data_end = data_start + end;
    tensors->push_back(std::move(t));
  }
  // The tensors must tile the data section exactly, as the format's reference reader requires:
  // sorted by offset, each starts where the previous one ends, the first at 0 and the last at the
  // end. A gap, an overlap or trailing bytes mean a corrupt file or a header length that is off
  // (every tensor shifted), and each is reported with the tensor where the tiling breaks.
  std::vector<const SafetensorsTensor*> sorted;
  for (const auto& t : *tensors) sorted.push_back(&t);
  std::sort(sorted.begin(), sorted.end(), [](const SafetensorsTensor* a, const SafetensorsTensor* b) {
    return a->data_begin != b->data_begin ? a->data_begin < b->data_begin : a->data_end < b->data_end;
  });
  std::uint64_t expect_begin = data_start;
  const SafetensorsTensor* previous = nullptr;
  const auto prev_name = [&] { return previous == nullptr ? std::string("the start of the data section")
                                                            : "tensor '" + previous->name + "'"; };
  for (const SafetensorsTensor* t : sorted) {
    if (t->data_begin < expect_begin) {
      return data_loss(path + ": tensor '" + t->name + "' (data_offsets [" + std::to_string(t->data_begin - data_start) +
                       ", " + std::to_string(t->data_end - data_start) + "]) overlaps " + prev_name() +
                       " in the data section");
    }
    if (t->data_begin > expect_begin) {
      return data_loss(path + ": tensor '" + t->name + "' starts at data offset " +
                       std::to_string(t->data_begin - data_start) + " but " + prev_name() + " ends at " +
                       std::to_string(expect_begin - data_start) + ": a gap of " +
                       std::to_string(t->data_begin - expect_begin) + " bytes (corrupt offsets or header length?)");
    }
    expect_begin = t->data_end;
    previous = t;
  }
  if (expect_begin != file_size) {
    return data_loss(path + ": " + std::to_string(file_size - expect_begin) + " trailing bytes after " + prev_name() +
                     " (data section of " + std::to_string(data_size) +
                     " bytes; corrupt offsets or a header length that is off?)");
  }
  return ok_status();
}

// A tensor of a safetensors directory: which file holds it.
struct DirTensor {
  const SafetensorsFile* file = nullptr;
  const SafetensorsTensor* tensor = nullptr;
};

class SafetensorsDirSource final : public WeightSource {
 public:
  SafetensorsDirSource(std::string dir, ModelConfig config) : dir_(std::move(dir)), config_(std::move(config)) {}

  const ModelConfig& config() const override { return config_; }
  std::string describe() const override { return dir_ + " (safetensors)"; }
  bool has_tensor(std::string_view name) const override { return tensors_.find(name) != tensors_.end(); }
  std::string tensor_origin(std::string_view name) const override {
    auto it = tensors_.find(name);
    return it == tensors_.end() ? describe() : it->second.file->path();
  }

  StatusOr<TensorInfo> tensor_info(std::string_view name) const override {
    auto it = tensors_.find(name);
    if (it == tensors_.end()) return not_found("tensor '" + std::string(name) + "' not found in " + describe());
    const SafetensorsTensor& t = *it->second.tensor;
    if (!t.dtype_supported) {
      return unimplemented(it->second.file->path() + ": tensor '" + t.name + "' has dtype " + t.dtype_name +
                           " (supported: F32, F16, BF16)");
    }
    return TensorInfo{t.name, t.dtype, t.shape};
  }

  Status read_tensor(std::string_view name, DType dst_dtype, void* dst, std::int64_t dst_bytes) const override {
    KUN_ASSIGN_OR_RETURN(TensorInfo info, tensor_info(name));
    const DirTensor& dt = tensors_.find(name)->second;
    const std::int64_t n = info.num_elements();
    if (dst_bytes != n * dtype_bytes(dst_dtype)) {
      return invalid_argument(dt.file->path() + ": tensor '" + info.name + "': destination has " +
                              std::to_string(dst_bytes) + " bytes, need " + std::to_string(n * dtype_bytes(dst_dtype)));
    }
    convert_tensor_bytes(dt.file->tensor_data(*dt.tensor), info.dtype, dst, dst_dtype, n);
    return ok_status();
  }

  std::vector<std::string> tensor_names() const override {
    std::vector<std::string> out;
    for (const auto& [name, t] : tensors_) out.push_back(name);
    return out;
  }

  std::optional<StoredTensor> stored_tensor(std::string_view name) const override {
    auto it = tensors_.find(name);
    if (it == tensors_.end() || !it->second.tensor->dtype_supported) return std::nullopt;
    const SafetensorsTensor& t = *it->second.tensor;
    return StoredTensor{it->second.file->tensor_data(t), t.dtype,
                        static_cast<std::int64_t>((t.data_end - t.data_begin) / static_cast<std::uint64_t>(dtype_bytes(t.dtype)))};
  }

  Status add_file(std::unique_ptr<SafetensorsFile> file) {
    for (const auto& t : file->tensors()) {
      auto it = tensors_.find(t.name);
      if (it != tensors_.end()) {
        return data_loss("tensor '" + t.name + "' appears in both " + it->second.file->path() + " and " + file->path());
      }
      tensors_.emplace(t.name, DirTensor{file.get(), &t});
    }
    files_.push_back(std::move(file));
    return ok_status();
  }

 private:
  std::string dir_;
  ModelConfig config_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, DirTensor, std::less<>> tensors_;
};

}  // namespace

void convert_tensor_bytes(const std::uint8_t* src, DType src_type, void* dst, DType dst_type, std::int64_t n) {
  const std::int64_t esz = dtype_bytes(src_type);
  if (reinterpret_cast<std::uintptr_t>(src) % static_cast<std::uintptr_t>(esz) == 0) {
    convert_dtype(src, src_type, dst, dst_type, n);
    return;
  }
  // Misaligned source (a file whose offsets are not multiples of the element size): bounce
  // through an aligned buffer so no typed load is misaligned.
  constexpr std::int64_t kChunk = 4096;
  alignas(16) std::uint8_t buf[kChunk * 4];
  auto* out = static_cast<std::uint8_t*>(dst);
  const std::int64_t dsz = dtype_bytes(dst_type);
  for (std::int64_t i = 0; i < n; i += kChunk) {
    const std::int64_t m = std::min(kChunk, n - i);
    std::memcpy(buf, src + i * esz, static_cast<std::size_t>(m * esz));
    convert_dtype(buf, src_type, out + i * dsz, dst_type, m);
  }
}

MappedFile::~MappedFile() {
  if (data_ != nullptr && size_ > 0) munmap(const_cast<std::uint8_t*>(data_), size_);
}

StatusOr<std::unique_ptr<MappedFile>> MappedFile::open(const std::string& path) {
  // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever; the
  // S_ISREG check below then refuses it (and devices, sockets, directories).
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) {
    const int err = errno;
    if (err == ENOENT) return not_found(path + ": no such file");
    return not_found(path + ": cannot open: " + std::strerror(err));
  }
  struct stat st {};
  if (fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    return internal_error(path + ": fstat failed: " + std::strerror(err));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return invalid_argument(path + ": not a regular file (a FIFO, device or directory cannot hold weights)");
  }
  std::unique_ptr<MappedFile> f(new MappedFile());
  f->path_ = path;
  f->size_ = static_cast<std::uint64_t>(st.st_size);
  if (f->size_ > 0) {
    void* p = mmap(nullptr, f->size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      const int err = errno;
      ::close(fd);
      f->size_ = 0;
      return internal_error(path + ": mmap failed: " + std::strerror(err));
    }
    f->data_ = static_cast<const std::uint8_t*>(p);
  }
  ::close(fd);
  return f;
}

StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::open(const std::string& path) {
  KUN_ASSIGN_OR_RETURN(auto mapped, MappedFile::open(path));
  std::unique_ptr<SafetensorsFile> f(new SafetensorsFile());
  KUN_RETURN_IF_ERROR(parse_header(path, mapped->data(), mapped->size(), &f->tensors_, &f->metadata_));
  f->file_ = std::move(mapped);
  for (std::size_t i = 0; i < f->tensors_.size(); ++i) f->index_.emplace(f->tensors_[i].name, i);
  return f;
}

Status SafetensorsFile::parse(const std::string& path, const std::uint8_t* bytes, std::uint64_t size,
                              std::vector<SafetensorsTensor>* tensors, std::map<std::string, std::string>* metadata) {
  return parse_header(path, bytes, size, tensors, metadata);
}

const SafetensorsTensor* SafetensorsFile::find(std::string_view name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

std::int64_t TensorWriteSpec::num_bytes() const {
  std::int64_t n = dtype_bytes(dtype);
  for (auto d : shape) n *= d;
  return n;
}

Status write_safetensors_file(const std::string& path, const std::vector<TensorWriteSpec>& tensors,
                              const std::map<std::string, std::string>& metadata) {
  std::string header;
  try {
    Json h = Json::object();
    if (!metadata.empty()) {
      Json m = Json::object();
      for (const auto& [k, v] : metadata) m[k] = v;
      h["__metadata__"] = m;
    }
    std::uint64_t offset = 0;
    for (const auto& t : tensors) {
      if (t.name == "__metadata__" || h.contains(t.name)) {
        return invalid_argument(path + ": duplicate or reserved tensor name '" + t.name + "'");
      }
      const auto bytes = static_cast<std::uint64_t>(t.num_bytes());
      h[t.name] = {{"dtype", safetensors_dtype_name(t.dtype)}, {"shape", t.shape},
                   {"data_offsets", {offset, offset + bytes}}};
      offset += bytes;
    }
    header = h.dump();
  } catch (const Json::exception& e) {
    return internal_error(path + ": building safetensors header: " + e.what());
  }
  while (header.size() % 8 != 0) header.push_back(' ');

  const std::string tmp = path + ".tmp";
  std::FILE* out = std::fopen(tmp.c_str(), "wb");
  if (out == nullptr) return not_found(tmp + ": cannot create: " + std::strerror(errno));
  auto fail = [&](Status s) {
    std::fclose(out);
    std::remove(tmp.c_str());
    return s;
  };
  std::uint8_t len[8];
  std::uint64_t hl = header.size();
  for (int i = 0; i < 8; ++i) len[i] = static_cast<std::uint8_t>(hl >> (8 * i));
  if (std::fwrite(len, 1, 8, out) != 8 || std::fwrite(header.data(), 1, header.size(), out) != header.size()) {
    return fail(data_loss(tmp + ": write failed"));
  }
  std::vector<std::uint8_t> buf;
  for (const auto& t : tensors) {
    buf.resize(static_cast<std::size_t>(t.num_bytes()));
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
  fs::rename(tmp, path, ec);
  if (ec) return data_loss(path + ": rename failed: " + ec.message());
  return ok_status();
}

StatusOr<std::unique_ptr<WeightSource>> open_safetensors_dir(const std::string& dir, const WeightCheckOptions& options) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return not_found(dir + ": not a directory");
  const std::string config_path = (fs::path(dir) / "config.json").string();
  KUN_ASSIGN_OR_RETURN(std::string config_text, read_regular_text_file(config_path));
  auto config = parse_hf_config(config_text);
  if (!config.ok()) return config.status().with_context(config_path);

  auto source = std::make_unique<SafetensorsDirSource>(dir, *config);
  const fs::path index_path = fs::path(dir) / "model.safetensors.index.json";
  std::vector<std::string> files;
  if (fs::exists(index_path, ec)) {
    KUN_ASSIGN_OR_RETURN(std::string index_text, read_regular_text_file(index_path.string()));
    std::map<std::string, std::string> weight_map;
    try {
      Json idx = Json::parse(index_text);
      auto wm = idx.find("weight_map");
      if (!idx.is_object() || wm == idx.end() || !wm->is_object()) {
        return data_loss(index_path.string() + ": missing object 'weight_map'");
      }
      for (auto it = wm->begin(); it != wm->end(); ++it) {
        if (!it.value().is_string()) {
          return data_loss(index_path.string() + ": weight_map entry for tensor '" + it.key() + "' is not a string");
        }
        weight_map[it.key()] = it.value().get<std::string>();
      }
    } catch (const Json::exception& e) {
      return data_loss(index_path.string() + ": not valid JSON: " + e.what());
    }
    std::set<std::string> unique;
    for (const auto& [name, file] : weight_map) {
      if (file.find('/') != std::string::npos || file == ".." || file.empty()) {
        return data_loss(index_path.string() + ": tensor '" + name + "' maps to a bad file name '" + file + "'");
      }
      unique.insert(file);
    }
    std::map<std::string, const SafetensorsFile*> opened;
    for (const auto& file : unique) {
      KUN_ASSIGN_OR_RETURN(auto f, SafetensorsFile::open((fs::path(dir) / file).string()));
      opened[file] = f.get();
      KUN_RETURN_IF_ERROR(source->add_file(std::move(f)));
    }
    for (const auto& [name, file] : weight_map) {
      if (opened[file]->find(name) == nullptr) {
        return data_loss(index_path.string() + ": tensor '" + name + "' is mapped to " + opened[file]->path() +
                         " but that file does not contain it");
      }
    }
  } else {
    for (const auto& entry : fs::directory_iterator(dir, ec)) {
      if (entry.path().extension() == ".safetensors") files.push_back(entry.path().string());
    }
    if (ec) return not_found(dir + ": cannot list directory: " + ec.message());
    std::sort(files.begin(), files.end());
    if (files.empty()) return not_found(dir + ": no *.safetensors files (and no model.safetensors.index.json)");
    for (const auto& file : files) {
      KUN_ASSIGN_OR_RETURN(auto f, SafetensorsFile::open(file));
      KUN_RETURN_IF_ERROR(source->add_file(std::move(f)));
    }
  }
  KUN_RETURN_IF_ERROR(validate_weights(*source, options));
  return std::unique_ptr<WeightSource>(std::move(source));
}

}  // namespace kun::model
