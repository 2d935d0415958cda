"""The CPU kernels against the golden corpus (golden_cpu.py beside this file): the bits the
kernels gave when the corpus was recorded, case for case — outputs, h, saved statistics and every
gradient, on every op × dtype × option, awkward N, rows far from zero, NaN/Inf and constant rows
— on every instruction-set path this machine runs."""

from __future__ import annotations

import json
import os
from collections import defaultdict

import pytest
import torch
from golden_cpu import BY_NAME, Case, cases, digest, inputs, run
from helpers import bits

import normkit
from normkit.kernels import cpu

CORPUS = os.path.join(os.path.dirname(__file__), "data", "golden-cpu.json")


@pytest.fixture(scope="module")
def corpus():
    with open(CORPUS) as f:
        doc = json.load(f)
    assert doc["schema"] == 1
    return doc["cases"]


def _groups():
    g = defaultdict(list)
    for c in cases():
        g[(c.op, c.x)].append(c)
    return g


GROUPS = _groups()


def test_the_corpus_covers_every_case(corpus):
    assert set(corpus) == {c.key for c in cases()}


@pytest.fixture(params=cpu.available_isas())
def isa(request):
    previous = cpu.isa()
    cpu.set_isa(request.param)
    yield request.param
    cpu.set_isa(previous)


@pytest.mark.parametrize("group", sorted(GROUPS), ids=lambda g: f"{g[0]}-{g[1]}")
def test_bits_match_the_corpus(corpus, isa, group):
    """Every case of this op and x dtype, on this path, hash for hash."""
    wrong = []
    with normkit.use_backend("cpu"):
        for case in GROUPS[group]:
            got = run(case, cpu)
            want = corpus[case.key]
            if got["inputs"] != want["inputs"]:
                wrong.append(f"{case.key}: the inputs changed (golden_cpu.py), not the kernels")
                continue
            bad = sorted(k for k in want if got.get(k) != want[k])
            if bad:
                wrong.append(f"{case.key}: {', '.join(bad)}")
    assert not wrong, f"{len(wrong)} cases differ on {isa}:\n" + "\n".join(wrong[:40])


@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("n", [7, 64, 1000, 4097])
def test_float64_output_of_float32_input_is_the_float32_output_widened(rms, n):
    """Not in the corpus (the numba kernels could not compile it): y in float64 is the float32
    result widened exactly, and the backward treats the float64 dy as float32 statistics do."""
    case = Case("rms" if rms else "ln", "f32", n, 37, "f32", None if rms else "f32")
    t = inputs(case)
    x, w, b = t["x"], t["w"], t["b"]
    eps = 1e-6 if rms else 1e-5
    y32, _, s32 = cpu.forward(x, w, b, None, eps, rms, False, "torch", None, True)
    y64, _, s64 = cpu.forward(x, w, b, None, eps, rms, False, "torch", torch.float64, True)
    assert y64.dtype == torch.float64
    assert torch.equal(bits(y64), bits(y32.double()))
    assert torch.equal(bits(s64), bits(s32))
    dy = torch.randn(37, n, dtype=torch.float64)
    g64 = cpu.backward(dy, None, x, w, b is not None, s64, rms, False, "torch", True)
    g32 = cpu.backward(dy.float(), None, x, w, b is not None, s32, rms, False, "torch", True)
    for a, c in zip(g64, g32, strict=True):
        assert (a is None) == (c is None)
        if a is not None:
            assert torch.equal(bits(a), bits(c))


def test_digest_counts_every_nan_as_one():
    a = torch.tensor([float("nan"), 1.0])
    b = torch.tensor([-float("nan"), 1.0])
    assert digest(a) == digest(b)
    assert digest(torch.tensor([0.0, 1.0])) != digest(torch.tensor([-0.0, 1.0]))
    assert digest(a.to(BY_NAME["bf16"])) == digest(b.to(BY_NAME["bf16"]))
