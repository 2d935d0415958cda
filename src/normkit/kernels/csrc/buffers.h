// Buffers: large outputs from a pool of earlier outputs' memory, transparent huge pages for new
// large buffers, the streamed-store threshold, and per-thread scratch.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace normkit {
namespace cpu {

// Outputs of at least this many elements (y, h, dx) come from the pool (see buffers.cpp).
constexpr int64_t kPoolMinElements = int64_t(1) << 20;

// An uninitialized contiguous CPU tensor of ``sizes``: from the pool at kPoolMinElements or
// more elements (a plain at::empty below that, or when the pool is full or off).
at::Tensor empty_output(at::IntArrayRef sizes, at::ScalarType dtype);

// Forget every pooled buffer (the memory of those no tensor uses is freed now).
void release_buffers();
int64_t pooled_buffers();  // how many the pool holds (tests)
int64_t advised_buffers();  // how many new buffers were advised for huge pages (tests)
int64_t pool_max_bytes();
void set_pool_max_bytes(int64_t bytes);

// Fresh outputs of at least this many bytes are written with streamed (non-temporal) stores.
int64_t stream_min_bytes();
void set_stream_min_bytes(int64_t bytes);

// Per-thread scratch that grows on demand, valid until this thread's next call with the same
// slot (launches use it only while they run; their worker threads read the caller's).
enum ScratchSlot {
  kScratchGamma = 0,
  kScratchBeta,
  kScratchPartials,
  kScratchRows,
  kScratchInvGamma,  // 1/γ of the memory-efficient backward
  kScratchSlots
};
void* scratch(ScratchSlot slot, int64_t nbytes);

// A per-thread row of n values 1 in the compute type (double when ``f64``, else float): the
// stand-in for an absent γ (x̂·1 is x̂).
const void* ones_row(int64_t n, bool f64);

}  // namespace cpu
}  // namespace normkit
