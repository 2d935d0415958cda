// The host side of the CPU kernels: tensors in, tensors out.  normkit.kernels._cpu, the Python
// extension module built when the package is installed (setup.py).
//
// * forward / backward: the backend functions functional.py calls on (M, N) rows, with every
//   option (casting, zero-centred γ, out= / residual_out=, statistics for the backward).
// * run: the eager call in its common form (contiguous x, 1-D γ/β in the kernels' dtype,
//   "torch" casting), inference or training, checked, allocated and launched here, with a C++
//   autograd node.  At a few rows the op is all overhead: torch's own LayerNorm costs ~3 µs at
//   M=1; the Python checks and allocation around a kernel took ~5 µs, and a Python
//   autograd.Function costs the engine ~15 µs more per backward than a C++ node.  Anything it
//   does not cover returns None, and functional.py takes the general path, which validates
//   everything and raises the named errors.
//
// Layers below: dispatch (which instruction-set path), launch (threads), buffers (pool,
// scratch), kernels (the row functions).  Nothing here runs at import beyond registering the
// module's functions.

#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros_like.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <optional>
#include <string>
#include <tuple>

#include "buffers.h"
#include "dispatch.h"
#include "group.h"
#include "kernels.h"
#include "kinds.h"
#include "launch.h"

#ifndef NK_TORCH_VERSION
#define NK_TORCH_VERSION "unknown"
#endif
#ifndef NK_BUILD_FLAGS
#define NK_BUILD_FLAGS "unknown"
#endif

namespace py = pybind11;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Opt = std::optional<at::Tensor>;

