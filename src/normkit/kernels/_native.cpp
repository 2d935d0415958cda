// normkit's native eager entry point: argument checks, output allocation and the autograd node
// of the common CPU call, in C++, around the very same numba-compiled row drivers that the
// Python path launches: normkit.kernels.native registers here the C entry points that numba
// emits in each driver's own compiled library, which call the same machine code.
//
// Why it exists: at a few rows the op is all overhead.  torch's own LayerNorm takes ~4 µs at
// M=1; the Python checks and allocation around our kernel took ~5 µs, and a Python
// autograd.Function costs the engine ~15 µs more per backward than a C++ node.  This file does
// what normkit.kernels.cpu.infer and functional._FastNorm do, for the same calls, with the same
// launches — so the same bits (tests compare both paths bit for bit).
//
// Anything it does not cover returns None, and the caller takes the Python path: tensors that
// are not plain CPU tensors, dtype combinations not registered yet, and calls big enough for the
// pooled output buffers.
//
// Parallel launches run the serial drivers on ranges of rows (forward) or of row blocks
// (backward, then the dγ/dβ sum on the calling thread) with at::parallel_for, on the OpenMP
// threads torch's own ops run on: the same rows, the same blocks, so the same bits as the
// Python path's numba parallel drivers, whose launches cost more (the GIL taken and given back,
// a schedule built per launch).  Float32 on the 2-core VM, numba's parallel driver launched
// from here → at::parallel_for: inference forward 8x4096 6.7 → 5.9 µs, 512x64 11.0 → 10.0;
// LN backward 512x64 inside autograd.grad 33.3 → 32.7 (the region: ~1.3 µs beyond its slower
// thread's 6 µs).  See pool_threads for when a launch goes back to Python.

#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/csrc/autograd/python_variable.h>

#include <pybind11/stl.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <map>
#include <mutex>
#include <pthread.h>
#include <optional>
#include <tuple>
#include <vector>

