// Norm + quantize in one pass, for serving: y as the "torch"/"gemma" casting computes it in
// float32 (rows.h: y_of, the value before any rounding to an output dtype, so nothing is rounded
// twice), quantized per row to float8_e4m3fn or int8 with a float32 scale s per row:
//
//   dynamic:  s = amax_j |y_j| / qmax, at least QFLOOR (qmax: 448 for e4m3, 127 for int8); a NaN
//             anywhere in the row makes s NaN (and every q of the row NaN / 0, below)
//   static:   s as given
//   q_j = sat(rne(y_j · r)),  r = 1/s rounded to float32 once per row
//
// e4m3: y·r saturated to ±448, then torch's float32 → float8_e4m3fn conversion (e4m3_abs: round to
// nearest even, NaN kept with its sign); int8: a NaN becomes 0, then saturated to [−128, 127] and
// rounded to nearest even.  One spelling for every path and for the scalar tail (a row's last
// n % W elements go through the vector code in a zero-padded lane array), so the bits are the
// same on every instruction set, as rows.h's.
//
// The row's amax needs every y before the first q: the dynamic scale computes y twice, once for
// the amax and again (the same operations, so the same bits) while quantizing, reading the row
// again from L1/L2 rather than keeping y in scratch.
//
// Included by the isa_*.cpp translation units after rows.h, inside their namespace.

constexpr float kE4m3Max = 448.0f;
constexpr float kInt8Max = 127.0f;
// The smallest dynamic scale, so that an all-zero row quantizes to zeros (0·(1/s), not 0·∞):
// e4m3 1/(448·512), as vLLM's per-token fp8 quantization; int8: 2^-23 (float32's eps).
constexpr float kE4m3Floor = 1.0f / (448.0f * 512.0f);
constexpr float kInt8Floor = 1.0f / 8388608.0f;

typedef uint8_t NB __attribute__((vector_size(LF)));  // LF bytes: one native vector's q

// torch's float32 → float8_e4m3fn (c10 fp8e4m3fn_from_fp32_value) on the bits a of LF lanes
// of |t| ≤ 448 (or NaN, which gives 0x7F): below 2^-6 the value is rounded by one float
// addition of 2^14 (the subnormals' grid), above it by adding 2^19 − 1 plus the lowest kept
// bit (448 and what rounds to it give 0x7E: no carry into the NaN pattern).  a has no sign
// bit, so signed compares order it as unsigned ones would (one instruction on AVX2).
NK_INLINE NU e4m3_abs(NU a) {
  const NU z = NU{};
  const NI ai = (NI)a, zi = NI{};
  const uint32_t denorm = 141u << 23;
  NU sub = (NU)((NF)a + bits_f32(denorm)) - denorm;
  NU nrm = (a + (uint32_t(7 - 127) << 23) + 0x7FFFFu + ((a >> 20) & 1u)) >> 20;
  NU r = ai < (zi + int32_t(121u << 23)) ? sub : nrm;
  return ai > (zi + 0x7F800000) ? z + 0x7Fu : r;
}

// The q byte of each of LF values t = y·r, in the low byte of its lane (the rest zero).
// e4m3: |t| saturated to 448 (torch's .to() saturates the same way from 448 on), converted,
// the sign put back — torch's bits for every float32, a NaN's sign included.
template <int Q>
NK_INLINE NU q_lanes(NF t) {
  const NF z = NF{};
  if constexpr (Q == kFp8E4M3) {
    const NU u = (NU)t;
    const NU sign = u & 0x80000000u;
    NF m = (NF)(u ^ sign);
    m = m > z + kE4m3Max ? z + kE4m3Max : m;  // a NaN compares false: kept
    return e4m3_abs((NU)m) | (sign >> 24);
  } else {
    t = t != t ? z : t;
    t = t < z - 128.0f ? z - 128.0f : t;
    t = t > z + kInt8Max ? z + kInt8Max : t;
    // |t| ≤ 128: adding and subtracting 1.5·2^23 rounds it to an integer, to nearest even
    t = (t + 12582912.0f) - 12582912.0f;
    return (NU)__builtin_convertvector(t, NI) & 0xFFu;
  }
}

