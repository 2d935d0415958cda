// 16-lane vectors for the row kernels, one spelling per instruction set.
//
// Included by each isa_*.cpp inside a namespace of its own (normkit::cpu::<isa>), after the
// target pragma of that instruction set and after NK_ISA is defined: NK_ISA_GENERIC (any
// machine: 16-byte vectors, SSE2 or NEON, and libm's exact fma where there is no FMA unit),
// NK_ISA_AVX2 (AVX2, FMA, F16C: two 256-bit halves), NK_ISA_AVX512 (AVX-512 F/BW/VL/DQ: one
// 512-bit register of floats).  NK_BF16_CVT adds AVX512_BF16's vcvtneps2bf16 for bfloat16 stores.
//
// Why the bits are the same on every path: a vector of 16 compute values (float, or double for
// float64 input) is an array of native vectors, and every operation here is either lane-wise
// IEEE arithmetic (+, −, ×, fma: one rounding each, whatever the register width) or an exact
// conversion, or one fixed tree of additions (vsum).  No fast-math flag is set anywhere
// (-ffp-contract=off keeps the compiler from fusing a product into an addition on its own), so
// the compiler may only make changes that keep every bit.  The 16-lane order of the row sums
// (rows.h) is part of the contract; the native width is not.
//
// Storage kinds: float32, float64, and bfloat16 / float16 as 16-bit words, converted in
// registers (never an extra pass over memory).  Conversions round to nearest even, bit for bit
// as torch's .to() for finite values; a NaN stays a NaN (bfloat16: the quiet NaN 0x7FC0).

#if !defined(NK_ISA_GENERIC) && !defined(NK_ISA_AVX2) && !defined(NK_ISA_AVX512)
#error "define one NK_ISA_* before including simd.h"
#endif

#define NK_INLINE inline __attribute__((always_inline))

#if defined(NK_ISA_AVX512)
constexpr int LF = 16;  // float lanes per native vector
#elif defined(NK_ISA_AVX2)
constexpr int LF = 8;
#else
constexpr int LF = 4;
#endif
constexpr int W = 16;  // lanes of a compute vector: the contract's width
constexpr int KF = W / LF;  // native float vectors per compute vector
constexpr int LD = LF / 2;  // double lanes per native vector
constexpr int KD = W / LD;
constexpr int64_t STREAM_ALIGN = 64;  // bytes: where a row's streamed vectors start
// Columns of 16 lanes a grouped backward pass takes at once (rows.h: Columns): 4 (a row of 64
// float32 in one visit), also on AVX2, where its 12 vectors of dγ/dβ sums and γ spill some.
constexpr int COLS = LF == 16 ? 4 : (LF == 8 ? 4 : 1);
// Whether a 16-bit load widens in one shuffle (AVX-512BW's vpermw, F16C's vcvtph2ps beside it)
// rather than a widening and a shift.
constexpr bool kFastWidening = LF == 16;

typedef float NF __attribute__((vector_size(4 * LF)));
typedef double ND __attribute__((vector_size(4 * LF)));
typedef uint32_t NU __attribute__((vector_size(4 * LF)));
typedef int32_t NI __attribute__((vector_size(4 * LF)));
typedef uint16_t NW __attribute__((vector_size(2 * LF)));  // LF 16-bit words

struct VF {
  NF p[KF];
};
struct VD {
  ND p[KD];
};

template <class C>
struct VecOf;
template <>
struct VecOf<float> {
  using type = VF;
};
template <>
struct VecOf<double> {
  using type = VD;
};
template <class C>
using Vec = typename VecOf<C>::type;

// ------------------------------------------------------------------------------------------
// Lane-wise arithmetic
// ------------------------------------------------------------------------------------------

#define NK_LANEWISE(V, K, op)                                      \
  NK_INLINE V operator op(V a, V b) {                              \
    V r;                                                           \
    for (int k = 0; k < K; k++) r.p[k] = a.p[k] op b.p[k];         \
    return r;                                                      \
  }
NK_LANEWISE(VF, KF, +)
NK_LANEWISE(VF, KF, -)
NK_LANEWISE(VF, KF, *)
NK_LANEWISE(VD, KD, +)
NK_LANEWISE(VD, KD, -)
NK_LANEWISE(VD, KD, *)
#undef NK_LANEWISE

