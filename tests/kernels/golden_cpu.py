"""The golden corpus of the CPU kernels: every op × dtype × option on awkward shapes, as hashes
of the bits the kernels produced when the corpus was recorded.

The corpus was recorded from the numba kernels (commit 2f03a06) before they were ported to C++;
``test_golden.py`` checks that today's kernels give the same bits, case for case — outputs, h,
the saved statistics and every gradient.  Record it again (only when the contract changes on
purpose) with::

    python tests/kernels/golden_cpu.py --record tests/kernels/data/golden-cpu.json

Inputs come from a counter-based generator written here (splitmix64, then sums of uniforms:
integer arithmetic and exact float64 additions only), so they are the same on every machine
and with every numpy; a hash of each case's inputs is kept beside its outputs, so that a change
of the inputs is told apart from a change of the kernels.  NaNs are hashed as one canonical NaN:
IEEE leaves a NaN's sign and payload to the hardware (x86 and Arm propagate them differently,
and so do an FMA's operand orders), and the contract only says a NaN row stays non-finite.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import zlib
from dataclasses import dataclass

import numpy as np
import torch

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
DTYPE_NAMES = {F32: "f32", BF16: "bf16", F16: "f16", F64: "f64"}
BY_NAME = {v: k for k, v in DTYPE_NAMES.items()}

# N: 1 (no vector at all), 7 and 33 (a tail; 33 is a pair and a tail for bfloat16), 64 (short
# rows, grouped backward), 1000 (row by row), 4097 (long rows: groups of four in float32/float64,
# a tail), 16411 (> 16K: several 1024-element blocks of the row sums, a long tail of vectors).
NS = (1, 7, 33, 64, 1000, 4097, 16411)
# Rows per N besides M = 1: enough rows for the special ones, and sizes that take the parallel
# drivers (≥ 32K elements) and several backward row blocks (131 x 64: 8 blocks; 20 x 16411: 20).
MS = {1: (131,), 7: (131,), 33: (131,), 64: (131, 600), 1000: (37,), 4097: (9,), 16411: (20,)}


@dataclass(frozen=True)
class Case:
    """One forward (and its backward) through the kernels' host functions."""

    op: str  # "ln", "rms", "add_ln", "add_rms"
    x: str  # x dtype name
    n: int
    m: int
    w: str | None  # γ dtype name, or None
    b: str | None  # β dtype name, or None (always None for RMSNorm)
    zc: bool = False
    casting: str = "torch"
    out: str | None = None  # out_dtype name
    rows: str = "normal"  # "normal" or "nonfinite" (NaN and Inf rows too)
    strided: bool = False  # x a column slice of a wider tensor (rows with a stride)

    @property
    def key(self) -> str:
        return (f"{self.op}/{self.x}/{self.m}x{self.n}/w={self.w}/b={self.b}/zc={int(self.zc)}/"
                f"{self.casting}/out={self.out}/{self.rows}" + ("/strided" if self.strided else ""))

    @property
    def rms(self) -> bool:
        return self.op in ("rms", "add_rms")

    @property
    def residual(self) -> bool:
        return self.op.startswith("add_")


def _options(x: str, rms: bool):
    """(w, b, zc, casting, out) option sets for x dtype ``x``: what users pass, each kernel
    variant at least once (γ/β present or not, a wider γ, zero-centred γ, every casting, an
    output dtype of its own)."""
    half = x in ("bf16", "f16")
    wb = lambda w: (w, None if rms else w)  # noqa: E731
    opts = [
        (*wb(x), False, "torch", None),
        (None, None, False, "torch", None),
        (*wb(x), True, "torch", None),
        (*wb(x), True, "gemma", None),
        (*wb(x), False, "llama", None),
        (*wb(x), True, "llama", None),
    ]
    if half:
        opts += [
            (*wb("f32"), False, "torch", None),  # float32 γ/β with 16-bit activations
            (*wb("f32"), False, "llama", None),  # output promoted to float32
            (*wb(x), False, "t5", None),  # x̂ rounded to γ's dtype
            (*wb(x), True, "t5", None),
            (*wb("f32"), False, "t5", None),
            (*wb(x), False, "torch", "f32"),
        ]
    elif x == "f32":
        opts += [
            (*wb("bf16"), False, "torch", None),  # a 16-bit γ widened
            (*wb("bf16"), False, "t5", None),  # x̂ rounded to bfloat16, output bfloat16
            (*wb("f32"), False, "t5", None),
            (*wb(x), False, "torch", "bf16"),
            # float64 output of float32 input: the numba kernels could not compile it (an LLVM
            # error: a float32 vector "truncated" to float64); test_golden.py checks it against
            # the float32 output widened instead
        ]
    else:  # f64
        opts += [
            (*wb(x), False, "torch", "f32"),
            (*wb(x), False, "torch", "bf16"),
        ]
    return opts


