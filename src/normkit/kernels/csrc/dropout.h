// Dropout before the residual add: the keep-mask (Philox4x32-10, Triton's keying) and the row
// functions that apply it.  Included by rows.h (inside each instruction-set path's namespace,
// after simd.h), so it is compiled once per path like the row kernels.
//
// Element k of the (M, N) rows (k = i·N + j, the flat index) is kept iff the 31-bit value of
// u = word k % 4 of Philox4x32-10(key = (seed lo, seed hi), counter = (c lo, c hi, 0, 0)),
// c = k / 4 — what Triton's tl.randint4x(seed, c) gives for an int64 c: one Philox call per 4
// elements — is > Dropout::keep_above (u as int32, a negative one mapped to -u-1, as tl.rand
// does before scaling; reference.py: keep_above).  So
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

// Philox4x32-10 of kDropGroups consecutive counters g, g+1, ... (counter (g lo, g hi, 0, 0)),
// its 4 words the keep flags of elements 4g .. 4g+3 (tl.randint4x(seed, g)'s order): out[4q + w]
// = all ones where word w of counter g + q gives a 31-bit value > Dropout::keep_above, else 0.
// The G counter vectors run round by round, the loops unrolled so that GCC keeps the Philox
// state in registers (rolled, it went through memory: 2x slower on AVX2).
constexpr int kDropGroups = 2 * W;  // counters per call, 2·KF vectors (W or 4·W: 5-10% slower)
constexpr int kDropChunk = 4 * kDropGroups;  // elements per call

// The lanes of a and b interleaved, from lane L0 on: a[L0], b[L0], a[L0 + 1], b[L0 + 1], ...
// (Lanes<LF> derives from Lanes<0, 0, 1, ..., LF - 1>: the shuffle's constant indices.)
template <int N, int... L>
struct Lanes : Lanes<N - 1, N - 1, L...> {};
template <int... L>
struct Lanes<0, L...> {};
template <int L0, int... L>
NK_INLINE NI zip(NI a, NI b, Lanes<0, L...>) {
  return __builtin_shufflevector(a, b, (L % 2 ? LF : 0) + L0 + L / 2 ...);
}

