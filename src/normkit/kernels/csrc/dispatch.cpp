// Runtime choice of the instruction-set path (see dispatch.h).
#include "dispatch.h"

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <mutex>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#define NK_X86 1
#endif

namespace normkit {
namespace cpu {
namespace {

struct Features {
  bool avx2 = false, fma = false, f16c = false;
  bool avx512 = false;  // F, BW, VL, DQ, and the OS saves the 512-bit state
  bool avx512bf16 = false;
};

#if defined(NK_X86)
uint64_t xgetbv0() {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (uint64_t(hi) << 32) | lo;
}
#endif

Features detect() {
  Features f;
#if defined(NK_X86)
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = c & (1u << 27), avx = c & (1u << 28);
  f.fma = c & (1u << 12);
  f.f16c = c & (1u << 29);
  if (!osxsave || !avx) return Features{};
  const uint64_t xcr0 = xgetbv0();
  if ((xcr0 & 0x6) != 0x6) return Features{};  // the OS does not save the AVX state
  if (__get_cpuid_max(0, nullptr) < 7) return f;
  __cpuid_count(7, 0, a, b, c, d);
  f.avx2 = b & (1u << 5);
  const bool avx512f = b & (1u << 16), avx512dq = b & (1u << 17), avx512bw = b & (1u << 30),
             avx512vl = b & (1u << 31);
  f.avx512 = avx512f && avx512dq && avx512bw && avx512vl && (xcr0 & 0xE0) == 0xE0;
  __cpuid_count(7, 1, a, b, c, d);
  f.avx512bf16 = f.avx512 && (a & (1u << 5));
#endif
  return f;
}

const Features& features() {
  static const Features f = detect();
  return f;
}

struct Path {
  const char* name;
  const Table* (*table)();
  bool (*runs)(const Features&);
};

const Path kPaths[] = {
    {"avx512bf16", table_avx512bf16,
     [](const Features& f) { return f.avx512bf16 && f.fma && f.f16c; }},
    {"avx512", table_avx512, [](const Features& f) { return f.avx512 && f.fma && f.f16c; }},
    {"avx2", table_avx2, [](const Features& f) { return f.avx2 && f.fma && f.f16c; }},
    {"generic", table_generic, [](const Features&) { return true; }},
};

// A path's table is built on first use, by code compiled for that path: so it is asked for only
// on a machine that runs the path (or an AVX-512 table would be built with AVX-512 instructions
// on a machine without them).  Paths this build lacks (non-x86: only "generic") return null.
bool usable(const Path& p) { return p.runs(features()) && p.table() != nullptr; }

std::atomic<const Table*> g_table{nullptr};
std::mutex g_mutex;

const Table* best() {
  for (const Path& p : kPaths)
    if (usable(p)) return p.table();
  return table_generic();
}

}  // namespace

const Table* kernels() {
  const Table* t = g_table.load(std::memory_order_acquire);
  if (t != nullptr) return t;
  std::lock_guard<std::mutex> lock(g_mutex);
  t = g_table.load(std::memory_order_relaxed);
  if (t == nullptr) {
    const char* env = std::getenv("NORMKIT_CPU_ISA");
    std::string want = env ? env : "auto";
    t = best();
    if (want != "auto" && !want.empty()) {
      for (const Path& p : kPaths)
        if (want == p.name && usable(p)) t = p.table();
      // an unknown or unsupported name keeps the best path; the Python side warns about it
    }
    g_table.store(t, std::memory_order_release);
  }
  return t;
}

std::vector<std::string> available_isas() {
  std::vector<std::string> names;
  for (const Path& p : kPaths)
    if (usable(p)) names.emplace_back(p.name);
  return names;
}

bool set_isa(const std::string& name) {
  const Table* t = nullptr;
  if (name == "auto") {
    t = best();
  } else {
    for (const Path& p : kPaths)
      if (name == p.name && usable(p)) t = p.table();
  }
  if (t == nullptr) return false;
  std::lock_guard<std::mutex> lock(g_mutex);
  g_table.store(t, std::memory_order_release);
  return true;
}

std::string cpu_features() {
  const Features& f = features();
  std::string s;
  auto add = [&](bool on, const char* name) {
    if (!on) return;
    if (!s.empty()) s += ' ';
    s += name;
  };
  add(f.avx2, "avx2");
  add(f.fma, "fma");
  add(f.f16c, "f16c");
  add(f.avx512, "avx512(f,bw,vl,dq)");
  add(f.avx512bf16, "avx512bf16");
  return s;
}

}  // namespace cpu
}  // namespace normkit
