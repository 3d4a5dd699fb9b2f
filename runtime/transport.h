// What crosses between devices, by kind, and the link model that paces it (DESIGN.md section 4).
// The transport itself is MessageTransport (message_transport.h: the in-process hub, MPI): it
// counts bytes and messages per kind in TransferStats, and with a LinkModel on, each directed
// device link carries one message at a time, latency-bound kinds (activations, remote attention)
// first and bulk kinds (KV exchange and migration, weight pulls) in chunks, so the pipeline waits
// behind at most one chunk. Both link models (device links and the host link of swaps) are off by
// default and reports say whether they were on.
#pragma once

#include <array>
#include <cstdint>
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

}  // namespace kun::runtime
