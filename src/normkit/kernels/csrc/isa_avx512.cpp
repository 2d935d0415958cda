// AVX-512 (F, BW, VL, DQ) with FMA and F16C: one 512-bit register per 16-lane float vector.
#define NK_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"
#define NK_NS avx512
#define NK_ISA_AVX512 1
#include "isa_x86.h"
