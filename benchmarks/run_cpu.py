#!/usr/bin/env python
"""The full CPU benchmark grid, written to benchmarks/results/bench-cpu-<date>.json.

    python benchmarks/run_cpu.py

M ∈ {1, 8, 512, 4096, 16384} × N ∈ {64, 768, 4096, 8192} × {float32, bfloat16} ×
{ln, rms, add_ln, add_rms} × {fwd, bwd}, against torch eager, torch.compile, ONNX Runtime, a
memory copy and an allocating copy.  Expect tens of minutes on a 2-core machine (torch.compile
alone compiles ~2 s per case) and ~6 GB of memory at 16384x8192.  For a subset, use the command
line instead: ``normkit bench --ops ln --M 4096 --N 4096``.
"""

from __future__ import annotations

from pathlib import Path

from normkit.bench import BenchConfig, default_json_path
from normkit.bench._terminal import run_and_print

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    config = BenchConfig(device="cpu")  # the defaults are the full grid and every peer
    run_and_print(config, default_json_path("cpu", cwd=REPO))


if __name__ == "__main__":
    main()