// The 16 q bytes of t, stored at p.  x86: packed in registers (GCC's generic narrowing takes
// each lane out one by one, which made the output loop 3x slower than the float one).
template <int Q>
NK_INLINE void store_q(uint8_t* p, VF t) {
#if defined(NK_ISA_AVX512)
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm512_cvtepi32_epi8((__m512i)q_lanes<Q>(t.p[0])));
#elif defined(NK_ISA_AVX2)
  // words a0-3 b0-3 a4-7 b4-7 (the packs work within 128-bit halves), then in order
  __m256i w = _mm256_packus_epi32((__m256i)q_lanes<Q>(t.p[0]), (__m256i)q_lanes<Q>(t.p[1]));
  w = _mm256_permute4x64_epi64(w, 0xD8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_packus_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1)));
#else
  for (int k = 0; k < KF; k++) {
    NB b = __builtin_convertvector(q_lanes<Q>(t.p[k]), NB);
    memcpy(p + k * LF, &b, LF);
  }
#endif
}

// |y| folded into the running maximum m, lane-wise; once a lane has seen a NaN it stays NaN.
NK_INLINE NF amax_step(NF m, NF y) {
  NF a = (NF)((NU)y & 0x7FFFFFFFu);
  return (a > m) | (a != a) ? a : m;
}
NK_INLINE float amax_step(float m, float y) {
  float a = y < 0.0f ? -y : y;
  return (a > m) || (a != a) ? a : m;
}

// The largest |y| of a row (NaN if any y is NaN).
template <int X, int VAR>
NK_INLINE float row_amax(const void* src, int64_t n, const float* g, const float* b, float m1,
                         float dm, float rstd, int flags) {
  using V = Vec<float>;
  const int64_t nv = n - n % W;
  V acc = vzero<float>();
  for (int64_t j = 0; j < nv; j += W) {
    V gj = vload<kF32, float>(g, j);
    V bj = VAR == kLnFma ? vload<kF32, float>(b, j) : gj;
    V y = y_of<kF32, VAR>(vload<X, float>(src, j), gj, bj, m1, dm, rstd, flags, -1);
    for (int k = 0; k < KF; k++) acc.p[k] = amax_step(acc.p[k], y.p[k]);
  }
  float m = 0.0f;
  for (int k = 0; k < KF; k++)
    for (int i = 0; i < LF; i++) m = amax_step(m, acc.p[k][i]);
  for (int64_t j = nv; j < n; j++)
    m = amax_step(m, y_of<kF32, VAR>(sload<X, float>(src, j), g[j], b ? b[j] : 0.0f, m1, dm,
                                      rstd, flags, -1));
  return m;
}

// q of one row, with r = 1/s; the next row's inputs (px, pr) are fetched meanwhile.
template <int X, int Q, int VAR>
NK_INLINE void quant_row(const void* src, uint8_t* q, int64_t n, const float* g, const float* b,
                         float m1, float dm, float rstd, float r, int flags, const void* px,
                         const void* pr) {
  using V = Vec<float>;
  const int64_t nv = n - n % W;
  const int64_t xb = int64_t(sizeof(ST<X>));
  for (int64_t j = 0; j < nv; j += W) {
    prefetch_l2(ahead(px, j * xb));
    if (flags & kRes) prefetch_l2(ahead(pr, j * xb));
    V gj = vload<kF32, float>(g, j);
    V bj = VAR == kLnFma ? vload<kF32, float>(b, j) : gj;
    store_q<Q>(q + j, y_of<kF32, VAR>(vload<X, float>(src, j), gj, bj, m1, dm, rstd, flags, -1) *
                          r);
  }
  if (nv < n) {  // the tail, zero-padded to a vector (one spelling of the conversion)
    float t[W] = {};
    for (int64_t j = nv; j < n; j++)
      t[j - nv] = y_of<kF32, VAR>(sload<X, float>(src, j), g[j], b ? b[j] : 0.0f, m1, dm, rstd,
                                  flags, -1) *
                  r;
    uint8_t bytes[W];
    store_q<Q>(bytes, vload<kF32, float>(t, 0));
    memcpy(q + nv, bytes, size_t(n - nv));
  }
}

