// The row kernels: LayerNorm / RMSNorm (+ fused residual add), forward and backward, on the
// 16-lane vectors of simd.h.  One source for every instruction-set path: isa_*.cpp include it
// inside a namespace of their own after simd.h and export its table (kernels.h).
//
// The math is the one in reference.py; the bits are fixed by these rules, on every path:
//
// * Statistics accumulate in the compute type (float32, float64 for float64 input) about a
//   shift near the row's mean: d = v − m1, dm = mean(d), var = mean(d²) − dm², where m1 is the
//   mean of the row's first W elements (rows shorter than W: their mean); where dm² > var (the
//   first elements are not typical of the row) the moments are taken again about m1 + dm.
//   x̂ = ((v − m1) − dm)·rstd, rstd = 1/sqrt(max(var, 0) + ε).  RMSNorm: m1 = dm = 0,
//   rstd = 1/sqrt(mean(v²) + ε), x̂ = v·rstd.
// * Every row sum runs in one written-down order (row_sums): W-lane vectors into four
//   accumulators within blocks of kBlock elements, the blocks in order, the lanes by vsum's
//   pairwise tree, then the n % W tail one element at a time.
// * Fused multiply-adds at written-down places: the second row sum (Σd², Σg·dy·x̂) accumulates
//   by FMA; y = fma(x̂, γ, β) (LayerNorm with β, outside "llama"/"t5" casting); dx =
//   fma(rstd, fma(x̂, −c2/N, fma(dy, g, −c1/N)), dh); dγ = fma(dy, x̂, dγ).  Nothing else is
//   fused (the build sets -ffp-contract=off).
// * A row's result depends only on the row, γ, β, ε and N.  dγ/dβ: one partial row per block of
//   a partition that depends on M and N only, rows added in order, then the blocks in order.
//
// The rest (vector widths, grouping rows in the backward, prefetching, streamed stores) is
// speed only: every variant computes each element with the same operations.

constexpr int64_t kBlock = 1024;  // elements per block of a row sum
// The backward takes rows of N ≤ kGroupElements / 2 in groups of min(kGroupRows,
// kGroupElements / N) rows; see bwd_blocks for why.
constexpr int64_t kGroupRows = 16;
constexpr int64_t kGroupElements = 1024;

template <class T>
NK_INLINE const T* at(const void* p, int64_t j) {
  return static_cast<const T*>(p) + j;
}
template <class T>
NK_INLINE T* at(void* p, int64_t j) {
  return static_cast<T*>(p) + j;
}
// An address past the end of a buffer, for prefetching only (a prefetch never faults).
NK_INLINE const void* ahead(const void* p, int64_t bytes) {
  return reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(p) + bytes);
}

// ------------------------------------------------------------------------------------------
// Row sums
// ------------------------------------------------------------------------------------------

// The two row sums of terms(j) over j < n: s1 = Σ t1, s2 = Σ p·q (each product fused into its
// addition), in the order described at the top.  ``terms`` provides vec(j, a1, a2), which adds
// the W elements from j into the accumulators (a1 + t1, fma(p, q, a2)), and one(j, s1, s2), the
// same for element j.
template <class C, class Terms>
NK_INLINE void row_sums(int64_t n, const Terms& terms, C& s1, C& s2) {
  using V = Vec<C>;
  const int64_t nv = n - n % W;
  V s1v = vzero<C>(), s2v = vzero<C>();
  for (int64_t jb = 0; jb < nv; jb += kBlock) {
    const int64_t e = jb + kBlock < nv ? jb + kBlock : nv;
    V a1 = vzero<C>(), b1 = a1, c1 = a1, d1 = a1, a2 = a1, b2 = a1, c2 = a1, d2 = a1;
    int64_t j = jb;
    for (; j + 4 * W <= e; j += 4 * W) {
      terms.vec(j, a1, a2);
      terms.vec(j + W, b1, b2);
      terms.vec(j + 2 * W, c1, c2);
      terms.vec(j + 3 * W, d1, d2);
    }
    if (j < e) {
      terms.vec(j, a1, a2);
      j += W;
    }
    if (j < e) {
      terms.vec(j, b1, b2);
      j += W;
    }
    if (j < e) terms.vec(j, c1, c2);
    s1v = s1v + ((a1 + b1) + (c1 + d1));
    s2v = s2v + ((a2 + b2) + (c2 + d2));
  }
  s1 = vsum(s1v);
  s2 = vsum(s2v);
  for (int64_t j = nv; j < n; j++) terms.one(j, s1, s2);
}

// row_sums of two rows of n ≤ kBlock at once: for each row the same additions in the same
// order, the two rows' instructions interleaved so that one row's reductions overlap the
// other's loads and products.
template <class C, class TA, class TB>
NK_INLINE void row_sums_pair(int64_t n, const TA& ta, const TB& tb, C& sa1, C& sa2, C& sb1,
                             C& sb2) {
  using V = Vec<C>;
  const int64_t nv = n - n % W;
  V a1 = vzero<C>(), b1 = a1, c1 = a1, d1 = a1, a2 = a1, b2 = a1, c2 = a1, d2 = a1;
  V e1 = a1, f1 = a1, g1 = a1, h1 = a1, e2 = a1, f2 = a1, g2 = a1, h2 = a1;
  int64_t j = 0;
  for (; j + 4 * W <= nv; j += 4 * W) {
    ta.vec(j, a1, a2);
    tb.vec(j, e1, e2);
    ta.vec(j + W, b1, b2);
    tb.vec(j + W, f1, f2);
    ta.vec(j + 2 * W, c1, c2);
    tb.vec(j + 2 * W, g1, g2);
    ta.vec(j + 3 * W, d1, d2);
    tb.vec(j + 3 * W, h1, h2);
  }
  if (j < nv) {
    ta.vec(j, a1, a2);
    tb.vec(j, e1, e2);
    j += W;
  }
  if (j < nv) {
    ta.vec(j, b1, b2);
    tb.vec(j, f1, f2);
    j += W;
  }
  if (j < nv) {
    ta.vec(j, c1, c2);
    tb.vec(j, g1, g2);
  }
  const V z = vzero<C>();
  sa1 = vsum(z + ((a1 + b1) + (c1 + d1)));
  sa2 = vsum(z + ((a2 + b2) + (c2 + d2)));
  sb1 = vsum(z + ((e1 + f1) + (g1 + h1)));
  sb2 = vsum(z + ((e2 + f2) + (g2 + h2)));
  for (int64_t k = nv; k < n; k++) {
    ta.one(k, sa1, sa2);
    tb.one(k, sb1, sb2);
  }
}

