#include "runtime/transport.h"

#include <sstream>

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

}  // namespace kun::runtime
