"""The files normkit writes and reads back: telemetry JSONL that survives a writer dying
mid-line, baselines checked against their schema, ``normkit report`` errors that name the file,
and atomic writes that leave no temp file behind a SIGTERM (and clean up after a SIGKILL)."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from _monitor_models import Branches

from normkit._cli.main import main
from normkit.monitor import Baseline, JsonlExporter, read_jsonl, watch
from normkit.monitor._stats import LayerStats

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _watched_run(path: Path, steps: int, seed: int = 0, **kw):
    """``steps`` forward passes of a 2-branch model, recorded to ``path`` (appended)."""
    torch.manual_seed(0)
    m = Branches(k=2, d=16).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad(), watch(m, model_name="b", model_version="1",
                                exporters=[JsonlExporter(path)], **kw) as w:
        for _ in range(steps):
            m(torch.randn(32, 32, generator=g))
    return w


def _steps(path: Path) -> list[int]:
    return [r["step"] for r in read_jsonl(path) if r["type"] == "step"]


def _tear_last_line(path: Path, keep: int = 100) -> None:
    """Cut the last line after ``keep`` bytes: what a writer killed mid-line leaves."""
    data = path.read_bytes()
    start = data.rstrip(b"\n").rfind(b"\n") + 1
    path.write_bytes(data[:start + keep])


@pytest.fixture
def skipped(caplog):
    """The warnings read_jsonl logs, as messages."""
    caplog.set_level(logging.WARNING, logger="normkit.monitor")
    return lambda: [r.getMessage() for r in caplog.records
                    if r.name.startswith("normkit.monitor") and r.levelno == logging.WARNING]


# -- JSONL: a writer that died mid-line ------------------------------------------------------


def test_appending_after_a_torn_line_keeps_both_runs(tmp_path, skipped):
    path = tmp_path / "run.jsonl"
    _watched_run(path, 3)
    _tear_last_line(path)  # the first run's writer died while writing step 3 (line 4)
    _watched_run(path, 2, seed=1)  # a restarted job appends to the same file
    text = path.read_text()
    assert text.endswith("\n")
    assert _steps(path) == [1, 2, 1, 2]  # the torn step is gone, everything else is kept
    msgs = skipped()
    assert any(f"{path}:4" in m for m in msgs), msgs
    lines = text.splitlines()
    assert json.loads(lines[4])["step"] == 1  # the new run starts on a line of its own


def test_a_torn_line_glued_to_the_next_record_loses_only_itself(tmp_path, skipped):
    """Files the exporter wrote before it started appending on a fresh line: the first record
    of the restarted run sits on the torn line.  It is recovered; the torn part is skipped."""
    path = tmp_path / "run.jsonl"
    _watched_run(path, 3)
    _tear_last_line(path)
    second = tmp_path / "second.jsonl"
    _watched_run(second, 2, seed=1)
    # what the old exporter wrote: the second run's records (no header: the file was not new)
    # appended right after the torn bytes
    with open(path, "ab") as f:
        f.write(b"".join(second.read_bytes().splitlines(keepends=True)[1:]))
    assert _steps(path) == [1, 2, 1, 2]
    msgs = skipped()
    assert len(msgs) == 1 and f"{path}:4" in msgs[0] and "glued" in msgs[0], msgs


def test_a_corrupt_line_in_the_middle_is_skipped_with_its_line_number(tmp_path, skipped):
    path = tmp_path / "run.jsonl"
    _watched_run(path, 4)
    lines = path.read_bytes().splitlines(keepends=True)
    lines[2] = b"\x00\xff\xfe garbage from a bad disk block\n"  # not UTF-8, not JSON
    path.write_bytes(b"".join(lines))
    assert _steps(path) == [1, 3, 4]
    assert any(f"{path}:3" in m for m in skipped())


def test_many_bad_lines_are_named_then_counted(tmp_path, skipped):
    path = tmp_path / "run.jsonl"
    _watched_run(path, 1)
    with open(path, "a") as f:
        f.write('{"torn\n' * 50)
    assert _steps(path) == [1]
    msgs = skipped()
    assert len(msgs) == 11 and "50 unreadable lines" in msgs[-1], msgs


def test_a_line_that_is_not_a_record_is_refused_with_its_line(tmp_path):
    path = tmp_path / "run.jsonl"
    _watched_run(path, 2)
    with open(path, "a") as f:
        f.write("[1, 2]\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:4: expected a record") + ".*a list"):
        list(read_jsonl(path))


def test_a_record_of_a_newer_schema_says_to_upgrade(tmp_path):
    path = tmp_path / "run.jsonl"
    _watched_run(path, 1)
    lines = path.read_text().splitlines()
    rec = json.loads(lines[1])
    rec["schema_version"] = 2
    path.write_text(lines[0] + "\n" + json.dumps(rec) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: ") + ".*newer normkit.*upgrade"):
        list(read_jsonl(path))


# -- baselines: checked against the schema on load -------------------------------------------


@pytest.fixture(scope="module")
def baseline_doc(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("b")
    _watched_run(d / "run.jsonl", 2).baseline().save(d / "b.json")
    return json.loads((d / "b.json").read_text())


def _edited(doc: dict, edit) -> dict:
    doc = json.loads(json.dumps(doc))
    edit(doc)
    return doc


BAD_BASELINES = [
    (lambda d: d["layers"]["norm.0"].update(rows="lots"),
     'layers["norm.0"].rows: expected an int >= 0, got "lots"'),
    (lambda d: d["layers"]["norm.1"]["hist_scale"].update(n=-1),
     'layers["norm.1"].hist_scale.n: expected an int >= 0, got -1'),
    (lambda d: d["layers"]["norm.1"]["hist_scale"].update(n=5),
     'layers["norm.1"].hist_scale: n is 5 but the buckets hold 64'),
    (lambda d: d["layers"]["norm.0"]["hist_mean"]["buckets"].insert(0, [999, 1]),
     'layers["norm.0"].hist_mean.buckets[0]: expected a [bucket index in [0, 324), count'),
    (lambda d: d["layers"]["norm.0"].update(kind="batch"),
     'layers["norm.0"].kind: expected "ln" or "rms", got "batch"'),
    (lambda d: d["layers"]["norm.0"].pop("sum_var"),
     'layers["norm.0"].sum_var: missing (expected a number >= 0)'),
    (lambda d: d.update(layers=[1, 2]), "layers: expected an object {layer name"),
    (lambda d: d.update(model_name=None), "model_name: expected a string, got null"),
]


@pytest.mark.parametrize("edit, msg", BAD_BASELINES)
def test_a_baseline_with_a_wrong_field_is_refused_naming_file_and_field(
        tmp_path, baseline_doc, edit, msg):
    path = tmp_path / "b.json"
    path.write_text(json.dumps(_edited(baseline_doc, edit)))
    with pytest.raises(ValueError, match=re.escape(f"{path}: {msg}")):
        Baseline.load(path)


@pytest.mark.parametrize("text, msg", [
    ("[1, 2]", "expected a baseline object, got a list"),
    ('{"schema": "normkit.baseline", "schema_ver', "not JSON"),
    ("\udcff", "not JSON"),
])
def test_a_baseline_that_is_no_object_or_no_json_names_the_file(tmp_path, text, msg):
    path = tmp_path / "b.json"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(ValueError, match=re.escape(f"{path}: {msg}")):
        Baseline.load(path)


def test_a_baseline_of_a_newer_schema_says_to_upgrade(tmp_path, baseline_doc):
    path = tmp_path / "b.json"
    path.write_text(json.dumps({**baseline_doc, "schema_version": 2}))
    with pytest.raises(ValueError, match=re.escape(f"{path}: schema_version 2 ") + ".*newer"):
        Baseline.load(path)


def test_telemetry_files_name_the_normkit_code_that_wrote_them(tmp_path, monkeypatch):
    """The JSONL header and a baseline carry the running code's version
    (``normkit._provenance``), not that of whatever distribution is installed (none, or an
    older one, when the code is a checkout on PYTHONPATH)."""
    import importlib.metadata

    import normkit

    def installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", installed)
    path = tmp_path / "run.jsonl"
    w = _watched_run(path, 2)
    header = next(read_jsonl(path))
    assert header["type"] == "header" and header["normkit_version"] == normkit.__version__
    assert w.baseline().normkit_version == normkit.__version__
    assert Baseline.from_jsonl(path).normkit_version == normkit.__version__


def test_the_schema_names_exactly_what_layer_stats_write():
    from normkit.monitor import _schema

    s = LayerStats()
    assert set(_schema.LAYER_STATS.fields) == set(s.to_dict())
    assert set(_schema.STEP.fields["summary"].value.fields) == set(s.summary())


# -- a watch never loses records because of its baseline -------------------------------------


def test_a_baseline_that_breaks_drift_costs_drift_not_records(tmp_path, caplog):
    good = _watched_run(tmp_path / "base.jsonl", 2).baseline()
    bad = Baseline(good.model_name, good.model_version, good.layers)
    bad.layers["norm.0"].rows = "lots"  # built in code, so no schema check stood in the way
    path = tmp_path / "run.jsonl"
    with caplog.at_level(logging.WARNING, logger="normkit"):
        w = _watched_run(path, 6, baseline=bad, drift_every=2)
    assert w.records == 6
    recs = [r for r in read_jsonl(path) if r["type"] == "step"]
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    checked = [r["drift"] for r in recs if r["drift"]]
    assert len(checked) == 3
    for drift in checked:
        assert set(drift) == {"norm.0", "norm.1"}
        assert all(d["evaluable"] is False and "drift computation failed" in d["reason"]
                   and d["crossed"] == [] for d in drift.values())
    logged = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(logged) == 1 and "drift" in logged[0].getMessage(), \
        [r.getMessage() for r in logged]


# -- normkit report: every bad input is one line naming the file ------------------------------


@pytest.fixture(scope="module")
def run_file(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("report")
    w = _watched_run(d / "run.jsonl", 2)
    w.baseline().save(d / "baseline.json")
    return d / "run.jsonl"


def _report(capsys, *args) -> tuple[int, list[str]]:
    rc = main(["report", *map(str, args)])
    err = capsys.readouterr().err
    return rc, err.strip().splitlines()


def _one_line_error(rc, lines, *named):
    assert rc == 2, lines
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    for what in named:
        assert str(what) in lines[0], lines


def _with_line(run_file: Path, dest: Path, lineno: int, edit) -> Path:
    lines = run_file.read_text().splitlines()
    rec = json.loads(lines[lineno - 1])
    lines[lineno - 1] = json.dumps(edit(rec))
    dest.write_text("\n".join(lines) + "\n")
    return dest


@pytest.mark.parametrize("edit, field", [
    (lambda r: [1, 2], "a list"),
    (lambda r: {**r, "summary": [1]}, "summary"),
    (lambda r: {**r, "alerts": {"a": 1}}, "alerts"),
    (lambda r: {**r, "layers": {"norm.0": {**r["layers"]["norm.0"], "rows": "lots"}}},
     'layers["norm.0"].rows'),
])
def test_report_on_a_bad_record_names_file_and_line(run_file, tmp_path, capsys, edit, field):
    bad = _with_line(run_file, tmp_path / "bad.jsonl", 2, edit)
    rc, lines = _report(capsys, bad, "-o", tmp_path / "r.html")
    _one_line_error(rc, lines, f"{bad}:2", field)


@pytest.mark.parametrize("text, field", [
    ("[1]", "a list"),
    ("LAYERS_LIST", "layers"),
    ("ROWS_LOTS", 'layers["norm.0"].rows'),
    ("TRUNCATED", "not JSON"),
])
def test_report_on_a_bad_baseline_names_it(run_file, tmp_path, capsys, text, field):
    good = (run_file.parent / "baseline.json").read_text()
    doc = json.loads(good)
    text = {"LAYERS_LIST": json.dumps({**doc, "layers": [1]}),
            "ROWS_LOTS": json.dumps(_edited(doc, BAD_BASELINES[0][0])),
            "TRUNCATED": good[:100]}.get(text, text)
    base = tmp_path / "base.json"
    base.write_text(text)
    rc, lines = _report(capsys, run_file, "--baseline", base, "-o", tmp_path / "r.html")
    _one_line_error(rc, lines, base, field)


def _unwritable_dir(tmp_path: Path) -> Path:
    """A directory no file can be created in: a read-only one, or, for root (whom modes do
    not stop), sysfs, which refuses new files to everyone."""
    if os.geteuid() != 0:
        d = tmp_path / "ro"
        d.mkdir()
        d.chmod(0o555)
        return d
    return Path("/sys")


@pytest.mark.parametrize("where", ["missing_uncreatable", "under_a_file", "permission",
                                   "is_a_directory"])
def test_report_to_an_unwritable_output_names_it(run_file, tmp_path, capsys, where):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir.html").mkdir()
    out = {"missing_uncreatable": Path("/proc/normkit-no-such-dir/r.html"),
           "under_a_file": tmp_path / "file" / "r.html",
           "permission": _unwritable_dir(tmp_path) / "normkit-r.html",
           "is_a_directory": tmp_path / "dir.html"}[where]
    rc, lines = _report(capsys, run_file, "-o", out)
    _one_line_error(rc, lines, out)
    if where == "is_a_directory":  # nothing half-written beside it
        assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.html", "file"]


# -- atomic writes: no temp file left behind -------------------------------------------------

# A child that writes ``target`` atomically and stops inside the write (at the fsync, when
# the temp file holds the data and is not yet renamed), saying so on stdout.
_CHILD = textwrap.dedent("""
    import os, signal, sys, time
    from normkit import _io
    if sys.argv[2] == "own_handler":
        def on_term(signum, frame):
            raise SystemExit(3)
        signal.signal(signal.SIGTERM, on_term)
    def stuck(fd):
        print("writing", flush=True)
        time.sleep(60)
    os.fsync = stuck
    _io.write_text_atomic(sys.argv[1], "new " * 100_000)
