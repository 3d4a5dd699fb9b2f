// libFuzzer target: config.json parsing (parse_hf_config); an accepted config validates and
// its tensor list can be built.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "fuzz/fuzz_util.h"
#include "model/config.h"
#include "model/weight_source.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  auto config = kun::model::parse_hf_config(std::string_view(reinterpret_cast<const char*>(data), size));
  if (!config.ok()) return 0;
  if (!config->validate().ok()) kun::fuzz::fail("parse_hf_config accepted an invalid config");
  // Only small models: the list grows with the layer count.
  if (config->num_layers <= 4096) (void)kun::model::expected_tensors(*config);
  return 0;
}