// The forward's moments: d = src[j] − shift, t1 = d, p = q = d.  SCALED: d = scale·src[j] −
// shift, for rows whose squares overflow (row_stats; scale is a power of two, so scale·src[j]
// is exact but where it falls below the normal range).
template <int X, bool SCALED = false>
struct Moments {
  using C = CT<X>;
  const void* src;
  C shift;
  C scale = C(1);
  NK_INLINE void vec(int64_t j, Vec<C>& a1, Vec<C>& a2) const {
    Vec<C> v = vload<X, C>(src, j);
    if constexpr (SCALED) v = v * scale;
    Vec<C> d = v - shift;
    a1 = a1 + d;
    a2 = vfma(d, d, a2);
  }
  NK_INLINE void one(int64_t j, C& s1, C& s2) const {
    C v = sload<X, C>(src, j);
    if constexpr (SCALED) v = v * scale;
    C d = v - shift;
    s1 = s1 + d;
    s2 = sfma(d, d, s2);
  }
};

// ------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------

template <class V, class C>
NK_INLINE V x_hat(V v, C m1, C dm, C rstd) {
  return ((v - m1) - dm) * rstd;  // one spelling for the forward and every backward loop
}

// The moments of one row of s·src (s = 1 unless SCALED): m1 and dm as at the top of this file,
// and the returned variance (LayerNorm, before max(·, 0)) or mean square (RMSNorm).
template <int X, bool SCALED>
NK_INLINE CT<X> row_moments(const void* src, int64_t n, bool rms, CT<X> s, CT<X>& m1,
                            CT<X>& dm) {
  using C = CT<X>;
  using M = Moments<X, SCALED>;
  const C z = C(0), nf = C(n);
  C s1, s2;
  if (rms) {
    m1 = z;
    dm = z;
    row_sums<C>(n, M{src, z, s}, s1, s2);
    return s2 / nf;
  }
  if (n >= W) {
    Vec<C> v = vload<X, C>(src, 0);
    if constexpr (SCALED) v = v * s;
    m1 = vsum(v) / C(W);
  } else {
    row_sums<C>(n, M{src, z, s}, s1, s2);
    m1 = s1 / nf;
  }
  row_sums<C>(n, M{src, m1, s}, s1, s2);
  dm = s1 / nf;
  C var = s2 / nf - dm * dm;
  if (n >= W && dm * dm > var) {
    m1 = m1 + dm;
    row_sums<C>(n, M{src, m1, s}, s1, s2);
    dm = s1 / nf;
    var = s2 / nf - dm * dm;
  }
  return var;
}

// The largest |src[j]| of a row, or the first value that is not finite (±Inf, NaN).
template <int X>
NK_INLINE CT<X> row_absmax(const void* src, int64_t n) {
  using C = CT<X>;
  const C big = std::numeric_limits<C>::max();
  C a = C(0);
  for (int64_t j = 0; j < n; j++) {
    C v = sload<X, C>(src, j);
    v = v < C(0) ? -v : v;
    if (!(v <= big)) return v;
    a = v > a ? v : a;
  }
  return a;
}

template <class C>
NK_INLINE C rsqrt_of(C t) {
  if constexpr (std::is_same<C, float>::value) {
    return C(1) / __builtin_sqrtf(t);
  } else {
    return C(1) / __builtin_sqrt(t);
  }
}

// (m1, dm, rstd) of one row (see the top of this file).  A row of finite values whose sum of
// squares overflows (float32 |v| ≳ 1e19) is taken again scaled, as BLAS's nrm2 does: by the
// power of two s that brings its largest |v| into [1, 2); then m1 = m1ₛ/s, dm = dmₛ/s and
// rstd = s/sqrt(varₛ + ε·s²), exact rescalings of the scaled row's moments.  Other rows never
// reach that branch, so their bits are the ones above; a row holding ±Inf or NaN keeps what the
// unscaled sums give.  Not inlined: one copy per x dtype serves every output dtype and variant
// (build time; a call per row costs nothing measurable).
template <int X>
__attribute__((noinline)) void row_stats(const void* src, int64_t n, bool rms, CT<X> e,
                                         CT<X>& m1, CT<X>& dm, CT<X>& rstd) {
  using C = CT<X>;
  const C z = C(0);
  C q = row_moments<X, false>(src, n, rms, C(1), m1, dm);
  C t = (rms ? q : (z > q ? z : q)) + e;  // max(var, 0), a NaN var kept
  if (__builtin_expect(!(t <= std::numeric_limits<C>::max()), 0)) {
    const C a = row_absmax<X>(src, n);
    if (a <= std::numeric_limits<C>::max() && a > z) {
      const int k = std::ilogb(a);
      const C s = std::ldexp(C(1), -k);
      C m1s, dms;
      q = row_moments<X, true>(src, n, rms, s, m1s, dms);
      t = (rms ? q : (z > q ? z : q)) + e * s * s;
      m1 = m1s / s;
      dm = dms / s;
      rstd = rsqrt_of(t) * s;
      return;
    }
  }
  rstd = rsqrt_of(t);
}

