#include "memory/device_arena.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <random>
#include <set>

namespace kun::memory {
namespace {

const std::int64_t kOsPage = static_cast<std::int64_t>(::sysconf(_SC_PAGESIZE));

std::unique_ptr<DeviceArena> make_arena(std::int64_t pages, std::int64_t page_bytes = 0) {
  if (page_bytes == 0) page_bytes = kOsPage;
  auto arena = DeviceArena::create(pages * page_bytes, page_bytes);
  KUN_CHECK(arena.ok()) << arena.status().to_string();
  return std::move(arena).value();
}

// Fills [p, p + n) with a pattern derived from seed.
void fill(std::byte* p, std::int64_t n, std::uint32_t seed) {
  for (std::int64_t i = 0; i < n; ++i) p[i] = static_cast<std::byte>((seed * 131u + static_cast<std::uint32_t>(i) * 7u) & 0xffu);
}
bool matches(const std::byte* p, std::int64_t n, std::uint32_t seed) {
  for (std::int64_t i = 0; i < n; ++i) {
    if (p[i] != static_cast<std::byte>((seed * 131u + static_cast<std::uint32_t>(i) * 7u) & 0xffu)) return false;
  }
  return true;
}

// KiB of the mappings that overlap [addr, addr + bytes) which the kernel maps with huge-page
// (PMD) entries, from /proc/self/smaps ("ShmemPmdMapped" for a memfd mapping). A segment mapped
// from scattered pages is several mappings.
std::int64_t pmd_mapped_kib(const void* addr, std::int64_t bytes) {
  const auto a = reinterpret_cast<std::uintptr_t>(addr);
  const std::uintptr_t b = a + static_cast<std::uintptr_t>(bytes);
  std::ifstream in("/proc/self/smaps");
  std::string line;
  bool inside = false;
  std::int64_t total = 0;
  while (std::getline(in, line)) {
    std::uintptr_t lo = 0, hi = 0;
    char dash = 0;
    std::istringstream head(line);
    if (head >> std::hex >> lo >> dash >> hi && dash == '-') {
      inside = lo < b && hi > a;
      continue;
    }
    if (inside && line.rfind("ShmemPmdMapped:", 0) == 0) {
      std::istringstream v(line.substr(15));
      std::int64_t kib = 0;
      v >> kib;
      total += kib;
    }
  }
  return total;
}

TEST(DeviceArenaTest, HugePagesBackSegmentsAndKvAcrossDropRestore) {
  ArenaOptions options;
  options.capacity_bytes = 10 * kDefaultPageBytes;
  auto made = DeviceArena::create(options);
  ASSERT_TRUE(made.ok()) << made.status().to_string();
  DeviceArena& arena = **made;
  if (arena.huge_page_bytes() == 0) GTEST_SKIP() << "the kernel gave this process no huge pages";
  ASSERT_EQ(kDefaultPageBytes % arena.huge_page_bytes(), 0);
  const std::int64_t seg_bytes = 3 * kDefaultPageBytes - 100;
  auto seg = arena.create_segment("layer.0", seg_bytes);
  ASSERT_TRUE(seg.ok());
  std::byte* addr = arena.segment_data(*seg);
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(addr) % static_cast<std::uintptr_t>(arena.huge_page_bytes()), 0u);
  // The segment's 3 pages, and the whole-arena mapping the KV pages are read through, are mapped
  // with huge-page entries.
  EXPECT_EQ(pmd_mapped_kib(addr, 3 * kDefaultPageBytes), 3 * kDefaultPageBytes / 1024);
  EXPECT_EQ(pmd_mapped_kib(arena.page_data(PageId(0)), arena.capacity_bytes()), arena.capacity_bytes() / 1024);
  fill(addr, seg_bytes, 3);
  std::vector<std::byte> saved(addr, addr + seg_bytes);