namespace normkit {
namespace cpu {
namespace {

at::ScalarType compute_dtype(int x_kind) { return x_kind == kFloat64 ? at::kDouble : at::kFloat; }

void* ptr(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// γ (or β) as the kernels read it: the compute type, 1 added for a zero-centred γ, ones
// without one.  The tensor's own memory where that is already it; else a widened copy in this
// thread's scratch (exact: a 16-bit or float32 value widens without rounding).
const void* param_row(const at::Tensor& p, bool add_one, bool f64, int64_t n, ScratchSlot slot,
                      bool ones_if_absent) {
  if (!p.defined()) return ones_if_absent ? ones_row(n, f64) : nullptr;
  const int k = kind_of(p.scalar_type());
  if (!add_one && k == (f64 ? kFloat64 : kFloat32)) return p.data_ptr();
  void* buf = scratch(slot, n * (f64 ? 8 : 4));
  kernels()->widen(p.data_ptr(), k, buf, f64, n, add_one);
  return buf;
}

// The backward's partition of the rows into blocks: contiguous blocks of at least kBlockRows
// rows, at most kMaxBlocks — or, for fewer rows than two such blocks, blocks of at least
// kBlockElements elements — and a partition of fewer than kMinParBlocks blocks is one block.
// A function of M and N only, so dγ/dβ (one partial row per block, summed in block order) have
// the same bits whatever the thread count.  Blocks are also the unit of parallel work.  A
// backward of fewer than kMinParBlocks blocks runs on one thread whatever its size: two
// threads gained at most 15% at M = 8, and on one thread several blocks only cost (each zeroes
// its partial rows, and they are summed after: 8x8192 float32, one core, 4 blocks 37.6 µs,
// one 27.5).
constexpr int64_t kMaxBlocks = 64, kBlockRows = 16, kBlockElements = int64_t(1) << 14,
                  kMinParBlocks = 8;

int64_t bwd_blocks(int64_t m, int64_t n) {
  int64_t nblk = m >= 2 * kBlockRows ? std::min(kMaxBlocks, m / kBlockRows)
                                     : std::max<int64_t>(1, std::min(m, m * n / kBlockElements));
  return nblk >= kMinParBlocks ? nblk : 1;
}

int64_t stream_flag(int64_t elements, at::ScalarType dtype) {
  return elements * int64_t(c10::elementSize(dtype)) >= stream_min_bytes() ? kStream : 0;
}

// The fields of a forward launch that every output kind shares: x's rows, the residual and h,
// the output rows y (a float kind, or quantized bytes), γ and β as compute-type rows, the
// statistics.  The caller adds what is its own (streamed stores, dropout, a quantized scale).
FwdArgs fwd_args(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                 const at::Tensor& r, const at::Tensor& h, void* y, const at::Tensor& stats,
                 double eps, bool rms, bool zc, int nk) {
  const int64_t n = x.size(1);
  const bool f64 = kind_of(x.scalar_type()) == kFloat64;
  FwdArgs a{};
  a.n = n;
  a.rms = rms;
  a.eps = eps;
  a.nk = nk;
  a.flags = (w.defined() ? kW : 0) | (b.defined() ? kB : 0) | (nk >= 0 ? kRound : 0) |
            (stats.defined() ? kStats : 0);
  a.x = x.data_ptr();
  a.xrs = x.stride(0);
  if (r.defined()) {
    a.flags |= kRes;
    a.r = r.data_ptr();
    a.rrs = r.stride(0);
    a.h = h.data_ptr();
  }
  a.y = y;
  a.g = param_row(w, zc, f64, n, kScratchGamma, true);
  a.b = param_row(b, false, f64, n, kScratchBeta, false);
  a.stats = ptr(stats);
  return a;
}

// Forward of the (M, N) rows of x (unit stride within a row) into y (and h): see FwdArgs.
// w/b: in a dtype the kernels widen exactly (or the compute type).  nk: the storage kind x̂ is
// rounded to ("llama"/"t5"), or -1.
void launch_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                    const at::Tensor& r, const at::Tensor& h, const at::Tensor& y,
                    const at::Tensor& stats, double eps, bool rms, bool zc, int nk,
                    const Dropout* drop = nullptr) {
  const int64_t m = x.size(0), n = x.size(1);
  const int xk = kind_of(x.scalar_type()), yk = kind_of(y.scalar_type());
  FwdArgs a = fwd_args(x, w, b, r, h, y.data_ptr(), stats, eps, rms, zc, nk);
  if (y.data_ptr() != x.data_ptr()) a.flags |= stream_flag(m * n, y.scalar_type());
  if (drop != nullptr) {  // h = dropout(x) (+ r): written with or without a residual
    a.flags |= kDrop;
    a.drop = *drop;
    a.h = h.data_ptr();
  }
  int variant = nk >= 0 ? (rms ? kRmsRound : kLnRound)
                        : (rms ? kRmsMul : (b.defined() ? kLnFma : kLnMul));
  FwdFn fn = kernels()->fwd[xk][yk][variant];
  TORCH_CHECK(fn != nullptr, "normkit cpu: no forward kernel for ", x.scalar_type(), " -> ",
              y.scalar_type());
  run_units(m, m * n >= parallel_min_elements(),
            [&](int64_t lo, int64_t hi) { fn(a, lo, hi); });
}

// The memory-efficient backward's 1/γ row (1/(1 + γ) zero-centred; ones without γ) from the
// compute-type γ row g, in this thread's scratch.  A γ entry of 0 raises: x̂ = (y − β)/γ is lost
// there (y = β whatever x̂ was), so dx and dγ of that column could not be computed.
const void* inv_gamma_row(const void* g, bool f64, int64_t n) {
  auto fill = [&](auto one) {
    using C = decltype(one);
    const C* src = static_cast<const C*>(g);
    C* dst = static_cast<C*>(scratch(kScratchInvGamma, n * int64_t(sizeof(C))));
    int64_t zeros = 0, first = -1;
    for (int64_t j = 0; j < n; j++) {
      if (src[j] == C(0) && zeros++ == 0) first = j;
      dst[j] = one / src[j];
    }
    TORCH_CHECK_VALUE(zeros == 0, "memory_efficient=True: the effective weight (gamma, or 1 + "
                      "gamma with zero_centered_gamma) is 0 at ", zeros, " of ", n,
                      " entries (the first at index ", first, "), where x_hat = (y - beta) / "
                      "gamma cannot be recovered from the saved output; use "
                      "memory_efficient=False for this layer");
    return static_cast<const void*>(dst);
  };
  return f64 ? fill(1.0) : fill(1.0f);
}

// Where the backward applies a dropout's mask: -1 (the default) in dx's pass for float32/64
// rows, which then read and write one M×N tensor less (no faster on the 2-core AVX2 VM, where the
// Philox rounds and not memory bound it: 4096x4096 float32 18.1 against 18.6 ms), and in a pass
// of its own for 16-bit rows (in dx's pass they took 1.25-1.35x the time there:
// benchmarks/results/dropout-cpu-20261207-190226.json); 1: always in dx's pass; 0: always in a
// pass of its own (tests and benchmarks compare the two).
std::atomic<int> g_fuse_dropout{-1};
int fuse_dropout() { return g_fuse_dropout.load(); }
void set_fuse_dropout(int v) {
  TORCH_CHECK_VALUE(v >= -1 && v <= 1, "normkit cpu: fuse_dropout is -1 (auto), 0 or 1, got ", v);
  g_fuse_dropout.store(v);
}

// dst[j] = src[j]·m(k0 + j) for the numel elements of two contiguous tensors of one dtype
// (dst may be src), on torch's threads.
void apply_dropout(const at::Tensor& src, const at::Tensor& dst, uint64_t k0, const Dropout& drop) {
  DropFn fn = kernels()->drop[kind_of(src.scalar_type())];
  const int64_t numel = src.numel();
  const int64_t unit = 4096;  // elements per unit of parallel work (a multiple of 16)
  const char* ps = static_cast<const char*>(src.data_ptr());
  char* pd = static_cast<char*>(dst.data_ptr());
  const int64_t eb = int64_t(src.element_size());
  run_units((numel + unit - 1) / unit, numel >= parallel_min_elements(),
            [&](int64_t lo, int64_t hi) {
              const int64_t j0 = lo * unit, j1 = std::min(hi * unit, numel);
              fn(ps + j0 * eb, pd + j0 * eb, j1 - j0, drop, k0 + uint64_t(j0));
            });
}

// Backward: dx (in v's dtype), and dγ/dβ in grad_dtype where wanted.  v: the normalized input
// (h with a residual), contiguous; dy contiguous in any float dtype; dh like v or undefined.
// from_y (memory-efficient mode): v is the forward's output y (in x's dtype), b its β (or
// undefined), and x̂ is recomputed from them (rows.h: bwd_x_hat).  drop: the dropout before the
// fused residual add; then also m·dx (rows.h: row_second), else the fourth tensor is undefined.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> launch_backward(
    at::Tensor dy, const at::Tensor& dh, const at::Tensor& v, const at::Tensor& w,
    const at::Tensor& stats, bool rms, bool zc, int nk, bool want_w, bool want_b,
    at::ScalarType grad_dtype, const at::Tensor& b = at::Tensor(), bool from_y = false,
    const Dropout* drop = nullptr) {
  const int64_t m = v.size(0), n = v.size(1);
  const int xk = kind_of(v.scalar_type());
  const bool f64 = xk == kFloat64;
  const at::ScalarType cd = compute_dtype(xk);
  int dk = kind_of(dy.scalar_type());
  if (dk != xk && dk != kind_of(cd)) {
    // the kernels read dy in x's dtype or the compute type: another dtype is converted first
    // (exact, but for a float64 dy of 16/32-bit x, rounded to float32 as the statistics are)
    dy = dy.to(cd);
    dk = kind_of(cd);
  }
  BwdArgs a{};
  a.m = m;
  a.n = n;
  a.rms = rms;
  a.nk = nk;
  a.flags = (want_w ? kDw : 0) | (want_b ? kB : 0) | (nk >= 0 ? kRound : 0);
  a.flags |= stream_flag(m * n, v.scalar_type());
  const int64_t nblk = bwd_blocks(m, n);
  a.rpb = (m + nblk - 1) / nblk;
  a.x = v.data_ptr();
  a.dy = dy.data_ptr();
  if (dh.defined()) {
    a.dh = dh.data_ptr();
    a.dhrs = n;
  } else {
    a.dh = nullptr;
    a.dhrs = 0;
  }
  at::Tensor dx = empty_output({m, n}, v.scalar_type());
  a.dx = dx.data_ptr();
  at::Tensor dxd;
  const int f = g_fuse_dropout.load();
  const bool fuse = f >= 0 ? f == 1 : xk == kFloat32 || xk == kFloat64;
  if (drop != nullptr) {  // and the dropout's input's gradient, m·dx
    dxd = empty_output({m, n}, v.scalar_type());
    a.dxd = dxd.data_ptr();
    a.drop = *drop;
    if (fuse) a.flags |= kDrop;  // in dx's pass
  }
  a.g = param_row(w, zc, f64, n, kScratchGamma, true);
  if (from_y) {
    TORCH_CHECK(nk < 0, "normkit cpu: the memory-efficient backward has no llama/t5 casting");
    a.yg = inv_gamma_row(a.g, f64, n);
    a.yb = param_row(b, false, f64, n, kScratchBeta, false);
  }
  a.stats = stats.data_ptr();
  at::Tensor dw, db;
  if (want_w) dw = at::empty({n}, at::TensorOptions().dtype(grad_dtype));
  if (want_b) db = at::empty({n}, at::TensorOptions().dtype(grad_dtype));
  a.pw = ptr(dw);
  a.pb = ptr(db);
  const bool partials = (nblk > 1 || grad_dtype != cd) && (want_w || want_b);
  if (partials) {
    const int64_t row = nblk * n * int64_t(f64 ? 8 : 4);
    char* buf = static_cast<char*>(scratch(kScratchPartials, 2 * row));
    a.pw = buf;
    a.pb = buf + row;
  }
  BwdFn fn = (from_y ? kernels()->bwd_y : kernels()->bwd)[xk][dk];
  TORCH_CHECK(fn != nullptr, "normkit cpu: no backward kernel for ", v.scalar_type());
  // each thread's part of the row scratch (2·N compute values, then a dropout's N +
  // kDropFlagsPad keep flags), by its number in the region
  const int64_t part =
      (2 * n * (f64 ? 8 : 4) + ((a.flags & kDrop) ? (n + kDropFlagsPad) * 4 : 0) + 63) / 64 * 64;
  char* rows_scratch = static_cast<char*>(scratch(kScratchRows, part * at::get_num_threads()));
  run_units(nblk, nblk > 1 && m * n >= parallel_min_elements(), [&](int64_t k0, int64_t k1) {
    BwdArgs mine = a;
    mine.scratch = rows_scratch + part * at::get_thread_num();
    fn(mine, k0, k1);
  });
  if (partials) {
    SumFn sum = kernels()->sum[f64 ? 1 : 0];
    const int gk = kind_of(grad_dtype);
    if (want_w) sum(nblk, n, a.pw, dw.data_ptr(), gk);
    if (want_b) sum(nblk, n, a.pb, db.data_ptr(), gk);
  }
  if (drop != nullptr && !fuse) apply_dropout(dx, dxd, 0, *drop);
  return {dx, dw, db, dxd};
}

at::Tensor value(const Opt& t) { return t.has_value() ? *t : at::Tensor(); }

// ------------------------------------------------------------------------------------------
// The backend functions (functional.py's general path; cpu.py checks and converts first)
// ------------------------------------------------------------------------------------------

using DropSpec = std::optional<std::tuple<uint64_t, int64_t, double>>;  // seed, keep_above, scale

Dropout dropout_of(const std::tuple<uint64_t, int64_t, double>& d) {
  return Dropout{std::get<0>(d), int32_t(std::get<1>(d)), std::get<2>(d)};
}

py::tuple forward(const at::Tensor& x, const Opt& wo, const Opt& bo, const Opt& ro, double eps,
                  bool rms, bool zc, int64_t nk, at::ScalarType out_dtype, bool need_stats,
                  const Opt& yo, const Opt& ho, const DropSpec& dropo) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && kind_of(x.scalar_type()) >= 0,
              "normkit cpu: forward takes (M, N) rows of unit stride");
  const int64_t m = x.size(0), n = x.size(1);
  at::Tensor w = value(wo), b = value(bo), r = value(ro), y = value(yo), h = value(ho);
  if (!y.defined()) y = empty_output({m, n}, out_dtype);
  if ((r.defined() || dropo) && !h.defined()) h = empty_output({m, n}, x.scalar_type());
  std::optional<Dropout> drop;
  if (dropo) drop = dropout_of(*dropo);
  at::Tensor stats;
  if (need_stats) stats = at::empty({m, 3}, at::TensorOptions().dtype(compute_dtype(kind_of(x.scalar_type()))));
  {
    py::gil_scoped_release nogil;
    launch_forward(x, w, b, r, h, y, stats, eps, rms, zc, int(nk), drop ? &*drop : nullptr);
  }
  return py::make_tuple(y, h.defined() ? py::cast(h) : py::none(),
                        need_stats ? py::cast(stats) : py::none());
}