// y of source value(s) v with γ/β value(s) gj/bj, before y's rounding to O.
template <int O, int VAR, class T, class C>
NK_INLINE T y_of(T v, T gj, T bj, C m1, C dm, C rstd, int flags, int nk) {
  constexpr bool rms = VAR == kRmsMul || VAR == kRmsRound;
  T t = rms ? v * rstd : x_hat(v, m1, dm, rstd);
  if constexpr (VAR == kLnRound || VAR == kRmsRound) {
    // "llama"/"t5": x̂ rounded to nk, x̂·γ rounded to y's dtype, then + β
    if constexpr (std::is_same<T, C>::value) {
      t = nk == kBFloat16 ? sround<kBF16, C>(t) : sround<kF16, C>(t);
      if (flags & kW) t = sround<O, C>(t * gj);
    } else {
      t = nk == kBFloat16 ? vround<kBF16, C>(t) : vround<kF16, C>(t);
      if (flags & kW) t = vround<O, C>(t * gj);
    }
    return (flags & kB) ? t + bj : t;
  } else if constexpr (VAR == kLnFma) {
    if constexpr (std::is_same<T, C>::value) {
      return sfma(t, gj, bj);
    } else {
      return vfma(t, gj, bj);
    }
  } else {
    return t * gj;
  }
}

// h = x + r rounded to X; h may be x or r (each vector is read before it is written).
template <int X>
__attribute__((noinline)) void add_row(const void* x, const void* r, void* h, int64_t n) {
  using C = CT<X>;
  const int64_t nv = n - n % W;
  for (int64_t j = 0; j < nv; j += W) vstore<X, C>(h, j, vload<X, C>(x, j) + vload<X, C>(r, j));
  for (int64_t j = nv; j < n; j++) sstore<X, C>(h, j, sload<X, C>(x, j) + sload<X, C>(r, j));
}

#include "dropout.h"  // drop_row: h = x·mask (+ r), for kDrop

// y of one row: single elements in its head (up to a STREAM_ALIGN boundary, when streamed)
// and tail, vectors in between; the next row's inputs (px, pr) are fetched meanwhile.
template <int X, int O, int VAR>
NK_INLINE void out_row(const void* src, void* y, int64_t n, const CT<X>* g, const CT<X>* b,
                       CT<X> m1, CT<X> dm, CT<X> rstd, int flags, int nk, const void* px,
                       const void* pr) {
  using C = CT<X>;
  using V = Vec<C>;
  const bool stream = flags & kStream;
  int64_t j0 = 0;
  if (stream) {
    int64_t mis = int64_t(-reinterpret_cast<uintptr_t>(y) % STREAM_ALIGN);
    j0 = mis / int64_t(sizeof(ST<O>));
    if (j0 > n) j0 = n;
  }
  const int64_t j1 = j0 + (n - j0) - (n - j0) % W;
  const bool res = flags & kRes;
  const C zb = C(0);
  for (int64_t j = 0; j < j0; j++)
    sstore<O, C>(y, j, y_of<O, VAR>(sload<X, C>(src, j), g[j], b ? b[j] : zb, m1, dm, rstd,
                                     flags, nk));
  for (int64_t j = j0; j < j1; j += W) {
    prefetch_l2(ahead(px, j * int64_t(sizeof(ST<X>))));
    if (res) prefetch_l2(ahead(pr, j * int64_t(sizeof(ST<X>))));
    V gj = vload<(sizeof(C) == 8 ? kF64 : kF32), C>(g, j);
    V bj = (VAR == kLnFma || (flags & kB)) ? vload<(sizeof(C) == 8 ? kF64 : kF32), C>(b, j) : gj;
    V v = y_of<O, VAR>(vload<X, C>(src, j), gj, bj, m1, dm, rstd, flags, nk);
    if (stream) {
      vstore<O, C, true>(y, j, v);
    } else {
      vstore<O, C, false>(y, j, v);
    }
  }
  for (int64_t j = j1; j < n; j++)
    sstore<O, C>(y, j, y_of<O, VAR>(sload<X, C>(src, j), g[j], b ? b[j] : zb, m1, dm, rstd,
                                     flags, nk));
}

template <int X, int O, int VAR>
void fwd_rows(const FwdArgs& a, int64_t lo, int64_t hi) {
  using C = CT<X>;
  const int64_t n = a.n;
  const int64_t xb = int64_t(sizeof(ST<X>));
  const C e = C(a.eps);
  const C* g = static_cast<const C*>(a.g);
  const C* b = static_cast<const C*>(a.b);
  constexpr bool rms = VAR == kRmsMul || VAR == kRmsRound;
  for (int64_t i = lo; i < hi; i++) {
    const void* src = at<ST<X>>(a.x, i * a.xrs);
    if (a.flags & kDrop) {
      void* h = at<ST<X>>(a.h, i * n);
      drop_row<X>(src, (a.flags & kRes) ? at<ST<X>>(a.r, i * a.rrs) : nullptr, h, n, a.drop,
                  uint64_t(i * n));
      src = h;
    } else if (a.flags & kRes) {
      void* h = at<ST<X>>(a.h, i * n);
      add_row<X>(src, at<ST<X>>(a.r, i * a.rrs), h, n);
      src = h;
    }
    C m1, dm, rstd;
    row_stats<X>(src, n, rms, e, m1, dm, rstd);
    const void* px = ahead(a.x, (i + 1) * a.xrs * xb);
    const void* pr = (a.flags & kRes) ? ahead(a.r, (i + 1) * a.rrs * xb) : px;
    out_row<X, O, VAR>(src, at<ST<O>>(a.y, i * n), n, g, b, m1, dm, rstd, a.flags, a.nk, px, pr);
    if (a.flags & kStats) {
      C* st = at<C>(a.stats, 3 * i);
      st[0] = m1;
      st[1] = dm;
      st[2] = rstd;
    }
  }
  if (a.flags & kStream) store_fence();
}