  // Drop, let KV traffic overwrite the pages, restore onto other pages in a scrambled order: the
  // mapping is huge again and the bytes written through it land on the chosen pages.
  auto dropped = arena.drop_segment(*seg);
  ASSERT_TRUE(dropped.ok());
  for (PageId p : *dropped) fill(arena.page_data(p), kDefaultPageBytes, 77);
  auto extra = arena.add_kv_pages(3);
  ASSERT_TRUE(extra.ok());
  const std::vector<PageId> target = {(*extra)[2], (*dropped)[1], (*extra)[0]};
  ASSERT_TRUE(arena.restore_segment(*seg, target).ok());
  EXPECT_EQ(arena.segment_data(*seg), addr);
  EXPECT_EQ(pmd_mapped_kib(addr, 3 * kDefaultPageBytes), 3 * kDefaultPageBytes / 1024);
  EXPECT_TRUE(matches(addr + kDefaultPageBytes, kDefaultPageBytes, 77));  // page (*dropped)[1] as KV left it
  std::memcpy(addr, saved.data(), saved.size());
  EXPECT_EQ(std::memcmp(arena.page_data(target[0]), saved.data(), static_cast<std::size_t>(kDefaultPageBytes)), 0);
  EXPECT_EQ(std::memcmp(arena.page_data(target[2]), saved.data() + 2 * kDefaultPageBytes,
                        static_cast<std::size_t>(kDefaultPageBytes - 100)),
            0);
  EXPECT_TRUE(arena.verify_integrity().ok()) << arena.verify_integrity().to_string();
  EXPECT_GE(arena.resident_bytes(), arena.capacity_bytes());
}

TEST(DeviceArenaTest, HugePagesUnderPagesSmallerThanOne) {
  // 256 KiB pages (the in-process cluster's): 8 pages share a huge page. A segment on consecutive
  // pages is placed so that its address agrees with their file offset modulo the huge page, and
  // the huge pages wholly inside it are mapped as huge pages.
  ArenaOptions options;
  options.page_bytes = 256 * kKiB;
  options.capacity_bytes = 64 * options.page_bytes;
  auto made = DeviceArena::create(options);
  ASSERT_TRUE(made.ok()) << made.status().to_string();
  DeviceArena& arena = **made;
  if (arena.huge_page_bytes() == 0) GTEST_SKIP() << "the kernel gave this process no huge pages";
  const std::int64_t huge = arena.huge_page_bytes();
  EXPECT_EQ(pmd_mapped_kib(arena.page_data(PageId(0)), arena.capacity_bytes()), arena.capacity_bytes() / 1024);
  ASSERT_TRUE(arena.add_kv_pages(3).ok());  // the segment starts 768 KiB into the memfd
  const std::int64_t n = 20;
  auto seg = arena.create_segment("layer.0", n * options.page_bytes);
  ASSERT_TRUE(seg.ok());
  const std::int64_t first = 3 * options.page_bytes;
  const std::int64_t last = first + n * options.page_bytes;
  const std::int64_t whole_huge = (last / huge - (first + huge - 1) / huge) * huge;
  ASSERT_GT(whole_huge, 0);
  std::byte* addr = arena.segment_data(*seg);
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(addr) % static_cast<std::uintptr_t>(huge),
            static_cast<std::uintptr_t>(first % huge));
  EXPECT_EQ(pmd_mapped_kib(addr, n * options.page_bytes), whole_huge / 1024);
  fill(addr, n * options.page_bytes, 21);
  EXPECT_TRUE(matches(arena.page_data(PageId(3)), options.page_bytes, 21));
  // Dropped and restored onto its own pages in ascending order (what KvBlockAllocator::reclaim_pages
  // hands back), the segment is mapped as huge pages again; in descending order, it is not.
  auto dropped = arena.drop_segment(*seg);
  ASSERT_TRUE(dropped.ok());
  std::vector<PageId> reversed(dropped->rbegin(), dropped->rend());
  ASSERT_TRUE(arena.restore_segment(*seg, reversed).ok());
  EXPECT_EQ(pmd_mapped_kib(addr, n * options.page_bytes), 0);
  ASSERT_TRUE(arena.drop_segment(*seg).ok());
  ASSERT_TRUE(arena.restore_segment(*seg, *dropped).ok());
  EXPECT_EQ(pmd_mapped_kib(addr, n * options.page_bytes), whole_huge / 1024);
  EXPECT_TRUE(matches(addr, options.page_bytes, 21));
  EXPECT_TRUE(arena.verify_integrity().ok()) << arena.verify_integrity().to_string();
}

// True when the host's shmem THP policy is one under which the kernel itself may give a memfd
// huge pages (always, within_size, force): then an arena that did not ask can still have them.
bool host_gives_shmem_huge_pages() {
  std::ifstream in("/sys/kernel/mm/transparent_hugepage/shmem_enabled");
  std::string all;
  std::getline(in, all);
  for (const char* policy : {"[always]", "[within_size]", "[force]"}) {
    if (all.find(policy) != std::string::npos) return true;
  }
  return false;
}