namespace py = pybind11;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {

// The drivers' C entry points (see _fwd_serial / _bwd_serial in cpu.py; addresses are int64).
// numba passes each trailing dtype marker, a 1-D array, as the seven fields of its array
// structure: meminfo, parent, nitems, itemsize, data, shape[0], strides[0].  The drivers use
// only the itemsize; the meminfo may be null (numba's reference counting skips null).
#define NK_MARKER void*, void*, int64_t, int64_t, void*, int64_t, int64_t
#define NK_M(isz) nullptr, nullptr, 0, (isz), nullptr, 0, (isz)
using FwdFn = void* (*)(int64_t m, int64_t n, bool rms, int64_t flags, double eps, int64_t xa,
                        int64_t xrs, int64_t ra, int64_t rrs, int64_t ha, int64_t ya,
                        int64_t wa, int64_t ba, int64_t sa, NK_MARKER, NK_MARKER, NK_MARKER,
                        NK_MARKER, NK_MARKER);
using BwdFn = void* (*)(int64_t k0, int64_t k1, int64_t m, int64_t nblk, int64_t n, bool rms,
                        int64_t flags,
                        int64_t xa, int64_t dya, int64_t dha, int64_t dhrs, int64_t dxa,
                        int64_t wa, int64_t sa, int64_t pwa, int64_t pba, int64_t dwa,
                        int64_t dba, NK_MARKER, NK_MARKER, NK_MARKER, NK_MARKER, NK_MARKER,
                        NK_MARKER);

// Flags: as in cpu.py.
constexpr int64_t kRes = 1, kW = 2, kB = 4, kStats = 32, kDw = 128, kNoSum = 512;

struct Plan {
  FwdFn fwd_fn;
  BwdFn bwd_fn;
  std::array<int64_t, 5> fwd_isz;  // the markers' itemsizes
  std::array<int64_t, 6> bwd_isz;
  py::object* par_fwd;  // Python: the same arguments on cpu._launch (see pool_threads)
  py::object* par_bwd;
  at::ScalarType param;  // γ/β dtype the kernels read (dγ/dβ come out in it)
  at::ScalarType stats;  // float32, float64 for float64 x
};

// Parallel launches (see pool_threads): whether this process has made one, whether it is a
// forked child, and the region running now (one at a time).
std::atomic<bool> g_par_used{false};
std::atomic<bool> g_forked{false};
std::mutex g_par_mutex;

// One slot per (x, γ, β) dtype: float32, float64, bfloat16, float16, and "absent" for γ/β.
// Plans are written once (under the GIL) and never freed, so readers need no lock.
constexpr int kKinds = 5;
std::array<std::atomic<Plan*>, 4 * kKinds * kKinds> g_plans{};

// Limits, as cpu.py has them (it updates them when they change).
std::atomic<int64_t> g_par_min{1 << 15};   // PARALLEL_MIN_ELEMENTS
std::atomic<int64_t> g_big_min{1 << 20};   // _HUGE_MIN_ELEMENTS: the pooled outputs
std::atomic<int64_t> g_block_rows{16};     // _MIN_BLOCK_ROWS
std::atomic<int64_t> g_block_elems{1 << 14};  // _MIN_BLOCK_ELEMENTS
std::atomic<int64_t> g_max_blocks{64};     // _MAX_BLOCKS
std::atomic<int64_t> g_min_par_blocks{8};  // _MIN_PAR_BLOCKS
std::atomic<int64_t> g_native_calls{0};    // calls served here (tests read it)

// Training calls (forward with autograd, and backward) go parallel from the same size as
// inference calls (g_par_min).  They once waited for 1 << 17 elements: with a set-up per row
// block, the grid of bench-cpu-20261204-214844.json had the 8x8192 LN backward at 0.69x torch
// from 1 << 15.  With the set-up once per thread, from 1 << 15 is as good or better everywhere
// measured (float32 autograd forward 128x768 24.7 -> 16.4 µs, 8x8192 18.2 -> 13.3; backward
// 1024x64 56 -> 44, 512x128 52 -> 41, 8x8192 68 -> 57-64).  Same bits either way.

PyTypeObject* g_parameter_type = nullptr;  // torch.nn.Parameter
py::object* g_double_backward = nullptr;   // Python: create_graph=True backward

int kind_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return 0;
    case at::kDouble: return 1;
    case at::kBFloat16: return 2;
    case at::kHalf: return 3;
    default: return -1;
  }
}

int slot(int x, int w, int b) { return (x * kKinds + w) * kKinds + b; }

int64_t ptr(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<int64_t>(t.data_ptr()) : 0;
}

// A plain dense CPU tensor with its own storage (torch.Tensor or nn.Parameter: no subclass that
// could override anything, no torch.func wrapper, no nested tensor), or nullptr.
const at::Tensor* plain(PyObject* obj) {
  PyTypeObject* tp = Py_TYPE(obj);
  if (!THPVariable_CheckTypeExact(tp) && tp != g_parameter_type) return nullptr;
  const at::Tensor& t = THPVariable_Unpack(obj);
  if (!t.defined() || !t.device().is_cpu() || t.layout() != at::kStrided || t.is_nested() ||
      !t.has_storage())
    return nullptr;
  return &t;
}

int64_t bwd_blocks(int64_t m, int64_t n) {  // cpu._bwd_blocks
  int64_t rows = g_block_rows.load();
  int64_t nblk = m >= 2 * rows ? std::min(g_max_blocks.load(), m / rows)
                               : std::max<int64_t>(1, std::min(m, m * n / g_block_elems.load()));
  return nblk >= g_min_par_blocks.load() ? nblk : 1;
}

// How a launch that is big enough for several threads runs: on one thread (1), on torch's
// threads from here (more), or through cpu._launch (0).
// - As many threads as torch is allowed (at::get_num_threads, per calling thread as for
//   torch's own ops): with one, the serial driver (a worker limited by torch.set_num_threads(1)
//   gets no second normkit thread).
// - cpu._launch where this file was built without OpenMP (at::parallel_for would run on the
//   calling thread) and in a forked child: GNU OpenMP is not fork-safe (torch's own parallel ops
//   hang in a child forked after one ran), and cpu._launch knows whether the parent made a
//   parallel launch (its own or one from here: see parallel_used) and then takes the serial
//   driver.
int pool_threads() {
  int nt = at::get_num_threads();
  if (nt <= 1) return 1;
#ifdef _OPENMP
  if (!g_forked.load(std::memory_order_relaxed)) return nt;
#endif
  return 0;
}