// ------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------
//
// Per row, with x̂ = ((v − m1) − dm)·rstd and g = γ (or 1 + γ, or ones):
//     c1 = Σ g·dy, c2 = Σ g·dy·x̂                       (first pass: row_sums)
//     dx = rstd·(g·dy − c1/N − x̂·c2/N) + dh             (RMSNorm: no c1 term)
//        = fma(rstd, fma(x̂, −c2/N, fma(dy, g, −c1/N)), dh)
//     dγ += dy·x̂ (x̂ rounded as the forward rounded it for "llama"/"t5"),  dβ += dy
// dh is the gradient that reached the returned pre-norm sum h; without one, +0 is added (a
// constant, not a row of zeros to load: the same bits).  RMSNorm's −c1/N is −0, so that fma(dy, g, −0) is g·dy exactly.
//
// Which of dγ/dβ are wanted is a runtime flag tested once per vector (or per row of a group):
// a predictable branch, where a template per combination would quadruple the build.

template <class C>
constexpr int kind_of_compute() {
  return sizeof(C) == 8 ? kF64 : kF32;
}

// x̂ of element(s) j in the backward: from the normalized input v and the row's statistics, or
// with FY (memory-efficient mode: v is the forward's output y) (y − β)·(1/γ), y·(1/γ) without β
// (yb null), with 1/γ computed once per launch (host.cpp).
template <bool FY, class T, class C>
NK_INLINE T bwd_x_hat(T v, int64_t j, C m1, C dm, C rstd, const C* yb, const C* yg) {
  if constexpr (!FY) {
    return x_hat(v, m1, dm, rstd);
  } else if constexpr (std::is_same<T, C>::value) {
    return (yb ? v - yb[j] : v) * yg[j];
  } else {
    constexpr int CK = kind_of_compute<C>();
    return (yb ? v - vload<CK, C>(yb, j) : v) * vload<CK, C>(yg, j);
  }
}

// The backward's first-pass terms: g·dy and g·dy·x̂; x̂ kept in xs with KEEP, and dy in ds
// with KEEP_DY (both in the compute type, for the second pass).
template <int X, int O, bool KEEP, bool KEEP_DY = false, bool FY = false>
struct Grads {
  using C = CT<X>;
  const void* dy;
  const void* x;
  const C* g;
  C m1, dm, rstd;
  C* xs;
  C* ds = nullptr;
  const C* yb = nullptr;  // FY: β and 1/γ (bwd_x_hat)
  const C* yg = nullptr;
  NK_INLINE void vec(int64_t j, Vec<C>& a1, Vec<C>& a2) const {
    constexpr int CK = kind_of_compute<C>();
    Vec<C> d = vload<O, C>(dy, j);
    Vec<C> xh = bwd_x_hat<FY>(vload<X, C>(x, j), j, m1, dm, rstd, yb, yg);
    Vec<C> gdy = d * vload<CK, C>(g, j);
    if constexpr (KEEP) vstore<CK, C>(xs, j, xh);
    if constexpr (KEEP_DY) vstore<CK, C>(ds, j, d);
    a1 = a1 + gdy;
    a2 = vfma(gdy, xh, a2);
  }
  NK_INLINE void one(int64_t j, C& s1, C& s2) const {
    C d = sload<O, C>(dy, j);
    C xh = bwd_x_hat<FY>(sload<X, C>(x, j), j, m1, dm, rstd, yb, yg);
    C gdy = d * g[j];
    if constexpr (KEEP) xs[j] = xh;
    if constexpr (KEEP_DY) ds[j] = d;
    s1 = s1 + gdy;
    s2 = sfma(gdy, xh, s2);
  }
};

template <class C>
NK_INLINE void neg_means(C c1, C c2, int64_t n, bool rms, C* q) {
  const C nf = C(n);
  q[1] = rms ? -C(0) : -(c1 / nf);
  q[2] = -(c2 / nf);
}

// The first pass of row i: q = (rstd, −c1/N, −c2/N); x̂ kept in xs when given, and dy in ds
// (with xs) when given.
template <int X, int O, bool FY>
__attribute__((noinline)) void grad_sums(const BwdArgs& a, int64_t i, CT<X>* q, CT<X>* xs,
                                         CT<X>* ds = nullptr) {
  using C = CT<X>;
  const int64_t n = a.n;
  const C* s = at<C>(a.stats, 3 * i);
  const void* dy = at<ST<O>>(a.dy, i * n);
  const void* x = at<ST<X>>(a.x, i * n);
  const C* g = static_cast<const C*>(a.g);
  const C* yb = static_cast<const C*>(a.yb);
  const C* yg = static_cast<const C*>(a.yg);
  C c1, c2;
  if (ds) {
    row_sums<C>(n, Grads<X, O, true, true, FY>{dy, x, g, s[0], s[1], s[2], xs, ds, yb, yg}, c1,
                c2);
  } else if (xs) {
    row_sums<C>(n, Grads<X, O, true, false, FY>{dy, x, g, s[0], s[1], s[2], xs, nullptr, yb,
                                                yg}, c1, c2);
  } else {
    row_sums<C>(n, Grads<X, O, false, false, FY>{dy, x, g, s[0], s[1], s[2], nullptr, nullptr,
                                                 yb, yg}, c1, c2);
  }
  q[0] = s[2];
  neg_means(c1, c2, n, a.rms, q);
}

