#include "kv/integrity.h"

#include <sstream>
#include <string>
#include <unordered_map>

namespace kun::kv {
namespace {

struct Owner {
  std::int64_t request;  // -1 for held_elsewhere
  std::int64_t layer;
  std::int64_t index;
};

std::string describe(const Owner& o) {
  if (o.request < 0) return "held elsewhere";
  return "request " + std::to_string(o.request) + " layer " + std::to_string(o.layer) + " index " +
         std::to_string(o.index);
}

}  // namespace

Status verify_block_ownership(const KvBlockAllocator& allocator, std::span<const TableRef> tables,
                              std::span<const BlockId> held_elsewhere) {
  KUN_RETURN_IF_ERROR(allocator.verify());
  std::unordered_map<std::int64_t, Owner> owners;
  owners.reserve(static_cast<std::size_t>(allocator.num_used()));
  std::string error;
  auto claim = [&](BlockId b, const Owner& o) {
    if (!error.empty()) return;
    if (!allocator.is_allocated(b)) {
      error = "block " + std::to_string(b.value) + " (" + describe(o) + ") is not allocated";
      return;
    }
    auto [it, inserted] = owners.emplace(b.value, o);
    if (!inserted) {
      error = "block " + std::to_string(b.value) + " is shared by " + describe(it->second) + " and " + describe(o);
    }
  };
  for (const TableRef& t : tables) {
    KUN_CHECK(t.table != nullptr) << "null table for request " << t.request;
    const Status s = t.table->verify();
    if (!s.ok()) return s.with_context("request " + std::to_string(t.request.value));
    t.table->for_each_block([&](std::int64_t layer, std::int64_t index, BlockId b) {
      claim(b, Owner{t.request.value, layer, index});
    });
  }
  for (BlockId b : held_elsewhere) claim(b, Owner{-1, -1, -1});
  if (!error.empty()) return internal_error("kv block ownership: " + error);
  if (static_cast<std::int64_t>(owners.size()) != allocator.num_used()) {
    for (BlockId b : allocator.used_blocks()) {
      if (owners.count(b.value) == 0) {
        return internal_error("kv block ownership: block " + std::to_string(b.value) +
                              " is allocated but referenced by no one (leaked); " +
                              std::to_string(allocator.num_used() - static_cast<std::int64_t>(owners.size())) +
                              " leaked in all");
      }
    }
  }
  return ok_status();
}

}  // namespace kun::kv
