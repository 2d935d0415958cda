"""The implementations timed side by side: normkit (also with ``out=``), torch eager,
``torch.compile``, ONNX Runtime, and the copy references.  Each builder returns a zero-argument
callable that runs the case once."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .._provenance import usable_cores
from ._grid import DTYPES, LN_EPS, RMS_EPS, BenchConfig, Case


class Skip(Exception):
    """An implementation does not apply to this case (recorded as "skipped", not an error)."""


@dataclass
class _Inputs:
    x: torch.Tensor
    w: torch.Tensor
    b: torch.Tensor | None
    r: torch.Tensor | None
    dy: torch.Tensor | None


def _make_inputs(case: Case, device: str, seed: int) -> _Inputs:
    g = torch.Generator(device="cpu").manual_seed(seed)
    dt = DTYPES[case.dtype]
    shape = (case.M, case.N)

    def rand(*s, scale=1.0, shift=0.0):
        # uniform, not randn: 3x cheaper to draw 16M values, and timings do not care
        u = torch.empty(*s).uniform_(-scale, scale, generator=g).add_(shift)
        return u.to(device=device, dtype=dt)

    return _Inputs(
        x=rand(*shape, shift=0.5),
        w=rand(case.N, scale=0.1, shift=1.0),
        b=None if case.rms else rand(case.N, scale=0.1),
        r=rand(*shape) if case.fused else None,
        dy=rand(*shape) if case.pass_ == "bwd" else None,
    )


# torch eager references, module-level so torch.compile sees plain functions.
def _torch_ln(x, w, b):
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), w, b, LN_EPS)


def _torch_rms(x, w):
    return torch.nn.functional.rms_norm(x, (x.shape[-1],), w, RMS_EPS)


def _torch_add_ln(x, r, w, b):
    h = x + r
    return torch.nn.functional.layer_norm(h, (h.shape[-1],), w, b, LN_EPS), h


def _torch_add_rms(x, r, w):
    h = x + r
    return torch.nn.functional.rms_norm(h, (h.shape[-1],), w, RMS_EPS), h


_TORCH_FNS = {"ln": _torch_ln, "rms": _torch_rms, "add_ln": _torch_add_ln,
              "add_rms": _torch_add_rms}


def _args(case: Case, t: _Inputs, params: tuple[torch.Tensor, ...]) -> tuple:
    """Positional args for the _torch_* functions: (x, [r,] w [, b])."""
    return (t.x,) + ((t.r,) if case.fused else ()) + params


def _params(case: Case, t: _Inputs, grad: bool) -> tuple[torch.Tensor, ...]:
    ps = (t.w,) if case.rms else (t.w, t.b)
    return tuple(p.detach().requires_grad_(grad) for p in ps)


def _wrap(case: Case, t: _Inputs, forward: Callable[..., Any]) -> Callable[[], object]:
    """Turn ``forward(x, [r,] *params)`` into the timed callable for the case's pass.

    fwd: one call under no_grad.  bwd: one forward with grad now, then the timed call is
    autograd.grad of y (the first output) w.r.t. (x, [r,] γ [, β]).
    """
    if case.pass_ == "fwd":
        params = _params(case, t, grad=False)
        args = _args(case, t, params)

        def run_fwd():
            with torch.no_grad():
                return forward(*args)

        return run_fwd

    x = t.x.detach().requires_grad_(True)
    r = t.r.detach().requires_grad_(True) if case.fused else None
    params = _params(case, t, grad=True)
    inputs = (x,) + ((r,) if case.fused else ()) + params
    out = forward(*inputs)
    y = out[0] if isinstance(out, tuple) else out
    dy = t.dy

    def run_bwd():
        return torch.autograd.grad(y, inputs, dy, retain_graph=True)

    return run_bwd


def _build_torch(case: Case, t: _Inputs, cfg: BenchConfig) -> Callable[[], object]:
    return _wrap(case, t, _TORCH_FNS[case.op])


def _build_compile(case: Case, t: _Inputs, cfg: BenchConfig) -> Callable[[], object]:
    # A fresh dynamo cache per case: every shape gets its own specialised graph (dynamic=False,
    # the serving case), and no guard chain of 20 earlier shapes is walked on each call.
    torch._dynamo.reset()
    compiled = torch.compile(_TORCH_FNS[case.op], dynamic=False)
    return _wrap(case, t, compiled)


def _build_normkit(case: Case, t: _Inputs, cfg: BenchConfig) -> Callable[[], object]:
    import normkit

    fn = normkit.rms_norm if case.rms else normkit.layer_norm
    eps = RMS_EPS if case.rms else LN_EPS
    # Fused forward returns (y, h) like the torch peer; the fused backward differentiates y only,
    # so return_residual=False there (an unused h would cost a zero dh in backward).
    ret_h = case.fused and case.pass_ == "fwd"

    if case.fused:
        def forward(x, r, *params):
            return fn(x, (x.shape[-1],), *params, eps, residual=r, return_residual=ret_h)
    else:
        def forward(x, *params):
            return fn(x, (x.shape[-1],), *params, eps)

    # The backend is set once around the whole run (run_bench), not per call: a context
    # manager per call would add its own overhead to the M=1 times.
    return _wrap(case, t, forward)


def _build_normkit_out(case: Case, t: _Inputs, cfg: BenchConfig) -> Callable[[], object]:
    """normkit forward writing into buffers allocated once (``out=``, and ``residual_out=`` for
    the fused ops): the same bytes moved as the copy reference, which also writes into existing
    buffers."""
    if case.pass_ != "fwd":
        raise Skip("out= peer: forward only")
    import normkit

    fn = normkit.rms_norm if case.rms else normkit.layer_norm
    eps = RMS_EPS if case.rms else LN_EPS
    params = _params(case, t, grad=False)
    buf = torch.empty_like(t.x)
    hbuf = torch.empty_like(t.x) if case.fused else None
    kw = {"residual": t.r, "return_residual": True, "residual_out": hbuf} if case.fused else {}

    def run_out():
        with torch.no_grad():
            return fn(t.x, (t.x.shape[-1],), *params, eps, out=buf, **kw)

    return run_out


def _build_onnxruntime(case: Case, t: _Inputs, cfg: BenchConfig) -> Callable[[], object]:
    if case.op != "ln" or case.pass_ != "fwd" or case.dtype != "float32":
        raise Skip("ONNX Runtime peer: LayerNormalization forward float32 only")
    if torch.device(cfg.device).type != "cpu":
        raise Skip("ONNX Runtime peer: CPU only")
    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
        raise Skip("onnxruntime/onnx not installed (pip install 'normkit[export]')")
    import onnxruntime as ort
    from onnx import TensorProto, helper

    M, N = case.M, case.N
    node = helper.make_node("LayerNormalization", ["X", "Scale", "B"], ["Y"], axis=-1,
                            epsilon=LN_EPS)
    graph = helper.make_graph(
        [node],
        "normkit_bench_ln",
        [
            helper.make_tensor_value_info("X", TensorProto.FLOAT, [M, N]),
            helper.make_tensor_value_info("Scale", TensorProto.FLOAT, [N]),
            helper.make_tensor_value_info("B", TensorProto.FLOAT, [N]),
        ],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [M, N])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # the IR of opset 17; newer onnx writes IRs older runtimes refuse
    so = ort.SessionOptions()
    so.intra_op_num_threads = usable_cores()
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    # No spin-waiting: ORT's idle worker would otherwise busy-loop after each run and steal one
    # of the cores from the next implementation timed in this process.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = {
        "X": t.x.detach().numpy(),
        "Scale": t.w.detach().numpy(),
        "B": t.b.detach().numpy(),
    }
    # IO binding: inputs bound zero-copy once; the output is allocated by ORT (its arena) on
    # each run, as in serving; nothing is converted back to numpy inside the timed call.
    binding = sess.io_binding()
    for name, arr in feeds.items():
        binding.bind_cpu_input(name, arr)
    binding.bind_output("Y", "cpu")
    run_opts = ort.RunOptions()

    def run():
        sess.run_with_iobinding(binding, run_opts)

    return run


def _build_copy(case: Case, t: _Inputs, cfg: BenchConfig) -> Callable[[], object]:
    n = case.ideal_bytes // 2
    src = torch.ones(n, dtype=torch.uint8, device=cfg.device)
    dst = torch.empty_like(src).zero_()  # touched once, so timed copies hit mapped pages
    return lambda: dst.copy_(src)


def _build_clone(case: Case, t: _Inputs, cfg: BenchConfig) -> Callable[[], object]:
    n = case.ideal_bytes // 2
    src = torch.ones(n, dtype=torch.uint8, device=cfg.device)
    return src.clone


# name -> (builder, peer that enables it)
_IMPLS: dict[str, tuple[Callable[[Case, _Inputs, BenchConfig], Callable[[], object]], str]] = {
    "copy": (_build_copy, "copy"),
    "clone": (_build_clone, "clone"),
    "torch": (_build_torch, "torch"),
    "normkit": (_build_normkit, "normkit"),
    "out": (_build_normkit_out, "out"),
    "compile": (_build_compile, "compile"),
    "onnxruntime": (_build_onnxruntime, "onnxruntime"),
}


def _error_text(e: BaseException, limit: int = 600) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."