// grad_sums of rows i and i + 1 (N ≤ kBlock), x̂ kept, their instructions interleaved.
template <int X, int O, bool FY>
__attribute__((noinline)) void grad_sums_pair(const BwdArgs& a, int64_t i, CT<X>* q,
                                              CT<X>* xs) {
  using C = CT<X>;
  const int64_t n = a.n;
  const C* sa = at<C>(a.stats, 3 * i);
  const C* sb = sa + 3;
  const C* g = static_cast<const C*>(a.g);
  const C* yb = static_cast<const C*>(a.yb);
  const C* yg = static_cast<const C*>(a.yg);
  Grads<X, O, true, false, FY> ra{at<ST<O>>(a.dy, i * n), at<ST<X>>(a.x, i * n), g, sa[0],
                                  sa[1], sa[2], xs, nullptr, yb, yg};
  Grads<X, O, true, false, FY> rb{at<ST<O>>(a.dy, (i + 1) * n), at<ST<X>>(a.x, (i + 1) * n), g,
                                  sb[0], sb[1], sb[2], xs + n, nullptr, yb, yg};
  C c1, c2, e1, e2;
  row_sums_pair<C>(n, ra, rb, c1, c2, e1, e2);
  q[0] = sa[2];
  neg_means(c1, c2, n, a.rms, q);
  q[3] = sb[2];
  neg_means(e1, e2, n, a.rms, q + 3);
}

template <class T, class C>
NK_INLINE T dx_of(T d, T xh, T g, C nc1, C nc2, C rstd, T dh) {
  if constexpr (std::is_same<T, C>::value) {
    return sfma(rstd, sfma(xh, nc2, sfma(d, g, nc1)), dh);
  } else {
    return vfma(rstd, vfma(xh, nc2, vfma(d, g, nc1)), dh);
  }
}

template <class T, class C>
NK_INLINE T x_for_dw(T xh, int flags, int nk) {  // x̂ as the forward rounded it before γ
  if (!(flags & kRound)) return xh;
  if constexpr (std::is_same<T, C>::value) {
    return nk == kBFloat16 ? sround<kBF16, C>(xh) : sround<kF16, C>(xh);
  } else {
    return nk == kBFloat16 ? vround<kBF16, C>(xh) : vround<kF16, C>(xh);
  }
}

// The second pass of a group of short rows, column by column: dx stored, each column's dγ/dβ
// partial sums kept in registers across the group's rows (added in row order, as row by row).
// q holds each row's (rstd, −c1/N, −c2/N); x̂ comes from the rows the first pass kept (xs).
template <int X, int O>
struct Columns {
  using C = CT<X>;
  using V = Vec<C>;
  static constexpr int CK = kind_of_compute<C>();
  int64_t rows, n;
  const C* xs;  // the group's x̂ rows (stride n)
  const void* dy;
  const void* dh;
  int64_t dhrs;
  void* dx;
  const C* q;
  const C* g;
  C* dw;  // null: not wanted
  C* db;
  int flags, nk;
  const int32_t* fl = nullptr;  // kDrop: the group's keep flags (stride n), and dxd = m·dx
  void* dxd = nullptr;
  const Dropout* drop = nullptr;

  NK_INLINE void one(int64_t j) const {  // column j, a single element
    C gv = g[j];
    C wv = dw ? dw[j] : C(0), bv = db ? db[j] : C(0);
    for (int64_t i = 0; i < rows; i++) {
      const C* qi = q + 3 * i;
      C d = sload<O, C>(dy, i * n + j);
      C xh = xs[i * n + j];
      const C v = dx_of(d, xh, gv, qi[1], qi[2], qi[0], dh ? sload<X, C>(dh, i * dhrs + j) : C(0));
      sstore<X, C>(dx, i * n + j, v);
      if (fl) sstore<X, C>(dxd, i * n + j, dropped<X, C>(*drop, v, fl[i * n + j]));
      wv = sfma(d, x_for_dw<C, C>(xh, flags, nk), wv);
      bv = bv + d;
    }
    if (dw) dw[j] = wv;
    if (db) db[j] = bv;
  }

  template <int NV>  // NV vector columns from j
  NK_INLINE void vecs(int64_t j) const {
    V gv[NV], wv[NV], bv[NV];
    for (int c = 0; c < NV; c++) {
      gv[c] = vload<CK, C>(g, j + c * W);
      wv[c] = dw ? vload<CK, C>(dw, j + c * W) : vzero<C>();
      bv[c] = db ? vload<CK, C>(db, j + c * W) : vzero<C>();
    }
    for (int64_t i = 0; i < rows; i++) {
      const C* qi = q + 3 * i;
      for (int c = 0; c < NV; c++) {
        const int64_t jc = j + c * W;
        V d = vload<O, C>(dy, i * n + jc);
        V xh = vload<CK, C>(xs, i * n + jc);
        const V v = dx_of(d, xh, gv[c], qi[1], qi[2], qi[0],
                          dh ? vload<X, C>(dh, i * dhrs + jc) : vzero<C>());
        vstore<X, C>(dx, i * n + jc, v);
        if (fl) vstore<X, C>(dxd, i * n + jc, dropped<X, C>(*drop, v, fl + i * n + jc));
        if (dw) wv[c] = vfma(d, x_for_dw<V, C>(xh, flags, nk), wv[c]);
        if (db) bv[c] = bv[c] + d;
      }
    }
    for (int c = 0; c < NV; c++) {
      if (dw) vstore<CK, C>(dw, j + c * W, wv[c]);
      if (db) vstore<CK, C>(db, j + c * W, bv[c]);
    }
  }
};