// (dx, dγ, dβ), and with a dropout a fourth: m·dx, the dropout's input's gradient.
py::tuple backward(const at::Tensor& dy, const Opt& dh, const at::Tensor& v, const Opt& w,
                   const at::Tensor& stats, bool rms, bool zc, int64_t nk, bool want_w,
                   bool want_b, at::ScalarType grad_dtype, const Opt& b, bool from_y,
                   const DropSpec& dropo) {
  at::Tensor dx, dw, db, dxd;
  std::optional<Dropout> drop;
  if (dropo) drop = dropout_of(*dropo);
  {
    py::gil_scoped_release nogil;
    std::tie(dx, dw, db, dxd) = launch_backward(
        dy.contiguous(), dh ? dh->contiguous() : at::Tensor(), v.contiguous(), value(w), stats,
        rms, zc, int(nk), want_w, want_b, grad_dtype, value(b), from_y, drop ? &*drop : nullptr);
  }
  py::object pw = dw.defined() ? py::cast(dw) : py::none();
  py::object pb = db.defined() ? py::cast(db) : py::none();
  if (dxd.defined()) return py::make_tuple(dx, pw, pb, dxd);
  return py::make_tuple(dx, pw, pb);
}

// dst = src·mask of the dropout (contiguous, one dtype; dst may be src; none: a new tensor from
// the output pool, whose page faults cost more than the pass itself: 46 ms of 80 at 4096x4096
// float32), element j of src being element k0 + j of the rows: the backward's dx = mask·dh, and
// the mask itself (from ones).  Returns dst.
at::Tensor dropout_apply(const at::Tensor& src, const Opt& dsto, uint64_t k0,
                         const std::tuple<uint64_t, int64_t, double>& d) {
  const at::Tensor dst = dsto ? *dsto : empty_output(src.sizes(), src.scalar_type());
  TORCH_CHECK(src.is_contiguous() && dst.is_contiguous() && src.numel() == dst.numel() &&
                  src.scalar_type() == dst.scalar_type() && kind_of(src.scalar_type()) >= 0,
              "normkit cpu: dropout_apply takes two contiguous tensors of one float dtype");
  const Dropout drop = dropout_of(d);
  py::gil_scoped_release nogil;
  apply_dropout(src, dst, k0, drop);
  return dst;
}

