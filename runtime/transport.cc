#include "runtime/transport.h"

#include <chrono>
#include <cstring>
#include <sstream>
#include <thread>

#include "common/check.h"

namespace kun::runtime {

const char* transfer_kind_name(TransferKind k) {
  switch (k) {
    case TransferKind::kActivation: return "activation";
    case TransferKind::kWeights: return "weights";
    case TransferKind::kKvMigration: return "kv_migration";
    case TransferKind::kKvExchange: return "kv_exchange";
    case TransferKind::kRemoteAttention: return "remote_attention";
    case TransferKind::kSwapOut: return "swap_out";
    case TransferKind::kSwapIn: return "swap_in";
    case TransferKind::kCount: break;
  }
  return "?";
}

std::string LinkModel::describe() const {
  if (!enabled()) return "off";
  std::ostringstream os;
  os << bandwidth_bytes_per_s / 1e9 << " GB/s, " << latency_us << " us latency";
  return os.str();
}

std::int64_t TransferStats::total_bytes() const {
  std::int64_t t = 0;
  for (std::int64_t b : bytes) t += b;
  return t;
}

namespace {
// Holds the calling thread until a message of `bytes` started at `start` has crossed `link`.
void pace(const LinkModel& link, std::chrono::steady_clock::time_point start, std::int64_t bytes) {
  if (!link.enabled()) return;
  double seconds = static_cast<double>(link.latency_us) * 1e-6;
  if (link.bandwidth_bytes_per_s > 0) seconds += static_cast<double>(bytes) / link.bandwidth_bytes_per_s;
  std::this_thread::sleep_until(start + std::chrono::duration<double>(seconds));
}
}  // namespace

InProcessTransport::InProcessTransport(LinkModel link, LinkModel host_link) : link_(link), host_link_(host_link) {}

void InProcessTransport::count(TransferKind kind, std::int64_t bytes) {
  bytes_[static_cast<int>(kind)].fetch_add(bytes, std::memory_order_relaxed);
  messages_[static_cast<int>(kind)].fetch_add(1, std::memory_order_relaxed);
}

void InProcessTransport::transfer(int src_device, int dst_device, const void* src, void* dst, std::int64_t bytes,
                                  TransferKind kind) {
  KUN_CHECK_GE(bytes, 0);
  KUN_CHECK_NE(src_device, dst_device) << "a transfer crosses devices; copies inside one device are not transfers";
  KUN_CHECK(kind != TransferKind::kSwapOut && kind != TransferKind::kSwapIn) << "swap copies go over the host link";
  const auto start = std::chrono::steady_clock::now();
  if (bytes > 0) std::memcpy(dst, src, static_cast<std::size_t>(bytes));
  count(kind, bytes);
  pace(link_, start, bytes);
}

void InProcessTransport::host_transfer(int device, std::span<const CopySpan> copies, TransferKind kind) {
  KUN_CHECK(kind == TransferKind::kSwapOut || kind == TransferKind::kSwapIn)
      << "device " << device << ": only swap copies cross the host link, not " << transfer_kind_name(kind);
  if (copies.empty()) return;
  const auto start = std::chrono::steady_clock::now();
  std::int64_t bytes = 0;
  for (const CopySpan& c : copies) {
    KUN_CHECK_GE(c.bytes, 0);
    if (c.bytes > 0) std::memcpy(c.dst, c.src, static_cast<std::size_t>(c.bytes));
    bytes += c.bytes;
  }
  count(kind, bytes);
  pace(host_link_, start, bytes);
}

TransferStats InProcessTransport::stats() const {
  TransferStats s;
  for (int i = 0; i < static_cast<int>(TransferKind::kCount); ++i) {
    s.bytes[static_cast<std::size_t>(i)] = bytes_[static_cast<std::size_t>(i)].load();
    s.messages[static_cast<std::size_t>(i)] = messages_[static_cast<std::size_t>(i)].load();
  }
  return s;
}

}  // namespace kun::runtime