// Run ``region`` (an at::parallel_for) unless another thread's region is running: then return
// false, and the caller runs its launch serially on its own thread — same bits, and two regions
// at once would only oversubscribe the cores.  Without the GIL while it runs, as torch's ops.
template <typename F>
bool try_region(F region) {
  std::unique_lock<std::mutex> lock(g_par_mutex, std::try_to_lock);
  if (!lock.owns_lock()) return false;
  g_par_used.store(true, std::memory_order_relaxed);
  if (PyGILState_Check()) {
    py::gil_scoped_release nogil;
    region();
  } else {
    region();
  }
  return true;
}

// Rows [lo, hi) of a forward: the serial driver on hi - lo rows from row lo (the markers are
// x, y, γ/β, cast, statistics; h is in x's dtype).
void call_fwd(const Plan* p, int64_t lo, int64_t hi, int64_t n, bool rms, int64_t flags,
              double eps, int64_t xa, int64_t ra, int64_t ha, int64_t ya, int64_t wa,
              int64_t ba, int64_t sa) {
  const auto& k = p->fwd_isz;
  int64_t xo = lo * n * k[0];
  p->fwd_fn(hi - lo, n, rms, flags, eps, xa + xo, n, ra ? ra + xo : 0, ra ? n : 0,
            ha ? ha + xo : 0, ya + lo * n * k[1], wa, ba, sa ? sa + lo * 3 * k[4] : 0,
            NK_M(k[0]), NK_M(k[1]), NK_M(k[2]), NK_M(k[3]), NK_M(k[4]));
}

void call_bwd(const Plan* p, int64_t k0, int64_t k1, int64_t m, int64_t nblk, int64_t n,
              bool rms, int64_t flags, int64_t xa, int64_t dya, int64_t dha, int64_t dhrs,
              int64_t dxa, int64_t wa, int64_t sa, int64_t pwa, int64_t pba, int64_t dwa,
              int64_t dba) {
  const auto& k = p->bwd_isz;
  p->bwd_fn(k0, k1, m, nblk, n, rms, flags, xa, dya, dha, dhrs, dxa, wa, sa, pwa, pba, dwa, dba,
            NK_M(k[0]), NK_M(k[1]), NK_M(k[2]), NK_M(k[3]), NK_M(k[4]), NK_M(k[5]));
}

// Read-only rows of ones / zeros per (value, N, dtype), as cpu._const_row: the backward's
// stand-ins for an absent γ (dy·1 is exact) and an absent dh (read with stride 0; +0 is
// exact).  Never freed: a handful of entries in practice, cleared if it ever grows large.
std::mutex g_rows_mutex;
auto* g_rows = new std::map<std::tuple<int, int64_t, at::ScalarType>, at::Tensor>();

at::Tensor const_row(int value, int64_t n, at::ScalarType dtype) {
  std::lock_guard<std::mutex> lock(g_rows_mutex);
  auto key = std::make_tuple(value, n, dtype);
  auto it = g_rows->find(key);
  if (it != g_rows->end()) return it->second;
  if (g_rows->size() > 64) g_rows->clear();
  at::Tensor row = at::full({n}, value, at::TensorOptions().dtype(dtype));
  g_rows->emplace(key, row);
  return row;
}

// How a launch of ``units`` rows or row blocks went: through cpu._launch (``python()``), over
// torch's threads (``part(lo, hi)`` on ranges of [0, units)), or left to the caller to run
// whole on its own thread (serial, or another thread's region was running).
enum class Launch { kByPython, kOnThreads, kLeftToCaller };

template <typename Python, typename Part>
Launch launch(bool serial, int64_t units, Python python, Part part) {
  int nt = serial || units < 2 ? 1 : pool_threads();
  if (nt == 0) {
    py::gil_scoped_acquire gil;
    python();
    return Launch::kByPython;
  }
  if (nt > 1 && try_region([&] { at::parallel_for(0, units, 1, part); }))
    return Launch::kOnThreads;
  return Launch::kLeftToCaller;
}

