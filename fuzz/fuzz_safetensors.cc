// libFuzzer target: safetensors files from memory (SafetensorsFile::parse, the parser open()
// runs on the mapped file). An accepted file's tensors tile the data section exactly and lie
// inside the input.
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "fuzz/fuzz_util.h"
#include "model/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::vector<kun::model::SafetensorsTensor> tensors;
  std::map<std::string, std::string> metadata;
  const kun::Status s = kun::model::SafetensorsFile::parse("fuzz.safetensors", data, size, &tensors, &metadata);
  if (!s.ok()) {
    if (s.message().find("fuzz.safetensors") == std::string::npos) kun::fuzz::fail("error does not name the file");
    return 0;
  }
  std::uint64_t covered = 0;
  for (const auto& t : tensors) {
    if (t.data_begin > t.data_end || t.data_end > size) kun::fuzz::fail("accepted tensor '" + t.name + "' outside the file");
    covered += t.data_end - t.data_begin;
    if (t.dtype_supported) {
      // Touch the data the way the loader does.
      const std::int64_t n = static_cast<std::int64_t>((t.data_end - t.data_begin) /
                                                       static_cast<std::uint64_t>(kun::dtype_bytes(t.dtype)));
      (void)kun::model::first_non_finite(data + t.data_begin, t.dtype, n);
    }
  }
  std::uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | data[i];
  if (covered != size - 8 - header_len) kun::fuzz::fail("accepted tensors do not tile the data section");
  return 0;
}
