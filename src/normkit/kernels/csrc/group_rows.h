// GroupNorm's kernels, forward and backward, for NCHW and channels-last inputs: one source for
// every instruction-set path, included by isa_*.cpp after rows.h (whose row sums, statistics and
// formulas it reuses) and exported in the Table (kernels.h: group_fwd, group_bwd).
//
// A group of sample b is L = (C/G)·S values: the row of the LayerNorm contract.  The math
// (reference.group_norm) and the bits, per layout:
//
// * NCHW: a group is one contiguous row, so its statistics are rows.h's row_stats (the same
//   bits as layer_norm of that row, overflow rescaling included).
// * y = fma(v − m1, a_c, b_c), a_c = rstd·γ_c, b_c = fma(−dm, a_c, β_c) (β_c = 0 without β),
//   element by element (both layouts): torch's one multiply-add per element, after the
//   subtraction of the shift that keeps a group far from zero accurate (1e4 + 1e-2·noise: v − m1
//   is exact there, and |dm| ≤ σ, as the second pass guarantees, so b_c is near β_c).
// * channels-last: a group is C/G channels strided by C.  The shift m1 is the mean of the
//   group's values at its first ⌈16/(C/G)⌉ spatial positions (in s, then c order); each channel
//   accumulates d = v − m1 and d² (FMA) over the spatial positions of a block in order; the
//   blocks' sums are added in block order, the group's channels in channel order; dm = Σd/L,
//   var = Σd²/L − dm² and, where dm² > var, the moments are taken again about m1 + dm, as
//   rows.h does (and a group whose sums of squares overflow, again scaled by a power of two, as
//   row_stats does).  The blocks (sb spatial rows each) depend on S and C only.
// * backward: per channel and sample Σ dy·x̂ and Σ dy (the per-sample partials of dγ and dβ),
//   c1 = Σ_c γ_c·Σdy, c2 = Σ_c γ_c·Σ dy·x̂ (FMA, channel order); dγ/dβ = the per-sample
//   partials added in sample order (Table::sum).  NCHW: Σ dy·x̂ element by element, and
//   dx = fma(rstd, fma(x̂, −c2/L, fma(dy, γ_c, −c1/L)), 0), as rows.h's dx_of.  Channels-last,
//   the same algebra with the group's constants folded per channel: Σ dy·x̂ =
//   rstd·(Σ dy·(v − m1) − dm·Σ dy), and dx = rstd·fma(dy, γ_c, fma(v − m1, p, q)) with
//   p = rstd·(−c2/L), q = fma(−dm, p, −c1/L): three operations an element where there were six
//   (|dm| ≤ σ, so neither fold cancels more than a digit; rstd stays outside, as rstd² would
//   underflow for groups of |x| ≳ 1e19).
//
// So a sample's y and dx depend only on that sample, γ, β, ε and the shape of one sample; the
// bits of the two layouts differ (their sums run in different orders).

NK_INLINE int64_t lesser(int64_t p, int64_t q) { return p < q ? p : q; }

// One run of n output elements at y (a channel's S values, NCHW; a spatial row's C values,
// channels-last): vec(j, stream) computes and stores the W elements from j, one(j) element j.
// Streamed (GroupArgs::stream: the call's x, dy and output together pass stream_min_bytes, 3/4
// of the largest cache; non-temporal stores skip the read of each line a plain store costs, a
// third of a copy's traffic, and leave the caches to x: float32 (1, 64, 256, 256), whose 16 MiB
// y alone is below the threshold, ran 1.24x faster streamed): single elements up to the first
// STREAM_ALIGN boundary, so that every vector store is aligned.  Both compute each
// element with the same operations, so the split sets no bit.
template <int X, class Vf, class Sf>
NK_INLINE void out_run(const void* y, int64_t n, bool stream, const Vf& vec, const Sf& one) {
  int64_t j0 = 0;
  if (stream)
    j0 = lesser(n, int64_t(-reinterpret_cast<uintptr_t>(y) % STREAM_ALIGN) /
                       int64_t(sizeof(ST<X>)));
  const int64_t j1 = j0 + (n - j0) - (n - j0) % W;
  for (int64_t j = 0; j < j0; j++) one(j);
  if (stream) {
    for (int64_t j = j0; j < j1; j += W) vec(j, std::true_type{});
  } else {
    for (int64_t j = j0; j < j1; j += W) vec(j, std::false_type{});
  }
  for (int64_t j = j1; j < n; j++) one(j);
}

