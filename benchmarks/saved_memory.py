"""Activation memory the fused add+norm keeps for backward: per layer, and over a small
transformer's training step, counted with ``torch.autograd.graph.saved_tensors_hooks``.

The bar (issue 27): the fused add+norm saves at most one M×N tensor plus the per-row
statistics (it used to save x, the residual and h: three).

* Per layer: one training call of the fused add+norm (LayerNorm and RMSNorm, float32 and
  bfloat16, M×N = 4096×1024) on the eager C++ node and on the general path (``_NormFunction``),
  each also with ``memory_efficient=True`` (y saved instead of h), and torch's composition
  ``h = x + r; F.layer_norm(h)`` for comparison.  Reported: bytes of every tensor saved, and
  how many of them are M×N.
* Step: a 6-block pre-LN decoder (d=256, 4 heads, seq 128, batch 8, vocab 512) whose residual
  adds are fused into its 13 LayerNorms (``normkit.layer_norm(out, ..., residual=h,
  return_residual=True)``: the residual stream h comes back from the norm), against the same
  model with torch's add then ``F.layer_norm``, and the fused model with
  ``memory_efficient=True`` (each norm keeps its output y, which the next linear layer keeps
  anyway, so the norms add no M×N tensor of their own).  Reported: the bytes of the
  distinct storages the graph holds for backward when the forward ends (parameters left out) —
  the activation peak of the step, since backward only frees them — and the sum over every
  save.

Byte counts are exact and deterministic (no timing, so the shared machine's load does not
matter).  CPU peak RSS is too noisy for this and is not used.  Before/after: run it on each
checkout, e.g. ``PYTHONPATH=<old checkout>/src python benchmarks/saved_memory.py --label
before``; the normkit it imported is recorded.

    python benchmarks/saved_memory.py [--label after] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import normkit
from normkit import _dispatch
from normkit.bench import machine_info, write_json_atomic

M, N = 4096, 1024


@contextlib.contextmanager
def _counting():
    """Yields the list of tensors autograd saves for backward inside the block."""
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield saved


@contextlib.contextmanager
def _general_path():
    """The eager C++ entry point off: training calls take ``_NormFunction`` (as tests do)."""
    fast, refresh = _dispatch._fast, _dispatch._refresh_fast
    _dispatch._fast, _dispatch._refresh_fast = None, lambda: None
    try:
        yield
    finally:
        _dispatch._fast, _dispatch._refresh_fast = fast, refresh


def fused(x, w, b, r, rms, lean=False):
    if rms:
        return normkit.rms_norm(x, N, w, 1e-6, residual=r, return_residual=True,
                                memory_efficient=lean)
    return normkit.layer_norm(x, N, w, b, residual=r, return_residual=True,
                              memory_efficient=lean)


def fused_lean(x, w, b, r, rms):
    return fused(x, w, b, r, rms, lean=True)


def composed(x, w, b, r, rms):
    h = x + r
    return (F.rms_norm(h, (N,), w, 1e-6) if rms else F.layer_norm(h, (N,), w, b)), h


def per_layer() -> list[dict]:
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for rms in (False, True):
            x, r = (torch.randn(M, N, dtype=dtype, requires_grad=True) for _ in range(2))
            w = torch.randn(N, dtype=dtype, requires_grad=True)
            b = None if rms else torch.randn(N, dtype=dtype, requires_grad=True)
            for route, ctx, fn in (("normkit eager (C++ node)", contextlib.nullcontext, fused),
                                   ("normkit general path", _general_path, fused),
                                   ("normkit eager, memory_efficient", contextlib.nullcontext,
                                    fused_lean),
                                   ("normkit general, memory_efficient", _general_path,
                                    fused_lean),
                                   ("torch add + norm", contextlib.nullcontext, composed)):
                with ctx(), _counting() as saved:
                    y, _ = fn(x, w, b, r, rms)
                rows.append({
                    "op": "rms" if rms else "ln", "dtype": str(dtype).removeprefix("torch."),
                    "route": route, "node": type(y.grad_fn).__name__,
                    "saved_bytes": sum(t.nbytes for t in saved),
                    "saved_mxn_tensors": sum(t.numel() == M * N for t in saved),
                    "saved": [[list(t.shape), str(t.dtype).removeprefix("torch.")]
                              for t in saved],
                })
    return rows


class Block(nn.Module):
    """Pre-LN block taking (sublayer output, residual stream) and returning the same pair."""

    def __init__(self, d, heads, fused, lean=False):
        super().__init__()
        self.heads, self.fused, self.lean = heads, fused, lean
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def attn(self, x):
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for z in self.qkv(x).split(d, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))

    def forward(self, out, h):
        y, h = add_norm(self.ln1, out, h, self.fused, self.lean)
        out = self.attn(y)
        y, h = add_norm(self.ln2, out, h, self.fused, self.lean)
        return self.fc2(F.gelu(self.fc1(y))), h


def add_norm(ln, out, h, fused, lean=False):
    """(LayerNorm(h + out), h + out); the first call of a model has no h yet."""
    if fused:
        return normkit.layer_norm(out, ln.normalized_shape, ln.weight, ln.bias, ln.eps,
                                  residual=h, return_residual=True, memory_efficient=lean)
    h = out if h is None else h + out
    return F.layer_norm(h, ln.normalized_shape, ln.weight, ln.bias, ln.eps), h


class Decoder(nn.Module):
    def __init__(self, fused, vocab=512, d=256, heads=4, layers=6, seq=128, lean=False):
        super().__init__()
        self.fused, self.lean = fused, lean
        self.emb, self.pos = nn.Embedding(vocab, d), nn.Parameter(torch.randn(seq, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, heads, fused, lean) for _ in range(layers))
        self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, idx):
        out, h = self.emb(idx) + self.pos[: idx.shape[1]], None
        for blk in self.blocks:
            out, h = blk(out, h)
        y, _ = add_norm(self.ln_f, out, h, self.fused, self.lean)
        return self.head(y)


def step() -> list[dict]:
    rows = []
    for fused, lean in ((True, False), (True, True), (False, False)):
        torch.manual_seed(0)
        model = Decoder(fused, lean=lean)
        idx = torch.randint(0, 512, (8, 128))
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        with _counting() as saved:
            loss = F.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for t in saved if t.untyped_storage().data_ptr() not in params}
        loss.backward()  # the step itself still runs
        rows.append({
            "model": ("torch add + F.layer_norm" if not fused else
                      "normkit fused add+LN, memory_efficient" if lean else "normkit fused add+LN"),
            "activation_bytes_held": sum(storages.values()),
            "saved_bytes_sum_over_saves": sum(t.nbytes for t in saved),
            "saves": len(saved),
        })
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", default="current", help="what this run measures (before, after)")
    ap.add_argument("--json", type=Path, help="where to write the result")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    now = dt.datetime.now(dt.timezone.utc)
    doc = {
        "benchmark": "activation bytes saved for backward (saved_tensors_hooks)",
        "label": args.label,
        "normkit_imported_from": str(Path(normkit.__file__).parent),
        "date": now.isoformat(timespec="seconds"),
        "per_layer": {"M": M, "N": N, "rows": per_layer()},
        "step": {"model": "6-block pre-LN decoder, d=256, 4 heads, seq 128, batch 8, vocab 512",
                 "rows": step()},
        "machine": machine_info(),
    }
    path = args.json or (Path(__file__).parent / "results"
                         / f"saved-memory-{args.label}-{now.strftime('%Y%m%d-%H%M%S')}.json")
    write_json_atomic(path, doc)
    mxn = {"float32": M * N * 4, "bfloat16": M * N * 2}
    for r in doc["per_layer"]["rows"]:
        print(f"{r['op']:4} {r['dtype']:9} {r['route']:34} {r['saved_mxn_tensors']} M×N tensors, "
              f"{r['saved_bytes'] / mxn[r['dtype']]:.3f} × M×N bytes ({r['saved_bytes']} B)")
    for r in doc["step"]["rows"]:
        print(f"step {r['model']:38} {r['activation_bytes_held'] / 2**20:7.2f} MiB held "
              f"({r['saves']} saves, {r['saved_bytes_sum_over_saves'] / 2**20:.2f} MiB summed)")
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