// The second pass of one row, element-wise: dx stored (streamed after the head j0 that aligns
// it), dγ/dβ added into the block's partial rows.  KEPT: dy and x̂ come from the first pass's
// compute-type rows (ds, xs), else from dy and x again.  The next row's inputs (nx, ndy, ndh)
// are fetched meanwhile.  One loop per combination of what is wanted: each test hoisted out of
// it (a row by row pass with them inside ran at half the speed of this one).  fl: the row's
// keep flags (kDrop), and dxd = m·dx is stored too (streamed where its vectors align as dx's).
template <int X, int O, bool DW, bool DB, bool KEPT, bool FY>
__attribute__((noinline)) void row_second(const BwdArgs& a, int64_t i, const CT<X>* q,
                                          CT<X>* dw, CT<X>* db, const CT<X>* ds,
                                          const CT<X>* xs, int64_t j0, const int32_t* fl) {
  using C = CT<X>;
  using V = Vec<C>;
  constexpr int CK = kind_of_compute<C>();
  const int64_t n = a.n;
  const int64_t xb = sizeof(ST<X>), ob = sizeof(ST<O>);
  const void* x = at<ST<X>>(a.x, i * n);
  const void* dy = at<ST<O>>(a.dy, i * n);
  const void* dh = a.dh ? at<ST<X>>(a.dh, i * a.dhrs) : nullptr;
  void* dx = at<ST<X>>(a.dx, i * n);
  void* dxd = fl ? at<ST<X>>(a.dxd, i * n) : nullptr;
  const C* g = static_cast<const C*>(a.g);
  const C* st = at<C>(a.stats, 3 * i);
  const C m1 = st[0], dm = st[1], rstd = q[0], nc1 = q[1], nc2 = q[2];
  const void* nx = ahead(x, n * xb);
  const void* ndy = ahead(dy, n * ob);
  const void* ndh = dh ? ahead(dh, a.dhrs * xb) : nullptr;
  const bool stream = a.flags & kStream;
  const bool stream_d =
      stream && (reinterpret_cast<uintptr_t>(dxd) - reinterpret_cast<uintptr_t>(dx)) % STREAM_ALIGN == 0;
  const int flags = a.flags, nk = a.nk;
  const int64_t j1 = j0 + (n - j0) - (n - j0) % W;
  for (int64_t j = 0; j < n; j++) {
    if (j == j0) j = j1;  // the vectors below
    if (j >= n) break;
    C d = KEPT ? ds[j] : sload<O, C>(dy, j);
    C xh = KEPT ? xs[j]
                : bwd_x_hat<FY>(sload<X, C>(x, j), j, m1, dm, rstd,
                                static_cast<const C*>(a.yb), static_cast<const C*>(a.yg));
    if constexpr (DW) dw[j] = sfma(d, x_for_dw<C, C>(xh, flags, nk), dw[j]);
    if constexpr (DB) db[j] = db[j] + d;
    const C v = dx_of(d, xh, g[j], nc1, nc2, rstd, dh ? sload<X, C>(dh, j) : C(0));
    sstore<X, C>(dx, j, v);
    if (fl) sstore<X, C>(dxd, j, dropped<X, C>(a.drop, v, fl[j]));
  }
  for (int64_t j = j0; j < j1; j += W) {
    prefetch_l2(ahead(nx, j * xb));
    prefetch_l2(ahead(ndy, j * ob));
    if (dh) prefetch_l2(ahead(ndh, j * xb));
    V d, xh;
    if constexpr (KEPT) {
      d = vload<CK, C>(ds, j);
      xh = vload<CK, C>(xs, j);
    } else {
      d = vload<O, C>(dy, j);
      xh = bwd_x_hat<FY>(vload<X, C>(x, j), j, m1, dm, rstd, static_cast<const C*>(a.yb),
                         static_cast<const C*>(a.yg));
    }
    if constexpr (DW) vstore<CK, C>(dw, j, vfma(d, x_for_dw<V, C>(xh, flags, nk),
                                                vload<CK, C>(dw, j)));
    if constexpr (DB) vstore<CK, C>(db, j, vload<CK, C>(db, j) + d);
    V v = dx_of(d, xh, vload<CK, C>(g, j), nc1, nc2, rstd,
                dh ? vload<X, C>(dh, j) : vzero<C>());
    if (stream) {
      vstore<X, C, true>(dx, j, v);
    } else {
      vstore<X, C, false>(dx, j, v);
    }
    if (fl) {
      const V vd = dropped<X, C>(a.drop, v, fl + j);
      if (stream_d) {
        vstore<X, C, true>(dxd, j, vd);
      } else {
        vstore<X, C, false>(dxd, j, vd);
      }
    }
  }
}

template <int X, int O, bool KEPT, bool FY>
NK_INLINE void row_second_any(const BwdArgs& a, int64_t i, const CT<X>* q, CT<X>* dw,
                              CT<X>* db, const CT<X>* ds, const CT<X>* xs, int64_t j0,
                              const int32_t* fl) {
  if (dw && db) {
    row_second<X, O, true, true, KEPT, FY>(a, i, q, dw, db, ds, xs, j0, fl);
  } else if (dw) {
    row_second<X, O, true, false, KEPT, FY>(a, i, q, dw, db, ds, xs, j0, fl);
  } else if (db) {
    row_second<X, O, false, true, KEPT, FY>(a, i, q, dw, db, ds, xs, j0, fl);
  } else {
    row_second<X, O, false, false, KEPT, FY>(a, i, q, dw, db, ds, xs, j0, fl);
  }
}

// Every column of a group.
template <int X, int O>
__attribute__((noinline)) void columns(const Columns<X, O>& cols) {
  const Columns<X, O> c = cols;  // a local copy: its fields stay in registers
  constexpr int64_t WC = COLS * W;
  const int64_t n = c.n;
  const int64_t nv = n - n % W;
  const int64_t nc = n - n % WC;
  for (int64_t j = 0; j < nc; j += WC) c.template vecs<COLS>(j);
  if constexpr (COLS > 1) {
    for (int64_t j = nc; j < nv; j += W) c.template vecs<1>(j);
  }
  for (int64_t j = nv; j < n; j++) c.one(j);
}

