// Huge pages for device memory: what the kernel offers and how a memfd range gets them, and the
// committed, huge-page-aligned memfd mapping a device arena (and the benches that stand in for
// one) is made of.
//
// A decode step streams every weight once; on 4 KiB pages llama-350m decodes 1.07-1.11x slower
// than on 2 MiB huge pages (memory/README.md). Hosts often have transparent huge pages for shmem
// off (shmem_enabled = never, which a memfd inherits), but madvise(MADV_COLLAPSE) (Linux 6.1+)
// still collapses a shared memfd mapping into huge pages.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "common/status.h"

namespace kun::memory {

// The PMD huge page size the kernel reports (2 MiB on x86-64), 0 without transparent huge pages.
std::int64_t kernel_huge_page_bytes();

// False when KUN_HUGE_PAGES=0 (keep OS pages, for side-by-side measurements); true otherwise.
bool huge_pages_requested();

// Backs the whole huge pages of [addr, addr + bytes) of a shared memfd mapping (addr huge-page
// aligned, and so is its file offset) with huge pages: one write per huge page gives each a
// resident page, MADV_COLLAPSE replaces them with huge pages (zero-filling the rest, so call it on
// memory that holds nothing yet or whose contents it keeps: it copies them). False when the kernel
// refuses (older than 6.1, THP off, no huge page free) or the range holds no whole huge page; the
// range then stays on OS pages, which is correct, only slower.
bool collapse_to_huge_pages(std::byte* addr, std::int64_t bytes, std::int64_t huge);

// Private memory of at least `bytes` (rounded up to whole huge pages), zeroed, starting on a huge
// page boundary and on huge pages where the kernel gives them (MADV_HUGEPAGE before the first
// touch; OS pages when KUN_HUGE_PAGES=0 or the kernel has none free). Release it with std::free.
// nullptr when the host cannot provide it. For buffers that stand in for device memory (benches).
std::byte* allocate_on_huge_pages(std::int64_t bytes);

// madvise(MADV_COLLAPSE) on [addr, addr + bytes): maps huge pages a memfd already has with huge
// page-table entries where the kernel did not. True on success; a refusal is only slower.
bool map_as_huge_pages(std::byte* addr, std::int64_t bytes);

// `bytes` of inaccessible address space (PROT_NONE) that starts `phase` past a multiple of
// `align` (both multiples of the OS page, phase < align), to map a memfd over with MAP_FIXED;
// nullptr when the address space is short. Release it with munmap.
std::byte* reserve_address_space(std::int64_t bytes, std::int64_t align, std::int64_t phase = 0);

// A memfd of `bytes` (a multiple of the OS page) mapped shared and read-write in full, and
// allocated for real: fallocate, or a write to every OS page on a kernel without it. With
// huge > 0 (a huge page size) the mapping starts on a huge-page boundary and, where the kernel
// agrees, the memory is huge pages (collapse_to_huge_pages before fallocate); huge_page_bytes
// then says so, 0 means OS pages. The caller owns fd and base (munmap, close).
struct CommittedMemfd {
  int fd = -1;
  std::byte* base = nullptr;
  std::int64_t huge_page_bytes = 0;
};
StatusOr<CommittedMemfd> create_committed_memfd(const std::string& name, std::int64_t bytes, std::int64_t huge);

}  // namespace kun::memory