template <int X, int Q, int VAR>
void quant_rows(const QuantArgs& qa, int64_t lo, int64_t hi) {
  const FwdArgs& a = qa.f;
  const int64_t n = a.n;
  const int64_t xb = int64_t(sizeof(ST<X>));
  const float e = float(a.eps);
  const float* g = static_cast<const float*>(a.g);
  const float* b = static_cast<const float*>(a.b);
  constexpr bool rms = VAR == kRmsMul;
  constexpr float qmax = Q == kFp8E4M3 ? kE4m3Max : kInt8Max;
  constexpr float floor = Q == kFp8E4M3 ? kE4m3Floor : kInt8Floor;
  for (int64_t i = lo; i < hi; i++) {
    const void* src = at<ST<X>>(a.x, i * a.xrs);
    if (a.flags & kRes) {
      void* h = at<ST<X>>(a.h, i * n);
      add_row<X>(src, at<ST<X>>(a.r, i * a.rrs), h, n);
      src = h;
    }
    float m1, dm, rstd;
    row_stats<X>(src, n, rms, e, m1, dm, rstd);
    float s = qa.scale;
    if (!(s > 0.0f)) {  // dynamic
      s = row_amax<X, VAR>(src, n, g, b, m1, dm, rstd, a.flags) / qmax;
      s = s < floor ? floor : s;  // a NaN compares false: kept
    }
    const void* px = ahead(a.x, (i + 1) * a.xrs * xb);
    const void* pr = (a.flags & kRes) ? ahead(a.r, (i + 1) * a.rrs * xb) : px;
    quant_row<X, Q, VAR>(src, at<uint8_t>(a.y, i * n), n, g, b, m1, dm, rstd, 1.0f / s,
                         a.flags, px, pr);
    qa.scales[i] = s;
    if (a.flags & kStats) {
      float* st = at<float>(a.stats, 3 * i);
      st[0] = m1;
      st[1] = dm;
      st[2] = rstd;
    }
  }
}

// The conversion alone, for the tests: n float32 values (n a multiple of W) to q bytes of kind
// Q (no scale: t = the value).
void quant_convert(const float* src, int q_kind, uint8_t* dst, int64_t n) {
  for (int64_t j = 0; j < n; j += W) {
    VF t = vload<kF32, float>(src, j);
    if (q_kind == kFp8E4M3) {
      store_q<kFp8E4M3>(dst + j, t);
    } else {
      store_q<kInt8>(dst + j, t);
    }
  }
}

template <int X, int Q>
void fill_quant_xq(Table& t) {
  t.quant[X][Q][kLnMul] = &quant_rows<X, Q, kLnMul>;
  t.quant[X][Q][kLnFma] = &quant_rows<X, Q, kLnFma>;
  t.quant[X][Q][kRmsMul] = &quant_rows<X, Q, kRmsMul>;
}

// make_table's table with the quantizing kernels (float32, bfloat16 and float16 x).
inline Table with_quant(Table t) {
  fill_quant_xq<kF32, kFp8E4M3>(t);
  fill_quant_xq<kF32, kInt8>(t);
  fill_quant_xq<kBF16, kFp8E4M3>(t);
  fill_quant_xq<kBF16, kInt8>(t);
  fill_quant_xq<kF16, kFp8E4M3>(t);
  fill_quant_xq<kF16, kInt8>(t);
  t.quant_convert = &quant_convert;
  return t;
}
