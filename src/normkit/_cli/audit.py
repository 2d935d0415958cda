"""Audit a model's normalization layers: inventory, parameters, shape, epsilon, batch
dependence, numerics, ONNX export parity, checkpoint round-trip and int8 quantization
sensitivity.

TARGET is one of:
  package.module:function   a factory returning a model, or (model, example_inputs)
  model.pt / .pth / .bin    a state_dict, loaded with weights_only=True (add --model FACTORY
                            for the architecture; alone, only parameter checks run)
  model.safetensors         a state_dict in safetensors (same)
  DIR                       a Hugging Face model directory (config.json + weights), offline
  model.onnx                an ONNX file (norm nodes, eps, γ/β, an ONNX Runtime run)

exit codes: 0 no finding at or above --fail-on, 1 findings at or above it, 2 the audit could
not run (bad or unreadable target, or bad arguments). Every output format states the verdict
of --fail-on, the one the exit code gives.

examples:
  normkit audit mypkg.models:build_model
  normkit audit ./bert-tiny --dtype float16 --format markdown
  normkit audit ckpt.safetensors --model mypkg.models:build_model --fail-on warning
  normkit audit mypkg.models:build_model --format json --output audit.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from ._args import names, positive_int

HELP = "audit a model's norms (eps, γ/β, batch dependence, numerics, ONNX parity) for CI"

# Kept in sync with normkit.audit (not imported here: this module loads for `normkit --help`).
_CHECKS = ("inventory", "parameters", "shape", "epsilon", "batch", "numerics", "export",
           "checkpoint", "quantization")
_DTYPES = ("float32", "bfloat16", "float16", "float64")


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        dims = ()
    if not dims or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(
            f"invalid shape {text!r}; comma-separated positive integers, e.g. 2,16")
    return dims


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", metavar="TARGET",
                   help="factory package.module:function, .pt/.bin/.safetensors checkpoint, "
                        "Hugging Face directory or .onnx file")
    p.add_argument("--model", metavar="FACTORY",
                   help="package.module:function building the architecture for a checkpoint")
    p.add_argument("--input-shape", type=_shape, action="append", metavar="SHAPE",
                   dest="input_shapes",
                   help="shape of a synthesised input, e.g. 2,16 (token ids when the model "
                        "starts with an embedding); repeat for several positional inputs")
    p.add_argument("--dtype", choices=_DTYPES,
                   help="run dtype (default: the model's own)")
    p.add_argument("--format", choices=("table", "json", "markdown"), default="table",
                   help="output format on stdout (default: table)")
    p.add_argument("--output", type=Path, metavar="PATH",
                   help="also write the report to PATH (JSON, or markdown for a .md path), "
                        "atomically")
    p.add_argument("--fail-on", choices=("warning", "error"), default="error",
                   help="exit 1 when a finding is at or above this severity (default: error)")
    p.add_argument("--checks", type=names(_CHECKS), metavar="LIST",
                   help=f"checks to run (default: all): {','.join(_CHECKS)}")
    p.add_argument("--skip", type=names(_CHECKS), metavar="LIST", help="checks not to run")
    p.add_argument("--opset", type=int, metavar="N",
                   help="ONNX opset for the export check (default: the exporter's)")
    p.add_argument("--exporter", choices=("auto", "dynamo", "torchscript"), default="auto",
                   help="ONNX exporter (default: auto = dynamo, falling back to TorchScript)")
    p.add_argument("--threads", type=positive_int, metavar="N",
                   help="torch/ONNX Runtime threads (default: 1 for models under 100M "
                        "parameters, else torch's default)")
    p.add_argument("--training", action="store_true",
                   help="the model is about to be trained: report frozen norm parameters")


def run(args: argparse.Namespace) -> int:
    import logging

    from .._console import console, lit
    from ._out import error

    out = console(width=160)
    err = console(stderr=True)

    def fail(msg: str) -> int:
        return error(err, "audit", msg)

    # Library loggers (exporters, transformers) must not spray the terminal or the JSON.
    logging.getLogger().setLevel(logging.ERROR)
    from normkit.audit._core import audit, audit_onnx, audit_state_dict
    from normkit.audit._findings import CHECKS

    from . import _target

    checks = list(args.checks or CHECKS)
    if args.skip:
        checks = [c for c in checks if c not in args.skip]
    t0 = time.perf_counter()
    try:
        target = _target.load_target(args.target, args.model)
    except _target.TargetError as e:
        return fail(str(e))
    try:
        if target.kind == "onnx":
            report = audit_onnx(target.onnx_path, args.input_shapes)
        elif target.model is None:
            report = audit_state_dict(target.state_dict, target=target.name)
        else:
            inputs = target.example_inputs
            if inputs is None and args.input_shapes:
                from normkit.audit._model import synthesize_inputs

                inputs = synthesize_inputs(target.model, shapes=args.input_shapes)
            import torch

            threads = args.threads or _default_threads(target.model)
            previous = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                with err.status("[dim]auditing…[/dim]") as status:
                    report = audit(
                        target.model, inputs, dtype=args.dtype, checks=checks,
                        state_dict=target.state_dict, training=args.training,
                        opset=args.opset, exporter=args.exporter,
                        progress=lambda name: status.update(
                            f"[dim]auditing: {lit(name)}…[/dim]"),
                        _target=target.name, _missing_keys=target.missing_keys,
                        _unexpected_keys=target.unexpected_keys)
            finally:
                torch.set_num_threads(previous)
    except _target.TargetError as e:
        return fail(str(e))
    except (ValueError, TypeError, ImportError) as e:
        return fail(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    report.seconds = time.perf_counter() - t0

    # Every format states the verdict of this gate, the one that sets the exit code.
    gate = args.fail_on
    if args.output is not None:
        fmt = "markdown" if args.output.suffix.lower() in (".md", ".markdown") else "json"
        try:
            report.write(args.output, fmt, fail_on=gate)
        except OSError as e:
            return fail(f"cannot write {args.output}: {e.strerror or e}")
    code = 0 if report.ok(gate) else 1
    try:
        if args.format == "json":
            # plain: machine-readable, no markup
            sys.stdout.write(report.to_json(fail_on=gate) + "\n")
        elif args.format == "markdown":
            sys.stdout.write(report.to_markdown(gate))
        else:
            render_table(report, out, gate)
        sys.stdout.flush()
    except BrokenPipeError:  # `normkit audit ... | head`: the reader left; keep the verdict
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return code


# The audit runs a few rows (3 samples x 8 tokens) through the model: per-op parallelism gains
# little and costs a thread barrier per op.  On the 2-core CI machine, busy with other jobs, the
# BERT 6x384 audit's torch checks took 3.5 s with 1 thread and 12-27 s with 2 (oversubscribed
# OpenMP threads wait for a core at every barrier).  Large models have enough work per matmul
# to use all cores.
_SMALL_MODEL_PARAMS = 100_000_000


def _default_threads(model) -> int:
    import torch

    n = sum(p.numel() for p in model.parameters())
    return 1 if n < _SMALL_MODEL_PARAMS else torch.get_num_threads()


_STYLE = {"error": "bold red", "warning": "yellow", "info": "dim"}


def render_table(report, out, fail_on: str = "error") -> None:
    """The terminal view: the verdict under the gate ``fail_on``, findings table, norm
    inventory."""
    from rich.table import Table

    from .._console import lit

    c = report.counts()
    verdict = "[green]passed[/green]" if report.ok(fail_on) else "[red]failed[/red]"
    placement = report.metrics.get("model", {}).get("placement")
    out.print(f"[bold]normkit audit[/bold] {lit(report.target)}: {verdict} "
              f"(--fail-on {fail_on}) — {c['error']} error(s), "
              f"{c['warning']} warning(s), {c['info']} info; dtype {lit(report.dtype)}"
              + (f"; {lit(placement)}" if placement else "") + f"; {report.seconds:.1f} s")
    if report.layers:
        inv = Table(title="norm layers", title_justify="left")
        for col in ("layer", "type", "shape", "eps", "affine", "dtype", "params", "placement"):
            inv.add_column(col, justify="right" if col in ("params", "eps") else "left")
        for L in report.layers:
            inv.add_row(lit(L["name"] or "(root)"), lit(L["type"]),
                        lit(L.get("normalized_shape")),
                        "–" if L.get("eps") is None else f"{L['eps']:g}",
                        "γβ" if L.get("affine") and L.get("bias") else
                        ("γ" if L.get("affine") else "–"),
                        lit(L.get("dtype")), str(L.get("params")), lit(L.get("placement") or "–"))
        out.print(inv)
    if report.findings:
        t = Table(title="findings", title_justify="left", show_lines=False)
        for col in ("severity", "id", "layer", "message", "fix"):
            t.add_column(col, overflow="fold")
        for f in report.findings:
            s = _STYLE[f.severity]
            t.add_row(f"[{s}]{f.severity}[/{s}]", lit(f.id), lit(f.layer or "–"),
                      lit(f.message), lit(f.fix))
        out.print(t)
    else:
        out.print("[green]no findings[/green]")
    batch = report.metrics.get("batch")
    if batch:
        out.print(f"batch invariance: bitwise {'yes' if batch['bitwise'] else 'no'}, max abs "
                  f"{batch['max_abs']:.3g}, max rel {batch['max_rel']:.3g} "
                  f"(batch {batch['batch']})")
    num = report.metrics.get("numerics")
    if num and num.get("output_rel_err_vs_float64") is not None:
        out.print(f"numerics: model output vs float64, max rel "
                  f"{num['output_rel_err_vs_float64']:.3g}")
    exp = report.metrics.get("export")
    if exp and "exporter" in exp:
        out.print(f"ONNX: {lit(exp['exporter'])} exporter, opset {exp['opset']}, output max rel "
                  f"{exp.get('output_max_rel', float('nan')):.3g}")
    for name, why in report.skipped.items():
        out.print(f"[dim]skipped {lit(name)}: {lit(why)}[/dim]")
