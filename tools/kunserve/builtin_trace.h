// The small window of the Azure code trace that ships with the binary (workload/data/README.md),
// so the burst demo runs without ../shared.
#pragma once

#include <string_view>

namespace kun::tools {
std::string_view builtin_azure_code_window_csv();
}  // namespace kun::tools
