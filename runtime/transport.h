// Transport: the only way bytes cross devices (DESIGN.md section 4). Activations between
// pipeline stages, weight pulls on restore, KV migration and exchange, remote-attention q/k/v and
// outputs all go through it, and it counts them by kind; so do swap copies between a device and
// its host swap space, over the device's host link. The in-process implementation copies
// between arenas and can pace each transfer by an optional link model (bandwidth, latency) to
// emulate NVLink / PCIe / network, one for device-to-device links and one for the host link; both
// are off by default and reports say whether they were on. Without pacing a swap on this machine
// is a memcpy at DRAM bandwidth, which no GPU's PCIe link comes near.
//
// With pacing, each directed device-to-device link carries one message at a time. Latency-bound
// messages (activations, remote attention) take the link in arrival order as soon as it is free;
// bulk transfers (KV exchange and migration, weight pulls) cross it in chunks, each sent only
// when nothing else holds the link, so an activation waits behind at most one bulk chunk: the
// background movement of KV and weights yields to the pipeline.
//
// Threads: any thread may call transfer(); counters are atomic, link state is per link.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>

namespace kun::runtime {

enum class TransferKind {
  kActivation = 0,
  kWeights,
  kKvMigration,
  kKvExchange,
  kRemoteAttention,
  kSwapOut,  // device -> host swap space (host link)
  kSwapIn,   // host swap space -> device (host link)
  kControl,  // front end <-> device agent requests and replies (stage requests, ops, acks)
  kCount
};
const char* transfer_kind_name(TransferKind k);
// Bulk kinds yield the link to latency-bound ones between chunks.
bool is_bulk_transfer(TransferKind k);

struct LinkModel {
  double bandwidth_bytes_per_s = 0.0;  // 0: no pacing
  std::int64_t latency_us = 0;
  std::int64_t bulk_chunk_bytes = 64 * 1024;  // a bulk transfer yields the link between chunks
  bool enabled() const { return bandwidth_bytes_per_s > 0.0 || latency_us > 0; }
  std::string describe() const;
};

struct TransferStats {
  std::array<std::int64_t, static_cast<int>(TransferKind::kCount)> bytes{};
  std::array<std::int64_t, static_cast<int>(TransferKind::kCount)> messages{};
  std::int64_t bulk_chunks_deferred = 0;  // bulk chunks that waited for other traffic on their link
  std::int64_t bytes_of(TransferKind k) const { return bytes[static_cast<int>(k)]; }
  std::int64_t total_bytes() const;
};

// One contiguous copy of a batch that crosses a link as one message.
struct CopySpan {
  const void* src = nullptr;
  void* dst = nullptr;
  std::int64_t bytes = 0;
};

class Transport {
 public:
  virtual ~Transport() = default;
  // Moves `bytes` from device src_device's memory at `src` to device dst_device's memory at `dst`.
  virtual void transfer(int src_device, int dst_device, const void* src, void* dst, std::int64_t bytes,
                        TransferKind kind) = 0;
  // Copies between device `device` and its host memory (kind kSwapOut or kSwapIn), as one message
  // over the host link: one latency, then the summed bytes at its bandwidth.
  virtual void host_transfer(int device, std::span<const CopySpan> copies, TransferKind kind) = 0;
  virtual TransferStats stats() const = 0;
  virtual const LinkModel& link() const = 0;
  virtual const LinkModel& host_link() const = 0;
};

class InProcessTransport final : public Transport {
 public:
  explicit InProcessTransport(LinkModel link = {}, LinkModel host_link = {});
  void transfer(int src_device, int dst_device, const void* src, void* dst, std::int64_t bytes,
                TransferKind kind) override;
  void host_transfer(int device, std::span<const CopySpan> copies, TransferKind kind) override;
  TransferStats stats() const override;
  const LinkModel& link() const override { return link_; }
  const LinkModel& host_link() const override { return host_link_; }

 private:
  void count(TransferKind kind, std::int64_t bytes);
  struct LinkState {
    std::mutex mu;
    std::chrono::steady_clock::time_point free_at{};  // guarded by mu: the link's last reservation ends
  };
  LinkState& link_state(int src_device, int dst_device);
  LinkModel link_;
  LinkModel host_link_;
  std::mutex links_mu_;
  std::map<std::pair<int, int>, std::unique_ptr<LinkState>> links_;  // guarded by links_mu_
  std::atomic<std::int64_t> bulk_chunks_deferred_{0};
  std::array<std::atomic<std::int64_t>, static_cast<int>(TransferKind::kCount)> bytes_{};
  std::array<std::atomic<std::int64_t>, static_cast<int>(TransferKind::kCount)> messages_{};
};

}  // namespace kun::runtime
