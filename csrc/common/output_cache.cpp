// The CPU output cache (output_cache.h): an at::Allocator whose large blocks
// return to a free list, by size, when their storage is freed.
#include "common/output_cache.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>
#include <iterator>
#include <list>
#include <mutex>
#include <unordered_map>

#ifdef __linux__
#include <sys/mman.h>
#endif
#ifdef __GLIBC__
#include <malloc.h>
#endif
#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif

#include "common/message.h"

namespace surgellm {
namespace {

constexpr size_t kMinCachedBytes = size_t(128) << 10;  // glibc's least mmap threshold
constexpr size_t kPage = 4096;

size_t cache_limit_bytes() {
  const char* env = std::getenv("SURGELLM_CPU_OUTPUT_CACHE_MB");
  if (env == nullptr || *env == '\0') return size_t(1024) << 20;
  char* end = nullptr;
  const long long mb = std::strtoll(env, &end, 10);
  SURGELLM_CHECK_VALUE(end != env && *end == '\0' && mb >= 0,
                       "SURGELLM_CPU_OUTPUT_CACHE_MB must be a whole number of megabytes >= 0 "
                       "(0 turns the CPU output cache off), got '",
                       env, "'");
  // (past what a size_t holds in bytes: no limit, not a wrapped one)
  if (static_cast<unsigned long long>(mb) > (SIZE_MAX >> 20)) return SIZE_MAX;
  return size_t(mb) << 20;
}

// A fresh block of 32 MiB or more is advised onto transparent huge pages:
// glibc maps it on its own, and its first touch then faults once per 2 MiB
// instead of once per 4 KiB (about 5 ms instead of 30 per 100 MB here).
void advise_huge_pages(void* ptr, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  if (bytes < (size_t(32) << 20)) return;
  const auto begin = reinterpret_cast<uintptr_t>(ptr);
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = (begin + bytes) & ~(kHugePage - 1);
  // Advice only: where the system offers no huge pages the block keeps 4 KiB pages.
  if (last > first) (void)madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)ptr;
  (void)bytes;
#endif
}

// Every block it handed out is a node of one of two lists -- held by a
// tensor, or unused (most recently freed first) -- found by its address. A
// freed block's node moves between the lists (std::list::splice), so the
// deleter, which must not throw, allocates nothing.
class OutputCache final : public c10::Allocator {
 public:
  static OutputCache& get() {
    // Never destroyed: tensors freed while the process exits still return
    // their blocks here.
    static OutputCache* cache = [] {
      auto* made = new OutputCache(cache_limit_bytes());
#if defined(__unix__) || defined(__APPLE__)
      // A fork while another thread holds the lock (the ops run without the
      // GIL) would leave it held in the child by a thread the child does not
      // have: the lock is taken across fork and released on both sides.
      pthread_atfork([] { get().mutex_.lock(); }, [] { get().mutex_.unlock(); },
                     [] { get().mutex_.unlock(); });
#endif
      return made;
    }();
    return *cache;
  }

  c10::DataPtr allocate(size_t n) override {
    if (n < kMinCachedBytes) return c10::GetCPUAllocator()->allocate(n);
    const size_t bytes = (n + kPage - 1) / kPage * kPage;
    if (bytes > limit_) {  // never kept (a limit of 0: the cache is off)
      c10::DataPtr block = retrying([&] { return c10::GetCPUAllocator()->allocate(n); });
      advise_huge_pages(block.get(), n);
      return block;
    }
    void* ptr = take(bytes);
    if (ptr == nullptr) ptr = fresh(bytes);
    return {ptr, ptr, &OutputCache::release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, size_t count) const override {
    default_copy_data(dest, src, count);
  }

  OutputCacheStats stats() {
    std::unique_lock<std::mutex> lock(mutex_);
    return {static_cast<int64_t>(cached_), static_cast<int64_t>(allocated_)};
  }

  int64_t empty() {
    std::list<Block> blocks;
    size_t freed = 0;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      for (const Block& b : unused_) where_.erase(b.ptr);
      blocks.splice(blocks.end(), unused_);
      freed = cached_;
      cached_ = 0;
    }
    for (const Block& b : blocks) c10::free_cpu(b.ptr);
#ifdef __GLIBC__
    // glibc keeps freed blocks below its mmap threshold (which rises to 32
    // MiB as large blocks are freed) in its heap: hand them to the system.
    if (freed > 0) malloc_trim(0);
#endif
    return static_cast<int64_t>(freed);
  }

