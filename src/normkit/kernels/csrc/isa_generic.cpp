// The portable path: 16-byte vectors (SSE2 on x86-64, NEON on aarch64), libm's exact fma where
// the machine has no FMA unit.  The same bits as every other path (simd.h).
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#include "kernels.h"

namespace normkit {
namespace cpu {
namespace generic {
#define NK_ISA_GENERIC 1
#include "simd.h"
#include "rows.h"
#include "group_rows.h"
#include "quant.h"
}  // namespace generic

const Table* table_generic() {
  static const Table t = generic::with_quant(generic::with_group(generic::make_table("generic")));
  return &t;
}

}  // namespace cpu
}  // namespace normkit
