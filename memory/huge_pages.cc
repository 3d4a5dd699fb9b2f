#include "memory/huge_pages.h"

#include <sys/mman.h>

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string_view>

namespace kun::memory {
namespace {

// MADV_COLLAPSE (Linux 6.1+) is newer than Debian 12's C library headers.
#ifdef MADV_COLLAPSE
constexpr int kMadvCollapse = MADV_COLLAPSE;
#else
constexpr int kMadvCollapse = 25;
#endif

}  // namespace

std::int64_t kernel_huge_page_bytes() {
  static const std::int64_t bytes = [] {
    std::ifstream in("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size");
    std::int64_t v = 0;
    if (!(in >> v) || v <= 0) return std::int64_t{0};
    return v;
  }();
  return bytes;
}

bool huge_pages_requested() {
  const char* v = std::getenv("KUN_HUGE_PAGES");
  return v == nullptr || std::string_view(v) != "0";
}

bool collapse_to_huge_pages(std::byte* addr, std::int64_t bytes, std::int64_t huge) {
  if (huge <= 0) return false;
  const std::int64_t whole = bytes / huge * huge;
  if (whole == 0) return false;
  auto* p = reinterpret_cast<volatile std::byte*>(addr);
  for (std::int64_t off = 0; off < whole; off += huge) p[off] = p[off];
  return map_as_huge_pages(addr, whole);
}

std::byte* allocate_on_huge_pages(std::int64_t bytes) {
  const std::int64_t huge = kernel_huge_page_bytes() > 0 ? kernel_huge_page_bytes() : std::int64_t{2} << 20;
  const std::int64_t rounded = bytes <= 0 ? huge : (bytes + huge - 1) / huge * huge;
  auto* p = static_cast<std::byte*>(std::aligned_alloc(static_cast<std::size_t>(huge), static_cast<std::size_t>(rounded)));
  if (p == nullptr) return nullptr;
  if (huge_pages_requested()) (void)::madvise(p, static_cast<std::size_t>(rounded), MADV_HUGEPAGE);
  std::memset(p, 0, static_cast<std::size_t>(rounded));
  return p;
}

bool map_as_huge_pages(std::byte* addr, std::int64_t bytes) {
  return ::madvise(addr, static_cast<std::size_t>(bytes), kMadvCollapse) == 0;
}

}  // namespace kun::memory
