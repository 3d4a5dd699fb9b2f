#include "memory/device_arena.h"

#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <sstream>
#include <utility>

#include "memory/huge_pages.h"

namespace kun::memory {
namespace {

std::string errno_text(int err) { return std::string(std::strerror(err)); }

std::int64_t os_page_bytes() { return static_cast<std::int64_t>(::sysconf(_SC_PAGESIZE)); }

}  // namespace

const char* page_owner_kind_name(PageOwnerKind kind) {
  switch (kind) {
    case PageOwnerKind::kFree: return "free";
    case PageOwnerKind::kParam: return "param";
    case PageOwnerKind::kKv: return "kv";
  }
  return "?";
}

StatusOr<std::unique_ptr<DeviceArena>> DeviceArena::create(std::int64_t capacity_bytes,
                                                           std::int64_t page_bytes) {
  ArenaOptions options;
  options.capacity_bytes = capacity_bytes;
  options.page_bytes = page_bytes;
  return create(options);
}

StatusOr<std::unique_ptr<DeviceArena>> DeviceArena::create(const ArenaOptions& options) {
  const std::int64_t os_page = os_page_bytes();
  if (options.page_bytes <= 0 || options.page_bytes % os_page != 0) {
    return invalid_argument("device arena: page_bytes " + std::to_string(options.page_bytes) +
                            " must be a positive multiple of the OS page size " +
                            std::to_string(os_page));
  }
  const std::int64_t num_pages = options.capacity_bytes / options.page_bytes;
  if (options.capacity_bytes <= 0 || num_pages == 0) {
    return invalid_argument("device arena: capacity_bytes " + std::to_string(options.capacity_bytes) +
                            " holds no page of " + std::to_string(options.page_bytes) + " bytes");
  }
  const std::int64_t bytes = num_pages * options.page_bytes;

  // Huge pages where a page is whole huge pages or a huge page is whole pages. The whole-arena
  // mapping then starts on a huge page boundary, so address and file offset agree modulo the huge
  // page size (and segments are placed to agree too, see create_segment).
  const std::int64_t huge = kernel_huge_page_bytes();
  const bool huge_eligible = options.huge_pages && huge_pages_requested() && huge > 0 &&
                             (options.page_bytes % huge == 0 || huge % options.page_bytes == 0);
  auto memfd = create_committed_memfd(options.name, bytes, huge_eligible ? huge : 0);
  if (!memfd.ok()) return memfd.status().with_context("device arena");
  return std::unique_ptr<DeviceArena>(
      new DeviceArena(memfd->fd, memfd->base, num_pages, options.page_bytes, memfd->huge_page_bytes));
}

DeviceArena::DeviceArena(int fd, std::byte* base, std::int64_t num_pages, std::int64_t page_bytes,
                         std::int64_t huge_page_bytes)
    : fd_(fd), base_(base), num_pages_(num_pages), page_bytes_(page_bytes), huge_page_bytes_(huge_page_bytes) {
  owners_.assign(static_cast<std::size_t>(num_pages), PageOwner{});
  for (std::int64_t p = 0; p < num_pages; ++p) free_pages_.insert(free_pages_.end(), p);
}

DeviceArena::~DeviceArena() {
  for (const Segment& seg : segments_) {
    if (seg.base != nullptr) ::munmap(seg.base, static_cast<std::size_t>(seg.num_pages * page_bytes_));
  }
  if (base_ != nullptr) ::munmap(base_, static_cast<std::size_t>(num_pages_ * page_bytes_));
  if (fd_ >= 0) ::close(fd_);
}

std::int64_t DeviceArena::resident_bytes() const {
  struct stat st {};
  KUN_CHECK(::fstat(fd_, &st) == 0) << "fstat on the arena memfd: " << errno_text(errno);
  return static_cast<std::int64_t>(st.st_blocks) * 512;
}

const DeviceArena::Segment& DeviceArena::segment(SegmentId id) const {
  KUN_CHECK(id.value >= 0 && id.value < static_cast<std::int64_t>(segments_.size()))
      << "unknown segment " << id;
  const Segment& seg = segments_[static_cast<std::size_t>(id.value)];
  KUN_CHECK(!seg.destroyed) << "segment " << id << " (" << seg.name << ") was destroyed";
  return seg;
}

DeviceArena::Segment& DeviceArena::segment(SegmentId id) {
  return const_cast<Segment&>(std::as_const(*this).segment(id));
}

void DeviceArena::map_segment_pages(const Segment& seg) {
  std::size_t i = 0;
  while (i < seg.pages.size()) {
    // Coalesce a run of consecutive physical pages into one mapping; MAP_POPULATE builds the page
    // tables now (the pages are already allocated) so the first kernel pass does not fault.
    std::size_t j = i + 1;
    while (j < seg.pages.size() && seg.pages[j].value == seg.pages[j - 1].value + 1) ++j;
    const std::int64_t run_bytes = static_cast<std::int64_t>(j - i) * page_bytes_;
    std::byte* addr = seg.base + static_cast<std::int64_t>(i) * page_bytes_;
    void* r = ::mmap(addr, static_cast<std::size_t>(run_bytes), PROT_READ | PROT_WRITE,
                     MAP_SHARED | MAP_FIXED | MAP_POPULATE, fd_, static_cast<off_t>(seg.pages[i].value * page_bytes_));
    KUN_CHECK(r == addr) << "mapping segment " << seg.name << " pages failed: " << errno_text(errno);
    // The memfd's pages are huge already, and MAP_POPULATE maps them with one page-table entry
    // per huge page on the kernels tried (6.18; the arena test checks it in smaps); MADV_COLLAPSE
    // asks for that where a kernel maps them with 512 OS-page entries, over the whole huge pages
    // the run lines up (none when its address and file offset disagree modulo a huge page, as
    // for pages restored out of order: no call then). A refusal is only slower.
    if (huge_page_bytes_ > 0) {
      const auto h = static_cast<std::uintptr_t>(huge_page_bytes_);
      const auto va = reinterpret_cast<std::uintptr_t>(addr);
      const auto off = static_cast<std::uintptr_t>(seg.pages[i].value * page_bytes_);
      const std::uintptr_t first = (va + h - 1) / h * h;
      const std::uintptr_t last = (va + static_cast<std::uintptr_t>(run_bytes)) / h * h;
      if (va % h == off % h && first < last) {
        (void)map_as_huge_pages(reinterpret_cast<std::byte*>(first), static_cast<std::int64_t>(last - first));
      }
    }
    i = j;
  }
}

void DeviceArena::unmap_segment_pages(const Segment& seg) {
  void* r = ::mmap(seg.base, static_cast<std::size_t>(seg.num_pages * page_bytes_), PROT_NONE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
  KUN_CHECK(r == seg.base) << "unmapping segment " << seg.name << " failed: " << errno_text(errno);
}

StatusOr<SegmentId> DeviceArena::create_segment(std::string name, std::int64_t bytes) {
  if (bytes <= 0) {
    return invalid_argument("segment " + name + ": size must be positive, got " + std::to_string(bytes));
  }
  const std::int64_t n = ceil_div(bytes, page_bytes_);
  if (n > num_free_pages()) {
    return resource_exhausted("segment " + name + " needs " + std::to_string(n) + " pages (" +
                              std::to_string(bytes) + " bytes), only " +
                              std::to_string(num_free_pages()) + " free");
  }
  // With huge pages, the range starts where its address agrees with the first page's file offset
  // modulo the huge page size: the huge pages inside a run of consecutive pages are then mapped
  // as huge pages (all of them when pages are whole huge pages).
  const std::int64_t first_offset = *free_pages_.begin() * page_bytes_;
  std::byte* reserve = huge_page_bytes_ > 0
                           ? reserve_address_space(n * page_bytes_, huge_page_bytes_, first_offset % huge_page_bytes_)
                           : reserve_address_space(n * page_bytes_, os_page_bytes());
  if (reserve == nullptr) {
    return resource_exhausted("segment " + name + ": cannot reserve address space: " + errno_text(errno));
  }
  const SegmentId id(static_cast<std::int64_t>(segments_.size()));
  Segment seg;
  seg.name = std::move(name);
  seg.bytes = bytes;
  seg.num_pages = n;
  seg.base = reserve;
  for (std::int64_t k = 0; k < n; ++k) {
    const std::int64_t p = *free_pages_.begin();
    free_pages_.erase(free_pages_.begin());
    owners_[static_cast<std::size_t>(p)] = PageOwner{PageOwnerKind::kParam, id};
    seg.pages.emplace_back(p);
  }
  num_param_pages_ += n;
  map_segment_pages(seg);
  segments_.push_back(std::move(seg));
  return id;
}

Status DeviceArena::destroy_segment(SegmentId id) {
  if (!segment_exists(id)) return not_found("destroy_segment: no segment " + std::to_string(id.value));
  Segment& seg = segment(id);
  for (PageId p : seg.pages) {
    owners_[static_cast<std::size_t>(p.value)] = PageOwner{};
    free_pages_.insert(p.value);
  }
  num_param_pages_ -= static_cast<std::int64_t>(seg.pages.size());
  seg.pages.clear();
  ::munmap(seg.base, static_cast<std::size_t>(seg.num_pages * page_bytes_));
  seg.base = nullptr;
  seg.destroyed = true;
  return ok_status();
}

std::byte* DeviceArena::segment_data(SegmentId id) const {
  const Segment& seg = segment(id);
  KUN_CHECK(!seg.dropped) << "segment_data of dropped segment " << id << " (" << seg.name << ")";
  return seg.base;
}

std::int64_t DeviceArena::segment_bytes(SegmentId id) const { return segment(id).bytes; }
std::int64_t DeviceArena::segment_num_pages(SegmentId id) const { return segment(id).num_pages; }
const std::string& DeviceArena::segment_name(SegmentId id) const { return segment(id).name; }
bool DeviceArena::segment_dropped(SegmentId id) const { return segment(id).dropped; }
const std::vector<PageId>& DeviceArena::segment_pages(SegmentId id) const { return segment(id).pages; }

bool DeviceArena::segment_exists(SegmentId id) const {
  return id.value >= 0 && id.value < static_cast<std::int64_t>(segments_.size()) &&
         !segments_[static_cast<std::size_t>(id.value)].destroyed;
}

std::vector<SegmentId> DeviceArena::segments() const {
  std::vector<SegmentId> out;
  for (std::size_t i = 0; i < segments_.size(); ++i) {
    if (!segments_[i].destroyed) out.emplace_back(static_cast<std::int64_t>(i));
  }
  return out;
}

StatusOr<std::vector<PageId>> DeviceArena::drop_segment(SegmentId id) {
  if (!segment_exists(id)) return not_found("drop_segment: no segment " + std::to_string(id.value));
  Segment& seg = segment(id);
  if (seg.dropped) return failed_precondition("segment " + seg.name + " is already dropped");
  unmap_segment_pages(seg);
  std::vector<PageId> pages = std::move(seg.pages);
  seg.pages.clear();
  for (PageId p : pages) {
    owners_[static_cast<std::size_t>(p.value)] = PageOwner{PageOwnerKind::kKv, SegmentId()};
    kv_pages_.insert(p.value);
  }
  num_param_pages_ -= static_cast<std::int64_t>(pages.size());
  seg.dropped = true;
  return pages;
}

Status DeviceArena::restore_segment(SegmentId id, std::span<const PageId> pages) {
  if (!segment_exists(id)) return not_found("restore_segment: no segment " + std::to_string(id.value));
  Segment& seg = segment(id);
  if (!seg.dropped) return failed_precondition("segment " + seg.name + " is not dropped");
  if (static_cast<std::int64_t>(pages.size()) != seg.num_pages) {
    return invalid_argument("restore of segment " + seg.name + " needs " + std::to_string(seg.num_pages) +
                            " pages, got " + std::to_string(pages.size()));
  }
  std::set<std::int64_t> seen;
  for (PageId p : pages) {
    if (!valid_page(p)) return invalid_argument("restore of segment " + seg.name + ": no page " + std::to_string(p.value));
    if (owners_[static_cast<std::size_t>(p.value)].kind != PageOwnerKind::kKv) {
      return invalid_argument("restore of segment " + seg.name + ": page " + std::to_string(p.value) +
                              " is " + page_owner_kind_name(owners_[static_cast<std::size_t>(p.value)].kind) +
                              ", not kv");
    }
    if (!seen.insert(p.value).second) {
      return invalid_argument("restore of segment " + seg.name + ": page " + std::to_string(p.value) +
                              " given twice");
    }
  }
  seg.pages.assign(pages.begin(), pages.end());
  for (PageId p : pages) {
    kv_pages_.erase(p.value);
    owners_[static_cast<std::size_t>(p.value)] = PageOwner{PageOwnerKind::kParam, id};
  }
  num_param_pages_ += seg.num_pages;
  seg.dropped = false;
  map_segment_pages(seg);
  return ok_status();
}

StatusOr<std::vector<PageId>> DeviceArena::add_kv_pages(std::int64_t n) {
  if (n < 0) return invalid_argument("add_kv_pages: negative count " + std::to_string(n));
  if (n > num_free_pages()) {
    return resource_exhausted("add_kv_pages: " + std::to_string(n) + " pages wanted, " +
                              std::to_string(num_free_pages()) + " free");
  }
  std::vector<PageId> out;
  out.reserve(static_cast<std::size_t>(n));
  for (std::int64_t k = 0; k < n; ++k) {
    const std::int64_t p = *free_pages_.begin();
    free_pages_.erase(free_pages_.begin());
    owners_[static_cast<std::size_t>(p)] = PageOwner{PageOwnerKind::kKv, SegmentId()};
    kv_pages_.insert(p);
    out.emplace_back(p);
  }
  return out;
}

Status DeviceArena::release_kv_pages(std::span<const PageId> pages) {
  std::set<std::int64_t> seen;
  for (PageId p : pages) {
    if (!valid_page(p)) return invalid_argument("release_kv_pages: no page " + std::to_string(p.value));
    if (owners_[static_cast<std::size_t>(p.value)].kind != PageOwnerKind::kKv) {
      return invalid_argument("release_kv_pages: page " + std::to_string(p.value) + " is " +
                              page_owner_kind_name(owners_[static_cast<std::size_t>(p.value)].kind) +
                              ", not kv");
    }
    if (!seen.insert(p.value).second) {
      return invalid_argument("release_kv_pages: page " + std::to_string(p.value) + " given twice");
    }
  }
  for (PageId p : pages) {
    kv_pages_.erase(p.value);
    owners_[static_cast<std::size_t>(p.value)] = PageOwner{};
    free_pages_.insert(p.value);
  }
  return ok_status();
}

std::vector<PageId> DeviceArena::kv_pages() const {
  std::vector<PageId> out;
  out.reserve(kv_pages_.size());
  for (std::int64_t p : kv_pages_) out.emplace_back(p);
  return out;
}

std::byte* DeviceArena::page_data(PageId page) const {
  KUN_CHECK(valid_page(page)) << "page " << page << " outside arena of " << num_pages_ << " pages";
  return base_ + page.value * page_bytes_;
}

PageOwner DeviceArena::page_owner(PageId page) const {
  KUN_CHECK(valid_page(page)) << "page " << page << " outside arena of " << num_pages_ << " pages";
  return owners_[static_cast<std::size_t>(page.value)];
}

Status DeviceArena::verify_integrity() const {
  // Count, for every page, the places that claim it.
  std::vector<int> claims(static_cast<std::size_t>(num_pages_), 0);
  auto fail = [](const std::string& m) { return internal_error("arena integrity: " + m); };
  for (std::int64_t p : free_pages_) {
    if (p < 0 || p >= num_pages_) return fail("free list holds page " + std::to_string(p) + " outside the arena");
    ++claims[static_cast<std::size_t>(p)];
    if (owners_[static_cast<std::size_t>(p)].kind != PageOwnerKind::kFree) {
      return fail("page " + std::to_string(p) + " is on the free list but owned by " +
                  page_owner_kind_name(owners_[static_cast<std::size_t>(p)].kind));
    }
  }
  for (std::int64_t p : kv_pages_) {
    if (p < 0 || p >= num_pages_) return fail("kv set holds page " + std::to_string(p) + " outside the arena");
    ++claims[static_cast<std::size_t>(p)];
    if (owners_[static_cast<std::size_t>(p)].kind != PageOwnerKind::kKv) {
      return fail("page " + std::to_string(p) + " is in the kv set but owned by " +
                  page_owner_kind_name(owners_[static_cast<std::size_t>(p)].kind));
    }
  }
  std::int64_t param_pages = 0;
  for (std::size_t s = 0; s < segments_.size(); ++s) {
    const Segment& seg = segments_[s];
    const std::string who = "segment " + std::to_string(s) + " (" + seg.name + ")";
    if (seg.destroyed || seg.dropped) {
      if (!seg.pages.empty()) return fail(who + " is dropped or destroyed but lists pages");
      continue;
    }
    if (static_cast<std::int64_t>(seg.pages.size()) != seg.num_pages) {
      return fail(who + " lists " + std::to_string(seg.pages.size()) + " pages, needs " +
                  std::to_string(seg.num_pages));
    }
    for (PageId p : seg.pages) {
      if (!valid_page(p)) return fail(who + " lists page " + std::to_string(p.value) + " outside the arena");
      ++claims[static_cast<std::size_t>(p.value)];
      const PageOwner& o = owners_[static_cast<std::size_t>(p.value)];
      if (o.kind != PageOwnerKind::kParam || o.segment.value != static_cast<std::int64_t>(s)) {
        return fail(who + " lists page " + std::to_string(p.value) + " whose owner is " +
                    page_owner_kind_name(o.kind) + " segment " + std::to_string(o.segment.value));
      }
    }
    param_pages += seg.num_pages;
  }
  for (std::int64_t p = 0; p < num_pages_; ++p) {
    const int c = claims[static_cast<std::size_t>(p)];
    if (c != 1) {
      return fail("page " + std::to_string(p) + " (owner " +
                  page_owner_kind_name(owners_[static_cast<std::size_t>(p)].kind) + ") is in " +
                  std::to_string(c) + " places");
    }
  }
  if (param_pages != num_param_pages_) {
    return fail("param page count " + std::to_string(num_param_pages_) + " but segments hold " +
                std::to_string(param_pages));
  }
  const std::int64_t total = param_pages + num_kv_pages() + num_free_pages();
  if (total != num_pages_) {
    return fail("param " + std::to_string(param_pages) + " + kv " + std::to_string(num_kv_pages()) +
                " + free " + std::to_string(num_free_pages()) + " pages != capacity " +
                std::to_string(num_pages_) + " pages");
  }
  return ok_status();
}

void DeviceArena::check_integrity() const {
  const Status s = verify_integrity();
  KUN_CHECK(s.ok()) << s.to_string();
}

ArenaStats DeviceArena::stats() const {
  ArenaStats st;
  st.capacity_bytes = capacity_bytes();
  st.page_bytes = page_bytes_;
  st.num_pages = num_pages_;
  st.free_bytes = num_free_pages() * page_bytes_;
  st.param_bytes = num_param_pages_ * page_bytes_;
  st.kv_bytes = num_kv_pages() * page_bytes_;
  for (std::size_t s = 0; s < segments_.size(); ++s) {
    const Segment& seg = segments_[s];
    if (seg.destroyed) continue;
    SegmentStats ss;
    ss.id = SegmentId(static_cast<std::int64_t>(s));
    ss.name = seg.name;
    ss.bytes = seg.bytes;
    ss.num_pages = seg.num_pages;
    ss.mapped_bytes = static_cast<std::int64_t>(seg.pages.size()) * page_bytes_;
    ss.dropped = seg.dropped;
    ++st.num_segments;
    if (seg.dropped) {
      ++st.num_dropped_segments;
      st.dropped_param_bytes += seg.num_pages * page_bytes_;
    }
    st.segments.push_back(std::move(ss));
  }
  return st;
}

}  // namespace kun::memory
