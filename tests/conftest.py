"""Fixtures for the whole suite, and the one switch that must be set before anything imports
triton.

The shared helpers are in ``helpers.py`` (and the tiny models in ``_monitor_models.py``, the
browser in ``_browser.py``), imported by name from every folder: pytest puts this file's folder,
``tests/``, on ``sys.path`` when it loads it.  The folders mirror the package: ``kernels/``,
``monitor/``, ``audit/``, ``study/``; what spans the package (API, modules, convert, CLI, docs)
is at the top."""

from __future__ import annotations

import os

import pytest
import torch
from _prometheus import prometheus_server  # noqa: F401  (a real Prometheus, for any test)

# Without a GPU, test_triton.py runs the Triton kernels on CPU tensors in Triton's interpreter.
# triton.jit decides "interpreted or compiled" when a function is defined — for triton's own
# tl.sum & co. when triton is first imported — so the switch must be on before anything in the
# session imports triton (torch.compile may).  Nothing else changes: "auto" never sends CPU
# tensors to triton, and `import normkit` never imports it.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a test module (``pytestmark = pytest.mark.usefixtures(...)``): its
    tests push a few rows through tiny models, where on a shared 2-core CI machine two threads
    fighting for a busy core at every op cost more than they give (the audit CLI makes the same
    choice)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
