"""The bad-input table of docs/bad-inputs.md, generated here from what the code does.

Each case feeds normkit one bad input — through the Python API, the ``normkit`` command or a
damaged file — and checks three things:

* the answer: the exception type (API), the exit code and a single stderr line (CLI), or the
  warning (a damaged file normkit can still read);
* that the message names the argument or the file at fault;
* that nothing the user had is written or lost: every tensor passed in keeps its bits and every
  file in the case's directory keeps its bytes (a case that reads a damaged file also checks
  that every intact record comes back).

The page is rendered from the outcomes, and the test fails where it differs from the page.
After a deliberate change, regenerate it:
``NORMKIT_WRITE_DOCS=1 python -m pytest tests/test_bad_inputs.py``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

import normkit
from normkit.monitor import Baseline, JsonlExporter, read_jsonl

PAGE = Path(__file__).resolve().parents[1] / "docs" / "bad-inputs.md"


@dataclass(frozen=True)
class Case:
    """One bad input.

    ``setup(dir)`` returns the objects the case passes (tensors are checked unchanged after);
    ``run(objs, dir)`` feeds them to normkit.  ``expect``: an exception type, an exit code
    (``int``: the case runs the CLI), or ``Warning`` (normkit reads on and warns; ``run`` then
    returns what it read, and ``intact`` checks it).
    """

    where: str
    given: str
    run: Callable
    expect: type | int
    names: str
    setup: Callable = lambda d: {}
    intact: Callable | None = None   # (result, objs) -> str: what was kept, asserted inside
    id: str = field(default="")


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=dtype)


def _tensors(**shapes):
    return lambda d: {k: (_x(*v) if isinstance(v, tuple) else v()) for k, v in shapes.items()}


def _cli(*argv: str):
    """A run of ``normkit ARGV`` in the case's directory: (exit code, stderr)."""

    def run(objs, d):
        from normkit._cli.main import main

        err, cwd = io.StringIO(), os.getcwd()
        os.chdir(d)
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                try:
                    code = main(list(argv))
                except SystemExit as e:  # argparse's usage errors: the usage, then one line
                    usage = err.getvalue().splitlines()
                    assert usage and usage[0].startswith("usage:"), usage
                    return e.code, next(ln for ln in usage if ": error: " in ln)
        finally:
            os.chdir(cwd)
        return code, err.getvalue()

    return run


# --- files the cases damage --------------------------------------------------------------------

_RECORDS = 4


