// Transport: the only way bytes cross devices (DESIGN.md section 4). Activations between
// pipeline stages, weight pulls on restore, KV migration and exchange, remote-attention q/k/v and
// outputs all go through it, and it counts them by kind. The in-process implementation copies
// between arenas and can pace each transfer by an optional link model (bandwidth, latency) to
// emulate NVLink / PCIe / network; it is off by default and reports say whether it was on.
//
// Threads: any thread may call transfer(); counters are atomic.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <string>

namespace kun::runtime {

enum class TransferKind { kActivation = 0, kWeights, kKvMigration, kKvExchange, kRemoteAttention, kCount };
const char* transfer_kind_name(TransferKind k);

struct LinkModel {
  double bandwidth_bytes_per_s = 0.0;  // 0: no pacing
  std::int64_t latency_us = 0;
  bool enabled() const { return bandwidth_bytes_per_s > 0.0 || latency_us > 0; }
  std::string describe() const;
};

struct TransferStats {
  std::array<std::int64_t, static_cast<int>(TransferKind::kCount)> bytes{};
  std::array<std::int64_t, static_cast<int>(TransferKind::kCount)> messages{};
  std::int64_t bytes_of(TransferKind k) const { return bytes[static_cast<int>(k)]; }
  std::int64_t total_bytes() const;
};

class Transport {
 public:
  virtual ~Transport() = default;
  // Moves `bytes` from device src_device's memory at `src` to device dst_device's memory at `dst`.
  virtual void transfer(int src_device, int dst_device, const void* src, void* dst, std::int64_t bytes,
                        TransferKind kind) = 0;
  virtual TransferStats stats() const = 0;
  virtual const LinkModel& link() const = 0;
};

class InProcessTransport final : public Transport {
 public:
  explicit InProcessTransport(LinkModel link = {});
  void transfer(int src_device, int dst_device, const void* src, void* dst, std::int64_t bytes,
                TransferKind kind) override;
  TransferStats stats() const override;
  const LinkModel& link() const override { return link_; }

 private:
  LinkModel link_;
  std::array<std::atomic<std::int64_t>, static_cast<int>(TransferKind::kCount)> bytes_{};
  std::array<std::atomic<std::int64_t>, static_cast<int>(TransferKind::kCount)> messages_{};
};

}  // namespace kun::runtime
