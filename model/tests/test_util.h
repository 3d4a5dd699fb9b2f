// Helpers shared by the model I/O tests.
#pragma once

#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "model/weight_source.h"

namespace kun::model::testing {

// A fresh directory under the temp dir, removed on destruction.
class TempDir {
 public:
  explicit TempDir(const std::string& tag) {
    path_ = std::filesystem::temp_directory_path() /
            ("kun_model_" + tag + "_" + std::to_string(::getpid()) + "_" + std::to_string(counter_++));
    std::filesystem::remove_all(path_);
    std::filesystem::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  std::string path() const { return path_.string(); }
  std::string file(const std::string& name) const { return (path_ / name).string(); }

 private:
  static inline int counter_ = 0;
  std::filesystem::path path_;
};

inline std::vector<float> read_f32(const WeightSource& s, const std::string& name) {
  auto info = s.tensor_info(name);
  EXPECT_TRUE(info.ok()) << info.status().to_string();
  if (!info.ok()) return {};
  std::vector<float> v(static_cast<std::size_t>(info->num_elements()));
  Status st = s.read_tensor(name, DType::kF32, v.data(), static_cast<std::int64_t>(v.size() * 4));
  EXPECT_TRUE(st.ok()) << st.to_string();
  return v;
}

// Runs a shell command, appending its standard output to *out; returns pclose's status.
inline int run_command(const std::string& cmd, std::string* out) {
  std::FILE* p = ::popen(cmd.c_str(), "r");
  if (p == nullptr) return -1;
  char buf[65536];
  std::size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), p)) > 0) out->append(buf, n);
  return ::pclose(p);
}

// True when the reference interpreter (Debian's python3) has torch and numpy.
inline bool reference_python_has_torch() {
  std::string out;
  return run_command(std::string(KUN_REFERENCE_PYTHON) + " -c 'import torch, numpy' 2>&1", &out) == 0;
}

// Every expected tensor of `a` reads back bit-identical (as f32) from `b`.
inline void expect_same_weights(const WeightSource& a, const WeightSource& b) {
  for (const auto& t : expected_tensors(a.config())) {
    ASSERT_TRUE(b.has_tensor(t.name)) << t.name;
    auto bi = b.tensor_info(t.name);
    ASSERT_TRUE(bi.ok());
    EXPECT_EQ(bi->shape, t.shape) << t.name;
    EXPECT_EQ(read_f32(a, t.name), read_f32(b, t.name)) << t.name;
  }
}

}  // namespace kun::model::testing
