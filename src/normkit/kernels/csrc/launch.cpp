// Launch and threads (see launch.h).
#include "launch.h"

#include <Python.h>
#include <pthread.h>

#include <ATen/Parallel.h>

#include <atomic>
#include <mutex>

namespace normkit {
namespace cpu {
namespace {

std::atomic<int64_t> g_par_min{1 << 15};
std::atomic<bool> g_used{false};
std::atomic<int64_t> g_regions{0};  // regions run (tests)
std::atomic<bool> g_serial_only{false};
std::mutex g_region;

void after_fork_in_child() {
  if (g_used.load()) g_serial_only.store(true);
}

struct AtFork {
  AtFork() { pthread_atfork(nullptr, nullptr, after_fork_in_child); }
} g_at_fork;

}  // namespace

int64_t parallel_min_elements() { return g_par_min.load(std::memory_order_relaxed); }
void set_parallel_min_elements(int64_t elements) { g_par_min.store(elements); }
bool parallel_used() { return g_used.load(); }
int64_t parallel_regions() { return g_regions.load(); }
bool serial_only() { return g_serial_only.load(); }

bool openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

bool run_units(int64_t units, bool parallel, const std::function<void(int64_t, int64_t)>& body) {
  if (parallel && units > 1 && openmp() && !g_serial_only.load(std::memory_order_relaxed) &&
      at::get_num_threads() > 1) {
    std::unique_lock<std::mutex> lock(g_region, std::try_to_lock);
    if (lock.owns_lock()) {
      g_used.store(true, std::memory_order_relaxed);
      g_regions.fetch_add(1, std::memory_order_relaxed);
      PyThreadState* saved = PyGILState_Check() ? PyEval_SaveThread() : nullptr;
      try {
        at::parallel_for(0, units, 1, body);
      } catch (...) {
        if (saved) PyEval_RestoreThread(saved);
        throw;
      }
      if (saved) PyEval_RestoreThread(saved);
      return true;
    }
  }
  body(0, units);
  return false;
}

}  // namespace cpu
}  // namespace normkit