def _run_jsonl(path: Path) -> None:
    """A real telemetry run of _RECORDS sampled steps."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), normkit.nn.LayerNorm(8))
    with torch.no_grad(), normkit.watch(model, model_name="m", model_version="v1",
                                        exporters=[JsonlExporter(path)],
                                        background_export=False):
        for _ in range(_RECORDS):
            model(_x(16, 8))


def _torn(d):
    """A run whose writer died mid-line, then appended to by a second one."""
    p = d / "run.jsonl"
    _run_jsonl(p)
    with p.open("a") as f:
        f.write('{"type": "step", "step": 5, "layers": {"1": {"rows": 1')   # died here
    _run_jsonl(p)                                                           # the next process
    return {"path": p}


def _steps_back(result, objs):
    steps = [r for r in result if r.get("type") == "step"]
    assert len(steps) == 2 * _RECORDS, len(steps)
    return f"the {len(steps)} whole records of both writers are read"


def _baseline_with(d, mutate):
    p = d / "baseline.json"
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), normkit.nn.LayerNorm(8))
    with torch.no_grad(), normkit.watch(model, model_name="m", model_version="v1") as w:
        for _ in range(3):
            model(_x(16, 8))
    w.baseline().save(p)
    doc = json.loads(p.read_text())
    mutate(doc)
    p.write_text(json.dumps(doc))
    return p


def _rows_lots(doc):
    doc["layers"][next(iter(doc["layers"]))]["rows"] = "lots"


def _report_run(d, line: str):
    p = d / "run.jsonl"
    _run_jsonl(p)
    with p.open("a") as f:
        f.write(line + "\n")


# --- the cases ----------------------------------------------------------------------------------


CASES = [
    # Python API: tensors and options
    Case("API", "`layer_norm(x, 7)`, x of shape (4, 8)",
         lambda o, d: normkit.layer_norm(o["x"], 7), RuntimeError, "normalized_shape",
         setup=_tensors(x=(4, 8))),
    Case("API", "`layer_norm(x, 8, weight=torch.ones(7))`",
         lambda o, d: normkit.layer_norm(o["x"], 8, o["w"]), RuntimeError, "weight",
         setup=_tensors(x=(4, 8), w=lambda: torch.ones(7))),
    Case("API", "`rms_norm(x, 8, residual=r)`, r of shape (3, 8)",
         lambda o, d: normkit.rms_norm(o["x"], 8, residual=o["r"]), RuntimeError, "residual",
         setup=_tensors(x=(4, 8), r=(3, 8))),
    Case("API", "`layer_norm(x, 8)`, x an int64 tensor",
         lambda o, d: normkit.layer_norm(o["x"], 8), TypeError, "x",
         setup=_tensors(x=lambda: torch.arange(32).reshape(4, 8))),
    Case("API", "`layer_norm([[1.0] * 8], 8)` (a list)",
         lambda o, d: normkit.layer_norm([[1.0] * 8], 8), TypeError, "x"),
    Case("API", "`layer_norm(x, 8, eps=-1.0)`",
         lambda o, d: normkit.layer_norm(o["x"], 8, eps=-1.0), ValueError, "eps",
         setup=_tensors(x=(4, 8))),
    Case("API", "`layer_norm(x, 8, eps=float('nan'))`",
         lambda o, d: normkit.layer_norm(o["x"], 8, eps=float("nan")), ValueError, "eps",
         setup=_tensors(x=(4, 8))),
    Case("API", "`layer_norm(x, 8, eps='1e-5')`",
         lambda o, d: normkit.layer_norm(o["x"], 8, eps="1e-5"), TypeError, "eps",
         setup=_tensors(x=(4, 8))),
    Case("API", "`layer_norm(x, 8.0)`",
         lambda o, d: normkit.layer_norm(o["x"], 8.0), TypeError, "normalized_shape",
         setup=_tensors(x=(4, 8))),
    Case("API", "`rms_norm(x, 8, casting='fast')`",
         lambda o, d: normkit.rms_norm(o["x"], 8, casting="fast"), ValueError, "casting",
         setup=_tensors(x=(4, 8))),
    Case("API", "`layer_norm(buf[:4], 8, out=buf[1:])` (out overlaps x)",
         lambda o, d: normkit.layer_norm(o["buf"][:4], 8, out=o["buf"][1:]), RuntimeError, "out",
         setup=_tensors(buf=(5, 8))),
    Case("API", "`rms_norm(buf[:4], 8, residual=r, residual_out=buf[1:])`",
         lambda o, d: normkit.rms_norm(o["buf"][:4], 8, residual=o["r"], return_residual=True,
                                       residual_out=o["buf"][1:]),
         RuntimeError, "residual_out", setup=_tensors(buf=(5, 8), r=(4, 8))),
    Case("API", "`layer_norm(x, 8, out=torch.empty(1, 8).expand(4, 8))`",
         lambda o, d: normkit.layer_norm(o["x"], 8, out=o["out"].expand(4, 8)), RuntimeError,
         "out", setup=_tensors(x=(4, 8), out=(1, 8))),
    Case("API", "`layer_norm(x, 8, out=torch.empty(3, 8))`",
         lambda o, d: normkit.layer_norm(o["x"], 8, out=o["out"]), RuntimeError, "out",
         setup=_tensors(x=(4, 8), out=(3, 8))),
    Case("API", "`layer_norm(x, 8)` with x requiring grad, `out=o`",
         lambda o, d: normkit.layer_norm(o["x"], 8, out=o["out"]), RuntimeError, "out",
         setup=_tensors(x=lambda: _x(4, 8).requires_grad_(), out=(4, 8))),
    Case("API", "`layer_norm(x.to_sparse(), 8)`",
         lambda o, d: normkit.layer_norm(o["x"].to_sparse(), 8), NotImplementedError, "x",
         setup=_tensors(x=(4, 8))),
    Case("API", "`layer_norm(torch.nested.nested_tensor([...]), 8)`",
         lambda o, d: normkit.layer_norm(torch.nested.nested_tensor([o["x"], o["x"][:2]]), 8),
         NotImplementedError, "x", setup=_tensors(x=(4, 8))),
    Case("API", "`use_backend('gpu')`",
         lambda o, d: normkit.use_backend("gpu"), ValueError, "backend"),
    Case("API", "`normkit.nn.LayerNorm(8, casting='fp8')`",
         lambda o, d: normkit.nn.LayerNorm(8, casting="fp8"), ValueError, "casting"),
    Case("API", "`normkit.nn.LayerNormLSTM(8, 16, bidirectional=True)`",
         lambda o, d: normkit.nn.LayerNormLSTM(8, 16, bidirectional=True), NotImplementedError,
         "bidirectional"),
    Case("API", "`normkit.nn.LayerNormLSTM(8, 16)(x)`, x of shape (5, 2, 7)",
         lambda o, d: normkit.nn.LayerNormLSTM(8, 16)(o["x"]), ValueError, "input_size",
         setup=_tensors(x=(5, 2, 7))),
    Case("API", "`normkit.nn.LayerNormLSTM(8, 16)(x, (h, c))`, h of shape (2, 2, 16)",
         lambda o, d: normkit.nn.LayerNormLSTM(8, 16)(o["x"], (o["h"], o["c"])), ValueError,
         "hx[0]", setup=_tensors(x=(5, 2, 8), h=(2, 2, 16), c=(1, 2, 16))),
    Case("API", "`normkit.convert('model')`",
         lambda o, d: normkit.convert("model"), TypeError, "model"),
    Case("API", "`normkit.convert(model, dry_run='yes')`",
         lambda o, d: normkit.convert(torch.nn.LayerNorm(8), dry_run="yes"), TypeError,
         "dry_run"),
    Case("API", "`register_norm(MyNorm, kind='batchish')`",
         lambda o, d: normkit.register_norm(type("MyNorm", (torch.nn.Module,), {}),
                                            kind="batchish"), ValueError, "kind"),
    Case("API", "`normkit.watch(model, model_name='m', model_version='v', every=0)`",
         lambda o, d: normkit.watch(torch.nn.LayerNorm(8), model_name="m", model_version="v",
                                    every=0), ValueError, "every"),
    # files
    Case("file", '`Baseline.load("baseline.json")` with `"rows": "lots"`',
         lambda o, d: Baseline.load(o["path"]), ValueError, "rows",
         setup=lambda d: {"path": _baseline_with(d, _rows_lots)}),
    Case("file", "`Baseline.load(path)` of a truncated file",
         lambda o, d: Baseline.load(o["path"]), ValueError, "baseline.json",
         setup=lambda d: {"path": _truncated_baseline(d)}),
    Case("file", "`read_jsonl(path)`: a writer died mid-line, another appended",
         lambda o, d: list(read_jsonl(o["path"])), Warning, "run.jsonl",
         setup=_torn, intact=_steps_back),
    # CLI
    Case("CLI", "`normkit audit missing.pt`",
         _cli("audit", "missing.pt"), 2, "missing.pt"),
    Case("CLI", "`normkit audit 'sd[v2].pt'` (missing)",
         _cli("audit", "sd[v2].pt"), 2, "sd[v2].pt"),
    Case("CLI", "`normkit report run.jsonl`, one line of which is a JSON list",
         _cli("report", "run.jsonl"), 2, "run.jsonl",
         setup=lambda d: _report_run(d, "[1, 2, 3]") or {}),
    Case("CLI", "`normkit report run.jsonl --baseline base.json`, base.json a list",
         _cli("report", "run.jsonl", "--baseline", "base.json"), 2, "base.json",
         setup=lambda d: (_report_run(d, ""), (d / "base.json").write_text("[]")) and {}),
    Case("CLI", "`normkit report run.jsonl -o out.html`, out.html a directory",
         _cli("report", "run.jsonl", "-o", "out.html"), 2, "out.html",
         setup=lambda d: (_report_run(d, ""), (d / "out.html").mkdir()) and {}),
    Case("CLI", "`normkit report run.jsonl -o /proc/normkit/report.html` (cannot be made)",
         _cli("report", "run.jsonl", "-o", "/proc/normkit/report.html"), 2, "report.html",
         setup=lambda d: _report_run(d, "") or {}),
    Case("CLI", "`normkit report run.jsonl -o report.txt`",
         _cli("report", "run.jsonl", "-o", "report.txt"), 2, "report.txt",
         setup=lambda d: _report_run(d, "") or {}),
    Case("CLI", "`normkit bench --dtypes float8`",
         _cli("bench", "--dtypes", "float8"), 2, "float8"),
    Case("CLI", "`normkit study --steps 0`",
         _cli("study", "--steps", "0"), 2, "steps"),
]


def _truncated_baseline(d: Path) -> Path:
    p = d / "baseline.json"
    p.write_text('{"schema": "normkit.baseline", "schema_version": 1, "layers": {"1": {"ro')
    return p


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() else b"<dir>")
            for p in sorted(d.rglob("*"))}


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.detach(), b)


def _kind(e: Exception) -> str:
    """The types a caller can catch it as: its own name where public, then the built-in
    exception types it is (``RuntimeError, ValueError`` for a shape mismatch)."""
    builtin = [c.__name__ for c in type(e).__mro__
               if c.__module__ == "builtins" and c not in (Exception, BaseException, object)]
    own = type(e).__name__
    if own.startswith("_") or own in builtin:
        return ", ".join(builtin)
    return f"{own} ({', '.join(builtin)})"


@dataclass
class Outcome:
    answer: str      # "RuntimeError" / "exit 2" / "warning"
    message: str
    kept: str


def _one_line(s: str) -> str:
    lines = [ln for ln in s.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line, got {lines}"
    return lines[0]


def _outcome(case: Case, d: Path) -> Outcome:
    objs = case.setup(d)
    tensors = {k: v.detach().clone() for k, v in objs.items() if isinstance(v, torch.Tensor)}
    files = _snapshot(d)
    kept = []
    if isinstance(case.expect, int) and not isinstance(case.expect, bool):
        code, err = case.run(objs, d)
        assert code == case.expect, (code, err)
        assert "Traceback" not in err, err
        answer, message = f"exit {code}", _one_line(err)
    elif case.expect is Warning:
        with warnings.catch_warnings(record=True) as caught, _log_capture() as logged:
            warnings.simplefilter("always")
            result = case.run(objs, d)
        said = [str(w.message) for w in caught] + logged
        assert said, "expected a warning"
        answer, message = "warning", said[0]
        kept.append(case.intact(result, objs))
    else:
        try:
            case.run(objs, d)
        except Exception as e:  # noqa: BLE001 — the type is checked next
            raised = e
        else:
            raise AssertionError(f"did not raise {case.expect.__name__}")
        assert isinstance(raised, case.expect), f"raised {type(raised).__name__}: {raised}"
        answer, message = _kind(raised), str(raised).splitlines()[0]
    assert case.names in message, f"{message!r} does not name {case.names!r}"
    for k, before in tensors.items():
        assert _same(objs[k], before), f"{k} was changed"
    if tensors:
        kept.append(", ".join(f"`{k}`" for k in tensors) + " unchanged")
    assert _snapshot(d) == files, "files in the directory changed"
    if files:
        kept.append("files unchanged")
    return Outcome(answer, message.replace(str(d) + os.sep, "").replace(str(d), "."),
                   "; ".join(kept) or "nothing written")


@contextlib.contextmanager
def _log_capture():
    said: list[str] = []

    class H(logging.Handler):
        def emit(self, record):
            said.append(record.getMessage())

    h = H(logging.WARNING)
    root = logging.getLogger("normkit")
    root.addHandler(h)
    try:
        yield said
    finally:
        root.removeHandler(h)


def _cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def _render(rows: list[tuple[Case, Outcome]]) -> str:
    out = [
        "# Bad inputs and what normkit answers",
        "",
        "Generated by `tests/test_bad_inputs.py` from what the code does; the test fails where",
        "this page and the code disagree.  Each row is one bad input: the answer (an exception",
        "type, an exit code with its one stderr line, or a warning where normkit can read on),",
        "the message as printed, and what the test checked was neither written nor lost.",
        "",
    ]
    for where, title in (("API", "Python API"), ("file", "Files"), ("CLI", "`normkit` command")):
        out += [f"## {title}", "", "| input | answer | message | nothing written or lost |",
                "|---|---|---|---|"]
        for case, o in rows:
            if case.where == where:
                out.append(f"| {_cell(case.given)} | {o.answer} | `` {_cell(o.message)} `` "
                           f"| {_cell(o.kept)} |")
        out.append("")
    return "\n".join(out)


def test_every_bad_input_gets_a_clear_answer_and_the_page_says_so(tmp_path):
    rows = []
    failures = []
    for i, case in enumerate(CASES):
        d = tmp_path / f"case{i}"
        d.mkdir()
        try:
            rows.append((case, _outcome(case, d)))
        except Exception as e:  # noqa: BLE001 — every case is reported, not only the first
            failures.append(f"{case.given}: {type(e).__name__}: {e}")
    assert not failures, "\n".join(failures)
    text = _render(rows)
    if os.environ.get("NORMKIT_WRITE_DOCS"):
        PAGE.write_text(text)
    assert PAGE.exists() and PAGE.read_text() == text, (
        "docs/bad-inputs.md differs from what the code answers; regenerate it with "
        "NORMKIT_WRITE_DOCS=1 python -m pytest tests/test_bad_inputs.py")
