// AVX2 + FMA + F16C: two 256-bit halves per 16-lane float vector.
#define NK_TARGET "avx2,fma,f16c"
#define NK_NS avx2
#define NK_ISA_AVX2 1
#include "isa_x86.h"