def cases() -> list[Case]:
    out = []
    for x in ("f32", "bf16", "f16", "f64"):
        for op in ("ln", "rms", "add_ln", "add_rms"):
            rms = op in ("rms", "add_rms")
            for n in NS:
                for m in (1, *MS[n]):
                    for i, (w, b, zc, casting, od) in enumerate(_options(x, rms)):
                        if i > 1 and m not in (1, MS[n][0]):
                            continue  # the big M for the main options only
                        out.append(Case(op, x, n, m, w, b, zc, casting, od))
                    if m > 1:
                        main = _options(x, rms)[0]
                        out.append(Case(op, x, n, m, *main[:2], rows="nonfinite"))
                        if m == MS[n][0]:
                            out.append(Case(op, x, n, m, *main[:2], strided=True))
    return out


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _uniform(seed: int, count: int) -> np.ndarray:
    """``count`` uniforms in [0, 1) from splitmix64 at counters seed·2^32 + k (float64, exact)."""
    with np.errstate(over="ignore"):
        z = (np.arange(count, dtype=np.uint64) + np.uint64((seed & 0xFFFFFFFF) << 32))
        z = z * np.uint64(0x9E3779B97F4A7C15) + np.uint64(0x632BE59BD9B4E5F5)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * (2.0 ** -53)


def _normal(seed: int, shape) -> np.ndarray:
    """Roughly standard normal values (a sum of four uniforms, centred and scaled: additions
    and one multiplication, each exactly rounded, so the same on every machine)."""
    count = int(np.prod(shape))
    u = _uniform(seed, 4 * count).reshape(4, count)
    return (((u[0] + u[1]) + (u[2] + u[3])) - 2.0).reshape(shape) * 1.7320508075688772


def _seed(key: str, what: str) -> int:
    return zlib.crc32(f"{key}|{what}".encode())