""")


def _temps(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir()
                  if p.name.startswith(f".{target.name}.") and p.name.endswith(".tmp"))


def _stuck_writer(target: Path, mode: str = "plain") -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", _CHILD, str(target), mode],
                         stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": SRC})
    assert p.stdout.readline() == "writing\n"
    assert len(_temps(target)) == 1  # the write is under way: its temp file exists
    return p


def test_sigterm_during_an_atomic_write_removes_the_temp_file(tmp_path):
    target = tmp_path / "report.html"
    target.write_text("old")
    p = _stuck_writer(target)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=30) == -signal.SIGTERM  # still dies of SIGTERM, as before
    assert _temps(target) == []
    assert target.read_text() == "old"


def test_sigterm_with_the_programs_own_handler_keeps_it(tmp_path):
    target = tmp_path / "report.html"
    p = _stuck_writer(target, "own_handler")
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=30) == 3  # the program's handler ran (and the write cleaned up)
    assert _temps(target) == [] and not target.exists()


def test_a_sigkilled_writers_temp_file_is_removed_by_the_next_write(tmp_path):
    from normkit._io import write_text_atomic

    target = tmp_path / "b.json"
    p = _stuck_writer(target)
    p.kill()
    p.wait(timeout=30)
    assert len(_temps(target)) == 1  # SIGKILL cannot be handled
    write_text_atomic(target, "next")
    assert _temps(target) == [] and target.read_text() == "next"


def test_a_live_writers_temp_file_is_left_alone(tmp_path):
    from normkit._io import write_text_atomic

    target = tmp_path / "b.json"
    other = tmp_path / "other.json"
    p = _stuck_writer(target)
    q = _stuck_writer(other)
    try:
        live = _temps(target)
        write_text_atomic(target, "mine")  # a second process writes the same target meanwhile
        assert _temps(target) == live and target.read_text() == "mine"
    finally:
        p.kill()
        p.wait(timeout=30)
    q.kill()
    q.wait(timeout=30)
    write_text_atomic(target, "again")
    assert _temps(target) == []
    assert len(_temps(other)) == 1  # another target's temp files are that target's business


def test_old_temp_files_of_unknown_writers_go_and_foreign_names_stay(tmp_path):
    from normkit._io import write_text_atomic

    target = tmp_path / "b.json"
    old = tmp_path / ".b.json.0badc0de-1.abcd1234.tmp"  # another host's: its pid means nothing
    fresh = tmp_path / ".b.json.0badc0de-2.abcd1234.tmp"
    mine = tmp_path / ".b.json.user-notes.tmp"  # not a name normkit makes
    for p in (old, fresh, mine):
        p.write_text("x")
    long_ago = time.time() - 2 * 86400
    os.utime(old, (long_ago, long_ago))
    os.utime(mine, (long_ago, long_ago))
    write_text_atomic(target, "x")
    assert not old.exists() and fresh.exists() and mine.exists()


def test_the_sigterm_handler_is_only_there_during_the_write_and_threads_work(tmp_path):
    from normkit._io import write_text_atomic

    before = signal.getsignal(signal.SIGTERM)
    write_text_atomic(tmp_path / "a.txt", "a")
    assert signal.getsignal(signal.SIGTERM) is before
    errors = []

    def in_thread():
        try:
            write_text_atomic(tmp_path / "b.txt", "b")
        except Exception as e:  # signal.signal would raise ValueError outside the main thread
            errors.append(e)

    t = threading.Thread(target=in_thread)
    t.start()
    t.join()
    assert errors == [] and (tmp_path / "b.txt").read_text() == "b"


def test_study_telemetry_goes_through_the_same_temp_files(tmp_path):
    from normkit.study.train import RunSpec, _close_telemetry, _open_telemetry

    path = tmp_path / "runs" / "x.jsonl"
    p = _stuck_writer(path)
    p.kill()
    p.wait(timeout=30)
    w, tmp = _open_telemetry(torch.nn.Sequential(torch.nn.LayerNorm(4)),
                             RunSpec("gpt", "pre", "layer", True, 0), path, 1)
    assert _temps(path) == [tmp.name]  # the dead writer's is gone, this run's is there
    _close_telemetry(w, tmp, path)
    assert _temps(path) == [] and path.is_file()
