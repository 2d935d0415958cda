// AVX-512 with AVX512_BF16: as isa_avx512.cpp, with bfloat16 stores by vcvtneps2bf16 (simd.h).
#define NK_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c"
#define NK_NS avx512bf16
#define NK_ISA_AVX512 1
#define NK_BF16_CVT 1
#include "isa_x86.h"
