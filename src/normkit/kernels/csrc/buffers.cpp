// Buffers (see buffers.h).
#include "buffers.h"

#include <ATen/ops/empty.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/StorageImpl.h>

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <fstream>
#include <mutex>
#include <string>
#include <vector>

namespace normkit {
namespace cpu {
namespace {

// Large outputs reuse the buffers of earlier outputs that no tensor uses any more, as torch's
// CUDA allocator does.  A fresh 64 MiB tensor costs its page faults — the kernel zeroing every
// new page, ~3 ms on the 2-core CI machine, as much as the whole op — and torch's CPU allocator
// hands such sizes straight to mmap/munmap, so every call would pay again.  A pooled buffer is a
// storage the pool holds one reference to: it is free exactly when that is the only one left.
// Buffers are reused only for the same byte size; the pool holds at most NORMKIT_CPU_POOL_MB
// MiB (default: an eighth of the machine's memory, at most 2 GiB; 0 turns it off).  Pooled
// storages cannot be resized (resize_ raises), as a tensor from numpy's memory could not.
std::mutex g_pool_mutex;
std::vector<c10::Storage>* g_pool = new std::vector<c10::Storage>();  // never freed: exit order
int64_t g_pool_max = -1;

int64_t default_pool_max() {
  if (const char* mib = std::getenv("NORMKIT_CPU_POOL_MB")) return std::atoll(mib) << 20;
  long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
  int64_t memory = pages > 0 && page > 0 ? int64_t(pages) * page : int64_t(16) << 30;
  return std::min<int64_t>(int64_t(2) << 30, memory / 8);
}

std::atomic<int64_t> g_advised{0};  // buffers advised for huge pages (tests)

// Large new buffers are advised for transparent huge pages before the first write: faulting a
// 64 MiB output in 4 KiB at a time took 39 ms against 11 ms with MADV_HUGEPAGE (and 7 ms for
// the copy alone).  Only the 2 MiB-aligned interior is advised; a no-op where THP is off.
void advise_huge(void* p, int64_t nbytes) {
#if defined(MADV_HUGEPAGE)
  const uintptr_t huge = uintptr_t(2) << 20;
  uintptr_t start = (reinterpret_cast<uintptr_t>(p) + huge - 1) / huge * huge;
  uintptr_t end = (reinterpret_cast<uintptr_t>(p) + uintptr_t(nbytes)) / huge * huge;
  if (end > start) madvise(reinterpret_cast<void*>(start), end - start, MADV_HUGEPAGE);
  g_advised.fetch_add(1, std::memory_order_relaxed);
#else
  (void)p;
  (void)nbytes;
#endif
}

at::Tensor on_storage(const c10::Storage& storage, at::IntArrayRef sizes, at::ScalarType dtype) {
  auto t = at::detail::make_tensor<c10::TensorImpl>(
      c10::Storage(storage), c10::DispatchKeySet(c10::DispatchKey::CPU),
      c10::scalarTypeToTypeMeta(dtype));
  t.unsafeGetTensorImpl()->set_sizes_contiguous(sizes);
  return t;
}

// The streamed-store threshold: 3/4 of the last-level cache, as glibc's memcpy does (a plain
// store first reads the line it overwrites; streamed lines bypass the caches, so outputs that
// would still be cached for the next op are stored plainly).  NORMKIT_STREAM_MIN_MB overrides.
int64_t default_stream_min() {
  if (const char* mib = std::getenv("NORMKIT_STREAM_MIN_MB"))
    return int64_t(std::atof(mib) * double(1 << 20));
  int64_t size = 0;
  for (int index = 0; index < 8; index++) {
    std::ifstream f("/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) +
                    "/size");
    std::string text;
    if (!(f >> text) || text.empty()) continue;
    int64_t unit = 1;
    char last = text.back();
    if (last == 'K') unit = 1 << 10;
    if (last == 'M') unit = 1 << 20;
    if (last == 'G') unit = int64_t(1) << 30;
    try {
      size = std::max<int64_t>(size, std::stoll(text) * unit);
    } catch (...) {
    }
  }
  return (size ? size : int64_t(32) << 20) * 3 / 4;
}

std::atomic<int64_t> g_stream_min{-1};

}  // namespace

int64_t pool_max_bytes() {
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  if (g_pool_max < 0) g_pool_max = default_pool_max();
  return g_pool_max;
}

void set_pool_max_bytes(int64_t bytes) {
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  g_pool_max = bytes;
}

at::Tensor empty_output(at::IntArrayRef sizes, at::ScalarType dtype) {
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  if (numel < kPoolMinElements) return at::empty(sizes, at::TensorOptions().dtype(dtype));
  const int64_t nbytes = numel * int64_t(c10::elementSize(dtype));
  {
    std::lock_guard<std::mutex> lock(g_pool_mutex);
    if (g_pool_max < 0) g_pool_max = default_pool_max();
    int64_t pooled = 0;
    for (const c10::Storage& s : *g_pool) {
      if (int64_t(s.nbytes()) == nbytes && s.use_count() == 1) return on_storage(s, sizes, dtype);
      pooled += int64_t(s.nbytes());
    }
    if (pooled + nbytes <= g_pool_max) {
      c10::Allocator* alloc = c10::GetCPUAllocator();
      c10::Storage s(c10::make_intrusive<c10::StorageImpl>(
          c10::StorageImpl::use_byte_size_t(), nbytes, alloc->allocate(nbytes), alloc,
          /*resizable=*/false));
      advise_huge(s.mutable_data(), nbytes);
      g_pool->push_back(s);
      return on_storage(s, sizes, dtype);
    }
  }
  at::Tensor t = at::empty(sizes, at::TensorOptions().dtype(dtype));
  advise_huge(t.data_ptr(), nbytes);
  return t;
}

int64_t advised_buffers() { return g_advised.load(); }

void release_buffers() {
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  g_pool->clear();
}

int64_t pooled_buffers() {
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  return int64_t(g_pool->size());
}

int64_t stream_min_bytes() {
  int64_t v = g_stream_min.load(std::memory_order_relaxed);
  if (v < 0) {
    v = default_stream_min();
    g_stream_min.store(v);
  }
  return v;
}

void set_stream_min_bytes(int64_t bytes) { g_stream_min.store(bytes); }

void* scratch(ScratchSlot slot, int64_t nbytes) {
  thread_local std::vector<char> buffers[kScratchSlots];
  std::vector<char>& b = buffers[slot];
  // 64 bytes of slack: the start is aligned to 64 for the kernels' vectors
  if (int64_t(b.size()) < nbytes + 64) b.resize(std::max<int64_t>(nbytes + 64, 1 << 16));
  uintptr_t p = reinterpret_cast<uintptr_t>(b.data());
  return reinterpret_cast<void*>((p + 63) & ~uintptr_t(63));
}

const void* ones_row(int64_t n, bool f64) {
  thread_local std::vector<float> ones32;
  thread_local std::vector<double> ones64;
  if (f64) {
    if (int64_t(ones64.size()) < n) ones64.assign(std::max<int64_t>(n, 4096), 1.0);
    return ones64.data();
  }
  if (int64_t(ones32.size()) < n) ones32.assign(std::max<int64_t>(n, 4096), 1.0f);
  return ones32.data();
}

}  // namespace cpu
}  // namespace normkit