// Row blocks [k0, k1): dx, and each block's dγ/dβ partial rows (rows k of pw/pb), which start
// from zero.  Short rows (N ≤ kGroupElements / 2, not streamed) go in groups of min(kGroupRows,
// kGroupElements / N) rows: the first pass two rows at a time, keeping x̂ (in L1) for the second,
// which goes column by column (Columns) and so loads and stores the dγ/dβ sums once per group,
// not once per row (4096x64 float32, 2 cores: 87.7 → 72.7 µs in the kernels this file was
// ported from).  Other rows go one by one (row_second), 16-bit rows without AVX-512 keeping dy
// and x̂ in float32 rows from the first pass (the widenings, not memory, bound those rows).
// Longer rows in groups of four, column by column, measured slower than row by row here
// (AVX2, 512 KiB L2: 512x8192 float32 6.3 → 4.3 ms, 4096x4096 13.0 → 10.2).  Speed only:
// every element gets the same operations in every case.  FY: x̂ from the output y (the
// memory-efficient mode, bwd_x_hat).
template <int X, int O, bool FY>
void bwd_blocks(const BwdArgs& a, int64_t k0, int64_t k1) {
  using C = CT<X>;
  const int64_t n = a.n;
  const int64_t xb = sizeof(ST<X>);
  const bool stream = a.flags & kStream;
  // 16-bit rows without AVX-512 go in groups only of 4 rows or more: keeping dy and x̂ row by
  // row beats a group of 2 there (1024x512 bfloat16, 2 cores: 1.17x faster)
  const bool slow16 = sizeof(ST<X>) == 2 && !kFastWidening;
  const int64_t grp =
      (n <= (slow16 ? kGroupElements / 4 : kGroupElements / 2) && !stream)
          ? (kGroupElements / n < kGroupRows ? kGroupElements / n : kGroupRows)
          : 1;
  C q[3 * kGroupRows];
  C xg[kGroupElements];  // short rows: the group's x̂ (grp · N ≤ kGroupElements)
  // rows one by one, 16-bit without AVX-512: dy and x̂ kept from the first pass, in this
  // thread's part of the caller's scratch (2 · N compute values)
  C* kept = grp == 1 && slow16 ? static_cast<C*>(a.scratch) : nullptr;
  // kDrop: a row's keep flags after those 2·N values (rows one by one), or the group's here
  const bool drop = a.flags & kDrop;
  int32_t* rfl = drop ? reinterpret_cast<int32_t*>(static_cast<C*>(a.scratch) + 2 * n) : nullptr;
  alignas(64) int32_t gfl[kGroupElements + kDropFlagsPad];
  for (int64_t k = k0; k < k1; k++) {
    const int64_t lo = k * a.rpb;
    const int64_t hi = lo + a.rpb < a.m ? lo + a.rpb : a.m;
    C* dw = (a.flags & kDw) ? at<C>(a.pw, k * n) : nullptr;
    C* db = (a.flags & kB) ? at<C>(a.pb, k * n) : nullptr;
    if (dw) memset(dw, 0, n * sizeof(C));  // +0.0: all bits zero
    if (db) memset(db, 0, n * sizeof(C));
    if (grp == 1) {
      for (int64_t i = lo; i < hi; i++) {
        grad_sums<X, O, FY>(a, i, q, kept ? kept + n : nullptr, kept);
        int64_t j0 = 0;
        if (stream) {
          j0 = int64_t(-reinterpret_cast<uintptr_t>(at<ST<X>>(a.dx, i * n)) % STREAM_ALIGN) / xb;
          if (j0 > n) j0 = n;
        }
        const int32_t* fl = drop ? fill_flags(a.drop, uint64_t(i * n), n, rfl) : nullptr;
        if (kept) {
          row_second_any<X, O, true, FY>(a, i, q, dw, db, kept, kept + n, j0, fl);
        } else {
          row_second_any<X, O, false, FY>(a, i, q, dw, db, nullptr, nullptr, j0, fl);
        }
      }
      continue;
    }
    for (int64_t i0 = lo; i0 < hi; i0 += grp) {
      const int64_t i1 = i0 + grp < hi ? i0 + grp : hi;
      int64_t i = i0;
      for (; i + 1 < i1; i += 2)
        grad_sums_pair<X, O, FY>(a, i, q + 3 * (i - i0), xg + (i - i0) * n);
      for (; i < i1; i++) grad_sums<X, O, FY>(a, i, q + 3 * (i - i0), xg + (i - i0) * n);
      const int32_t* fl =
          drop ? fill_flags(a.drop, uint64_t(i0 * n), (i1 - i0) * n, gfl) : nullptr;
      columns<X, O>(Columns<X, O>{i1 - i0, n, xg, at<ST<O>>(a.dy, i0 * n),
                                  a.dh ? at<ST<X>>(a.dh, i0 * a.dhrs) : nullptr, a.dhrs,
                                  at<ST<X>>(a.dx, i0 * n),
                                  q, static_cast<const C*>(a.g), dw, db, a.flags, a.nk, fl,
                                  drop ? at<ST<X>>(a.dxd, i0 * n) : nullptr, &a.drop});
    }
  }
  if (stream) store_fence();
}

// dγ (dβ) = Σ_k partial[k] in block order, then rounded once to out_kind.
template <class C>
void sum_blocks(int64_t nblk, int64_t n, void* partial, void* out, int out_kind) {
  constexpr int CK = kind_of_compute<C>();
  C* acc = static_cast<C*>(partial);
  const int64_t nv = n - n % W;
  for (int64_t k = 1; k < nblk; k++) {
    const C* p = acc + k * n;
    for (int64_t j = 0; j < nv; j += W) vstore<CK, C>(acc, j, vload<CK, C>(acc, j) + vload<CK, C>(p, j));
    for (int64_t j = nv; j < n; j++) acc[j] = acc[j] + p[j];
  }
  switch (out_kind) {
    case kFloat32:
      for (int64_t j = 0; j < n; j++) sstore<kF32, C>(out, j, acc[j]);
      break;
    case kFloat64:
      for (int64_t j = 0; j < n; j++) static_cast<double*>(out)[j] = double(acc[j]);
      break;
    case kBFloat16:
      for (int64_t j = 0; j < n; j++) sstore<kBF16, C>(out, j, acc[j]);
      break;
    default:
      for (int64_t j = 0; j < n; j++) sstore<kF16, C>(out, j, acc[j]);
      break;
  }
}

