// libFuzzer target: GGUF files. The bytes go to a temporary file (GGUF is read through a
// mapping) and through open_gguf_weights: header, metadata, tensor infos, model config,
// tensor validation; an accepted model's tensors are read in full.
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "fuzz/fuzz_util.h"
#include "model/gguf.h"

namespace {

std::string temp_path() {
  const char* dir = ::access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
  return std::string(dir) + "/kun_fuzz_gguf_" + std::to_string(::getpid()) + ".gguf";
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static const std::string path = temp_path();
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) kun::fuzz::fail("cannot create " + path);
  if (size > 0 && std::fwrite(data, 1, size, f) != size) kun::fuzz::fail("cannot write " + path);
  std::fclose(f);
  auto file = kun::model::GgufFile::open(path);
  if (file.ok()) (void)kun::model::gguf_model_config(**file);
  auto weights = kun::model::open_gguf_weights(path);
  if (!weights.ok()) {
    if (weights.status().message().find(path) == std::string::npos) kun::fuzz::fail("error does not name the file");
    return 0;
  }
  for (const auto& info : kun::model::expected_tensors((*weights)->config())) {
    std::vector<float> buf(static_cast<std::size_t>(info.num_elements()));
    const kun::Status s = (*weights)->read_tensor(info.name, kun::DType::kF32, buf.data(),
                                                  static_cast<std::int64_t>(buf.size() * sizeof(float)));
    if (!s.ok()) kun::fuzz::fail("validated tensor '" + info.name + "' does not read: " + s.to_string());
  }
  return 0;
}
