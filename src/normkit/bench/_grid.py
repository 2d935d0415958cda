"""What the benchmark runs: the ops, dtypes and shapes, the bytes each case must move, and the
grid configuration (``BenchConfig``)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from ._timing import TimingPolicy

__all__ = ["OPS", "OP_NAMES", "PASSES", "PEERS", "DTYPES", "FULL_M", "FULL_N", "QUICK_M",
           "QUICK_N", "QUICK_BWD_OPS", "LN_EPS", "RMS_EPS", "Case", "ideal_bytes", "BenchConfig",
           "with_overrides"]

OPS = ("ln", "rms", "add_ln", "add_rms")
OP_NAMES = {
    "ln": "LayerNorm",
    "rms": "RMSNorm",
    "add_ln": "add+LayerNorm",
    "add_rms": "add+RMSNorm",
}
PASSES = ("fwd", "bwd")
# "copy" is the reference every ratio divides by; "clone" is a copy that allocates its output
# (see clone_fraction); the others are peers timed side by side.
PEERS = ("torch", "compile", "onnxruntime", "copy", "clone", "out")
DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}

FULL_M = (1, 8, 512, 4096, 16384)
FULL_N = (64, 768, 4096, 8192)
QUICK_M = (1, 512, 4096)
QUICK_N = (768, 4096)
QUICK_BWD_OPS = ("ln", "rms")  # --quick: add_ln and add_rms forward only

LN_EPS = 1e-5
RMS_EPS = 1e-6  # passed explicitly: torch's None means finfo(dtype).eps, which differs by dtype


@dataclass(frozen=True)
class Case:
    op: str  # one of OPS
    pass_: str  # "fwd" | "bwd"
    dtype: str  # a key of DTYPES
    M: int
    N: int

    @property
    def fused(self) -> bool:
        return self.op.startswith("add_")

    @property
    def rms(self) -> bool:
        return self.op.endswith("rms")

    @property
    def ideal_bytes(self) -> int:
        return ideal_bytes(self.op, self.pass_, self.dtype, self.M, self.N)

    @property
    def label(self) -> str:
        return f"{self.op} {self.pass_} {self.dtype} {self.M}x{self.N}"

    def key(self) -> dict[str, Any]:
        return {"op": self.op, "pass": self.pass_, "dtype": self.dtype, "M": self.M, "N": self.N}


def ideal_bytes(op: str, pass_: str, dtype: str, M: int, N: int) -> int:
    """Bytes the op must move (see the module docstring)."""
    item = torch.empty((), dtype=DTYPES[dtype]).element_size()
    tile = M * N * item
    if pass_ == "fwd":
        return (4 if op.startswith("add_") else 2) * tile  # x, y (+ residual, h)
    if pass_ == "bwd":
        stats = M * (4 if op.endswith("rms") else 8)  # float32 rstd (+ mean) per row
        return 3 * tile + stats  # x, dy, dx
    raise ValueError(f"pass must be 'fwd' or 'bwd', got {pass_!r}")


def _check_choices(what: str, values: Iterable[str], allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    bad = [v for v in values if v not in allowed]
    if bad:
        raise ValueError(f"{what}: unknown {bad}; choose from {', '.join(allowed)}")


@dataclass(frozen=True)
class BenchConfig:
    """What to run.  ``BenchConfig()`` is the full grid; ``BenchConfig.quick()`` the --quick one.

    ``bwd_ops``: the ops whose backward is timed (only those also in ``ops``); empty for forward
    only.  ``backend``: the normkit backend the normkit column runs with.
    """

    ops: tuple[str, ...] = OPS
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    Ms: tuple[int, ...] = FULL_M
    Ns: tuple[int, ...] = FULL_N
    bwd_ops: tuple[str, ...] = OPS
    peers: tuple[str, ...] = PEERS
    device: str = "cpu"
    backend: str = "auto"
    quick: bool = False
    timing: TimingPolicy = field(default_factory=TimingPolicy)
    seed: int = 0

    def __post_init__(self):
        for name in ("ops", "dtypes", "Ms", "Ns", "bwd_ops", "peers"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        _check_choices("ops", self.ops, OPS)
        _check_choices("bwd_ops", self.bwd_ops, OPS)
        _check_choices("dtypes", self.dtypes, DTYPES)
        _check_choices("peers", self.peers, PEERS)
        _check_choices("backend", (self.backend,), ("auto", "reference", "cpu"))
        for name in ("Ms", "Ns"):
            vals = getattr(self, name)
            if not vals or any(not isinstance(v, int) or v < 1 for v in vals):
                raise ValueError(f"{name} must be positive integers, got {vals}")
        if not self.ops or not self.dtypes:
            raise ValueError("need at least one op and one dtype")
        dev = torch.device(self.device)
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but torch.cuda.is_available() is False")

    @classmethod
    def quick_grid(cls, **overrides: Any) -> BenchConfig:
        """The --quick grid: under a minute on a 2-core machine."""
        base = dict(
            ops=("ln", "rms", "add_ln"),
            dtypes=("float32", "bfloat16"),
            Ms=QUICK_M,
            Ns=QUICK_N,
            bwd_ops=QUICK_BWD_OPS,
            # torch.compile (~2 s of compiling per case) and clone would not fit in the minute
            peers=("torch", "onnxruntime", "copy"),
            quick=True,
            timing=TimingPolicy.quick(),
        )
        base.update(overrides)
        return cls(**base)

    def cases(self) -> list[Case]:
        # Grouped by (op, pass, dtype) so each kernel signature JIT-compiles once, up front.
        out = []
        for op in self.ops:
            for pass_ in PASSES:
                if pass_ == "bwd" and op not in self.bwd_ops:
                    continue
                for dtype in self.dtypes:
                    for M in self.Ms:
                        for N in self.Ns:
                            out.append(Case(op, pass_, dtype, M, N))
        return out

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["timing"] = asdict(self.timing)
        return d


def with_overrides(config: BenchConfig, **kw: Any) -> BenchConfig:
    """``dataclasses.replace`` that skips None values (CLI flags left unset)."""
    return replace(config, **{k: v for k, v in kw.items() if v is not None})
