"""``normkit --help`` and ``normkit COMMAND --help`` answer at once: neither the console script
nor ``import normkit`` imports torch (it was 2.3 s of CPU before the help text showed)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from normkit._cli.main import COMMANDS

# The package these tests import: the subprocess must run the same code.
SRC = Path(importlib.util.find_spec("normkit").origin).resolve().parents[1]


def _cli_then_heavy(argv: list[str]):
    """``normkit ARGV`` run as the console script runs it, in a fresh interpreter, which then
    prints ``HEAVY [...]``: the heavy modules (torch, numpy, rich) it imported."""
    code = ("import runpy, sys\n"
            f"sys.argv = ['normkit', *{argv!r}]\n"
            "try:\n"
            "    runpy.run_module('normkit._cli.main', run_name='__main__')\n"
            "except SystemExit as e:\n"
            "    assert e.code == 0, e.code\n"
            "print('HEAVY', [m for m in ('torch', 'numpy', 'rich') if m in sys.modules])\n")
    return _python(code, timeout=60)


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_does_not_import_torch(command):
    """The console script imports the package ``normkit``; the time of ``normkit --help`` was
    torch's import (2.3 s of CPU).  The test checks the cause, not a wall time."""
    p = _cli_then_heavy([*command.split(), "--help"])
    assert p.returncode == 0, p.stderr
    assert "usage: normkit" in p.stdout
    assert p.stdout.splitlines()[-1] == "HEAVY []"


def _python(code: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """Runs ``code`` in a fresh interpreter on this checkout's normkit."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, PYTHONPATH=str(SRC)))


def test_import_normkit_is_lazy_and_complete():
    code = ("import sys, normkit\n"
            "assert 'torch' not in sys.modules, 'import normkit imported torch'\n"
            "assert set(normkit.__all__) <= set(dir(normkit))\n"
            "import normkit.convert\n"  # the submodule must not hide the function
            "from normkit import layer_norm, convert\n"
            "import torch\n"
            "m = convert(torch.nn.Sequential(torch.nn.LayerNorm(4)))\n"
            "assert type(m[0]) is normkit.nn.LayerNorm and callable(normkit.convert)\n"
            "assert normkit.functional.layer_norm is layer_norm\n"
            "assert all(getattr(normkit, n) is not None for n in normkit.__all__)\n"
            "print('ok')\n")
    p = _python(code)
    assert p.stdout.strip() == "ok", p.stderr


def test_import_after_torch_registers_the_custom_ops():
    """``import torch, normkit``: torch is paid for, so the ops are registered at once and a
    program that calls them resolves without any other normkit call first."""
    code = ("import sys, torch, normkit\n"
            "assert 'normkit.functional' in sys.modules\n"
            "op = torch.ops.normkit.norm_fwd_v3\n"
            "x = torch.randn(2, 8)\n"
            "y = op(x, None, None, None, 1e-5, False, False, 'torch', None)[0]\n"
            "torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (8,)))\n"
            "print('ok')\n")
    p = _python(code)
    assert p.stdout.strip() == "ok", p.stderr


def test_version_is_the_running_codes_without_torch():
    """``normkit --version`` names the code that runs (``normkit._provenance``), not whatever
    distribution pip installed under the name, and answers without importing torch."""
    from normkit._provenance import __version__

    p = _cli_then_heavy(["--version"])
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == [f"normkit {__version__}", "HEAVY []"]
