"""The benchmark harness (normkit.bench) and the `normkit bench` command.

Fast on purpose (< 30 s in all): tiny grids, a timing policy of milliseconds, and the
"reference" backend, so that these tests stay fast (the kernels have their own tests).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pytest

from normkit import bench
from normkit._cli.main import main

REPO = Path(__file__).resolve().parents[1]

# Milliseconds per measurement: enough to exercise every branch of the timer, not to be accurate.
FAST = bench.TimingPolicy(min_time_s=0.002, min_reps=3, max_time_s=0.02, floor_reps=2,
                          warmup_reps=1, warmup_s=0.0, rounds=2)


def tiny(**kw) -> bench.BenchConfig:
    base = dict(ops=("ln", "add_rms"), dtypes=("float32",), Ms=(1, 8), Ns=(64,),
                peers=("torch", "onnxruntime", "copy", "clone", "out"), backend="reference",
                timing=FAST)
    base.update(kw)
    return bench.BenchConfig(**base)


def _positive_finite(v) -> bool:
    return isinstance(v, float) and math.isfinite(v) and v > 0


# ----------------------------------------------------------------------------------------------
# Definitions
# ----------------------------------------------------------------------------------------------


def test_ideal_bytes_follow_the_definitions():
    tile = 4096 * 4096 * 4  # one float32 4096x4096 tensor
    assert bench.ideal_bytes("ln", "fwd", "float32", 4096, 4096) == 2 * tile  # x, y
    assert bench.ideal_bytes("rms", "fwd", "float32", 4096, 4096) == 2 * tile
    assert bench.ideal_bytes("add_ln", "fwd", "float32", 4096, 4096) == 4 * tile  # x, r, y, h
    assert bench.ideal_bytes("ln", "bwd", "float32", 4096, 4096) == 3 * tile + 4096 * 8
    assert bench.ideal_bytes("add_rms", "bwd", "float32", 4096, 4096) == 3 * tile + 4096 * 4
    assert bench.ideal_bytes("ln", "fwd", "bfloat16", 4096, 4096) == tile  # half the bytes
    with pytest.raises(ValueError, match="pass"):
        bench.ideal_bytes("ln", "sideways", "float32", 1, 1)


def test_quick_grid_is_the_documented_one():
    cases = bench.BenchConfig.quick_grid().cases()
    kinds = {(c.op, c.pass_) for c in cases}
    assert kinds == {("ln", "fwd"), ("ln", "bwd"), ("rms", "fwd"), ("rms", "bwd"),
                     ("add_ln", "fwd")}
    assert {(c.M, c.N) for c in cases} == {(m, n) for m in (1, 512, 4096) for n in (768, 4096)}
    assert {c.dtype for c in cases} == {"float32", "bfloat16"}
    assert "compile" not in bench.BenchConfig.quick_grid().peers
    # the full default grid holds the shapes and all four ops both ways
    full = bench.BenchConfig()
    assert set(full.Ms) >= {1, 8, 512, 4096, 16384} and set(full.Ns) >= {64, 768, 4096, 8192}
    assert len(full.cases()) == 5 * 4 * 2 * 4 * 2


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(ops=("ln", "batchnorm")), "ops"),
        (dict(dtypes=("int8",)), "dtypes"),
        (dict(peers=("tensorflow",)), "peers"),
        (dict(Ms=(0,)), "Ms"),
        (dict(backend="triton"), "backend"),
        (dict(device="mps"), "device"),
    ],
)
def test_config_rejects_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kw)


def test_timing_policy_rejects_bad_values():
    with pytest.raises(ValueError, match="min_time_s"):
        bench.TimingPolicy(min_time_s=1.0, max_time_s=0.5)
    with pytest.raises(ValueError, match="rounds"):
        bench.TimingPolicy(rounds=0)


def test_cpu_timer_measures_what_it_runs():
    calls = []

    def nap():
        calls.append(1)
        time.sleep(0.001)

    t = bench.CpuTimer().measure(nap, FAST)
    assert t.median_s >= 0.001 and t.min_s <= t.median_s
    assert t.q1_s <= t.median_s <= t.q3_s and t.iqr_s >= 0
    assert t.samples >= FAST.floor_reps
    assert len(calls) >= t.samples * t.inner + 1  # + first call and warm-up
    with pytest.raises(ValueError, match="no timer"):
        bench.timer_for("meta")


# ----------------------------------------------------------------------------------------------
# The harness end to end
# ----------------------------------------------------------------------------------------------


def test_run_bench_document_is_well_formed(capsys):
    cfg = tiny()
    seen = []
    doc = bench.run_bench(cfg, progress=lambda done, total, label: seen.append((done, total)))
    assert capsys.readouterr().out == ""  # library code does not print

    json.dumps(doc, allow_nan=False)  # strict JSON: no NaN/inf anywhere
    assert doc["schema_version"] == bench.SCHEMA_VERSION and doc["kind"] == "normkit-bench"
    assert seen[0] == (0, 8) and seen[-1] == (8, 8)

    machine = doc["machine"]
    for key in ("cpu", "logical_cores", "usable_cores", "os", "python", "torch", "numpy",
                "normkit_cpu", "normkit", "date_utc"):
        assert key in machine, key
    assert machine["torch"]["threads"] >= 1 and machine["cpu"]["model"]
    assert "hostname" not in json.dumps(machine) and "node" not in machine
    host = platform.node()
    if len(host) >= 6:  # short names could match by chance
        assert host not in json.dumps(doc)

    assert doc["config"]["Ms"] == [1, 8] and doc["config"]["backend"] == "reference"
    assert len(doc["results"]) == len(cfg.cases()) == 8
    for r in doc["results"]:
        assert r["ideal_bytes"] == bench.ideal_bytes(r["op"], r["pass"], r["dtype"], r["M"],
                                                     r["N"])
        for name in ("normkit", "torch", "copy", "clone"):
            rec = r["impls"][name]
            assert "error" not in rec, rec
            for key in ("median_s", "min_s", "gbps", "copy_fraction", "clone_fraction",
                        "speedup_vs_torch"):
                assert _positive_finite(rec[key]), (name, key, rec[key])
            assert rec["min_s"] <= rec["median_s"] and rec["iqr_s"] >= 0
        assert r["impls"]["torch"]["speedup_vs_torch"] == pytest.approx(1.0)
        assert r["impls"]["copy"]["copy_fraction"] == pytest.approx(1.0)
        ort = r["impls"]["onnxruntime"]
        if (r["op"], r["pass"]) == ("ln", "fwd") and "skipped" not in ort:
            assert _positive_finite(ort["median_s"])  # onnxruntime installed: it ran
        else:
            assert "skipped" in ort
        assert "compile" not in r["impls"]  # not asked for
        out = r["impls"]["out"]  # normkit with out= (and residual_out=): forward only
        if r["pass"] == "fwd":
            assert _positive_finite(out["copy_fraction"]), out
        else:
            assert "skipped" in out
    assert any("compile" in n for n in doc["notes"])

    bar = doc["bar"]
    assert bar["points"] == []  # no 4096x4096 in this grid
    assert _positive_finite(bar["worst_speedup"]["speedup_vs_torch"])
    assert bar["ok"] in (True, False)


def test_a_failing_implementation_is_recorded_not_raised(monkeypatch):
    def broken(case, t, cfg):
        raise RuntimeError("kernel exploded")

    monkeypatch.setitem(bench._IMPLS, "normkit", (broken, "normkit"))
    doc = bench.run_bench(tiny(ops=("rms",), Ms=(1,), peers=("torch",)))
    assert [r["impls"]["normkit"] for r in doc["results"]] == [
        {"error": "RuntimeError: kernel exploded"}
    ] * 2
    assert _positive_finite(doc["results"][0]["impls"]["torch"]["median_s"])


def test_bar_check_reads_the_thresholds():
    def rec(op, pass_, dtype, M, N, cf, sp):
        return {"op": op, "pass": pass_, "dtype": dtype, "M": M, "N": N,
                "impls": {"normkit": {"copy_fraction": cf, "speedup_vs_torch": sp}}}

    good = [rec("ln", "fwd", "float32", 4096, 4096, 0.80, 1.3),
            rec("add_ln", "fwd", "bfloat16", 4096, 4096, 0.71, 1.0),
            rec("ln", "bwd", "float32", 4096, 4096, 0.55, 0.95)]
    bar = bench.bar_check(good)
    assert bar["ok"] is True and len(bar["points"]) == 3
    assert bar["worst_speedup"]["speedup_vs_torch"] == 0.95

    slow_at_m1 = good + [rec("ln", "fwd", "float32", 1, 64, 0.01, 0.85)]
    bar = bench.bar_check(slow_at_m1)
    assert bar["ok"] is False and (bar["worst_speedup"]["M"], bar["worst_speedup"]["N"]) == (1, 64)

    below_copy = [rec("rms", "fwd", "bfloat16", 4096, 4096, 0.74, 2.0)]
    (point,) = bench.bar_check(below_copy)["points"]
    assert point["copy_ok"] is False and point["speedup_ok"] is True
    assert bench.bar_check([])["ok"] is None


# ----------------------------------------------------------------------------------------------
# Output files
# ----------------------------------------------------------------------------------------------


def test_write_json_atomic(tmp_path):
    path = tmp_path / "sub" / "r.json"
    assert bench.write_json_atomic(path, {"a": 1}) == path
    assert json.loads(path.read_text()) == {"a": 1}
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)
    bench.write_json_atomic(path, {"a": 2})  # replaces
    assert json.loads(path.read_text()) == {"a": 2}

    # A document that cannot be written leaves the old file whole and no temp file behind.
    with pytest.raises(TypeError):
        bench.write_json_atomic(path, {"a": object()})
    with pytest.raises(ValueError):
        bench.write_json_atomic(path, {"a": float("nan")})
    assert json.loads(path.read_text()) == {"a": 2}
    assert sorted(p.name for p in path.parent.iterdir()) == ["r.json"]


def test_write_json_atomic_cleans_up_when_replace_fails(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    bench.write_json_atomic(path, {"a": 1})

    def refuse(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(bench.os, "replace", refuse)
    with pytest.raises(OSError, match="disk on fire"):
        bench.write_json_atomic(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_default_json_path(tmp_path):
    when = dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    inside = bench.default_json_path("cpu", now=when, cwd=REPO / "src")
    assert inside == REPO / "benchmarks" / "results" / "bench-cpu-20250102-030405.json"
    assert bench.default_json_path("cpu", cwd=tmp_path) == tmp_path / "normkit-bench.json"


# ----------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------


def _cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO / "src")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return subprocess.run([sys.executable, "-m", "normkit._cli.main", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=120)


def test_cli_bench_quick_tiny_grid_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = _cli("bench", "--quick", "--M", "1,8", "--N", "64", "--dtypes", "float32",
                "--backend", "reference", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    doc = json.loads(out.read_text())
    assert doc["schema_version"] == bench.SCHEMA_VERSION
    assert doc["config"]["quick"] is True and doc["config"]["Ns"] == [64]
    # --quick: ln, rms fwd+bwd and add_ln fwd, on 2 M values
    assert len(doc["results"]) == 2 * 5
    assert "normkit bench" in proc.stdout and "bar check" in proc.stdout
    assert str(out) in proc.stdout.replace("\n", "")
    assert "compile" in proc.stdout  # says the compile peer was skipped


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--M", "1,x"], "argument --M"),
        (["--ops", "ln,batchnorm"], "argument --ops"),
        (["--device", "tpu"], "argument --device"),
    ],
)
def test_cli_bad_argument_is_a_usage_error(args, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "usage:" in err


def test_cli_bad_argument_exit_code_without_traceback():
    proc = _cli("bench", "--N", "0")
    assert proc.returncode == 2
    assert "argument --N" in proc.stderr and "positive integers" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_help_lists_bench(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "bench" in capsys.readouterr().out


def test_cli_lists_mirror_the_library():
    """The CLI keeps its own copies (so --help does not import torch); they must agree."""
    from normkit._cli import bench as cli

    assert (cli._OPS, cli._PEERS) == (bench.OPS, bench.PEERS)