def _rows(case: Case, what: str) -> np.ndarray:
    """(M, N) float64 values of x (or the residual); the special rows first where M > 1."""
    m, n = case.m, case.n
    v = _normal(_seed(case.key, what), (m, n))
    v *= 1.0 + np.arange(m).reshape(m, 1) % 3  # scales 1, 2, 3
    if m > 1 and what == "x":
        far = {"f32": (1e4, 1e-2), "f64": (1e4, 1e-6), "bf16": (3000.0, 40.0),
               "f16": (500.0, 1.0)}[case.x]
        v[1] = far[0] + far[1] * v[1]  # far from zero: exact shifts matter
        v[2] = 0.75  # constant: LayerNorm gives β exactly
        if n > 16:
            v[3, :16] += 40.0  # first 16 not typical of the row: the second pass about m1 + dm
        if case.rows == "nonfinite" and m > 5:
            v[4, n // 2] = np.nan
            v[5, (n - 1) // 3] = np.inf
    return v


def inputs(case: Case) -> dict:
    """The case's tensors: x, residual, γ, β, dy, dh (None where absent)."""
    xd = BY_NAME[case.x]
    x = torch.from_numpy(_rows(case, "x")).to(xd)
    if case.strided:  # rows 3 columns apart past their end
        wide = torch.from_numpy(_normal(_seed(case.key, "pad"), (case.m, case.n + 3))).to(xd)
        wide[:, : case.n] = x
        x = wide[:, : case.n]
    r = torch.from_numpy(_rows(case, "r")).to(xd) if case.residual else None
    w = b = None
    if case.w:
        w = torch.from_numpy(1.0 + 0.5 * _normal(_seed(case.key, "w"), (case.n,)))
        w = w.to(BY_NAME[case.w])
    if case.b:
        b = torch.from_numpy(0.5 * _normal(_seed(case.key, "b"), (case.n,))).to(BY_NAME[case.b])
    return {"x": x, "r": r, "w": w, "b": b}


def grads_in(case: Case, y_dtype: torch.dtype, x_dtype: torch.dtype):
    dy = torch.from_numpy(_normal(_seed(case.key, "dy"), (case.m, case.n))).to(y_dtype)
    dh = None
    if case.residual:
        dh = torch.from_numpy(_normal(_seed(case.key, "dh"), (case.m, case.n))).to(x_dtype)
    return dy, dh


# ----------------------------------------------------------------------------------------------
# Hashes
# ----------------------------------------------------------------------------------------------

_CANONICAL_NAN = {2: None, 4: 0x7FC00000, 8: 0x7FF8000000000000}


def digest(t: torch.Tensor | None) -> str | None:
    """A short hash of t's dtype, shape and bits, every NaN counted as one canonical NaN."""
    if t is None:
        return None
    t = t.detach().contiguous()
    size = t.element_size()
    ints = t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[size]).clone()
    nan = torch.isnan(t)
    if bool(nan.any()):
        canon = _CANONICAL_NAN[size]
        if size == 2:
            canon = 0x7FC0 if t.dtype == BF16 else 0x7E00
        ints[nan] = canon if canon < (1 << (8 * size - 1)) else canon - (1 << (8 * size))
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(ints.numpy().tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Running a case
# ----------------------------------------------------------------------------------------------


def run(case: Case, cpu) -> dict:
    """The digests of one case on the kernels module ``cpu`` (normkit.kernels.cpu):
    the host forward (y, h, statistics) and backward (dx, dγ, dβ), and for "torch" casting the
    public API too (the eager paths: inference, autograd, ``out=`` in place)."""
    t = inputs(case)
    x, r, w, b = t["x"], t["r"], t["w"], t["b"]
    od = BY_NAME[case.out] if case.out else None
    eps = 1e-6 if case.rms else 1e-5
    res = {"inputs": digest(torch.cat([v.reshape(-1).double() for v in (x, r, w, b)
                                       if v is not None]))}
    y, h, stats = cpu.forward(x, w, b, r, eps, case.rms, case.zc, case.casting, od, True)
    res.update(y=digest(y), h=digest(h), stats=digest(stats))
    dy, dh = grads_in(case, y.dtype, x.dtype)
    v = h if h is not None else x.contiguous()
    dx, dw, db = cpu.backward(dy, dh, v, w, b is not None, stats, case.rms, case.zc,
                              case.casting, True)
    res.update(dx=digest(dx), dw=digest(dw), db=digest(db))
    if case.casting == "torch" and not case.zc and od is None:
        res.update(_public(case, x, r, w, b, eps, dy, dh))
    return res


def _normkit():
    # GOLDEN_PKG: record from a copy of the package under another name (the numba kernels
    # beside the C++ ones)
    import importlib

    return importlib.import_module(os.environ.get("GOLDEN_PKG", "normkit"))


def _call(case, x, w, b, eps, r, **kw):
    normkit = _normkit()

    if case.rms:
        return normkit.rms_norm(x, case.n, w, eps, residual=r, return_residual=True, **kw)
    return normkit.layer_norm(x, case.n, w, b, eps, residual=r, return_residual=True, **kw)


def _public(case, x, r, w, b, eps, dy, dh):
    out = {}
    with torch.no_grad():
        y, h = _call(case, x, w, b, eps, r)
        out.update(api_y=digest(y), api_h=digest(h) if r is not None else None)
        if r is not None and not case.strided:  # the serving step: h into r, y into x
            xx, rr = x.clone(), r.clone()
            _call(case, xx, w, b, eps, rr, out=xx, residual_out=rr)
            out.update(inplace_y=digest(xx), inplace_h=digest(rr))
    leaves = [v.detach().clone().requires_grad_() if v is not None else None for v in (x, w, b, r)]
    xx, ww, bb, rr = leaves
    y, h = _call(case, xx, ww, bb, eps, rr)
    outs, gs = [y], [dy]
    if rr is not None:
        outs.append(h)
        gs.append(dh)
    wrt = [v for v in leaves if v is not None]
    got = torch.autograd.grad(outs, wrt, gs)
    names = [k for k, v in zip(("api_dx", "api_dw", "api_db", "api_dr"), leaves, strict=True)
             if v is not None]
    out.update({k: digest(g) for k, g in zip(names, got, strict=True)})
    return out


def record(path: str, dtypes=None) -> None:
    import importlib

    normkit = _normkit()
    cpu = importlib.import_module(normkit.__name__ + ".kernels.cpu")
    all_cases = [c for c in cases() if dtypes is None or c.x in dtypes]
    corpus = {}
    with normkit.use_backend("cpu"):
        for i, case in enumerate(all_cases):
            corpus[case.key] = run(case, cpu)
            if i % 100 == 0:
                print(f"{i}/{len(all_cases)} {case.key}", file=sys.stderr, flush=True)
    doc = {
        "schema": 1,
        "what": "hashes of the CPU kernels' bits per case (tests/kernels/golden_cpu.py)",
        "recorded_with": os.environ.get("GOLDEN_RECORDED_WITH", ""),
        "torch": torch.__version__,
        "cases": corpus,
    }
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=0, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    print(f"{len(corpus)} cases -> {path}", file=sys.stderr)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--record", metavar="PATH", required=True)
    p.add_argument("--dtypes", help="only these x dtypes (comma-separated), for a partial file")
    a = p.parse_args()
    record(a.record, a.dtypes.split(",") if a.dtypes else None)