// ------------------------------------------------------------------------------------------
// The eager entry point and its autograd node
// ------------------------------------------------------------------------------------------

PyTypeObject* g_parameter_type = nullptr;  // torch.nn.Parameter
py::object* g_double_backward = nullptr;   // Python: the create_graph=True backward
std::atomic<int64_t> g_calls{0};           // calls served by run (tests read it)

// A plain dense CPU tensor (torch.Tensor or nn.Parameter: no subclass that could override
// anything, no torch.func wrapper, no nested tensor), or nullptr.
const at::Tensor* plain(PyObject* obj) {
  PyTypeObject* tp = Py_TYPE(obj);
  if (!THPVariable_CheckTypeExact(tp) && tp != g_parameter_type) return nullptr;
  const at::Tensor& t = THPVariable_Unpack(obj);
  if (!t.defined() || !t.device().is_cpu() || t.layout() != at::kStrided || t.is_nested() ||
      !t.has_storage())
    return nullptr;
  return &t;
}

// The bytes [lo, hi) of a contiguous tensor; empty for nullptr.
struct Span {
  uintptr_t lo = 0, hi = 0;
};
Span span(const at::Tensor* t) {
  if (t == nullptr) return {};
  const auto lo = reinterpret_cast<uintptr_t>(t->const_data_ptr());
  return {lo, lo + t->nbytes()};
}
bool meet(Span a, Span b) { return a.lo < b.hi && b.lo < a.hi; }

