// The CPU output cache (output_cache.h): an at::Allocator whose large blocks
// return to a free list, by size, when their storage is freed.
#include "common/output_cache.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <cstdlib>
#include <list>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
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

class OutputCache final : public c10::Allocator {
 public:
  static OutputCache& get() {
    // Never destroyed: tensors freed while the process exits still return
    // their blocks here.
    static OutputCache* cache = new OutputCache(cache_limit_bytes());
    return *cache;
  }

  c10::DataPtr allocate(size_t n) override {
    if (limit_ == 0 || n < kMinCachedBytes) return c10::GetCPUAllocator()->allocate(n);
    const size_t bytes = (n + kPage - 1) / kPage * kPage;
    void* ptr = take(bytes);
    if (ptr == nullptr) {
      ptr = c10::alloc_cpu(bytes);
      advise_huge_pages(ptr, bytes);
    }
    std::unique_lock<std::mutex> lock(mutex_);
    size_of_[ptr] = bytes;
    allocated_ += bytes;
    report(ptr, static_cast<int64_t>(bytes));
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
    std::vector<void*> blocks;
    size_t freed = 0;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      for (const auto& [bytes, ptr] : free_) blocks.push_back(ptr);
      free_.clear();
      freed = cached_;
      cached_ = 0;
    }
    for (void* ptr : blocks) c10::free_cpu(ptr);
    return static_cast<int64_t>(freed);
  }

 private:
  explicit OutputCache(size_t limit) : limit_(limit) {}

  // The most recently freed block of exactly `bytes`, or null.
  void* take(size_t bytes) {
    std::unique_lock<std::mutex> lock(mutex_);
    for (auto it = free_.begin(); it != free_.end(); ++it) {
      if (it->first != bytes) continue;
      void* ptr = it->second;
      free_.erase(it);
      cached_ -= bytes;
      return ptr;
    }
    return nullptr;
  }

  static void release(void* ptr) { get().give_back(ptr); }

  void give_back(void* ptr) {
    std::vector<void*> to_free;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      const auto it = size_of_.find(ptr);
      const size_t bytes = it->second;
      size_of_.erase(it);
      allocated_ -= bytes;
      report(ptr, -static_cast<int64_t>(bytes));
      if (bytes > limit_) {  // larger than the whole cache: the others stay
        to_free.push_back(ptr);
      } else {
        free_.emplace_front(bytes, ptr);
        cached_ += bytes;
      }
      while (cached_ > limit_) {  // the least recently freed go first
        cached_ -= free_.back().first;
        to_free.push_back(free_.back().second);
        free_.pop_back();
      }
    }
    for (void* block : to_free) c10::free_cpu(block);
  }

  void report(void* ptr, int64_t delta) const {
    if (c10::memoryProfilingEnabled())
      c10::reportMemoryUsageToProfiler(ptr, delta, allocated_, allocated_ + cached_,
                                       c10::Device(c10::DeviceType::CPU));
  }

  const size_t limit_;
  std::mutex mutex_;
  std::list<std::pair<size_t, void*>> free_;  // most recently freed first
  std::unordered_map<void*, size_t> size_of_;
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