void launch_fwd(const Plan* p, bool serial, int64_t m, int64_t n, bool rms, int64_t flags,
                double eps, int64_t xa, int64_t ra, int64_t ha, int64_t ya, int64_t wa,
                int64_t ba, int64_t sa) {
  Launch how = launch(
      serial, m, [&] { (*p->par_fwd)(m, n, rms, flags, eps, xa, n, ra, n, ha, ya, wa, ba, sa); },
      [&](int64_t lo, int64_t hi) {
        call_fwd(p, lo, hi, n, rms, flags, eps, xa, ra, ha, ya, wa, ba, sa);
      });
  if (how == Launch::kLeftToCaller)
    call_fwd(p, 0, m, n, rms, flags, eps, xa, ra, ha, ya, wa, ba, sa);
}

// A backward's blocks and then its dγ/dβ sum (see cpu._bwd_serial): on torch's threads the
// blocks leave their partial rows unsummed, and the sum runs alone after the region.
void launch_bwd(const Plan* p, bool serial, int64_t m, int64_t nblk, int64_t n, bool rms,
                int64_t flags, int64_t xa, int64_t dya, int64_t dha, int64_t dhrs, int64_t dxa,
                int64_t wa, int64_t sa, int64_t pwa, int64_t pba, int64_t dwa, int64_t dba) {
  auto blocks = [&](int64_t k0, int64_t k1, int64_t f) {
    call_bwd(p, k0, k1, m, nblk, n, rms, f, xa, dya, dha, dhrs, dxa, wa, sa, pwa, pba, dwa, dba);
  };
  Launch how = launch(
      serial, nblk,
      [&] {
        (*p->par_bwd)(0, nblk, m, nblk, n, rms, flags, xa, dya, dha, dhrs, dxa, wa, sa, pwa, pba,
                      dwa, dba);
      },
      [&](int64_t k0, int64_t k1) { blocks(k0, k1, flags | kNoSum); });
  if (how == Launch::kOnThreads) blocks(0, 0, flags);  // the sum alone
  if (how == Launch::kLeftToCaller) blocks(0, nblk, flags);
}

using Opt = std::optional<at::Tensor>;

