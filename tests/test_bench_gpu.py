"""benchmarks/run_gpu.py without a GPU: arguments, grid, bytes, checks, summary and the JSON
document, with a fake timer on CPU tensors (the CUDA timing itself needs a GPU)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "run_gpu.py"


@pytest.fixture(scope="module")
def rg():
    spec = importlib.util.spec_from_file_location("run_gpu", PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["run_gpu"] = mod  # dataclasses look their module up there
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop("run_gpu", None)


def test_defaults_are_the_issue_grid(rg):
    a = rg.parse_args([])
    assert a.ops == list(rg.OPS) and a.passes == ["fwd", "bwd"] and a.dtypes == ["bfloat16"]
    assert a.ns[0] == 1024 and a.ns[-1] == 262144 and a.device == "cuda"
    cases = rg.grid(a.ops, a.passes, a.dtypes, a.ns, a.ms, a.decode)
    bar = [c for c in cases if c.M > 1]
    assert len(bar) == 4 * 2 * 9 and all(c.M * c.N == 1 << 27 for c in bar)
    assert sorted({c.N for c in cases if c.M == 1}) == [4096, 8192]


@pytest.mark.parametrize("argv,match", [(["--ops", "ln,foo"], "foo"), (["--N", "0"], "positive"),
                                        (["--reps", "2"], "reps"), (["--peers", ""], "not in")])
def test_bad_arguments_are_named(rg, argv, match, capsys):
    with pytest.raises(SystemExit):
        rg.parse_args(argv)
    assert match in capsys.readouterr().err


def test_ideal_bytes_and_rotation(rg):
    assert rg.ideal_bytes("ln", "fwd", "bfloat16", 4, 8) == 4 * 8 * 2 * 2
    assert rg.ideal_bytes("add_rms", "fwd", "float32", 4, 8) == 4 * 8 * 4 * 4
    assert rg.ideal_bytes("ln", "bwd", "bfloat16", 4, 8) == 4 * 8 * 2 * 3 + 4 * 8
    assert rg.ideal_bytes("rms", "bwd", "bfloat16", 4, 8) == 4 * 8 * 2 * 3 + 4 * 4
    l2 = 50 << 20
    assert rg._rotating_sets(rg.Case("ln", "fwd", "bfloat16", 1 << 17, 1024), l2) == 1
    small = rg.Case("ln", "fwd", "bfloat16", 1, 4096)
    assert rg._rotating_sets(small, l2) == 64  # capped
    mid = rg.Case("ln", "fwd", "bfloat16", 1024, 4096)  # 16 MiB
    assert rg._rotating_sets(mid, l2) * mid.ideal_bytes >= 4 * l2


def test_check_catches_poison_and_wrong_values(rg):
    case = rg.Case("ln", "fwd", "bfloat16", 8, 64)
    d = rg._inputs(case, "cpu", 1, grad=False)[0]
    truth, theirs = rg._truth_and_torch(case, d)
    assert rg.check(case, theirs, truth, theirs) == "ok"
    bad = theirs.clone()
    bad[3, 5] = float("nan")
    assert "non-finite" in rg.check(case, bad, truth, theirs)
    off = theirs.float() + 0.1
    assert "error" in rg.check(case, off.to(theirs.dtype), truth, theirs)


def test_cpu_run_with_a_fake_timer_gives_the_documented_json(rg):
    args = rg.parse_args(["--device", "cpu", "--normkit-backend", "reference", "--ops",
                          "ln,add_rms", "--passes", "fwd,bwd", "--N", "64", "--M", "8",
                          "--reps", "3", "--peers", "normkit,torch,compile,liger,copy"])

    def timer(fn, inner):
        for _ in range(inner):
            fn()
        return 2e-5

    doc = rg.run(args, timer=timer, l2_bytes=1 << 12, progress=None)
    json.dumps(doc, allow_nan=False)  # strict JSON
    assert doc["schema_version"] == 1 and doc["kind"] == "normkit-bench-gpu"
    assert len(doc["results"]) == 4
    for r in doc["results"]:
        assert r["rotating_sets"] >= 1 and r["ideal_bytes"] == rg.ideal_bytes(
            r["op"], r["pass"], r["dtype"], r["M"], r["N"])
        nk = r["impls"]["normkit"]
        assert nk["check"] == "ok", r
        assert nk["copy_fraction"] == pytest.approx(1.0)
        assert nk["gbps"] == pytest.approx(r["ideal_bytes"] / 2e-5 / 1e9)
        assert "skipped" in r["impls"]["compile"] and "skipped" in r["impls"]["liger"]
        assert r["impls"]["torch"]["median_s"] == 2e-5
    assert set(doc["summary"]["checks"]) >= {"fwd_min_copy_fraction", "bwd_geomean_vs_liger"}


def test_summary_applies_the_bar(rg):
    def res(p, n, nk, torch_s, copy_s, liger=None, m=None):
        impls = {"normkit": {"median_s": nk, "copy_fraction": copy_s / nk},
                 "torch": {"median_s": torch_s}, "compile": {"median_s": nk},
                 "copy": {"median_s": copy_s}}
        if liger:
            impls["liger"] = {"median_s": liger}
        return {"pass": p, "M": m or (1 << 27) // n, "N": n, "impls": impls}

    good = [res("fwd", 4096, 1.0, 2.0, 0.95), res("bwd", 4096, 1.0, 2.0, 0.8, liger=1.6)]
    s = rg.summarize(good)
    assert s["ok"] and s["fwd_min_copy_fraction"] == pytest.approx(0.95)
    slow = good + [res("fwd", 262144, 1.0, 1.2, 0.5)]
    s = rg.summarize(slow)
    assert not s["ok"] and s["checks"]["fwd_min_copy_fraction"] is False
    assert math.isclose(s["fwd_geomean_vs_torch"], math.sqrt(2.0 * 1.2))


def test_default_path_names_the_gpu(rg):
    import datetime as dt

    p = rg.default_path({"gpu": {"name": "NVIDIA H100 80GB HBM3"}},
                        dt.datetime(2026, 11, 23, 20, 0, 0))
    assert p.name == "bench-gpu-nvidia-h100-80gb-hbm3-20261123-200000.json"
    assert p.parent.name == "results"


def test_needs_cuda_without_a_gpu(rg):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        rg.run(rg.parse_args([]))