TEST(DeviceArenaTest, OsPagesWhenHugePagesAreNotAskedForOrDoNotFit) {
  ArenaOptions off;
  off.capacity_bytes = 4 * kDefaultPageBytes;
  off.huge_pages = false;
  auto a = DeviceArena::create(off);
  ASSERT_TRUE(a.ok());
  EXPECT_EQ((*a)->huge_page_bytes(), 0);
  if (!host_gives_shmem_huge_pages()) {
    EXPECT_EQ(pmd_mapped_kib((*a)->page_data(PageId(0)), (*a)->capacity_bytes()), 0);
  }
  // Pages that neither divide a huge page nor are whole huge pages (3 OS pages) stay OS pages.
  const std::int64_t odd = 3 * kOsPage;
  auto small = DeviceArena::create(1024 * odd, odd);
  ASSERT_TRUE(small.ok());
  EXPECT_EQ((*small)->huge_page_bytes(), 0);
  auto seg = (*small)->create_segment("w", 5 * odd);
  ASSERT_TRUE(seg.ok());
  fill((*small)->segment_data(*seg), 5 * odd, 9);
  EXPECT_TRUE(matches((*small)->segment_data(*seg), 5 * odd, 9));
}

TEST(DeviceArenaTest, RejectsBadSizes) {
  EXPECT_EQ(DeviceArena::create(kOsPage * 4, kOsPage + 1).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(DeviceArena::create(kOsPage * 4, 0).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(DeviceArena::create(kOsPage - 1, kOsPage).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(DeviceArena::create(0).status().code(), StatusCode::kInvalidArgument);
}

TEST(DeviceArenaTest, CapacityIsReallyAllocated) {
  auto arena = DeviceArena::create(8 * kMiB);  // default 2 MiB pages
  ASSERT_TRUE(arena.ok()) << arena.status().to_string();
  EXPECT_EQ((*arena)->page_bytes(), kDefaultPageBytes);
  EXPECT_EQ((*arena)->num_pages(), 4);
  EXPECT_EQ((*arena)->capacity_bytes(), 8 * kMiB);
  EXPECT_GE((*arena)->resident_bytes(), 8 * kMiB);
  EXPECT_EQ((*arena)->num_free_pages(), 4);
  EXPECT_TRUE((*arena)->verify_integrity().ok());
}

TEST(DeviceArenaTest, CapacityRoundsDownToPages) {
  auto arena = make_arena(1);
  auto a = DeviceArena::create(5 * kOsPage + 17, kOsPage);
  ASSERT_TRUE(a.ok());
  EXPECT_EQ((*a)->num_pages(), 5);
  EXPECT_EQ((*a)->capacity_bytes(), 5 * kOsPage);
}

TEST(DeviceArenaTest, SegmentIsContiguousViewOfItsPages) {
  auto arena = make_arena(16);
  // Fragment the free list so the segment's pages are not consecutive.
  auto kv = arena->add_kv_pages(3);
  ASSERT_TRUE(kv.ok());
  const PageId kv_pages[] = {(*kv)[1]};
  ASSERT_TRUE(arena->release_kv_pages(kv_pages).ok());  // frees page 1, keeps 0 and 2 as KV
  const std::int64_t bytes = 3 * kOsPage + 100;
  auto seg = arena->create_segment("layer.0", bytes);
  ASSERT_TRUE(seg.ok()) << seg.status().to_string();
  EXPECT_EQ(arena->segment_num_pages(*seg), 4);
  const auto& pages = arena->segment_pages(*seg);
  ASSERT_EQ(pages.size(), 4u);
  EXPECT_EQ(pages[0].value, 1);  // lowest free first
  EXPECT_EQ(pages[1].value, 3);

  // Write through the contiguous mapping, read through page_data.
  std::byte* data = arena->segment_data(*seg);
  fill(data, bytes, 7);
  for (std::size_t k = 0; k < pages.size(); ++k) {
    const std::int64_t off = static_cast<std::int64_t>(k) * kOsPage;
    const std::int64_t n = std::min(kOsPage, bytes - off);
    std::vector<std::byte> expect(static_cast<std::size_t>(bytes));
    fill(expect.data(), bytes, 7);
    EXPECT_EQ(std::memcmp(arena->page_data(pages[k]), expect.data() + off, static_cast<std::size_t>(n)), 0);
  }
  // And the other way round.
  fill(arena->page_data(pages[2]), kOsPage, 99);
  EXPECT_TRUE(matches(data + 2 * kOsPage, kOsPage, 99));
  EXPECT_EQ(arena->page_owner(pages[0]).kind, PageOwnerKind::kParam);
  EXPECT_EQ(arena->page_owner(pages[0]).segment, *seg);
  EXPECT_TRUE(arena->verify_integrity().ok()) << arena->verify_integrity().to_string();
}

TEST(DeviceArenaTest, DropHandsPagesToKvWithoutCopying) {
  auto arena = make_arena(8);
  auto seg = arena->create_segment("layer.3", 3 * kOsPage);
  ASSERT_TRUE(seg.ok());
  fill(arena->segment_data(*seg), 3 * kOsPage, 3);
  const std::vector<PageId> before = arena->segment_pages(*seg);
  EXPECT_EQ(arena->num_param_pages(), 3);

  auto dropped = arena->drop_segment(*seg);
  ASSERT_TRUE(dropped.ok());
  EXPECT_EQ(*dropped, before);  // same physical pages, in mapping order
  EXPECT_TRUE(arena->segment_dropped(*seg));
  EXPECT_TRUE(arena->segment_pages(*seg).empty());
  EXPECT_EQ(arena->num_param_pages(), 0);
  EXPECT_EQ(arena->num_kv_pages(), 3);
  // The old bytes are still there, visible through page_data: nothing was copied or cleared.
  std::vector<std::byte> expect(static_cast<std::size_t>(3 * kOsPage));
  fill(expect.data(), 3 * kOsPage, 3);
  for (std::size_t k = 0; k < before.size(); ++k) {
    EXPECT_EQ(arena->page_owner(before[k]).kind, PageOwnerKind::kKv);
    EXPECT_EQ(std::memcmp(arena->page_data(before[k]), expect.data() + k * static_cast<std::size_t>(kOsPage),
                          static_cast<std::size_t>(kOsPage)), 0);
  }
  EXPECT_EQ(arena->drop_segment(*seg).status().code(), StatusCode::kFailedPrecondition);
  EXPECT_TRUE(arena->verify_integrity().ok());
}

TEST(DeviceArenaTest, DropRestoreRoundTripPreservesContentsAndAddress) {
  auto arena = make_arena(12);
  auto seg = arena->create_segment("layer.1", 2 * kOsPage + 5);
  ASSERT_TRUE(seg.ok());
  std::byte* addr = arena->segment_data(*seg);
  fill(addr, 2 * kOsPage + 5, 11);
  std::vector<std::byte> saved(addr, addr + 2 * kOsPage + 5);

  auto dropped = arena->drop_segment(*seg);
  ASSERT_TRUE(dropped.ok());
  // KV traffic overwrites the dropped pages.
  for (PageId p : *dropped) fill(arena->page_data(p), kOsPage, 1234);
  auto extra = arena->add_kv_pages(4);
  ASSERT_TRUE(extra.ok());

  // Restore onto different KV pages, in a scrambled order.
  std::vector<PageId> target = {(*extra)[3], (*dropped)[0], (*extra)[1]};
  ASSERT_TRUE(arena->restore_segment(*seg, target).ok());
  EXPECT_FALSE(arena->segment_dropped(*seg));
  EXPECT_EQ(arena->segment_data(*seg), addr);  // same virtual address as before the drop
  EXPECT_EQ(arena->segment_pages(*seg), target);
  // The caller writes the weights (pulled from a peer) through the contiguous mapping...
  std::memcpy(arena->segment_data(*seg), saved.data(), saved.size());
  // ...and they land on the chosen physical pages in order.
  EXPECT_EQ(std::memcmp(arena->page_data(target[1]), saved.data() + kOsPage, static_cast<std::size_t>(kOsPage)), 0);
  EXPECT_EQ(std::memcmp(arena->page_data(target[2]), saved.data() + 2 * kOsPage, 5), 0);
  // Or writes them page by page through page_data and reads the tensor back contiguously.
  fill(arena->page_data(target[0]), kOsPage, 5);
  EXPECT_TRUE(matches(arena->segment_data(*seg), kOsPage, 5));
  EXPECT_EQ(arena->num_param_pages(), 3);
  EXPECT_EQ(arena->num_kv_pages(), 4);
  EXPECT_EQ(arena->num_free_pages(), 5);
  EXPECT_TRUE(arena->verify_integrity().ok()) << arena->verify_integrity().to_string();
}

TEST(DeviceArenaTest, RestoreRejectsBadPagesAndChangesNothing) {
  auto arena = make_arena(8);
  auto a = arena->create_segment("a", 2 * kOsPage);
  auto b = arena->create_segment("b", kOsPage);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(arena->restore_segment(*a, arena->segment_pages(*a)).code(), StatusCode::kFailedPrecondition);
  auto dropped = arena->drop_segment(*a);
  ASSERT_TRUE(dropped.ok());
  const std::vector<PageId> one = {(*dropped)[0]};
  EXPECT_EQ(arena->restore_segment(*a, one).code(), StatusCode::kInvalidArgument);
  const std::vector<PageId> dup = {(*dropped)[0], (*dropped)[0]};
  EXPECT_EQ(arena->restore_segment(*a, dup).code(), StatusCode::kInvalidArgument);
  const std::vector<PageId> param = {(*dropped)[0], arena->segment_pages(*b)[0]};
  EXPECT_EQ(arena->restore_segment(*a, param).code(), StatusCode::kInvalidArgument);
  const std::vector<PageId> free_page = {(*dropped)[0], PageId(7)};
  EXPECT_EQ(arena->restore_segment(*a, free_page).code(), StatusCode::kInvalidArgument);
  const std::vector<PageId> outside = {(*dropped)[0], PageId(70)};
  EXPECT_EQ(arena->restore_segment(*a, outside).code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(arena->segment_dropped(*a));
  EXPECT_EQ(arena->num_kv_pages(), 2);
  EXPECT_TRUE(arena->verify_integrity().ok());
  EXPECT_EQ(arena->restore_segment(SegmentId(9), *dropped).code(), StatusCode::kNotFound);
}

TEST(DeviceArenaTest, OutOfPagesIsAStatus) {
  auto arena = make_arena(4);
  EXPECT_EQ(arena->create_segment("big", 5 * kOsPage).status().code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(arena->create_segment("zero", 0).status().code(), StatusCode::kInvalidArgument);
  ASSERT_TRUE(arena->create_segment("s", 3 * kOsPage).ok());
  EXPECT_EQ(arena->add_kv_pages(2).status().code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(arena->num_free_pages(), 1);
  ASSERT_TRUE(arena->add_kv_pages(1).ok());
  EXPECT_EQ(arena->num_free_pages(), 0);
  const std::vector<PageId> not_kv = {PageId(0)};
  EXPECT_EQ(arena->release_kv_pages(not_kv).code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(arena->verify_integrity().ok());
}

TEST(DeviceArenaTest, DestroySegmentFreesPages) {
  auto arena = make_arena(6);
  auto a = arena->create_segment("a", 2 * kOsPage);
  auto b = arena->create_segment("b", 2 * kOsPage);
  ASSERT_TRUE(a.ok() && b.ok());
  ASSERT_TRUE(arena->drop_segment(*b).ok());
  ASSERT_TRUE(arena->destroy_segment(*a).ok());
  ASSERT_TRUE(arena->destroy_segment(*b).ok());  // dropped: its pages stay KV
  EXPECT_FALSE(arena->segment_exists(*a));
  EXPECT_EQ(arena->destroy_segment(*a).code(), StatusCode::kNotFound);
  EXPECT_EQ(arena->num_free_pages(), 4);
  EXPECT_EQ(arena->num_kv_pages(), 2);
  EXPECT_TRUE(arena->segments().empty());
  EXPECT_TRUE(arena->verify_integrity().ok());
}

TEST(DeviceArenaTest, StatsByOwnerAndSegment) {
  auto arena = make_arena(10);
  auto a = arena->create_segment("embed", kOsPage + 1);
  auto b = arena->create_segment("layer.0", 3 * kOsPage);
  ASSERT_TRUE(a.ok() && b.ok());
  ASSERT_TRUE(arena->add_kv_pages(1).ok());
  ASSERT_TRUE(arena->drop_segment(*b).ok());
  const ArenaStats st = arena->stats();
  EXPECT_EQ(st.capacity_bytes, 10 * kOsPage);
  EXPECT_EQ(st.param_bytes, 2 * kOsPage);
  EXPECT_EQ(st.kv_bytes, 4 * kOsPage);
  EXPECT_EQ(st.free_bytes, 4 * kOsPage);
  EXPECT_EQ(st.param_bytes + st.kv_bytes + st.free_bytes, st.capacity_bytes);
  EXPECT_EQ(st.num_segments, 2);
  EXPECT_EQ(st.num_dropped_segments, 1);
  EXPECT_EQ(st.dropped_param_bytes, 3 * kOsPage);
  ASSERT_EQ(st.segments.size(), 2u);
  EXPECT_EQ(st.segments[0].name, "embed");
  EXPECT_EQ(st.segments[0].bytes, kOsPage + 1);
  EXPECT_EQ(st.segments[0].mapped_bytes, 2 * kOsPage);
  EXPECT_TRUE(st.segments[1].dropped);
  EXPECT_EQ(st.segments[1].mapped_bytes, 0);
}

TEST(DeviceArenaDeathTest, SegmentDataOfDroppedSegmentAborts) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  auto arena = make_arena(4);
  auto a = arena->create_segment("a", kOsPage);
  ASSERT_TRUE(a.ok());
  ASSERT_TRUE(arena->drop_segment(*a).ok());
  EXPECT_DEATH((void)arena->segment_data(*a), "dropped segment");
  EXPECT_DEATH((void)arena->page_data(PageId(4)), "outside arena");
}

// Random create / drop / restore / destroy / kv add / release, checking integrity and that every
// resident segment still holds the bytes last written to it.
TEST(DeviceArenaTest, RandomizedOpsKeepIntegrity) {
  std::mt19937_64 rng(42);
  auto arena = make_arena(64);
  std::map<std::int64_t, std::uint32_t> content;  // resident segment -> fill seed
  std::uint32_t next_seed = 1;
  for (int op = 0; op < 3000; ++op) {
    const int kind = static_cast<int>(rng() % 6);
    const std::vector<SegmentId> segs = arena->segments();
    if (kind == 0) {
      const std::int64_t bytes = 1 + static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(4 * kOsPage));
      auto s = arena->create_segment("s" + std::to_string(op), bytes);
      if (s.ok()) {
        fill(arena->segment_data(*s), bytes, next_seed);
        content[s->value] = next_seed++;
      } else {
        EXPECT_EQ(s.status().code(), StatusCode::kResourceExhausted);
        EXPECT_LT(arena->num_free_pages(), ceil_div(bytes, kOsPage));
      }
    } else if (kind == 1 && !segs.empty()) {
      const SegmentId s = segs[rng() % segs.size()];
      auto r = arena->drop_segment(s);
      EXPECT_EQ(r.ok(), content.count(s.value) == 1);
      content.erase(s.value);
    } else if (kind == 2 && !segs.empty()) {
      const SegmentId s = segs[rng() % segs.size()];
      if (!arena->segment_dropped(s)) continue;
      std::vector<PageId> kv = arena->kv_pages();
      std::shuffle(kv.begin(), kv.end(), rng);
      const auto need = static_cast<std::size_t>(arena->segment_num_pages(s));
      if (kv.size() < need) continue;
      kv.resize(need);
      ASSERT_TRUE(arena->restore_segment(s, kv).ok());
      fill(arena->segment_data(s), arena->segment_bytes(s), next_seed);
      content[s.value] = next_seed++;
    } else if (kind == 3 && !segs.empty()) {
      const SegmentId s = segs[rng() % segs.size()];
      ASSERT_TRUE(arena->destroy_segment(s).ok());
      content.erase(s.value);
    } else if (kind == 4) {
      const auto n = static_cast<std::int64_t>(rng() % 4);
      auto r = arena->add_kv_pages(n);
      if (r.ok()) {
        for (PageId p : *r) fill(arena->page_data(p), kOsPage, 777);
      }
    } else if (kind == 5) {
      std::vector<PageId> kv = arena->kv_pages();
      std::shuffle(kv.begin(), kv.end(), rng);
      kv.resize(std::min<std::size_t>(kv.size(), rng() % 4));
      ASSERT_TRUE(arena->release_kv_pages(kv).ok());
    }
    const Status st = arena->verify_integrity();
    ASSERT_TRUE(st.ok()) << "op " << op << ": " << st.to_string();
    for (const auto& [sid, seed] : content) {
      const SegmentId s(sid);
      ASSERT_TRUE(matches(arena->segment_data(s), arena->segment_bytes(s), seed)) << "segment " << sid;
    }
  }
}

}  // namespace
}  // namespace kun::memory