NK_INLINE VF operator+(VF a, float s) {
  for (int k = 0; k < KF; k++) a.p[k] = a.p[k] + s;
  return a;
}
NK_INLINE VF operator-(VF a, float s) {
  for (int k = 0; k < KF; k++) a.p[k] = a.p[k] - s;
  return a;
}
NK_INLINE VF operator*(VF a, float s) {
  for (int k = 0; k < KF; k++) a.p[k] = a.p[k] * s;
  return a;
}
NK_INLINE VD operator+(VD a, double s) {
  for (int k = 0; k < KD; k++) a.p[k] = a.p[k] + s;
  return a;
}
NK_INLINE VD operator-(VD a, double s) {
  for (int k = 0; k < KD; k++) a.p[k] = a.p[k] - s;
  return a;
}
NK_INLINE VD operator*(VD a, double s) {
  for (int k = 0; k < KD; k++) a.p[k] = a.p[k] * s;
  return a;
}

template <class C>
NK_INLINE Vec<C> vzero();
template <>
NK_INLINE VF vzero<float>() {
  VF r;
  for (int k = 0; k < KF; k++) r.p[k] = NF{};
  return r;
}
template <>
NK_INLINE VD vzero<double>() {
  VD r;
  for (int k = 0; k < KD; k++) r.p[k] = ND{};
  return r;
}

template <class C>
NK_INLINE Vec<C> vsplat(C s) {  // s in every lane (−0 stays −0: no arithmetic)
  Vec<C> r;
  for (auto& p : r.p)
    for (int i = 0; i < int(sizeof(p) / sizeof(C)); i++) p[i] = s;
  return r;
}