// channels-last: Σ over spatial rows [s0, s1) of t's terms, for every channel c < nc, into o1[c]
// and o2[c]: each channel in spatial order (lane-wise, so the vector grouping sets no bit).  Rows
// as x lies in memory, R at a time, the sums kept in o1/o2 (2·C values, in L1) between them: a
// walk down the block one group of channel vectors at a time ran at half the speed of torch's
// channels-last kernel (its strided reads are not a stream the prefetchers follow well).
// Returns the first row not taken (the last rows of a block that R does not divide).
template <int R, class C, class T>
NK_INLINE int64_t cl_rows(int64_t nc, int64_t s, int64_t s1, const T& t, C* o1, C* o2) {
  using V = Vec<C>;
  constexpr int CK = kind_of_compute<C>();
  const int64_t nv = nc - nc % W;
  for (; s + R <= s1; s += R) {
    for (int64_t j = 0; j < nv; j += W) {
      V a1 = vload<CK, C>(o1, j), a2 = vload<CK, C>(o2, j);
      for (int r = 0; r < R; r++) t.vec(s + r, j, a1, a2);
      vstore<CK, C>(o1, j, a1);
      vstore<CK, C>(o2, j, a2);
    }
    for (int64_t j = nv; j < nc; j++)
      for (int r = 0; r < R; r++) t.one(s + r, j, o1[j], o2[j]);
  }
  return s;
}

// cl_rows over a block: four rows at a time where the call's bytes fit in the caches (o1/o2
// loaded and stored once per four rows: 1.1-1.4x faster at (8, 1280, 16, 16) and (2, 320, 64,
// 64)), one at a time where x comes from memory (``far``: GroupArgs::stream), which ran 10-25%
// faster there ((4, 256, 128, 128), (8, 320, 64, 64), (16, 512, 32, 32)).  The same bits either
// way.
template <class C, class T>
NK_INLINE void cl_sums(int64_t nc, int64_t s0, int64_t s1, bool far, const T& t, C* o1, C* o2) {
  memset(o1, 0, nc * sizeof(C));  // +0.0: all bits zero
  memset(o2, 0, nc * sizeof(C));
  cl_rows<1>(nc, far ? s0 : cl_rows<4>(nc, s0, s1, t, o1, o2), s1, t, o1, o2);
}

// Forward moments about a per-channel shift: d = v − shift[c], terms d and d·d.  Element (s, c)
// of a (S, C) sample at x + s·C + c.
template <int X>
struct ClMoments {
  using C = CT<X>;
  const void* x;
  const C* shift;
  int64_t c;
  NK_INLINE void vec(int64_t s, int64_t j, Vec<C>& a1, Vec<C>& a2) const {
    Vec<C> d = vload<X, C>(x, s * c + j) - vload<kind_of_compute<C>(), C>(shift, j);
    a1 = a1 + d;
    a2 = vfma(d, d, a2);
  }
  NK_INLINE void one(int64_t s, int64_t j, C& a1, C& a2) const {
    C d = sload<X, C>(x, s * c + j) - shift[j];
    a1 = a1 + d;
    a2 = sfma(d, d, a2);
  }
};

// Backward sums: terms dy and dy·(v − m1), m1 a per-channel row.
template <int X>
struct ClGrads {
  using C = CT<X>;
  const void* x;
  const void* dy;
  const C* m1;
  int64_t c;
  NK_INLINE void vec(int64_t s, int64_t j, Vec<C>& a1, Vec<C>& a2) const {
    Vec<C> d = vload<X, C>(dy, s * c + j);
    a1 = a1 + d;
    a2 = vfma(d, vload<X, C>(x, s * c + j) - vload<kind_of_compute<C>(), C>(m1, j), a2);
  }
  NK_INLINE void one(int64_t s, int64_t j, C& a1, C& a2) const {
    C d = sload<X, C>(dy, s * c + j);
    a1 = a1 + d;
    a2 = sfma(d, sload<X, C>(x, s * c + j) - m1[j], a2);
  }
};

