// Storage for the ops' large CPU outputs (y, dx, z, dh, ds, dlogits) and the
// CPU kernels' per-chunk partials, kept for reuse when freed.
//
// Why: glibc gives a block of this size fresh pages from the kernel on most
// allocations (at or above its mmap threshold, or after trimming the heap),
// and the first write to each 4 KiB page faults. For one 12 MB output those
// faults took as long as the kernel's own pass, and whether they happened
// varied from process to process. A training loop frees an output and asks
// for one of the same size a step later: a cached block is already mapped.
//
// Blocks of at least 128 KiB are cached, keyed by their size; at most
// SURGELLM_CPU_OUTPUT_CACHE_MB megabytes (default 1024; 0 turns the cache
// off) lie unused in it, the least recently freed going back to the system
// first; a block larger than that comes from c10's CPU allocator and goes
// back to it. When the system has no memory for a new block, every unused
// one goes back first. surgellm_kernels.empty_cpu_cache() gives them back.
// Blocks of 32 MiB or more are advised onto transparent huge pages.
// Allocations and frees are reported to torch's profiler like torch's own.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace surgellm {

// The cache, as an allocator (c10::Allocator::allocate) for kernels' scratch.
c10::Allocator* cpu_block_cache();

// An uninitialized CPU tensor of these sizes, strides and dtype.
at::Tensor empty_cpu_output(at::IntArrayRef sizes, at::IntArrayRef strides, at::ScalarType dtype);

struct OutputCacheStats {
  int64_t cached_bytes;     // in unused blocks, ready for reuse
  int64_t allocated_bytes;  // in blocks that tensors hold
};

OutputCacheStats output_cache_stats();

// Gives every unused block back to the system; returns how many bytes.
int64_t empty_output_cache();

}  // namespace surgellm