// a·b + c rounded once (IEEE fusedMultiplyAdd).
NK_INLINE float sfma(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
NK_INLINE double sfma(double a, double b, double c) { return __builtin_fma(a, b, c); }

NK_INLINE NF nfma(NF a, NF b, NF c) {
#if defined(NK_ISA_AVX512)
  return (NF)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(NK_ISA_AVX2)
  return (NF)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  NF r;
  for (int i = 0; i < LF; i++) r[i] = __builtin_fmaf(a[i], b[i], c[i]);
  return r;
#endif
}
NK_INLINE ND nfma(ND a, ND b, ND c) {
#if defined(NK_ISA_AVX512)
  return (ND)_mm512_fmadd_pd((__m512d)a, (__m512d)b, (__m512d)c);
#elif defined(NK_ISA_AVX2)
  return (ND)_mm256_fmadd_pd((__m256d)a, (__m256d)b, (__m256d)c);
#else
  ND r;
  for (int i = 0; i < LD; i++) r[i] = __builtin_fma(a[i], b[i], c[i]);
  return r;
#endif
}
NK_INLINE VF vfma(VF a, VF b, VF c) {
  for (int k = 0; k < KF; k++) c.p[k] = nfma(a.p[k], b.p[k], c.p[k]);
  return c;
}
NK_INLINE VD vfma(VD a, VD b, VD c) {
  for (int k = 0; k < KD; k++) c.p[k] = nfma(a.p[k], b.p[k], c.p[k]);
  return c;
}
NK_INLINE VF vfma(VF a, float b, VF c) { return vfma(a, vsplat<float>(b), c); }
NK_INLINE VD vfma(VD a, double b, VD c) { return vfma(a, vsplat<double>(b), c); }
NK_INLINE VF vfma(float a, VF b, VF c) { return vfma(vsplat<float>(a), b, c); }
NK_INLINE VD vfma(double a, VD b, VD c) { return vfma(vsplat<double>(a), b, c); }
NK_INLINE VF vfma(VF a, VF b, float c) { return vfma(a, b, vsplat<float>(c)); }
NK_INLINE VD vfma(VD a, VD b, double c) { return vfma(a, b, vsplat<double>(c)); }

// ------------------------------------------------------------------------------------------
// The lanes' sum: lane k + lane k+8, then k + k+4, k + k+2, k + k+1 — one fixed tree.
// Lane l of a compute vector is lane l % L of native vector l / L, so the first levels of the
// tree add whole native vectors, the rest shuffle within one.
// ------------------------------------------------------------------------------------------

template <class N, int L>
NK_INLINE auto tree_within(N v) {
  // the sum of the L lanes of v by the tree (k + k+L/2, ...)
  if constexpr (L == 1) {
    return v[0];
  } else if constexpr (L == 2) {
    return v[0] + v[1];
  } else if constexpr (L == 4) {
    typedef decltype(v[0]) E0;
    typedef typename std::remove_reference<E0>::type E;
    typedef E H __attribute__((vector_size(2 * sizeof(E))));
    H h = __builtin_shufflevector(v, v, 0, 1) + __builtin_shufflevector(v, v, 2, 3);
    return h[0] + h[1];
  } else if constexpr (L == 8) {
    typedef typename std::remove_reference<decltype(v[0])>::type E;
    typedef E Q __attribute__((vector_size(4 * sizeof(E))));
    Q q = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
    return tree_within<Q, 4>(q);
  } else {
    typedef typename std::remove_reference<decltype(v[0])>::type E;
    typedef E O __attribute__((vector_size(8 * sizeof(E))));
    O o = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
          __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    return tree_within<O, 8>(o);
  }
}

template <class N, int K, int L>
NK_INLINE auto tree(const N* p) {
  if constexpr (K == 1) {
    return tree_within<N, L>(p[0]);
  } else {
    // lanes k and k + 8 (of 16) are native vectors j and j + K/2
    N h[K / 2];
    for (int j = 0; j < K / 2; j++) h[j] = p[j] + p[j + K / 2];
    return tree<N, K / 2, L>(h);
  }
}

NK_INLINE float vsum(VF v) { return tree<NF, KF, LF>(v.p); }
NK_INLINE double vsum(VD v) { return tree<ND, KD, LD>(v.p); }

// ------------------------------------------------------------------------------------------
// Storage kinds and conversions
// ------------------------------------------------------------------------------------------

enum Kind { kF32 = 0, kF64 = 1, kBF16 = 2, kF16 = 3 };

template <int K>
struct Storage;
template <>
struct Storage<kF32> {
  using T = float;
  using C = float;
};
template <>
struct Storage<kF64> {
  using T = double;
  using C = double;
};
template <>
struct Storage<kBF16> {
  using T = uint16_t;
  using C = float;
};
template <>
struct Storage<kF16> {
  using T = uint16_t;
  using C = float;
};

template <int K>
using ST = typename Storage<K>::T;
template <int K>
using CT = typename Storage<K>::C;  // the compute type of a storage kind

NK_INLINE uint32_t f32_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}
NK_INLINE float bits_f32(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

// bfloat16: the high half of a float32.  Rounding adds 0x7FFF plus the lowest kept bit and
// drops 16 bits; a NaN becomes the quiet NaN 0x7FC0 (rounding its bits could carry it into
// Inf).  Tested against torch's conversion on every float32 rounding case.
NK_INLINE float bf16_to_f32(uint16_t w) { return bits_f32(uint32_t(w) << 16); }
NK_INLINE uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_bits(f);
  uint32_t rne = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return f == f ? uint16_t(rne) : uint16_t(0x7FC0);
}

// float16 without F16C (the generic path): exact widening; rounding to nearest even with
// subnormal results and overflow to Inf, as vcvtps2ph does (a NaN becomes a quiet NaN).
NK_INLINE float f16_to_f32_soft(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
  if (e == 0x1F) return bits_f32(sign | 0x7F800000u | (m << 13));
  if (e == 0) {
    float v = float(m) * 5.9604644775390625e-08f;  // m · 2^-24, exact
    return sign ? -v : v;
  }
  return bits_f32(sign | ((e + 112u) << 23) | (m << 13));
}
NK_INLINE uint16_t f32_to_f16_soft(float f) {
  uint32_t u = f32_bits(f);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7FFFFFFFu;
  uint32_t h;
  if (a >= 0x7F800000u) {
    h = a > 0x7F800000u ? 0x7E00u : 0x7C00u;  // NaN, Inf
  } else if (a >= 0x477FF000u) {
    h = 0x7C00u;  // ≥ 65520 rounds to Inf
  } else if (a < 0x38800000u) {
    // below 2^-14: a float16 subnormal (or 0); adding 0.5 rounds it, to nearest even, to a
    // multiple of 2^-24 in the low bits of 0.5's significand
    h = f32_bits(bits_f32(a) + 0.5f) - 0x3F000000u;
  } else {
    uint32_t odd = (a >> 13) & 1u;
    h = (a + 0xC8000FFFu + odd) >> 13;  // rebias the exponent (−112), round to nearest even
  }
  return uint16_t(sign | h);
}