// NCHW backward sums over one channel's S contiguous values: dy and dy·x̂ (rows.h's row order).
template <int X>
struct ChanGrads {
  using C = CT<X>;
  const void* x;
  const void* dy;
  C m1, dm, rstd;
  NK_INLINE void vec(int64_t j, Vec<C>& a1, Vec<C>& a2) const {
    Vec<C> d = vload<X, C>(dy, j);
    a1 = a1 + d;
    a2 = vfma(d, x_hat(vload<X, C>(x, j), m1, dm, rstd), a2);
  }
  NK_INLINE void one(int64_t j, C& a1, C& a2) const {
    C d = sload<X, C>(dy, j);
    a1 = a1 + d;
    a2 = sfma(d, x_hat(sload<X, C>(x, j), m1, dm, rstd), a2);
  }
};

template <class C>
NK_INLINE C group_rstd(C var, C eps) {
  return rsqrt_of((C(0) > var ? C(0) : var) + eps);  // max(var, 0), a NaN var kept
}

// ------------------------------------------------------------------------------------------
// NCHW: one unit per (sample, group) row
// ------------------------------------------------------------------------------------------

template <int X>
void nchw_fwd(const GroupArgs& a, int64_t lo, int64_t hi) {
  using C = CT<X>;
  using V = Vec<C>;
  const int64_t cg = a.c / a.g, n = cg * a.s, s = a.s;
  const C* w = static_cast<const C*>(a.w);
  const C* b = static_cast<const C*>(a.b);
  for (int64_t r = lo; r < hi; r++) {
    const void* src = at<ST<X>>(a.x, r * n);
    void* y = at<ST<X>>(a.y, r * n);
    C m1, dm, rstd;
    row_stats<X>(src, n, false, C(a.eps), m1, dm, rstd);
    const int64_t c0 = (r % a.g) * cg;
    for (int64_t c = 0; c < cg; c++) {
      const void* xc = at<ST<X>>(src, c * s);
      void* yc = at<ST<X>>(y, c * s);
      const C ac = rstd * w[c0 + c], bc = sfma(-dm, ac, b ? b[c0 + c] : C(0));
      const V av = vsplat<C>(ac), bv = vsplat<C>(bc);
      out_run<X>(
          yc, s, a.stream,
          [&](int64_t j, auto stream) {
            vstore<X, C, decltype(stream)::value>(yc, j, vfma(vload<X, C>(xc, j) - m1, av, bv));
          },
          [&](int64_t j) { sstore<X, C>(yc, j, sfma(sload<X, C>(xc, j) - m1, ac, bc)); });
    }
    C* st = at<C>(a.stats, 3 * r);
    st[0] = m1;
    st[1] = dm;
    st[2] = rstd;
  }
  if (a.stream) store_fence();
}

template <int X>
void nchw_bwd(const GroupArgs& a, int64_t lo, int64_t hi) {
  using C = CT<X>;
  using V = Vec<C>;
  const int64_t cg = a.c / a.g, n = cg * a.s, s = a.s;
  const C* w = static_cast<const C*>(a.w);
  C* sw = static_cast<C*>(a.sums);  // Σ dy·x̂, then Σ dy at + B·C
  C* sb = sw + a.nb * a.c;
  const C nf = C(n);
  for (int64_t r = lo; r < hi; r++) {
    const C* st = at<C>(a.stats, 3 * r);
    const C m1 = st[0], dm = st[1], rstd = st[2];
    const int64_t c0 = (r / a.g) * a.c + (r % a.g) * cg;  // sample b's channel c0 in (B, C)
    const int64_t g0 = (r % a.g) * cg;
    C c1 = C(0), c2 = C(0);
    for (int64_t c = 0; c < cg; c++) {
      C s1, s2;
      row_sums<C>(s, ChanGrads<X>{at<ST<X>>(a.x, r * n + c * s), at<ST<X>>(a.dy, r * n + c * s),
                                  m1, dm, rstd},
                  s1, s2);
      sb[c0 + c] = s1;
      sw[c0 + c] = s2;
      c1 = sfma(w[g0 + c], s1, c1);
      c2 = sfma(w[g0 + c], s2, c2);
    }
    const C nc1 = -(c1 / nf), nc2 = -(c2 / nf);
    for (int64_t c = 0; c < cg; c++) {
      const void* xc = at<ST<X>>(a.x, r * n + c * s);
      const void* dyc = at<ST<X>>(a.dy, r * n + c * s);
      void* dxc = at<ST<X>>(a.dx, r * n + c * s);
      const C gc = w[g0 + c];
      const V gv = vsplat<C>(gc);
      out_run<X>(
          dxc, s, a.stream,
          [&](int64_t j, auto stream) {
            V xh = x_hat(vload<X, C>(xc, j), m1, dm, rstd);
            vstore<X, C, decltype(stream)::value>(
                dxc, j, dx_of(vload<X, C>(dyc, j), xh, gv, nc1, nc2, rstd, vzero<C>()));
          },
          [&](int64_t j) {
            C xh = x_hat(sload<X, C>(xc, j), m1, dm, rstd);
            sstore<X, C>(dxc, j, dx_of(sload<X, C>(dyc, j), xh, gc, nc1, nc2, rstd, C(0)));
          });
    }
  }
  if (a.stream) store_fence();
}