// The rows of t: a contiguous (M, N) view (no copy; t is contiguous).
at::Tensor rows(const at::Tensor& t, int64_t m, int64_t n) {
  return t.dim() == 2 ? t : t.view({m, n});
}

// The memory-efficient mode keeps y, which fixes x only up to its scale (x̂ barely depends on
// it: only through eps), so the second-order terms in x cannot be formed from what it saved.
constexpr const char* kLeanNoDoubleBackward =
    "memory_efficient=True saves y, not x: its backward cannot be differentiated again "
    "(create_graph=True); use memory_efficient=False for double backward";

struct Norm : public torch::autograd::Function<Norm> {
  // γ, β and the residual are optional: absent ones are not inputs of the node at all.
  // lean (memory_efficient=True): y is saved instead of the normalized input.
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const Opt& wo,
                               const Opt& bo, const Opt& ro, double eps, bool rms, bool lean) {
    at::Tensor w = value(wo), b = value(bo), r = value(ro);
    const int64_t n = x.size(-1), m = x.numel() / n;
    at::Tensor y = empty_output(x.sizes(), x.scalar_type());
    at::Tensor h = r.defined() ? empty_output(x.sizes(), x.scalar_type()) : at::Tensor();
    at::Tensor stats =
        at::empty({m, 3}, at::TensorOptions().dtype(compute_dtype(kind_of(x.scalar_type()))));
    launch_forward(rows(x, m, n), w, b, r.defined() ? rows(r, m, n) : r,
                   h.defined() ? rows(h, m, n) : h, rows(y, m, n), stats, eps, rms, false, -1);
    ctx->set_materialize_grads(false);
    // Only what backward reads: the normalized input (h, an output, with a residual: x and r
    // are not kept, one (M, N) tensor instead of three), γ, β and the per-row statistics.
    // lean: y instead, which the next layer keeps anyway, and x̂ is recomputed from it.
    ctx->save_for_backward({lean ? y : (r.defined() ? h : x), w, b, stats});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["rms"] = rms;
    ctx->saved_data["lean"] = lean;
    ctx->saved_data["residual"] = r.defined();
    if (r.defined()) return {y, h};
    return {y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list s = ctx->get_saved_variables();
    const at::Tensor &v = s[0], &w = s[1], &b = s[2], &stats = s[3];
    const bool rms = ctx->saved_data["rms"].toBool(), res = ctx->saved_data["residual"].toBool();
    at::Tensor dy = grads[0];
    at::Tensor dh = grads.size() > 1 ? grads[1] : at::Tensor();
    // needs_input_grad counts the node's inputs, which are only the tensors that were given
    size_t edge = 0;
    auto needs = [&](bool given) { return given && ctx->needs_input_grad(edge++); };
    const bool need_x = needs(true), need_w = needs(w.defined()), need_b = needs(b.defined()),
               need_r = needs(res);
    const bool lean = ctx->saved_data["lean"].toBool();
    if (torch::autograd::GradMode::is_enabled()) {  // create_graph=True: the reference's
      TORCH_CHECK_VALUE(!lean, kLeanNoDoubleBackward);
      py::gil_scoped_acquire gil;
      py::tuple g = (*g_double_backward)(py::make_tuple(need_x, need_w, need_b, need_r), v, w,
                                         b, dy, dh, ctx->saved_data["eps"].toDouble(), rms);
      auto get = [&](int i) {
        return g[i].is_none() ? at::Tensor() : THPVariable_Unpack(g[i].ptr());
      };
      return {get(0), get(1), get(2), get(3), at::Tensor(), at::Tensor(), at::Tensor()};
    }
    const int64_t n = v.size(-1), m = v.numel() / n;
    dy = dy.defined() ? dy.contiguous() : at::zeros_like(v);  // undefined: only h was used
    if (dh.defined()) dh = rows(dh.contiguous(), m, n);
    at::ScalarType pd = w.defined() ? w.scalar_type()
                                    : (b.defined() ? b.scalar_type() : compute_dtype(kind_of(v.scalar_type())));
    auto [dx, dw, db, unused] =
        launch_backward(rows(dy, m, n), dh, rows(v, m, n), w, stats, rms, false, -1,
                        need_w && w.defined(), need_b && b.defined(), pd, b, lean);
    dx = dx.view(v.sizes());
    return {need_x ? dx : at::Tensor(), dw, db, need_r ? dx : at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

// The γ/β dtypes the eager path takes for x of kind xk (as cpu.plan with "torch" casting and
// no conversion): float64 x: float64 γ/β; else γ and β of one 32/16-bit dtype (either absent).
bool params_ok(int xk, int wk, int bk) {
  const int absent = -2;
  if (xk == kFloat64) return (wk == absent || wk == kFloat64) && (bk == absent || bk == kFloat64);
  auto ok = [](int k) { return k == kFloat32 || k == kBFloat16 || k == kFloat16; };
  if (wk != absent && !ok(wk)) return false;
  if (bk != absent && !ok(bk)) return false;
  return wk == absent || bk == absent || wk == bk;
}

// y, (y, h), or None.  n: an int or a 1-tuple of one (nn.LayerNorm's normalized_shape).  lean:
// memory_efficient=True (what a training call saves for backward; the forward is the same).
py::object run(py::handle xo, py::handle no, py::handle wo, py::handle bo, double eps, bool rms,
               py::handle ro, py::handle oo, py::handle hoo, bool lean) {
  const at::Tensor* x = plain(xo.ptr());
  if (x == nullptr || x->dim() == 0 || !x->is_contiguous()) return py::none();
  PyObject* nobj = no.ptr();
  if (PyTuple_CheckExact(nobj) && PyTuple_GET_SIZE(nobj) == 1) nobj = PyTuple_GET_ITEM(nobj, 0);
  if (!PyLong_CheckExact(nobj)) return py::none();  // bool is not an exact int
  const int64_t n = PyLong_AsLongLong(nobj);
  if (n <= 0 || x->size(-1) != n) {
    PyErr_Clear();
    return py::none();
  }
  const int xk = kind_of(x->scalar_type());
  if (xk < 0) return py::none();
  const at::Tensor *w = nullptr, *b = nullptr, *r = nullptr, *out = nullptr, *hout = nullptr;
  int wk = -2, bk = -2;
  const bool grad = torch::autograd::GradMode::is_enabled();
  bool train = grad && x->requires_grad();
  if (!wo.is_none()) {
    w = plain(wo.ptr());
    if (w == nullptr || w->dim() != 1 || w->size(0) != n || !w->is_contiguous()) return py::none();
    wk = kind_of(w->scalar_type());
    train = train || (grad && w->requires_grad());
  }
  if (!bo.is_none()) {
    b = plain(bo.ptr());
    if (b == nullptr || b->dim() != 1 || b->size(0) != n || !b->is_contiguous()) return py::none();
    bk = kind_of(b->scalar_type());
    train = train || (grad && b->requires_grad());
  }
  if (!params_ok(xk, wk, bk)) return py::none();
  if (!ro.is_none()) {
    r = plain(ro.ptr());
    if (r == nullptr || r->scalar_type() != x->scalar_type() || !r->is_contiguous() ||
        !r->sizes().equals(x->sizes()))
      return py::none();
    train = train || (grad && r->requires_grad());
  }
  auto like_x = [&](py::handle o) -> const at::Tensor* {
    const at::Tensor* t = plain(o.ptr());
    if (t == nullptr || t->scalar_type() != x->scalar_type() || !t->is_contiguous() ||
        !t->sizes().equals(x->sizes()) || (grad && t->requires_grad()))
      return nullptr;
    return t;
  };
  if (!oo.is_none() && (train || (out = like_x(oo)) == nullptr)) return py::none();
  if (!hoo.is_none() && (train || r == nullptr || (hout = like_x(hoo)) == nullptr))
    return py::none();
  // An output sharing memory with an input or with the other output goes to the general path,
  // which raises torch's error for it (_validate._check_writes) — but for the in-place forms,
  // out=x and residual_out=residual or x: outputs are like x, so the same address is the same
  // elements, and the kernels read each row before they write it.
  if (out != nullptr || hout != nullptr) {
    const Span sx = span(x), sw = span(w), sb = span(b), sr = span(r), so = span(out),
               sh = span(hout);
    if ((meet(so, sx) && so.lo != sx.lo) || meet(so, sr) || meet(so, sw) || meet(so, sb) ||
        meet(so, sh) || (meet(sh, sx) && sh.lo != sx.lo) || (meet(sh, sr) && sh.lo != sr.lo) ||
        meet(sh, sw) || meet(sh, sb))
      return py::none();
  }
  const int64_t m = x->numel() / n;
  if (m == 0) return py::none();
  g_calls++;
  if (train) {
    auto opt = [](const at::Tensor* t) { return t ? Opt(*t) : Opt(); };
    variable_list res = Norm::apply(*x, opt(w), opt(b), opt(r), eps, rms, lean);
    if (r) return py::make_tuple(res[0], res[1]);
    return py::cast(res[0]);
  }
  at::Tensor y = out ? *out : empty_output(x->sizes(), x->scalar_type());
  at::Tensor h;
  if (r) h = hout ? *hout : empty_output(x->sizes(), x->scalar_type());
  {
    std::optional<py::gil_scoped_release> nogil;
    if (m * n >= parallel_min_elements()) nogil.emplace();  // small calls keep it: ~0.1 µs
    launch_forward(rows(*x, m, n), w ? *w : at::Tensor(), b ? *b : at::Tensor(),
                   r ? rows(*r, m, n) : at::Tensor(), r ? rows(h, m, n) : at::Tensor(),
                   rows(y, m, n), at::Tensor(), eps, rms, false, -1);
  }
  if (r) return py::make_tuple(y, h);
  return py::cast(y);
}

void configure(py::object parameter_type, py::object double_backward) {
  if (g_parameter_type == nullptr) {
    g_parameter_type = reinterpret_cast<PyTypeObject*>(parameter_type.ptr());
    Py_INCREF(parameter_type.ptr());
  }
  delete g_double_backward;
  g_double_backward = new py::object(std::move(double_backward));
}

std::string isa_name() { return kernels()->name; }

// The kernels' conversions alone (tests): src converted to dst's dtype by the vector spelling
// (mode 0; numel a multiple of 16) or the scalar one (1), or rounded to dst's dtype and back in
// the compute type (2, 3: dst then holds float32, or float64 for float64 src).
void convert_for_tests(const at::Tensor& src, const at::Tensor& dst, int64_t rounded_kind,
                       int64_t mode) {
  TORCH_CHECK(src.is_contiguous() && dst.is_contiguous() && src.numel() == dst.numel());
  const int sk = kind_of(src.scalar_type());
  const int dk = mode >= 2 ? int(rounded_kind) : kind_of(dst.scalar_type());
  TORCH_CHECK(sk >= 0 && dk >= 0 && (mode % 2 == 1 || src.numel() % 16 == 0));
  kernels()->convert(src.data_ptr(), sk, dst.data_ptr(), dk, src.numel(), int(mode));
}

// ------------------------------------------------------------------------------------------
// Norm + quantize (quant.h): the general path's forward with a float8_e4m3fn or int8 output
// ------------------------------------------------------------------------------------------

// (q, scales (M,) float32, h or None, stats or None) of the (M, N) rows of x (unit stride within
// a row; float32, bfloat16 or float16).  w/b: as forward's.  scale > 0: the static scale; 0:
// each row's own.  ho: where h goes (like x, contiguous), or None to allocate it.
py::tuple forward_quant(const at::Tensor& x, const Opt& wo, const Opt& bo, const Opt& ro,
                        double eps, bool rms, bool zc, at::ScalarType q_dtype, double scale,
                        bool need_stats, const Opt& ho) {
  const int xk = kind_of(x.scalar_type());
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && xk >= 0 && xk != kFloat64,
              "normkit cpu: forward_quant takes (M, N) float32/bfloat16/float16 rows of unit "
              "stride");
  TORCH_CHECK(q_dtype == at::kFloat8_e4m3fn || q_dtype == at::kChar,
              "normkit cpu: forward_quant writes float8_e4m3fn or int8, not ", q_dtype);
  const int64_t m = x.size(0), n = x.size(1);
  at::Tensor w = value(wo), b = value(bo), r = value(ro), h = value(ho);
  at::Tensor q = empty_output({m, n}, q_dtype);
  at::Tensor scales = at::empty({m}, at::TensorOptions().dtype(at::kFloat));
  if (r.defined() && !h.defined()) h = empty_output({m, n}, x.scalar_type());
  at::Tensor stats;
  if (need_stats) stats = at::empty({m, 3}, at::TensorOptions().dtype(at::kFloat));
  {
    py::gil_scoped_release nogil;
    QuantArgs qa{};
    qa.f = fwd_args(x, w, b, r, h, q.data_ptr(), stats, eps, rms, zc, -1);
    qa.scales = scales.data_ptr<float>();
    qa.scale = float(scale);
    const int variant = rms ? kRmsMul : (b.defined() ? kLnFma : kLnMul);
    QuantFn fn = kernels()->quant[xk][q_dtype == at::kChar ? kInt8 : kFp8E4M3][variant];
    run_units(m, m * n >= parallel_min_elements(),
              [&](int64_t lo, int64_t hi) { fn(qa, lo, hi); });
  }
  return py::make_tuple(q, scales, r.defined() ? py::cast(h) : py::none(),
                        need_stats ? py::cast(stats) : py::none());
}

// The quantizing conversion alone (tests): float32 src (numel a multiple of 16) to dst's bytes
// (float8_e4m3fn or int8), no scale.
void quant_convert_for_tests(const at::Tensor& src, const at::Tensor& dst) {
  TORCH_CHECK(src.is_contiguous() && dst.is_contiguous() && src.numel() == dst.numel() &&
              src.scalar_type() == at::kFloat && src.numel() % 16 == 0 &&
              (dst.scalar_type() == at::kFloat8_e4m3fn || dst.scalar_type() == at::kChar));
  kernels()->quant_convert(src.data_ptr<float>(),
                           dst.scalar_type() == at::kChar ? kInt8 : kFp8E4M3,
                           static_cast<uint8_t*>(dst.data_ptr()), src.numel());
}

}  // namespace
}  // namespace cpu
}  // namespace normkit

