#include "memory/huge_pages.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
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

std::string errno_text(int err) { return std::string(std::strerror(err)); }

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

std::byte* reserve_address_space(std::int64_t bytes, std::int64_t align, std::int64_t phase) {
  // Over-reserves by `align` and gives the slack back.
  const auto total = static_cast<std::size_t>(bytes + align);
  void* r = ::mmap(nullptr, total, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (r == MAP_FAILED) return nullptr;
  const auto start = reinterpret_cast<std::uintptr_t>(r);
  const auto a = static_cast<std::uintptr_t>(align);
  std::uintptr_t aligned = start / a * a + static_cast<std::uintptr_t>(phase);
  if (aligned < start) aligned += a;
  const std::size_t head = aligned - start;
  const std::size_t tail = total - head - static_cast<std::size_t>(bytes);
  if (head > 0) ::munmap(r, head);
  if (tail > 0) ::munmap(reinterpret_cast<void*>(aligned + static_cast<std::uintptr_t>(bytes)), tail);
  return reinterpret_cast<std::byte*>(aligned);
}

StatusOr<CommittedMemfd> create_committed_memfd(const std::string& name, std::int64_t bytes, std::int64_t huge) {
  const int fd = ::memfd_create(name.c_str(), MFD_CLOEXEC);
  if (fd < 0) return resource_exhausted("memfd_create failed: " + errno_text(errno));
  if (::ftruncate(fd, static_cast<off_t>(bytes)) != 0) {
    const int err = errno;
    ::close(fd);
    return resource_exhausted("ftruncate to " + std::to_string(bytes) + " bytes failed: " + errno_text(err));
  }
  const auto os_page = static_cast<std::int64_t>(::sysconf(_SC_PAGESIZE));
  std::byte* reserve = reserve_address_space(bytes, huge > 0 ? huge : os_page);
  void* base = reserve == nullptr ? MAP_FAILED
                                  : ::mmap(reserve, static_cast<std::size_t>(bytes), PROT_READ | PROT_WRITE,
                                           MAP_SHARED | MAP_FIXED, fd, 0);
  if (base == MAP_FAILED) {
    const int err = errno;
    if (reserve != nullptr) ::munmap(reserve, static_cast<std::size_t>(bytes));
    ::close(fd);
    return resource_exhausted("mmap of " + std::to_string(bytes) + " bytes failed: " + errno_text(err));
  }
  CommittedMemfd m;
  m.fd = fd;
  m.base = static_cast<std::byte*>(base);
  // Huge pages first (each then holds zeros), so that fallocate has nothing left to do; where the
  // kernel refuses, fallocate allocates OS pages.
  if (huge > 0 && collapse_to_huge_pages(m.base, bytes, huge)) m.huge_page_bytes = huge;
  // Allocate for real: fallocate on a memfd (shmem) allocates every page.
  const bool allocated = ::fallocate(fd, 0, 0, static_cast<off_t>(bytes)) == 0;
  if (!allocated && errno != EOPNOTSUPP && errno != ENOSYS) {
    const int err = errno;
    ::munmap(base, static_cast<std::size_t>(bytes));
    ::close(fd);
    return resource_exhausted("cannot allocate " + std::to_string(bytes) + " bytes: " + errno_text(err));
  }
  if (!allocated) {
    // No fallocate on this kernel: touch every OS page so the memory is really committed.
    auto* p = static_cast<volatile char*>(base);
    for (std::int64_t off = 0; off < bytes; off += os_page) p[off] = 0;
  }
  return m;
}

}  // namespace kun::memory