// ------------------------------------------------------------------------------------------
// channels-last: phases over samples (units b) and spatial blocks (units b·nsb + k)
// ------------------------------------------------------------------------------------------

// coef row k (of 4) of sample b, and block k's partial sums (2 rows of C) of unit u
template <class C>
NK_INLINE C* coef_row(const GroupArgs& a, int64_t b, int k) {
  return at<C>(a.coef, (b * 4 + k) * a.c);
}
template <class C>
NK_INLINE C* part_row(const GroupArgs& a, int64_t u, int k) {
  return at<C>(a.part, (u * 2 + k) * a.c);
}

// out = p (k = 0) or out + p (k > 0), for every channel: block k's partial sums added to the
// sample's running sums, the blocks in order.
template <class C>
NK_INLINE void add_block(int64_t nc, int64_t k, const C* p, C* out) {
  constexpr int CK = kind_of_compute<C>();
  const int64_t nv = nc - nc % W;
  if (k == 0) {
    memcpy(out, p, nc * sizeof(C));
    return;
  }
  for (int64_t j = 0; j < nv; j += W)
    vstore<CK, C>(out, j, vload<CK, C>(out, j) + vload<CK, C>(p, j));
  for (int64_t j = nv; j < nc; j++) out[j] = out[j] + p[j];
}

// Σ_k part[b·nsb + k][row] for every channel (blocks in order), into out.
template <class C>
NK_INLINE void merge_blocks(const GroupArgs& a, int64_t b, int row, C* out) {
  for (int64_t k = 0; k < a.nsb; k++) add_block<C>(a.c, k, part_row<C>(a, b * a.nsb + k, row), out);
}

// Forward phase 0 (per sample): each channel's shift m1 of its group, in coef row 0.
template <int X>
void cl_shift(const GroupArgs& a, int64_t b) {
  using C = CT<X>;
  const int64_t cg = a.c / a.g;
  const int64_t ns = lesser(a.s, (W + cg - 1) / cg);
  const void* x = at<ST<X>>(a.x, b * a.s * a.c);
  C* m1 = coef_row<C>(a, b, 0);
  for (int64_t g = 0; g < a.g; g++) {
    C t = C(0);
    for (int64_t s = 0; s < ns; s++)
      for (int64_t c = g * cg; c < (g + 1) * cg; c++) t = t + sload<X, C>(x, s * a.c + c);
    t = t / C(ns * cg);
    for (int64_t c = g * cg; c < (g + 1) * cg; c++) m1[c] = t;
  }
}