NK_INLINE float f16_to_f32(uint16_t h) {
#if defined(NK_ISA_GENERIC)
  return f16_to_f32_soft(h);
#else
  return _cvtsh_ss(h);
#endif
}
NK_INLINE uint16_t f32_to_f16(float f) {
#if defined(NK_ISA_GENERIC)
  return f32_to_f16_soft(f);
#else
  return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#endif
}

// Scalars: storage → compute value (exact), compute value → storage (rounded).
template <int K, class C>
NK_INLINE C sload(const void* p, int64_t j) {
  const ST<K>* q = static_cast<const ST<K>*>(p) + j;
  if constexpr (K == kBF16) {
    return C(bf16_to_f32(*q));
  } else if constexpr (K == kF16) {
    return C(f16_to_f32(*q));
  } else {
    static_assert(sizeof(C) >= sizeof(ST<K>), "never a silent narrowing");
    return C(*q);
  }
}

template <int K, class C>
NK_INLINE ST<K> sconvert(C v) {
  if constexpr (K == kBF16) {
    return f32_to_bf16(float(v));  // float64 → float32 → bfloat16, as the numba kernels did
  } else if constexpr (K == kF16) {
    return f32_to_f16(float(v));
  } else {
    return ST<K>(v);
  }
}

template <int K, class C>
NK_INLINE void sstore(void* p, int64_t j, C v) {
  static_cast<ST<K>*>(p)[j] = sconvert<K, C>(v);
}

template <int K, class C>
NK_INLINE C sround(C v) {  // v rounded to storage K and back
  if constexpr (sizeof(ST<K>) >= sizeof(C)) {
    return v;  // exact
  } else {
    ST<K> s = sconvert<K, C>(v);
    return sload<K, C>(&s, 0);
  }
}

// ------------------------------------------------------------------------------------------
// Native vectors: unaligned loads and stores (one instruction each), and the 16-bit conversions
// ------------------------------------------------------------------------------------------

// Unaligned native vectors.  Not may_alias: a vector of floats aliases floats (and nothing
// else), so the compiler keeps pointers and counters in registers across the stores.
typedef float NFu __attribute__((vector_size(4 * LF), aligned(4)));
typedef double NDu __attribute__((vector_size(4 * LF), aligned(8)));
typedef uint16_t NWu __attribute__((vector_size(2 * LF), aligned(2)));
typedef float NH __attribute__((vector_size(2 * LF)));  // LD floats: half a native vector

NK_INLINE NF ld(const float* p) { return *reinterpret_cast<const NFu*>(p); }
NK_INLINE ND ld(const double* p) { return *reinterpret_cast<const NDu*>(p); }
NK_INLINE NW ldw(const uint16_t* p) { return *reinterpret_cast<const NWu*>(p); }

// Stores; STREAM: non-temporal (the caller aligns the row's vectors to STREAM_ALIGN bytes, so
// every native vector is aligned to its size, and fences after the last).
template <bool STREAM, class T, class N>
NK_INLINE void st_native(T* p, N v) {
#if defined(NK_ISA_AVX512) || defined(NK_ISA_AVX2)
  if constexpr (STREAM) {
    if constexpr (sizeof(N) == 64 && sizeof(T) == 4) {
      _mm512_stream_ps(reinterpret_cast<float*>(p), (__m512)v);
    } else if constexpr (sizeof(N) == 64) {
      _mm512_stream_pd(reinterpret_cast<double*>(p), (__m512d)v);
    } else if constexpr (sizeof(N) == 32) {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(p), (__m256i)v);
    } else {
      _mm_stream_si128(reinterpret_cast<__m128i*>(p), (__m128i)v);
    }
    return;
  }
#endif
  typedef T U __attribute__((vector_size(sizeof(N)), aligned(sizeof(T))));
  *reinterpret_cast<U*>(p) = (U)v;
}
template <bool STREAM>
NK_INLINE void st(float* p, NF v) {
  st_native<STREAM>(p, v);
}
template <bool STREAM>
NK_INLINE void st(double* p, ND v) {
  st_native<STREAM>(p, v);
}
template <bool STREAM>
NK_INLINE void stw(uint16_t* p, NW w) {
  st_native<STREAM>(p, w);
}

