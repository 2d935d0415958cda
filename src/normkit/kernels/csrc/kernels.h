// The row kernels' interface: what host.cpp hands a kernel, and the table of kernels that each
// instruction-set path (isa_*.cpp, built from one source, rows.h) exports.  Plain C++ types
// only: no torch here, so the kernels know nothing of tensors, threads or allocation.
#pragma once

#include <cstdint>

namespace normkit {
namespace cpu {

// Storage kinds, in the order torch's dtypes are mapped to them (host.cpp: kind_of).
enum StorageKind : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3, kKinds = 4 };

// Flags of a launch.
enum Flag : int {
  kRes = 1,      // forward: h = x + residual is written, then normalized
  kW = 2,        // γ was given (only "round" outputs look: x̂·γ is rounded, see rows.h)
  kB = 4,        // forward: + β; backward: dβ wanted
  kRound = 16,   // "llama"/"t5" casting: x̂ rounded to FwdArgs::nk before γ
  kStats = 32,   // forward: the (M, 3) statistics [m1, dm, rstd] are written
  kDw = 128,     // backward: dγ wanted
  kStream = 256,  // outputs (y, dx) written with non-temporal stores
  kDrop = 4096     // forward: h = dropout(x) (+ residual) is written, then normalized (dropout.h);
                   // backward: dxd = mask·dx is written too
};

// Dropout before the residual add (dropout.h): element k of the rows is kept iff the 31-bit
// Philox value of (seed, k) is > keep_above, and then multiplied by scale (else by 0).
struct Dropout {
  uint64_t seed;
  int32_t keep_above;
  double scale;  // 1/(1-p), converted to the compute type
};
// int32 beyond N that a row's keep flags take in a backward thread's scratch (dropout.h:
// fill_flags; a chunk of flags starts up to 3 elements before the row and ends past it).
constexpr int64_t kDropFlagsPad = 256;

// One forward launch: rows [lo, hi) of an (M, N) input.  Element strides; y and h contiguous.
struct FwdArgs {
  int64_t n;
  int flags;
  int nk;          // kRound: the storage kind x̂ is rounded to
  bool rms;
  double eps;
  const void* x;   // row i at x + i·xrs (elements), N contiguous elements
  int64_t xrs;
  const void* r;   // kRes: the residual, row stride rrs
  int64_t rrs;
  void* h;         // kRes: h = x + r, (M, N) in x's kind; may be x or r (in place)
  void* y;         // (M, N) in the output kind; may be x (in place)
  const void* g;   // γ as the compute type: γ, 1 + γ (zero-centred), or ones without γ
  const void* b;   // β as the compute type, or null
  void* stats;     // kStats: (M, 3) in the compute type
  Dropout drop;    // kDrop: h = x·mask (+ r with kRes), row i's first element is k = i·N
};

// One backward launch: row blocks [k0, k1) of a partition of the M rows into blocks of rpb.
struct BwdArgs {
  int64_t m, n, rpb;
  int flags;
  int nk;
  bool rms;
  const void* x;      // (M, N) contiguous: the normalized input (h with a residual)
  const void* dy;     // (M, N) contiguous in the output kind of the kernel
  const void* dh;     // gradient of h, row stride dhrs; null: none (+0 is added)
  int64_t dhrs;
  void* dx;           // (M, N) in x's kind
  const void* g;      // γ (+1) as the compute type, or ones
  const void* stats;  // (M, 3) [m1, dm, rstd] in the compute type
  void* pw;           // kDw: partial dγ rows, one per block, compute type
  void* pb;           // kB: partial dβ rows
  void* scratch;      // 2·N compute values for the calling thread (host.cpp: one part a thread)
  // bwd_y (memory-efficient mode): x is the forward's output y, and x̂ = (y − β)·(1/γ)
  const void* yb;     // β as the compute type, or null (x̂ = y·(1/γ))
  const void* yg;     // 1/γ (1/(1 + γ) zero-centred; ones without γ) as the compute type
  // kDrop: the dropout before the fused residual add; dxd = mask·dx (dx rounded to x's kind
  // first, as if read back), the gradient of the dropout's input; scratch then holds
  // N + kDropFlagsPad int32 more (each row's keep flags)
  void* dxd;
  Dropout drop;
};

using FwdFn = void (*)(const FwdArgs&, int64_t lo, int64_t hi);
using BwdFn = void (*)(const BwdArgs&, int64_t k0, int64_t k1);
// out[j] = Σ_k partial[k, j] (k in order), rounded once to out_kind; partial row 0 is the sum.
using SumFn = void (*)(int64_t nblk, int64_t n, void* partial, void* out, int out_kind);
// dst[j] = src[j] (+ 1) in the compute type (float, or double with to_double); exact widening.
using WidenFn = void (*)(const void* src, int kind, void* dst, bool to_double, int64_t n,
                         bool add_one);
// The conversions alone, for the tests (rows.h: convert_as).
using ConvertFn = void (*)(const void* src, int src_kind, void* dst, int dst_kind, int64_t n,
                           int mode);

// dst[j] = src[j]·m(k + j), j < n, in one storage kind (dropout.h: drop_apply).
using DropFn = void (*)(const void* src, void* dst, int64_t n, const Dropout& d, uint64_t k);

// Forward variants: what the output loop computes (rows.h).
enum FwdVariant : int {
  kLnMul = 0,    // LayerNorm, y = x̂·γ
  kLnFma = 1,    // LayerNorm, y = x̂·γ + β (one fused multiply-add)
  kRmsMul = 2,   // RMSNorm, y = x̂·γ
  kLnRound = 3,  // "llama"/"t5": x̂ and x̂·γ rounded
  kRmsRound = 4,
  kVariants = 5
};

// GroupNorm (group.h, group_rows.h): one launch phase over units [lo, hi) of a (B, C, S)
// input (NCHW: element (b, c, s) at (b·C + c)·S + s) or a (B, S, C) one (channels-last: at
// (b·S + s)·C + c), G groups of C / G channels.  Phases and units: group_rows.h.
struct GroupArgs {
  int64_t nb, c, s, g;  // batch, channels, spatial size, groups
  int64_t sb, nsb;      // channels-last: spatial rows per block, blocks per sample
  bool cl;              // channels-last
  bool stream;          // the call's bytes beyond the caches: y / dx written with non-temporal
                        // stores, channels-last sums row by row (group_rows.h)
  double eps;
  const void* x;        // (B, C, S) or (B, S, C) contiguous
  void* y;              // forward: like x, x's kind
  const void* dy;       // backward: like x, x's kind
  void* dx;             // backward: like x, x's kind
  const void* w;        // γ (C,) in the compute type (ones without γ)
  const void* b;        // β (C,) in the compute type, or null
  void* stats;          // (B·G, 3) [m1, dm, rstd] in the compute type
  void* sums;           // backward: (2, B, C) per-sample Σ dy·x̂ and Σ dy per channel
  void* part;           // channels-last: (B·nsb, 2, C) block partial sums
  void* coef;           // channels-last: (B, 4, C) per-channel coefficients (group_rows.h)
};
using GroupFn = void (*)(const GroupArgs&, int phase, int64_t lo, int64_t hi);
// Norm + quantize (quant.h): y of the "torch" casting in float32, quantized per row with a float32
// scale.  f.y is the (M, N) output, one byte per element; f.flags never has kRound or kStream.
enum QuantKind : int { kFp8E4M3 = 0, kInt8 = 1, kQuantKinds = 2 };
struct QuantArgs {
  FwdArgs f;
  float* scales;  // (M,): each row's scale
  float scale;    // the static scale, or 0: each row's own (dynamic)
};
using QuantFn = void (*)(const QuantArgs&, int64_t lo, int64_t hi);
// The conversion alone, for the tests: n float32 values (n a multiple of 16) to q bytes.
using QConvertFn = void (*)(const float* src, int q_kind, uint8_t* dst, int64_t n);

struct Table {
  const char* name;
  FwdFn fwd[kKinds][kKinds][kVariants];  // [x][y]: null where not built (kRound on float64)
  // [x][dy]: built for dy in x's kind or in its compute type only (host.cpp widens another dy
  // first: exact)
  BwdFn bwd[kKinds][kKinds];
  BwdFn bwd_y[kKinds][kKinds];  // the same, x̂ recomputed from y (BwdArgs::yb, yg)
  SumFn sum[2];  // [compute type: float, double]
  WidenFn widen;
  ConvertFn convert;
  // GroupNorm, [x kind]: forward and backward phases (group_rows.h)
  GroupFn group_fwd[kKinds];
  GroupFn group_bwd[kKinds];
  // Norm + quantize (quant.h): [x kind][QuantKind][kLnMul, kLnFma or kRmsMul]; null for float64 x.
  QuantFn quant[kKinds][kQuantKinds][kRmsMul + 1];
  QConvertFn quant_convert;
  DropFn drop[kKinds];  // [x]
};

// One table per instruction-set path; null where this build has no such path.
const Table* table_generic();
const Table* table_avx2();
const Table* table_avx512();
const Table* table_avx512bf16();

}  // namespace cpu
}  // namespace normkit
