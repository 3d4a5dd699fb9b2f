// Transfer kinds and their counters (runtime/transport.h).
#include <gtest/gtest.h>

#include <cstdint>

#include "runtime/transport.h"

namespace kun::runtime {
namespace {

TEST(TransportTest, BulkKindsAndNames) {
  EXPECT_TRUE(is_bulk_transfer(TransferKind::kWeights));
  EXPECT_TRUE(is_bulk_transfer(TransferKind::kKvExchange));
  EXPECT_TRUE(is_bulk_transfer(TransferKind::kKvMigration));
  EXPECT_FALSE(is_bulk_transfer(TransferKind::kActivation));
  EXPECT_FALSE(is_bulk_transfer(TransferKind::kRemoteAttention));
  EXPECT_STREQ(transfer_kind_name(TransferKind::kKvExchange), "kv_exchange");
  TransferStats stats;
  stats.bytes[static_cast<int>(TransferKind::kKvExchange)] = 1000;
  stats.bytes[static_cast<int>(TransferKind::kWeights)] = 24;
  EXPECT_EQ(stats.bytes_of(TransferKind::kKvExchange), 1000);
  EXPECT_EQ(stats.total_bytes(), 1024);
}

}  // namespace
}  // namespace kun::runtime