// bfloat16 (see f32_to_bf16): the rounded value in the high half of each lane, NaN → 0x7FC0.
NK_INLINE NU bf16_high(NF v) {
  NU u = (NU)v;
  NU r = u + 0x7FFFu + ((u >> 16) & 1u);
  NI nan = v != v;
  return nan ? NU{} + 0x7FC00000u : r;
}
NK_INLINE NF from_bf16(NW w) { return (NF)(__builtin_convertvector(w, NU) << 16); }
NK_INLINE NW to_bf16(NF v) { return __builtin_convertvector(bf16_high(v) >> 16, NW); }
NK_INLINE NF round_bf16(NF v) { return (NF)(bf16_high(v) & 0xFFFF0000u); }

// 16 bfloat16 words ↔ a compute vector, in lane order.  x86: one zero-extension and a shift
// per native vector; the narrowing packs the two AVX2 halves in one instruction (and a lane
// fix-up) where GCC's generic narrowing packs each half with zeros.
NK_INLINE VF load_bf16(const uint16_t* q) {
  VF r;
#if defined(NK_ISA_AVX512)
  __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
  r.p[0] = (NF)_mm512_slli_epi32(_mm512_cvtepu16_epi32(w), 16);
#elif defined(NK_ISA_AVX2)
  for (int k = 0; k < KF; k++) {
    __m128i w = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 8 * k));
    r.p[k] = (NF)_mm256_slli_epi32(_mm256_cvtepu16_epi32(w), 16);
  }
#else
  for (int k = 0; k < KF; k++) r.p[k] = from_bf16(ldw(q + k * LF));
#endif
  return r;
}

NK_INLINE NF from_f16(NW w) {
#if defined(NK_ISA_AVX512)
  return (NF)_mm512_cvtph_ps((__m256i)w);
#elif defined(NK_ISA_AVX2)
  return (NF)_mm256_cvtph_ps((__m128i)w);
#else
  NF r;
  for (int i = 0; i < LF; i++) r[i] = f16_to_f32_soft(w[i]);
  return r;
#endif
}
NK_INLINE NW to_f16(NF v) {
#if defined(NK_ISA_AVX512)
  return (NW)_mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#elif defined(NK_ISA_AVX2)
  return (NW)_mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
  NW r;
  for (int i = 0; i < LF; i++) r[i] = f32_to_f16_soft(v[i]);
  return r;
#endif
}

// float ↔ double: a native float vector is two native double vectors.
NK_INLINE VD vf_to_vd(VF v) {
  VD r;
  for (int k = 0; k < KF; k++) {
    NH lo, hi;
    for (int i = 0; i < LD; i++) {
      lo[i] = v.p[k][i];
      hi[i] = v.p[k][LD + i];
    }
    r.p[2 * k] = __builtin_convertvector(lo, ND);
    r.p[2 * k + 1] = __builtin_convertvector(hi, ND);
  }
  return r;
}
NK_INLINE VF vd_to_vf(VD v) {  // rounded to nearest even
  VF r;
  for (int k = 0; k < KF; k++) {
    NH lo = __builtin_convertvector(v.p[2 * k], NH);
    NH hi = __builtin_convertvector(v.p[2 * k + 1], NH);
    for (int i = 0; i < LD; i++) {
      r.p[k][i] = lo[i];
      r.p[k][LD + i] = hi[i];
    }
  }
  return r;
}

// 16 values of storage K at p + j, converted exactly to the compute type C.
template <int K, class C>
NK_INLINE Vec<C> vload(const void* p, int64_t j) {
  const ST<K>* q = static_cast<const ST<K>*>(p) + j;
  if constexpr (std::is_same<C, double>::value) {
    if constexpr (K == kF64) {
      VD r;
      for (int k = 0; k < KD; k++) r.p[k] = ld(q + k * LD);
      return r;
    } else {
      return vf_to_vd(vload<K, float>(p, j));
    }
  } else {
    static_assert(K != kF64, "never a silent narrowing");
    if constexpr (K == kBF16) {
      return load_bf16(q);
    } else {
      VF r;
      for (int k = 0; k < KF; k++) {
        if constexpr (K == kF16) {
          r.p[k] = from_f16(ldw(q + k * LF));
        } else {
          r.p[k] = ld(q + k * LF);
        }
      }
      return r;
    }
  }
}