NK_INLINE void keep_flags(const Dropout& d, uint64_t g, int32_t* out) {
  constexpr int G = kDropGroups / LF;
  NU lane;
  for (int l = 0; l < LF; l++) lane[l] = uint32_t(l);
  const NU zero = lane ^ lane;
  NU c0[G], c1[G], c2[G], c3[G];
  for (int q = 0; q < G; q++) {
    c0[q] = (zero + uint32_t(g)) + (lane + uint32_t(q * LF));
    c1[q] = (zero + uint32_t(g >> 32)) - (NU)(c0[q] < uint32_t(g));  // + the carry of g lo + l
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
  auto keep = [&](NU u) {
    NI v = (NI)u;
    return (NI)(((v ^ (v >> 31)) > d.keep_above));  // tl.rand: a negative int32 u becomes ~u
  };
  const Lanes<LF> lo;
  for (int q = 0; q < G; q++) {
    // words 0 and 2, 1 and 3 interleaved, then those two: 4 flags per counter, in word order
    const NI w0 = keep(c0[q]), w1 = keep(c1[q]), w2 = keep(c2[q]), w3 = keep(c3[q]);
    const NI a0 = zip<0>(w0, w2, lo), a1 = zip<LF / 2>(w0, w2, lo);
    const NI b0 = zip<0>(w1, w3, lo), b1 = zip<LF / 2>(w1, w3, lo);
    const NI o[4] = {zip<0>(a0, b0, lo), zip<LF / 2>(a0, b0, lo), zip<0>(a1, b1, lo),
                     zip<LF / 2>(a1, b1, lo)};
    std::memcpy(out + 4 * q * LF, o, sizeof o);
  }
}

typedef int32_t NIu __attribute__((vector_size(4 * LF), aligned(4)));  // flags at any offset

// The multipliers of W elements from their keep flags (W int32): scale where kept, else 0.  The
// flags are read as vectors in place (through memcpy into NI, GCC stored them to the stack in
// 16-byte halves and reloaded 32: a stalled store forward per vector).
template <class C>
NK_INLINE Vec<C> drop_multipliers(const Dropout& d, const int32_t* flags) {
  NI keep[KF];
  for (int q = 0; q < KF; q++) keep[q] = *reinterpret_cast<const NIu*>(flags + q * LF);
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
// x or r (each vector is read before it is written).  The flags come kDropChunk at a time, from
// the counter k / 4 on: the first chunk starts k % 4 elements before the row, and the next ones
// at counter boundaries.
template <int X>
__attribute__((noinline)) void drop_row(const void* x, const void* r, void* h, int64_t n,
                                        const Dropout& d, uint64_t k) {
  using C = CT<X>;
  alignas(64) int32_t flags[kDropChunk];
  const C sc = C(d.scale), z = C(0);
  int off = int(k % 4);  // of the row's first element in the chunk
  for (int64_t j0 = 0, g = int64_t(k / 4); j0 < n; g += kDropGroups, off = 0) {
    keep_flags(d, uint64_t(g), flags);
    const int32_t* f = flags + off;  // f[j - j0]: element j's flag
    const int64_t j1 = n - j0 < kDropChunk - off ? n : j0 + kDropChunk - off;
    const int64_t jv = j1 - (j1 - j0) % W;
    for (int64_t j = j0; j < jv; j += W) {
      Vec<C> v = vload<X, C>(x, j) * drop_multipliers<C>(d, f + (j - j0));
      if (r != nullptr) v = v + vload<X, C>(r, j);
      vstore<X, C>(h, j, v);
    }
    for (int64_t j = jv; j < j1; j++) {
      C v = sload<X, C>(x, j) * (f[j - j0] ? sc : z);
      if (r != nullptr) v = v + sload<X, C>(r, j);
      sstore<X, C>(h, j, v);
    }
    j0 = j1;
  }
}

// dst[j] = src[j]·m(k + j) for j < n, rounded to X: the backward's dx = m·dh (the mask itself
// is m·1 ≠ 0).  src and dst contiguous of kind X; dst may be src.
template <int X>
void drop_apply(const void* src, void* dst, int64_t n, const Dropout& d, uint64_t k) {
  drop_row<X>(src, nullptr, dst, n, d, k);
}

// The backward: the keep flags of elements k .. k + n − 1 of the rows, into buf (n +
// kDropFlagsPad int32: the chunks start at k's counter, up to 3 elements before k, and the last
// ends past k + n).  Returns where element k's flag is.  Not inlined: one copy of the unrolled
// Philox rounds per instruction set, not one per backward kernel (the generic path's build took
// minutes longer).
__attribute__((noinline)) const int32_t* fill_flags(const Dropout& d, uint64_t k, int64_t n,
                                                    int32_t* buf) {
  static_assert(kDropChunk + 3 <= kDropFlagsPad, "kernels.h: kDropFlagsPad");
  const int64_t off = int64_t(k % 4);
  for (int64_t c = 0; c * kDropChunk < off + n; c++)
    keep_flags(d, k / 4 + uint64_t(c) * kDropGroups, buf + c * kDropChunk);
  return buf + off;
}

// The backward's dxd = m·dx of computed dx value(s) v, with their keep flag(s) f: v rounded to
// X first, so that the bits are drop_apply's of the stored dx.
template <int X, class C>
NK_INLINE Vec<C> dropped(const Dropout& d, Vec<C> v, const int32_t* f) {
  return vround<X, C>(v) * drop_multipliers<C>(d, f);
}
template <int X, class C>
NK_INLINE C dropped(const Dropout& d, C v, int32_t f) {
  return sround<X, C>(v) * (f ? C(d.scale) : C(0));
}