struct Norm : public torch::autograd::Function<Norm> {
  // γ, β and the residual are optional: absent ones are not inputs of the node at all.
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const Opt& wo,
                               const Opt& bo, const Opt& ro, double eps, bool rms, int64_t plan) {
    const Plan* p = reinterpret_cast<const Plan*>(plan);
    at::Tensor w = wo.value_or(at::Tensor()), b = bo.value_or(at::Tensor()),
               r = ro.value_or(at::Tensor());
    int64_t n = x.size(-1);
    int64_t m = x.numel() / n;
    at::Tensor y = at::empty_like(x);
    at::Tensor h = r.defined() ? at::empty_like(x) : at::Tensor();
    at::Tensor stats = at::empty({m, 3}, x.options().dtype(p->stats));
    int64_t flags = kStats | (w.defined() ? kW : 0) | (b.defined() ? kB : 0) |
                    (r.defined() ? kRes : 0);
    bool serial = m * n < g_par_min.load();
    launch_fwd(p, serial, m, n, rms, flags, eps, ptr(x), ptr(r), ptr(h), ptr(y), ptr(w), ptr(b),
               ptr(stats));
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({x, w, b, r, h, stats});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["rms"] = rms;
    ctx->saved_data["plan"] = plan;
    if (r.defined()) return {y, h};
    return {y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list s = ctx->get_saved_variables();
    const at::Tensor &x = s[0], &w = s[1], &b = s[2], &r = s[3], &h = s[4], &stats = s[5];
    bool rms = ctx->saved_data["rms"].toBool();
    const Plan* p = reinterpret_cast<const Plan*>(ctx->saved_data["plan"].toInt());
    at::Tensor dy = grads[0];
    at::Tensor dh = grads.size() > 1 ? grads[1] : at::Tensor();
    // needs_input_grad counts the node's inputs, which are only the tensors that were given.
    size_t edge = 0;
    auto needs = [&](bool given) { return given && ctx->needs_input_grad(edge++); };
    bool need_x = needs(true), need_w = needs(w.defined()), need_b = needs(b.defined()),
         need_r = needs(r.defined());
    if (torch::autograd::GradMode::is_enabled()) {  // create_graph=True: the reference's
      py::gil_scoped_acquire gil;
      py::tuple g = (*g_double_backward)(
          py::make_tuple(need_x, need_w, need_b, need_r), x, w, b, r, dy, dh,
          ctx->saved_data["eps"].toDouble(), rms);
      auto get = [&](int i) {
        return g[i].is_none() ? at::Tensor() : THPVariable_Unpack(g[i].ptr());
      };
      return {get(0), get(1), get(2), get(3), at::Tensor(), at::Tensor(), at::Tensor()};
    }
    const at::Tensor& v = r.defined() ? h : x;
    int64_t n = v.size(-1);
    int64_t m = v.numel() / n;
    dy = dy.defined() ? dy.contiguous() : at::zeros_like(x);  // dy undefined: only h was used
    int64_t flags = (need_w && w.defined() ? kDw : 0) | (need_b && b.defined() ? kB : 0);
    int64_t dhrs = n;
    if (dh.defined()) {
      dh = dh.contiguous();
    } else {
      dh = const_row(0, n, v.scalar_type());
      dhrs = 0;
    }
    at::Tensor g = w.defined() ? w : const_row(1, n, p->param);
    int64_t nblk = bwd_blocks(m, n);
    at::Tensor dx = at::empty_like(v);
    at::Tensor dw = (flags & kDw) ? at::empty({n}, v.options().dtype(p->param)) : at::Tensor();
    at::Tensor db = (flags & kB) ? at::empty({n}, v.options().dtype(p->param)) : at::Tensor();
    int64_t dwa = ptr(dw), dba = ptr(db), pwa = dwa, pba = dba;
    at::Tensor partials;
    if ((nblk > 1 || p->param != p->stats) && (dw.defined() || db.defined())) {
      int64_t row = nblk * n;
      partials = at::empty({2 * row}, v.options().dtype(p->stats));
      pwa = ptr(partials);
      pba = pwa + row * static_cast<int64_t>(partials.element_size());
    }
    bool serial = nblk < 2 || m * n < g_par_min.load();
    launch_bwd(p, serial, m, nblk, n, rms, flags, ptr(v), ptr(dy), ptr(dh), dhrs, ptr(dx),
               ptr(g), ptr(stats), pwa, pba, dwa, dba);
    return {need_x ? dx : at::Tensor(), dw, db, need_r ? dx : at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

// The eager call: y, (y, h), or None for the Python path.  n is an int or a 1-tuple of one.
py::object run(py::handle xo, py::handle no, py::handle wo, py::handle bo, py::handle ro,
               double eps, bool rms) {
  const at::Tensor* x = plain(xo.ptr());
  if (x == nullptr || x->dim() == 0 || !x->is_contiguous()) return py::none();
  int64_t n;
  PyObject* nobj = no.ptr();
  if (PyTuple_CheckExact(nobj) && PyTuple_GET_SIZE(nobj) == 1) nobj = PyTuple_GET_ITEM(nobj, 0);
  if (!PyLong_CheckExact(nobj)) return py::none();  // bool is not an exact int
  n = PyLong_AsLongLong(nobj);
  if (n <= 0 || x->size(-1) != n) {
    PyErr_Clear();
    return py::none();
  }
  int xk = kind_of(x->scalar_type());
  if (xk < 0) return py::none();
  const at::Tensor* w = nullptr;
  const at::Tensor* b = nullptr;
  const at::Tensor* r = nullptr;
  int wk = 4, bk = 4;
  bool grad = torch::autograd::GradMode::is_enabled();
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
  if (!ro.is_none()) {
    r = plain(ro.ptr());
    if (r == nullptr || r->scalar_type() != x->scalar_type() || !r->is_contiguous() ||
        !r->sizes().equals(x->sizes()))
      return py::none();
    train = train || (grad && r->requires_grad());
  }
  if (wk < 0 || bk < 0) return py::none();
  const Plan* p = g_plans[slot(xk, wk, bk)].load(std::memory_order_acquire);
  int64_t m = x->numel() / n;
  if (p == nullptr || m == 0) return py::none();
  int64_t elements = m * n;
  if (train) {
    if (elements >= g_big_min.load()) return py::none();
    g_native_calls++;
    auto opt = [](const at::Tensor* t) { return t ? Opt(*t) : Opt(); };
    variable_list out = Norm::apply(*x, opt(w), opt(b), opt(r), eps, rms,
                                    reinterpret_cast<int64_t>(p));
    if (r) return py::make_tuple(out[0], out[1]);
    return py::cast(out[0]);
  }
  if (elements >= g_big_min.load()) return py::none();  // the Python path's pooled outputs
  const bool serial = elements < g_par_min.load();
  g_native_calls++;
  at::Tensor y = at::empty_like(*x);
  int64_t flags = (w ? kW : 0) | (b ? kB : 0);
  if (r) {
    at::Tensor h = at::empty_like(*x);
    launch_fwd(p, serial, m, n, rms, flags | kRes, eps, ptr(*x), ptr(*r), ptr(h), ptr(y),
               w ? ptr(*w) : 0, b ? ptr(*b) : 0, 0);
    return py::make_tuple(y, h);
  }
  launch_fwd(p, serial, m, n, rms, flags, eps, ptr(*x), 0, 0, ptr(y), w ? ptr(*w) : 0,
             b ? ptr(*b) : 0, 0);
  return py::cast(y);
}

int kind_arg(py::handle dtype) {
  if (dtype.is_none()) return 4;
  return kind_of(py::cast<at::ScalarType>(dtype));
}

void register_plan(py::handle x, py::handle w, py::handle b, int64_t fwd, int64_t bwd,
                   std::vector<int64_t> fwd_isz, std::vector<int64_t> bwd_isz,
                   py::object par_fwd, py::object par_bwd, at::ScalarType param,
                   at::ScalarType stats) {
  int xk = kind_arg(x), wk = kind_arg(w), bk = kind_arg(b);
  TORCH_CHECK(xk >= 0 && xk < 4 && wk >= 0 && bk >= 0, "normkit native: unknown dtype");
  TORCH_CHECK(fwd && bwd && fwd_isz.size() == 5 && bwd_isz.size() == 6,
              "normkit native: bad driver registration");
  Plan* p = new Plan{reinterpret_cast<FwdFn>(fwd), reinterpret_cast<BwdFn>(bwd), {}, {},
                     new py::object(std::move(par_fwd)), new py::object(std::move(par_bwd)),
                     param, stats};
  std::copy(fwd_isz.begin(), fwd_isz.end(), p->fwd_isz.begin());
  std::copy(bwd_isz.begin(), bwd_isz.end(), p->bwd_isz.begin());
  g_plans[slot(xk, wk, bk)].store(p, std::memory_order_release);  // never freed (see above)
}

void configure(py::object parameter_type, py::object double_backward) {
  g_parameter_type = reinterpret_cast<PyTypeObject*>(parameter_type.ptr());
  Py_INCREF(parameter_type.ptr());
  g_double_backward = new py::object(std::move(double_backward));
}

void set_limits(int64_t par_min, int64_t big_min, int64_t block_rows, int64_t block_elems,
                int64_t max_blocks, int64_t min_par_blocks) {
  g_par_min = par_min;
  g_big_min = big_min;
  g_block_rows = block_rows;
  g_block_elems = block_elems;
  g_max_blocks = max_blocks;
  g_min_par_blocks = min_par_blocks;
}

int64_t calls() { return g_native_calls.load(); }

// Whether this process has made a parallel launch from here (cpu's fork handling asks).
bool parallel_used() { return g_par_used.load(); }

void after_fork_in_child() { g_forked.store(true); }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("run", &run);
  mod.def("register_plan", &register_plan);
  mod.def("configure", &configure);
  mod.def("set_limits", &set_limits);
  mod.def("calls", &calls);
  mod.def("parallel_used", &parallel_used);
  pthread_atfork(nullptr, nullptr, after_fork_in_child);
}