template <bool STREAM>
NK_INLINE void store_bf16_add(uint16_t* q, VF v) {
#if defined(NK_ISA_AVX512)
  __m256i w = _mm512_cvtepi32_epi16((__m512i)(bf16_high(v.p[0]) >> 16));
  st_native<STREAM>(q, (NW)w);
#elif defined(NK_ISA_AVX2)
  __m256i w = _mm256_packus_epi32((__m256i)(bf16_high(v.p[0]) >> 16),
                                  (__m256i)(bf16_high(v.p[1]) >> 16));  // words ≤ 0xFFFF
  w = _mm256_permute4x64_epi64(w, 0xD8);  // the packs interleave 64-bit quarters
  typedef uint16_t W16 __attribute__((vector_size(32)));
  st_native<STREAM>(q, (W16)w);
#else
  for (int k = 0; k < KF; k++) st_native<STREAM>(q + k * LF, to_bf16(v.p[k]));
#endif
}

#if defined(NK_BF16_CVT)
// vcvtneps2bf16 rounds to nearest even as the addition does, but flushes subnormals to zero
// and keeps a NaN's sign and payload: a vector with such a lane (vfpclassps: QNaN, denormal,
// SNaN) is rounded by the addition instead — the same words either way.
template <bool STREAM>
NK_INLINE void store_bf16(uint16_t* q, VF v) {
  if (__builtin_expect(_mm512_fpclass_ps_mask((__m512)v.p[0], 0x01 | 0x20 | 0x80) != 0, 0)) {
    store_bf16_add<STREAM>(q, v);
    return;
  }
  st_native<STREAM>(q, (NW)_mm512_cvtneps_pbh((__m512)v.p[0]));
}
#else
template <bool STREAM>
NK_INLINE void store_bf16(uint16_t* q, VF v) {
  store_bf16_add<STREAM>(q, v);
}
#endif

// 16 compute values rounded to storage K and stored at p + j (STREAM: non-temporal).
template <int K, class C, bool STREAM = false>
NK_INLINE void vstore(void* p, int64_t j, Vec<C> v) {
  ST<K>* q = static_cast<ST<K>*>(p) + j;
  if constexpr (std::is_same<C, double>::value) {
    if constexpr (K == kF64) {
      for (int k = 0; k < KD; k++) st<STREAM>(q + k * LD, v.p[k]);
    } else {
      vstore<K, float, STREAM>(p, j, vd_to_vf(v));  // float64 → float32 → 16-bit, as numba did
    }
  } else if constexpr (K == kF64) {
    VD d = vf_to_vd(v);
    for (int k = 0; k < KD; k++) st<STREAM>(q + k * LD, d.p[k]);
  } else if constexpr (K == kBF16) {
    store_bf16<STREAM>(q, v);
  } else {
    for (int k = 0; k < KF; k++) {
      if constexpr (K == kF16) {
        stw<STREAM>(q + k * LF, to_f16(v.p[k]));
      } else {
        st<STREAM>(q + k * LF, v.p[k]);
      }
    }
  }
}

template <int K, class C>
NK_INLINE Vec<C> vround(Vec<C> v) {  // v rounded to storage K and back
  if constexpr (sizeof(ST<K>) >= sizeof(C)) {
    return v;  // float32 kept as float32, or a float32 value as float64: exact
  } else if constexpr (std::is_same<C, double>::value) {
    return vf_to_vd(vround<K, float>(vd_to_vf(v)));
  } else {
    VF r;
    for (int k = 0; k < KF; k++) {
      if constexpr (K == kBF16) {
        r.p[k] = round_bf16(v.p[k]);
      } else {
        r.p[k] = from_f16(to_f16(v.p[k]));
      }
    }
    return r;
  }
}

NK_INLINE void prefetch_l2(const void* p) { __builtin_prefetch(p, 0, 2); }

NK_INLINE void store_fence() {
#if defined(NK_ISA_AVX512) || defined(NK_ISA_AVX2)
  _mm_sfence();
#endif
}