// Σ (sc·v − shift) and Σ (sc·v − shift)² of group g of sample b, one channel after another,
// each in spatial order: the rare second passes (dm² > var; sums of squares that overflow, sc
// then a power of two as in rows.h's row_stats) — serial, their own order.
template <int X>
void cl_group_moments(const GroupArgs& a, int64_t b, int64_t g, CT<X> shift, CT<X> sc,
                      CT<X>& s1, CT<X>& s2) {
  using C = CT<X>;
  const int64_t cg = a.c / a.g;
  const void* x = at<ST<X>>(a.x, b * a.s * a.c);
  s1 = s2 = C(0);
  for (int64_t c = g * cg; c < (g + 1) * cg; c++) {
    C t1 = C(0), t2 = C(0);
    for (int64_t s = 0; s < a.s; s++) {
      C d = sload<X, C>(x, s * a.c + c) * sc - shift;
      t1 = t1 + d;
      t2 = sfma(d, d, t2);
    }
    s1 = s1 + t1;
    s2 = s2 + t2;
  }
}

// Forward phase 2 (per sample), after the blocks' sums are merged into coef rows 1 and 2: the
// statistics, per group into stats and per channel into coef rows 0-2 (m1, b_c, a_c).
template <int X>
void cl_stats(const GroupArgs& a, int64_t b) {
  using C = CT<X>;
  const int64_t cg = a.c / a.g;
  const C nf = C(cg * a.s), e = C(a.eps);
  C* m1 = coef_row<C>(a, b, 0);
  C* t1 = coef_row<C>(a, b, 1);  // the merged sums, overwritten below by dm and rstd
  C* t2 = coef_row<C>(a, b, 2);
  for (int64_t g = 0; g < a.g; g++) {
    C s1 = C(0), s2 = C(0);
    for (int64_t c = g * cg; c < (g + 1) * cg; c++) {
      s1 = s1 + t1[c];
      s2 = s2 + t2[c];
    }
    C sh = m1[g * cg];
    C dm = s1 / nf;
    C var = s2 / nf - dm * dm;
    if (dm * dm > var) {
      sh = sh + dm;
      cl_group_moments<X>(a, b, g, sh, C(1), s1, s2);
      dm = s1 / nf;
      var = s2 / nf - dm * dm;
    }
    C rstd = group_rstd(var, e);
    if (__builtin_expect(!((C(0) > var ? C(0) : var) + e <= std::numeric_limits<C>::max()), 0)) {
      // finite values whose squares overflow: the group again, scaled by the power of two that
      // brings its largest |v| into [1, 2) (exact), and the moments scaled back
      C amax = C(0);
      const void* x = at<ST<X>>(a.x, b * a.s * a.c);
      for (int64_t s = 0; s < a.s; s++)
        for (int64_t c = g * cg; c < (g + 1) * cg; c++) {
          C v = sload<X, C>(x, s * a.c + c);
          v = v < C(0) ? -v : v;
          amax = v > amax || !(v == v) ? v : amax;
        }
      if (amax <= std::numeric_limits<C>::max() && amax > C(0)) {
        const C sc = std::ldexp(C(1), -std::ilogb(amax));
        C shs = sh * sc;
        cl_group_moments<X>(a, b, g, shs, sc, s1, s2);
        C dms = s1 / nf, vs = s2 / nf - dms * dms;
        if (dms * dms > vs) {
          shs = shs + dms;
          cl_group_moments<X>(a, b, g, shs, sc, s1, s2);
          dms = s1 / nf;
          vs = s2 / nf - dms * dms;
        }
        sh = shs / sc;
        dm = dms / sc;
        rstd = rsqrt_of((C(0) > vs ? C(0) : vs) + e * sc * sc) * sc;
      }
    }
    C* st = at<C>(a.stats, 3 * (b * a.g + g));
    st[0] = sh;
    st[1] = dm;
    st[2] = rstd;
    const C* w = static_cast<const C*>(a.w);
    const C* bb = static_cast<const C*>(a.b);
    for (int64_t c = g * cg; c < (g + 1) * cg; c++) {
      m1[c] = sh;
      t2[c] = rstd * w[c];
      t1[c] = sfma(-dm, t2[c], bb ? bb[c] : C(0));
    }
  }
}

// Per-channel coef row 0 (m1) from stats (backward phase 0).
template <class C>
void cl_expand(const GroupArgs& a, int64_t b) {
  const int64_t cg = a.c / a.g;
  C* m1 = coef_row<C>(a, b, 0);
  for (int64_t g = 0; g < a.g; g++) {
    const C shift = at<C>(a.stats, 3 * (b * a.g + g))[0];
    for (int64_t c = g * cg; c < (g + 1) * cg; c++) m1[c] = shift;
  }
}

