// Block ownership check across the allocator and every block table on a device.
#pragma once

#include <span>

#include "common/ids.h"
#include "common/status.h"
#include "kv/block_allocator.h"
#include "kv/block_table.h"

namespace kun::kv {

struct TableRef {
  RequestId request;
  const BlockTable* table = nullptr;
};

// OK when: the allocator verifies (free + used == total); each table verifies; every block a
// table references is allocated; every allocated block is referenced exactly once, by one
// (request, layer, index) or by `held_elsewhere` (blocks in flight outside any table: a swap or
// exchange buffer, the `to` blocks of a repack plan not yet written into a table). Otherwise an
// INTERNAL status naming the first offending block and its owners.
Status verify_block_ownership(const KvBlockAllocator& allocator, std::span<const TableRef> tables,
                              std::span<const BlockId> held_elsewhere = {});

}  // namespace kun::kv
