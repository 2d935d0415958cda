// torch's dtypes as the kernels' storage kinds (kernels.h): the one mapping every host file
// (host.cpp, group.cpp) uses.
#pragma once

#include <c10/core/ScalarType.h>

#include "kernels.h"

namespace normkit {
namespace cpu {

// The storage kind of a torch dtype, or -1 where the kernels take none.
inline int kind_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kFloat32;
    case at::kDouble: return kFloat64;
    case at::kBFloat16: return kBFloat16;
    case at::kHalf: return kFloat16;
    default: return -1;
  }
}

}  // namespace cpu
}  // namespace normkit