// Backward phase 2 (per sample), after the blocks' Σ dy and Σ dy·(v − m1) per channel are merged
// into sums: the second made Σ dy·x̂, and per channel q, rstd and p into coef rows 1-3.
template <class C>
void cl_coefs(const GroupArgs& a, int64_t b) {
  const int64_t cg = a.c / a.g;
  const C nf = C(cg * a.s);
  C* sw = at<C>(a.sums, b * a.c);
  const C* sb = at<C>(a.sums, (a.nb + b) * a.c);
  const C* w = static_cast<const C*>(a.w);
  C* kq = coef_row<C>(a, b, 1);
  C* kr = coef_row<C>(a, b, 2);
  C* kp = coef_row<C>(a, b, 3);
  for (int64_t g = 0; g < a.g; g++) {
    const C* st = at<C>(a.stats, 3 * (b * a.g + g));
    const C dm = st[1], rstd = st[2];
    C c1 = C(0), c2 = C(0);
    for (int64_t c = g * cg; c < (g + 1) * cg; c++) {
      sw[c] = rstd * sfma(-dm, sb[c], sw[c]);
      c1 = sfma(w[c], sb[c], c1);
      c2 = sfma(w[c], sw[c], c2);
    }
    const C p = rstd * -(c2 / nf), q = sfma(-dm, p, -(c1 / nf));
    for (int64_t c = g * cg; c < (g + 1) * cg; c++) {
      kq[c] = q;
      kr[c] = rstd;
      kp[c] = p;
    }
  }
}

// Phase 3: y (forward) or dx (backward) of the spatial rows of one block.
template <int X, bool BWD>
void cl_out(const GroupArgs& a, int64_t u) {
  using C = CT<X>;
  using V = Vec<C>;
  constexpr int CK = kind_of_compute<C>();
  const int64_t b = u / a.nsb, k = u % a.nsb, nc = a.c;
  const int64_t s0 = k * a.sb, s1 = lesser(a.s, s0 + a.sb);
  const C* m1 = coef_row<C>(a, b, 0);
  const C* k1 = coef_row<C>(a, b, 1);  // forward b_c, backward q
  const C* k2 = coef_row<C>(a, b, 2);  // forward a_c, backward rstd
  const C* k3 = coef_row<C>(a, b, 3);  // backward p
  const C* w = static_cast<const C*>(a.w);
  for (int64_t s = s0; s < s1; s++) {
    const int64_t o = (b * a.s + s) * nc;
    const void* x = at<ST<X>>(a.x, o);
    const void* dy = BWD ? at<ST<X>>(a.dy, o) : nullptr;
    void* out = at<ST<X>>(BWD ? a.dx : a.y, o);
    out_run<X>(
        out, nc, a.stream,
        [&](int64_t j, auto stream) {
          constexpr bool ST_ = decltype(stream)::value;
          V t = vload<X, C>(x, j) - vload<CK, C>(m1, j);
          if constexpr (BWD) {
            V u = vfma(t, vload<CK, C>(k3, j), vload<CK, C>(k1, j));
            vstore<X, C, ST_>(out, j,
                              vload<CK, C>(k2, j) *
                                  vfma(vload<X, C>(dy, j), vload<CK, C>(w, j), u));
          } else {
            vstore<X, C, ST_>(out, j, vfma(t, vload<CK, C>(k2, j), vload<CK, C>(k1, j)));
          }
        },
        [&](int64_t j) {
          C t = sload<X, C>(x, j) - m1[j];
          if constexpr (BWD) {
            sstore<X, C>(out, j, k2[j] * sfma(sload<X, C>(dy, j), w[j], sfma(t, k3[j], k1[j])));
          } else {
            sstore<X, C>(out, j, sfma(t, k2[j], k1[j]));
          }
        });
  }
}

// The rows the merged sums of sample b go to: Σ t1 and Σ t2 (forward: coef rows 1 and 2;
// backward: Σ dy and Σ dy·(v − m1) in sums, the second made Σ dy·x̂ by cl_coefs).
template <class C, bool BWD>
NK_INLINE C* merged_row(const GroupArgs& a, int64_t b, int k) {
  if constexpr (BWD) return at<C>(a.sums, ((k == 0 ? a.nb : 0) + b) * a.c);
  return coef_row<C>(a, b, 1 + k);
}