template <int K>
NK_INLINE void widen_from(const void* src, void* dst, bool to_double, int64_t n, bool add_one) {
  if (to_double) {
    double* d = static_cast<double*>(dst);
    for (int64_t j = 0; j < n; j++) {
      double v;
      if constexpr (K == kF64) {
        v = static_cast<const double*>(src)[j];
      } else {
        v = double(sload<K, float>(src, j));
      }
      d[j] = add_one ? v + 1.0 : v;
    }
  } else {
    if constexpr (K != kF64) {
      float* d = static_cast<float*>(dst);
      const int64_t nv = n - n % W;
      for (int64_t j = 0; j < nv; j += W) {
        VF v = vload<K, float>(src, j);
        vstore<kF32, float>(d, j, add_one ? v + 1.0f : v);
      }
      for (int64_t j = nv; j < n; j++) {
        float v = sload<K, float>(src, j);
        d[j] = add_one ? v + 1.0f : v;
      }
    }
  }
}

// f(std::integral_constant<int, K>{}) for the storage K of a dtype kind (kernels.h).
template <class F>
NK_INLINE void with_storage(int kind, F&& f) {
  switch (kind) {
    case kFloat32: f(std::integral_constant<int, kF32>{}); break;
    case kFloat64: f(std::integral_constant<int, kF64>{}); break;
    case kBFloat16: f(std::integral_constant<int, kBF16>{}); break;
    default: f(std::integral_constant<int, kF16>{}); break;
  }
}

void widen(const void* src, int kind, void* dst, bool to_double, int64_t n, bool add_one) {
  with_storage(kind, [&](auto k) {
    widen_from<decltype(k)::value>(src, dst, to_double, n, add_one);
  });
}

// The conversions alone, for the tests: n values of storage S at src to storage D at dst,
// through the vector spelling (mode 0, n a multiple of W) or the scalar one (1) — or rounded to D
// and back, kept in the compute type (2: vector, 3: scalar), as x̂ is for "llama"/"t5".
template <int S, int D>
void convert_as(const void* src, void* dst, int64_t n, int mode) {
  using C = typename std::conditional<S == kF64, double, float>::type;
  constexpr int CK = kind_of_compute<C>();
  for (int64_t j = 0; j < n; j += (mode % 2 == 0 ? W : 1)) {
    if (mode == 0) vstore<D, C>(dst, j, vload<S, C>(src, j));
    if (mode == 1) sstore<D, C>(dst, j, sload<S, C>(src, j));
    if (mode == 2) vstore<CK, C>(dst, j, vround<D, C>(vload<S, C>(src, j)));
    if (mode == 3) sstore<CK, C>(dst, j, sround<D, C>(sload<S, C>(src, j)));
  }
}

void convert(const void* src, int src_kind, void* dst, int dst_kind, int64_t n, int mode) {
  with_storage(src_kind, [&](auto s) {
    with_storage(dst_kind, [&](auto d) {
      convert_as<decltype(s)::value, decltype(d)::value>(src, dst, n, mode);
    });
  });
}

// ------------------------------------------------------------------------------------------
// The table
// ------------------------------------------------------------------------------------------

template <int X, int O>
void fill_fwd(Table& t) {
  t.fwd[X][O][kLnMul] = &fwd_rows<X, O, kLnMul>;
  t.fwd[X][O][kLnFma] = &fwd_rows<X, O, kLnFma>;
  t.fwd[X][O][kRmsMul] = &fwd_rows<X, O, kRmsMul>;
  if constexpr (X != kF64 && O != kF64) {  // casting rounds only with float32 statistics
    t.fwd[X][O][kLnRound] = &fwd_rows<X, O, kLnRound>;
    t.fwd[X][O][kRmsRound] = &fwd_rows<X, O, kRmsRound>;
  }
}

template <int X>
void fill_fwd_x(Table& t) {
  fill_fwd<X, kF32>(t);
  fill_fwd<X, kF64>(t);
  fill_fwd<X, kBF16>(t);
  fill_fwd<X, kF16>(t);
}

template <int X, int O>
void fill_bwd(Table& t) {
  t.bwd[X][O] = &bwd_blocks<X, O, false>;
  t.bwd_y[X][O] = &bwd_blocks<X, O, true>;
}

inline Table make_table(const char* name) {
  Table t{};
  t.name = name;
  fill_fwd_x<kF32>(t);
  fill_fwd_x<kF64>(t);
  fill_fwd_x<kBF16>(t);
  fill_fwd_x<kF16>(t);
  fill_bwd<kF32, kF32>(t);
  fill_bwd<kF64, kF64>(t);
  fill_bwd<kBF16, kBF16>(t);
  fill_bwd<kBF16, kF32>(t);
  fill_bwd<kF16, kF16>(t);
  fill_bwd<kF16, kF32>(t);
  t.sum[0] = &sum_blocks<float>;
  t.sum[1] = &sum_blocks<double>;
  t.widen = &widen;
  t.convert = &convert;
  t.drop[kF32] = &drop_apply<kF32>;
  t.drop[kF64] = &drop_apply<kF64>;
  t.drop[kBF16] = &drop_apply<kBF16>;
  t.drop[kF16] = &drop_apply<kF16>;
  return t;
}
