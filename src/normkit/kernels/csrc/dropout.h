// Dropout before the residual add: the keep-mask (Philox4x32-10, Triton's keying) and the row
// functions that apply it.  Included by rows.h (inside each instruction-set path's namespace,
// after simd.h), so it is compiled once per path like the row kernels.
//
// Element k of the (M, N) rows (k = i·N + j, the flat index) is kept iff the 31-bit value of
// u = Philox4x32-10(key = (seed lo, seed hi), counter = (k lo, k hi, 0, 0)), first word — what
// Triton's tl.randint(seed, k) gives for an int64 k — is > Dropout::keep_above (u as int32,
// a negative one mapped to -u-1, as tl.rand does before scaling; reference.py: keep_above).  So
// the mask depends on the seed and k only: not on the thread count, the instruction set, or
// which rows a launch takes.  The 32-bit products are the only arithmetic: exact on every path.
//
// A kept element is multiplied by Dropout::scale (1/(1-p) in the compute type), a dropped one by
// 0 (a NaN or Inf stays non-finite, as with torch's dropout); the product and the residual's sum
// are each rounded in the compute type (never fused), then h is rounded once to x's type.

constexpr uint32_t kPhiloxRoundA = 0xD2511F53u, kPhiloxRoundB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u, kPhiloxKeyB = 0xBB67AE85u;

// (hi, lo) words of the 32×32-bit products a·c, lane-wise.  x86: even and odd lanes by the
// widening multiply (vpmuludq), the halves blended back — 2 multiplies per LF lanes; spelled
// with 64-bit vector lanes instead, GCC 12 emitted full 64×64 multiplies, 4x slower.
NK_INLINE void mulhilo(uint32_t a, NU c, NU& hi, NU& lo) {
#if defined(NK_ISA_AVX512)
  const __m512i av = _mm512_set1_epi64(a), cv = (__m512i)c;
  const __m512i ev = _mm512_mul_epu32(cv, av), od = _mm512_mul_epu32(_mm512_srli_epi64(cv, 32), av);
  hi = (NU)_mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(ev, 32), od);
  lo = (NU)_mm512_mask_blend_epi32(0xAAAA, ev, _mm512_slli_epi64(od, 32));
#elif defined(NK_ISA_AVX2)
  const __m256i av = _mm256_set1_epi64x(a), cv = (__m256i)c;
  const __m256i ev = _mm256_mul_epu32(cv, av), od = _mm256_mul_epu32(_mm256_srli_epi64(cv, 32), av);
  hi = (NU)_mm256_blend_epi32(_mm256_srli_epi64(ev, 32), od, 0xAA);
  lo = (NU)_mm256_blend_epi32(ev, _mm256_slli_epi64(od, 32), 0xAA);
#else
  for (int l = 0; l < LF; l++) {
    const uint64_t p = uint64_t(a) * c[l];
    hi[l] = uint32_t(p >> 32);
    lo[l] = uint32_t(p);
  }
#endif
}

// keep[l] = all ones where element k + l (l < B·W) is kept, else 0.  The B·W counters run as
// B·KF independent vectors, round by round, the loops unrolled so that GCC keeps the Philox
// state in registers (rolled, it went through memory: 2x slower on AVX2).
template <int B>
NK_INLINE void keep_mask(const Dropout& d, uint64_t k, NI* keep) {
  constexpr int G = B * KF;
  NU lane;
  for (int l = 0; l < LF; l++) lane[l] = uint32_t(l);
  const NU zero = lane ^ lane;
  NU c0[G], c1[G], c2[G], c3[G];
  for (int q = 0; q < G; q++) {
    c0[q] = (zero + uint32_t(k)) + (lane + uint32_t(q * LF));
    c1[q] = (zero + uint32_t(k >> 32)) - (NU)(c0[q] < uint32_t(k));  // + the carry of k lo + l
    c2[q] = zero;
    c3[q] = zero;
  }
  uint32_t k0 = uint32_t(d.seed), k1 = uint32_t(d.seed >> 32);
#pragma GCC unroll 10
  for (int r = 0; r < 10; r++) {
#pragma GCC unroll 8
    for (int q = 0; q < G; q++) {
      NU hia, loa, hib, lob;
      mulhilo(kPhiloxRoundA, c0[q], hia, loa);
      mulhilo(kPhiloxRoundB, c2[q], hib, lob);
      c0[q] = hib ^ c1[q] ^ k0;
      c2[q] = hia ^ c3[q] ^ k1;
      c1[q] = lob;
      c3[q] = loa;
    }
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  for (int q = 0; q < G; q++) {
    NI v = (NI)c0[q];
    v = v ^ (v >> 31);  // tl.rand: a negative int32 u becomes -u-1 = ~u
    keep[q] = v > d.keep_above;
  }
}

// The multipliers of W elements from keep (KF vectors of keep_mask): scale where kept, else 0.
template <class C>
NK_INLINE Vec<C> drop_multipliers(const Dropout& d, const NI* keep) {
  if constexpr (std::is_same<C, float>::value) {
    const int32_t sb = int32_t(f32_bits(float(d.scale)));
    VF r;
    for (int q = 0; q < KF; q++) r.p[q] = (NF)(keep[q] & sb);  // scale's bits, or +0
    return r;
  } else {
    alignas(64) C mult[W];
    const C s = C(d.scale), z = C(0);
    for (int q = 0; q < KF; q++)
      for (int l = 0; l < LF; l++) mult[q * LF + l] = keep[q][l] ? s : z;
    return vload<kF64, C>(mult, 0);
  }
}

// h = x·m (+ r) of one row whose first element is element k of the rows; r may be null; h may be
// x or r (each vector is read before it is written).
template <int X>
__attribute__((noinline)) void drop_row(const void* x, const void* r, void* h, int64_t n,
                                        const Dropout& d, uint64_t k) {
  using C = CT<X>;
  NI keep[2 * KF];
  auto one = [&](int64_t j, const NI* kp) {
    Vec<C> v = vload<X, C>(x, j) * drop_multipliers<C>(d, kp);
    if (r != nullptr) v = v + vload<X, C>(r, j);
    vstore<X, C>(h, j, v);
  };
  const int64_t nv = n - n % W, n2 = n - n % (2 * W);
  for (int64_t j = 0; j < n2; j += 2 * W) {
    keep_mask<2>(d, k + uint64_t(j), keep);
    one(j, keep);
    one(j + W, keep + KF);
  }
  if (n2 == n) return;
  keep_mask<2>(d, k + uint64_t(n2), keep);
  if (nv > n2) one(n2, keep);
  if (nv == n) return;
  alignas(64) C mult[W];
  vstore<(sizeof(C) == 8 ? kF64 : kF32), C>(mult, 0,
                                             drop_multipliers<C>(d, keep + (nv > n2 ? KF : 0)));
  for (int64_t j = nv; j < n; j++) {
    C v = sload<X, C>(x, j) * mult[j - nv];
    if (r != nullptr) v = v + sload<X, C>(r, j);
    sstore<X, C>(h, j, v);
  }
}

// dst[j] = src[j]·m(k + j) for j < n, rounded to X: the backward's dx = m·dh (the mask itself
// is m·1 ≠ 0).  src and dst contiguous of kind X; dst may be src.
template <int X>
void drop_apply(const void* src, void* dst, int64_t n, const Dropout& d, uint64_t k) {
  drop_row<X>(src, nullptr, dst, n, d, k);
}
