"""``normkit.audit``: one call (or ``normkit audit``) that gates a release on a model's norms.

    report = normkit.audit(model, example_inputs)
    assert report.ok(fail_on="error"), report.to_markdown()

Checks: inventory (type, shape, eps, affine, dtype, params, pre-/post-/peri-norm placement),
parameters, shape (a norm over one feature, or of a width its neighbours do not use), epsilon,
batch dependence, numerics, ONNX export parity, checkpoint round-trip and int8 quantization
sensitivity.  Finding ids are stable (see ``RULES`` and docs/audit.md).

Importing this package imports torch only; onnx, onnxruntime, transformers and safetensors are
imported by the checks that need them.
"""

import sys
import types

from ._core import audit, audit_onnx, audit_state_dict
from ._findings import CHECKS, RULES, SCHEMA_VERSION, SEVERITIES, AuditReport, Finding, Rule


class _CallableModule(types.ModuleType):
    """``normkit.audit(model)`` calls ``audit``, and ``normkit.audit.RULES`` still reads the
    package: the function and its package share a name, so whichever of the two
    ``normkit.audit`` ends up bound to, both spellings work."""

    def __call__(self, *args, **kwargs) -> AuditReport:
        return audit(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = [
    "audit",
    "audit_onnx",
    "audit_state_dict",
    "AuditReport",
    "Finding",
    "Rule",
    "RULES",
    "CHECKS",
    "SEVERITIES",
    "SCHEMA_VERSION",
]
