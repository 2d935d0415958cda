"""``normkit study``: small, seeded, reproducible CPU training runs that show what
normalization does — placement (Xiong et al. 2020), norm type (LayerNorm, RMSNorm, Dynamic
Tanh, none), batch dependence (BatchNorm vs LayerNorm) and recurrent nets (Ba et al. 2016) —
on the text of Python's own standard library.

Typical use (what the CLI does)::

    from normkit.study import StudyConfig, run_study, write_outputs
    doc = run_study(StudyConfig.quick(), "study")
    write_outputs(doc, "study")   # results.json, report.md, report.html, plots/, runs/

Importing this package imports torch and normkit, never matplotlib (plots import it lazily).
"""

from .config import EXPERIMENTS, StudyConfig
from .runner import SCHEMA, SCHEMA_VERSION, findings, plan_runs, run_study
from .writeup import build_document, write_outputs

__all__ = [
    "StudyConfig",
    "EXPERIMENTS",
    "run_study",
    "write_outputs",
    "build_document",
    "findings",
    "plan_runs",
    "SCHEMA",
    "SCHEMA_VERSION",
]
