// Which instruction-set path of the row kernels runs: the best one this machine has, or the one
// NORMKIT_CPU_ISA (or set_isa) asks for.  Every path gives the same bits (simd.h).
#pragma once

#include <string>
#include <vector>

#include "kernels.h"

namespace normkit {
namespace cpu {

// The table of the path in use (chosen on first use; set_isa changes it).
const Table* kernels();

// Names of the paths this machine can run, best first: "avx512bf16", "avx512", "avx2",
// "generic" (where built and supported).
std::vector<std::string> available_isas();

// Use path ``name`` ("auto": the best available).  Returns false (and changes nothing) when
// the machine cannot run it or this build has no such path.
bool set_isa(const std::string& name);

// The CPU features the choice is made from, as "avx2 fma f16c ..." (for status and bug reports).
std::string cpu_features();

}  // namespace cpu
}  // namespace normkit
