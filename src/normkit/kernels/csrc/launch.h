// Launch and threads: a launch's rows (or row blocks) run on torch's own intra-op threads
// (at::parallel_for) when it is big enough, else on the calling thread.  Rows never share a
// reduction and the backward's blocks depend on M and N only, so the split changes no bit.
#pragma once

#include <cstdint>
#include <functional>

namespace normkit {
namespace cpu {

// Launches of fewer elements run on the calling thread (a parallel region costs ~1-2 µs; 32K
// float32 elements are ~15 µs of work per core, and torch's own grain is 32K too).
int64_t parallel_min_elements();
void set_parallel_min_elements(int64_t elements);

// body(lo, hi) over [0, units) in contiguous ranges: several threads when ``parallel`` (the
// caller's size test) and torch allows more than one (at::get_num_threads), one region at a
// time (a launch that finds another thread's region running runs on its own thread), never in
// a child forked after this process ran a region (GNU OpenMP is not fork-safe: torch's own
// parallel ops hang there).  Without the GIL while the region runs.  Returns whether threads
// ran it.
bool run_units(int64_t units, bool parallel, const std::function<void(int64_t, int64_t)>& body);

bool parallel_used();  // this process has run a region
int64_t parallel_regions();  // how many (tests)
bool serial_only();    // forked after the parent had: every launch runs on the caller
bool openmp();         // built with OpenMP (else every launch runs on the caller)

}  // namespace cpu
}  // namespace normkit
