// One x86 path of the row kernels: included by isa_avx2.cpp, isa_avx512.cpp and
// isa_avx512bf16.cpp after they define NK_TARGET (the target attribute of every function in
// the file), NK_NS (a namespace of its own, and the path's name: table_<NK_NS>() returns its
// table) and NK_ISA_AVX2 or NK_ISA_AVX512.  Elsewhere than x86-64 the table is null.
//
// Only this translation unit's own functions take the target: the headers before the pragma
// (standard library, immintrin.h) keep the machine-independent one, so no function that another
// path might call is compiled with instructions that path's machine lacks.
#include "kernels.h"

#define NK_CAT2(a, b) a##b
#define NK_CAT(a, b) NK_CAT2(a, b)
#define NK_STRING2(x) #x
#define NK_STRING(x) NK_STRING2(x)

#if defined(__x86_64__)
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#define NK_STR(x) #x
#define NK_PRAGMA(x) _Pragma(NK_STR(x))
#if defined(__clang__)
NK_PRAGMA(clang attribute push(__attribute__((target(NK_TARGET))), apply_to = function))
#else
#pragma GCC push_options
NK_PRAGMA(GCC target(NK_TARGET))
#endif

namespace normkit {
namespace cpu {
namespace NK_NS {
#include "simd.h"
#include "rows.h"
#include "group_rows.h"
#include "quant.h"
}  // namespace NK_NS
}  // namespace cpu
}  // namespace normkit

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace normkit {
namespace cpu {
const Table* NK_CAT(table_, NK_NS)() {
  // built on first use, by code compiled for this path: dispatch.cpp asks only on a machine
  // that runs it
  static const Table t =
      NK_NS::with_quant(NK_NS::with_group(NK_NS::make_table(NK_STRING(NK_NS))));
  return &t;
}
}  // namespace cpu
}  // namespace normkit

#else  // not x86-64: no such path here
namespace normkit {
namespace cpu {
const Table* NK_CAT(table_, NK_NS)() { return nullptr; }
}  // namespace cpu
}  // namespace normkit
#endif