// Block u's sums (phase 1) into part row ``into`` (u, or the sample's first block when the
// sample runs whole and merges as it goes).
template <int X, bool BWD>
NK_INLINE void cl_block_sums(const GroupArgs& a, int64_t u, int64_t into) {
  using C = CT<X>;
  const int64_t b = u / a.nsb, s0 = (u % a.nsb) * a.sb, s1 = lesser(a.s, s0 + a.sb);
  const int64_t o = b * a.s * a.c;
  C* p1 = part_row<C>(a, into, 0);
  C* p2 = part_row<C>(a, into, 1);
  if constexpr (BWD) {
    cl_sums<C>(a.c, s0, s1, a.stream,
               ClGrads<X>{at<ST<X>>(a.x, o), at<ST<X>>(a.dy, o), coef_row<C>(a, b, 0), a.c},
               p1, p2);
  } else {
    cl_sums<C>(a.c, s0, s1, a.stream, ClMoments<X>{at<ST<X>>(a.x, o), coef_row<C>(a, b, 0), a.c},
               p1, p2);
  }
}

// The phases (host: group.cpp).  NCHW: phase 0 only, units B·G.  Channels-last, units
// [lo, hi) of samples (phases 0, 2, 4) or of their spatial blocks (b·nsb + k: phases 1, 3):
// 0 the shift (forward) or the per-channel statistics (backward), 1 the blocks' sums, 2 their
// merge and the per-channel coefficients, 3 y or dx; or 4: phases 0-3 of whole samples, one
// after another on one thread (the sample's x still in its caches for phase 3), each block's
// sums merged as soon as they are taken: the same additions in the same order, so the same
// bits as phases 0-3.
template <int X, bool BWD>
void group_phase(const GroupArgs& a, int phase, int64_t lo, int64_t hi) {
  using C = CT<X>;
  if (!a.cl) return BWD ? nchw_bwd<X>(a, lo, hi) : nchw_fwd<X>(a, lo, hi);
  for (int64_t u = lo; u < hi; u++) {
    const int64_t b = phase % 2 ? u / a.nsb : u;
    if (phase == 0 || phase == 4) {
      if constexpr (BWD) {
        cl_expand<C>(a, b);
      } else {
        cl_shift<X>(a, b);
      }
    }
    if (phase == 1) cl_block_sums<X, BWD>(a, u, u);
    if (phase == 4) {
      for (int64_t k = 0; k < a.nsb; k++) {
        cl_block_sums<X, BWD>(a, b * a.nsb + k, b * a.nsb);
        for (int r = 0; r < 2; r++)
          add_block<C>(a.c, k, part_row<C>(a, b * a.nsb, r), merged_row<C, BWD>(a, b, r));
      }
    }
    if (phase == 2)
      for (int r = 0; r < 2; r++) merge_blocks<C>(a, b, r, merged_row<C, BWD>(a, b, r));
    if (phase == 2 || phase == 4) {
      if constexpr (BWD) {
        cl_coefs<C>(a, b);
      } else {
        cl_stats<X>(a, b);
      }
    }
    if (phase == 3) cl_out<X, BWD>(a, u);
    if (phase == 4)
      for (int64_t k = 0; k < a.nsb; k++) cl_out<X, BWD>(a, b * a.nsb + k);
  }
  if ((phase == 3 || phase == 4) && a.stream) store_fence();
}

inline Table with_group(Table t) {
  t.group_fwd[kFloat32] = &group_phase<kF32, false>;
  t.group_fwd[kFloat64] = &group_phase<kF64, false>;
  t.group_fwd[kBFloat16] = &group_phase<kBF16, false>;
  t.group_fwd[kFloat16] = &group_phase<kF16, false>;
  t.group_bwd[kFloat32] = &group_phase<kF32, true>;
  t.group_bwd[kFloat64] = &group_phase<kF64, true>;
  t.group_bwd[kBFloat16] = &group_phase<kBF16, true>;
  t.group_bwd[kFloat16] = &group_phase<kF16, true>;
  return t;
}
