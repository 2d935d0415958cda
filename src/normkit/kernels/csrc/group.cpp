// GroupNorm's host side (see group.h): checks the layout, allocates outputs and scratch, runs
// the phases of group_rows.h on torch's threads (launch.h).
#include "group.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <optional>

#include "buffers.h"
#include "dispatch.h"
#include "kernels.h"
#include "kinds.h"
#include "launch.h"

namespace py = pybind11;
using Opt = std::optional<at::Tensor>;

namespace normkit {
namespace cpu {
namespace {

// channels-last: spatial rows per block (the unit of parallel work, with its own partial sums),
// so that a block holds about this many elements.  A function of C only, so a sample's bits do
// not depend on the batch or the threads.
constexpr int64_t kClBlockElements = int64_t(1) << 14;

int64_t cl_block_rows(int64_t c) { return std::max<int64_t>(1, kClBlockElements / c); }

// The arguments common to forward and backward: x (B, C, S) or, channels-last, (B, S, C).
GroupArgs args_of(const at::Tensor& x, const Opt& w, int64_t groups, bool cl) {
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous() && kind_of(x.scalar_type()) >= 0,
              "normkit cpu: group_norm takes a contiguous (B, C, S) or (B, S, C) tensor");
  GroupArgs a{};
  a.cl = cl;
  a.nb = x.size(0);
  a.c = x.size(cl ? 2 : 1);
  a.s = x.size(cl ? 1 : 2);
  a.g = groups;
  TORCH_CHECK(groups > 0 && a.c % groups == 0, "normkit cpu: C not divisible by the groups");
  a.sb = cl_block_rows(a.c);
  a.nsb = (a.s + a.sb - 1) / a.sb;
  const bool f64 = x.scalar_type() == at::kDouble;
  const at::ScalarType cd = f64 ? at::kDouble : at::kFloat;
  if (w.has_value()) {
    TORCH_CHECK(w->scalar_type() == cd && w->is_contiguous() && w->numel() == a.c,
                "normkit cpu: group_norm's γ must be (C,) in the compute type");
    a.w = w->data_ptr();
  } else {
    a.w = ones_row(a.c, f64);
  }
  a.x = x.data_ptr();
  return a;
}

at::Tensor compute_empty(at::IntArrayRef sizes, const at::Tensor& x) {
  return at::empty(sizes, at::TensorOptions().dtype(x.scalar_type() == at::kDouble ? at::kDouble
                                                                                   : at::kFloat));
}

// Runs the phases (group_rows.h).  NCHW: one launch over the B·G rows.  Channels-last: the
// samples in multiples of the thread count run whole, one per unit (phase 4): one launch, and
// each sample's x read a second time from the caches of the thread that summed it; over all
// samples in phases, x came from memory twice once the batch outgrew the L3, and every phase
// was a launch (a region whose threads must all be scheduled: on a loaded machine each one can
// wait a time slice).  The rest (B below the threads, or its remainder) runs in phases 0-3,
// their blocks split between the threads.  Either way a sample gets the same bits.
void run_phases(const GroupArgs& a, GroupFn fn) {
  const bool par = a.nb * a.c * a.s >= parallel_min_elements();
  if (!a.cl) {
    run_units(a.nb * a.g, par, [&](int64_t lo, int64_t hi) { fn(a, 0, lo, hi); });
    return;
  }
  const int64_t threads = par ? std::max(1, at::get_num_threads()) : 1;
  const int64_t whole = a.nb - a.nb % threads;
  run_units(whole, par, [&](int64_t lo, int64_t hi) { fn(a, 4, lo, hi); });
  if (whole == a.nb) return;
  for (int phase = 0; phase < 4; phase++) {
    const int64_t per = phase % 2 == 1 ? a.nsb : 1;  // units per sample: blocks or the sample
    run_units((a.nb - whole) * per, par && phase % 2 == 1, [&](int64_t lo, int64_t hi) {
      fn(a, phase, whole * per + lo, whole * per + hi);
    });
  }
}

// (y, stats): y like x, stats (B·G, 3) [m1, dm, rstd] in the compute type.  w, b: (C,) in the
// compute type or None.
py::tuple group_forward(const at::Tensor& x, const Opt& w, const Opt& b, int64_t groups,
                        double eps, bool cl) {
  GroupArgs a = args_of(x, w, groups, cl);
  a.eps = eps;
  if (b.has_value()) {
    TORCH_CHECK(b->scalar_type() == (x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat) &&
                    b->is_contiguous() && b->numel() == a.c,
                "normkit cpu: group_norm's β must be (C,) in the compute type");
    a.b = b->data_ptr();
  }
  at::Tensor y = empty_output(x.sizes(), x.scalar_type());
  at::Tensor stats = compute_empty({a.nb * a.g, 3}, x);
  at::Tensor coef = a.cl ? compute_empty({a.nb, 4, a.c}, x) : at::Tensor();
  at::Tensor part = a.cl ? compute_empty({a.nb * a.nsb, 2, a.c}, x) : at::Tensor();
  a.y = y.data_ptr();
  a.stream = 2 * int64_t(y.nbytes()) >= stream_min_bytes();  // x read, y written (GroupArgs)
  a.stats = stats.data_ptr();
  if (a.cl) {
    a.coef = coef.data_ptr();
    a.part = part.data_ptr();
  }
  {
    py::gil_scoped_release nogil;
    if (x.numel()) run_phases(a, kernels()->group_fwd[kind_of(x.scalar_type())]);
  }
  return py::make_tuple(y, stats);
}

// (dx, dγ or None, dβ or None): dx like x; dγ/dβ (C,) in grad_dtype, the per-sample sums added
// in sample order.  dy like x (same dtype and layout).
py::tuple group_backward(const at::Tensor& dy, const at::Tensor& x, const Opt& w,
                         const at::Tensor& stats, int64_t groups, bool cl, bool want_w,
                         bool want_b, at::ScalarType grad_dtype) {
  GroupArgs a = args_of(x, w, groups, cl);
  TORCH_CHECK(dy.sizes().equals(x.sizes()) && dy.scalar_type() == x.scalar_type() &&
                  dy.is_contiguous(),
              "normkit cpu: group_norm's dy must be like x");
  TORCH_CHECK(stats.is_contiguous() && stats.numel() == 3 * a.nb * a.g,
              "normkit cpu: group_norm's stats must be (B·G, 3)");
  at::Tensor dx = empty_output(x.sizes(), x.scalar_type());
  at::Tensor sums = compute_empty({2, a.nb, a.c}, x);
  at::Tensor coef = a.cl ? compute_empty({a.nb, 4, a.c}, x) : at::Tensor();
  at::Tensor part = a.cl ? compute_empty({a.nb * a.nsb, 2, a.c}, x) : at::Tensor();
  a.dy = dy.data_ptr();
  a.dx = dx.data_ptr();
  a.stream = 3 * int64_t(dx.nbytes()) >= stream_min_bytes();  // x and dy read, dx written
  a.stats = stats.data_ptr();
  a.sums = sums.data_ptr();
  if (a.cl) {
    a.coef = coef.data_ptr();
    a.part = part.data_ptr();
  }
  at::Tensor dw, db;
  if (want_w) dw = at::empty({a.c}, at::TensorOptions().dtype(grad_dtype));
  if (want_b) db = at::empty({a.c}, at::TensorOptions().dtype(grad_dtype));
  {
    py::gil_scoped_release nogil;
    if (x.numel()) {
      run_phases(a, kernels()->group_bwd[kind_of(x.scalar_type())]);
      SumFn sum = kernels()->sum[x.scalar_type() == at::kDouble ? 1 : 0];
      const int gk = kind_of(grad_dtype);
      char* base = static_cast<char*>(sums.data_ptr());
      const int64_t row = a.nb * a.c * int64_t(sums.element_size());
      if (want_w) sum(a.nb, a.c, base, dw.data_ptr(), gk);
      if (want_b) sum(a.nb, a.c, base + row, db.data_ptr(), gk);
    } else {
      if (want_w) dw.zero_();
      if (want_b) db.zero_();
    }
  }
  return py::make_tuple(dx, dw.defined() ? py::cast(dw) : py::none(),
                        db.defined() ? py::cast(db) : py::none());
}

}  // namespace

void register_group(py::module_& mod) {
  mod.def("group_forward", &group_forward);
  mod.def("group_backward", &group_backward);
  mod.def("group_block_rows", &cl_block_rows);
}

}  // namespace cpu
}  // namespace normkit
