// GroupNorm's host side: tensors in, tensors out (group.cpp), registered in the extension
// module by host.cpp.  The kernels are group_rows.h's, one per instruction-set path (Table).
#pragma once

#include <pybind11/pybind11.h>

namespace normkit {
namespace cpu {

// Adds group_forward, group_backward and group_blocks to the module (cpu.py: group_forward ...).
void register_group(pybind11::module_& mod);

}  // namespace cpu
}  // namespace normkit