PYBIND11_MODULE(_cpu, mod) {
  using namespace normkit::cpu;
  mod.doc() = "normkit's compiled CPU kernels (see normkit/kernels/cpu.py)";
  mod.def("forward", &forward);
  mod.def("backward", &backward);
  mod.def("dropout_apply", &dropout_apply);
  mod.def("run", &run);
  mod.def("configure", &configure);
  mod.def("calls", [] { return g_calls.load(); });
  mod.def("isa", &isa_name);
  mod.def("available_isas", &available_isas);
  mod.def("set_isa", &set_isa);
  mod.def("cpu_features", &cpu_features);
  mod.def("parallel_min_elements", &parallel_min_elements);
  mod.def("set_parallel_min_elements", &set_parallel_min_elements);
  mod.def("parallel_used", &parallel_used);
  mod.def("parallel_regions", &parallel_regions);
  mod.def("serial_only", &serial_only);
  mod.def("openmp", &openmp);
  mod.def("bwd_blocks", &bwd_blocks);
  mod.def("release_buffers", &release_buffers);
  mod.def("pooled_buffers", &pooled_buffers);
  mod.def("advised_buffers", &advised_buffers);
  mod.def("pool_max_bytes", &pool_max_bytes);
  mod.def("set_pool_max_bytes", &set_pool_max_bytes);
  mod.def("stream_min_bytes", &stream_min_bytes);
  mod.def("fuse_dropout", &fuse_dropout);
  mod.def("set_fuse_dropout", &set_fuse_dropout);
  mod.def("set_stream_min_bytes", &set_stream_min_bytes);
  mod.def("_convert", &convert_for_tests);
  register_group(mod);  // GroupNorm (group.cpp)
  mod.def("forward_quant", &forward_quant);
  mod.def("_quant_convert", &quant_convert_for_tests);
  mod.attr("torch_version") = NK_TORCH_VERSION;
  mod.attr("build_flags") = NK_BUILD_FLAGS;
}
