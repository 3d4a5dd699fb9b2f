#include "runtime/transport.h"

#include <algorithm>
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
    case TransferKind::kControl: return "control";
    case TransferKind::kCount: break;
  }
  return "?";
}

bool is_bulk_transfer(TransferKind k) {
  return k == TransferKind::kWeights || k == TransferKind::kKvMigration || k == TransferKind::kKvExchange;
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
using Clock = std::chrono::steady_clock;

// How long `bytes` occupy `link`, with the per-message latency or without it (a later chunk).
Clock::duration link_time(const LinkModel& link, std::int64_t bytes, bool with_latency) {
  double seconds = with_latency ? static_cast<double>(link.latency_us) * 1e-6 : 0.0;
  if (link.bandwidth_bytes_per_s > 0) seconds += static_cast<double>(bytes) / link.bandwidth_bytes_per_s;
  return std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
}

// Holds the calling thread until a message of `bytes` started at `start` has crossed `link`.
void pace(const LinkModel& link, Clock::time_point start, std::int64_t bytes) {
  if (!link.enabled()) return;
  std::this_thread::sleep_until(start + link_time(link, bytes, true));
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
  count(kind, bytes);
  if (!link_.enabled()) {
    if (bytes > 0) std::memcpy(dst, src, static_cast<std::size_t>(bytes));
    return;
  }
  LinkState& ls = link_state(src_device, dst_device);
  if (!is_bulk_transfer(kind)) {
    // Queue behind what holds the link now (at most one bulk chunk, or earlier messages).
    Clock::time_point end;
    {
      std::lock_guard<std::mutex> lock(ls.mu);
      end = std::max(Clock::now(), ls.free_at) + link_time(link_, bytes, true);
      ls.free_at = end;
    }
    if (bytes > 0) std::memcpy(dst, src, static_cast<std::size_t>(bytes));
    std::this_thread::sleep_until(end);
    return;
  }
  const auto* from = static_cast<const unsigned char*>(src);
  auto* to = static_cast<unsigned char*>(dst);
  const std::int64_t chunk = std::max<std::int64_t>(1, link_.bulk_chunk_bytes);
  std::int64_t offset = 0;
  bool first = true;
  while (first || offset < bytes) {
    const std::int64_t n = std::min(chunk, bytes - offset);
    Clock::time_point end;
    {
      std::unique_lock<std::mutex> lock(ls.mu);
      const Clock::time_point now = Clock::now();
      if (ls.free_at > now) {
        // Something else holds the link: let it (and anything queued behind it) go first.
        const Clock::time_point wait = ls.free_at;
        lock.unlock();
        bulk_chunks_deferred_.fetch_add(1, std::memory_order_relaxed);
        std::this_thread::sleep_until(wait);
        continue;
      }
      end = now + link_time(link_, n, first);
      ls.free_at = end;
    }
    if (n > 0) std::memcpy(to + offset, from + offset, static_cast<std::size_t>(n));
    std::this_thread::sleep_until(end);
    offset += n;
    first = false;
  }
}

InProcessTransport::LinkState& InProcessTransport::link_state(int src_device, int dst_device) {
  std::lock_guard<std::mutex> lock(links_mu_);
  auto& slot = links_[{src_device, dst_device}];
  if (!slot) slot = std::make_unique<LinkState>();
  return *slot;
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
  s.bulk_chunks_deferred = bulk_chunks_deferred_.load();
  return s;
}

}  // namespace kun::runtime