 private:
  struct Block {
    void* ptr;
    size_t bytes;
  };

  explicit OutputCache(size_t limit) : limit_(limit) {}

  // The most recently freed block of exactly `bytes`, now held; or null.
  void* take(size_t bytes) {
    std::unique_lock<std::mutex> lock(mutex_);
    for (auto it = unused_.begin(); it != unused_.end(); ++it) {
      if (it->bytes != bytes) continue;
      held_.splice(held_.begin(), unused_, it);
      cached_ -= bytes;
      allocated_ += bytes;
      report(it->ptr, static_cast<int64_t>(bytes));
      return it->ptr;
    }
    return nullptr;
  }

  // alloc() from the system; if it has no memory, the unused blocks go
  // back to it first and alloc() is tried again.
  template <typename Alloc>
  auto retrying(const Alloc& alloc) -> decltype(alloc()) {
    try {
      return alloc();
    } catch (const c10::Error&) {
      if (empty() == 0) throw;
      return alloc();
    }
  }

  // A new block from the system, now held.
  void* fresh(size_t bytes) {
    void* ptr = retrying([&] { return c10::alloc_cpu(bytes); });
    advise_huge_pages(ptr, bytes);
    try {
      std::unique_lock<std::mutex> lock(mutex_);
      held_.push_front({ptr, bytes});
      try {
        where_.emplace(ptr, held_.begin());
      } catch (...) {
        held_.pop_front();
        throw;
      }
      allocated_ += bytes;
      report(ptr, static_cast<int64_t>(bytes));
    } catch (...) {
      c10::free_cpu(ptr);
      throw;
    }
    return ptr;
  }

  static void release(void* ptr) { get().give_back(ptr); }

  void give_back(void* ptr) {
    std::list<Block> to_free;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      const auto found = where_.find(ptr);
      TORCH_INTERNAL_ASSERT(found != where_.end(), "a block the CPU output cache did not give");
      const auto it = found->second;
      const size_t bytes = it->bytes;
      allocated_ -= bytes;
      report(ptr, -static_cast<int64_t>(bytes));
      unused_.splice(unused_.begin(), held_, it);
      cached_ += bytes;
      while (cached_ > limit_) {  // the least recently freed go first
        const auto oldest = std::prev(unused_.end());
        cached_ -= oldest->bytes;
        where_.erase(oldest->ptr);
        to_free.splice(to_free.end(), unused_, oldest);
      }
    }
    for (const Block& b : to_free) c10::free_cpu(b.ptr);
  }

  // To torch's profiler, as c10's CPU allocator reports its own (a failure
  // to report must not fail a free).
  void report(void* ptr, int64_t delta) const noexcept {
    try {
      if (c10::memoryProfilingEnabled())
        c10::reportMemoryUsageToProfiler(ptr, delta, allocated_, allocated_ + cached_,
                                         c10::Device(c10::DeviceType::CPU));
    } catch (...) {
    }
  }

  const size_t limit_;
  std::mutex mutex_;
  std::list<Block> held_, unused_;
  std::unordered_map<void*, std::list<Block>::iterator> where_;
  size_t cached_ = 0, allocated_ = 0;
};

}  // namespace

c10::Allocator* cpu_block_cache() { return &OutputCache::get(); }

at::Tensor empty_cpu_output(at::IntArrayRef sizes, at::IntArrayRef strides, at::ScalarType dtype) {
  return at::detail::empty_strided_generic(sizes, strides, cpu_block_cache(),
                                           c10::DispatchKeySet(c10::DispatchKey::CPU), dtype);
}

OutputCacheStats output_cache_stats() { return OutputCache::get().stats(); }

int64_t empty_output_cache() { return OutputCache::get().empty(); }

}  // namespace surgellm
